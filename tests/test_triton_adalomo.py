"""AdaLomo's three passes as Triton kernels (lomo_kernels.kernels.triton_adalomo) against the torch reference.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set here or in
conftest before the backend is imported), on small odd shapes that leave partial tiles in every
direction (interpreter tiles are 32x32, 16 tokens). With a GPU the same tests run on CUDA tensors with the
compiled kernels, plus the larger ``gpu`` ones.

Stated tolerances (measured in the interpreter on these shapes: ≤ 2e-7 of the largest entry):
- sums (row / column sums of u², the norm pass's ‖G‖², the scaled norm): within 2e-6 of the largest
  reference entry (fp32 summation in another order); exact on integer-valued activations, where every
  partial sum is a representable dyadic rational.
- updates: bit-identical to the reference when the reference's GEMM is exact (integer-valued activations,
  every weight dtype, both roundings, with and without value clipping and loss scale); otherwise (the two
  GEMMs may differ in the last bits of G) 16-bit weights within one ulp of the reference's, fp32 weights
  within 2e-6 of the largest update entry plus one ulp.
- non-finite counts equal the reference's.
"""
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from lomo_kernels.kernels import reference  # noqa: E402
from lomo_kernels.kernels import triton_adalomo as ta  # noqa: E402
from lomo_kernels.ops._common import UpdateRule  # noqa: E402

if not torch.cuda.is_available() and not ta.INTERPRETED:
    pytest.skip("lomo_kernels.kernels.triton_update was imported before this module set TRITON_INTERPRET=1, so "
                "its kernels were built for a GPU this machine lacks; run pytest with TRITON_INTERPRET=1 set",
                allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHAPES = [(37, 45, 70), (1, 1, 1), (20, 3, 33)]  # (tokens, in, out): partial tiles everywhere, in == 1
# Update rule options; "all" exercises clipping, loss scale, decay and coef together (clip 0.25 and loss
# scale 8 are powers of two, so the sums of integer-valued activations stay exact)
OPTIONS = {
    "plain": dict(lr=0.05),
    "all": dict(lr=0.02, weight_decay=0.1, coef=0.7, loss_scale=8.0, clip_value=0.25),
}
SUM_RTOL = 2e-6


def activations(tokens, in_f, out_f, dtype, integer=False, device=DEVICE):
    if integer:  # small integers: every product and partial sum of the GEMM is exact in fp32
        x = torch.randint(-2, 3, (tokens, in_f), device=device).to(dtype)
        dy = torch.randint(-2, 3, (tokens, out_f), device=device).to(dtype)
    else:
        x = torch.randn(tokens, in_f, device=device).to(dtype)
        dy = torch.randn(tokens, out_f, device=device).to(dtype)
    return x, dy


def scales(in_f, out_f, device=DEVICE):
    return torch.rand(out_f, device=device) + 0.5, torch.rand(in_f, device=device) + 0.5


def clip_of(option):
    return OPTIONS[option].get("clip_value", math.inf)


def inv_scale_of(option):
    return 1.0 / OPTIONS[option].get("loss_scale", 1.0)


def assert_sums_close(actual, expected, rtol=SUM_RTOL):
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    err = float((actual.double() - expected.double()).abs().max()) if expected.numel() else 0.0
    assert err <= rtol * scale + 1e-30, f"max error {err:.3g} against largest entry {scale:.3g} (rtol {rtol})"


def assert_same_bits(actual, expected):
    """Bit-identical, except that any NaN equals any NaN."""
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan)
    assert torch.equal(actual[~nan].view(torch.uint8), expected[~nan].view(torch.uint8)), \
        f"{int((actual[~nan] != expected[~nan]).sum())} of {actual.numel()} elements differ"


def assert_within_one_ulp_of(actual, expected):
    """Every element equals ``expected``'s or one of its two neighbouring floats of the same dtype."""
    int_dtype = torch.int32 if expected.dtype == torch.float32 else torch.int16
    bits = expected.view(int_dtype).to(torch.int64)
    ok = actual == expected
    for step in (-1, 1):
        ok |= actual == (bits + step).to(int_dtype).view(expected.dtype)
    assert bool(ok.all()), (f"{int((~ok).sum())} of {ok.numel()} elements off by more than one ulp, e.g. "
                            f"{actual[~ok][:4].tolist()} vs {expected[~ok][:4].tolist()}")


def assert_update_close(actual, expected, before, rtol=SUM_RTOL):
    """fp32 weights: within ``rtol`` of the largest update entry (G's last bits differ) plus one ulp."""
    update = float((expected.double() - before.double()).abs().max())
    ulp = torch.finfo(torch.float32).eps * expected.double().abs()
    err = (actual.double() - expected.double()).abs()
    assert bool((err <= rtol * update + ulp).all()), f"max error {float(err.max()):.3g}, largest update {update:.3g}"


def run_sq_sums(fn_kind, x, dy, inv_scale, clip, start=1.0):
    rows = torch.full((dy.shape[1],), start, device=x.device)
    cols = torch.full((x.shape[1],), start, device=x.device)
    stats = torch.tensor([start, 0.0], device=x.device)
    if fn_kind == "triton":
        ta.adalomo_sq_sums(rows, cols, stats, x, dy, inv_scale, clip)
    else:
        reference.adalomo_sq_sums(rows, cols, x, dy, inv_scale, clip, stats)
    return rows, cols, stats


# --- sums -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens,in_f,out_f", SHAPES)
@pytest.mark.parametrize("act_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("integer", [False, True], ids=["random", "integer"])
def test_sq_sums_match_reference(tokens, in_f, out_f, act_dtype, option, integer):
    x, dy = activations(tokens, in_f, out_f, act_dtype, integer)
    got = run_sq_sums("triton", x, dy, inv_scale_of(option), clip_of(option))
    want = run_sq_sums("reference", x, dy, inv_scale_of(option), clip_of(option))
    for a, e in zip(got, want):  # rows and cols accumulate onto 1, stats[0] onto 1
        if integer:
            # every partial sum exact: multiples of inv_scale² (clip 0.25 is dyadic too) below 2**24 of them
            assert float(e.abs().max()) < 2.0 ** 24 * inv_scale_of(option) ** 2
            assert_same_bits(a, e)
        else:
            assert_sums_close(a, e)
    assert got[2][1].item() == 0


@pytest.mark.parametrize("tokens,in_f,out_f", SHAPES)
@pytest.mark.parametrize("act_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_scaled_sqnorm_matches_reference(tokens, in_f, out_f, act_dtype, option):
    x, dy = activations(tokens, in_f, out_f, act_dtype)
    r, c = scales(in_f, out_f)
    got, want = torch.tensor([1.0, 0.0], device=DEVICE), torch.tensor([1.0, 0.0], device=DEVICE)
    ta.adalomo_scaled_sqnorm(got, x, dy, r, c, inv_scale_of(option), clip_of(option))
    reference.adalomo_scaled_sqnorm(want, x, dy, r, c, inv_scale_of(option), clip_of(option))
    assert_sums_close(got[:1], want[:1])
    assert got[1].item() == want[1].item() == 0


@pytest.mark.parametrize("act_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_non_finite_entries_are_counted_as_the_reference(act_dtype, option):
    tokens, in_f, out_f = 37, 45, 70
    x, dy = activations(tokens, in_f, out_f, act_dtype, integer=True)
    dy[3, 5] = math.nan  # row 5 of G non-finite
    x[7, 40] = math.inf  # column 40 of G non-finite
    r, c = scales(in_f, out_f)
    inv, clip = inv_scale_of(option), clip_of(option)
    got = run_sq_sums("triton", x, dy, inv, clip)
    want = run_sq_sums("reference", x, dy, inv, clip)
    assert got[2][1].item() == want[2][1].item() > 0
    for a, e in zip(got[:2], want[:2]):  # the sums of the finite rows / columns stay exact
        assert torch.equal(a.isfinite(), e.isfinite())
        assert_same_bits(a[e.isfinite()], e[e.isfinite()])
    got_s, want_s = torch.zeros(2, device=DEVICE), torch.zeros(2, device=DEVICE)
    ta.adalomo_scaled_sqnorm(got_s, x, dy, r, c, inv, clip)
    reference.adalomo_scaled_sqnorm(want_s, x, dy, r, c, inv, clip)
    assert got_s[1].item() == want_s[1].item() > 0
    assert not got_s[0].isfinite()
    w = torch.randn(out_f, in_f, device=DEVICE).to(torch.bfloat16)
    w_ref = w.clone()
    rule = UpdateRule.make(rounding="stochastic", seed=3, **OPTIONS[option])
    count, count_ref = torch.zeros(1, dtype=torch.int64, device=DEVICE), torch.zeros(1, dtype=torch.int64, device=DEVICE)
    ta.adalomo_linear_update(w, x, dy, r, c, rule, count)
    reference.adalomo_linear_update(w_ref, x, dy, r, c, rule, count_ref)
    assert_same_bits(w, w_ref)  # non-finite new values keep their old bits on both
    assert count.item() == count_ref.item() > 0


# --- update ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens,in_f,out_f", SHAPES[:2])
@pytest.mark.parametrize("w_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_update_bit_identical_to_reference_on_exact_gradients(tokens, in_f, out_f, w_dtype, act_dtype, rounding,
                                                              option):
    x, dy = activations(tokens, in_f, out_f, act_dtype, integer=True)
    r, c = scales(in_f, out_f)
    w = torch.randn(out_f, in_f, device=DEVICE).to(w_dtype)
    w_ref = w.clone()
    rule = UpdateRule.make(rounding=rounding, seed=12345, **OPTIONS[option])
    ta.adalomo_linear_update(w, x, dy, r, c, rule)
    reference.adalomo_linear_update(w_ref, x, dy, r, c, rule)
    assert_same_bits(w, w_ref)


@pytest.mark.parametrize("w_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_update_within_one_ulp_of_reference(w_dtype, act_dtype, rounding, option):
    tokens, in_f, out_f = SHAPES[0]
    x, dy = activations(tokens, in_f, out_f, act_dtype)
    r, c = scales(in_f, out_f)
    w = torch.randn(out_f, in_f, device=DEVICE).to(w_dtype)
    w_ref, before = w.clone(), w.clone()
    rule = UpdateRule.make(rounding=rounding, seed=99, **OPTIONS[option])
    ta.adalomo_linear_update(w, x, dy, r, c, rule)
    reference.adalomo_linear_update(w_ref, x, dy, r, c, rule)
    assert not torch.equal(w, before)  # the update did something
    if w_dtype == torch.float32:
        assert_update_close(w, w_ref, before)
    else:
        assert_within_one_ulp_of(w, w_ref)


def test_no_tokens_leaves_sums_and_decays_weights():
    x, dy = activations(0, 5, 7, torch.bfloat16)
    rows, cols, stats = run_sq_sums("triton", x, dy, 1.0, math.inf)
    assert torch.equal(rows, torch.ones(7, device=DEVICE)) and torch.equal(cols, torch.ones(5, device=DEVICE))
    assert stats.tolist() == [1.0, 0.0]
    w = torch.randn(7, 5, device=DEVICE)
    w_ref = w.clone()
    r, c = scales(5, 7)
    rule = UpdateRule.make(lr=0.1, weight_decay=0.5)
    ta.adalomo_linear_update(w, x, dy, r, c, rule)
    reference.adalomo_linear_update(w_ref, x, dy, r, c, rule)
    assert_same_bits(w, w_ref)


def test_run_twice_bit_identical():
    tokens, in_f, out_f = SHAPES[0]
    x, dy = activations(tokens, in_f, out_f, torch.bfloat16)
    r, c = scales(in_f, out_f)
    first = run_sq_sums("triton", x, dy, 0.5, 0.3)
    again = run_sq_sums("triton", x, dy, 0.5, 0.3)
    for a, b in zip(first, again):
        assert_same_bits(a, b)
    w = torch.randn(out_f, in_f, device=DEVICE).to(torch.bfloat16)
    w2 = w.clone()
    rule = UpdateRule.make(lr=0.05, rounding="stochastic", seed=1)
    ta.adalomo_linear_update(w, x, dy, r, c, rule)
    ta.adalomo_linear_update(w2, x, dy, r, c, rule)
    assert_same_bits(w, w2)


def test_partials_are_reduced_in_a_fixed_order_without_atomics():
    """The reduction adds more partials than one chunk holds, onto what ``out`` has."""
    part = torch.randn(300, 5, device=DEVICE)
    out = torch.ones(5, device=DEVICE)
    ta._reduce_into(out, part)
    assert_sums_close(out - 1, part.double().sum(0), rtol=1e-6)
    import inspect
    assert "tl.atomic" not in inspect.getsource(ta)  # (the nonfinite counter is _finish_tile's integer atomic)


# --- GPU: the compiled kernels on CUDA tensors, larger shapes -------------------------------------

GPU_SHAPES = [(515, 777, 1000), (2048, 4096, 4096)]


@pytest.mark.gpu
@pytest.mark.parametrize("tokens,in_f,out_f", GPU_SHAPES)
@pytest.mark.parametrize("act_dtype", DTYPES, ids=str)
def test_gpu_sums_match_reference_and_are_deterministic(tokens, in_f, out_f, act_dtype):
    x, dy = activations(tokens, in_f, out_f, act_dtype, device="cuda")
    r, c = scales(in_f, out_f, device="cuda")
    got = run_sq_sums("triton", x, dy, 0.25, 0.05)
    want = run_sq_sums("reference", x, dy, 0.25, 0.05)
    for a, e in zip(got, want):
        assert_sums_close(a, e, rtol=1e-5)
    for a, b in zip(got, run_sq_sums("triton", x, dy, 0.25, 0.05)):
        assert_same_bits(a, b)
    s1, s2, s_ref = (torch.zeros(2, device="cuda") for _ in range(3))
    ta.adalomo_scaled_sqnorm(s1, x, dy, r, c, 0.25, 0.05)
    ta.adalomo_scaled_sqnorm(s2, x, dy, r, c, 0.25, 0.05)
    reference.adalomo_scaled_sqnorm(s_ref, x, dy, r, c, 0.25, 0.05)
    assert_same_bits(s1, s2)
    assert_sums_close(s1[:1], s_ref[:1], rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("w_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_gpu_update_matches_reference(w_dtype, rounding, option):
    tokens, in_f, out_f = GPU_SHAPES[0]
    act = torch.float32 if w_dtype == torch.float32 else w_dtype
    r, c = scales(in_f, out_f, device="cuda")
    rule = UpdateRule.make(rounding=rounding, seed=7, **OPTIONS[option])
    for integer in (True, False):
        x, dy = activations(tokens, in_f, out_f, act, integer, device="cuda")
        w = torch.randn(out_f, in_f, device="cuda").to(w_dtype)
        w_ref, w_again, before = w.clone(), w.clone(), w.clone()
        ta.adalomo_linear_update(w, x, dy, r, c, rule)
        ta.adalomo_linear_update(w_again, x, dy, r, c, rule)
        reference.adalomo_linear_update(w_ref, x, dy, r, c, rule)
        assert_same_bits(w, w_again)
        if integer:
            assert_same_bits(w, w_ref)
        elif w_dtype == torch.float32:
            assert_update_close(w, w_ref, before, rtol=1e-5)
        else:
            assert_within_one_ulp_of(w, w_ref)


# --- the ops dispatch to these kernels on the triton backend --------------------------------------

@pytest.mark.parametrize("clip_value", [None, 0.25])
def test_ops_on_triton_backend_run_these_kernels(clip_value, monkeypatch):
    from lomo_kernels.ops import adalomo_stats as A

    calls = []
    for name in ("adalomo_sq_sums", "adalomo_scaled_sqnorm", "adalomo_linear_update"):
        fn = getattr(ta, name)
        monkeypatch.setattr(ta, name, lambda *a, _fn=fn, _name=name: calls.append(_name) or _fn(*a))
    tokens, in_f, out_f = 40, 3, 5  # more tokens than in+out: no fp32 copies of the activations
    x, dy = activations(tokens, in_f, out_f, torch.bfloat16, integer=True)
    w = torch.randn(out_f, in_f, device=DEVICE).to(torch.bfloat16)
    r, c = scales(in_f, out_f)
    rows, cols, stats = torch.zeros(out_f, device=DEVICE), torch.zeros(in_f, device=DEVICE), torch.zeros(2, device=DEVICE)
    A.adalomo_sq_sums_(rows, cols, w, x, dy, loss_scale=8.0, clip_value=clip_value, method="gemm", stats=stats,
                       backend="triton")
    s = torch.zeros(2, device=DEVICE)
    A.adalomo_scaled_sqnorm_(s, w, x, dy, r, c, loss_scale=8.0, clip_value=clip_value, backend="triton")
    w_ref = w.clone()
    A.adalomo_linear_update_(w, x, dy, r, c, lr=0.1, loss_scale=8.0, clip_value=clip_value, rounding="stochastic",
                             seed=4, backend="triton")
    assert calls == ["adalomo_sq_sums", "adalomo_scaled_sqnorm", "adalomo_linear_update"]
    A.adalomo_linear_update_(w_ref, x, dy, r, c, lr=0.1, loss_scale=8.0, clip_value=clip_value,
                             rounding="stochastic", seed=4, backend="torch")
    assert_same_bits(w, w_ref)
