"""``AdamW``: ``torch.optim.AdamW`` with the update fused into the backward pass.

Per parameter at step ``t = 1, 2, ...`` with ``g = c · clamp(grad / loss_scale, ±clip_grad_value)``
(``c`` the global-norm clip coefficient, lomo-optim's order as in ``Lomo``):

    W <- (1 - lr·wd)·W                      (decoupled weight decay, on the old weight)
    m <- β1·m + (1-β1)·g                    v <- β2·v + (1-β2)·g²
    W <- W - lr/(1-β1^t) · m / (√v / √(1-β2^t) + eps)

exactly ``torch.optim.AdamW`` (``amsgrad=False``, ``maximize=False``). A linear layer's gradient
``dyᵀx`` is computed block by block and each block updates ``m``, ``v`` and ``W`` at once: the only
weight-sized tensors are ``m`` and ``v`` (``lomo_kernels.ops.adamw_update``). Embeddings and the other
parameters get the same dense rule (rows a batch did not touch still move by ``m̂/(√v̂+ε)``).
``state_dtype=torch.bfloat16`` keeps ``m`` and ``v`` in bf16, rounded stochastically (reproducible for a
given ``seed``); ``state_rounding="nearest"`` rounds them to nearest instead.

Non-finite gradients (``on_nonfinite``, as ``Lomo``): in the default ``"partial"`` mode every element
whose new weight, ``m`` or ``v`` would not be finite keeps all three old values and is counted
(``last_nonfinite_updates``); ``"skip_step"`` / ``"raise"`` run a norm phase and change nothing.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops import adamw_update as adamw_ops
from ..ops.adamw_update import AdamRule
from . import _checks
from .base import FusedOptimizer
from .loss_scaler import DynamicLossScaler, LossScaledMixin

STATE_DTYPES = (torch.float32, torch.bfloat16)


def check_betas(betas) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    return (_checks.number("betas[0]", betas[0], low=0.0, high=1.0, high_open=True),
            _checks.number("betas[1]", betas[1], low=0.0, high=1.0, high_open=True))


def load_named_tensors(kind: str, mine: dict, state: dict) -> None:
    """Copy a checkpoint's per-parameter tensors into ``mine`` after checking everything matches."""
    if set(state) != set(mine):
        missing, extra = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
        raise ValueError(f"checkpoint's {kind} state does not match this model: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")
    for name, entry in mine.items():
        for key, tensor in entry.items():
            saved = state[name].get(key)
            if saved is None or saved.shape != tensor.shape:
                raise ValueError(f"checkpoint's {key} for {name!r} is missing or has the wrong shape "
                                 f"(expected {tuple(tensor.shape)})")
    for name, entry in mine.items():
        for key, tensor in entry.items():
            tensor.copy_(state[name][key])


class AdamW(LossScaledMixin, FusedOptimizer):
    """Fused ``torch.optim.AdamW``. Arguments as torch's (``lr``, ``betas``, ``eps``, ``weight_decay``; torch's
    default ``weight_decay=0.01`` is *not* copied: 0 here, as the issue specifies), plus ``clip_grad_norm``,
    ``clip_grad_value``, ``loss_scale_args`` (fp16), ``state_dtype`` (float32 or bfloat16 moments),
    ``state_rounding`` (None: stochastic for bf16 state), and ``backend``, ``rounding``, ``seed``, ``no_decay``,
    ``unfused``, ``on_nonfinite``, ``fused_cross_entropy`` as for ``Lomo``. Use::

        opt = lomo_kernels.AdamW(model, lr=1e-4, weight_decay=0.01, clip_grad_norm=1.0)
        opt.fused_backward(model(**batch).loss, lr)
    """

    rule_kind = "torch"

    def __init__(self, model: nn.Module, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, clip_grad_norm: float | None = None,
                 clip_grad_value: float | None = None, state_dtype: torch.dtype = torch.float32, *,
                 state_rounding: str | None = None, loss_scale_args: dict | None = None, backend: str = "auto",
                 rounding: str | None = None, seed: int = 0, no_decay=(), unfused=(),
                 on_nonfinite: str | None = None, fused_cross_entropy: bool = True):
        self.betas = check_betas(betas)
        self.eps = _checks.non_negative("eps", eps)
        self.weight_decay = _checks.non_negative("weight_decay", weight_decay)
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype must be torch.float32 or torch.bfloat16, got {state_dtype!r}")
        if state_rounding is not None:
            _checks.choice("state_rounding", state_rounding, ("nearest", "stochastic"))
        if loss_scale_args is not None and not isinstance(loss_scale_args, dict):
            raise TypeError(f"loss_scale_args must be None or a dict, got {loss_scale_args!r}")
        self.state_dtype = state_dtype
        self.state_stochastic = (state_rounding or "stochastic") == "stochastic" and state_dtype == torch.bfloat16
        super().__init__(model, dict(lr=lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay,
                                     clip_grad_norm=clip_grad_norm, clip_grad_value=clip_grad_value),
                         clip_grad_norm=clip_grad_norm, clip_grad_value=clip_grad_value, backend=backend,
                         rounding=rounding, seed=seed, no_decay=no_decay, unfused=unfused,
                         on_nonfinite=on_nonfinite, fused_cross_entropy=fused_cross_entropy)
        self.loss_scaler = DynamicLossScaler(**dict(loss_scale_args or {})) if self.checks_overflow else None
        # m and v are made at a parameter's first update (zeros, as torch's lazy state): a wrapper that trains
        # one group at a time (HiFT) never holds the other groups' moments on the device
        self.exp_avg: dict[str, torch.Tensor] = {}
        self.exp_avg_sq: dict[str, torch.Tensor] = {}
        self.adam_names = {name for name, _ in self.adam_parameters()}

    def adam_parameters(self):
        """The (name, parameter) pairs this optimizer keeps AdamW moments for."""
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    # --- the rule ------------------------------------------------------------------------------------

    def adam_rule(self, param: torch.Tensor) -> AdamRule:
        t = self.step_count + 1
        make = AdamRule.torch_adamw if self.rule_kind == "torch" else AdamRule.apollo_adamw
        clip = self.clip_grad_value
        return make(self.lr, self.betas, self.eps, self.weight_decay_for(param), t,
                    inv_loss_scale=1.0 / self.loss_scale, clip_value=float("inf") if clip is None else float(clip),
                    coef=self.clip_coef, stochastic=self._rounding_for(param) == "stochastic",
                    state_stochastic=self.state_stochastic, seed=self._seed_for(param))

    def _moments(self, param):
        name = self._name(param)
        m = self.exp_avg.get(name)
        if m is None:
            m = self.exp_avg[name] = torch.zeros(param.shape, dtype=self.state_dtype, device=param.device)
            self.exp_avg_sq[name] = torch.zeros(param.shape, dtype=self.state_dtype, device=param.device)
        return m, self.exp_avg_sq[name], name

    def linear_apply(self, param, x, dy):
        m, v, name = self._moments(param)
        adamw_ops.adamw_linear_update_(param, m, v, x, dy, self.adam_rule(param), backend=self.backend, name=name,
                                       nonfinite=self.nonfinite_counter(param))

    def embedding_apply(self, param, indices, dy, padding_idx):
        m, v, name = self._moments(param)
        adamw_ops.adamw_embedding_update_(param, m, v, indices, dy, self.adam_rule(param), padding_idx=padding_idx,
                                          backend=self.backend, name=name, nonfinite=self.nonfinite_counter(param))

    def dense_apply(self, param, grad):
        m, v, name = self._moments(param)
        adamw_ops.adamw_dense_update_(param, m, v, grad, self.adam_rule(param), backend=self.backend, name=name,
                                      nonfinite=self.nonfinite_counter(param))

    # --- checkpoints ---------------------------------------------------------------------------------

    def _adam_state(self):
        return {name: {"exp_avg": self.exp_avg[name], "exp_avg_sq": self.exp_avg_sq[name]} for name in self.exp_avg}

    def _named_state(self):
        return self._adam_state()

    def _load_named_state(self, state):
        unknown = sorted(set(state) - self.adam_names)
        if unknown:
            raise ValueError(f"checkpoint's {type(self).__name__} state does not match this model: unexpected {unknown[:3]}")
        params = dict(self.model.named_parameters())
        for name in state:  # the moments the checkpoint has (every parameter updated before it was saved)
            self._moments(params[name])
        for name in set(self.exp_avg) - set(state):  # made here after the checkpoint's step: zeros, as then
            self.exp_avg[name].zero_()
            self.exp_avg_sq[name].zero_()
        load_named_tensors(type(self).__name__, {n: e for n, e in self._adam_state().items() if n in state}, state)
