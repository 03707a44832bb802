"""Shared semantics of every fused update: argument checks, the update rule, stochastic rounding.

Every backend (torch reference, C++ CPU, CUDA, Triton) implements exactly the math written here.
Per element, with ``g`` the raw fp32 gradient entry (``dYᵀX`` for a linear layer):

    u     = g * inv_loss_scale
    u     = clamp(u, -clip_value, clip_value)        # NaN passes through, like torch.clamp
    w_new = w * decay - step * u                      # decay = 1 - lr*wd, step = lr*coef
    W     = round(w_new) if isfinite(round(w_new)) else W   # into W's dtype: nearest-even or stochastic

The last line is the non-finite guard: an element whose new value, *after* rounding into the weight's
dtype, is not finite (a NaN/inf gradient entry, or an overflow in the rounding) keeps its old bits,
and the update ops count such elements into an optional ``nonfinite`` counter (an int64 tensor of
shape (1,), added to on the device, no host sync). One exception: fp32 plain-SGD ``linear_update_``
calls *without* a counter take the one-GEMM shortcut (``W.addmm_``), which has no guard; the
optimizers pass a counter whenever no norm phase has checked the gradient.

which is lomo-optim's order of operations (divide by the loss scale, clip by value, scale by the
norm-clip coefficient, decay, subtract). The norm pass accumulates, per element,
``stats[0] += u*u`` (u before value clipping, as lomo-optim) and ``stats[1] += !isfinite(u)``.

Stochastic rounding (bf16/fp16 weights) is counter based, so every backend rounds identically for
a given seed: with ``i`` the element's flat index in the weight,

    r  = mix32((i mod 2**32) XOR mix32(seed))          # mix32: Wellons' "lowbias32" hash
    ur = (r >> 8) * 2**-24                             # uniform in [0, 1)
    lo, hi = the two representable neighbours of |w_new| (lo <= |w_new| < hi)
    result = sign * (hi if ur < (|w_new| - lo) / (hi - lo) else lo)

so E[result] = w_new exactly (unbiased), and a value that is representable is returned unchanged.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.autograd.graph import increment_version
from torch.utils._python_dispatch import _get_current_dispatch_mode

LOW_PRECISION = (torch.bfloat16, torch.float16)
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ROUNDINGS = ("nearest", "stochastic")
BACKENDS = ("auto", "torch", "cpu", "cuda", "triton")

_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class UpdateRule:
    """Scalars of one fused update, already folded into what the kernels consume.

    ``decay = 1 - lr*weight_decay`` and ``step = lr*coef`` are computed in float64 here, once,
    so every backend sees the same two fp32 numbers.
    """

    decay: float
    step: float
    inv_loss_scale: float = 1.0
    clip_value: float = math.inf
    stochastic: bool = False
    seed: int = 0

    @staticmethod
    def make(lr: float, weight_decay: float = 0.0, coef: float = 1.0, loss_scale: float = 1.0,
             clip_value: float | None = None, rounding: str = "nearest", seed: int = 0,
             name: str = "weight") -> "UpdateRule":
        check_update_scalars(lr, weight_decay, coef, loss_scale, clip_value, rounding, seed, name)
        return UpdateRule(decay=1.0 - lr * weight_decay, step=lr * coef,
                          inv_loss_scale=1.0 / loss_scale,
                          clip_value=math.inf if clip_value is None else float(clip_value),
                          stochastic=rounding == "stochastic", seed=int(seed))


def check_update_scalars(lr, weight_decay, coef, loss_scale, clip_value, rounding, seed, name="weight"):
    for label, v in (("lr", lr), ("weight_decay", weight_decay), ("coef", coef), ("loss_scale", loss_scale)):
        if isinstance(v, torch.Tensor):
            raise TypeError(f"{name}: {label} must be a Python number, got a tensor (call .item() once per step)")
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name}: {label} must be a finite number, got {v!r}")
    if lr < 0:
        raise ValueError(f"{name}: lr must be >= 0, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"{name}: weight_decay must be >= 0, got {weight_decay}")
    if coef < 0:
        raise ValueError(f"{name}: coef (clip coefficient) must be >= 0, got {coef}")
    if loss_scale <= 0:
        raise ValueError(f"{name}: loss_scale must be > 0, got {loss_scale}")
    if clip_value is not None and not (isinstance(clip_value, (int, float)) and clip_value > 0):
        raise ValueError(f"{name}: clip_value must be a positive number or None, got {clip_value!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"{name}: rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if not isinstance(seed, int) or not 0 <= seed <= _M32:
        raise ValueError(f"{name}: seed must be an int in [0, 2**32), got {seed!r}")


def check_weight(w: torch.Tensor, name: str = "weight") -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(w).__name__}")
    if w.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {w.dtype}")
    if not w.is_contiguous():
        raise ValueError(f"{name} must be contiguous (it is updated in place), got strides {tuple(w.stride())}")


def check_activation(t: torch.Tensor, w: torch.Tensor, label: str, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: {label} must be a tensor, got {type(t).__name__}")
    if not t.is_floating_point() or t.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"{name}: {label} must be float32, bfloat16 or float16, got {t.dtype}")
    if t.device != w.device:
        raise ValueError(f"{name}: {label} is on {t.device} but the weight is on {w.device}")
    if _overlaps(t, w):
        raise ValueError(f"{name}: {label} aliases the weight it updates; pass a separate tensor")


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False
    if a.device.type == "meta" or torch.compiler.is_compiling():
        return False
    if not (_plain(a) and _plain(b)) and (is_fake(a) or is_fake(b)):
        return False  # no storage to compare while tracing (FakeTensorMode, torch.compile)
    # storage identity and offsets rather than data pointers: fake tensors (FakeTensorMode) all have pointer 0
    if a.untyped_storage()._cdata != b.untyped_storage()._cdata:
        return False
    a0 = a.storage_offset() * a.element_size()
    b0 = b.storage_offset() * b.element_size()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def check_counter(nonfinite: torch.Tensor | None, w: torch.Tensor, name: str) -> None:
    if nonfinite is None:
        return
    if (not isinstance(nonfinite, torch.Tensor) or nonfinite.dtype != torch.int64 or nonfinite.shape != (1,)
            or nonfinite.device != w.device):
        got = (f"{nonfinite.dtype} {tuple(nonfinite.shape)} on {nonfinite.device}" if isinstance(nonfinite, torch.Tensor)
               else type(nonfinite).__name__)
        raise ValueError(f"{name}: nonfinite must be an int64 tensor of shape (1,) on {w.device} (the count of "
                         f"elements the non-finite guard kept), got {got}")


def check_stats(stats: torch.Tensor, w: torch.Tensor, name: str) -> None:
    if stats.dtype != torch.float32 or stats.shape != (2,) or stats.device != w.device:
        raise ValueError(f"{name}: stats must be a float32 tensor of shape (2,) on {w.device} "
                         f"(sum of squares, non-finite count), got {stats.dtype} {tuple(stats.shape)} on {stats.device}")


# --- the update rule in torch (the reference every backend is tested against) -------------------

def mix32(x: torch.Tensor) -> torch.Tensor:
    """Wellons' lowbias32 on int64 tensors holding uint32 values (int64 products wrap mod 2**64,
    so their low 32 bits are the uint32 products)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def mix32_int(x: int) -> int:
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def uniform_from_index(flat_index: torch.Tensor, seed: int) -> torch.Tensor:
    r = mix32((flat_index & _M32) ^ mix32_int(seed))
    return (r >> 8).to(torch.float32) * (2.0 ** -24)


def round_stochastic(v: torch.Tensor, dtype: torch.dtype, flat_index: torch.Tensor, seed: int) -> torch.Tensor:
    """Round fp32 ``v`` to ``dtype`` (bf16/fp16) as the module docstring defines."""
    near = v.to(dtype)
    mag = v.abs()
    near_mag = near.to(torch.float32).abs()
    bits = near.view(torch.int16).to(torch.int32)
    # In sign-magnitude formats, bits+1 / bits-1 step the magnitude up / down.
    lo_bits = torch.where(near_mag > mag, bits - 1, bits)
    hi_bits = lo_bits + 1
    lo = lo_bits.to(torch.int16).view(dtype)
    hi = hi_bits.to(torch.int16).view(dtype)
    lo_mag, hi_mag = lo.to(torch.float32).abs(), hi.to(torch.float32).abs()
    p = (mag - lo_mag) / (hi_mag - lo_mag)
    up = uniform_from_index(flat_index, seed) < p
    out = torch.where(up, hi, lo)
    exact_or_special = (near_mag == mag) | ~torch.isfinite(v) | ~torch.isfinite(hi_mag)
    return torch.where(exact_or_special, near, out)


def apply_rule_(w: torch.Tensor, g: torch.Tensor, rule: UpdateRule, flat_offset: int | torch.Tensor = 0,
                nonfinite: torch.Tensor | None = None) -> None:
    """Reference epilogue: update ``w`` (any float dtype, any shape) in place from fp32 ``g`` of the same shape.

    ``flat_offset`` is the flat index of ``w``'s first element in the whole weight (an int for a
    contiguous chunk, or a tensor of per-element flat indices), used only by stochastic rounding.
    An element whose rounded new value is not finite keeps its old value (the guard); with
    ``nonfinite`` (int64, shape (1,)) their count is added to it.
    """
    u = g.to(torch.float32) * rule.inv_loss_scale
    if math.isfinite(rule.clip_value):
        u = u.clamp(-rule.clip_value, rule.clip_value)
    new = w.to(torch.float32) * rule.decay - rule.step * u
    if w.dtype == torch.float32:
        out = new
    elif rule.stochastic:
        if isinstance(flat_offset, torch.Tensor):
            idx = flat_offset.reshape(new.shape).to(torch.int64)
        else:
            idx = torch.arange(flat_offset, flat_offset + new.numel(), device=w.device, dtype=torch.int64).view(new.shape)
        out = round_stochastic(new, w.dtype, idx, rule.seed)
    else:
        out = new.to(w.dtype)
    ok = torch.isfinite(out)
    w.copy_(torch.where(ok, out, w))
    if nonfinite is not None:
        nonfinite += (~ok).sum()


def accumulate_sqnorm_(stats: torch.Tensor, g: torch.Tensor, inv_loss_scale: float) -> None:
    """Reference norm pass: ``stats += [sum(u*u), count(!isfinite(u))]`` with ``u = g*inv_loss_scale``; no host sync."""
    u = g.to(torch.float32) * inv_loss_scale
    stats[0] += (u * u).sum()
    stats[1] += (~torch.isfinite(u)).sum().to(torch.float32)


@contextlib.contextmanager
def ieee_fp32_matmul():
    """Inside: torch's fp32 matmuls (cuBLAS) and convolutions (cuDNN) in full fp32, never TF32; after: the
    user's settings exactly as they were. Also a decorator.

    The torch-side GEMMs that claim fp32 accuracy (the reference backend's block GEMMs, the ghost norms)
    would otherwise follow a global ``torch.backends.cuda.matmul.allow_tf32 = True`` or
    ``torch.set_float32_matmul_precision("high")``, rounding operands to 10 mantissa bits. Set through the
    per-backend ``fp32_precision`` API: reading the legacy ``allow_tf32`` flags raises once a user has set
    the new API (torch refuses a mix), while saving and restoring ``fp32_precision`` is exact for users of
    either. The flags are process-wide: another thread's fp32 matmuls meanwhile run in full fp32 too."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = matmul.fp32_precision, cudnn.fp32_precision
    matmul.fp32_precision = cudnn.fp32_precision = "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision, cudnn.fp32_precision = saved


# --- calling a custom op's implementation directly -------------------------------------------------

_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _plain(t) -> bool:
    # a Parameter subclass (a weight held by lomo_kernels.routing, whose class says so) is a Parameter here
    # (issubclass, not isinstance: Parameter's metaclass makes isinstance a Python-level check, ~3x slower)
    return ((type(t) in _PLAIN_TYPES or issubclass(type(t), torch.nn.Parameter))
            and not torch._C._functorch.is_functorch_wrapped_tensor(t) and not torch._is_functional_tensor(t))


def run_op(op, impl, mutated: tuple[torch.Tensor, ...], *args) -> None:
    """``op(*args)`` (a ``torch.library`` custom op), or ``impl(*args)`` (its implementation) where the two
    cannot be told apart: eager mode, no dispatch mode active (fake tensors, allocation trackers), only
    plain tensors, nothing that autograd would record. The custom op's dispatch costs ~60 µs a call (a
    training step makes one per weight, twice with a norm phase); the direct call bumps the version
    counters of ``mutated`` as the op does, so autograd's checks on saved tensors still see the writes."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    direct = (not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None
              and all(_plain(t) for t in tensors)
              and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))
    if not direct:
        op(*args)
        return
    impl(*args)
    for t in mutated:
        increment_version(t)
