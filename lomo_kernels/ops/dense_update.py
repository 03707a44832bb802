"""``dense_update_`` and ``dense_grad_sqnorm_``: the same update rule for small parameters whose
gradient autograd has already built (norm weights, biases), called from a post-accumulate-grad hook."""
from __future__ import annotations

from typing import Optional

import torch

from .. import backends
from ._common import UpdateRule, check_activation, check_counter, check_stats, check_weight, run_op


def _dense_update_impl(param: torch.Tensor, grad: torch.Tensor, decay: float, step: float, inv_loss_scale: float,
                       clip_value: float, stochastic: bool, seed: int, nonfinite: Optional[torch.Tensor],
                       backend: str) -> None:
    rule = UpdateRule(decay, step, inv_loss_scale, clip_value, stochastic, seed)
    backends.module(backend).dense_update(param.view(-1), grad.view(-1), rule, nonfinite)


_dense_update_op = torch.library.custom_op("lomo_kernels::dense_update_", mutates_args=("param", "nonfinite"))(
    _dense_update_impl)


@_dense_update_op.register_fake
def _(param, grad, decay, step, inv_loss_scale, clip_value, stochastic, seed, nonfinite, backend):
    return None


def _dense_grad_sqnorm_impl(stats: torch.Tensor, grad: torch.Tensor, inv_loss_scale: float, backend: str) -> None:
    backends.module(backend).dense_grad_sqnorm(stats, grad.view(-1), inv_loss_scale)


_dense_grad_sqnorm_op = torch.library.custom_op("lomo_kernels::dense_grad_sqnorm_", mutates_args=("stats",))(
    _dense_grad_sqnorm_impl)


@_dense_grad_sqnorm_op.register_fake
def _(stats, grad, inv_loss_scale, backend):
    return None


def _check(param, grad, name):
    check_weight(param, name)
    check_activation(grad, param, "grad", name)
    if grad.shape != param.shape:
        raise ValueError(f"{name}: grad shape {tuple(grad.shape)} does not match the parameter's {tuple(param.shape)}")
    return grad.contiguous()


def dense_update_(param: torch.Tensor, grad: torch.Tensor, *, lr: float, weight_decay: float = 0.0,
                  coef: float = 1.0, loss_scale: float = 1.0, clip_value: float | None = None,
                  rounding: str = "nearest", seed: int = 0, backend: str = "auto", name: str = "param",
                  nonfinite: torch.Tensor | None = None) -> None:
    """Update ``param`` in place from its gradient ``grad`` (same shape) with the fused update rule; elements
    whose new value is not finite keep their old value, counted into ``nonfinite`` (int64, shape (1,))."""
    rule = UpdateRule.make(lr, weight_decay, coef, loss_scale, clip_value, rounding, seed, name)
    grad = _check(param, grad, name)
    check_counter(nonfinite, param, name)
    chosen = backends.resolve(backend, param.device)
    run_op(_dense_update_op, _dense_update_impl, (param,) + ((nonfinite,) if nonfinite is not None else ()),
           param, grad, rule.decay, rule.step, rule.inv_loss_scale, rule.clip_value, rule.stochastic, rule.seed,
           nonfinite, chosen)


def dense_grad_sqnorm_(stats: torch.Tensor, param: torch.Tensor, grad: torch.Tensor, *, loss_scale: float = 1.0,
                       backend: str = "auto", name: str = "param") -> None:
    """Add ``[‖grad / loss_scale‖², non-finite count]`` to ``stats``."""
    UpdateRule.make(0.0, loss_scale=loss_scale, name=name)
    grad = _check(param, grad, name)
    check_stats(stats, param, name)
    chosen = backends.resolve(backend, param.device)
    run_op(_dense_grad_sqnorm_op, _dense_grad_sqnorm_impl, (stats,), stats, grad, 1.0 / loss_scale, chosen)
