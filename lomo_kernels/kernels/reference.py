"""The ``torch`` backend: the reference semantics of every fused op, in plain torch, on any device.

Every backend module (this one, ``native`` for the compiled C++/CUDA kernels, ``triton_update``)
exposes the same six functions. They receive inputs already checked and flattened by ``lomo_kernels.ops``:
``w`` contiguous (weight, any of fp32/bf16/fp16), ``x``/``dy`` contiguous 2-D of one float dtype,
``idx`` contiguous 1-D int64, ``stats`` a float32 tensor of shape (2,).

    linear_update(w[out,in], x[T,in], dy[T,out], rule)                       W <- rule(W, dyᵀx)
    linear_grad_sqnorm(stats, x[T,in], dy[T,out], inv_loss_scale)              stats += norm terms of dyᵀx
    embedding_update(w[V,D], idx[T], dy[T,D], padding_idx, rule)              rows in idx only (+ decay of all rows)
    embedding_grad_sqnorm(stats, idx[T], dy[T,D], padding_idx, inv_loss_scale)
    dense_update(p[N], g[N], rule)
    dense_grad_sqnorm(stats, g[N], inv_loss_scale)

The gradient of a weight matrix is never built whole: it is computed in row blocks of at most
``CHUNK_ELEMENTS`` entries, each applied and dropped before the next.

Deterministic: every function gives the same bits on every run for the same inputs on the same device
(and CPU thread count). The block GEMMs run in full fp32 whatever the user's TF32 setting
(``ieee_fp32_matmul``); duplicate embedding rows are summed in token order (off CPU by a sort + segment
reduction, never by a GPU ``index_add_``'s float atomics).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..ops._common import UpdateRule, accumulate_sqnorm_, apply_rule_, ieee_fp32_matmul

CHUNK_ELEMENTS = 1 << 18  # 1 MiB of fp32: large enough that the block GEMMs run at BLAS speed


def _rows_per_chunk(cols: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(cols, 1))


@ieee_fp32_matmul()
def linear_update(w: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, rule: UpdateRule,
                  nonfinite: torch.Tensor | None = None) -> None:
    out_f, in_f = w.shape
    if (nonfinite is None and w.dtype == x.dtype == torch.float32 and not rule.stochastic
            and not math.isfinite(rule.clip_value) and x.shape[0] > 0):
        # Plain SGD on fp32 is one GEMM accumulating into W: BLAS applies beta/alpha in place. No
        # non-finite guard: taken only without a counter (see _common).
        w.addmm_(dy.t(), x, beta=rule.decay, alpha=-rule.step * rule.inv_loss_scale)
        return
    x32, dy32 = x.to(torch.float32), dy.to(torch.float32)
    rows = _rows_per_chunk(in_f)
    for r0 in range(0, out_f, rows):
        r1 = min(r0 + rows, out_f)
        g = dy32[:, r0:r1].t() @ x32
        apply_rule_(w[r0:r1], g, rule, flat_offset=r0 * in_f, nonfinite=nonfinite)


@ieee_fp32_matmul()
def linear_grad_sqnorm(stats: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, inv_loss_scale: float) -> None:
    out_f, in_f = dy.shape[1], x.shape[1]
    x32, dy32 = x.to(torch.float32), dy.to(torch.float32)
    rows = _rows_per_chunk(in_f)
    for r0 in range(0, out_f, rows):
        accumulate_sqnorm_(stats, dy32[:, r0:r0 + rows].t() @ x32, inv_loss_scale)


@ieee_fp32_matmul()
def linear_grad_sqnorm_ghost(stats: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, inv_loss_scale: float) -> None:
    """``‖dyᵀx‖² = ⟨x xᵀ, dy dyᵀ⟩`` in blocks of token rows; no weight-sized tensor.

    A non-finite entry shows up as a non-finite sum, counted once in ``stats[1]`` (not per element).
    Shared by all backends: it is two GEMMs and a dot product, which the vendor BLAS does best.
    """
    tokens = x.shape[0]
    x32 = x.to(torch.float32)
    dy32 = dy.to(torch.float32) * inv_loss_scale
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    rows = _rows_per_chunk(tokens)
    for t0 in range(0, tokens, rows):
        total += ((x32[t0:t0 + rows] @ x32.t()) * (dy32[t0:t0 + rows] @ dy32.t())).sum()
    stats[0] += total
    stats[1] += (~torch.isfinite(total)).to(torch.float32)


def _row_gradients(idx: torch.Tensor, dy: torch.Tensor, padding_idx: int):
    """``(rows, g)``: the distinct rows ``idx`` touches (padding excluded), ascending, and their fp32
    gradients, each the sum of its tokens' ``dy`` rows in token order, starting from 0: the same bits on
    every run and device, and the order of the cpu/cuda backends' kernels.

    On CPU ``index_add_`` gives exactly that (it adds the source rows one index after another) and is the
    fastest way here; on a GPU it would add duplicates with float atomics, in whatever order they land, so
    every other device takes ``_sorted_segment_sums``."""
    if padding_idx >= 0:
        keep = idx != padding_idx
        idx, dy = idx[keep], dy[keep]
    if idx.device.type != "cpu":
        return _sorted_segment_sums(idx, dy)
    rows, inverse = torch.unique(idx, return_inverse=True)
    g = torch.zeros(rows.numel(), dy.shape[1], dtype=torch.float32, device=dy.device)
    return rows, g.index_add_(0, inverse, dy.to(torch.float32))


def _sorted_segment_sums(idx: torch.Tensor, dy: torch.Tensor):
    """``_row_gradients`` without atomics: a stable sort groups each row's tokens in token order, then
    ``segment_reduce`` sums every group sequentially (on a GPU one thread per group and column, from 0)."""
    sorted_idx, order = torch.sort(idx, stable=True)
    rows, counts = torch.unique_consecutive(sorted_idx, return_counts=True)
    # unsafe: the lengths come from unique_consecutive, so they are valid; checking them would sync again
    g = torch.segment_reduce(dy[order].to(torch.float32), "sum", lengths=counts, axis=0, unsafe=True)
    return rows, g


def embedding_update(w: torch.Tensor, idx: torch.Tensor, dy: torch.Tensor, padding_idx: int, rule: UpdateRule,
                     nonfinite: torch.Tensor | None = None) -> None:
    vocab, dim = w.shape
    rows, g = _row_gradients(idx, dy, padding_idx)
    cols = torch.arange(dim, device=w.device, dtype=torch.int64)
    w_rows = w[rows]
    apply_rule_(w_rows, g, rule, flat_offset=rows[:, None] * dim + cols, nonfinite=nonfinite)
    if rule.decay != 1.0:
        # Weight decay acts on every row, touched or not (as torch.optim.SGD with a dense gradient);
        # the touched rows are rewritten with their own update afterwards.
        for r0 in range(0, vocab, _rows_per_chunk(dim)):
            block = w[r0:r0 + _rows_per_chunk(dim)]
            apply_rule_(block, torch.zeros(block.shape, dtype=torch.float32, device=w.device), rule,
                        flat_offset=r0 * dim, nonfinite=nonfinite)
        if nonfinite is not None:
            # the touched rows' decay-only results were counted above but are not kept: uncount them
            # (with a zero gradient a result is non-finite exactly when the guarded old value is)
            nonfinite -= (~torch.isfinite(w[rows])).sum()
    w[rows] = w_rows


def embedding_grad_sqnorm(stats: torch.Tensor, idx: torch.Tensor, dy: torch.Tensor, padding_idx: int,
                          inv_loss_scale: float) -> None:
    _, g = _row_gradients(idx, dy, padding_idx)
    accumulate_sqnorm_(stats, g, inv_loss_scale)


def dense_update(p: torch.Tensor, g: torch.Tensor, rule: UpdateRule, nonfinite: torch.Tensor | None = None) -> None:
    apply_rule_(p, g, rule, flat_offset=0, nonfinite=nonfinite)


def dense_grad_sqnorm(stats: torch.Tensor, g: torch.Tensor, inv_loss_scale: float) -> None:
    accumulate_sqnorm_(stats, g, inv_loss_scale)


# --- AdaLomo statistics (torch only: every device dispatches here, see lomo_kernels.ops.adalomo_stats) ----

def _clipped_gradient_blocks(x: torch.Tensor, dy: torch.Tensor, inv_loss_scale: float, clip_value: float,
                             stats: torch.Tensor | None = None):
    """Yield ``(r0, r1, clamp(G[r0:r1] * inv_loss_scale, ±clip_value))`` in row blocks of ``G = dyᵀx``;
    with ``stats``, first add the norm pass's terms of ``G * inv_loss_scale`` (before clipping) to it."""
    x32, dy32 = x.to(torch.float32), dy.to(torch.float32)
    out_f, in_f = dy.shape[1], x.shape[1]
    rows = _rows_per_chunk(in_f)
    for r0 in range(0, out_f, rows):
        r1 = min(r0 + rows, out_f)
        g = (dy32[:, r0:r1].t() @ x32) * inv_loss_scale
        if stats is not None:
            accumulate_sqnorm_(stats, g, 1.0)
        if math.isfinite(clip_value):
            g = g.clamp(-clip_value, clip_value)
        yield r0, r1, g


@ieee_fp32_matmul()
def adalomo_sq_sums(row_sums: torch.Tensor, col_sums: torch.Tensor, x: torch.Tensor, dy: torch.Tensor,
                    inv_loss_scale: float, clip_value: float, stats: torch.Tensor | None = None) -> None:
    """``row_sums += Σ_j u_ij²``, ``col_sums += Σ_i u_ij²`` with ``u = clamp(dyᵀx · inv_loss_scale, ±clip_value)``;
    with ``stats``, also the norm pass's terms of ``dyᵀx · inv_loss_scale`` (unclipped) from the same blocks."""
    for r0, r1, g in _clipped_gradient_blocks(x, dy, inv_loss_scale, clip_value, stats):
        sq = g * g
        row_sums[r0:r1] += sq.sum(1)
        col_sums += sq.sum(0)


@ieee_fp32_matmul()
def adalomo_sq_sums_ghost(row_sums: torch.Tensor, col_sums: torch.Tensor, x: torch.Tensor, dy: torch.Tensor,
                          inv_loss_scale: float) -> None:
    """The same sums without value clipping, from token-by-token Gram matrices:
    ``Σ_j G_ij² = (dyᵀ (x xᵀ) dy)_ii`` and ``Σ_i G_ij² = (xᵀ (dy dyᵀ) x)_jj``, in blocks of token rows:
    no weight-sized tensor and no second activation-sized one."""
    tokens = x.shape[0]
    x32 = x.to(torch.float32)
    dy32 = dy.to(torch.float32) * inv_loss_scale
    rows = _rows_per_chunk(max(tokens, x.shape[1], dy.shape[1]))
    for t0 in range(0, tokens, rows):
        t1 = min(t0 + rows, tokens)
        row_sums += (dy32[t0:t1] * ((x32[t0:t1] @ x32.t()) @ dy32)).sum(0)
        col_sums += (x32[t0:t1] * ((dy32[t0:t1] @ dy32.t()) @ x32)).sum(0)


@ieee_fp32_matmul()
def adalomo_scaled_sqnorm(stats: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, row_scale: torch.Tensor,
                          col_scale: torch.Tensor, inv_loss_scale: float, clip_value: float) -> None:
    """``stats += [Σ (row_scale_i · u_ij · col_scale_j)², non-finite count]``, u as in ``adalomo_sq_sums``."""
    for r0, r1, g in _clipped_gradient_blocks(x, dy, inv_loss_scale, clip_value):
        accumulate_sqnorm_(stats, g * row_scale[r0:r1, None] * col_scale, 1.0)


@ieee_fp32_matmul()
def adalomo_linear_update(w: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, row_scale: torch.Tensor,
                          col_scale: torch.Tensor, rule: UpdateRule, nonfinite: torch.Tensor | None = None) -> None:
    """``W <- rule.decay·W - rule.step · row_scale_i · clamp(G_ij · inv_loss_scale, ±clip_value) · col_scale_j``."""
    scaled_rule = dataclasses.replace(rule, inv_loss_scale=1.0, clip_value=math.inf)
    in_f = w.shape[1]
    for r0, r1, g in _clipped_gradient_blocks(x, dy, rule.inv_loss_scale, rule.clip_value):
        apply_rule_(w[r0:r1], g * row_scale[r0:r1, None] * col_scale, scaled_rule, flat_offset=r0 * in_f,
                    nonfinite=nonfinite)
