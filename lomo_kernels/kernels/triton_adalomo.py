"""AdaLomo's three per-layer passes as Triton kernels: GEMM tiles of ``G = dyᵀx`` on tensor cores.

Same functions and semantics as the ``cpu`` backend's (``lomo_kernels.kernels.native``) and the torch
reference's (``lomo_kernels.kernels.reference.adalomo_*``), with ``u = clamp(G · inv_loss_scale, ±clip_value)``:

    adalomo_sq_sums(row_sums, col_sums, stats, x, dy, inv_loss_scale, clip_value)
        row_sums += Σ_j u², col_sums += Σ_i u², stats += [‖G · inv_loss_scale‖², non-finite count]
    adalomo_scaled_sqnorm(stats, x, dy, row_scale, col_scale, inv_loss_scale, clip_value)
        stats += [Σ (u_ij · r_i · c_j)², non-finite count]
    adalomo_linear_update(w, x, dy, row_scale, col_scale, rule)
        W <- rule.decay · W - rule.step · (u_ij · r_i) · c_j, rounded into W's dtype

Each program owns one [BLOCK_OUT, BLOCK_IN] tile of ``G`` and accumulates it over the tokens with
``tl.dot`` from the activations' own dtype (bf16/fp16 operands: tensor cores, fp32 accumulation; fp32
operands: full-precision "ieee" dot), so no fp32 copy of the (scaled) activations is made; the loss scale,
value clipping and the row/column scales are applied in the epilogue, in the reference's order
(``((G · inv_loss_scale) clamped · r_i) · c_j``). The update epilogue is ``triton_update._finish_tile``
itself (decay, the fp32 update, nearest or counter-based stochastic rounding), so given the same ``G`` the
new weights are bit-identical to the reference's.

No float atomics: the sums are run-to-run deterministic. Every tile writes its partial sums (its row
sums, its column sums, its ``[sum, count]``) to a buffer of its own slots, then ``triton_update._reduce_kernel`` adds
the partials in a fixed order (chunks of partials in index order, a fixed-shape tree within a chunk) onto
the outputs. The buffers are vector-sized, not weight-sized: ``(in / BLOCK_IN) · out + (out / BLOCK_OUT)
· in`` floats for the sums (12 MiB for a 32000×4096 weight with 128×64 tiles, against its 250 MiB in
bf16) and two floats per tile for the norms.

The ``dyᵀx`` tile loop is ``triton_update._gemm_tile`` (shared with the plain fused linear kernel), and
every launch runs under ``device_guard`` (the tensors' device and its current stream).

Under ``TRITON_INTERPRET=1`` (CPU tensors, for testing) bf16 operands are widened to fp32 before
``tl.dot`` (the interpreter's bf16 dot is wrong; the fp32 products of bf16 values are exact), as in
``triton_update``.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..ops._common import UpdateRule
from ._triton_device import device_guard
from .triton_update import (INTERPRETED, _NO_FMA, _check_device, _finish_tile, _gemm_launch, _gemm_tile,
                            _is_finite, _reduce_into, _rule_args, _tile_coords)

__all__ = ["adalomo_sq_sums", "adalomo_scaled_sqnorm", "adalomo_linear_update", "INTERPRETED"]


# --- device functions -----------------------------------------------------------------------------

@triton.jit
def _clamp(u, clip_value):
    # Comparisons, not min/max, so a NaN passes through, as torch.clamp (and _finish_tile) do.
    return tl.where(u > clip_value, clip_value, tl.where(u < -clip_value, -clip_value, u))


# --- kernels --------------------------------------------------------------------------------------

@triton.jit
def _sq_sums_kernel(x_ptr, dy_ptr, row_part_ptr, col_part_ptr, stats_part_ptr, tokens, out_features, in_features,
                    stride_x_tok, stride_x_in, stride_dy_tok, stride_dy_out, inv_loss_scale, clip_value,
                    DOT_IN_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr, BLOCK_T: tl.constexpr):
    """Tile (i, j) writes its row sums of u² to ``row_part[j, rows]``, its column sums to ``col_part[i, cols]``
    and ``[Σ (G·inv_loss_scale)², non-finite count]`` (before clipping) to ``stats_part[tile]``."""
    m0, n0, r, c, row_ok, col_ok = _tile_coords(out_features, in_features, BLOCK_OUT, BLOCK_IN)
    acc = _gemm_tile(x_ptr, dy_ptr, tokens, m0, n0, r, c, row_ok, col_ok,
                     stride_x_tok, stride_x_in, stride_dy_tok, stride_dy_out,
                     DOT_IN_FP32, DOT_PRECISION, BLOCK_OUT, BLOCK_IN, BLOCK_T)
    # Off-tile entries are 0 unless a non-finite activation made them 0·inf: zero them explicitly.
    u = tl.where(row_ok[:, None] & col_ok[None, :], acc * inv_loss_scale, 0.0)
    tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    tl.store(stats_part_ptr + 2 * tile, tl.sum(tl.sum(u * u, axis=1), axis=0))
    tl.store(stats_part_ptr + 2 * tile + 1, tl.sum(tl.sum(tl.where(_is_finite(u), 0.0, 1.0), axis=1), axis=0))
    u = _clamp(u, clip_value)
    sq = u * u
    tl.store(row_part_ptr + tl.program_id(1).to(tl.int64) * out_features + m0 + r, tl.sum(sq, axis=1), mask=row_ok)
    tl.store(col_part_ptr + tl.program_id(0).to(tl.int64) * in_features + n0 + c, tl.sum(sq, axis=0), mask=col_ok)


@triton.jit
def _scaled_sqnorm_kernel(x_ptr, dy_ptr, row_scale_ptr, col_scale_ptr, stats_part_ptr, tokens, out_features,
                          in_features, stride_x_tok, stride_x_in, stride_dy_tok, stride_dy_out,
                          inv_loss_scale, clip_value,
                          DOT_IN_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr, BLOCK_T: tl.constexpr):
    """Tile (i, j) writes ``[Σ v², non-finite count of v]``, ``v = (u · r) · c``, to ``stats_part[tile]``."""
    m0, n0, r, c, row_ok, col_ok = _tile_coords(out_features, in_features, BLOCK_OUT, BLOCK_IN)
    acc = _gemm_tile(x_ptr, dy_ptr, tokens, m0, n0, r, c, row_ok, col_ok,
                     stride_x_tok, stride_x_in, stride_dy_tok, stride_dy_out,
                     DOT_IN_FP32, DOT_PRECISION, BLOCK_OUT, BLOCK_IN, BLOCK_T)
    rs = tl.load(row_scale_ptr + m0 + r, mask=row_ok, other=0.0)
    cs = tl.load(col_scale_ptr + n0 + c, mask=col_ok, other=0.0)
    v = _clamp(acc * inv_loss_scale, clip_value) * rs[:, None] * cs[None, :]
    v = tl.where(row_ok[:, None] & col_ok[None, :], v, 0.0)
    tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    tl.store(stats_part_ptr + 2 * tile, tl.sum(tl.sum(v * v, axis=1), axis=0))
    tl.store(stats_part_ptr + 2 * tile + 1, tl.sum(tl.sum(tl.where(_is_finite(v), 0.0, 1.0), axis=1), axis=0))


@triton.jit(do_not_specialize=["seed_mix"])
def _update_kernel(w_ptr, x_ptr, dy_ptr, row_scale_ptr, col_scale_ptr, count_ptr, tokens, out_features, in_features,
                   stride_w_out, stride_w_in, stride_x_tok, stride_x_in, stride_dy_tok, stride_dy_out,
                   decay, step, inv_loss_scale, clip_value, no_clip, seed_mix,
                   STOCHASTIC: tl.constexpr, COUNT: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr, BLOCK_T: tl.constexpr):
    """W's tile updated from ``v = (u · r) · c`` by ``triton_update._finish_tile`` (loss scale 1, no clip:
    both were applied to ``u``), exactly as the reference's ``apply_rule_`` on ``v``."""
    m0, n0, r, c, row_ok, col_ok = _tile_coords(out_features, in_features, BLOCK_OUT, BLOCK_IN)
    acc = _gemm_tile(x_ptr, dy_ptr, tokens, m0, n0, r, c, row_ok, col_ok,
                     stride_x_tok, stride_x_in, stride_dy_tok, stride_dy_out,
                     DOT_IN_FP32, DOT_PRECISION, BLOCK_OUT, BLOCK_IN, BLOCK_T)
    rs = tl.load(row_scale_ptr + m0 + r, mask=row_ok, other=0.0)
    cs = tl.load(col_scale_ptr + n0 + c, mask=col_ok, other=0.0)
    v = _clamp(acc * inv_loss_scale, clip_value) * rs[:, None] * cs[None, :]
    w_tile = w_ptr + (m0.to(tl.int64) * stride_w_out + n0.to(tl.int64) * stride_w_in)
    # tl.cast, not .to: an integer argument equal to 1 arrives as a constexpr (Triton's specialization)
    in_u32 = tl.cast(in_features, tl.uint32)
    flat_base = m0.to(tl.uint32) * in_u32 + n0.to(tl.uint32)
    flat_index = flat_base + (r[:, None].to(tl.uint32) * in_u32 + c[None, :].to(tl.uint32))
    _finish_tile(v, w_tile + (r[:, None] * stride_w_out + c[None, :] * stride_w_in),
                 flat_index, row_ok[:, None] & col_ok[None, :], w_ptr,
                 decay, step, 1.0, no_clip, seed_mix, False, STOCHASTIC, count_ptr, COUNT)


# --- launches -------------------------------------------------------------------------------------

def _strides(x: torch.Tensor, dy: torch.Tensor) -> tuple:
    return x.stride(0), x.stride(1), dy.stride(0), dy.stride(1)


def adalomo_sq_sums(row_sums: torch.Tensor, col_sums: torch.Tensor, stats: torch.Tensor, x: torch.Tensor,
                    dy: torch.Tensor, inv_loss_scale: float, clip_value: float) -> None:
    """``row_sums += Σ_j u²``, ``col_sums += Σ_i u²``, ``stats += [‖G·inv_loss_scale‖², non-finite count]``."""
    _check_device(x)
    tokens, in_features = x.shape
    out_features = dy.shape[1]
    if in_features == 0 or out_features == 0:
        return
    grid, kw = _gemm_launch(x, out_features)
    dev = x.device
    row_part = torch.empty(grid[1], out_features, dtype=torch.float32, device=dev)
    col_part = torch.empty(grid[0], in_features, dtype=torch.float32, device=dev)
    stats_part = torch.empty(grid[0] * grid[1], 2, dtype=torch.float32, device=dev)
    with device_guard(dev):
        _sq_sums_kernel[grid](x, dy, row_part, col_part, stats_part, tokens, out_features, in_features,
                              *_strides(x, dy), inv_loss_scale, clip_value, **kw, **_NO_FMA)
        _reduce_into(row_sums, row_part)
        _reduce_into(col_sums, col_part)
        _reduce_into(stats, stats_part)


def adalomo_scaled_sqnorm(stats: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, row_scale: torch.Tensor,
                          col_scale: torch.Tensor, inv_loss_scale: float, clip_value: float) -> None:
    """``stats += [Σ (u_ij · r_i · c_j)², non-finite count]``."""
    _check_device(x)
    tokens, in_features = x.shape
    out_features = dy.shape[1]
    if in_features == 0 or out_features == 0:
        return
    grid, kw = _gemm_launch(x, out_features)
    stats_part = torch.empty(grid[0] * grid[1], 2, dtype=torch.float32, device=x.device)
    with device_guard(x.device):
        _scaled_sqnorm_kernel[grid](x, dy, row_scale, col_scale, stats_part, tokens, out_features, in_features,
                                    *_strides(x, dy), inv_loss_scale, clip_value, **kw, **_NO_FMA)
        _reduce_into(stats, stats_part)


def adalomo_linear_update(w: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, row_scale: torch.Tensor,
                          col_scale: torch.Tensor, rule: UpdateRule, nonfinite: torch.Tensor | None = None) -> None:
    """``W <- rule.decay·W - rule.step · (clamp(G·inv_loss_scale, ±clip_value) · r_i) · c_j``, rounded by the rule;
    an element whose new value is not finite keeps its old bits (``_finish_tile``'s guard), counted into
    ``nonfinite`` (int64, shape (1,)) when given (one integer atomic per program: deterministic)."""
    _check_device(x)
    tokens, in_features = x.shape
    out_features = dy.shape[1]
    if in_features == 0 or out_features == 0:
        return
    grid, kw = _gemm_launch(x, out_features)
    decay, step, inv_loss_scale, clip_value, seed_mix = _rule_args(rule)
    with device_guard(x.device):
        _update_kernel[grid](w, x, dy, row_scale, col_scale, w if nonfinite is None else nonfinite, tokens,
                             out_features, in_features, w.stride(0), w.stride(1), *_strides(x, dy),
                             decay, step, inv_loss_scale, clip_value, math.inf, seed_mix,
                             STOCHASTIC=rule.stochastic and w.dtype != torch.float32, COUNT=nonfinite is not None,
                             **kw, **_NO_FMA)
