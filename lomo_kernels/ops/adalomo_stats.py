"""AdaLomo's extra passes over a linear layer's weight gradient ``G = dyᵀx``, without building ``G``.

AdaLomo (Adafactor-style) needs, before it can update ``W``, the row and column sums of ``u²``
(``u = clamp(G / loss_scale, ±clip_value)``) for its factored second moment, and then the squared
norm of the scaled update ``row_scale_i · u_ij · col_scale_j`` for its update normalization. Each
is one more pass over the gradient's tiles that keeps only vectors:

    adalomo_sq_sums_        row_sums[out] += Σ_j u², col_sums[in] += Σ_i u²     (GEMM or Gram pass)
    adalomo_scaled_sqnorm_  stats += [Σ (r_i u_ij c_j)², non-finite count]
    adalomo_linear_update_  W <- (1 - lr·wd)·W - lr·coef · r_i u_ij c_j

Without value clipping ``r_i u_ij c_j`` is the gradient of the scaled activations
``(dy·r)ᵀ (x·c) / loss_scale``, so the last two can run as the ordinary fused ops (``linear_grad_sqnorm_``
with its ghost-norm choice, ``linear_update_``) on every backend; that is what they do where fp32
copies of the scaled activations are smaller than the weight (few tokens). Otherwise, and with value
clipping, they are ``torch.library`` custom ops: compiled for the ``cpu`` backend (block GEMMs from the
activations' own dtype, the scales applied in the epilogue: no activation copies), the torch reference
(``lomo_kernels.kernels.reference``) for every other backend. ``backend="auto"`` takes ``cpu`` for CPU
tensors where it is built.

``adalomo_sq_sums_(..., stats=s)`` also adds the norm pass's terms ``[‖G / loss_scale‖², non-finite
count]`` (before value clipping, as ``linear_grad_sqnorm_``) to ``s`` from the same pass: a norm phase
that needs both the global norm and AdaLomo's sums gets them from one pass over ``G``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import backends
from ..kernels import reference
from ._common import UpdateRule, check_counter, check_stats, run_op
from .embedding_update import _flatten as _flatten_embedding
from .linear_update import _flatten as _flatten_linear
from .linear_update import linear_grad_sqnorm_, linear_update_


def _compiled(backend: str) -> bool:
    return backend in ("cpu", "triton")


def _kernels(backend: str):
    """The module with the compiled passes: the cpu backend's, or the Triton kernels' own module."""
    if backend == "triton":
        from ..kernels import triton_adalomo
        return triton_adalomo
    return backends.module(backend)


def _sq_sums_impl(row_sums: torch.Tensor, col_sums: torch.Tensor, stats: torch.Tensor, x: torch.Tensor,
                  grad_out: torch.Tensor, inv_loss_scale: float, clip_value: float, method: str, backend: str) -> None:
    if method == "ghost":
        rows = torch.zeros_like(row_sums)
        cols = torch.zeros_like(col_sums)
        reference.adalomo_sq_sums_ghost(rows, cols, x, grad_out, inv_loss_scale)
        row_sums += rows
        col_sums += cols
        total = rows.sum()  # = ‖G · inv_loss_scale‖²: the norm pass's sum (a non-finite one counted once)
        stats[0] += total
        stats[1] += (~torch.isfinite(total)).to(torch.float32)
    elif _compiled(backend):
        _kernels(backend).adalomo_sq_sums(row_sums, col_sums, stats, x, grad_out, inv_loss_scale, clip_value)
    else:
        reference.adalomo_sq_sums(row_sums, col_sums, x, grad_out, inv_loss_scale, clip_value, stats)


_sq_sums_op = torch.library.custom_op("lomo_kernels::adalomo_sq_sums_", mutates_args=("row_sums", "col_sums", "stats"))(
    _sq_sums_impl)


@_sq_sums_op.register_fake
def _(row_sums, col_sums, stats, x, grad_out, inv_loss_scale, clip_value, method, backend):
    return None


def _scaled_sqnorm_impl(stats: torch.Tensor, x: torch.Tensor, grad_out: torch.Tensor, row_scale: torch.Tensor,
                        col_scale: torch.Tensor, inv_loss_scale: float, clip_value: float, backend: str) -> None:
    if _compiled(backend):
        _kernels(backend).adalomo_scaled_sqnorm(stats, x, grad_out, row_scale, col_scale, inv_loss_scale,
                                                clip_value)
    else:
        reference.adalomo_scaled_sqnorm(stats, x, grad_out, row_scale, col_scale, inv_loss_scale, clip_value)


_scaled_sqnorm_op = torch.library.custom_op("lomo_kernels::adalomo_scaled_sqnorm_", mutates_args=("stats",))(
    _scaled_sqnorm_impl)


@_scaled_sqnorm_op.register_fake
def _(stats, x, grad_out, row_scale, col_scale, inv_loss_scale, clip_value, backend):
    return None


def _linear_update_impl(weight: torch.Tensor, x: torch.Tensor, grad_out: torch.Tensor, row_scale: torch.Tensor,
                        col_scale: torch.Tensor, decay: float, step: float, inv_loss_scale: float, clip_value: float,
                        stochastic: bool, seed: int, nonfinite: Optional[torch.Tensor], backend: str) -> None:
    rule = UpdateRule(decay, step, inv_loss_scale, clip_value, stochastic, seed)
    if _compiled(backend):
        _kernels(backend).adalomo_linear_update(weight, x, grad_out, row_scale, col_scale, rule, nonfinite)
    else:
        reference.adalomo_linear_update(weight, x, grad_out, row_scale, col_scale, rule, nonfinite)


_linear_update_op = torch.library.custom_op("lomo_kernels::adalomo_linear_update_",
                                            mutates_args=("weight", "nonfinite"))(_linear_update_impl)


@_linear_update_op.register_fake
def _(weight, x, grad_out, row_scale, col_scale, decay, step, inv_loss_scale, clip_value, stochastic, seed, nonfinite,
      backend):
    return None


def _check_vector(v: torch.Tensor, size: int, weight: torch.Tensor, label: str, name: str) -> None:
    if not isinstance(v, torch.Tensor) or v.dtype != torch.float32 or v.shape != (size,) or v.device != weight.device:
        got = f"{v.dtype} {tuple(v.shape)} on {v.device}" if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"{name}: {label} must be a float32 tensor of shape ({size},) on {weight.device}, got {got}")
    if not v.is_contiguous():
        raise ValueError(f"{name}: {label} must be contiguous")


def _checked(weight, x, grad_out, row, col, row_label, col_label, loss_scale, clip_value, name):
    UpdateRule.make(0.0, loss_scale=loss_scale, clip_value=clip_value, name=name)
    x2, dy2 = _flatten_linear(weight, x, grad_out, name)
    _check_vector(row, weight.shape[0], weight, row_label, name)
    _check_vector(col, weight.shape[1], weight, col_label, name)
    return x2, dy2


def adalomo_sq_sums_(row_sums: torch.Tensor, col_sums: torch.Tensor, weight: torch.Tensor, x: torch.Tensor,
                     grad_out: torch.Tensor, *, loss_scale: float = 1.0, clip_value: float | None = None,
                     method: str = "auto", name: str = "weight", stats: torch.Tensor | None = None,
                     backend: str = "auto") -> None:
    """Add the row and column sums of ``clamp(dyᵀx / loss_scale, ±clip_value)²`` to ``row_sums`` [out]
    and ``col_sums`` [in] (float32). ``method``: "gemm" (row blocks of G), "ghost" (token Gram
    matrices; no value clipping), "auto" (ghost when cheaper and allowed: its four GEMMs cost
    2·T²·(in+out) multiply-adds against the gemm pass's T·in·out). With ``stats`` (float32, shape
    (2,)), also add ``[‖dyᵀx / loss_scale‖², non-finite count]`` to it (the norm pass's terms; the
    ghost method counts a non-finite sum once)."""
    x2, dy2 = _checked(weight, x, grad_out, row_sums, col_sums, "row_sums", "col_sums", loss_scale, clip_value, name)
    if stats is not None:
        check_stats(stats, weight, name)
    if method == "auto":
        tokens, (out_f, in_f) = x2.shape[0], weight.shape
        method = "ghost" if clip_value is None and 2 * tokens * (in_f + out_f) <= in_f * out_f else "gemm"
    if method not in ("gemm", "ghost"):
        raise ValueError(f"{name}: method must be 'auto', 'gemm' or 'ghost', got {method!r}")
    if method == "ghost" and clip_value is not None:
        raise ValueError(f"{name}: the ghost method cannot apply value clipping (it never sees single entries)")
    chosen = backends.resolve(backend, weight.device)
    sink = stats if stats is not None else torch.zeros(2, dtype=torch.float32, device=weight.device)
    run_op(_sq_sums_op, _sq_sums_impl, (row_sums, col_sums, sink), row_sums, col_sums, sink, x2, dy2,
           1.0 / loss_scale, _clip(clip_value), method, chosen)


def _copies_are_small(x2: torch.Tensor, weight: torch.Tensor) -> bool:
    """fp32 copies of the scaled activations take no more than the weight (few tokens)."""
    return x2.shape[0] * (weight.shape[0] + weight.shape[1]) <= weight.numel()


def _clip(clip_value: float | None) -> float:
    return float("inf") if clip_value is None else float(clip_value)


def _scaled_activations(x2, dy2, row_scale, col_scale):
    return x2.to(torch.float32) * col_scale, dy2.to(torch.float32) * row_scale


def adalomo_scaled_sqnorm_(stats: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, grad_out: torch.Tensor,
                           row_scale: torch.Tensor, col_scale: torch.Tensor, *, loss_scale: float = 1.0,
                           clip_value: float | None = None, backend: str = "auto", name: str = "weight") -> None:
    """Add ``[Σ (row_scale_i · u_ij · col_scale_j)², non-finite count]`` to ``stats`` (float32, shape (2,))."""
    x2, dy2 = _checked(weight, x, grad_out, row_scale, col_scale, "row_scale", "col_scale", loss_scale,
                       clip_value, name)
    check_stats(stats, weight, name)
    chosen = backends.resolve(backend, weight.device)
    if clip_value is None and (not _compiled(chosen) or _copies_are_small(x2, weight)):
        xs, dys = _scaled_activations(x2, dy2, row_scale, col_scale)
        linear_grad_sqnorm_(stats, weight, xs, dys, loss_scale=loss_scale, backend=backend, name=name)
    else:
        run_op(_scaled_sqnorm_op, _scaled_sqnorm_impl, (stats,), stats, x2, dy2, row_scale, col_scale,
               1.0 / loss_scale, _clip(clip_value), chosen)


def adalomo_linear_update_(weight: torch.Tensor, x: torch.Tensor, grad_out: torch.Tensor, row_scale: torch.Tensor,
                           col_scale: torch.Tensor, *, lr: float, weight_decay: float = 0.0, coef: float = 1.0,
                           loss_scale: float = 1.0, clip_value: float | None = None, rounding: str = "nearest",
                           seed: int = 0, backend: str = "auto", name: str = "weight",
                           nonfinite: torch.Tensor | None = None) -> None:
    """``W <- (1 - lr·wd)·W - lr·coef · row_scale_i · clamp(G_ij / loss_scale, ±clip_value) · col_scale_j``;
    non-finite results keep the old element, counted into ``nonfinite`` (see ``linear_update_``)."""
    rule = UpdateRule.make(lr, weight_decay, coef, loss_scale, clip_value, rounding, seed, name)
    x2, dy2 = _checked(weight, x, grad_out, row_scale, col_scale, "row_scale", "col_scale", loss_scale,
                       clip_value, name)
    chosen = backends.resolve(backend, weight.device)
    if clip_value is None and (not _compiled(chosen) or _copies_are_small(x2, weight)):
        xs, dys = _scaled_activations(x2, dy2, row_scale, col_scale)
        linear_update_(weight, xs, dys, lr=lr, weight_decay=weight_decay, coef=coef, loss_scale=loss_scale,
                       rounding=rounding, seed=seed, backend=backend, name=name, nonfinite=nonfinite)
    else:
        check_counter(nonfinite, weight, name)
        run_op(_linear_update_op, _linear_update_impl, (weight,) + ((nonfinite,) if nonfinite is not None else ()),
               weight, x2, dy2, row_scale, col_scale, rule.decay, rule.step, rule.inv_loss_scale, rule.clip_value,
               rule.stochastic, rule.seed, nonfinite, chosen)


def embedding_row_gradients(weight: torch.Tensor, indices: torch.Tensor, grad_out: torch.Tensor,
                            padding_idx: int | None = None, name: str = "weight"):
    """``(rows, G_rows)``: the distinct embedding rows ``indices`` touch (padding excluded) and their fp32
    gradient (duplicates summed in token order: the same bits every run). Token-sized, never vocabulary-sized."""
    idx, dy, pad = _flatten_embedding(weight, indices, grad_out, padding_idx, name)
    return reference._row_gradients(idx, dy, pad)
