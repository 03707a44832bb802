"""The ``triton`` backend of the fused linear cross-entropy (``lomo_kernels.ops.linear_cross_entropy``).

Same semantics as the torch reference there (``_forward_impl``, ``_dlogits_impl``, ``_rows_update_impl``);
all arithmetic fp32, products of 16-bit operands exact in fp32 (tensor cores on the GPU, fp32 accumulate).

Kernels:

- ``_lse_kernel`` (forward): grid ``(token blocks, vocabulary splits)``. Each program owns ``BLOCK_T``
  tokens and one contiguous range of the vocabulary, and walks it in ``BLOCK_V`` columns: the logits
  tile ``H·W_vᵀ`` is a ``tl.dot`` loop over the hidden size in fp32 registers, then bias and softcap,
  then an online max / sum of exponentials, the target logit and (label smoothing) the row sum. It
  writes four token-sized partials per split; ``forward`` combines the splits (a log-sum-exp of
  ``splits × T`` numbers, in a fixed order: no atomics, deterministic). Nothing ``[T, V]`` exists, not
  even one chunk: the forward ignores the chunk size. The splits are there for parallelism (a
  512-token batch is only a few token blocks).
- ``_dlogits_kernel`` (backward, one vocabulary chunk): recomputes the chunk's logits tile from the old
  ``W_c`` and finishes ``dr = a·(softmax − (1−ε)·onehot − ε/V)·(1 − tanh²)`` in the epilogue, storing the
  fp32 ``[T, C]`` chunk (the one chunk-sized tensor; the updater protocol hands it over).
- ``_grad_hidden_kernel``: ``dH += dr_c · W_c`` in place (fp32 accumulate, ``W_c`` widened in
  registers: no fp32 copy of a 16-bit ``W_c``), before the chunk's rows are written.
- ``_rows_update_kernel``: the LOMO rule on rows ``[row0, row0+n)`` from ``G = dr_cᵀ·H``, the GEMM tile in
  registers and ``triton_update._finish_tile`` as the epilogue (decay, value clipping, loss scale,
  non-finite guard, nearest / stochastic rounding), with the stochastic-rounding index of each element
  in the *whole* weight (``(row0 + i)·d + j``), so a chunked update rounds as ``linear_update_`` on the whole
  weight; ``SCALED``: AdaLomo's ``row_scale_i · clamp(G/loss_scale) · col_scale_j`` (the reference's order).

Under ``TRITON_INTERPRET=1`` (CPU tensors, tests) ``tl.dot`` on bf16 operands is wrong (DESIGN.md), so
bf16 operands are widened to fp32 first there; the GPU path keeps them 16-bit. Every launch runs under
``_triton_device.device_guard`` (the tensors' CUDA device current, its current stream).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops._common import UpdateRule
from . import triton_update as _tu
from ._triton_device import device_guard
from .triton_update import _finish_tile, _gemm_tile, _tile_coords, _widen

INTERPRETED: bool = _tu.INTERPRETED


# --- per-element math ---------------------------------------------------------------------------

@triton.jit
def _tanh(x):
    """fp32 tanh to a few ulp (libdevice's is not in the interpreter): an odd Taylor polynomial below
    |x| = 0.25 (truncation < 1e-8 relative), ``(1 − e)/(1 + e)`` with ``e = exp(−2|x|)`` above (no
    cancellation worse than 1.3 bits there); NaN passes through."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    x2 = a * a
    small = a * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
        -0.05396825396825397 + x2 * 0.021869488536155203))))
    t = tl.where(a < 0.25, small, big)
    return tl.where(x < 0, -t, t)


@triton.jit
def _logits_tile(h_tile, w_tile, tok_ok, col_ok, hidden, stride_h_d, stride_w_d,
                 DOT_IN_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp32 ``[BLOCK_T, BLOCK_V]`` tile of ``H·Wᵀ``: ``h_tile`` [BLOCK_T, 1] and ``w_tile`` [BLOCK_V, 1] are
    the rows' pointers; the loop runs over the hidden size."""
    acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_D):
        k = tl.arange(0, BLOCK_D)
        k_ok = k < hidden - k0
        k_off = tl.cast(k0, tl.int64)
        h = tl.load(h_tile + k_off * stride_h_d + k[None, :] * stride_h_d, mask=tok_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w = tl.load(w_tile + k_off * stride_w_d + k[None, :] * stride_w_d, mask=col_ok[:, None] & k_ok[None, :],
                    other=0.0)
        if DOT_IN_FP32:
            h = _widen(h)
            w = _widen(w)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _finish_logits(acc, b_ptr, v0, col, col_ok, softcap, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr):
    """``(z, t)``: the logits after bias and softcap ``c·tanh(r/c)``, and ``t = tanh(r/c)`` (``z`` without)."""
    if HAS_BIAS:
        acc = acc + _widen(tl.load(b_ptr + v0 + col, mask=col_ok, other=0.0))[None, :]
    if SOFTCAP:
        t = _tanh(acc / softcap)
        return t * softcap, t
    else:
        return acc, acc


# --- kernels ------------------------------------------------------------------------------------

@triton.jit
def _lse_kernel(h_ptr, w_ptr, b_ptr, y_ptr, part_ptr, tokens, vocab, hidden, span,
                stride_h_t, stride_h_d, stride_w_v, stride_w_d, softcap,
                HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr,
                DOT_IN_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """Partials of tokens ``[t0, t0+BLOCK_T)`` over vocabulary ``[split·span, (split+1)·span)``:
    ``part[k, split, t]`` for k = running max, sum of exp(z − max), target logit, Σ z (SMOOTH)."""
    t0 = tl.program_id(0) * BLOCK_T
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    v_start = split * span
    v_end = tl.minimum(v_start + span, vocab)
    tok = tl.arange(0, BLOCK_T)
    tok_ok = tok < tokens - t0
    y = tl.load(y_ptr + t0 + tok, mask=tok_ok, other=-1)
    h_tile = h_ptr + tl.cast(t0, tl.int64) * stride_h_t + tok[:, None] * stride_h_t
    m = tl.full((BLOCK_T,), -float("inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_T,), dtype=tl.float32)
    z_label = tl.zeros((BLOCK_T,), dtype=tl.float32)
    z_sum = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        col = tl.arange(0, BLOCK_V)
        col_ok = col < v_end - v0
        w_tile = w_ptr + tl.cast(v0, tl.int64) * stride_w_v + col[:, None] * stride_w_v
        acc = _logits_tile(h_tile, w_tile, tok_ok, col_ok, hidden, stride_h_d, stride_w_d,
                           DOT_IN_FP32, DOT_PRECISION, BLOCK_T, BLOCK_V, BLOCK_D)
        z, _t = _finish_logits(acc, b_ptr, v0, col, col_ok, softcap, HAS_BIAS, SOFTCAP)
        zm = tl.where(col_ok[None, :], z, -float("inf"))
        m_new = tl.maximum(m, tl.max(zm, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(zm - m_new[:, None]), axis=1)
        m = m_new
        # col_ok too: a column past this split's end may be the label, counted by the next split
        hit = col_ok[None, :] & ((v0 + col)[None, :] == y[:, None])
        z_label += tl.sum(tl.where(hit, z, 0.0), axis=1)
        if SMOOTH:
            z_sum += tl.sum(tl.where(col_ok[None, :], z, 0.0), axis=1)
    out = part_ptr + split * tokens + t0 + tok
    plane = n_splits * tokens
    tl.store(out, m, mask=tok_ok)
    tl.store(out + plane, s, mask=tok_ok)
    tl.store(out + 2 * plane, z_label, mask=tok_ok)
    if SMOOTH:
        tl.store(out + 3 * plane, z_sum, mask=tok_ok)


@triton.jit
def _dlogits_kernel(h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, coef_ptr, dr_ptr, tokens, n_cols, v_begin, hidden,
                    stride_h_t, stride_h_d, stride_w_v, stride_w_d, stride_dr_t,
                    eps_over_v, one_minus_eps, softcap,
                    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr,
                    DOT_IN_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """``dr[t, c]`` for tokens ``[t0, t0+BLOCK_T)`` and chunk columns ``[c0, c0+BLOCK_V)`` (vocabulary
    index ``v_begin + c``), in the reference's order of operations."""
    t0 = tl.program_id(0) * BLOCK_T
    c0 = tl.program_id(1) * BLOCK_V
    tok = tl.arange(0, BLOCK_T)
    col = tl.arange(0, BLOCK_V)
    tok_ok = tok < tokens - t0
    col_ok = col < n_cols - c0
    v0 = v_begin + c0
    h_tile = h_ptr + tl.cast(t0, tl.int64) * stride_h_t + tok[:, None] * stride_h_t
    w_tile = w_ptr + tl.cast(v0, tl.int64) * stride_w_v + col[:, None] * stride_w_v
    acc = _logits_tile(h_tile, w_tile, tok_ok, col_ok, hidden, stride_h_d, stride_w_d,
                       DOT_IN_FP32, DOT_PRECISION, BLOCK_T, BLOCK_V, BLOCK_D)
    z, t = _finish_logits(acc, b_ptr, v0, col, col_ok, softcap, HAS_BIAS, SOFTCAP)
    lse = tl.load(lse_ptr + t0 + tok, mask=tok_ok, other=0.0)
    coef = tl.load(coef_ptr + t0 + tok, mask=tok_ok, other=0.0)
    y = tl.load(y_ptr + t0 + tok, mask=tok_ok, other=-1)
    p = tl.exp(z - lse[:, None])
    if SMOOTH:
        p = p - eps_over_v
    p = tl.where((v0 + col)[None, :] == y[:, None], p - one_minus_eps, p)
    p = p * coef[:, None]
    if SOFTCAP:
        p = p * (1.0 - t * t)
    out = dr_ptr + tl.cast(t0, tl.int64) * stride_dr_t + c0 + (tok[:, None] * stride_dr_t + col[None, :])
    tl.store(out, p, mask=tok_ok[:, None] & col_ok[None, :])


@triton.jit
def _grad_hidden_kernel(dr_ptr, w_ptr, gh_ptr, tokens, n_cols, v_begin, hidden,
                        stride_dr_t, stride_w_v, stride_w_d, stride_gh_t,
                        BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """``gh[t0:t0+BLOCK_T, k0:k0+BLOCK_D] += dr · W[v_begin : v_begin+n_cols, k0:k0+BLOCK_D]`` (fp32)."""
    t0 = tl.program_id(0) * BLOCK_T
    k0 = tl.program_id(1) * BLOCK_D
    tok = tl.arange(0, BLOCK_T)
    k = tl.arange(0, BLOCK_D)
    tok_ok = tok < tokens - t0
    k_ok = k < hidden - k0
    dr_tile = dr_ptr + tl.cast(t0, tl.int64) * stride_dr_t + tok[:, None] * stride_dr_t
    w_tile = w_ptr + tl.cast(v_begin, tl.int64) * stride_w_v + tl.cast(k0, tl.int64) * stride_w_d \
        + k[None, :] * stride_w_d
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for c0 in range(0, n_cols, BLOCK_V):
        c = tl.arange(0, BLOCK_V)
        c_ok = c < n_cols - c0
        dr = tl.load(dr_tile + c0 + c[None, :], mask=tok_ok[:, None] & c_ok[None, :], other=0.0)
        w = tl.load(w_tile + tl.cast(c0, tl.int64) * stride_w_v + c[:, None] * stride_w_v,
                    mask=c_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(dr, _widen(w), acc, input_precision="ieee")
    gh = gh_ptr + tl.cast(t0, tl.int64) * stride_gh_t + k0 + (tok[:, None] * stride_gh_t + k[None, :])
    mask = tok_ok[:, None] & k_ok[None, :]
    tl.store(gh, tl.load(gh, mask=mask, other=0.0) + acc, mask=mask)


@triton.jit(do_not_specialize=["seed_mix"])
def _rows_update_kernel(w_ptr, x_ptr, dy_ptr, rs_ptr, cs_ptr, count_ptr, row0, tokens, n_rows, in_features,
                        stride_w_out, stride_w_in, stride_x_tok, stride_x_in, stride_dy_tok, stride_dy_out,
                        decay, step, inv_loss_scale, clip_value, seed_mix,
                        SCALED: tl.constexpr, STOCHASTIC: tl.constexpr, COUNT: tl.constexpr,
                        DOT_IN_FP32: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr,
                        BLOCK_T: tl.constexpr):
    """One ``[BLOCK_OUT, BLOCK_IN]`` tile of ``G = dyᵀx`` for weight rows ``row0 + m0 + i``, finished by
    ``triton_update._finish_tile`` (``w_ptr`` points at row 0 of the whole weight; ``COUNT``: kept
    non-finite updates added to ``count_ptr[0]``)."""
    m0, n0, r, c, row_ok, col_ok = _tile_coords(n_rows, in_features, BLOCK_OUT, BLOCK_IN)
    acc = _gemm_tile(x_ptr, dy_ptr, tokens, m0, n0, r, c, row_ok, col_ok,
                     stride_x_tok, stride_x_in, stride_dy_tok, stride_dy_out,
                     DOT_IN_FP32, DOT_PRECISION, BLOCK_OUT, BLOCK_IN, BLOCK_T)
    first = tl.cast(row0, tl.int64) + m0
    w_tile = w_ptr + (first * stride_w_out + n0.to(tl.int64) * stride_w_in)
    in_u32 = tl.cast(in_features, tl.uint32)
    flat_base = first.to(tl.uint32) * in_u32 + n0.to(tl.uint32)  # the low 32 bits, all the hash uses
    flat_index = flat_base + (r[:, None].to(tl.uint32) * in_u32 + c[None, :].to(tl.uint32))
    mask = row_ok[:, None] & col_ok[None, :]
    w_ptrs = w_tile + (r[:, None] * stride_w_out + c[None, :] * stride_w_in)
    if SCALED:
        u = acc * inv_loss_scale
        u = tl.where(u > clip_value, clip_value, tl.where(u < -clip_value, -clip_value, u))
        rs = tl.load(rs_ptr + m0 + r, mask=row_ok, other=0.0)
        cs = tl.load(cs_ptr + n0 + c, mask=col_ok, other=0.0)
        u = u * rs[:, None] * cs[None, :]
        _finish_tile(u, w_ptrs, flat_index, mask, w_ptr, decay, step, 1.0, float("inf"), seed_mix,
                     False, STOCHASTIC, count_ptr, COUNT)
    else:
        _finish_tile(acc, w_ptrs, flat_index, mask, w_ptr, decay, step, inv_loss_scale, clip_value, seed_mix,
                     False, STOCHASTIC, count_ptr, COUNT)


# --- launch configuration -----------------------------------------------------------------------

def _logits_config(dtype: torch.dtype) -> dict:
    """Tiles of the logits GEMM kernels (forward, dlogits). Fixed, not autotuned (see triton_update)."""
    if INTERPRETED:
        # Small tiles: several partial tiles (and splits) at test shapes, and the interpreter is slow.
        return dict(BLOCK_T=16, BLOCK_V=32, BLOCK_D=16)
    if dtype == torch.float32:
        return dict(BLOCK_T=64, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=3)
    return dict(BLOCK_T=64, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3)


def _grad_hidden_config(weight_dtype: torch.dtype) -> dict:
    if INTERPRETED:
        return dict(BLOCK_T=16, BLOCK_V=16, BLOCK_D=32)
    if weight_dtype == torch.float32:
        return dict(BLOCK_T=64, BLOCK_V=32, BLOCK_D=64, num_warps=4, num_stages=3)
    return dict(BLOCK_T=64, BLOCK_V=32, BLOCK_D=64, num_warps=8, num_stages=3)


def _operands(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, str]:
    """``(DOT_IN_FP32, DOT_PRECISION)`` for a ``tl.dot`` of ``a``'s and ``b``'s dtypes: 16-bit operands of
    one dtype stay 16-bit on the GPU (exact products, fp32 accumulate); anything else (fp32, mixed dtypes,
    bf16 under the interpreter) is widened and multiplied in full fp32 ("ieee", not tf32)."""
    same16 = a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16)
    widen = not same16 or (INTERPRETED and a.dtype == torch.bfloat16)
    return widen, ("ieee" if widen else "tf32")


def _n_splits(token_blocks: int, vocab_blocks: int, device: torch.device) -> int:
    """Vocabulary splits of the forward: enough programs to fill the GPU twice over (at least 2 splits
    under the interpreter, to test the combination)."""
    if INTERPRETED:
        target = 2 * token_blocks
    else:
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(vocab_blocks, triton.cdiv(target, token_blocks)))


def _check(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t is not None:
            _tu._check_device(t)


# --- the backend interface (called by lomo_kernels.ops.linear_cross_entropy) --------------------

def forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
            ignore_index: int, label_smoothing: float, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ_i ℓ_i, lse [T])`` (fp32), as ``_forward_impl``: ``hidden`` [T, d], ``weight`` [V, d], int64 labels."""
    _check(hidden, weight, bias, labels)
    tokens, d = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    if tokens == 0:
        return torch.zeros((), dtype=torch.float32, device=dev), torch.zeros(0, dtype=torch.float32, device=dev)
    cfg = _logits_config(hidden.dtype if hidden.dtype == weight.dtype else torch.float32)
    t_blocks, v_blocks = triton.cdiv(tokens, cfg["BLOCK_T"]), triton.cdiv(vocab, cfg["BLOCK_V"])
    splits = _n_splits(t_blocks, v_blocks, dev)
    span = triton.cdiv(v_blocks, splits) * cfg["BLOCK_V"]
    splits = triton.cdiv(vocab, span)  # no empty split
    part = torch.empty(4, splits, tokens, dtype=torch.float32, device=dev)
    smooth = bool(label_smoothing)
    dot_in_fp32, precision = _operands(hidden, weight)
    with device_guard(dev):
        _lse_kernel[(t_blocks, splits)](
            hidden, weight, weight if bias is None else bias, labels, part, tokens, vocab, d, span,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), float(softcap or 1.0),
            HAS_BIAS=bias is not None, SOFTCAP=bool(softcap), SMOOTH=smooth,
            DOT_IN_FP32=dot_in_fp32, DOT_PRECISION=precision, **cfg)
    m, s, z_label, z_sum = part.unbind(0)
    top = m.amax(dim=0)
    lse = top + torch.log((s * torch.exp(m - top)).sum(dim=0))
    per_token = lse - (1.0 - label_smoothing) * z_label.sum(dim=0)
    if smooth:
        per_token = per_token - (label_smoothing / vocab) * z_sum.sum(dim=0)
    loss_sum = torch.where(labels != ignore_index, per_token, 0.0).sum()
    return loss_sum, lse


def dlogits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
            lse: torch.Tensor, token_coef: torch.Tensor, v0: int, v1: int, label_smoothing: float,
            softcap: float) -> torch.Tensor:
    """One chunk's fp32 ``dr [T, v1−v0]``, as ``_dlogits_impl`` (``labels``: −1 where ignored)."""
    _check(hidden, weight, bias, labels, lse, token_coef)
    tokens, d = hidden.shape
    vocab = weight.shape[0]
    n = v1 - v0
    dr = torch.empty(tokens, n, dtype=torch.float32, device=hidden.device)
    if tokens == 0 or n == 0:
        return dr
    cfg = _logits_config(hidden.dtype if hidden.dtype == weight.dtype else torch.float32)
    dot_in_fp32, precision = _operands(hidden, weight)
    grid = (triton.cdiv(tokens, cfg["BLOCK_T"]), triton.cdiv(n, cfg["BLOCK_V"]))
    with device_guard(dr.device):
        _dlogits_kernel[grid](
            hidden, weight, weight if bias is None else bias, labels, lse.contiguous(), token_coef.contiguous(), dr,
            tokens, n, v0, d, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), dr.stride(0),
            label_smoothing / vocab, 1.0 - label_smoothing, float(softcap or 1.0),
            HAS_BIAS=bias is not None, SOFTCAP=bool(softcap), SMOOTH=bool(label_smoothing),
            DOT_IN_FP32=dot_in_fp32, DOT_PRECISION=precision, **cfg)
    return dr


def grad_hidden_add_(grad_h: torch.Tensor, dr: torch.Tensor, weight: torch.Tensor, v0: int) -> None:
    """``grad_h += dr · weight[v0 : v0 + dr.shape[1]]`` (fp32 ``grad_h`` [T, d], fp32 ``dr`` [T, n])."""
    _check(grad_h, dr, weight)
    tokens, d = grad_h.shape
    n = dr.shape[1]
    if tokens == 0 or n == 0 or d == 0:
        return
    if dr.stride(1) != 1:
        dr = dr.contiguous()
    cfg = _grad_hidden_config(weight.dtype)
    grid = (triton.cdiv(tokens, cfg["BLOCK_T"]), triton.cdiv(d, cfg["BLOCK_D"]))
    with device_guard(grad_h.device):
        _grad_hidden_kernel[grid](dr, weight, grad_h, tokens, n, v0, d, dr.stride(0), weight.stride(0),
                                  weight.stride(1), grad_h.stride(0), **cfg)


def rows_update(weight: torch.Tensor, row0: int, x: torch.Tensor, grad_out: torch.Tensor,
                row_scale: torch.Tensor | None, col_scale: torch.Tensor | None, rule: UpdateRule,
                nonfinite: torch.Tensor | None = None) -> None:
    """Rows ``[row0, row0 + grad_out.shape[1])`` of ``weight`` get the rule from ``G = grad_outᵀ x``, as
    ``_rows_update_impl`` (stochastic rounding keyed by the flat index in the whole weight)."""
    _check(weight, x, grad_out)
    tokens, in_features = x.shape
    n_rows = grad_out.shape[1]
    if n_rows == 0 or in_features == 0:
        return
    dot_in_fp32, precision = _operands(x, grad_out)
    scaled = row_scale is not None
    cfg = _tu._gemm_config(torch.float32 if dot_in_fp32 else x.dtype)  # triton_update's linear-kernel tiles
    if scaled and not INTERPRETED:
        cfg = dict(cfg, num_warps=8)  # the scale vectors' registers: 4 warps spilled 4 bytes on sm_90 (fp32)
    grid = (triton.cdiv(n_rows, cfg["BLOCK_OUT"]), triton.cdiv(in_features, cfg["BLOCK_IN"]))
    with device_guard(weight.device):
        _rows_update_kernel[grid](
            weight, x, grad_out, row_scale if scaled else weight, col_scale if scaled else weight,
            nonfinite if nonfinite is not None else weight, int(row0),
            tokens, n_rows, in_features, weight.stride(0), weight.stride(1), x.stride(0), x.stride(1),
            grad_out.stride(0), grad_out.stride(1), *_tu._rule_args(rule),
            SCALED=scaled, STOCHASTIC=rule.stochastic and weight.dtype != torch.float32, COUNT=nonfinite is not None,
            DOT_IN_FP32=dot_in_fp32, DOT_PRECISION=precision, **cfg, **_tu._NO_FMA)


__all__ = ["forward", "dlogits", "grad_hidden_add_", "rows_update", "INTERPRETED"]
