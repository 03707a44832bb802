"""The compiled backends (``cpu``, and ``cuda`` on a GPU machine) against the torch reference, and the
reference against float64 math, through the public ops.

The reference always runs on CPU copies of the inputs: there it sums in a fixed order, so every
comparison is deterministic. Both compiled backends run the per-element math of one header
(csrc/lomo_math.h), so wherever they see the same fp32 gradient (dense updates, and embedding
updates, whose duplicate rows all sum in token order) their results are bit-identical to the
reference, rounding included. A linear layer's gradient comes from each backend's own GEMM, whose
summation order is not the reference's: there fp32 weights agree to 1e-5 of the operands and 16-bit
weights to one ulp.
"""
from __future__ import annotations

import pytest
import torch

import lomo_kernels as lk
from lomo_kernels.backends import available_backends

_CPU = available_backends()["cpu"]
pytestmark = pytest.mark.skipif(not _CPU.available, reason=f"compiled backend not built: {_CPU.detail}")

TARGETS = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]
# (weight dtype, rounding): stochastic rounding only means something for 16-bit weights.
WEIGHT_ROUNDINGS = [
    pytest.param(torch.float32, "nearest", id="fp32"),
    pytest.param(torch.bfloat16, "nearest", id="bf16-nearest"),
    pytest.param(torch.bfloat16, "stochastic", id="bf16-stochastic"),
    pytest.param(torch.float16, "nearest", id="fp16-nearest"),
    pytest.param(torch.float16, "stochastic", id="fp16-stochastic"),
]
# Update options; with loss_scale the gradient inputs are scaled up by it, so clip_value binds.
OPTIONS = [
    pytest.param(dict(lr=0.05), id="plain"),
    pytest.param(dict(lr=0.05, weight_decay=0.1, coef=0.7, loss_scale=1024.0, clip_value=0.5, seed=12345),
                 id="wd-coef-scale-clip"),
]
FP32_RTOL = 1e-5


def _device(target: str) -> torch.device:
    info = available_backends()[target]
    if not info.available:
        pytest.skip(f"backend {target!r} is {info}")
    return torch.device(target)


def _run(target: str, op, weight: torch.Tensor, *inputs: torch.Tensor, **kwargs):
    """``op`` on fresh copies of ``weight`` with ``backend=target`` and with the reference on CPU;
    both results returned on CPU."""
    device = _device(target)
    native = weight.clone().to(device)
    op(native, *(t.to(device) for t in inputs), backend=target, **kwargs)
    reference = weight.clone()
    op(reference, *inputs, backend="torch", **kwargs)
    return native.cpu(), reference


def _scale_inputs(options: dict, *grads: torch.Tensor):
    scale = options.get("loss_scale", 1.0)
    return tuple(g * scale for g in grads)


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """16-bit floats as integers in value order (±0 both 0), so neighbouring values differ by 1."""
    bits = t.view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def _max(t: torch.Tensor, empty: float) -> float:
    return float(t.max()) if t.numel() else empty


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    int_type = {4: torch.int32, 2: torch.int16}[actual.element_size()]
    same = (actual.view(int_type) == expected.view(int_type)) | (actual.isnan() & expected.isnan())
    if not bool(same.all()):
        where = (~same).nonzero()[0].tolist()
        raise AssertionError(f"{int((~same).sum())} of {same.numel()} elements differ in their bits; first at "
                             f"{where}: {actual[tuple(where)].item()!r} vs {expected[tuple(where)].item()!r}")


def assert_within_ulps(actual: torch.Tensor, exact: torch.Tensor, slack: torch.Tensor | None = None) -> None:
    """``actual`` (bf16/fp16) is within one step of ``exact`` (float64) rounded to its dtype; with
    ``slack``, of any value within ``slack`` of ``exact`` (the fp32 intermediates' own error, which
    matters where the update cancels to near zero and the 16-bit step is tiny)."""
    slack = torch.zeros_like(exact) if slack is None else slack
    below = _ordered((exact - slack).to(actual.dtype)) - 1
    above = _ordered((exact + slack).to(actual.dtype)) + 1
    got = _ordered(actual)
    outside = (got < below) | (got > above)
    assert not bool(outside.any()), f"{int(outside.sum())} elements beyond one ulp"


def assert_close_fp32(actual: torch.Tensor, exact: torch.Tensor, scale: torch.Tensor) -> None:
    """|actual - exact| <= FP32_RTOL * scale elementwise, ``scale`` the size of the terms summed."""
    excess = (actual.double() - exact).abs() - FP32_RTOL * scale
    assert _max(excess, -1.0) <= 0.0, f"fp32 error beyond rtol {FP32_RTOL} of the operands"


def exact_update(w: torch.Tensor, g: torch.Tensor, g_abs: torch.Tensor, lr: float, weight_decay: float = 0.0,
                 coef: float = 1.0, loss_scale: float = 1.0, clip_value: float | None = None, **_):
    """The update in float64 from float64 gradient ``g``, and the magnitude of its terms (``g_abs``
    bounds the gradient's own summands) for a relative tolerance."""
    u = g / loss_scale
    if clip_value is not None:
        u = u.clamp(-clip_value, clip_value)
    decay, step = 1.0 - lr * weight_decay, lr * coef
    w64 = w.double()
    return w64 * decay - step * u, w64.abs() * decay + step * g_abs / loss_scale


def check_against_exact(result: torch.Tensor, w0: torch.Tensor, g: torch.Tensor, g_abs: torch.Tensor,
                        options: dict) -> None:
    exact, scale = exact_update(w0, g, g_abs, **options)
    if result.dtype == torch.float32:
        assert_close_fp32(result, exact, scale)
    else:
        # nearest: the rounded exact value or (at a rounding boundary) its neighbour; stochastic: one
        # of the two neighbours of the exact value.
        assert_within_ulps(result, exact, FP32_RTOL * scale)


def assert_matches_reference(result: torch.Tensor, reference: torch.Tensor, scale: torch.Tensor) -> None:
    """Agreement up to the weight gradient's summation order (the GEMM's blocking is the backend's own)."""
    if result.dtype == torch.float32:
        assert_close_fp32(result, reference.double(), scale)
    else:
        assert_within_ulps(result, reference.double(), FP32_RTOL * scale)


# ---- linear ---------------------------------------------------------------------------------------

LINEAR_SHAPES = [  # (token shape, out_features, in_features)
    pytest.param((5,), 123, 77, id="5x123x77"),
    pytest.param((3, 7), 64, 33, id="3d-3x7x64x33"),
    pytest.param((1,), 17, 300, id="1-token"),
    pytest.param((0,), 9, 13, id="0-tokens"),
    pytest.param((2, 50), 130, 1025, id="3-row-blocks"),  # 130x1025 spans three GEMM blocks of 2**16
]


def _linear_inputs(tokens, out_f, in_f, w_dtype, act_dtype, options):
    w = torch.randn(out_f, in_f).to(w_dtype)
    x = torch.randn(*tokens, in_f).to(act_dtype)
    (dy,) = _scale_inputs(options, torch.randn(*tokens, out_f))
    return w, x, dy.to(act_dtype)


def _linear_gradient(x: torch.Tensor, dy: torch.Tensor):
    x64, dy64 = x.reshape(-1, x.shape[-1]).double(), dy.reshape(-1, dy.shape[-1]).double()
    return dy64.t() @ x64, dy64.abs().t() @ x64.abs()


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("w_dtype, rounding", WEIGHT_ROUNDINGS)
@pytest.mark.parametrize("tokens, out_f, in_f", LINEAR_SHAPES)
def test_linear_update(tokens, out_f, in_f, w_dtype, rounding, options, target):
    w, x, dy = _linear_inputs(tokens, out_f, in_f, w_dtype, torch.float32, options)
    result, reference = _run(target, lk.linear_update_, w, x, dy, rounding=rounding, **options)
    g, g_abs = _linear_gradient(x, dy)
    _, scale = exact_update(w, g, g_abs, **options)
    assert_matches_reference(result, reference, scale)
    check_against_exact(reference, w, g, g_abs, options)
    check_against_exact(result, w, g, g_abs, options)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float16], ids=["bf16-act", "fp16-act"])
@pytest.mark.parametrize("w_dtype, rounding", WEIGHT_ROUNDINGS)
def test_linear_update_low_precision_activations(w_dtype, rounding, act_dtype, target):
    options = dict(lr=0.05, weight_decay=0.1, clip_value=2.0, seed=7)
    w, x, dy = _linear_inputs((4, 6), 70, 45, w_dtype, act_dtype, options)
    result, reference = _run(target, lk.linear_update_, w, x, dy, rounding=rounding, **options)
    g, g_abs = _linear_gradient(x, dy)
    _, scale = exact_update(w, g, g_abs, **options)
    assert_matches_reference(result, reference, scale)
    check_against_exact(result, w, g, g_abs, options)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("act_dtype", [torch.float32, torch.bfloat16], ids=["fp32-act", "bf16-act"])
@pytest.mark.parametrize("tokens, out_f, in_f", LINEAR_SHAPES)
def test_linear_grad_sqnorm(tokens, out_f, in_f, act_dtype, target):
    device = _device(target)
    loss_scale = 64.0
    w, x, dy = _linear_inputs(tokens, out_f, in_f, torch.float32, act_dtype, dict(loss_scale=loss_scale))
    start = torch.tensor([1.5, 2.0])
    stats = {}
    for backend, dev in ((target, device), ("torch", torch.device("cpu"))):
        s = start.clone().to(dev)
        lk.linear_grad_sqnorm_(s, w.to(dev), x.to(dev), dy.to(dev), loss_scale=loss_scale, method="gemm",
                               backend=backend)
        stats[backend] = s.cpu()
    g, _ = _linear_gradient(x, dy)
    exact = 1.5 + float(((g / loss_scale) ** 2).sum())
    for s in stats.values():
        assert s[0].item() == pytest.approx(exact, rel=FP32_RTOL)
        assert s[1].item() == 2.0


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("poison", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_linear_grad_sqnorm_counts_nonfinite(poison, target):
    device = _device(target)
    x, dy = torch.randn(6, 40), torch.randn(6, 24)
    x[2, 5] = poison  # poisons column 5 of G: 24 entries
    dy[4, 7] = poison  # poisons row 7 of G: 40 entries, one shared with column 5
    w = torch.empty(24, 40)
    counts = {}
    for backend, dev in ((target, device), ("torch", torch.device("cpu"))):
        s = torch.zeros(2, device=dev)
        lk.linear_grad_sqnorm_(s, w.to(dev), x.to(dev), dy.to(dev), method="gemm", backend=backend)
        counts[backend] = s[1].item()
        assert not torch.isfinite(s[0])
    assert counts[target] == counts["torch"] == 24 + 40 - 1


# ---- dense ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("g_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32-g", "bf16-g", "fp16-g"])
@pytest.mark.parametrize("p_dtype, rounding", WEIGHT_ROUNDINGS)
def test_dense_update_bitwise_with_special_values(p_dtype, rounding, g_dtype, target):
    options = dict(lr=0.01, weight_decay=0.1, coef=0.9, loss_scale=2.0, clip_value=3.0, seed=2**32 - 1)
    p = (torch.randn(3, 1001) * 4).to(p_dtype)
    g = (torch.randn(3, 1001) * 10).to(g_dtype)
    g[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])
    p[1, :3] = torch.tensor([float("inf"), float("nan"), 0.0])
    p[2, :2] = torch.tensor([torch.finfo(p_dtype).max, torch.finfo(p_dtype).tiny])  # largest and smallest normal
    result, reference = _run(target, lk.dense_update_, p, g, rounding=rounding, **options)
    assert_bitwise(result, reference)
    finite = torch.isfinite(p) & torch.isfinite(g)
    finite[2, :2] = False  # rounding may legitimately overflow at max
    g64 = g.double()
    check_against_exact(result[finite], p[finite], g64[finite], g64[finite].abs(), options)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("g_dtype", [torch.float32, torch.float16], ids=["fp32-g", "fp16-g"])
def test_dense_grad_sqnorm(g_dtype, target):
    device = _device(target)
    g = (torch.randn(4097) * 3).to(g_dtype)
    g[[3, 100, 4000]] = torch.tensor([float("inf"), float("nan"), -float("inf")]).to(g_dtype)
    clean = g.clone()
    clean[[3, 100, 4000]] = 0
    p = torch.empty(4097)
    results = {}
    for backend, dev in ((target, device), ("torch", torch.device("cpu"))):
        for name, grad in (("poisoned", g), ("clean", clean)):
            s = torch.tensor([0.25, 1.0], device=dev)
            lk.dense_grad_sqnorm_(s, p.to(dev), grad.to(dev), loss_scale=4.0, backend=backend)
            results[backend, name] = s.cpu()
    exact = 0.25 + float(((clean.double() / 4.0) ** 2).sum())
    for backend in (target, "torch"):
        assert results[backend, "clean"][0].item() == pytest.approx(exact, rel=FP32_RTOL)
        assert results[backend, "clean"][1].item() == 1.0
        assert results[backend, "poisoned"][1].item() == 1.0 + 3
        assert not torch.isfinite(results[backend, "poisoned"][0])


# ---- embedding ------------------------------------------------------------------------------------

def _embedding_inputs(vocab, dim, token_shape, padding_idx, w_dtype, dy_dtype):
    w = torch.randn(vocab, dim).to(w_dtype)
    idx = torch.randint(0, vocab, token_shape)  # vocab < tokens: many duplicates
    if idx.numel() >= 3:  # a duplicate pair and (if any) the padding row, for sure
        idx.view(-1)[:3] = torch.tensor([2, 2, 3 if padding_idx is None else padding_idx % vocab])
    return w, idx, (torch.randn(*token_shape, dim) * 8).to(dy_dtype)


def _embedding_gradient(w, idx, dy, padding_idx):
    """Float64 row gradients of the whole table (padding row zero), and the sums of |dy|."""
    flat_idx, dy64 = idx.reshape(-1), dy.reshape(-1, w.shape[1]).double()
    keep = flat_idx != (-1 if padding_idx is None else padding_idx % w.shape[0])
    g = torch.zeros(w.shape, dtype=torch.float64).index_add_(0, flat_idx[keep], dy64[keep])
    g_abs = torch.zeros(w.shape, dtype=torch.float64).index_add_(0, flat_idx[keep], dy64[keep].abs())
    return g, g_abs


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("padding_idx", [None, 3, -1], ids=["no-pad", "pad3", "pad-last"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01], ids=["no-wd", "wd"])
@pytest.mark.parametrize("w_dtype, rounding", WEIGHT_ROUNDINGS)
def test_embedding_update(w_dtype, rounding, weight_decay, padding_idx, target):
    options = dict(lr=0.1, weight_decay=weight_decay, coef=0.8, loss_scale=8.0, clip_value=4.0, seed=99)
    w, idx, dy = _embedding_inputs(50, 19, (4, 30), padding_idx, w_dtype, torch.float32)
    result, reference = _run(target, lk.embedding_update_, w, idx, dy, padding_idx=padding_idx, rounding=rounding,
                             **options)
    assert_bitwise(result, reference)
    g, g_abs = _embedding_gradient(w, idx, dy, padding_idx)
    check_against_exact(result, w, g, g_abs, options)
    if weight_decay == 0.0:  # untouched rows (the padding row among them) stay bit for bit
        untouched = (g_abs == 0).all(1)
        assert_bitwise(result[untouched], w[untouched])


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("token_shape", [(0,), (1,), (3, 5, 7)], ids=["0-tokens", "1-token", "3d-indices"])
def test_embedding_update_shapes_and_bf16_grad(token_shape, target):
    options = dict(lr=0.1, weight_decay=0.05, rounding="stochastic", seed=3)
    w, idx, dy = _embedding_inputs(40, 33, token_shape, 5, torch.bfloat16, torch.bfloat16)
    result, reference = _run(target, lk.embedding_update_, w, idx, dy, padding_idx=5, **options)
    assert_bitwise(result, reference)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("padding_idx", [None, 3], ids=["no-pad", "pad3"])
def test_embedding_grad_sqnorm(padding_idx, target):
    device = _device(target)
    w, idx, dy = _embedding_inputs(50, 19, (4, 30), padding_idx, torch.float32, torch.float32)
    results = {}
    for backend, dev in ((target, device), ("torch", torch.device("cpu"))):
        s = torch.tensor([0.5, 0.0], device=dev)
        lk.embedding_grad_sqnorm_(s, w.to(dev), idx.to(dev), dy.to(dev), loss_scale=2.0, padding_idx=padding_idx,
                                  backend=backend)
        results[backend] = s.cpu()
    g, _ = _embedding_gradient(w, idx, dy, padding_idx)
    exact = 0.5 + float(((g / 2.0) ** 2).sum())
    for s in results.values():
        assert s[0].item() == pytest.approx(exact, rel=FP32_RTOL)
        assert s[1].item() == 0.0
    # a non-finite entry poisons the summed gradient of its row in that column only
    dy[1, 4, 6] = float("nan")
    s = torch.zeros(2, device=device)
    lk.embedding_grad_sqnorm_(s, w.to(device), idx.to(device), dy.to(device), padding_idx=padding_idx, backend=target)
    expected = 0.0 if padding_idx is not None and int(idx[1, 4]) == padding_idx else 1.0
    assert s[1].item() == expected


# ---- stochastic rounding: unbiased ----------------------------------------------------------------

def _values_between_neighbours(dtype: torch.dtype, fractions: torch.Tensor):
    """Representable ``lo`` values (both signs) and exact fp32 targets ``lo + f·(hi - lo)`` away from zero."""
    lo = torch.tensor([0.3, -1.7, 5.1, -0.011, 100.3, -7e-3, 2.5, -33.0]).to(dtype)
    hi = (lo.view(torch.int16) + 1).view(dtype)  # one step up in magnitude
    target = lo.float() + fractions * (hi.float() - lo.float())
    return lo, hi, target


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_stochastic_rounding_is_unbiased(dtype, target):
    """Mean of 4096 roundings (one per element index) and of 1000 roundings of one element (one per
    seed) each lies within 3 standard errors of the exact fp32 update."""
    device = _device(target)
    fractions = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9, 0.33, 0.6, 0.05])
    lo, hi, exact = _values_between_neighbours(dtype, fractions)
    lr = 0.5
    grad = (lo.float() - exact) / lr  # lo - lr*grad == exact (up to fp32 rounding, far below the SE)

    def check_mean(samples: torch.Tensor):
        n = samples.shape[1]
        spacing = (hi.double() - lo.double()).abs()
        standard_error = spacing * torch.sqrt(fractions.double() * (1 - fractions.double()) / n)
        deviation = (samples.double().mean(1) - exact.double()).abs()
        assert bool((deviation <= 3 * standard_error).all()), (deviation / standard_error).tolist()
        assert bool(((samples == lo[:, None]) | (samples == hi[:, None])).all())  # only the two neighbours

    reps = 4096
    p = lo.repeat_interleave(reps).to(device)
    lk.dense_update_(p, grad.repeat_interleave(reps).to(device), lr=lr, rounding="stochastic", seed=2024,
                     backend=target)
    check_mean(p.cpu().view(-1, reps))

    seeds = 1000
    per_seed = torch.empty(lo.numel(), seeds, dtype=dtype)
    grad_d = grad.to(device)
    for seed in range(seeds):
        q = lo.clone().to(device)
        lk.dense_update_(q, grad_d, lr=lr, rounding="stochastic", seed=seed, backend=target)
        per_seed[:, seed] = q.cpu()
    check_mean(per_seed)


# ---- the compiled ops themselves ------------------------------------------------------------------

def test_backend_info():
    assert _CPU.available and "C++" in _CPU.detail
    cuda = available_backends()["cuda"]
    if not cuda.available:
        assert cuda.detail.startswith(("built without CUDA", "no CUDA driver", "no CUDA device", "the GPU is sm_"))


def test_compiled_op_rejects_bad_shapes_before_writing():
    w = torch.randn(8, 5)
    before = w.clone()
    with pytest.raises(RuntimeError, match="expected x"):
        torch.ops.lomo_kernels_C.linear_update(w, torch.randn(3, 6), torch.randn(3, 8), 1.0, 0.1, 1.0, 1.0, False, 0, None, 0)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        torch.ops.lomo_kernels_C.dense_update(w, torch.ones(8, 5, dtype=torch.float64), 1.0, 0.1, 1.0, 1.0, False, 0, None, 0)
    assert_bitwise(w, before)


# ---- 16-bit GEMMs, vectorized epilogues, the compiled ghost norm (issue 16) ------------------------
#
# The cpu backend computes its block GEMMs from bf16/fp16 activations directly: MKL's 16-bit GEMMs
# with fp32 output where torch's MKL has them ("mkl"), else per token chunk converted to fp32
# scratch ("convert"); LOMO_CPU_LOWP_GEMM forces one. Its epilogues run 16 lanes at a time where the
# CPU has AVX-512, 8 where it has AVX2 + FMA (LOMO_CPU_SIMD=avx2 caps at AVX2, LOMO_CPU_SIMD=0 forces the
# scalar lomo_math.h loop); all must give the same bits.

GEMM_MODES = ["mkl", "convert"]
SIMD = [pytest.param("1", id="widest"), pytest.param("avx2", id="avx2"), pytest.param("0", id="scalar")]
SIMD_MODES = ("1", "avx2", "0")
ODD_LINEAR_SHAPES = [  # fresh odd shapes: partial SIMD vectors, several row blocks, several token chunks
    pytest.param((7, 3), 37, 129, id="21x37x129"),
    pytest.param((1,), 300, 1031, id="1-token-2-row-blocks"),
    pytest.param((613,), 45, 61, id="613-tokens"),
    pytest.param((0,), 33, 17, id="0-tokens"),
]


def _gemm_mode(monkeypatch, mode: str) -> None:
    monkeypatch.setenv("LOMO_CPU_LOWP_GEMM", mode)
    probe = torch.zeros(2)
    try:  # "mkl" raises when this torch's MKL has no 16-bit GEMM
        lk.linear_grad_sqnorm_(probe, torch.empty(2, 2), torch.ones(1, 2, dtype=torch.bfloat16),
                               torch.ones(1, 2, dtype=torch.bfloat16), method="gemm", backend="cpu")
    except RuntimeError as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("mode", GEMM_MODES)
@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float16], ids=["bf16-act", "fp16-act"])
@pytest.mark.parametrize("w_dtype, rounding", WEIGHT_ROUNDINGS)
@pytest.mark.parametrize("tokens, out_f, in_f", ODD_LINEAR_SHAPES)
def test_linear_update_16bit_gemm(tokens, out_f, in_f, w_dtype, rounding, act_dtype, mode, monkeypatch):
    """Tolerance: fp32 weights within 1e-5 of the operands' magnitudes, 16-bit weights within one ulp
    of the float64 update (the GEMM sums exact products of the 16-bit operands in fp32)."""
    _gemm_mode(monkeypatch, mode)
    torch.manual_seed(hash((tokens, out_f, in_f, mode)) % 2**31)
    options = dict(lr=0.05, weight_decay=0.1, coef=0.7, loss_scale=64.0, clip_value=0.5, seed=4242)
    w, x, dy = _linear_inputs(tokens, out_f, in_f, w_dtype, act_dtype, options)
    result, reference = _run("cpu", lk.linear_update_, w, x, dy, rounding=rounding, **options)
    g, g_abs = _linear_gradient(x, dy)
    _, scale = exact_update(w, g, g_abs, **options)
    assert_matches_reference(result, reference, scale)
    check_against_exact(result, w, g, g_abs, options)


@pytest.mark.parametrize("w_dtype, rounding", WEIGHT_ROUNDINGS)
@pytest.mark.parametrize("act_dtype", [torch.float32, torch.bfloat16], ids=["fp32-act", "bf16-act"])
def test_simd_epilogue_is_bitwise_the_scalar_one(w_dtype, rounding, act_dtype, monkeypatch):
    """Same GEMM, so the same fp32 gradient: the AVX-512, AVX2 and scalar epilogues agree bit for bit,
    special values (inf/nan activations, a weight at the format's largest value) and the count of
    guarded elements included."""
    torch.manual_seed(16)
    w = (torch.randn(83, 77) * 3).to(w_dtype)
    w[0, :3] = torch.tensor([float("inf"), float("nan"), torch.finfo(w_dtype).max])
    x = torch.randn(9, 77).to(act_dtype)
    dy = (torch.randn(9, 83) * 40).to(act_dtype)
    x[4, 10] = float("nan")
    dy[2, 50] = float("inf")
    results = {}
    for simd in SIMD_MODES:
        monkeypatch.setenv("LOMO_CPU_SIMD", simd)
        for clip in (None, 0.25):
            out, count = w.clone(), torch.zeros(1, dtype=torch.int64)
            lk.linear_update_(out, x, dy, lr=0.03, weight_decay=0.2, coef=0.9, loss_scale=8.0, clip_value=clip,
                              rounding=rounding, seed=77, backend="cpu", nonfinite=count)
            results[simd, clip] = out, int(count)
    for clip in (None, 0.25):
        assert results["0", clip][1] > 0
        for simd in SIMD_MODES:
            assert_bitwise(results[simd, clip][0], results["0", clip][0])
            assert results[simd, clip][1] == results["0", clip][1]


@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("g_dtype", [torch.float32, torch.bfloat16], ids=["fp32-g", "bf16-g"])
@pytest.mark.parametrize("p_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_dense_update_bitwise_every_epilogue(p_dtype, g_dtype, simd, monkeypatch):
    """4099 elements: a tail after the last 8 or 16 lanes; the NaN gradient stays NaN through the
    clipping and its element is guarded (counted, old bits kept), the infinite ones are clipped."""
    monkeypatch.setenv("LOMO_CPU_SIMD", simd)
    options = dict(lr=0.02, weight_decay=0.05, coef=1.3, loss_scale=4.0, clip_value=1.5, seed=31337)
    p = (torch.randn(4099) * 2).to(p_dtype)
    g = (torch.randn(4099) * 9).to(g_dtype)
    g[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")]).to(g_dtype)
    for rounding in ("nearest", "stochastic"):
        counts = [torch.zeros(1, dtype=torch.int64) for _ in range(2)]
        result, reference = p.clone(), p.clone()
        lk.dense_update_(result, g, rounding=rounding, backend="cpu", nonfinite=counts[0], **options)
        lk.dense_update_(reference, g, rounding=rounding, backend="torch", nonfinite=counts[1], **options)
        assert_bitwise(result, reference)
        assert int(counts[0]) == int(counts[1]) >= 1


@pytest.mark.parametrize("poison", [None, float("inf"), float("nan")], ids=["finite", "inf", "nan"])
def test_norm_sums_at_every_simd_width(poison, monkeypatch):
    """The norm passes' sums in double: the vector code keeps 16 partial sums at either width, so
    AVX-512 and AVX2 agree bit for bit; the scalar loop sums in order (equal within rounding). Non-finite
    counts are exact everywhere. Sizes leave tails after the last 16 elements."""
    torch.manual_seed(5)
    x, dy, grad = torch.randn(45, 77), torch.randn(45, 83), torch.randn(4099) * 3  # ghost: dots of up to 44
    if poison is not None:
        x[3, 5], grad[7] = poison, poison
    results = {}
    for simd in SIMD_MODES:
        monkeypatch.setenv("LOMO_CPU_SIMD", simd)
        stats = [torch.zeros(2) for _ in range(3)]
        lk.dense_grad_sqnorm_(stats[0], torch.empty(4099), grad, loss_scale=2.0, backend="cpu")
        for s, method in zip(stats[1:], ("gemm", "ghost")):
            lk.linear_grad_sqnorm_(s, torch.empty(83, 77), x, dy, loss_scale=2.0, method=method, backend="cpu")
        results[simd] = torch.stack(stats)
    assert_bitwise(results["1"], results["avx2"])
    assert torch.equal(results["avx2"][:, 1], results["0"][:, 1])
    if poison is None:
        assert torch.allclose(results["avx2"], results["0"], rtol=1e-6, atol=0)
    else:
        assert bool((results["0"][:, 1] >= 1).all()) and not bool(results["avx2"][:, 0].isfinite().any())


@pytest.mark.parametrize("mode", GEMM_MODES)
@pytest.mark.parametrize("act_dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32-act", "bf16-act", "fp16-act"])
@pytest.mark.parametrize("tokens, out_f, in_f", [((5,), 123, 77), ((3, 7), 64, 33), ((600,), 9, 13), ((1,), 4, 3)],
                         ids=["5x123x77", "21x64x33", "600-tokens-2-token-blocks", "1-token"])
def test_linear_grad_sqnorm_ghost_compiled(tokens, out_f, in_f, act_dtype, mode, monkeypatch):
    """The compiled ghost pass (lower triangles of the Gram matrices) and the compiled GEMM pass
    against float64, relative 1e-5 (the reference's ghost pass too)."""
    _gemm_mode(monkeypatch, mode)
    loss_scale = 16.0
    w, x, dy = _linear_inputs(tokens, out_f, in_f, torch.float32, act_dtype, dict(loss_scale=loss_scale))
    g, _ = _linear_gradient(x, dy)
    exact = 0.75 + float(((g / loss_scale) ** 2).sum())
    for backend, method in (("cpu", "ghost"), ("cpu", "gemm"), ("torch", "ghost")):
        s = torch.tensor([0.75, 3.0])
        lk.linear_grad_sqnorm_(s, w, x, dy, loss_scale=loss_scale, method=method, backend=backend)
        assert s[0].item() == pytest.approx(exact, rel=FP32_RTOL), (backend, method)
        assert s[1].item() == 3.0


@pytest.mark.parametrize("act_dtype", [torch.float32, torch.bfloat16], ids=["fp32-act", "bf16-act"])
@pytest.mark.parametrize("poison", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_linear_grad_sqnorm_ghost_compiled_counts_nonfinite_once(poison, act_dtype):
    x, dy = torch.randn(6, 40).to(act_dtype), torch.randn(6, 24).to(act_dtype)
    x[2, 5] = poison
    s = torch.zeros(2)
    lk.linear_grad_sqnorm_(s, torch.empty(24, 40), x, dy, method="ghost", backend="cpu")
    assert not torch.isfinite(s[0]) and s[1].item() == 1.0


@pytest.mark.parametrize("mode", GEMM_MODES)
def test_bf16_linear_update_scratch_is_one_block(mode, monkeypatch):
    """No fp32 copy of the activations: a fused bf16 update of a 1376x512 weight from 4096 tokens
    allocates its 1 MiB GEMM block (and, converting, at most another block of token chunks), not
    the 30 MiB an fp32 copy of x and dy takes."""
    from lomo_kernels.memory.tracker import peak_bytes_profiled
    _gemm_mode(monkeypatch, mode)
    w = torch.randn(1376, 512, dtype=torch.bfloat16)
    x, dy = torch.randn(4096, 512, dtype=torch.bfloat16), torch.randn(4096, 1376, dtype=torch.bfloat16)
    for clip in (None, 0.01):
        peak = peak_bytes_profiled(lambda: lk.linear_update_(w, x, dy, lr=1e-3, clip_value=clip,
                                                             rounding="stochastic", backend="cpu"))
        blocks = 1 if mode == "mkl" else 2
        assert peak <= blocks * (1 << 20) + (64 << 10), peak


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_bf16_rounding_of_arbitrary_fp32_bits(rounding, monkeypatch):
    """Rounding every class of fp32 value into bf16 (random bit patterns: subnormals, binade edges,
    values next to the largest bf16 and to infinity, inf, nan): the vector epilogues (division-free
    stochastic rounding; AVX-512 and AVX2), the scalar one and the torch reference agree bit for bit. The update
    0 - 1·(-v) is v exactly, so each element rounds v itself."""
    g = torch.Generator().manual_seed(2026)
    bits = torch.randint(-2**31, 2**31 - 1, (20011,), generator=g, dtype=torch.int64).to(torch.int32)
    v = bits.view(torch.float32).clone()
    edges = torch.tensor([0x7F7F0000, 0x7F7F8000, 0x7F7FFFFF, 0x7F800000, 0x00000001, 0x007FFFFF, 0x00800000,
                          0x3F80FFFF, 0x3F7FFFFF, 0x00008000, 0x0000FFFF], dtype=torch.int64).to(torch.int32)
    v[:edges.numel()] = edges.view(torch.float32)
    v[edges.numel():2 * edges.numel()] = -edges.view(torch.float32)
    w = torch.zeros(v.numel(), dtype=torch.bfloat16)
    reference = w.clone()
    lk.dense_update_(reference, -v, lr=1.0, rounding=rounding, seed=99, backend="torch")
    for simd in SIMD_MODES:
        monkeypatch.setenv("LOMO_CPU_SIMD", simd)
        p = w.clone()
        lk.dense_update_(p, -v, lr=1.0, rounding=rounding, seed=99, backend="cpu")
        assert_bitwise(p, reference)


def test_bf16_stochastic_rounding_where_the_uniform_equals_p(monkeypatch):
    """The edge of the vector epilogues' integer test (r >> 8) < (low16 << 8): elements built so that
    their uniform equals p = (|v| - lo)/(hi - lo) exactly round down (the scalar `uniform < p` fails)
    in every epilogue, as in the reference. Random inputs meet this case once in 2**24 elements."""
    from lomo_kernels.ops._common import mix32, mix32_int
    seed, n = 99, 1 << 15
    g = torch.Generator().manual_seed(7)
    r24 = mix32(torch.arange(n) ^ mix32_int(seed)) >> 8  # the uniforms of the flat indices, times 2**24
    edge = (r24 & 0xFF) == 0  # p = low16 * 2**-16 can equal r24 * 2**-24 only here
    low16 = torch.where(edge, r24 >> 8, torch.randint(0, 1 << 16, (n,), generator=g))
    upper = (0x3F80 + torch.randint(0, 0x100, (n,), generator=g)) | (torch.randint(0, 2, (n,), generator=g) << 15)
    bits = (upper << 16) | low16
    v = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)
    w = torch.zeros(n, dtype=torch.bfloat16)
    reference = w.clone()
    lk.dense_update_(reference, -v, lr=1.0, rounding="stochastic", seed=seed, backend="torch")
    truncated = torch.where(upper >= 2**15, upper - 2**16, upper).to(torch.int16)
    assert int(edge.sum()) > 50 and torch.equal(reference.view(torch.int16)[edge], truncated[edge])
    for simd in SIMD_MODES:
        monkeypatch.setenv("LOMO_CPU_SIMD", simd)
        p = w.clone()
        lk.dense_update_(p, -v, lr=1.0, rounding="stochastic", seed=seed, backend="cpu")
        assert_bitwise(p, reference)


def test_cpu_speed_bench_quick(tmp_path):
    """bench/bench_cpu_speed.py --quick runs end to end and writes its tables (timings not asserted)."""
    pytest.importorskip("lomo_optim")
    from bench import bench_cpu_speed
    rows = bench_cpu_speed.run(str(tmp_path), quick=True)
    assert {r["table"] for r in rows} == {"bf16", "fp32"}
    text = (tmp_path / "cpu_speed.md").read_text()
    for section in ("bf16 weights", "fp32: Lomo and AdaLomo", "Norm-only pass", "Scratch of one fused bf16"):
        assert section in text
    assert (tmp_path / "cpu_speed.csv").read_text().startswith("table,tokens,method")
