"""``Lomo``: SGD with the update fused into the backward pass; a drop-in for ``lomo_optim.Lomo``."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from . import _checks
from .base import FusedOptimizer
from .loss_scaler import DynamicLossScaler, LossScaledMixin


class Lomo(LossScaledMixin, FusedOptimizer):
    """LOMO (Lv et al. 2023): ``W <- (1 - lr·wd)·W - lr·c·clamp(g / loss_scale, ±clip_grad_value)``.

    Same arguments and defaults as lomo-optim 0.1.1; ``backend``, ``rounding`` (None: stochastic for
    bf16 weights, nearest otherwise), ``seed``, ``no_decay`` (names of parameters without weight
    decay) and ``unfused`` (names of held weights to update from their own materialized gradient,
    for uses the router cannot fuse) are ours. Use::

        opt = Lomo(model, lr=1e-3, clip_grad_norm=1.0)
        loss = model(**batch).loss
        opt.grad_norm(loss)            # optional: fused_backward runs it when clipping/fp16 need it
        opt.fused_backward(loss, lr)   # backward + update; no optimizer.step()

    fp16: when a trainable parameter is float16, a ``DynamicLossScaler(**loss_scale_args)`` scales
    the loss (lomo-optim decides by the *loss* dtype, which Hugging Face models compute in fp32, so
    there it never scales). Every step then has a norm phase that finds an overflow before any
    weight changes; the step is skipped (``skipped_step``), the scale lowered, and raised again after
    ``scale_window`` clean steps. Unlike lomo-optim, ``clip_grad_norm=None`` stays "no clipping".
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, clip_grad_norm: float | None = None,
                 clip_grad_value: float | None = None, weight_decay: float = 0.0, loss_scale_args: dict | None = None,
                 *, backend: str = "auto", rounding: str | None = None, seed: int = 0, no_decay=(), unfused=(),
                 on_nonfinite: str | None = None, fused_cross_entropy: bool = True):
        self.weight_decay = _checks.non_negative("weight_decay", weight_decay)
        if loss_scale_args is not None and not isinstance(loss_scale_args, dict):
            raise TypeError(f"loss_scale_args must be None or a dict, got {loss_scale_args!r}")
        self.loss_scale_args = dict(loss_scale_args or {})
        super().__init__(model, dict(lr=lr, clip_grad_norm=clip_grad_norm, clip_grad_value=clip_grad_value,
                                     weight_decay=weight_decay),
                         clip_grad_norm=clip_grad_norm, clip_grad_value=clip_grad_value, backend=backend,
                         rounding=rounding, seed=seed, no_decay=no_decay, unfused=unfused,
                         on_nonfinite=on_nonfinite, fused_cross_entropy=fused_cross_entropy)
        self.loss_scaler = DynamicLossScaler(**self.loss_scale_args) if self.checks_overflow else None

    def _rule(self, param: torch.Tensor) -> dict:
        return dict(lr=self.lr, weight_decay=self.weight_decay_for(param), coef=self.clip_coef,
                    loss_scale=self.loss_scale, clip_value=self.clip_grad_value,
                    rounding=self._rounding_for(param), seed=self._seed_for(param), backend=self.backend,
                    name=self._name(param), nonfinite=self.nonfinite_counter(param))

    def linear_with_rows(self, param, x, dy, indices, rows) -> bool:
        """A tied fp32 weight's linear and embedding uses without the one-hot GEMM: the rows the embedding
        touched get ``G_U = dy[:, U]ᵀx + Σ rows`` (token-sized) through the embedding op, every other row
        its linear gradient through the linear op (with those columns of ``dy`` zeroed); decay applied
        once, by the linear op. The touched rows are rounded twice (decay, then update): within fp32's
        rounding, so 16-bit weights keep the single-rounding one-hot route."""
        if param.dtype != torch.float32 or self.phase == "skip":
            return self.phase == "skip"
        touched, inverse = torch.unique(indices, return_inverse=True)
        summed = torch.zeros(len(touched), rows.shape[-1], dtype=torch.float32, device=rows.device)
        summed.index_add_(0, inverse, rows.to(torch.float32))
        summed.addmm_(dy[:, touched].t().to(torch.float32), x.to(torch.float32))
        others = dy.clone()
        others[:, touched] = 0
        if self.phase == "norm":
            self.linear_norm(param, x, others)
            self.embedding_norm(param, touched, summed, None)
        else:
            self.linear_apply(param, x, others)
            rule = dict(self._rule(param), weight_decay=0.0)
            ops.embedding_update_(param, touched, summed, **rule)
        return True

    def linear_apply(self, param, x, dy):
        ops.linear_update_(param, x, dy, **self._rule(param))

    def embedding_apply(self, param, indices, dy, padding_idx):
        ops.embedding_update_(param, indices, dy, padding_idx=padding_idx, **self._rule(param))

    def dense_apply(self, param, grad):
        ops.dense_update_(param, grad, **self._rule(param))
