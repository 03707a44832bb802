"""Fused linear cross-entropy over vocabulary chunks: the LM head's loss without its logits.

For hidden states ``H [T, d]``, the LM head ``W [V, d]`` (optional bias ``b [V]``) and labels ``y [T]``,
with logits ``z = softcap(H Wᵀ + b)`` (``softcap(r) = c·tanh(r/c)``, Gemma-2's final-logit capping, or
the identity) and label smoothing ``ε``, the per-token loss is

    ℓ_i = lse_i − (1−ε)·z_{i,y_i} − (ε/V)·Σ_j z_ij          (0 where y_i == ignore_index)

(= ``F.cross_entropy(z, y, label_smoothing=ε)`` per token). Its gradient with respect to the raw logits,
scaled by a per-token coefficient ``a_i`` (upstream gradient / normalizer, 0 for ignored tokens), is

    dr_ij = a_i · (softmax(z)_ij − (1−ε)·[j == y_i] − ε/V) · (1 − (z_ij/c)²)      (last factor: softcap only)

Nothing here builds the ``[T, V]`` logits or the ``[V, d]`` LM-head gradient: every op works on one
vocabulary chunk ``[v0, v1)`` at a time.

* ``linear_cross_entropy_forward``   (custom op)  one pass over the chunks with an online
  log-sum-exp: returns ``Σ_i ℓ_i`` and ``lse [T]`` (fp32) — ``lse`` is what the backward keeps.
* ``linear_cross_entropy_dlogits``   (custom op)  one chunk's ``dr [T, v1−v0]`` (fp32) from ``H``,
  ``W[v0:v1]``, ``lse`` and ``a``: the backward recomputes the chunk's logits from the old ``W``.
* ``linear_update_rows_``            (custom op)  the LOMO rule (or AdaLomo's scaled rule) applied to
  rows ``[row0, row0+n)`` of a weight from ``G_rows = dyᵀx``, with stochastic rounding keyed by the
  element's flat index in the *whole* weight, so a chunked update rounds bit-for-bit like
  ``linear_update_`` on the whole weight with the same seed.
* ``linear_cross_entropy_update_`` / ``linear_cross_entropy_grad_sqnorm_`` (checked Python API): the
  loss, ``dH`` (computed with the pre-update ``W``) and the bias gradient, with the LOMO update of ``W``
  (or the norm phase's ``‖G/loss_scale‖²``) applied chunk by chunk — ``lomo_kernels.fused_cross_entropy``
  wraps the same loop in an autograd Function for any optimizer rule.

Backends (``LossConfig.backend``, resolved from ``backend=`` as every op here: ``auto`` = triton on CUDA
tensors, else cpu): ``triton`` runs ``kernels/triton_linear_cross_entropy.py`` (forward in one launch over
the whole vocabulary, per chunk a dlogits kernel, a ``dH += dr·W_c`` kernel and the rows update with
``triton_update``'s epilogue). ``cpu`` and ``torch`` run the torch math below; on ``cpu`` the rows update is
the compiled C++ ``linear_update``. There is deliberately no C++ kernel for the loss: at 512 tokens ×
32000 × 512 the four chunk GEMMs (forward logits, recomputed logits, ``dH``, ``G``) are ~95% of the step's
CPU time and a C++ kernel would call the same BLAS; measured, the cpu path is 0.93-0.96× the torch
backend's (bench/results/linear_cross_entropy.md).

All arithmetic is fp32 whatever the input dtype (bf16/fp16 ``H``/``W`` are upcast, ``H`` once, ``W``
one chunk at a time), which is also what transformers' loss does (``logits.float()``), except that
there the logits were already rounded to the model dtype by the LM head's GEMM.

Chunk size (``choose_chunk_size``): a chunk costs about ``CHUNK_LIVE_TENSORS`` fp32 tensors of
``[T, C]`` at its peak (the logits, their exponentials / the gradient, and a softcap or mask
temporary), plus, for 16-bit weights, the fp32 copy of ``W[v0:v1]`` (``C·d``). We pick the largest
multiple of 128 columns that keeps that within ``memory_budget`` bytes, at least 128 columns and at
most ``V``. Why by memory and not by a fixed count: with the weight gradients gone, the step's peak is
the activations, and the chunk must stay small against them at *every* ``T`` (Llama-3's 128256
columns × 8192 tokens would be 3.9 GiB of fp32 logits; at 64 MiB the chunk is 512 columns, 16 MiB per
tensor), while above ~128 columns the chunk GEMMs (``[T, d]·[d, C]``, ``[T, C]·[C, d]``,
``[C, T]·[T, d]``) are wide enough for BLAS / tensor cores and the per-chunk Python work (a few ops,
~50 µs) is negligible. Default budget (``DEFAULT_MEMORY_BUDGET``): 64 MiB on accelerators (wide GEMMs,
memory that matters only against GiB of activations); 16 MiB on CPU, where smaller chunks are also
*faster* because the chunk's tensors stay in cache — measured at 512 tokens × 32000 × 256, 1 thread
(bench/results/linear_cross_entropy.md): 1024–4096 columns are the fastest (0.78-0.82x the unfused
step), 8192 about 5% slower, one chunk (32000) about 40% slower than those; 16 MiB gives 2048 columns
there (measured peak of the step: 12 MiB, three [T, C] fp32 tensors).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch._subclasses.fake_tensor import is_fake

from .. import backends
from ..kernels import reference
from ._common import UpdateRule, apply_rule_, check_counter, check_stats, check_weight, run_op
from .linear_update import linear_grad_sqnorm_

DEFAULT_MEMORY_BUDGET = {"cpu": 16 << 20, "other": 64 << 20}
CHUNK_LIVE_TENSORS = 4
CHUNK_ALIGN = 128


def choose_chunk_size(tokens: int, vocab: int, hidden: int = 0, weight_dtype: torch.dtype = torch.float32,
                      memory_budget: int | None = None, device: torch.device | str = "cpu") -> int:
    """Vocabulary columns per chunk: the largest multiple of 128 whose ``CHUNK_LIVE_TENSORS`` fp32
    ``[tokens, C]`` tensors (plus an fp32 copy of ``W[v0:v1]`` for 16-bit weights) fit ``memory_budget``
    bytes (None: ``DEFAULT_MEMORY_BUDGET`` for ``device``'s type); at least 128 (or ``vocab`` if
    smaller), at most ``vocab``. See the module docstring."""
    kind = torch.device(device).type
    budget = DEFAULT_MEMORY_BUDGET["cpu" if kind == "cpu" else "other"] if memory_budget is None else int(memory_budget)
    if budget <= 0:
        raise ValueError(f"memory_budget must be > 0 bytes, got {memory_budget!r}")
    per_column = 4 * (CHUNK_LIVE_TENSORS * max(tokens, 1) + (hidden if weight_dtype != torch.float32 else 0))
    cols = (budget // per_column) // CHUNK_ALIGN * CHUNK_ALIGN
    return int(min(vocab, max(cols, CHUNK_ALIGN)))


# --- the reference math, one chunk at a time -----------------------------------------------------

def _chunk_logits(h32: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, v0: int, v1: int,
                  softcap: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(z, t)``: fp32 logits of columns ``[v0, v1)`` after the softcap, and ``tanh(r/c)`` (softcap only)."""
    w = weight[v0:v1]
    r = h32 @ (w if w.dtype == torch.float32 else w.to(torch.float32)).t()
    if bias is not None:
        r += bias[v0:v1].to(torch.float32)
    if not softcap:
        return r, None
    t = r.div_(softcap).tanh_()
    return t * softcap, t


def _forward_impl(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                  ignore_index: int, label_smoothing: float, softcap: float, chunk_size: int, backend: str = "torch"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":  # one kernel over the whole vocabulary (no chunk tensors): chunk_size unused
        return _triton().forward(hidden, weight, bias, labels, ignore_index, label_smoothing, softcap)
    tokens, vocab = hidden.shape[0], weight.shape[0]
    h32 = hidden.to(torch.float32)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    m = torch.full((tokens,), -math.inf, dtype=torch.float32, device=hidden.device)
    s = torch.zeros(tokens, dtype=torch.float32, device=hidden.device)
    z_label = torch.zeros(tokens, dtype=torch.float32, device=hidden.device)
    z_sum = torch.zeros(tokens, dtype=torch.float32, device=hidden.device) if label_smoothing else None
    for v0 in range(0, vocab, chunk_size):
        v1 = min(v0 + chunk_size, vocab)
        z, _ = _chunk_logits(h32, weight, bias, v0, v1, softcap)
        new_m = torch.maximum(m, z.amax(dim=1))
        s = s * torch.exp(m - new_m) + torch.exp(z - new_m[:, None]).sum(dim=1)
        m = new_m
        inside = (safe >= v0) & (safe < v1)
        picked = z.gather(1, (safe - v0).clamp_(0, v1 - v0 - 1)[:, None]).squeeze(1)
        z_label += torch.where(inside, picked, 0.0)
        if z_sum is not None:
            z_sum += z.sum(dim=1)
    lse = m + torch.log(s)
    per_token = lse - (1.0 - label_smoothing) * z_label
    if z_sum is not None:
        per_token = per_token - (label_smoothing / vocab) * z_sum
    loss_sum = torch.where(valid, per_token, 0.0).sum()
    return loss_sum, lse


_forward_op = torch.library.custom_op("lomo_kernels::linear_cross_entropy_forward", mutates_args=())(_forward_impl)


@_forward_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, label_smoothing, softcap, chunk_size, backend="torch"):
    return (hidden.new_empty((), dtype=torch.float32), hidden.new_empty((hidden.shape[0],), dtype=torch.float32))


def _dlogits_impl(hidden32: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                  lse: torch.Tensor, token_coef: torch.Tensor, v0: int, v1: int, label_smoothing: float,
                  softcap: float, backend: str = "torch") -> torch.Tensor:
    if backend == "triton":
        return _triton().dlogits(hidden32, weight, bias, labels, lse, token_coef, v0, v1, label_smoothing, softcap)
    vocab = weight.shape[0]
    z, t = _chunk_logits(hidden32, weight, bias, v0, v1, softcap)
    p = z.sub_(lse[:, None]).exp_()                      # softmax of the chunk's columns (z is consumed)
    if label_smoothing:
        p.sub_(label_smoothing / vocab)
    inside = (labels >= v0) & (labels < v1)
    rows = inside.nonzero().squeeze(1)
    cols = labels[rows] - v0
    p[rows, cols] -= 1.0 - label_smoothing
    p.mul_(token_coef[:, None])
    if t is not None:
        p.mul_(t.square_().neg_().add_(1.0))
    return p


_dlogits_op = torch.library.custom_op("lomo_kernels::linear_cross_entropy_dlogits", mutates_args=())(_dlogits_impl)


@_dlogits_op.register_fake
def _(hidden32, weight, bias, labels, lse, token_coef, v0, v1, label_smoothing, softcap, backend="torch"):
    return hidden32.new_empty((hidden32.shape[0], v1 - v0), dtype=torch.float32)


def _grad_hidden_impl(grad_h: torch.Tensor, dr: torch.Tensor, weight: torch.Tensor, v0: int, backend: str) -> None:
    """``grad_h += dr · W[v0 : v0 + dr.shape[1]]`` (fp32): one chunk's term of ``dH``, with the old rows."""
    if backend == "triton":
        _triton().grad_hidden_add_(grad_h, dr, weight, v0)
        return
    w = weight[v0:v0 + dr.shape[1]]
    grad_h.addmm_(dr, w if w.dtype == torch.float32 else w.to(torch.float32))


_grad_hidden_op = torch.library.custom_op("lomo_kernels::linear_cross_entropy_grad_hidden_",
                                          mutates_args=("grad_h",))(_grad_hidden_impl)


@_grad_hidden_op.register_fake
def _(grad_h, dr, weight, v0, backend):
    return None


def _triton():
    from ..kernels import triton_linear_cross_entropy
    return triton_linear_cross_entropy


def _rows_update_impl(weight: torch.Tensor, row0: int, x: torch.Tensor, grad_out: torch.Tensor,
                      row_scale: torch.Tensor | None, col_scale: torch.Tensor | None, decay: float, step: float,
                      inv_loss_scale: float, clip_value: float, stochastic: bool, seed: int,
                      nonfinite: Optional[torch.Tensor], backend: str) -> None:
    rule = UpdateRule(decay, step, inv_loss_scale, clip_value, stochastic, seed)
    if backend == "triton":  # every case in one kernel: flat offsets and AdaLomo's scales in its epilogue
        _triton().rows_update(weight, row0, x, grad_out, row_scale, col_scale, rule, nonfinite)
        return
    rows = weight[row0:row0 + grad_out.shape[1]]
    if row_scale is None and (not stochastic or weight.dtype == torch.float32):
        # flat offsets matter only to stochastic rounding: any backend's kernel on the row view is the rule
        backends.module(backend).linear_update(rows, x, grad_out, rule, nonfinite)
        return
    scaled = dataclasses.replace(rule, inv_loss_scale=1.0, clip_value=math.inf)
    in_f = weight.shape[1]
    for r0, r1, g in reference._clipped_gradient_blocks(x, grad_out, inv_loss_scale, clip_value):
        if row_scale is not None:
            g = g * row_scale[r0:r1, None] * col_scale
        apply_rule_(rows[r0:r1], g, scaled, flat_offset=(row0 + r0) * in_f, nonfinite=nonfinite)


_rows_update_op = torch.library.custom_op("lomo_kernels::linear_update_rows_",
                                          mutates_args=("weight", "nonfinite"))(_rows_update_impl)


@_rows_update_op.register_fake
def _(weight, row0, x, grad_out, row_scale, col_scale, decay, step, inv_loss_scale, clip_value, stochastic, seed,
      nonfinite, backend):
    return None


# --- checked Python API ------------------------------------------------------------------------------

def linear_update_rows_(weight: torch.Tensor, row0: int, x: torch.Tensor, grad_out: torch.Tensor, *, lr: float,
                        weight_decay: float = 0.0, coef: float = 1.0, loss_scale: float = 1.0,
                        clip_value: float | None = None, rounding: str = "nearest", seed: int = 0,
                        row_scale: torch.Tensor | None = None, col_scale: torch.Tensor | None = None,
                        backend: str = "auto", name: str = "weight", nonfinite: torch.Tensor | None = None) -> None:
    """Rows ``[row0, row0 + grad_out.shape[1])`` of ``weight`` [V, d] get ``linear_update_``'s rule from
    ``G = grad_outᵀ x`` (x [T, d], grad_out [T, n], one float dtype), optionally AdaLomo's
    ``row_scale_i · u_ij · col_scale_j`` (row_scale [n] for these rows, col_scale [d]). Stochastic rounding
    uses each element's flat index in the whole weight: the rows of a chunked update round exactly as
    ``linear_update_`` on the whole weight would with the same seed. Elements whose update is not finite keep
    their value (every backend) and, with ``nonfinite``, are counted into it. Checks before any write."""
    rule = UpdateRule.make(lr, weight_decay, coef, loss_scale, clip_value, rounding, seed, name)
    check_weight(weight, name)
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(weight.shape)}")
    if x.dim() != 2 or grad_out.dim() != 2 or x.shape[0] != grad_out.shape[0] or x.shape[1] != weight.shape[1]:
        raise ValueError(f"{name}: expected x [T, {weight.shape[1]}] and grad_out [T, n], got x{tuple(x.shape)} "
                         f"and grad_out{tuple(grad_out.shape)}")
    n = grad_out.shape[1]
    if not (0 <= row0 and row0 + n <= weight.shape[0]):
        raise ValueError(f"{name}: rows [{row0}, {row0 + n}) are outside a weight of {weight.shape[0]} rows")
    if x.dtype != grad_out.dtype:
        raise TypeError(f"{name}: x and grad_out must have one dtype, got {x.dtype} and {grad_out.dtype}")
    if (row_scale is None) != (col_scale is None):
        raise ValueError(f"{name}: give both row_scale and col_scale, or neither")
    if row_scale is not None and (row_scale.shape != (n,) or col_scale.shape != (weight.shape[1],)
                                  or row_scale.dtype != torch.float32 or col_scale.dtype != torch.float32):
        raise ValueError(f"{name}: row_scale must be float32 ({n},) and col_scale float32 ({weight.shape[1]},)")
    check_counter(nonfinite, weight, name)
    chosen = backends.resolve(backend, weight.device)
    run_op(_rows_update_op, _rows_update_impl, (weight,) + ((nonfinite,) if nonfinite is not None else ()), weight,
           int(row0), x.contiguous(), grad_out.contiguous(), row_scale, col_scale, rule.decay, rule.step,
           rule.inv_loss_scale, rule.clip_value, rule.stochastic, rule.seed, nonfinite, chosen)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The loss's options, checked (``softcap`` 0.0 = none)."""

    ignore_index: int = -100
    label_smoothing: float = 0.0
    softcap: float = 0.0
    chunk_size: int = 0
    backend: str = "torch"  # resolved (never "auto"): "triton" runs the kernels of triton_linear_cross_entropy;
    # every other backend runs the torch reference math here (its row updates go to that backend's kernels)

    @staticmethod
    def make(ignore_index=-100, label_smoothing=0.0, softcap=None, chunk_size=None, *, tokens: int, vocab: int,
             hidden: int, weight_dtype: torch.dtype, memory_budget=None, device="cpu",
             backend: str = "auto") -> "LossConfig":
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
        if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
        if softcap is not None and not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap > 0):
            raise ValueError(f"softcap must be None or a positive number, got {softcap!r}")
        if chunk_size is None:
            chunk_size = choose_chunk_size(tokens, vocab, hidden, weight_dtype, memory_budget, device)
        elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        return LossConfig(int(ignore_index), float(label_smoothing), float(softcap or 0.0),
                          int(min(chunk_size, max(vocab, 1))), backends.resolve(backend, torch.device(device)))


def check_inputs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None,
                 ignore_index: int, name: str = "lm_head"):
    """Check shapes, dtypes, devices and the label range (before anything is computed or written);
    return ``hidden`` as [T, d] and ``labels`` as int64 [T]."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{name}: weight must be a 2-D tensor [vocab, hidden]")
    check_weight(weight, name)
    vocab, d = weight.shape
    if not isinstance(hidden, torch.Tensor) or hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{name}: hidden must be a float32/bfloat16/float16 tensor")
    if hidden.shape[-1] != d:
        raise ValueError(f"{name}: hidden [..., {hidden.shape[-1]}] does not match weight [{vocab}, {d}]")
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: labels must be an int64 (or int32) tensor")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"{name}: labels{tuple(labels.shape)} must have hidden's leading shape {tuple(hidden.shape[:-1])}")
    for label, t in (("hidden", hidden), ("labels", labels), ("bias", bias)):
        if t is not None and t.device != weight.device:
            raise ValueError(f"{name}: {label} is on {t.device} but the weight is on {weight.device}")
    if bias is not None and (bias.shape != (vocab,) or not bias.is_floating_point()):
        raise ValueError(f"{name}: bias must be a float tensor of shape ({vocab},), got {tuple(bias.shape)}")
    labels1 = labels.reshape(-1).to(torch.int64)
    if labels1.numel() and not is_fake(labels1) and labels1.device.type != "meta" and not torch.compiler.is_compiling():
        bad = (labels1 != ignore_index) & ((labels1 < 0) | (labels1 >= vocab))
        if bool(bad.any()):
            value = int(labels1[bad.nonzero()[0, 0]])
            raise ValueError(f"{name}: label {value} is out of range for a vocabulary of {vocab} "
                             f"(labels must be in [0, {vocab}) or ignore_index={ignore_index}); nothing was changed")
    return hidden.reshape(-1, d), labels1


def forward(hidden2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels1: torch.Tensor,
            cfg: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ ℓ_i, lse)`` through the custom op (inputs already checked)."""
    return _forward_op(hidden2, weight, bias, labels1, cfg.ignore_index, cfg.label_smoothing, cfg.softcap,
                       cfg.chunk_size, cfg.backend)


def dlogits(hidden32: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels1: torch.Tensor,
            lse: torch.Tensor, token_coef: torch.Tensor, v0: int, v1: int, cfg: LossConfig) -> torch.Tensor:
    """One chunk's fp32 gradient of the loss with respect to the raw logits ``[T, v1−v0]`` (``hidden32``: the
    fp32 ``H``; on the triton backend ``H`` in its own dtype, read by the kernel)."""
    safe = torch.where(labels1 == cfg.ignore_index, -1, labels1)  # ignored tokens pick no column
    args = (hidden32, weight, bias, safe, lse, token_coef, v0, v1, cfg.label_smoothing, cfg.softcap, cfg.backend)
    if _plain(args[:6]):
        return _dlogits_impl(*args)
    return _dlogits_op(*args)


def _plain(tensors) -> bool:
    """Real tensors and no dispatch mode: call an op's implementation directly (no custom-op overhead)."""
    return (_get_mode() is None and not torch.compiler.is_compiling()
            and all(t is None or type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors))


def _get_mode():
    from torch.utils._python_dispatch import _get_current_dispatch_mode
    return _get_current_dispatch_mode()


def normalizer(labels1: torch.Tensor, cfg: LossConfig, num_items_in_batch) -> torch.Tensor:
    """The loss's denominator (fp32 scalar tensor): ``num_items_in_batch`` when given (transformers'
    ``reduction="sum"`` then divide), else the count of non-ignored labels; 1 where it would be 0 (then
    the summed loss is 0 too: an all-ignored batch has loss 0, not transformers' NaN)."""
    if num_items_in_batch is None:
        denom = (labels1 != cfg.ignore_index).sum().to(torch.float32)
    elif isinstance(num_items_in_batch, torch.Tensor):
        denom = num_items_in_batch.detach().to(device=labels1.device, dtype=torch.float32).reshape(())
    else:
        if not isinstance(num_items_in_batch, (int, float)) or isinstance(num_items_in_batch, bool):
            raise TypeError(f"num_items_in_batch must be None, a number or a tensor, got {num_items_in_batch!r}")
        denom = torch.tensor(float(num_items_in_batch), dtype=torch.float32, device=labels1.device)
    return torch.where(denom == 0, torch.ones_like(denom), denom)


def chunk_loop(hidden2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels1: torch.Tensor,
               lse: torch.Tensor, token_coef: torch.Tensor, cfg: LossConfig, passes, on_chunk, on_pass_end,
               need_grad_hidden: bool = True, need_grad_bias: bool = True):
    """The backward's chunk loop, shared by the ops here and ``FusedLinearCrossEntropy``.

    Pass 0 computes ``dH = Σ_c dr_c · W[c]`` (fp32) and the bias gradient, each chunk's term with the old
    ``W[c]`` *before* ``on_chunk(pass, v0, v1, h32, dr_c)`` runs for it; later passes recompute ``dr_c``
    (from the saved ``lse``) and call ``on_chunk`` again. ``on_pass_end(pass)`` runs after each pass.
    Only the last pass may write ``W``, and only rows ``[v0, v1)`` of the chunk it is called for: no
    chunk is read after its own call in that pass. Returns ``(dH fp32 [T, d] or None, db fp32 [V] or None)``.
    """
    tokens, vocab = hidden2.shape[0], weight.shape[0]
    h32 = hidden2.to(torch.float32)
    # the triton kernels read H in its own dtype (16-bit tensor-core operands, exact products); the updater
    # still gets the fp32 copy (the protocol's x)
    h_logits = hidden2 if cfg.backend == "triton" else h32
    grad_h = torch.zeros(tokens, weight.shape[1], dtype=torch.float32, device=hidden2.device) \
        if need_grad_hidden else None
    grad_b = torch.zeros(vocab, dtype=torch.float32, device=hidden2.device) \
        if need_grad_bias and bias is not None else None
    passes = tuple(passes) or (None,)
    for k, name in enumerate(passes):
        for v0 in range(0, vocab, cfg.chunk_size):
            v1 = min(v0 + cfg.chunk_size, vocab)
            dr = dlogits(h_logits, weight, bias, labels1, lse, token_coef, v0, v1, cfg)
            if k == 0:
                if grad_h is not None:
                    if cfg.backend == "triton" and not _plain((grad_h, dr, weight)):
                        _grad_hidden_op(grad_h, dr, weight, v0, cfg.backend)  # fake tensors, tracing modes
                    else:  # plain torch ops otherwise, which modes (the allocation trackers) see one by one
                        _grad_hidden_impl(grad_h, dr, weight, v0, cfg.backend)
                if grad_b is not None:
                    grad_b[v0:v1] = dr.sum(dim=0)
            if name is not None:
                on_chunk(name, v0, v1, h32, dr)
            del dr
        if name is not None:
            on_pass_end(name)
    return grad_h, grad_b


def _loss_and_coef(hidden2, weight, bias, labels1, cfg, num_items_in_batch, grad_loss):
    loss_sum, lse = forward(hidden2, weight, bias, labels1, cfg)
    denom = normalizer(labels1, cfg, num_items_in_batch)
    coef = torch.where(labels1 != cfg.ignore_index, grad_loss / denom, 0.0).to(torch.float32)
    return loss_sum / denom, lse, coef


def linear_cross_entropy_update_(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                 bias: torch.Tensor | None = None, *, lr: float, weight_decay: float = 0.0,
                                 coef: float = 1.0, loss_scale: float = 1.0, clip_value: float | None = None,
                                 rounding: str = "nearest", seed: int = 0, grad_loss: float = 1.0,
                                 ignore_index: int = -100, num_items_in_batch=None, label_smoothing: float = 0.0,
                                 softcap: float | None = None, chunk_size: int | None = None,
                                 memory_budget: int | None = None, backend: str = "auto", name: str = "lm_head"):
    """Loss, backward and the LM head's LOMO update in one call, chunk by chunk over the vocabulary.

    Returns ``(loss, grad_hidden, grad_bias)``: the mean loss (fp32 scalar; ``hidden``/``labels``
    unshifted: shift them first, or use ``fused_linear_cross_entropy(shift=True)``), and
    ``grad_loss · ∂loss/∂hidden`` (``hidden``'s dtype and shape, computed with the pre-update ``W``) and
    ``grad_loss · ∂loss/∂bias`` (fp32, or None). ``W`` gets ``linear_update_``'s rule from
    ``G = grad_loss · ∂loss/∂W`` (divided by ``loss_scale`` as usual: pass ``grad_loss = loss_scale``
    for a loss-scaled backward). Everything is checked before ``W`` is written; no ``[T, V]`` tensor
    beyond one chunk and no ``[V, d]`` tensor is built."""
    rule = UpdateRule.make(lr, weight_decay, coef, loss_scale, clip_value, rounding, seed, name)
    hidden2, labels1 = check_inputs(hidden, weight, labels, bias, ignore_index, name)
    cfg = LossConfig.make(ignore_index, label_smoothing, softcap, chunk_size, tokens=hidden2.shape[0],
                          vocab=weight.shape[0], hidden=weight.shape[1], weight_dtype=weight.dtype,
                          memory_budget=memory_budget, device=weight.device, backend=backend)
    chosen = backends.resolve(backend, weight.device)
    with torch.no_grad():
        loss, lse, token_coef = _loss_and_coef(hidden2, weight, bias, labels1, cfg, num_items_in_batch, grad_loss)

        def on_chunk(_pass, v0, v1, h32, dr):
            run_op(_rows_update_op, _rows_update_impl, (weight,), weight, v0, h32, dr, None, None, rule.decay,
                   rule.step, rule.inv_loss_scale, rule.clip_value, rule.stochastic, rule.seed, None, chosen)

        grad_h, grad_b = chunk_loop(hidden2, weight, bias, labels1, lse, token_coef, cfg, ("apply",), on_chunk,
                                    lambda _p: None)
    return loss, grad_h.to(hidden.dtype).view(hidden.shape), grad_b


def linear_cross_entropy_grad_sqnorm_(stats: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                                      labels: torch.Tensor, bias: torch.Tensor | None = None, *,
                                      loss_scale: float = 1.0, grad_loss: float = 1.0, ignore_index: int = -100,
                                      num_items_in_batch=None, label_smoothing: float = 0.0,
                                      softcap: float | None = None, chunk_size: int | None = None,
                                      memory_budget: int | None = None, backend: str = "auto",
                                      name: str = "lm_head"):
    """The norm phase of the same step: adds ``[‖G / loss_scale‖², non-finite count]`` of the LM head's
    gradient to ``stats`` (float32 (2,)), summed over chunks (exact: the chunks' rows are disjoint), and
    returns ``(loss, grad_hidden, grad_bias)`` as ``linear_cross_entropy_update_``; ``W`` is not written."""
    UpdateRule.make(0.0, loss_scale=loss_scale, name=name)
    hidden2, labels1 = check_inputs(hidden, weight, labels, bias, ignore_index, name)
    check_stats(stats, weight, name)
    cfg = LossConfig.make(ignore_index, label_smoothing, softcap, chunk_size, tokens=hidden2.shape[0],
                          vocab=weight.shape[0], hidden=weight.shape[1], weight_dtype=weight.dtype,
                          memory_budget=memory_budget, device=weight.device, backend=backend)
    with torch.no_grad():
        loss, lse, token_coef = _loss_and_coef(hidden2, weight, bias, labels1, cfg, num_items_in_batch, grad_loss)

        def on_chunk(_pass, v0, v1, h32, dr):
            linear_grad_sqnorm_(stats, weight[v0:v1], h32, dr, loss_scale=loss_scale, backend=backend, name=name)

        grad_h, grad_b = chunk_loop(hidden2, weight, bias, labels1, lse, token_coef, cfg, ("norm",), on_chunk,
                                    lambda _p: None)
    return loss, grad_h.to(hidden.dtype).view(hidden.shape), grad_b
