"""The ``triton`` backend against the torch reference and float64 math.

Without a GPU the kernels run in Triton's interpreter on CPU tensors: ``triton.jit`` picks the
interpreter when it decorates a kernel, i.e. when ``lomo_kernels.kernels.triton_update`` is imported,
so TRITON_INTERPRET=1 is set here before that import. If something imported the module earlier
without it, this module skips (run with TRITON_INTERPRET=1 in the environment, or set it in conftest).
With a GPU the same tests run on CUDA tensors with the compiled kernels, plus the larger ``gpu`` ones.
"""
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

import lomo_kernels as lk  # noqa: E402
from lomo_kernels.kernels import triton_update  # noqa: E402
from lomo_kernels.ops._common import UpdateRule  # noqa: E402
from lomo_kernels.testing import AllocationTracker  # noqa: E402

if not torch.cuda.is_available() and not triton_update.INTERPRETED:
    pytest.skip("lomo_kernels.kernels.triton_update was imported before this module set TRITON_INTERPRET=1, so "
                "its kernels were built for a GPU this machine lacks; run pytest with TRITON_INTERPRET=1 set",
                allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter evaluates every lane with numpy, which warns about inf/NaN arithmetic in lanes whose
# results are then discarded or are meant to be non-finite; the GPU does the same silently.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
LOW = (torch.bfloat16, torch.float16)

# Update options; "plain" is lr only, the others exercise each term of the rule.
OPTIONS = {
    "plain": dict(lr=0.05),
    "decay": dict(lr=0.05, weight_decay=0.3),
    "clip": dict(lr=0.05, clip_value=0.4),
    "all": dict(lr=0.02, weight_decay=0.1, coef=0.7, loss_scale=8.0, clip_value=0.3),
}


def exact_update(w: torch.Tensor, g: torch.Tensor, lr, weight_decay=0.0, coef=1.0, loss_scale=1.0,
                 clip_value=None, **_) -> torch.Tensor:
    """The update rule in float64 (NaN passes the clamp, as torch.clamp)."""
    u = g.double() / loss_scale
    if clip_value is not None:
        u = u.clamp(-clip_value, clip_value)
    return w.double() * (1 - lr * weight_decay) - lr * coef * u


def assert_within_one_ulp(actual: torch.Tensor, exact: torch.Tensor) -> None:
    """Every element of bf16/fp16 ``actual`` is ``exact`` rounded to nearest or one of its two neighbours."""
    nearest = exact.to(actual.dtype)
    bits = nearest.view(torch.int16).to(torch.int32)
    ok = (actual == nearest) | (torch.isnan(actual) & torch.isnan(nearest))
    for step in (-1, 1):
        ok |= actual == (bits + step).to(torch.int16).view(actual.dtype)
    assert bool(ok.all()), (f"{int((~ok).sum())} of {ok.numel()} elements off by more than one ulp, e.g. "
                            f"{actual[~ok][:4].tolist()} vs exact {exact[~ok][:4].tolist()}")


def assert_fp32_close(actual: torch.Tensor, exact: torch.Tensor) -> None:
    scale = float(exact[torch.isfinite(exact)].abs().max())
    torch.testing.assert_close(actual.double(), exact, rtol=1e-5, atol=1e-5 * scale, equal_nan=True)


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-identical, except that any NaN equals any NaN (payloads and signs of NaNs are not specified)."""
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan)
    assert torch.equal(actual[~nan].view(torch.uint8), expected[~nan].view(torch.uint8))


def check_rounded(actual: torch.Tensor, exact: torch.Tensor) -> None:
    if actual.dtype == torch.float32:
        assert_fp32_close(actual, exact)
    else:
        assert_within_one_ulp(actual, exact)


def bracket(exact: float, dtype: torch.dtype) -> tuple[float, float]:
    """The two ``dtype`` neighbours ``lo < exact < hi`` of a positive non-representable ``exact``."""
    nearest = torch.tensor(exact, dtype=torch.float64).to(dtype)
    other = (nearest.view(torch.int16) + (-1 if float(nearest) > exact else 1)).view(dtype)
    lo, hi = sorted((float(nearest), float(other)))
    assert lo < exact < hi
    return lo, hi


def assert_unbiased(rounded: torch.Tensor, exact: float) -> None:
    """``rounded``: many stochastic roundings of ``exact``; their mean lies within 3 standard errors."""
    lo, hi = bracket(exact, rounded.dtype)
    assert set(rounded.unique().tolist()) == {lo, hi}
    p = (exact - lo) / (hi - lo)
    std_err = (hi - lo) * math.sqrt(p * (1 - p) / rounded.numel())
    assert abs(rounded.double().mean().item() - exact) <= 3 * std_err


def dyadic(*shape, dtype, scale=0.125):
    """Small multiples of ``scale``: products and token sums are exact in fp32, whatever the summation
    order, so triton and the reference see bit-identical gradients and must round identically."""
    return (torch.randint(-6, 7, shape, device=DEVICE) * scale).to(dtype)


def both_backends(op, weight, *args, **kw):
    """Run ``op`` on copies of ``weight`` with the triton and the torch backend; returns (triton, torch)."""
    out = []
    for backend in ("triton", "torch"):
        w = weight.clone()
        op(w, *args, backend=backend, **kw)
        out.append(w)
    return out


def test_backend_info_reports_the_mode():
    info = lk.available_backends()["triton"]
    assert info.available
    assert ("interpreter on CPU tensors" in info.detail) == triton_update.INTERPRETED


# --- linear -------------------------------------------------------------------------------------

# (x shape, weight shape): odd sizes, several partial tiles, 3-D inputs, one token, several token blocks.
LINEAR_SHAPES = [((5, 77), (123, 77)), ((3, 7, 77), (33, 77)), ((1, 19), (45, 19)), ((40, 17), (33, 17))]


@pytest.mark.parametrize("x_shape,w_shape", LINEAR_SHAPES)
@pytest.mark.parametrize("option", OPTIONS)
def test_linear_update_fp32_matches_float64(x_shape, w_shape, option):
    w = torch.randn(w_shape, device=DEVICE)
    x = torch.randn(x_shape, device=DEVICE)
    dy = torch.randn(x_shape[:-1] + (w_shape[0],), device=DEVICE)
    kw = OPTIONS[option]
    g = dy.reshape(-1, w_shape[0]).double().t() @ x.reshape(-1, w_shape[1]).double()
    got, ref = both_backends(lk.linear_update_, w, x, dy, **kw)
    assert_fp32_close(got, exact_update(w, g, **kw))
    assert_fp32_close(got, ref.double())


@pytest.mark.parametrize("w_dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("x_dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_linear_update_dtypes_round_within_one_ulp(w_dtype, x_dtype, rounding):
    w = torch.randn(123, 77, device=DEVICE).to(w_dtype)
    x = torch.randn(3, 7, 77, device=DEVICE).to(x_dtype)
    dy = torch.randn(3, 7, 123, device=DEVICE).to(x_dtype)
    kw = dict(OPTIONS["all"], rounding=rounding, seed=7)
    g = dy.reshape(-1, 123).double().t() @ x.reshape(-1, 77).double()
    got, _ = both_backends(lk.linear_update_, w, x, dy, **kw)
    check_rounded(got, exact_update(w, g, **kw))


@pytest.mark.parametrize("w_dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("x_dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_linear_update_bit_identical_to_reference_on_exact_gradients(w_dtype, x_dtype, rounding):
    w = torch.randn(45, 70, device=DEVICE).to(w_dtype)
    x, dy = dyadic(21, 70, dtype=x_dtype), dyadic(21, 45, dtype=x_dtype)
    got, ref = both_backends(lk.linear_update_, w, x, dy, **OPTIONS["all"], rounding=rounding, seed=2**32 - 5)
    assert_same_bits(got, ref)


def test_linear_kernel_follows_strides():
    # The public ops pass contiguous inputs; the kernel still reads x and dy through their strides.
    w = torch.randn(50, 77, device=DEVICE).to(torch.bfloat16)
    x, dy = torch.randn(77, 19, device=DEVICE), torch.randn(50, 19, device=DEVICE)
    rule = UpdateRule.make(lr=0.1, clip_value=0.5, rounding="stochastic", seed=4)
    strided, contiguous = w.clone(), w.clone()
    triton_update.linear_update(strided, x.t(), dy.t(), rule)
    triton_update.linear_update(contiguous, x.t().contiguous(), dy.t().contiguous(), rule)
    assert torch.equal(strided, contiguous)
    assert not torch.equal(strided, w)


def test_linear_stochastic_rounding_depends_on_seed_and_is_reproducible():
    w = torch.randn(64, 48, device=DEVICE).to(torch.bfloat16)
    x, dy = torch.randn(9, 48, device=DEVICE), torch.randn(9, 64, device=DEVICE)
    runs = {seed: both_backends(lk.linear_update_, w, x, dy, lr=0.01, rounding="stochastic", seed=seed)[0]
            for seed in (1, 2)}
    again, _ = both_backends(lk.linear_update_, w, x, dy, lr=0.01, rounding="stochastic", seed=1)
    assert torch.equal(runs[1], again)
    assert not torch.equal(runs[1], runs[2])


@pytest.mark.parametrize("w_dtype", LOW)
def test_linear_stochastic_rounding_is_unbiased(w_dtype):
    # Every element gets the same exact update, so the 48*40 elements are 1920 independent roundings.
    out_f, in_f, tokens, lr = 48, 40, 2, 0.01
    w = torch.full((out_f, in_f), 1.0, device=DEVICE, dtype=w_dtype)
    x = torch.full((tokens, in_f), 0.5, device=DEVICE)
    dy = torch.full((tokens, out_f), 0.25, device=DEVICE)
    for seed in (0, 1, 99):
        got, _ = both_backends(lk.linear_update_, w, x, dy, lr=lr, rounding="stochastic", seed=seed)
        assert_unbiased(got, 1.0 - lr * tokens * 0.5 * 0.25)


def test_linear_update_without_tokens_only_decays():
    w = torch.randn(20, 30, device=DEVICE)
    x, dy = torch.randn(0, 30, device=DEVICE), torch.randn(0, 20, device=DEVICE)
    got, ref = both_backends(lk.linear_update_, w, x, dy, lr=0.1, weight_decay=0.5)
    assert torch.equal(got, ref)
    assert_fp32_close(got, w.double() * 0.95)


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_linear_update_non_finite_gradients_pass_through_clipping(w_dtype):
    w = torch.randn(33, 17, device=DEVICE).to(w_dtype)
    x, dy = dyadic(6, 17, dtype=torch.float32), dyadic(6, 33, dtype=torch.float32)
    dy[2, 4], dy[3, 9] = float("nan"), float("inf")
    got, ref = both_backends(lk.linear_update_, w, x, dy, lr=0.1, clip_value=1.0)
    assert_same_bits(got, ref)
    # the non-finite guard: row 4 (NaN gradient) keeps its old values; in row 9, inf * x is ±inf, clipped
    # to ±clip_value, where x != 0 (updated), and NaN where x == 0 (kept)
    assert torch.equal(got[4], w[4])
    assert torch.equal(got[9] != w[9], x[3] != 0)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("x_shape,w_shape", LINEAR_SHAPES)
def test_linear_grad_sqnorm(x_dtype, x_shape, w_shape):
    w = torch.empty(w_shape, device=DEVICE)
    x = torch.randn(x_shape, device=DEVICE).to(x_dtype)
    dy = torch.randn(x_shape[:-1] + (w_shape[0],), device=DEVICE).to(x_dtype)
    stats = torch.tensor([1.5, 2.0], device=DEVICE)  # accumulates onto what is there
    lk.linear_grad_sqnorm_(stats, w, x, dy, loss_scale=4.0, method="gemm", backend="triton")
    g = dy.reshape(-1, w_shape[0]).double().t() @ x.reshape(-1, w_shape[1]).double() / 4.0
    torch.testing.assert_close(stats[0].double(), 1.5 + g.square().sum(), rtol=1e-5, atol=0)
    assert stats[1].item() == 2.0


def test_linear_grad_sqnorm_counts_non_finite_entries():
    w = torch.empty(40, 30, device=DEVICE)
    x, dy = torch.randn(5, 30, device=DEVICE), torch.randn(5, 40, device=DEVICE)
    dy[1, 3] = float("inf")  # one non-finite dy entry spoils a row of G (30 entries)
    x[0, 7] = float("nan")   # and a column (40 entries, one of them shared)
    got, ref = torch.zeros(2, device=DEVICE), torch.zeros(2, device=DEVICE)
    lk.linear_grad_sqnorm_(got, w, x, dy, method="gemm", backend="triton")
    lk.linear_grad_sqnorm_(ref, w, x, dy, method="gemm", backend="torch")
    assert got[1].item() == ref[1].item() == 30 + 40 - 1
    assert got[0].isnan() and ref[0].isnan()


# --- embedding ----------------------------------------------------------------------------------

def embedding_gradient(vocab, idx, dy, padding_idx):
    g = torch.zeros(vocab, dy.shape[-1], dtype=torch.float64, device=DEVICE)
    keep = idx.reshape(-1) != (-1 if padding_idx is None else padding_idx)
    g.index_add_(0, idx.reshape(-1)[keep], dy.reshape(-1, dy.shape[-1])[keep].double())
    return g


@pytest.mark.parametrize("w_dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("option", ["plain", "decay", "all"])
def test_embedding_update(w_dtype, rounding, option):
    padding_idx = 3
    vocab, dim = 97, 45
    w = torch.randn(vocab, dim, device=DEVICE).to(w_dtype)
    idx = torch.randint(0, 12, (4, 6), device=DEVICE)  # few distinct rows: many duplicates
    idx[0, :2] = 3
    dy = torch.randn(4, 6, dim, device=DEVICE).to(w_dtype)
    kw = dict(OPTIONS[option], rounding=rounding, seed=11, padding_idx=padding_idx)
    got, ref = both_backends(lk.embedding_update_, w, idx, dy, **kw)
    check_rounded(got, exact_update(w, embedding_gradient(vocab, idx, dy, padding_idx), **kw))
    untouched = torch.ones(vocab, dtype=torch.bool, device=DEVICE)
    untouched[idx.reshape(-1)] = False
    untouched[padding_idx] = True
    if "weight_decay" not in kw:
        assert torch.equal(got[untouched], w[untouched])
    else:
        assert not torch.equal(got[untouched], w[untouched])


@pytest.mark.parametrize("w_dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_embedding_update_bit_identical_to_reference_on_exact_gradients(w_dtype, rounding):
    w = torch.randn(300, 70, device=DEVICE).to(w_dtype)
    idx = torch.randint(0, 300, (37,), device=DEVICE)
    idx[5:9] = idx[0]
    dy = dyadic(37, 70, dtype=w_dtype)
    got, ref = both_backends(lk.embedding_update_, w, idx, dy, **OPTIONS["all"], rounding=rounding, seed=5)
    assert_same_bits(got, ref)


def test_embedding_update_with_only_padding_tokens_changes_nothing():
    w = torch.randn(10, 8, device=DEVICE)
    idx = torch.full((4,), 2, device=DEVICE)
    got, _ = both_backends(lk.embedding_update_, w, idx, torch.randn(4, 8, device=DEVICE), lr=1.0, padding_idx=2)
    assert torch.equal(got, w)


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_grad_sqnorm(padding_idx):
    vocab, dim = 50, 33
    w = torch.empty(vocab, dim, device=DEVICE)
    idx = torch.randint(0, 8, (3, 9), device=DEVICE)
    dy = torch.randn(3, 9, dim, device=DEVICE)
    dy[2, 1, 5] = float("nan")
    got = torch.zeros(2, device=DEVICE)
    lk.embedding_grad_sqnorm_(got, w, idx, dy, loss_scale=2.0, padding_idx=padding_idx, backend="triton")
    g = embedding_gradient(vocab, idx, dy, padding_idx) / 2.0
    assert got[1].item() == float((~torch.isfinite(g)).sum())
    finite = torch.isfinite(g).all()
    if finite:
        torch.testing.assert_close(got[0].double(), g.square().sum(), rtol=1e-5, atol=0)
    else:
        assert got[0].isnan()


# --- dense --------------------------------------------------------------------------------------

@pytest.mark.parametrize("p_dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("g_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("option", OPTIONS)
def test_dense_update(p_dtype, g_dtype, rounding, option):
    p = torch.randn(3, 1111, device=DEVICE).to(p_dtype)  # not a multiple of the block
    g = torch.randn(3, 1111, device=DEVICE).to(g_dtype)
    g[0, 5] = float("nan")
    kw = dict(OPTIONS[option], rounding=rounding, seed=3)
    got, ref = both_backends(lk.dense_update_, p, g, **kw)
    assert torch.equal(got[0, 5], p[0, 5])  # the non-finite guard keeps the element
    expect = exact_update(p, g, **kw)
    expect[0, 5] = p[0, 5].to(expect.dtype)
    check_rounded(got, expect)
    # The update is elementwise: no summation order, so the reference's rounding is reproduced exactly.
    assert_same_bits(got, ref)


@pytest.mark.parametrize("p_dtype", LOW)
def test_dense_stochastic_rounding_is_unbiased(p_dtype):
    p = torch.full((4096,), 3.0, device=DEVICE, dtype=p_dtype)
    g = torch.full((4096,), 1.0, device=DEVICE)
    got, _ = both_backends(lk.dense_update_, p, g, lr=1e-3, rounding="stochastic", seed=1234)
    assert_unbiased(got, 3.0 - 1e-3)


@pytest.mark.parametrize("p_dtype", LOW)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_dense_update_tiny_and_special_values_match_reference(p_dtype, rounding):
    info = torch.finfo(p_dtype)
    p = torch.tensor([0.0, -0.0, info.smallest_normal, info.smallest_normal / 8, -info.smallest_normal / 2, 1.0,
                      info.max, -info.max, float("inf"), float("nan")], dtype=p_dtype, device=DEVICE)
    g = torch.tensor([info.smallest_normal / 3, -info.smallest_normal / 5, 1e-3 * info.smallest_normal,
                      -info.smallest_normal, 0.0, 2.0 ** -30, -info.max, info.max, 1.0, 0.0], device=DEVICE)
    p, g = p.repeat(50), g.repeat(50)  # 50 roundings of each
    got, ref = both_backends(lk.dense_update_, p, g, lr=0.7, rounding=rounding, seed=77)
    assert_same_bits(got, ref)


@pytest.mark.parametrize("p_dtype", LOW)
def test_stochastic_rounding_of_every_fp32_range_matches_reference_bits(p_dtype):
    """The kernels' rounding (integer / power-of-two form, no division) equals the reference's on random
    fp32 bit patterns of every exponent (subnormals, inf, NaN included) and on the edges of the format:
    with p = 0 and lr = 1 the dense update rounds exactly -g."""
    bits = torch.randint(-2 ** 31, 2 ** 31, (12000,), dtype=torch.int64).to(torch.int32)
    info = torch.finfo(p_dtype)
    edges = torch.tensor([info.max, info.tiny, info.tiny * info.eps, info.tiny * info.eps / 2, 65504.0, 65519.0,
                          65520.0, 65536.0, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26, 2.0 ** -14 * (1 - 2.0 ** -11),
                          3.3895e38, 3.3961e38, 3.4e38, 2.0 ** -133, 2.0 ** -126, 1e-45])
    edges = torch.cat([edges, edges.nextafter(torch.tensor(0.0)), edges.nextafter(torch.tensor(float("inf")))])
    g = torch.cat([bits.view(torch.float32), edges, -edges]).repeat(2).to(DEVICE)
    p = torch.zeros(g.numel(), dtype=p_dtype, device=DEVICE)
    got, ref = both_backends(lk.dense_update_, p, g, lr=1.0, rounding="stochastic", seed=2024)
    assert_same_bits(got, ref)


@pytest.mark.parametrize("g_dtype", [torch.float32, torch.float16])
def test_dense_grad_sqnorm(g_dtype):
    p = torch.empty(2500, device=DEVICE)
    g = torch.randn(2500, device=DEVICE).to(g_dtype)
    got = torch.tensor([0.5, 0.0], device=DEVICE)
    lk.dense_grad_sqnorm_(got, p, g, loss_scale=16.0, backend="triton")
    torch.testing.assert_close(got[0].double(), 0.5 + (g.double() / 16).square().sum(), rtol=1e-5, atol=0)
    assert got[1].item() == 0
    g[7], g[2000] = float("inf"), float("nan")
    lk.dense_grad_sqnorm_(got, p, g, backend="triton")
    assert got[1].item() == 2 and got[0].isnan()


# --- memory --------------------------------------------------------------------------------------

def test_no_weight_sized_temporaries():
    """torch-side allocations stay activation-sized (linear) or tokens x dim / vocab-sized ints (embedding)."""
    w = torch.randn(96, 80, device=DEVICE).to(torch.bfloat16)
    x, dy = torch.randn(8, 80, device=DEVICE), torch.randn(8, 96, device=DEVICE)
    with AllocationTracker() as linear:
        lk.linear_update_(w, x, dy, lr=0.1, clip_value=1.0, rounding="stochastic", backend="triton")
    assert all(a.nbytes <= x.nbytes + dy.nbytes for a in linear.allocations), linear.largest
    vocab, dim, tokens = 1000, 64, 21
    e = torch.randn(vocab, dim, device=DEVICE).to(torch.bfloat16)
    idx, g = torch.randint(0, vocab, (tokens,), device=DEVICE), torch.randn(tokens, dim, device=DEVICE)
    with AllocationTracker() as embedding:
        lk.embedding_update_(e, idx, g, lr=0.1, weight_decay=0.1, rounding="stochastic", backend="triton")
    assert all(a.nbytes <= max(tokens * dim * 4, vocab * 4) for a in embedding.allocations), embedding.largest


# --- the GPU build, checked without a GPU -------------------------------------------------------

# Compiles kernel variants to PTX and cubin (ptxas) for sm_80 and sm_90, in a process where
# TRITON_INTERPRET is unset so the module holds real JIT kernels; prints what each variant's PTX uses.
_GPU_BUILD_CHECK = textwrap.dedent('''
    import json
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from lomo_kernels.kernels import triton_update as tu

    assert not tu.INTERPRETED
    SCALARS = {"decay": "fp32", "step": "fp32", "inv_loss_scale": "fp32", "clip_value": "fp32", "seed_mix": "i64"}

    def ptx(kernel, arch, pointer_types, constexprs, **options):
        signature = {name: "constexpr" if name in constexprs else pointer_types.get(name, SCALARS.get(name, "i32"))
                     for name in kernel.arg_names}
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", arch, 32),
                                  options=dict(options, **tu._NO_FMA))
        text = compiled.asm["ptx"]
        return {"mma": "mma.sync" in text or "wgmma" in text, "wgmma": "wgmma" in text,
                "div": any(f"div.{kind}.f32" in text for kind in ("rn", "approx", "full")),
                "fma": "fma.rn.f32" in text}

    def linear(arch, w, x, norm_only, stochastic):
        cfg = tu._gemm_config(getattr(torch, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[x]))
        options = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
        return ptx(tu._linear_kernel, arch,
                   {"w_ptr": "*" + w, "x_ptr": "*" + x, "dy_ptr": "*" + x, "stats_ptr": "*fp32", "count_ptr": "*i64"},
                   dict(NORM_ONLY=norm_only, STOCHASTIC=stochastic, COUNT=not norm_only, DOT_IN_FP32=False,
                        DOT_PRECISION="ieee" if x == "fp32" else "tf32", **cfg), **options)

    out = {f"linear-sm{arch}-{w}-{x}-{mode}": linear(arch, w, x, mode == "norm", mode == "stochastic")
           for w, x, mode in [("bf16", "bf16", "stochastic"), ("fp16", "fp16", "nearest"),
                              ("fp32", "fp32", "nearest"), ("fp32", "bf16", "norm")]
           for arch in ((80, 90) if mode == "stochastic" else (90,))}
    out["dense-sm90-bf16-stochastic"] = ptx(
        tu._dense_kernel, 90, {"p_ptr": "*bf16", "g_ptr": "*fp32", "stats_ptr": "*fp32", "count_ptr": "*i64"},
        dict(NORM_ONLY=False, STOCHASTIC=True, COUNT=True, BLOCK=tu._DENSE_BLOCK))
    out["embedding-sm90-fp16-stochastic"] = ptx(
        tu._embedding_rows_kernel, 90,
        {"w_ptr": "*fp16", "g_ptr": "*fp32", "count_ptr": "*i64", "row_of_slot_ptr": "*i32", "slot_of_row_ptr": "*i32"},
        dict(ALL_ROWS=True, STOCHASTIC=True, COUNT=True, BLOCK_ROWS=16, BLOCK_D=256))
    print(json.dumps(out))
''')


def test_kernels_compile_for_sm80_sm90_with_tensor_cores_no_division_no_fma():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _GPU_BUILD_CHECK], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    variants = json.loads(run.stdout.strip().splitlines()[-1])
    for name, uses in variants.items():
        sixteen_bit_operands = "-bf16-bf16-" in name or "-fp16-fp16-" in name or name.endswith("-norm")
        if name.startswith("linear"):
            assert uses["mma"] == sixteen_bit_operands, name  # fp32 operands: exact "ieee" FMA dot, no tf32
        # Stochastic rounding's probability is a product by a power of two (exact); no fp32 division at all,
        # so none can be an approximate one.
        assert not uses["div"], name
        if sixteen_bit_operands or not name.startswith("linear"):
            # The epilogue rounds w*decay and step*u separately, as the reference (fp32 dots use FMA).
            assert not uses["fma"], name
    assert variants["linear-sm90-bf16-bf16-stochastic"]["wgmma"]


# --- larger shapes on a GPU ---------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_gpu_linear_update_16bit_operands(w_dtype, rounding):
    out_f, in_f, tokens = 1003, 3001, 777
    w = torch.randn(out_f, in_f, device="cuda").to(w_dtype)
    x = torch.randn(tokens, in_f, device="cuda").to(w_dtype)  # 16-bit operands straight into tl.dot
    dy = torch.randn(tokens, out_f, device="cuda").to(w_dtype)
    kw = dict(OPTIONS["all"], rounding=rounding, seed=21)
    got, _ = both_backends(lk.linear_update_, w, x, dy, **kw)
    assert_within_one_ulp(got, exact_update(w, dy.double().t() @ x.double(), **kw))
    xe, dye = dyadic(512, in_f, dtype=w_dtype), dyadic(512, out_f, dtype=w_dtype)
    got, ref = both_backends(lk.linear_update_, w, xe, dye, **kw)
    assert_same_bits(got, ref)


@pytest.mark.gpu
def test_gpu_linear_update_fp32_operands_are_not_rounded_to_tf32():
    w = torch.randn(777, 2049, device="cuda")
    x, dy = torch.randn(1025, 2049, device="cuda"), torch.randn(1025, 777, device="cuda")
    got, _ = both_backends(lk.linear_update_, w, x, dy, **OPTIONS["all"])
    assert_fp32_close(got, exact_update(w, dy.double().t() @ x.double(), **OPTIONS["all"]))


@pytest.mark.gpu
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_gpu_linear_grad_sqnorm(x_dtype):
    w = torch.empty(1500, 2500, device="cuda")
    x = torch.randn(300, 2500, device="cuda").to(x_dtype)
    dy = torch.randn(300, 1500, device="cuda").to(x_dtype)
    stats = torch.zeros(2, device="cuda")
    lk.linear_grad_sqnorm_(stats, w, x, dy, loss_scale=1024.0, method="gemm", backend="triton")
    expected = ((dy.double().t() @ x.double()) / 1024.0).square().sum()
    # 3.75M squares summed in fp32 tile by tile, then the ~240 tiles' partials in a fixed order: looser than one update.
    torch.testing.assert_close(stats[0].double(), expected, rtol=1e-4, atol=0)
    assert stats[1].item() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("option", ["plain", "all"])
def test_gpu_embedding_and_dense_match_reference_bits(option):
    w = torch.randn(32003, 1024, device="cuda").to(torch.bfloat16)
    idx = torch.randint(0, 32003, (8, 512), device="cuda")
    dy = dyadic(8, 512, 1024, dtype=torch.bfloat16)
    kw = dict(OPTIONS[option], rounding="stochastic", seed=3)
    got, ref = both_backends(lk.embedding_update_, w, idx, dy, padding_idx=0, **kw)
    assert_same_bits(got, ref)
    g = torch.randn_like(w, dtype=torch.float32)
    got, ref = both_backends(lk.dense_update_, w, g, **kw)
    assert_same_bits(got, ref)
