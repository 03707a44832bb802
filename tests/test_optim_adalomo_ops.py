"""AdaLomo's statistics ops (lomo_kernels.ops.adalomo_stats) against a float64 computation from the
materialized gradient, on odd shapes (row blocks that do not divide the weight), with and without
value clipping, both sums methods; bad input raises before any write.

Tolerances: fp32 results within 1e-5 relative of float64; bf16 weights within one bf16 ulp."""
import math

import pytest
import torch

from lomo_kernels.ops import adalomo_stats as A

SHAPES = [((5, 7), 77, 123), ((35,), 257, 300), ((3,), 1, 1)]  # (token shape, in, out); 300x257 spans 2 row blocks


def inputs(tokens, in_f, out_f, dtype=torch.float32):
    x = torch.randn(*tokens, in_f, dtype=dtype)
    dy = torch.randn(*tokens, out_f, dtype=dtype)
    w = torch.randn(out_f, in_f, dtype=dtype)
    return w, x, dy


def clipped_gradient(x, dy, loss_scale, clip_value):
    g = dy.reshape(-1, dy.shape[-1]).double().t() @ x.reshape(-1, x.shape[-1]).double() / loss_scale
    return g if clip_value is None else g.clamp(-clip_value, clip_value)


def assert_close(actual, expected, rtol=1e-5):
    scale = expected.abs().max().item() + 1e-30
    assert (actual.double() - expected).abs().max().item() <= rtol * scale


@pytest.mark.parametrize("tokens,in_f,out_f", SHAPES)
@pytest.mark.parametrize("method,clip_value", [("gemm", None), ("ghost", None), ("gemm", 0.5), ("auto", None), ("auto", 0.5)])
def test_sq_sums(tokens, in_f, out_f, method, clip_value):
    w, x, dy = inputs(tokens, in_f, out_f)
    g = clipped_gradient(x, dy, 4.0, clip_value)
    rows, cols = torch.ones(out_f), torch.ones(in_f)  # accumulates onto what is there
    A.adalomo_sq_sums_(rows, cols, w, x, dy, loss_scale=4.0, clip_value=clip_value, method=method)
    assert_close(rows, 1 + (g * g).sum(1))
    assert_close(cols, 1 + (g * g).sum(0))


@pytest.mark.parametrize("tokens,in_f,out_f", SHAPES)
@pytest.mark.parametrize("clip_value", [None, 0.5])
def test_scaled_sqnorm(tokens, in_f, out_f, clip_value):
    w, x, dy = inputs(tokens, in_f, out_f)
    r, c = torch.rand(out_f) + 0.5, torch.rand(in_f) + 0.5
    g = clipped_gradient(x, dy, 2.0, clip_value) * r.double()[:, None] * c.double()
    stats = torch.zeros(2)
    A.adalomo_scaled_sqnorm_(stats, w, x, dy, r, c, loss_scale=2.0, clip_value=clip_value)
    assert_close(stats[0], (g * g).sum())
    assert stats[1].item() == 0
    dy.view(-1)[0] = math.nan
    A.adalomo_scaled_sqnorm_(stats, w, x, dy, r, c, loss_scale=2.0, clip_value=clip_value)
    assert stats[1].item() > 0  # NaN entries are counted (clamp passes NaN through)


@pytest.mark.parametrize("tokens,in_f,out_f", SHAPES)
@pytest.mark.parametrize("clip_value", [None, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_update(tokens, in_f, out_f, clip_value, dtype):
    w, x, dy = inputs(tokens, in_f, out_f, dtype)
    r, c = torch.rand(out_f) + 0.5, torch.rand(in_f) + 0.5
    lr, wd, coef = 0.1, 0.3, 0.7
    g = clipped_gradient(x, dy, 2.0, clip_value) * r.double()[:, None] * c.double()
    expected = w.double() * (1 - lr * wd) - lr * coef * g
    A.adalomo_linear_update_(w, x, dy, r, c, lr=lr, weight_decay=wd, coef=coef, loss_scale=2.0,
                             clip_value=clip_value, rounding="nearest")
    if dtype == torch.float32:
        assert_close(w, expected)
    else:
        ulp = expected.abs().clamp_min(1e-30) * 2.0 ** -7
        assert ((w.double() - expected).abs() <= ulp + 1e-6 * expected.abs().max()).all()


def test_bad_input_raises_before_any_write():
    w, x, dy = inputs((4,), 6, 5)
    before = w.clone()
    r, c = torch.ones(5), torch.ones(6)
    with pytest.raises(ValueError, match="row_scale must be a float32 tensor of shape \\(5,\\)"):
        A.adalomo_linear_update_(w, x, dy, torch.ones(6), c, lr=0.1, clip_value=0.5, name="layer.weight")
    with pytest.raises(ValueError, match="col_sums"):
        A.adalomo_sq_sums_(r, torch.ones(6, dtype=torch.float64), w, x, dy)
    with pytest.raises(ValueError, match="ghost method cannot apply value clipping"):
        A.adalomo_sq_sums_(r, c, w, x, dy, clip_value=0.5, method="ghost")
    with pytest.raises(ValueError, match="clip_value"):
        A.adalomo_linear_update_(w, x, dy, r, c, lr=0.1, clip_value=-1.0)
    with pytest.raises(ValueError, match="lr must be a finite"):
        A.adalomo_linear_update_(w, x, dy, r, c, lr=math.nan, clip_value=0.5)
    assert torch.equal(w, before)


def test_embedding_row_gradients_sum_duplicates_and_skip_padding():
    w = torch.randn(10, 3)
    idx = torch.tensor([[1, 4, 1], [0, 4, 9]])
    dy = torch.randn(2, 3, 3)
    rows, g = A.embedding_row_gradients(w, idx, dy, padding_idx=0)
    dense = torch.zeros(10, 3).index_add_(0, idx.flatten(), dy.reshape(-1, 3))
    assert rows.tolist() == [1, 4, 9]
    assert torch.allclose(g, dense[rows])


# ---- the compiled (cpu backend) AdaLomo passes and the shared norm terms (issue 16) -----------------

_CPU = pytest.mark.skipif(not __import__("lomo_kernels").available_backends()["cpu"].available,
                          reason="compiled backend not built")
ODD = [((9, 7), 131, 67), ((1,), 300, 1031), ((400,), 29, 41)]  # several row blocks; tokens >> features
# LOMO_CPU_SIMD: the widest vector epilogue the CPU has, AVX2 at most, the scalar loop.
SIMD = [pytest.param("1", id="widest"), pytest.param("avx2", id="avx2"), pytest.param("0", id="scalar")]


def _operands(tokens, in_f, out_f, act_dtype):
    w, x, dy = inputs(tokens, in_f, out_f)
    return w, x.to(act_dtype), dy.to(act_dtype)


@_CPU
@pytest.mark.parametrize("act_dtype", [torch.float32, torch.bfloat16], ids=["fp32-act", "bf16-act"])
@pytest.mark.parametrize("clip_value", [None, 0.05])
@pytest.mark.parametrize("tokens,in_f,out_f", ODD)
@pytest.mark.parametrize("simd", SIMD)
def test_compiled_sq_sums_with_norm_terms(tokens, in_f, out_f, clip_value, act_dtype, simd, monkeypatch):
    """Row/column sums within 1e-5 of float64, and ``stats`` equal to the norm pass's terms (unclipped);
    every epilogue."""
    monkeypatch.setenv("LOMO_CPU_SIMD", simd)
    w, x, dy = _operands(tokens, in_f, out_f, act_dtype)
    g = clipped_gradient(x, dy, 4.0, clip_value)
    unclipped = clipped_gradient(x, dy, 4.0, None)
    for backend in ("cpu", "torch"):
        rows, cols, stats = torch.ones(out_f), torch.ones(in_f), torch.tensor([0.5, 0.0])
        A.adalomo_sq_sums_(rows, cols, w, x, dy, loss_scale=4.0, clip_value=clip_value, method="gemm", stats=stats,
                           backend=backend)
        assert_close(rows, 1 + (g * g).sum(1))
        assert_close(cols, 1 + (g * g).sum(0))
        assert stats[0].item() == pytest.approx(0.5 + (unclipped ** 2).sum().item(), rel=1e-5)
        assert stats[1].item() == 0


@_CPU
@pytest.mark.parametrize("method", ["gemm", "ghost"])
def test_sq_sums_norm_terms_count_nonfinite(method):
    w, x, dy = inputs((6,), 20, 12)
    x[3, 4] = math.inf
    stats = torch.zeros(2)
    A.adalomo_sq_sums_(torch.zeros(12), torch.zeros(20), w, x, dy, method=method, stats=stats, backend="cpu")
    assert stats[1].item() >= 1 and not math.isfinite(stats[0].item())


@_CPU
@pytest.mark.parametrize("act_dtype", [torch.float32, torch.bfloat16], ids=["fp32-act", "bf16-act"])
@pytest.mark.parametrize("clip_value", [None, 0.05])
@pytest.mark.parametrize("tokens,in_f,out_f", ODD)
def test_compiled_scaled_sqnorm(tokens, in_f, out_f, clip_value, act_dtype):
    w, x, dy = _operands(tokens, in_f, out_f, act_dtype)
    r, c = torch.rand(out_f) + 0.5, torch.rand(in_f) + 0.5
    g = clipped_gradient(x, dy, 2.0, clip_value) * r.double()[:, None] * c.double()
    stats = torch.zeros(2)
    A.adalomo_scaled_sqnorm_(stats, w, x, dy, r, c, loss_scale=2.0, clip_value=clip_value, backend="cpu")
    assert stats[0].item() == pytest.approx((g * g).sum().item(), rel=1e-5)
    assert stats[1].item() == 0


@_CPU
@pytest.mark.parametrize("w_dtype,rounding", [(torch.float32, "nearest"), (torch.bfloat16, "nearest"),
                                              (torch.bfloat16, "stochastic")])
@pytest.mark.parametrize("act_dtype", [torch.float32, torch.bfloat16], ids=["fp32-act", "bf16-act"])
@pytest.mark.parametrize("clip_value", [None, 0.05])
@pytest.mark.parametrize("tokens,in_f,out_f", ODD)
@pytest.mark.parametrize("simd", SIMD)
def test_compiled_linear_update(tokens, in_f, out_f, clip_value, act_dtype, w_dtype, rounding, simd, monkeypatch):
    """fp32 weights within 1e-5 (of the largest term) of float64; bf16 weights within one bf16 ulp
    (nearest) or on one of the two neighbours (stochastic) of the float64 update; every epilogue."""
    monkeypatch.setenv("LOMO_CPU_SIMD", simd)
    w, x, dy = _operands(tokens, in_f, out_f, act_dtype)
    w = w.to(w_dtype)
    r, c = torch.rand(out_f) + 0.5, torch.rand(in_f) + 0.5
    lr, wd, coef = 0.1, 0.3, 0.7
    g = clipped_gradient(x, dy, 2.0, clip_value) * r.double()[:, None] * c.double()
    expected = w.double() * (1 - lr * wd) - lr * coef * g
    A.adalomo_linear_update_(w, x, dy, r, c, lr=lr, weight_decay=wd, coef=coef, loss_scale=2.0,
                             clip_value=clip_value, rounding=rounding, seed=5, backend="cpu")
    if w_dtype == torch.float32:
        assert_close(w, expected)
    else:
        ulp = expected.abs().clamp_min(1e-30) * 2.0 ** -7
        assert ((w.double() - expected).abs() <= ulp + 1e-6 * expected.abs().max()).all()


def _bits(t):
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


@_CPU
@pytest.mark.parametrize("w_dtype,rounding", [(torch.float32, "nearest"), (torch.bfloat16, "stochastic")])
@pytest.mark.parametrize("tokens,in_f,out_f", ODD)
def test_compiled_passes_agree_at_every_simd_width(tokens, in_f, out_f, w_dtype, rounding, monkeypatch):
    """The same passes under every LOMO_CPU_SIMD. Element-wise results (the updated weight, the column
    sums: each sums over rows in row order) and non-finite counts are bitwise the scalar loop's; the
    row and norm sums in double are bitwise the same at both vector widths (16 partial sums at
    either) and within rounding of the scalar loop's in-order sums. An infinite activation makes a
    column of G infinite (clipped, but counted by the norm terms); a NaN one a column of NaN, which
    the update's guard keeps and counts."""
    w, x, dy = _operands(tokens, in_f, out_f, torch.float32)
    w = w.to(w_dtype)
    x_inf, x_nan = x.clone(), x.clone()
    x_inf.view(-1, in_f)[0, 3], x_nan.view(-1, in_f)[0, 3] = math.inf, math.nan  # one entry of one token
    r, c = torch.rand(out_f) + 0.5, torch.rand(in_f) + 0.5
    out = {}
    for simd in ("1", "avx2", "0"):
        monkeypatch.setenv("LOMO_CPU_SIMD", simd)
        rows, cols, stats = torch.ones(out_f), torch.ones(in_f), torch.zeros(4)
        A.adalomo_sq_sums_(rows, cols, w, x_inf, dy, loss_scale=2.0, clip_value=0.05, method="gemm",
                           stats=stats[:2], backend="cpu")
        A.adalomo_scaled_sqnorm_(stats[2:], w, x, dy, r, c, loss_scale=2.0, clip_value=0.05, backend="cpu")
        updated, count = w.clone(), torch.zeros(1, dtype=torch.int64)
        A.adalomo_linear_update_(updated, x_nan, dy, r, c, lr=0.1, weight_decay=0.3, coef=0.7, loss_scale=2.0,
                                 clip_value=0.05, rounding=rounding, seed=5, backend="cpu", nonfinite=count)
        out[simd] = dict(rows=rows, cols=cols, stats=stats, updated=updated, count=int(count))
    assert out["0"]["count"] == out_f and out["0"]["stats"][1] == out_f
    for simd in ("1", "avx2"):
        assert torch.equal(_bits(out[simd]["updated"]), _bits(out["0"]["updated"]))
        assert torch.equal(_bits(out[simd]["cols"]), _bits(out["0"]["cols"]))
        assert out[simd]["count"] == out["0"]["count"]
        assert torch.equal(out[simd]["stats"][1::2], out["0"]["stats"][1::2])
    for key in ("rows", "stats"):
        assert torch.equal(_bits(out["1"][key]), _bits(out["avx2"][key]))
    assert_close(out["avx2"]["rows"], out["0"]["rows"].double(), rtol=1e-6)
    assert out["avx2"]["stats"][2].item() == pytest.approx(out["0"]["stats"][2].item(), rel=1e-6)
