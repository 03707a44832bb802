"""The ``triton`` backend: the fused updates as Triton kernels (the GPU path for GEMM-with-epilogue).

Same six functions and semantics as ``reference`` (see ``lomo_kernels.ops._common``):

- ``linear_update`` is one kernel per call. Each program owns a tile of W [out, in], loops over the
  tokens accumulating ``dyᵀx`` for that tile in fp32 registers, then applies the update rule to the
  tile in its epilogue: the weight gradient is never written to memory.
- ``linear_grad_sqnorm`` is the same kernel with ``NORM_ONLY``: W untouched, each tile's sum of
  squares and non-finite count written to its own slot of a per-tile buffer.
- ``embedding_*`` sum duplicate rows with torch (memory bounded by tokens x dim), then a kernel
  applies the rule to the touched rows, or to every row when weight decay is on.
- ``dense_*`` are elementwise kernels.

All update kernels share one epilogue, ``_finish_tile``; the GEMM kernels here and in ``triton_adalomo``
share one ``dyᵀx`` tile loop, ``_gemm_tile``.

Run to run deterministic: no float atomics. Norm passes write per-program partials that ``_reduce_kernel``
adds in a fixed order; duplicate embedding rows are summed in token order (``reference._row_gradients``);
the only atomic is the integer add of the optional non-finite counter, which is exact in any order. Every
launch runs under ``device_guard`` (``_triton_device``): on the tensors' device and its current stream.

Whether the kernels run on the GPU or in Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors,
for testing) is fixed when this module is imported: ``triton.jit`` decides at decoration time.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends import BackendInfo
from ..ops._common import UpdateRule, mix32_int
from ._triton_device import device_guard
from .reference import _row_gradients

INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

# Stop LLVM from contracting ``w*decay - step*u`` into an FMA: the reference rounds each product, and
# stochastic rounding must see the identical fp32 value to round identically. (The interpreter
# computes with numpy, which never contracts, and ignores this launch option.)
_NO_FMA = {"enable_fp_fusion": False}


def backend_info(name: str) -> BackendInfo:
    version = f"triton {triton.__version__}"
    if INTERPRETED:
        return BackendInfo(True, f"{version}, interpreter on CPU tensors, for testing")
    if torch.cuda.is_available():
        return BackendInfo(True, f"{version} on {torch.cuda.get_device_name()}")
    return BackendInfo(False, f"{version} imports, but there is no CUDA GPU (set TRITON_INTERPRET=1 before "
                              "importing lomo_kernels to run the Triton kernels on CPU tensors, for testing)")


# --- per-element math, shared by every kernel ---------------------------------------------------

@triton.jit
def _is_finite(v):
    return tl.abs(v) <= 3.4028234663852886e38  # FLT_MAX; false for inf and NaN


@triton.jit
def _mix32(x):
    """Wellons' lowbias32 on uint32 (products wrap mod 2**32), as ``_common.mix32``."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _widen(v):
    """``v`` (fp32/bf16/fp16) as fp32, exactly."""
    if v.dtype == tl.bfloat16:
        # bf16 is the top half of an fp32. By bits because the interpreter's bf16->fp32 cast loses subnormals.
        return (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return v.to(tl.float32)


@triton.jit
def _round_nearest(v, DTYPE: tl.constexpr):
    """fp32 ``v`` rounded to nearest-even in bf16/fp16 ``DTYPE``."""
    if DTYPE == tl.bfloat16:
        # By integer arithmetic (as c10::BFloat16): the interpreter's fp32->bf16 cast truncates (and
        # mishandles subnormals); one path for GPU and interpreter keeps the GPU rounding the tested one.
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return tl.where(v != v, 0x7FC0, bits).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(DTYPE)


@triton.jit
def _round_stochastic(v, flat_index, seed_mix, DTYPE: tl.constexpr):
    """fp32 ``v`` rounded to bf16/fp16 ``DTYPE`` exactly as ``_common.round_stochastic``.

    Written for few live registers, with the same result bit for bit: the neighbours ``lo <= |v| < hi``
    are adjacent 16-bit floats, so ``hi - lo`` is a power of two (the ulp at ``lo``) and the reference's
    exact division ``p = (|v| - lo) / (hi - lo)`` is exact, equal to ``(|v| - lo) * (1/ulp)``. For bf16,
    ``lo`` is ``|v|`` truncated to its top 16 bits, so ``p`` is its low 16 bits times 2**-16 and
    ``uniform < p`` is an integer comparison. Non-finite values, and those whose ``hi`` would be
    infinite, take the nearest rounding, as in the reference.
    """
    r = _mix32(flat_index.to(tl.uint32) ^ tl.cast(seed_mix, tl.uint32)) >> 8  # the uniform is r * 2**-24
    bits = v.to(tl.uint32, bitcast=True)
    sign = (bits >> 16) & 0x8000
    if DTYPE == tl.bfloat16:
        mag_bits = bits & 0x7FFFFFFF
        # uniform < low16 * 2**-16  <=>  r < low16 * 2**8 (both sides exact integers)
        up = (r < ((mag_bits & 0xFFFF) << 8)).to(tl.uint32)
        rounded = sign | ((mag_bits >> 16) + up)
        nearest = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        nearest = tl.where(v != v, 0x7FC0, nearest)
        # mag_bits >= 0x7F7F0000: lo is the largest finite bf16 (hi = inf), or v is inf / NaN
        out = tl.where(mag_bits >= 0x7F7F0000, nearest, rounded)
        return out.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        near = v.to(tl.float16)
        near_bits = near.to(tl.uint16, bitcast=True).to(tl.uint32) & 0x7FFF
        mag = tl.abs(v)
        lo_bits = tl.where(tl.abs(near.to(tl.float32)) > mag, near_bits - 1, near_bits)
        lo_mag = lo_bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        # 1/ulp at lo as fp32 bits: 2**(25 - E) for a normal lo of biased exponent E, 2**24 for a subnormal one
        inv_ulp = ((152 - tl.maximum(lo_bits >> 10, 1)) << 23).to(tl.float32, bitcast=True)
        up = (r.to(tl.float32) * 5.9604644775390625e-08 < (mag - lo_mag) * inv_ulp).to(tl.uint32)
        rounded = (sign | (lo_bits + up)).to(tl.uint16).to(tl.float16, bitcast=True)
        return tl.where(~_is_finite(v) | (lo_bits >= 0x7BFF), near, rounded)


@triton.jit
def _finish_tile(g, w_ptrs, flat_index, mask, stats_ptr, decay, step, inv_loss_scale, clip_value, seed_mix,
                 NORM_ONLY: tl.constexpr, STOCHASTIC: tl.constexpr, count_ptr=None, COUNT: tl.constexpr = False):
    """The epilogue of every kernel, on a tile of fp32 gradient ``g`` (masked-off entries ignored).

    ``NORM_ONLY``: store the tile's ``[sum(u*u), count(!isfinite(u))]`` at ``stats_ptr[0:2]``, this
    program's own slot of a partials buffer (``_reduce_into`` sums the slots in a fixed order: no float
    atomics). Otherwise: update the weights at ``w_ptrs`` by the rule and round them into their own dtype;
    an element whose rounded result is not finite keeps its old value (the guard of ``_common``), and
    with ``COUNT`` the tile's number of such elements is added to ``count_ptr[0]`` (an int64 atomic:
    exact in any order).
    """
    u = g * inv_loss_scale
    if NORM_ONLY:
        u = tl.where(mask, u, 0.0)
        tl.store(stats_ptr, tl.sum(u * u))
        tl.store(stats_ptr + 1, tl.sum(tl.where(_is_finite(u), 0.0, 1.0)))
    else:
        # Written with comparisons so a NaN passes through, as torch.clamp (min/max would drop it).
        u = tl.where(u > clip_value, clip_value, tl.where(u < -clip_value, -clip_value, u))
        w = tl.load(w_ptrs, mask=mask, other=0.0)
        new = _widen(w) * decay - step * u
        if w_ptrs.dtype.element_ty == tl.float32:
            out = new
        elif STOCHASTIC:
            out = _round_stochastic(new, flat_index, seed_mix, w_ptrs.dtype.element_ty)
        else:
            out = _round_nearest(new, w_ptrs.dtype.element_ty)
        ok = _is_finite(_widen(out))
        tl.store(w_ptrs, out, mask=mask & ok)  # a masked-off element keeps its old bits in memory
        if COUNT:
            tl.atomic_add(count_ptr, tl.sum(tl.where(mask & ~ok, 1, 0).to(tl.int64)))


@triton.jit
def _tile_coords(out_features, in_features, BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr):
    """This program's tile of an [out, in] weight: origin ``(m0, n0)``, in-tile offsets ``r``, ``c``, and
    which of them lie inside the weight."""
    m0 = tl.program_id(0) * BLOCK_OUT
    n0 = tl.program_id(1) * BLOCK_IN
    r = tl.arange(0, BLOCK_OUT)
    c = tl.arange(0, BLOCK_IN)
    return m0, n0, r, c, r < out_features - m0, c < in_features - n0


@triton.jit
def _gemm_tile(x_ptr, dy_ptr, tokens, m0, n0, r, c, row_ok, col_ok,
               stride_x_tok, stride_x_in, stride_dy_tok, stride_dy_out,
               DOT_IN_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
               BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr, BLOCK_T: tl.constexpr):
    """The fp32 tile ``G[m0 + r, n0 + c] = Σ_t dy[t, m0 + r] · x[t, n0 + c]`` (masked-off entries 0), summed
    over token blocks in order: the GEMM loop of every fused linear kernel.

    Register budget: every address is a scalar 64-bit base plus 32-bit in-tile offsets (a tensor of 64-bit
    pointers costs two registers per element and made the 16-bit epilogues spill). ``DOT_IN_FP32`` widens
    bf16 operands first (the interpreter's bf16 ``tl.dot`` is wrong; fp32 products of bf16 are exact)."""
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
    return acc


# --- kernels ------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["seed_mix"])
def _linear_kernel(w_ptr, x_ptr, dy_ptr, stats_ptr, count_ptr, tokens, out_features, in_features,
                   stride_w_out, stride_w_in, stride_x_tok, stride_x_in, stride_dy_tok, stride_dy_out,
                   decay, step, inv_loss_scale, clip_value, seed_mix,
                   NORM_ONLY: tl.constexpr, STOCHASTIC: tl.constexpr, COUNT: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr,
                   BLOCK_T: tl.constexpr):
    """One [BLOCK_OUT, BLOCK_IN] tile of ``G = dyᵀx`` per program, finished by ``_finish_tile``; with
    ``NORM_ONLY``, ``stats_ptr`` is the per-tile partials buffer [tiles, 2] (W's pointer a stand-in).

    Register budget: addresses as in ``_gemm_tile``, and the stochastic-rounding index is the flat index's
    low 32 bits, all the hash uses.
    """
    m0, n0, r, c, row_ok, col_ok = _tile_coords(out_features, in_features, BLOCK_OUT, BLOCK_IN)
    acc = _gemm_tile(x_ptr, dy_ptr, tokens, m0, n0, r, c, row_ok, col_ok,
                     stride_x_tok, stride_x_in, stride_dy_tok, stride_dy_out,
                     DOT_IN_FP32, DOT_PRECISION, BLOCK_OUT, BLOCK_IN, BLOCK_T)
    if NORM_ONLY:
        stats_ptr += 2 * (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1))
    w_tile = w_ptr + (m0.to(tl.int64) * stride_w_out + n0.to(tl.int64) * stride_w_in)
    # tl.cast, not .to: an integer argument equal to 1 arrives as a constexpr (Triton's specialization)
    in_u32 = tl.cast(in_features, tl.uint32)
    flat_base = m0.to(tl.uint32) * in_u32 + n0.to(tl.uint32)
    flat_index = flat_base + (r[:, None].to(tl.uint32) * in_u32 + c[None, :].to(tl.uint32))
    _finish_tile(acc, w_tile + (r[:, None] * stride_w_out + c[None, :] * stride_w_in),
                 flat_index, row_ok[:, None] & col_ok[None, :], stats_ptr,
                 decay, step, inv_loss_scale, clip_value, seed_mix, NORM_ONLY, STOCHASTIC, count_ptr, COUNT)


@triton.jit(do_not_specialize=["seed_mix"])
def _dense_kernel(p_ptr, g_ptr, stats_ptr, count_ptr, numel, stride_p, stride_g,
                  decay, step, inv_loss_scale, clip_value, seed_mix,
                  NORM_ONLY: tl.constexpr, STOCHASTIC: tl.constexpr, COUNT: tl.constexpr, BLOCK: tl.constexpr):
    """``BLOCK`` elements per program; with ``NORM_ONLY``, ``stats_ptr`` is the per-program partials
    buffer [programs, 2]."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    if NORM_ONLY:
        stats_ptr += 2 * tl.program_id(0)
    g = _widen(tl.load(g_ptr + offs * stride_g, mask=mask, other=0.0))
    _finish_tile(g, p_ptr + offs * stride_p, offs, mask, stats_ptr,
                 decay, step, inv_loss_scale, clip_value, seed_mix, NORM_ONLY, STOCHASTIC, count_ptr, COUNT)


@triton.jit(do_not_specialize=["seed_mix"])
def _embedding_rows_kernel(w_ptr, g_ptr, count_ptr, row_of_slot_ptr, slot_of_row_ptr, n_rows, dim,
                           stride_w_row, stride_w_col, stride_g_row, stride_g_col,
                           decay, step, inv_loss_scale, clip_value, seed_mix,
                           ALL_ROWS: tl.constexpr, STOCHASTIC: tl.constexpr, COUNT: tl.constexpr,
                           BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Update embedding rows from ``g`` [slots, dim], the summed gradients of the touched rows.

    ``ALL_ROWS`` (weight decay on): program rows are weight rows 0..n_rows, each finding its slot in
    ``slot_of_row`` (-1: untouched, gradient 0). Otherwise program rows are slots, each finding its
    weight row in ``row_of_slot``.
    """
    r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    r_ok = r < n_rows
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = r_ok[:, None] & (cols < dim)[None, :]
    if ALL_ROWS:
        row = r.to(tl.int64)
        slot = tl.load(slot_of_row_ptr + r, mask=r_ok, other=-1).to(tl.int64)
    else:
        row = tl.load(row_of_slot_ptr + r, mask=r_ok, other=0).to(tl.int64)
        slot = r.to(tl.int64)
    g = tl.load(g_ptr + slot[:, None] * stride_g_row + cols[None, :] * stride_g_col,
                mask=mask & (slot >= 0)[:, None], other=0.0)
    _finish_tile(g, w_ptr + row[:, None] * stride_w_row + cols[None, :] * stride_w_col,
                 row[:, None] * dim + cols[None, :], mask, w_ptr,
                 decay, step, inv_loss_scale, clip_value, seed_mix, False, STOCHASTIC, count_ptr, COUNT)


@triton.jit
def _reduce_kernel(part_ptr, out_ptr, n_parts, n, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """``out[k] += Σ_p part[p, k]`` (``part`` [n_parts, n] contiguous fp32), in a fixed order: chunks of
    ``BLOCK_P`` partials in index order, each summed by ``tl.sum``'s fixed tree. No atomics."""
    k = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = k < n
    p = tl.arange(0, BLOCK_P)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for p0 in range(0, n_parts, BLOCK_P):
        rows = p0 + p
        tile = tl.load(part_ptr + rows[:, None].to(tl.int64) * n + k[None, :],
                       mask=(rows < n_parts)[:, None] & k_ok[None, :], other=0.0)
        acc += tl.sum(tile, axis=0)
    tl.store(out_ptr + k, tl.load(out_ptr + k, mask=k_ok) + acc, mask=k_ok)


# --- launch configuration -----------------------------------------------------------------------

# Fixed configurations rather than triton.autotune: autotuning an in-place kernel re-runs it, so it
# needs a saved copy of W (a weight-sized temporary) to restore, which this design exists to avoid.
def _gemm_config(operand_dtype: torch.dtype) -> dict:
    if INTERPRETED:
        # Small tiles: the interpreter runs each program in numpy, and tests need several partial tiles.
        return dict(BLOCK_OUT=32, BLOCK_IN=32, BLOCK_T=16)
    if operand_dtype == torch.float32:
        return dict(BLOCK_OUT=64, BLOCK_IN=64, BLOCK_T=32, num_warps=4, num_stages=3)
    # 128x64 rather than 128x128: with 8 warps a 128x128 fp32 accumulator is 64 registers per thread, and
    # the bf16/fp16 epilogues then spilled on sm_86 and sm_90 (tests/test_triton_spills.py checks this).
    return dict(BLOCK_OUT=128, BLOCK_IN=64, BLOCK_T=64, num_warps=8, num_stages=3)


_DENSE_BLOCK = 1024
_EMBEDDING_TILE = 4096  # elements per program
_REDUCE_TILE = 4096  # partials loaded per reduction step


def _reduce_into(out: torch.Tensor, part: torch.Tensor) -> None:
    """``out += part.sum(0)`` in a fixed order (``part`` [n_parts, n] fp32 contiguous, ``out`` [n] fp32),
    for per-program partial sums: the same bits on every run, unlike float atomics."""
    n_parts, n = part.shape
    if n_parts == 0 or n == 0:
        return
    block_p = min(triton.next_power_of_2(n_parts), 256)
    block_n = max(1, min(triton.next_power_of_2(n), _REDUCE_TILE // block_p))
    _reduce_kernel[(triton.cdiv(n, block_n),)](part, out, n_parts, n, BLOCK_P=block_p, BLOCK_N=block_n)


def _rule_args(rule: UpdateRule) -> tuple:
    """The scalar kernel arguments: decay, step, inv_loss_scale, clip_value, mix32(seed)."""
    return rule.decay, rule.step, rule.inv_loss_scale, rule.clip_value, mix32_int(rule.seed)


def _norm_rule(inv_loss_scale: float) -> UpdateRule:
    return UpdateRule(decay=1.0, step=0.0, inv_loss_scale=inv_loss_scale)


def _check_device(t: torch.Tensor) -> None:
    if not INTERPRETED and t.device.type != "cuda":
        raise ValueError(f"the triton backend's kernels were built for the GPU (TRITON_INTERPRET was not 1 when "
                         f"lomo_kernels.kernels.triton_update was imported) and cannot run on {t.device} tensors")


# --- the backend interface ----------------------------------------------------------------------

def _linear(w: torch.Tensor | None, x: torch.Tensor, dy: torch.Tensor, stats: torch.Tensor | None,
            rule: UpdateRule, nonfinite: torch.Tensor | None = None) -> None:
    """Update ``w`` (``stats`` None) or, in norm-only mode, add to ``stats`` (``w`` None)."""
    _check_device(x)
    tokens, in_features = x.shape
    out_features = dy.shape[1]
    if in_features == 0 or out_features == 0:
        return
    grid, kw = _gemm_launch(x, out_features)
    with device_guard(x.device):
        # The kernel takes both pointers and dereferences one; the other gets a stand-in.
        if w is None:
            part = torch.empty(grid[0] * grid[1], 2, dtype=torch.float32, device=x.device)
            w, w_strides, norm_only = part, (0, 0), True
        else:
            part, w_strides, norm_only = w, w.stride(), False
        _linear_kernel[grid](w, x, dy, part, part if nonfinite is None else nonfinite, tokens, out_features,
                             in_features, *w_strides, x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
                             *_rule_args(rule), NORM_ONLY=norm_only, COUNT=nonfinite is not None and not norm_only,
                             STOCHASTIC=rule.stochastic and w.dtype != torch.float32, **kw, **_NO_FMA)
        if norm_only:
            _reduce_into(stats, part)


def _gemm_launch(x: torch.Tensor, out_features: int) -> tuple[tuple[int, int], dict]:
    """(grid, launch kwargs) of every fused linear kernel for activations ``x`` [T, in]."""
    in_features = x.shape[1]
    # The interpreter's tl.dot is wrong on bf16 operands (numpy has no bf16); fp32 products of bf16 are exact.
    dot_in_fp32 = INTERPRETED and x.dtype == torch.bfloat16
    fp32_operands = dot_in_fp32 or x.dtype == torch.float32
    cfg = _gemm_config(x.dtype)
    grid = (triton.cdiv(out_features, cfg["BLOCK_OUT"]), triton.cdiv(in_features, cfg["BLOCK_IN"]))
    # "ieee": fp32 operands in full precision, not rounded to tf32 (the default).
    return grid, dict(DOT_IN_FP32=dot_in_fp32, DOT_PRECISION="ieee" if fp32_operands else "tf32", **cfg)


def linear_update(w: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, rule: UpdateRule,
                  nonfinite: torch.Tensor | None = None) -> None:
    _linear(w, x, dy, None, rule, nonfinite)


def linear_grad_sqnorm(stats: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, inv_loss_scale: float) -> None:
    _linear(None, x, dy, stats, _norm_rule(inv_loss_scale))


def _dense(p: torch.Tensor, g: torch.Tensor, stats: torch.Tensor, rule: UpdateRule, norm_only: bool,
           nonfinite: torch.Tensor | None = None) -> None:
    _check_device(g)
    numel = g.numel()
    if numel == 0:
        return
    grid = (triton.cdiv(numel, _DENSE_BLOCK),)
    with device_guard(g.device):
        part = torch.empty(grid[0], 2, dtype=torch.float32, device=g.device) if norm_only else p
        _dense_kernel[grid](
            p, g, part, part if nonfinite is None else nonfinite, numel, p.stride(0), g.stride(0), *_rule_args(rule),
            NORM_ONLY=norm_only, COUNT=nonfinite is not None and not norm_only,
            STOCHASTIC=rule.stochastic and p.dtype != torch.float32, BLOCK=_DENSE_BLOCK, **_NO_FMA)
        if norm_only:
            _reduce_into(stats, part)


def dense_update(p: torch.Tensor, g: torch.Tensor, rule: UpdateRule, nonfinite: torch.Tensor | None = None) -> None:
    _dense(p, g, p, rule, norm_only=False, nonfinite=nonfinite)


def dense_grad_sqnorm(stats: torch.Tensor, g: torch.Tensor, inv_loss_scale: float) -> None:
    _dense(g, g, stats, _norm_rule(inv_loss_scale), norm_only=True)


def embedding_update(w: torch.Tensor, idx: torch.Tensor, dy: torch.Tensor, padding_idx: int,
                     rule: UpdateRule, nonfinite: torch.Tensor | None = None) -> None:
    _check_device(w)
    vocab, dim = w.shape
    rows, g = _row_gradients(idx, dy, padding_idx)  # g: fp32 [touched rows, dim], duplicates summed
    all_rows = rule.decay != 1.0  # weight decay reaches every row, touched or not, as in the reference
    if all_rows:
        slot_of_row = torch.full((vocab,), -1, dtype=torch.int32, device=w.device)
        slot_of_row[rows] = torch.arange(rows.numel(), dtype=torch.int32, device=w.device)
        row_of_slot, n_rows = slot_of_row, vocab  # row_of_slot unused with ALL_ROWS
    else:
        row_of_slot, slot_of_row, n_rows = rows, rows, rows.numel()  # slot_of_row unused
    if n_rows == 0 or dim == 0:
        return
    block_d = min(256, triton.next_power_of_2(dim))
    block_rows = max(1, _EMBEDDING_TILE // block_d)
    grid = (triton.cdiv(n_rows, block_rows), triton.cdiv(dim, block_d))
    with device_guard(w.device):
        _embedding_rows_kernel[grid](w, g, w if nonfinite is None else nonfinite, row_of_slot, slot_of_row, n_rows,
                                     dim, w.stride(0), w.stride(1), g.stride(0), g.stride(1), *_rule_args(rule),
                                     ALL_ROWS=all_rows, STOCHASTIC=rule.stochastic and w.dtype != torch.float32,
                                     COUNT=nonfinite is not None,
                                     BLOCK_ROWS=block_rows, BLOCK_D=block_d, **_NO_FMA)


def embedding_grad_sqnorm(stats: torch.Tensor, idx: torch.Tensor, dy: torch.Tensor, padding_idx: int,
                          inv_loss_scale: float) -> None:
    _, g = _row_gradients(idx, dy, padding_idx)
    dense_grad_sqnorm(stats, g.view(-1), inv_loss_scale)
