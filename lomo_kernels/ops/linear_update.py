"""``linear_update_`` and ``linear_grad_sqnorm_``: a linear layer's weight update without its gradient.

For ``y = x Wᵀ`` the weight gradient is ``G = dyᵀ x`` summed over every token. ``linear_update_``
applies ``W <- (1 - lr·wd)·W - lr·coef·clamp(G / loss_scale, ±clip_value)`` block by block, and
``linear_grad_sqnorm_`` accumulates ``‖G / loss_scale‖²`` (and a non-finite count) into a small
buffer: the two phases of an exactly norm-clipped step. Neither allocates a tensor the size of W.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import backends
from ._common import UpdateRule, check_activation, check_counter, check_stats, check_weight, run_op


def _linear_update_impl(weight: torch.Tensor, x: torch.Tensor, grad_out: torch.Tensor, decay: float, step: float,
                      inv_loss_scale: float, clip_value: float, stochastic: bool, seed: int,
                      nonfinite: Optional[torch.Tensor], backend: str) -> None:
    rule = UpdateRule(decay, step, inv_loss_scale, clip_value, stochastic, seed)
    backends.module(backend).linear_update(weight, x, grad_out, rule, nonfinite)


_linear_update_op = torch.library.custom_op("lomo_kernels::linear_update_", mutates_args=("weight", "nonfinite"))(
    _linear_update_impl)


@_linear_update_op.register_fake
def _(weight, x, grad_out, decay, step, inv_loss_scale, clip_value, stochastic, seed, nonfinite, backend):
    return None


def _linear_grad_sqnorm_impl(stats: torch.Tensor, x: torch.Tensor, grad_out: torch.Tensor, inv_loss_scale: float,
                           method: str, backend: str) -> None:
    if method == "ghost":
        # the compiled ghost pass exists for CPU tensors; every other backend uses the reference's
        ghost_backend = "cpu" if backend == "cpu" else "torch"
        backends.module(ghost_backend).linear_grad_sqnorm_ghost(stats, x, grad_out, inv_loss_scale)
    else:
        backends.module(backend).linear_grad_sqnorm(stats, x, grad_out, inv_loss_scale)


_linear_grad_sqnorm_op = torch.library.custom_op("lomo_kernels::linear_grad_sqnorm_", mutates_args=("stats",))(
    _linear_grad_sqnorm_impl)


@_linear_grad_sqnorm_op.register_fake
def _(stats, x, grad_out, inv_loss_scale, method, backend):
    return None


def _flatten(weight: torch.Tensor, x: torch.Tensor, grad_out: torch.Tensor, name: str):
    check_weight(weight, name)
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    check_activation(x, weight, "x", name)
    check_activation(grad_out, weight, "grad_out", name)
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f or grad_out.shape[-1] != out_f:
        raise ValueError(f"{name}: expected x[..., {in_f}] and grad_out[..., {out_f}] for a weight of shape "
                         f"{tuple(weight.shape)}, got x{tuple(x.shape)} and grad_out{tuple(grad_out.shape)}")
    if x.shape[:-1] != grad_out.shape[:-1]:
        raise ValueError(f"{name}: x and grad_out must have the same leading (token) shape, "
                         f"got {tuple(x.shape[:-1])} and {tuple(grad_out.shape[:-1])}")
    if x.dtype != grad_out.dtype:
        raise TypeError(f"{name}: x and grad_out must have one dtype, got {x.dtype} and {grad_out.dtype}")
    # reshape copies only if a view cannot express the flattening (activation-sized, never weight-sized)
    return x.reshape(-1, in_f).contiguous(), grad_out.reshape(-1, out_f).contiguous()


def choose_norm_method(tokens: int, in_features: int, out_features: int) -> str:
    """``ghost`` when ``T·(in+out) <= in·out``, else ``gemm``.

    Measured on the ``cpu`` backend (bench/bench_cpu_speed.py, "norm-only pass" table; fp32 and bf16,
    layers 512x512 to 8000x512, 64-2048 tokens): the compiled ghost pass takes about
    ``T·(in+out) / (in·out)`` times the GEMM pass's time (it computes only the lower triangles of the
    two T x T Gram matrices, half of their T²·(in+out) multiply-adds, at a lower GEMM efficiency for
    their shapes), so the crossover is where that ratio is 1; within 0.9-1.1 of it the two cost the same."""
    return "ghost" if tokens * (in_features + out_features) <= in_features * out_features else "gemm"


def linear_update_(weight: torch.Tensor, x: torch.Tensor, grad_out: torch.Tensor, *, lr: float,
                   weight_decay: float = 0.0, coef: float = 1.0, loss_scale: float = 1.0,
                   clip_value: float | None = None, rounding: str = "nearest", seed: int = 0,
                   backend: str = "auto", name: str = "weight", nonfinite: torch.Tensor | None = None) -> None:
    """Update ``weight`` [out, in] in place from ``x`` [..., in] and ``grad_out`` [..., out] of ``y = x Wᵀ``.

    ``rounding`` ("nearest" or "stochastic", with ``seed`` in [0, 2**32)) applies to bf16/fp16
    weights; fp32 weights are stored as computed. ``name`` labels error messages. Every check
    runs before the weight is written. An element whose new value is not finite keeps its old value;
    ``nonfinite`` (int64, shape (1,), on the weight's device) gets their count added (on the device).
    Without it, fp32 plain-SGD calls take an unguarded one-GEMM shortcut (see ``_common``).
    """
    rule = UpdateRule.make(lr, weight_decay, coef, loss_scale, clip_value, rounding, seed, name)
    x2, dy2 = _flatten(weight, x, grad_out, name)
    check_counter(nonfinite, weight, name)
    chosen = backends.resolve(backend, weight.device)
    run_op(_linear_update_op, _linear_update_impl, (weight,) + ((nonfinite,) if nonfinite is not None else ()),
           weight, x2, dy2, rule.decay, rule.step, rule.inv_loss_scale, rule.clip_value, rule.stochastic, rule.seed,
           nonfinite, chosen)


def linear_grad_sqnorm_(stats: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, grad_out: torch.Tensor, *,
                        loss_scale: float = 1.0, method: str = "auto", backend: str = "auto",
                        name: str = "weight") -> None:
    """Add ``[‖dyᵀx / loss_scale‖², non-finite count]`` to ``stats`` (float32, shape (2,)); W is only read for its shape.

    ``method``: "gemm" (blocked weight-gradient pass), "ghost" (⟨x xᵀ, dy dyᵀ⟩, cheaper for few
    tokens; counts a non-finite result once), or "auto" (the cheaper by multiply-adds).
    """
    UpdateRule.make(0.0, loss_scale=loss_scale, name=name)
    x2, dy2 = _flatten(weight, x, grad_out, name)
    check_stats(stats, weight, name)
    if method == "auto":
        method = choose_norm_method(x2.shape[0], weight.shape[1], weight.shape[0])
    if method not in ("gemm", "ghost"):
        raise ValueError(f"{name}: method must be 'auto', 'gemm' or 'ghost', got {method!r}")
    chosen = backends.resolve(backend, weight.device)
    run_op(_linear_grad_sqnorm_op, _linear_grad_sqnorm_impl, (stats,), stats, x2, dy2, 1.0 / loss_scale, method,
           chosen)
