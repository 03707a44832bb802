"""The fused linear cross-entropy's Triton kernels (lomo_kernels.kernels.triton_linear_cross_entropy) against
the torch reference ops (lomo_kernels.ops.linear_cross_entropy), and the reference against float64.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set here before the
backend is imported), on small odd shapes (tokens, hidden size and vocabulary not multiples of the tiles:
interpreter tiles are 16 tokens × 32 columns × 16 hidden for the logits, partial tiles in every direction,
several vocabulary splits in the forward and several chunks in the backward). With a GPU the same tests run
on CUDA tensors with the compiled kernels.

Stated tolerances (what the assertions check):
- fp32 loss: ≤ 1e-6 relative to the reference op's (and the reference's to float64); ``lse``: ≤ 1e-6 of
  its largest entry.
- dlogits, dH, the bias gradient: ≤ 1e-5 of the largest reference entry.
- updated fp32 W: ≤ 1e-5 of the largest entry of the reference's update ``W_ref − W_0``, plus one ulp of W.
- 16-bit W: every element within one ulp of the reference's, fewer than 1% of them differing (the two
  GEMMs of G sum in other orders, so an fp32 value near a rounding boundary may round the other way).
- 16-bit inputs: the loss is the fp32 math of the 16-bit values (reference op on the same tensors) ≤ 1e-6.
- norm phase: ``‖G‖²`` ≤ 1e-5 relative, non-finite counts equal.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from lomo_kernels.fused_cross_entropy import (  # noqa: E402
    FusedLinearCrossEntropy, LomoHead, NormHead, shift_labels)
from lomo_kernels.kernels import triton_linear_cross_entropy as tlce  # noqa: E402
from lomo_kernels.ops import linear_cross_entropy as lce  # noqa: E402
from lomo_kernels.ops._common import UpdateRule  # noqa: E402

if not torch.cuda.is_available() and not tlce.INTERPRETED:
    pytest.skip("lomo_kernels.kernels.triton_update was imported before this module set TRITON_INTERPRET=1, so "
                "its kernels were built for a GPU this machine lacks; run pytest with TRITON_INTERPRET=1 set",
                allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


def _inputs(T=37, d=45, V=203, dtype=torch.float32, wdtype=None, seed=0, ignored=5, bias=False):
    g = torch.Generator().manual_seed(seed)
    H = torch.randn(T, d, generator=g).to(dtype)
    W = (torch.randn(V, d, generator=g) * 0.5).to(wdtype or dtype)
    b = torch.randn(V, generator=g) if bias else None
    y = torch.randint(0, V, (T,), generator=g)
    y[torch.randperm(T, generator=g)[:ignored]] = -100
    to = (lambda t: None if t is None else t.to(DEVICE))
    return to(H), to(W), to(b), to(y)


def _cfg(backend, H, W, chunk=64, softcap=None, eps=0.0):
    return lce.LossConfig.make(-100, eps, softcap, chunk, tokens=H.shape[0], vocab=W.shape[0], hidden=W.shape[1],
                               weight_dtype=W.dtype, device=W.device, backend=backend)


def _rel(a, b):
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)


def _float64_loss(H, W, b, y, softcap, eps):
    """The loss in float64 (autograd-able in H, W, b): the reference of the reference."""
    z = H.double() @ W.double().t()
    if b is not None:
        z = z + b.double()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    n = max(int((y != -100).sum()), 1)
    return F.cross_entropy(z, y, ignore_index=-100, label_smoothing=eps, reduction="sum") / n


# --- forward --------------------------------------------------------------------------------------

@pytest.mark.parametrize("softcap,eps,bias", [(None, 0.0, False), (2.5, 0.0, True), (None, 0.1, True),
                                              (30.0, 0.1, False)])
def test_forward_fp32_equals_reference_and_float64(softcap, eps, bias):
    H, W, b, y = _inputs(seed=1, bias=bias)
    ref_sum, ref_lse = lce._forward_impl(H, W, b, y, -100, eps, softcap or 0.0, 64, "torch")
    got_sum, got_lse = lce._forward_impl(H, W, b, y, -100, eps, softcap or 0.0, 64, "triton")
    assert got_sum.dtype == torch.float32 and got_lse.dtype == torch.float32 and got_lse.shape == (H.shape[0],)
    assert abs(got_sum.item() - ref_sum.item()) <= 1e-6 * abs(ref_sum.item())
    assert _rel(got_lse, ref_lse) <= 1e-6
    n = int((y != -100).sum())
    exact = _float64_loss(H, W, b, y, softcap, eps).item() * n
    assert abs(ref_sum.item() - exact) <= 1e-6 * abs(exact)


@pytest.mark.parametrize("dtype,wdtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                          (torch.bfloat16, torch.float32)])
def test_forward_16bit_inputs_fp32_math(dtype, wdtype):
    H, W, b, y = _inputs(T=21, d=33, V=117, dtype=dtype, wdtype=wdtype, seed=2)
    ref_sum, ref_lse = lce._forward_impl(H, W, None, y, -100, 0.0, 0.0, 64, "torch")
    got_sum, got_lse = lce._forward_impl(H, W, None, y, -100, 0.0, 0.0, 64, "triton")
    assert abs(got_sum.item() - ref_sum.item()) <= 1e-6 * abs(ref_sum.item())
    assert _rel(got_lse, ref_lse) <= 1e-6
    exact = _float64_loss(H, W, None, y, None, 0.0).item() * int((y != -100).sum())
    assert abs(ref_sum.item() - exact) <= 1e-6 * abs(exact)


def test_forward_labels_at_tile_and_split_edges_counted_once():
    # labels in the first / last columns of tiles (32 columns) and splits (2 of 64 here) and the last column:
    # a label picked by two programs, or by none, would be off by a whole logit
    H, W, _, y = _inputs(T=16, d=16, V=100, seed=3, ignored=0)
    y = torch.tensor([31, 32, 63, 64, 95, 96, 99, 0] * 2, device=DEVICE)
    ref = lce._forward_impl(H, W, None, y, -100, 0.0, 0.0, 100, "torch")[0]
    got = lce._forward_impl(H, W, None, y, -100, 0.0, 0.0, 100, "triton")[0]
    assert abs(got.item() - ref.item()) <= 1e-6 * abs(ref.item())


# --- backward pieces ----------------------------------------------------------------------------

@pytest.mark.parametrize("softcap,eps,bias", [(None, 0.0, False), (2.5, 0.1, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dlogits_and_grad_hidden_equal_reference(softcap, eps, bias, dtype):
    H, W, b, y = _inputs(T=29, d=35, V=150, dtype=dtype, seed=4, bias=bias)
    _, lse = lce._forward_impl(H, W, b, y, -100, eps, softcap or 0.0, 64, "torch")
    safe = torch.where(y == -100, -1, y)
    coef = torch.where(y == -100, 0.0, 0.37).to(torch.float32)
    for v0, v1 in ((0, 64), (64, 128), (128, 150)):   # the last chunk partial
        ref = lce._dlogits_impl(H.float(), W, b, safe, lse, coef, v0, v1, eps, softcap or 0.0, "torch")
        got = lce._dlogits_impl(H, W, b, safe, lse, coef, v0, v1, eps, softcap or 0.0, "triton")
        assert got.shape == (H.shape[0], v1 - v0) and got.dtype == torch.float32
        assert _rel(got, ref) <= 1e-5
        assert bool((got[y == -100] == 0).all())
        gh_ref = torch.randn(H.shape[0], H.shape[1], device=DEVICE)
        gh_got = gh_ref.clone()
        lce._grad_hidden_impl(gh_ref, ref, W, v0, "torch")
        lce._grad_hidden_impl(gh_got, ref, W, v0, "triton")
        assert _rel(gh_got, gh_ref) <= 1e-5


@pytest.mark.parametrize("wdtype,rounding", [(torch.float32, "nearest"), (torch.bfloat16, "nearest"),
                                             (torch.bfloat16, "stochastic"), (torch.float16, "stochastic")])
@pytest.mark.parametrize("scaled", [False, True])
def test_rows_update_equals_reference(wdtype, rounding, scaled):
    g = torch.Generator().manual_seed(5)
    V, d, T, row0, n = 150, 45, 37, 64, 70
    W0 = (torch.randn(V, d, generator=g) * 0.5).to(wdtype).to(DEVICE)
    x = torch.randn(T, d, generator=g).to(DEVICE)
    dy = (torch.randn(T, n, generator=g) * 0.1).to(DEVICE)
    rs = torch.rand(n, generator=g).to(DEVICE) + 0.5 if scaled else None
    cs = torch.rand(d, generator=g).to(DEVICE) + 0.5 if scaled else None
    rule = UpdateRule.make(0.3, weight_decay=0.1, loss_scale=2.0, clip_value=0.05, rounding=rounding, seed=11)
    args = (rs, cs, rule.decay, rule.step, rule.inv_loss_scale, rule.clip_value, rule.stochastic, rule.seed)
    dy[3, 5] = float("nan")  # row 5's update is not finite (value clipping keeps an inf finite): kept, counted
    W_ref, W_got = W0.clone(), W0.clone()
    c_ref, c_got = (torch.zeros(1, dtype=torch.int64, device=DEVICE) for _ in range(2))
    lce._rows_update_impl(W_ref, row0, x, dy, *args, c_ref, "torch")
    lce._rows_update_impl(W_got, row0, x, dy, *args, c_got, "triton")
    assert int(c_ref) == int(c_got) >= d
    assert torch.equal(W_got[row0 + 5], W0[row0 + 5]) and torch.equal(W_ref[row0 + 5], W0[row0 + 5])
    assert torch.equal(W_got[:row0], W0[:row0]) and torch.equal(W_got[row0 + n:], W0[row0 + n:])
    _assert_weights_close(W_got, W_ref, W0)


def _ulp(got, ref):
    """One ulp of the larger of two 16-bit values, elementwise (the subnormal spacing at the bottom)."""
    fi = torch.finfo(got.dtype)
    return torch.clamp(fi.eps * torch.maximum(got.float().abs(), ref.float().abs()), min=fi.tiny * fi.eps)


def _assert_weights_close(got, ref, w0):
    if got.dtype == torch.float32:
        ulp = torch.finfo(torch.float32).eps * ref.abs().max().item()
        assert (got - ref).abs().max().item() <= 1e-5 * (ref - w0).abs().max().item() + ulp
        return
    g32, r32 = got.float(), ref.float()
    assert bool(((g32 - r32).abs() <= _ulp(got, ref)).all()), "a 16-bit weight more than one ulp from the reference"
    assert (g32 != r32).float().mean().item() < 0.01
    assert not torch.equal(got, w0)


# --- the whole backward, through the autograd Function ---------------------------------------------

def _run(backend, H, W, b, y, *, softcap, eps, updater_kw, chunk=64, scale=8.0):
    W = W.clone()
    Hr = H.clone().requires_grad_()
    br = None if b is None else b.clone().requires_grad_()
    cfg = _cfg(backend, H, W, chunk, softcap, eps)
    denom = lce.normalizer(y, cfg, None)
    updater = None if updater_kw is None else LomoHead(backend=backend, **updater_kw)
    loss = FusedLinearCrossEntropy.apply(Hr, W, br, y, denom, updater, cfg)
    (loss * scale).backward()
    return loss.detach(), Hr.grad, None if br is None else br.grad, W


@pytest.mark.parametrize("softcap,eps,bias,clip", [(None, 0.0, False, None), (2.5, 0.1, True, 0.02)])
def test_step_fp32_equals_reference_and_float64(softcap, eps, bias, clip):
    H, W, b, y = _inputs(seed=6, bias=bias)
    kw = dict(lr=0.5, weight_decay=0.1, loss_scale=8.0, clip_value=clip)
    ref = _run("torch", H, W, b, y, softcap=softcap, eps=eps, updater_kw=kw)
    got = _run("triton", H, W, b, y, softcap=softcap, eps=eps, updater_kw=kw)
    assert abs(got[0].item() - ref[0].item()) <= 1e-6 * abs(ref[0].item())
    assert got[1].dtype == H.dtype and _rel(got[1], ref[1]) <= 1e-5
    if bias:
        assert _rel(got[2], ref[2]) <= 1e-5
    _assert_weights_close(got[3], ref[3], W)
    # the reference against float64 autograd (and torch SGD's rule on the float64 gradient)
    H64, W64 = H.double().requires_grad_(), W.double().requires_grad_()
    b64 = None if b is None else b.double().requires_grad_()
    loss64 = _float64_loss(H64, W64, b64, y, softcap, eps)
    (loss64 * 8.0).backward()
    assert abs(ref[0].item() - loss64.item()) <= 1e-6 * abs(loss64.item())
    assert _rel(ref[1].double(), H64.grad) <= 1e-5
    G = W64.grad / 8.0
    if clip is not None:
        G = G.clamp(-clip, clip)
    W_exact = W64.detach() * (1 - 0.5 * 0.1) - 0.5 * G
    assert (ref[3].double() - W_exact).abs().max().item() <= 1e-5 * (W_exact - W.double()).abs().max().item() + 1e-6


@pytest.mark.parametrize("dtype,rounding", [(torch.bfloat16, "nearest"), (torch.float16, "stochastic")])
def test_step_16bit_equals_reference(dtype, rounding):
    H, W, _, y = _inputs(T=30, d=33, V=141, dtype=dtype, seed=7)
    kw = dict(lr=0.5, weight_decay=0.1, rounding=rounding, seed=3)
    ref = _run("torch", H, W, None, y, softcap=None, eps=0.0, updater_kw=kw, scale=1.0)
    got = _run("triton", H, W, None, y, softcap=None, eps=0.0, updater_kw=kw, scale=1.0)
    assert abs(got[0].item() - ref[0].item()) <= 1e-6 * abs(ref[0].item())
    assert got[1].dtype == dtype
    # dH rounded to 16 bits from fp32 values ≤ 1e-5 apart: within one ulp of the reference's
    assert bool(((got[1].float() - ref[1].float()).abs() <= _ulp(got[1], ref[1])).all())
    _assert_weights_close(got[3], ref[3], W)


def test_all_ignored_batch_gives_zero_and_leaves_w():
    H, W, _, y = _inputs(T=19, d=20, V=90, seed=8, ignored=0)
    y[:] = -100
    loss, gh, _, W_after = _run("triton", H, W, None, y, softcap=None, eps=0.0,
                                updater_kw=dict(lr=0.5, weight_decay=0.0))
    assert loss.item() == 0.0 and bool((gh == 0).all()) and torch.equal(W_after, W)


def test_ignored_tokens_get_no_gradient_and_match_shifted_labels():
    H, W, _, y = _inputs(T=24, d=20, V=90, seed=9, ignored=0)
    y = shift_labels(y)  # the last position ignored, as fused_linear_cross_entropy(shift=True)
    y[3:7] = -100
    ref = _run("torch", H, W, None, y, softcap=None, eps=0.0, updater_kw=None)
    got = _run("triton", H, W, None, y, softcap=None, eps=0.0, updater_kw=None)
    assert abs(got[0].item() - ref[0].item()) <= 1e-6 * abs(ref[0].item())
    assert bool((got[1][y == -100] == 0).all()) and _rel(got[1], ref[1]) <= 1e-5
    assert torch.equal(got[3], W)  # no updater: W untouched


def test_norm_phase_equals_reference():
    H, W, _, y = _inputs(T=26, d=30, V=100, seed=10)
    out = {}
    for backend in ("torch", "triton"):
        stats = torch.zeros(2, device=DEVICE)
        cfg = _cfg(backend, H, W, 48)
        loss = FusedLinearCrossEntropy.apply(H.clone().requires_grad_(), W, None, y, lce.normalizer(y, cfg, None),
                                             NormHead(stats, loss_scale=4.0, backend=backend), cfg)
        (loss * 4.0).backward()
        out[backend] = stats
    assert abs(out["triton"][0].item() - out["torch"][0].item()) <= 1e-5 * out["torch"][0].item()
    assert out["triton"][1].item() == out["torch"][1].item() == 0.0


def test_triton_backend_reaches_the_kernels(monkeypatch):
    calls = []
    for name in ("_lse_kernel", "_dlogits_kernel", "_grad_hidden_kernel", "_rows_update_kernel"):
        kernel = getattr(tlce, name)

        class Counting:
            def __init__(self, k, n):
                self.k, self.n = k, n

            def __getitem__(self, grid):
                calls.append(self.n)
                return self.k[grid]
        monkeypatch.setattr(tlce, name, Counting(kernel, name))
    H, W, _, y = _inputs(T=17, d=16, V=70, seed=11)
    _run("triton", H, W, None, y, softcap=None, eps=0.0, updater_kw=dict(lr=0.1), chunk=32)
    # 1 forward launch; per chunk (3 of them): dlogits, dH, the rows update
    assert calls.count("_lse_kernel") == 1
    assert calls.count("_dlogits_kernel") == calls.count("_grad_hidden_kernel") == calls.count("_rows_update_kernel") == 3
    calls.clear()
    _run("torch", H, W, None, y, softcap=None, eps=0.0, updater_kw=dict(lr=0.1), chunk=32)
    assert calls == []


def test_fake_tensor_mode_with_triton_backend():
    from torch._subclasses.fake_tensor import FakeTensorMode

    H, W, _, y = _inputs(T=17, d=16, V=70, seed=12)
    cfg = _cfg("triton", H, W, 32)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        Hf, Wf, yf = mode.from_tensor(H).requires_grad_(), mode.from_tensor(W), mode.from_tensor(y)
        loss = FusedLinearCrossEntropy.apply(Hf, Wf, None, yf, lce.normalizer(yf, cfg, None),
                                             LomoHead(lr=0.1, backend="triton"), cfg)
        loss.backward()
        assert loss.shape == () and Hf.grad.shape == H.shape


def test_auto_on_cpu_is_not_triton():
    # "auto" on CPU tensors resolves to cpu/torch (the reference loss math): the interpreter is for tests only
    if DEVICE != "cpu":
        pytest.skip("CPU tensors only")
    H, W, _, _ = _inputs(T=4, d=4, V=8)
    assert _cfg("auto", H, W).backend in ("cpu", "torch")
    assert math.isfinite(_cfg("triton", H, W).chunk_size)


# --- register spills (compiled for sm_86 / sm_90 without a GPU) -----------------------------------

def test_kernels_compile_without_register_spills(tmp_path):
    """scripts/triton_lce_spills.py compiles every launch variant (forward / dlogits for each input dtype, with
    and without bias + softcap + smoothing; dH for each weight dtype; the rows update for each weight dtype,
    rounding, plain and AdaLomo-scaled) for sm_86 and sm_90 and reads ptxas -v: no spill, no stack frame.
    In a subprocess without TRITON_INTERPRET (this module sets it). About 35 s on 2 cores."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "spills.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(root / "scripts" / "triton_lce_spills.py"), "--json", str(out)],
                         env=env, capture_output=True, text=True, timeout=600)
    if not out.exists():
        pytest.fail(f"triton_lce_spills.py failed (rc {run.returncode}):\n{run.stderr[-3000:]}")
    rows = json.loads(out.read_text())
    sys.path.insert(0, str(root / "scripts"))
    try:
        import triton_lce_spills
    finally:
        sys.path.pop(0)
    expected = {(f"sm_{a}", triton_lce_spills.variant_name(v)) for a in (86, 90) for v in triton_lce_spills.variants()}
    assert {(r["arch"], r["variant"]) for r in rows} == expected
    spilling = [f"{r['arch']} {r['variant']}: regs {r['registers']}, stack {r['stack_bytes']} B, spill stores "
                f"{r['spill_store_bytes']} B, loads {r['spill_load_bytes']} B"
                for r in rows if r["stack_bytes"] or r["spill_store_bytes"] or r["spill_load_bytes"]]
    assert not spilling, "\n".join(spilling)
    assert run.returncode == 0
