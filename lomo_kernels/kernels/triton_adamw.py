"""The ``triton`` backend's fused AdamW linear update (``lomo_kernels.ops.adamw_update``).

One kernel per call: each program owns a [BLOCK_OUT, BLOCK_IN] tile of W, accumulates that tile of
``G = dyᵀx`` in fp32 registers over the tokens (the GEMM loop of ``triton_update._linear_kernel``), then
in its epilogue loads the matching tiles of ``m``, ``v`` and ``W``, applies the AdamW rule and stores all
three: the gradient never leaves the registers. Rounding of bf16/fp16 weights and of bf16 state uses the
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
from .triton_update import INTERPRETED, _NO_FMA, _check_device, _gemm_config, _round_nearest, _round_stochastic, _widen


@triton.jit
def _store_rounded(ptrs, value, flat_index, seed_mix, mask, STOCHASTIC: tl.constexpr):
    if ptrs.dtype.element_ty == tl.float32:
        tl.store(ptrs, value, mask=mask)
    elif STOCHASTIC:
        tl.store(ptrs, _round_stochastic(value, flat_index, seed_mix, ptrs.dtype.element_ty), mask=mask)
    else:
        tl.store(ptrs, _round_nearest(value, ptrs.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed_w", "seed_m", "seed_v"])
def _adamw_linear_kernel(w_ptr, m_ptr, v_ptr, x_ptr, dy_ptr, tokens, out_features, in_features,
                         stride_x_tok, stride_x_in, stride_dy_tok, stride_dy_out,
                         decay, step, beta1, beta2, denom_div, eps, inv_loss_scale, clip_value, coef,
                         seed_w, seed_m, seed_v,
                         STOCHASTIC: tl.constexpr, STATE_STOCHASTIC: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr,
                         BLOCK_T: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_OUT
    n0 = tl.program_id(1) * BLOCK_IN
    r = tl.arange(0, BLOCK_OUT)
    c = tl.arange(0, BLOCK_IN)
    row_ok = r < out_features - m0
    col_ok = c < in_features - n0
    dy_tile = dy_ptr + m0.to(tl.int64) * stride_dy_out + r[None, :] * stride_dy_out
    x_tile = x_ptr + n0.to(tl.int64) * stride_x_in + c[None, :] * stride_x_in
    acc = tl.zeros((BLOCK_OUT, BLOCK_IN), dtype=tl.float32)
    for t0 in range(0, tokens, BLOCK_T):
        tok = tl.arange(0, BLOCK_T)
        tok_ok = tok < tokens - t0
        t_off = tl.cast(t0, tl.int64)
        dy = tl.load(dy_tile + t_off * stride_dy_tok + tok[:, None] * stride_dy_tok,
                     mask=tok_ok[:, None] & row_ok[None, :], other=0.0)
        x = tl.load(x_tile + t_off * stride_x_tok + tok[:, None] * stride_x_tok,
                    mask=tok_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_IN_FP32:
            dy = _widen(dy)
            x = _widen(x)
        acc = tl.dot(tl.trans(dy), x, acc, input_precision=DOT_PRECISION)
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
    weight = 1.0 - beta1
    # torch.lerp's two formulas
    m = tl.where(weight < 0.5, m + weight * (g - m), g - (g - m) * (1.0 - weight))
    v = v * beta2 + (1.0 - beta2) * g * g
    denom = tl.sqrt_rn(v) / denom_div + eps
    w = w * decay - step * (m / denom)
    _store_rounded(w_ptr + base + offs, w, flat_index, seed_w, mask, STOCHASTIC)
    _store_rounded(m_ptr + base + offs, m, flat_index, seed_m, mask, STATE_STOCHASTIC)
    _store_rounded(v_ptr + base + offs, v, flat_index, seed_v, mask, STATE_STOCHASTIC)


def adamw_linear_update(w, m, v, x, dy, rule) -> None:
    _check_device(x)
    tokens, in_features = x.shape
    out_features = dy.shape[1]
    if in_features == 0 or out_features == 0:
        return
    dot_in_fp32 = INTERPRETED and x.dtype == torch.bfloat16
    fp32_operands = dot_in_fp32 or x.dtype == torch.float32
    cfg = _gemm_config(x.dtype)
    grid = (triton.cdiv(out_features, cfg["BLOCK_OUT"]), triton.cdiv(in_features, cfg["BLOCK_IN"]))
    _adamw_linear_kernel[grid](
        w, m, v, x, dy, tokens, out_features, in_features, x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
        rule.decay, rule.step, rule.beta1, rule.beta2, rule.denom_div, rule.eps, rule.inv_loss_scale,
        rule.clip_value, rule.coef, mix32_int(rule.seed), mix32_int(rule.seed_m), mix32_int(rule.seed_v),
        STOCHASTIC=rule.stochastic and w.dtype != torch.float32,
        STATE_STOCHASTIC=rule.state_stochastic and m.dtype != torch.float32, DOT_IN_FP32=dot_in_fp32,
        DOT_PRECISION="ieee" if fp32_operands else "tf32", **cfg, **_NO_FMA)


adamw_embedding_update = reference_adamw.adamw_embedding_update
adamw_dense_update = reference_adamw.adamw_dense_update
