"""The torch reference backend against float64 math, the shared checks, and the custom-op plumbing.

Tolerances: fp32 weights within 1e-5 relative of the float64 update; bf16/fp16 with nearest rounding
within one ulp of the float64 update rounded to that dtype, plus the fp32 rounding of the update itself
(2^-22 of the operands' magnitude, the GEMM's Σ|dy||x| included: it matters only where the update
cancels the weight to near zero); stochastic rounding unbiased (mean of
>= 1000 roundings within 3 standard errors of the exact value) and reproducible per seed.
"""
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import lomo_kernels as lk
from lomo_kernels.ops._common import round_stochastic

LINEAR_CASES = [  # (token shape, in_features, out_features)
    ((5, 123), 77, 45),
    ((3, 4), 17, 33),
    ((1,), 7, 5),
    ((0,), 6, 4),
    ((300,), 130, 600),  # more rows than one reference block
]
RULES = [
    dict(lr=0.1),
    dict(lr=0.05, weight_decay=0.1, clip_value=0.3),
    dict(lr=0.02, coef=0.5, loss_scale=1024.0),
    dict(lr=0.3, weight_decay=0.01, coef=0.7, loss_scale=3.0, clip_value=2.0),
]


def exact_update(w, g, lr, weight_decay=0.0, coef=1.0, loss_scale=1.0, clip_value=None, abs_g=None, **_):
    """The float64 update, carrying the magnitude of its operands (what fp32 rounding error scales
    with); ``abs_g`` is Σ|dy||x| for a GEMM-made gradient."""
    u = g.double() / loss_scale
    if clip_value is not None:
        u = u.clamp(-clip_value, clip_value)
    decayed = w.double() * (1 - lr * weight_decay)
    exact = decayed - lr * coef * u
    exact.operand_scale = decayed.abs() + lr * coef * (g.abs() if abs_g is None else abs_g).double() / loss_scale
    return exact


def gemm_exact(dy, x):
    """dyᵀx in float64 and Σ|dy||x|, over flattened tokens."""
    dy2, x2 = dy.reshape(-1, dy.shape[-1]).double(), x.reshape(-1, x.shape[-1]).double()
    return dy2.t() @ x2, dy2.abs().t() @ x2.abs()


def ulp(t: torch.Tensor) -> torch.Tensor:
    bits = t.view(torch.int16).to(torch.int32)
    up = (bits + 1).to(torch.int16).view(t.dtype).double()
    return (up.abs() - t.double().abs()).abs()


def assert_update_matches(w_new, exact, dtype):
    if dtype == torch.float32:
        scale = exact.abs().max().clamp_min(1e-30)
        assert ((w_new.double() - exact).abs().max() / scale).item() <= 1e-5
    else:
        rounded = exact.to(dtype)
        allowed = ulp(rounded) + 2.0 ** -22 * exact.operand_scale
        assert bool(((w_new.double() - rounded.double()).abs() <= allowed).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens,in_f,out_f", LINEAR_CASES)
@pytest.mark.parametrize("rule", RULES, ids=range(len(RULES)))
def test_linear_update_reference_vs_float64(dtype, tokens, in_f, out_f, rule):
    w = torch.randn(out_f, in_f).to(dtype)
    x = torch.randn(*tokens, in_f)
    dy = torch.randn(*tokens, out_f)
    g, abs_g = gemm_exact(dy, x)
    exact = exact_update(w, g, abs_g=abs_g, **rule)
    lk.linear_update_(w, x, dy, backend="torch", **rule)
    assert_update_matches(w, exact, dtype)


def test_linear_update_reference_low_precision_activations():
    w = torch.randn(40, 24)
    x, dy = torch.randn(3, 5, 24).bfloat16(), torch.randn(3, 5, 40).bfloat16()
    g = dy.reshape(-1, 40).double().t() @ x.reshape(-1, 24).double()
    exact = exact_update(w, g, lr=0.1, clip_value=1.0)
    lk.linear_update_(w, x, dy, lr=0.1, clip_value=1.0, backend="torch")
    assert_update_matches(w, exact, torch.float32)


def test_non_contiguous_activations_are_handled():
    w = torch.randn(6, 8)
    x = torch.randn(8, 10).t()  # [10, 8], non-contiguous
    dy = torch.randn(6, 10).t()
    exact = exact_update(w, dy.double().t() @ x.double(), lr=0.1, clip_value=0.5)
    lk.linear_update_(w, x, dy, lr=0.1, clip_value=0.5)
    assert_update_matches(w, exact, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("padding_idx", [None, 3])
@pytest.mark.parametrize("rule", RULES, ids=range(len(RULES)))
def test_embedding_update_reference_vs_float64(dtype, padding_idx, rule):
    vocab, dim = 11, 9
    w = torch.randn(vocab, dim).to(dtype)
    idx = torch.randint(0, vocab, (4, 7))
    idx[0, :3] = 3  # duplicates, and the padding row
    dy = torch.randn(4, 7, dim)
    keep = idx.reshape(-1) != (padding_idx if padding_idx is not None else -1)
    g = torch.zeros(vocab, dim, dtype=torch.float64).index_add_(0, idx.reshape(-1)[keep], dy.reshape(-1, dim)[keep].double())
    exact = exact_update(w, g, **rule)
    lk.embedding_update_(w, idx, dy, padding_idx=padding_idx, backend="torch", **rule)
    assert_update_matches(w, exact, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rule", RULES, ids=range(len(RULES)))
def test_dense_update_reference_vs_float64(dtype, rule):
    p = torch.randn(3, 37).to(dtype)
    g = torch.randn(3, 37)
    exact = exact_update(p, g, **rule)
    lk.dense_update_(p, g, backend="torch", **rule)
    assert_update_matches(p, exact, dtype)


@pytest.mark.parametrize("method", ["gemm", "ghost"])
@pytest.mark.parametrize("tokens,in_f,out_f", LINEAR_CASES)
def test_linear_grad_sqnorm_vs_float64(method, tokens, in_f, out_f):
    w = torch.randn(out_f, in_f)
    x, dy = torch.randn(*tokens, in_f), torch.randn(*tokens, out_f)
    g = dy.reshape(-1, out_f).double().t() @ x.reshape(-1, in_f).double()
    stats = torch.tensor([1.5, 0.0])  # accumulates on top of what is there
    lk.linear_grad_sqnorm_(stats, w, x, dy, loss_scale=4.0, method=method)
    expected = 1.5 + (g / 4).pow(2).sum().item()
    assert stats[0].item() == pytest.approx(expected, rel=1e-5)
    assert stats[1].item() == 0


@pytest.mark.parametrize("method", ["gemm", "ghost"])
@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_linear_grad_sqnorm_flags_non_finite(method, bad):
    w = torch.zeros(4, 3)
    x, dy = torch.randn(5, 3), torch.randn(5, 4)
    x[2, 1] = bad
    stats = torch.zeros(2)
    lk.linear_grad_sqnorm_(stats, w, x, dy, method=method)
    assert stats[1].item() >= 1
    assert not math.isfinite(stats[0].item())
    assert bool((w == 0).all())


def test_norm_method_auto_picks_the_cheaper():
    assert lk.ops.choose_norm_method(tokens=8, in_features=512, out_features=512) == "ghost"
    assert lk.ops.choose_norm_method(tokens=4096, in_features=512, out_features=512) == "gemm"


def test_embedding_and_dense_sqnorm_vs_float64():
    w = torch.randn(10, 4)
    idx = torch.tensor([1, 1, 2, 7, 0])
    dy = torch.randn(5, 4)
    stats = torch.zeros(2)
    lk.embedding_grad_sqnorm_(stats, w, idx, dy, padding_idx=0, loss_scale=2.0)
    g = torch.zeros(10, 4, dtype=torch.float64).index_add_(0, idx[:4], dy[:4].double())  # the last index is padding
    assert stats[0].item() == pytest.approx((g / 2).pow(2).sum().item(), rel=1e-6)
    grad = torch.randn(17)
    grad[3] = math.nan
    stats = torch.zeros(2)
    lk.dense_grad_sqnorm_(stats, torch.zeros(17), grad)
    assert stats[1].item() == 1


# --- stochastic rounding ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased(dtype):
    n = 4096
    w0 = torch.tensor(1.0 + 2 ** -9).to(dtype)  # a representable start
    p = w0.repeat(n)
    g = torch.full((n,), 0.37)
    lr = 3e-4  # the update is a fraction of one ulp: nearest rounding would leave p frozen
    exact = w0.double() - lr * 0.37
    lk.dense_update_(p, g, lr=lr, rounding="stochastic", seed=12345)
    lo, hi = p.double().min(), p.double().max()
    assert lo < exact < hi, "both neighbours must occur"
    frac = ((exact - lo) / (hi - lo)).item()
    se = math.sqrt(frac * (1 - frac) / n) * (hi - lo).item()
    assert abs(p.double().mean().item() - exact.item()) <= 3 * se
    near = w0.repeat(n)
    lk.dense_update_(near, g, lr=lr, rounding="nearest")
    assert bool((near == w0).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_unbiased_over_seeds_on_linear(dtype):
    w0 = torch.randn(3, 4).to(dtype)
    x, dy = torch.randn(2, 4), torch.randn(2, 3)
    g, abs_g = gemm_exact(dy, x)
    exact = exact_update(w0, g, lr=1e-3, abs_g=abs_g)
    runs = []
    for seed in range(1000):
        w = w0.clone()
        lk.linear_update_(w, x, dy, lr=1e-3, rounding="stochastic", seed=seed)
        runs.append(w.double())
    runs = torch.stack(runs)
    # Each of the 12 means within 4 standard errors (3 each would fail ~3% of fresh inputs by chance
    # alone; 4 keeps that under 0.1% and still catches a bias of a fraction of an ulp).
    se = runs.std(0) / math.sqrt(len(runs))
    assert bool(((runs.mean(0) - exact).abs() <= 4 * se + 1e-12).all())


def test_stochastic_rounding_is_reproducible_and_seeded():
    w0 = torch.randn(64, 32).bfloat16()
    x, dy = torch.randn(5, 32), torch.randn(5, 64)
    a, b, c = w0.clone(), w0.clone(), w0.clone()
    for w, seed in ((a, 7), (b, 7), (c, 8)):
        lk.linear_update_(w, x, dy, lr=1e-3, rounding="stochastic", seed=seed)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_stochastic_rounding_keeps_representable_and_special_values():
    v = torch.tensor([1.0, -2.5, 0.0, math.inf, -math.inf, math.nan, 1e30])
    idx = torch.arange(v.numel())
    out = round_stochastic(v, torch.float16, idx, seed=3)
    assert out[:3].tolist() == [1.0, -2.5, 0.0]
    assert out[3].item() == math.inf and out[4].item() == -math.inf and math.isnan(out[5].item())
    assert out[6].item() == math.inf  # beyond fp16's range, as nearest rounding


# --- bad input: a clear error, nothing written ---------------------------------------------------------

BAD_CALLS = [
    (dict(lr=math.nan), ValueError, "lr must be a finite"),
    (dict(lr=math.inf), ValueError, "lr must be a finite"),
    (dict(lr=-1.0), ValueError, "lr must be >= 0"),
    (dict(lr=0.1, weight_decay=-0.1), ValueError, "weight_decay"),
    (dict(lr=0.1, loss_scale=0.0), ValueError, "loss_scale"),
    (dict(lr=0.1, clip_value=0.0), ValueError, "clip_value"),
    (dict(lr=0.1, rounding="up"), ValueError, "rounding"),
    (dict(lr=0.1, seed=2**32), ValueError, "seed"),
    (dict(lr=torch.tensor(0.1)), TypeError, "Python number"),
    (dict(lr=0.1, backend="tpu"), ValueError, "unknown backend"),
    (dict(lr=0.1, backend="cuda"), (RuntimeError, ValueError), "cuda"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_CALLS, ids=[str(i) for i in range(len(BAD_CALLS))])
def test_bad_scalars_raise_before_writing(kwargs, exc, match):
    w = torch.randn(4, 3)
    before = w.clone()
    with pytest.raises(exc, match=match):
        lk.linear_update_(w, torch.randn(2, 3), torch.randn(2, 4), name="layer.weight", **kwargs)
    assert torch.equal(w, before)


def test_bad_tensors_raise_before_writing():
    w = torch.randn(4, 3)
    before = w.clone()
    x, dy = torch.randn(2, 3), torch.randn(2, 4)
    cases = [
        (lambda: lk.linear_update_(w, torch.randn(2, 5), dy, lr=0.1, name="fc.weight"), "fc.weight: expected x"),
        (lambda: lk.linear_update_(w, x, torch.randn(3, 4), lr=0.1), "same leading"),
        (lambda: lk.linear_update_(w, x.double(), dy, lr=0.1), "float32, bfloat16 or float16"),
        (lambda: lk.linear_update_(w, x.half(), dy, lr=0.1), "one dtype"),
        (lambda: lk.linear_update_(w, x.to("meta"), dy, lr=0.1), "is on meta"),
        (lambda: lk.linear_update_(w.t(), torch.randn(2, 4), torch.randn(2, 3), lr=0.1), "contiguous"),
        (lambda: lk.linear_update_(w, w[:, :3], torch.randn(4, 4), lr=0.1), "aliases the weight"),
        (lambda: lk.linear_update_(w.int(), x, dy, lr=0.1), "float32, bfloat16 or float16"),
        (lambda: lk.embedding_update_(w, torch.tensor([0, 4]), torch.randn(2, 3), lr=0.1), "indices must lie"),
        (lambda: lk.embedding_update_(w, torch.tensor([0.0]), torch.randn(1, 3), lr=0.1), "int64 or int32"),
        (lambda: lk.dense_update_(w, torch.randn(3, 4), lr=0.1), "does not match"),
        (lambda: lk.linear_grad_sqnorm_(torch.zeros(3), w, x, dy), "stats must be"),
    ]
    for call, match in cases:
        with pytest.raises((ValueError, TypeError, IndexError), match=match):
            call()
        assert torch.equal(w, before)


def test_available_backends_reports_reasons():
    info = lk.available_backends()
    assert set(info) == {"torch", "cpu", "cuda", "triton"}
    assert info["torch"].available
    for name, b in info.items():
        assert b.detail, f"{name} has no explanation"


# --- custom-op plumbing: FakeTensorMode and torch.compile --------------------------------------------

def test_ops_run_under_fake_tensor_mode():
    with FakeTensorMode():
        w = torch.empty(4096, 4096)
        x, dy = torch.empty(8, 4096), torch.empty(8, 4096)
        lk.linear_update_(w, x, dy, lr=0.1, clip_value=1.0)
        stats = torch.zeros(2)
        lk.linear_grad_sqnorm_(stats, w, x, dy)
        lk.embedding_update_(w, torch.zeros(3, dtype=torch.int64), torch.empty(3, 4096), lr=0.1)
        lk.dense_update_(w, torch.empty(4096, 4096), lr=0.1)


def test_ops_work_under_torch_compile():
    def step(w, x, dy):
        lk.linear_update_(w, x, dy, lr=0.1, clip_value=0.5)
        return w.sum()

    w = torch.randn(6, 5)
    x, dy = torch.randn(3, 5), torch.randn(3, 6)
    eager = w.clone()
    step(eager, x, dy)
    compiled = w.clone()
    torch.compile(step, backend="aot_eager", fullgraph=True)(compiled, x, dy)
    assert torch.equal(eager, compiled)
