"""The ``torch`` reference of the fused AdamW ops (``lomo_kernels.ops.adamw_update``), any device.

Inputs arrive checked and flattened: ``w`` contiguous (fp32/bf16/fp16), ``m``/``v`` contiguous of
``w``'s shape (fp32 or bf16), ``x``/``dy`` contiguous 2-D of one float dtype, ``g`` of ``w``'s shape.

    adamw_linear_update(w[out,in], m, v, x[T,in], dy[T,out], rule, nonfinite)   G = dyᵀx in row blocks
    adamw_embedding_update(w[V,D], m, v, idx[T], dy[T,D], padding_idx, rule, nonfinite)
    adamw_dense_update(p[N], m[N], v[N], g[N], rule, nonfinite)

A linear layer's gradient is computed in row blocks of at most ``CHUNK_ELEMENTS`` fp32 entries; each
block updates the matching rows of ``m``, ``v`` and ``W`` and is dropped before the next, so no
weight-sized temporary exists. Per element (``AdamRule`` in ``lomo_kernels.ops.adamw_update``):

    g = coef · clamp(g_raw · inv_loss_scale, ±clip_value)
    m = lerp(m, g, 1 - beta1)                   v = beta2·v + (1 - beta2)·g²
    w = decay·w - step · m / (√v / denom_div + eps)

then ``w``, ``m``, ``v`` are rounded into their dtypes (stochastic rounding with three seeds derived
from the rule's seed, ``lomo_kernels.ops._common``'s counter-based scheme). An element whose rounded
new ``w``, ``m`` or ``v`` is not finite keeps all three old values and is counted into the optional
``nonfinite`` counter (int64, shape (1,)): the guard of ``lomo_kernels.ops._common``, extended to the
moments so one bad gradient entry cannot poison an element's state for every later step.
"""
from __future__ import annotations

import math

import torch

from ..ops._common import round_stochastic
from .reference import CHUNK_ELEMENTS, _row_gradients, _rows_per_chunk


def _rounded(value: torch.Tensor, dtype: torch.dtype, stochastic: bool, seed: int, flat_offset) -> torch.Tensor:
    """fp32 ``value`` rounded into ``dtype`` (fp32: itself; bf16/fp16: nearest or counter-based stochastic)."""
    if dtype == torch.float32:
        return value
    if not stochastic:
        return value.to(dtype)
    if isinstance(flat_offset, torch.Tensor):
        idx = flat_offset.reshape(value.shape).to(torch.int64)
    else:
        idx = torch.arange(flat_offset, flat_offset + value.numel(), device=value.device,
                           dtype=torch.int64).view(value.shape)
    return round_stochastic(value, dtype, idx, seed)


def transform_gradient_(g: torch.Tensor, rule) -> torch.Tensor:
    """``coef · clamp(g · inv_loss_scale, ±clip_value)`` in place on an fp32 ``g``."""
    if rule.inv_loss_scale != 1.0:
        g.mul_(rule.inv_loss_scale)
    if math.isfinite(rule.clip_value):
        g.clamp_(-rule.clip_value, rule.clip_value)
    if rule.coef != 1.0:
        g.mul_(rule.coef)
    return g


def adam_block_(w: torch.Tensor, m: torch.Tensor, v: torch.Tensor, g: torch.Tensor, rule, flat_offset=0,
                nonfinite: torch.Tensor | None = None, counted: torch.Tensor | None = None) -> None:
    """One block of the AdamW step; ``g`` is the block's transformed fp32 gradient (consumed: its buffer
    is reused for the denominator). ``w``, ``m``, ``v`` are views of one shape, updated in place.

    The non-finite guard: an element whose new ``w``, ``m`` or ``v``, rounded into its dtype, is not
    finite keeps all three old values; with ``nonfinite`` their count is added to it (only where the
    boolean mask ``counted`` is true, when given: the embedding's rows whose result is kept)."""
    m32 = m.to(torch.float32, copy=True)
    v32 = v.to(torch.float32, copy=True)
    m32.lerp_(g, 1.0 - rule.beta1)
    v32.mul_(rule.beta2).addcmul_(g, g, value=1.0 - rule.beta2)
    # torch's own sqrt, as torch.optim.AdamW's: on CPU MKL's vector sqrt (not correctly rounded for ~20% of
    # inputs; the cpu backend calls it too), on CUDA IEEE (as the cuda and triton kernels' sqrt.rn)
    denom = torch.sqrt(v32, out=g)
    if rule.denom_div != 1.0:
        denom.div_(rule.denom_div)
    denom.add_(rule.eps)
    w32 = w.to(torch.float32, copy=True).mul_(rule.decay).addcdiv_(m32, denom, value=-rule.step)
    w_out = _rounded(w32, w.dtype, rule.stochastic, rule.seed, flat_offset)
    m_out = _rounded(m32, m.dtype, rule.state_stochastic, rule.seed_m, flat_offset)
    v_out = _rounded(v32, v.dtype, rule.state_stochastic, rule.seed_v, flat_offset)
    ok = torch.isfinite(w_out) & torch.isfinite(m_out) & torch.isfinite(v_out)
    w.copy_(torch.where(ok, w_out, w))
    m.copy_(torch.where(ok, m_out, m))
    v.copy_(torch.where(ok, v_out, v))
    if nonfinite is not None:
        bad = ~ok if counted is None else ~ok & counted
        nonfinite += bad.sum()


def adamw_linear_update(w, m, v, x, dy, rule, nonfinite=None) -> None:
    out_f, in_f = w.shape
    x32, dy32 = x.to(torch.float32), dy.to(torch.float32)
    rows = _rows_per_chunk(in_f)
    for r0 in range(0, out_f, rows):
        r1 = min(r0 + rows, out_f)
        g = transform_gradient_(dy32[:, r0:r1].t() @ x32, rule)
        adam_block_(w[r0:r1], m[r0:r1], v[r0:r1], g, rule, flat_offset=r0 * in_f, nonfinite=nonfinite)


def adamw_dense_update(p, m, v, g, rule, nonfinite=None) -> None:
    n = p.numel()
    for i0 in range(0, n, CHUNK_ELEMENTS):
        i1 = min(i0 + CHUNK_ELEMENTS, n)
        block = g[i0:i1].to(torch.float32, copy=True)
        adam_block_(p[i0:i1], m[i0:i1], v[i0:i1], transform_gradient_(block, rule), rule, flat_offset=i0,
                    nonfinite=nonfinite)


def adamw_embedding_update(w, m, v, idx, dy, padding_idx, rule, nonfinite=None) -> None:
    """The dense AdamW rule on an embedding whose gradient is zero outside the rows ``idx`` touches:
    every row's ``m``, ``v`` decay and every row moves by ``m̂/(√v̂+ε)``; only token-sized and
    block-sized temporaries. Each element is counted once by the guard: the touched rows' zero-gradient
    results are overwritten, so only the other rows count in that pass."""
    vocab, dim = w.shape
    rows, g = _row_gradients(idx, dy, padding_idx)
    cols = torch.arange(dim, device=w.device, dtype=torch.int64)
    w_rows, m_rows, v_rows = w[rows], m[rows], v[rows]
    adam_block_(w_rows, m_rows, v_rows, transform_gradient_(g, rule), rule,
                flat_offset=rows[:, None] * dim + cols, nonfinite=nonfinite)
    step = _rows_per_chunk(dim)
    for r0 in range(0, vocab, step):
        r1 = min(r0 + step, vocab)
        zero = torch.zeros((r1 - r0, dim), dtype=torch.float32, device=w.device)
        untouched = None
        if nonfinite is not None:
            untouched = torch.ones((r1 - r0, 1), dtype=torch.bool, device=w.device)
            untouched[rows[(rows >= r0) & (rows < r1)] - r0] = False
        adam_block_(w[r0:r1], m[r0:r1], v[r0:r1], zero, rule, flat_offset=r0 * dim, nonfinite=nonfinite,
                    counted=untouched)
    w[rows], m[rows], v[rows] = w_rows, m_rows, v_rows
