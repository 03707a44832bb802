"""Fused AdamW updates: ``adamw_linear_update_``, ``adamw_embedding_update_``, ``adamw_dense_update_``.

A linear layer's weight gradient ``G = dyᵀx`` is computed block by block (tile by tile on GPU) and
each block updates the matching entries of the first moment ``m``, second moment ``v`` and weight
``W`` at once; the gradient never exists whole. Per element, with ``g`` the raw gradient entry:

    g = coef · clamp(g · inv_loss_scale, ±clip_value)        # lomo-optim's order, as the other rules
    m = β1·m + (1-β1)·g        (as torch: lerp(m, g, 1-β1))
    v = β2·v + (1-β2)·g²
    W = decay·W - step · m / (√v / denom_div + eps)

``AdamRule.torch_adamw`` folds ``torch.optim.AdamW`` into these scalars (decay = 1 - lr·wd applied to
the old weight, step = lr / (1-β1^t), denom_div = √(1-β2^t)); ``AdamRule.apollo_adamw`` folds
apollo-torch's AdamW arithmetic (bias correction in the step size, ε after √v, weight decay applied to
the *updated* weight: step = decay · lr·√(1-β2^t)/(1-β1^t), denom_div = 1).

State dtypes: ``m``, ``v`` are float32 or bfloat16; bf16 state is rounded stochastically (when
``state_stochastic``) with the counter-based rounding of ``lomo_kernels.ops._common``, seeded with
``mix32(seed ^ 0x6D6D6D6D)`` for ``m`` and ``mix32(seed ^ 0x76767676)`` for ``v`` (``seed`` itself
rounds the weight), the flat index being the element's index in the weight.

The non-finite guard (as every fused update, ``lomo_kernels.ops._common``): an element whose new ``w``,
``m`` or ``v``, rounded into its dtype, is not finite keeps its old ``w``, ``m`` and ``v``; the ops add
the number of such elements to the optional ``nonfinite`` counter (int64, shape (1,), on the weight's
device; added to on the device, no host sync).

Backends: ``torch`` (``lomo_kernels.kernels.reference_adamw``) implements all three; ``cpu`` and
``cuda`` are the compiled kernels (``csrc/cpu/adamw.cpp``, ``csrc/cuda/adamw_linear.cu`` and
``adamw_rows.cu``; the per-element math is ``adam_element`` in ``csrc/lomo_math.h``, in the reference's
order of operations); the ``triton`` backend has its own linear kernel
(``kernels.triton_adamw``) and runs the reference for the embedding and dense updates.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .. import backends
from ._common import check_activation, check_counter, check_update_scalars, check_weight, mix32_int, run_op
from .embedding_update import _flatten as _flatten_embedding
from .linear_update import _flatten as _flatten_linear

STATE_DTYPES = (torch.float32, torch.bfloat16)
SEED_M, SEED_V = 0x6D6D6D6D, 0x76767676


@dataclass(frozen=True)
class AdamRule:
    """The scalars of one fused AdamW step (see the module docstring)."""

    decay: float
    step: float
    beta1: float
    beta2: float
    denom_div: float
    eps: float
    inv_loss_scale: float = 1.0
    clip_value: float = math.inf
    coef: float = 1.0
    stochastic: bool = False
    state_stochastic: bool = False
    seed: int = 0

    @property
    def seed_m(self) -> int:
        return mix32_int(self.seed ^ SEED_M)

    @property
    def seed_v(self) -> int:
        return mix32_int(self.seed ^ SEED_V)

    @staticmethod
    def torch_adamw(lr, betas, eps, weight_decay, t, **kw) -> "AdamRule":
        """``torch.optim.AdamW`` at step ``t`` (1-based)."""
        b1, b2 = betas
        return AdamRule(decay=1.0 - lr * weight_decay, step=lr / (1.0 - b1 ** t), beta1=b1, beta2=b2,
                        denom_div=math.sqrt(1.0 - b2 ** t), eps=eps, **kw)

    @staticmethod
    def apollo_adamw(lr, betas, eps, weight_decay, t, **kw) -> "AdamRule":
        """apollo-torch's AdamW (``apollo.py``) at step ``t`` (1-based)."""
        b1, b2 = betas
        decay = 1.0 - lr * weight_decay
        return AdamRule(decay=decay, step=decay * lr * math.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t), beta1=b1,
                        beta2=b2, denom_div=1.0, eps=eps, **kw)


def check_rule(rule: AdamRule, name: str) -> None:
    check_update_scalars(0.0, 0.0, rule.coef, 1.0 / rule.inv_loss_scale, None if math.isinf(rule.clip_value)
                         else rule.clip_value, "stochastic" if rule.stochastic else "nearest", rule.seed, name)
    for label, value in (("decay", rule.decay), ("step", rule.step), ("denom_div", rule.denom_div),
                         ("eps", rule.eps)):
        if not math.isfinite(value):
            raise ValueError(f"{name}: {label} must be finite, got {value!r}")
    if not (0.0 <= rule.beta1 < 1.0 and 0.0 <= rule.beta2 < 1.0):
        raise ValueError(f"{name}: betas must lie in [0, 1), got ({rule.beta1}, {rule.beta2})")
    if rule.eps < 0 or rule.denom_div <= 0 or rule.step < 0:
        raise ValueError(f"{name}: eps must be >= 0, denom_div > 0 and step >= 0")


def check_state(weight: torch.Tensor, m: torch.Tensor, v: torch.Tensor, name: str) -> None:
    for label, s in (("exp_avg", m), ("exp_avg_sq", v)):
        if not isinstance(s, torch.Tensor) or s.dtype not in STATE_DTYPES:
            raise TypeError(f"{name}: {label} must be a float32 or bfloat16 tensor")
        if s.shape != weight.shape or s.device != weight.device or not s.is_contiguous():
            raise ValueError(f"{name}: {label} must be contiguous, of the weight's shape {tuple(weight.shape)} and "
                             f"on {weight.device}; got {tuple(s.shape)} on {s.device}")
    if m.dtype != v.dtype:
        raise TypeError(f"{name}: exp_avg and exp_avg_sq must have one dtype, got {m.dtype} and {v.dtype}")
    check_activation(m, weight, "exp_avg", name)
    check_activation(v, weight, "exp_avg_sq", name)
    from ._common import _overlaps
    if _overlaps(m, v):
        raise ValueError(f"{name}: exp_avg and exp_avg_sq alias each other")


def _rule_args(rule: AdamRule) -> tuple:
    return (rule.decay, rule.step, rule.beta1, rule.beta2, rule.denom_div, rule.eps, rule.inv_loss_scale,
            rule.clip_value, rule.coef, rule.stochastic, rule.state_stochastic, rule.seed)


def _module(backend: str, kind: str):
    if backend == "triton" and kind == "linear":
        from ..kernels import triton_adamw
        return triton_adamw
    if backend in ("cpu", "cuda"):
        from ..kernels import native
        return native
    from ..kernels import reference_adamw
    return reference_adamw


def _mutated(tensors: tuple, nonfinite):
    return tensors + ((nonfinite,) if nonfinite is not None else ())


# --- linear -------------------------------------------------------------------------------------------

def _linear_impl(weight: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, x: torch.Tensor,
                 grad_out: torch.Tensor, decay: float, step: float, beta1: float, beta2: float, denom_div: float,
                 eps: float, inv_loss_scale: float, clip_value: float, coef: float, stochastic: bool,
                 state_stochastic: bool, seed: int, nonfinite: Optional[torch.Tensor], backend: str) -> None:
    rule = AdamRule(decay, step, beta1, beta2, denom_div, eps, inv_loss_scale, clip_value, coef, stochastic,
                    state_stochastic, seed)
    _module(backend, "linear").adamw_linear_update(weight, exp_avg, exp_avg_sq, x, grad_out, rule, nonfinite)


_linear_op = torch.library.custom_op("lomo_kernels::adamw_linear_update_",
                                     mutates_args=("weight", "exp_avg", "exp_avg_sq", "nonfinite"))(_linear_impl)


@_linear_op.register_fake
def _(weight, exp_avg, exp_avg_sq, x, grad_out, decay, step, beta1, beta2, denom_div, eps, inv_loss_scale,
      clip_value, coef, stochastic, state_stochastic, seed, nonfinite, backend):
    return None


def adamw_linear_update_(weight: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, x: torch.Tensor,
                         grad_out: torch.Tensor, rule: AdamRule, *, backend: str = "auto",
                         name: str = "weight", nonfinite: torch.Tensor | None = None) -> None:
    """AdamW step of ``weight`` [out, in] and its moments from ``x`` [..., in], ``grad_out`` [..., out]
    of ``y = x Wᵀ``, without building ``dyᵀx``. Every check runs before anything is written; elements the
    non-finite guard keeps are counted into ``nonfinite``."""
    check_rule(rule, name)
    x2, dy2 = _flatten_linear(weight, x, grad_out, name)
    check_state(weight, exp_avg, exp_avg_sq, name)
    check_counter(nonfinite, weight, name)
    chosen = backends.resolve(backend, weight.device)
    run_op(_linear_op, _linear_impl, _mutated((weight, exp_avg, exp_avg_sq), nonfinite), weight, exp_avg,
           exp_avg_sq, x2, dy2, *_rule_args(rule), nonfinite, chosen)


# --- embedding ----------------------------------------------------------------------------------------

def _embedding_impl(weight: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, indices: torch.Tensor,
                    grad_out: torch.Tensor, padding_idx: int, decay: float, step: float, beta1: float, beta2: float,
                    denom_div: float, eps: float, inv_loss_scale: float, clip_value: float, coef: float,
                    stochastic: bool, state_stochastic: bool, seed: int, nonfinite: Optional[torch.Tensor],
                    backend: str) -> None:
    rule = AdamRule(decay, step, beta1, beta2, denom_div, eps, inv_loss_scale, clip_value, coef, stochastic,
                    state_stochastic, seed)
    _module(backend, "embedding").adamw_embedding_update(weight, exp_avg, exp_avg_sq, indices, grad_out,
                                                         padding_idx, rule, nonfinite)


_embedding_op = torch.library.custom_op("lomo_kernels::adamw_embedding_update_",
                                        mutates_args=("weight", "exp_avg", "exp_avg_sq", "nonfinite"))(_embedding_impl)


@_embedding_op.register_fake
def _(weight, exp_avg, exp_avg_sq, indices, grad_out, padding_idx, decay, step, beta1, beta2, denom_div, eps,
      inv_loss_scale, clip_value, coef, stochastic, state_stochastic, seed, nonfinite, backend):
    return None


def adamw_embedding_update_(weight: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                            indices: torch.Tensor, grad_out: torch.Tensor, rule: AdamRule, *,
                            padding_idx: int | None = None, backend: str = "auto", name: str = "weight",
                            nonfinite: torch.Tensor | None = None) -> None:
    """The dense AdamW step of an embedding ``weight`` [V, D] whose gradient is the scatter of
    ``grad_out`` [*indices.shape, D] (rows not touched still move, as with torch's dense gradient)."""
    check_rule(rule, name)
    idx, dy, pad = _flatten_embedding(weight, indices, grad_out, padding_idx, name)
    check_state(weight, exp_avg, exp_avg_sq, name)
    check_counter(nonfinite, weight, name)
    chosen = backends.resolve(backend, weight.device)
    run_op(_embedding_op, _embedding_impl, _mutated((weight, exp_avg, exp_avg_sq), nonfinite), weight, exp_avg,
           exp_avg_sq, idx, dy, pad, *_rule_args(rule), nonfinite, chosen)


# --- dense --------------------------------------------------------------------------------------------

def _dense_impl(param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor,
                decay: float, step: float, beta1: float, beta2: float, denom_div: float, eps: float,
                inv_loss_scale: float, clip_value: float, coef: float, stochastic: bool, state_stochastic: bool,
                seed: int, nonfinite: Optional[torch.Tensor], backend: str) -> None:
    rule = AdamRule(decay, step, beta1, beta2, denom_div, eps, inv_loss_scale, clip_value, coef, stochastic,
                    state_stochastic, seed)
    _module(backend, "dense").adamw_dense_update(param.view(-1), exp_avg.view(-1), exp_avg_sq.view(-1),
                                                 grad.view(-1), rule, nonfinite)


_dense_op = torch.library.custom_op("lomo_kernels::adamw_dense_update_",
                                    mutates_args=("param", "exp_avg", "exp_avg_sq", "nonfinite"))(_dense_impl)


@_dense_op.register_fake
def _(param, exp_avg, exp_avg_sq, grad, decay, step, beta1, beta2, denom_div, eps, inv_loss_scale, clip_value, coef,
      stochastic, state_stochastic, seed, nonfinite, backend):
    return None


def adamw_dense_update_(param: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, grad: torch.Tensor,
                        rule: AdamRule, *, backend: str = "auto", name: str = "param",
                        nonfinite: torch.Tensor | None = None) -> None:
    """AdamW step of ``param`` and its moments from its gradient ``grad`` (same shape)."""
    check_rule(rule, name)
    check_weight(param, name)
    check_activation(grad, param, "grad", name)
    if grad.shape != param.shape:
        raise ValueError(f"{name}: grad shape {tuple(grad.shape)} does not match the parameter's {tuple(param.shape)}")
    check_state(param, exp_avg, exp_avg_sq, name)
    check_counter(nonfinite, param, name)
    chosen = backends.resolve(backend, param.device)
    run_op(_dense_op, _dense_impl, _mutated((param, exp_avg, exp_avg_sq), nonfinite), param, exp_avg, exp_avg_sq,
           grad.contiguous(), *_rule_args(rule), nonfinite, chosen)
