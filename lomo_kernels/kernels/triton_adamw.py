"""The ``triton`` backend's fused AdamW linear update (``lomo_kernels.ops.adamw_update``).

One kernel per call: each program owns a [BLOCK_OUT, BLOCK_IN] tile of W, accumulates that tile of
``G = dyᵀx`` in fp32 registers over the tokens (the GEMM loop of ``triton_update._linear_kernel``), then
in its epilogue loads the matching tiles of ``m``, ``v`` and ``W``, applies the AdamW rule and stores all
three (an element whose new ``w``, ``m`` or ``v`` is not finite keeps all three, counted into the
optional ``nonfinite`` counter): the gradient never leaves the registers. Rounding of bf16/fp16 weights and of bf16 state uses the
shared counter-based stochastic rounding (``triton_update._round_stochastic``).

Embedding and dense AdamW updates use the torch reference on the same device (small or token-sized).
Under ``TRITON_INTERPRET=1`` (CPU tensors, tests) bf16 operands are widened to fp32 before ``tl.dot``
(the interpreter's bf16 dot is wrong; see DESIGN.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops._common import mix32_int
from . import reference_adamw
from ._triton_device import device_guard
from .triton_update import (INTERPRETED, _NO_FMA, _check_device, _gemm_config, _gemm_tile, _is_finite, _round_nearest,
                            _round_stochastic, _tile_coords, _widen)


@triton.jit
def _rounded(value, flat_index, seed_mix, dtype: tl.constexpr, STOCHASTIC: tl.constexpr):
    """fp32 ``value`` rounded into ``dtype`` (fp32: as is)."""
    if dtype == tl.float32:
        return value
    elif STOCHASTIC:
        return _round_stochastic(value, flat_index, seed_mix, dtype)
    else:
        return _round_nearest(value, dtype)


@triton.jit(do_not_specialize=["seed_w", "seed_m", "seed_v"])
def _adamw_linear_kernel(w_ptr, m_ptr, v_ptr, x_ptr, dy_ptr, count_ptr, tokens, out_features, in_features,
                         stride_x_tok, stride_x_in, stride_dy_tok, stride_dy_out,
                         decay, step, lerp_weight, beta2, one_minus_beta2, denom_div, eps, inv_loss_scale,
                         clip_value, coef, seed_w, seed_m, seed_v,
                         STOCHASTIC: tl.constexpr, STATE_STOCHASTIC: tl.constexpr, COUNT: tl.constexpr,
                         DOT_IN_FP32: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr,
                         BLOCK_T: tl.constexpr):
    m0, n0, r, c, row_ok, col_ok = _tile_coords(out_features, in_features, BLOCK_OUT, BLOCK_IN)
    acc = _gemm_tile(x_ptr, dy_ptr, tokens, m0, n0, r, c, row_ok, col_ok,
                     stride_x_tok, stride_x_in, stride_dy_tok, stride_dy_out,
                     DOT_IN_FP32, DOT_PRECISION, BLOCK_OUT, BLOCK_IN, BLOCK_T)
    # epilogue: W, m, v are contiguous [out, in]
    in_u32 = tl.cast(in_features, tl.uint32)
    flat_index = (m0.to(tl.uint32) * in_u32 + n0.to(tl.uint32)) + (r[:, None].to(tl.uint32) * in_u32
                                                                   + c[None, :].to(tl.uint32))
    base = m0.to(tl.int64) * in_features + n0.to(tl.int64)
    offs = r[:, None] * in_features + c[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    g = acc * inv_loss_scale
    # comparisons, not min/max, so a NaN passes through as torch.clamp lets it
    g = tl.where(g > clip_value, clip_value, tl.where(g < -clip_value, -clip_value, g))
    g = g * coef
    m = _widen(tl.load(m_ptr + base + offs, mask=mask, other=0.0))
    v = _widen(tl.load(v_ptr + base + offs, mask=mask, other=0.0))
    w = _widen(tl.load(w_ptr + base + offs, mask=mask, other=0.0))
    # torch's CPU kernels' rounding (reference_adamw): lerp and addcmul as one fused multiply-add each,
    # addcdiv as (value*m)/denom added to w
    # (lerp_weight = 1 - β1 and 1 - β2 are rounded to fp32 on the host, as torch rounds its scalars)
    diff = g - m
    m = tl.where(lerp_weight < 0.5, tl.fma(lerp_weight, diff, m), tl.fma(lerp_weight - 1.0, diff, g))
    v = tl.fma(one_minus_beta2 * g, g, v * beta2)
    denom = tl.sqrt_rn(v)
    if denom_div != 1.0:
        denom = denom / denom_div
    denom = denom + eps
    w = w * decay + (-step * m) / denom
    w_out = _rounded(w, flat_index, seed_w, w_ptr.dtype.element_ty, STOCHASTIC)
    m_out = _rounded(m, flat_index, seed_m, m_ptr.dtype.element_ty, STATE_STOCHASTIC)
    v_out = _rounded(v, flat_index, seed_v, v_ptr.dtype.element_ty, STATE_STOCHASTIC)
    # the non-finite guard: an element whose new w, m or v is not finite keeps all three old values
    ok = _is_finite(_widen(w_out)) & _is_finite(_widen(m_out)) & _is_finite(_widen(v_out))
    tl.store(w_ptr + base + offs, w_out, mask=mask & ok)
    tl.store(m_ptr + base + offs, m_out, mask=mask & ok)
    tl.store(v_ptr + base + offs, v_out, mask=mask & ok)
    if COUNT:
        tl.atomic_add(count_ptr, tl.sum(tl.where(mask & ~ok, 1, 0).to(tl.int64)))


def adamw_linear_update(w, m, v, x, dy, rule, nonfinite=None) -> None:
    _check_device(x)
    tokens, in_features = x.shape
    out_features = dy.shape[1]
    if in_features == 0 or out_features == 0:
        return
    dot_in_fp32 = INTERPRETED and x.dtype == torch.bfloat16
    fp32_operands = dot_in_fp32 or x.dtype == torch.float32
    cfg = _gemm_config(x.dtype)
    grid = (triton.cdiv(out_features, cfg["BLOCK_OUT"]), triton.cdiv(in_features, cfg["BLOCK_IN"]))
    with device_guard(w.device):  # the launch runs on the tensors' device and its current stream
        _adamw_linear_kernel[grid](
            w, m, v, x, dy, w if nonfinite is None else nonfinite, tokens, out_features, in_features,
            x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
            rule.decay, rule.step, 1.0 - rule.beta1, rule.beta2, 1.0 - rule.beta2, rule.denom_div, rule.eps,
            rule.inv_loss_scale, rule.clip_value, rule.coef,
            mix32_int(rule.seed), mix32_int(rule.seed_m), mix32_int(rule.seed_v),
            STOCHASTIC=rule.stochastic and w.dtype != torch.float32,
            STATE_STOCHASTIC=rule.state_stochastic and m.dtype != torch.float32, COUNT=nonfinite is not None,
            DOT_IN_FP32=dot_in_fp32, DOT_PRECISION="ieee" if fp32_operands else "tf32", **cfg, **_NO_FMA)


adamw_embedding_update = reference_adamw.adamw_embedding_update
adamw_dense_update = reference_adamw.adamw_dense_update
