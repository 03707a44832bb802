"""``embedding_update_`` and ``embedding_grad_sqnorm_``: update only the embedding rows a batch touched.

The gradient of ``E[idx]`` is a scatter of ``grad_out`` rows; rows that repeat are summed in fp32, in
token order (the same bits on every run: no float atomics), before the update rule runs once per row.
With weight decay every row decays, touched or not, exactly as ``torch.optim.SGD`` on a dense embedding
gradient would.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch._subclasses.fake_tensor import is_fake

from .. import backends
from ._common import UpdateRule, check_activation, check_counter, check_stats, check_weight, run_op


def _embedding_update_impl(weight: torch.Tensor, indices: torch.Tensor, grad_out: torch.Tensor, padding_idx: int,
                           decay: float, step: float, inv_loss_scale: float, clip_value: float, stochastic: bool,
                           seed: int, nonfinite: Optional[torch.Tensor], backend: str) -> None:
    rule = UpdateRule(decay, step, inv_loss_scale, clip_value, stochastic, seed)
    backends.module(backend).embedding_update(weight, indices, grad_out, padding_idx, rule, nonfinite)


_embedding_update_op = torch.library.custom_op("lomo_kernels::embedding_update_",
                                               mutates_args=("weight", "nonfinite"))(_embedding_update_impl)


@_embedding_update_op.register_fake
def _(weight, indices, grad_out, padding_idx, decay, step, inv_loss_scale, clip_value, stochastic, seed, nonfinite,
      backend):
    return None


def _embedding_grad_sqnorm_impl(stats: torch.Tensor, indices: torch.Tensor, grad_out: torch.Tensor, padding_idx: int,
                                inv_loss_scale: float, backend: str) -> None:
    backends.module(backend).embedding_grad_sqnorm(stats, indices, grad_out, padding_idx, inv_loss_scale)


_embedding_grad_sqnorm_op = torch.library.custom_op("lomo_kernels::embedding_grad_sqnorm_",
                                                    mutates_args=("stats",))(_embedding_grad_sqnorm_impl)


@_embedding_grad_sqnorm_op.register_fake
def _(stats, indices, grad_out, padding_idx, inv_loss_scale, backend):
    return None


def _flatten(weight, indices, grad_out, padding_idx, name):
    check_weight(weight, name)
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D [num_embeddings, dim], got shape {tuple(weight.shape)}")
    if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: indices must be an int64 or int32 tensor")
    if indices.device != weight.device:
        raise ValueError(f"{name}: indices are on {indices.device} but the weight is on {weight.device}")
    check_activation(grad_out, weight, "grad_out", name)
    if tuple(grad_out.shape) != tuple(indices.shape) + (weight.shape[1],):
        raise ValueError(f"{name}: grad_out must have shape indices.shape + ({weight.shape[1]},) = "
                         f"{tuple(indices.shape) + (weight.shape[1],)}, got {tuple(grad_out.shape)}")
    if padding_idx is None:
        padding_idx = -1
    elif padding_idx < 0:
        padding_idx += weight.shape[0]
    idx = indices.reshape(-1).to(torch.int64).contiguous()
    # One host sync per call: an out-of-range row must fail here, before any write, not as a device assert.
    if idx.numel() and not torch.compiler.is_compiling() and not is_fake(idx) and bool(((idx < 0) | (idx >= weight.shape[0])).any()):
        raise IndexError(f"{name}: indices must lie in [0, {weight.shape[0]})")
    return idx, grad_out.reshape(-1, weight.shape[1]).contiguous(), padding_idx


def embedding_update_(weight: torch.Tensor, indices: torch.Tensor, grad_out: torch.Tensor, *, lr: float,
                      weight_decay: float = 0.0, coef: float = 1.0, loss_scale: float = 1.0,
                      clip_value: float | None = None, rounding: str = "nearest", seed: int = 0,
                      padding_idx: int | None = None, backend: str = "auto", name: str = "weight",
                      nonfinite: torch.Tensor | None = None) -> None:
    """Update ``weight`` [V, D] in place from ``grad_out`` [*indices.shape, D] of ``weight[indices]``; elements
    whose new value is not finite keep their old value, counted into ``nonfinite`` (int64, shape (1,))."""
    rule = UpdateRule.make(lr, weight_decay, coef, loss_scale, clip_value, rounding, seed, name)
    idx, dy, pad = _flatten(weight, indices, grad_out, padding_idx, name)
    check_counter(nonfinite, weight, name)
    chosen = backends.resolve(backend, weight.device)
    run_op(_embedding_update_op, _embedding_update_impl, (weight,) + ((nonfinite,) if nonfinite is not None else ()),
           weight, idx, dy, pad, rule.decay, rule.step, rule.inv_loss_scale, rule.clip_value, rule.stochastic,
           rule.seed, nonfinite, chosen)


def embedding_grad_sqnorm_(stats: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor, grad_out: torch.Tensor,
                           *, loss_scale: float = 1.0, padding_idx: int | None = None, backend: str = "auto",
                           name: str = "weight") -> None:
    """Add ``[‖G / loss_scale‖², non-finite count]`` of the embedding gradient to ``stats``."""
    UpdateRule.make(0.0, loss_scale=loss_scale, name=name)
    idx, dy, pad = _flatten(weight, indices, grad_out, padding_idx, name)
    check_stats(stats, weight, name)
    chosen = backends.resolve(backend, weight.device)
    run_op(_embedding_grad_sqnorm_op, _embedding_grad_sqnorm_impl, (stats,), stats, idx, dy, pad, 1.0 / loss_scale,
           chosen)
