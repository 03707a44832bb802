"""The fused AdamW kernels (lomo_kernels.ops.adamw_update) on every backend against the torch reference,
and the reference against float64 math.

* ``cpu`` (csrc/cpu/adamw.cpp) = ``torch`` (reference_adamw) **bitwise** for w, m, v wherever both see the
  same fp32 gradient: dense and embedding updates always, linear updates with fp32 activations (both
  run ATen's fp32 GEMM on the same row blocks). With 16-bit activations the compiled GEMM is MKL's
  bf16/fp16 one, whose fp32 sums are ordered differently: there fp32 results agree to 1e-6 of the
  update and 16-bit ones round the same except where the two fp32 values straddle a rounding point.
* the non-finite guard: the same elements kept, with their old w, m, v bits, and the same count.
* the reference's fp32 arithmetic against the same step in float64.
* the compiled embedding updates sum duplicate tokens in a fixed order: bitwise the same with 1 or 2
  OpenMP threads.
"""
import math
import os
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

from lomo_kernels.backends import available_backends
from lomo_kernels.ops import adamw_update as ops

CPU = available_backends()["cpu"].available
TRITON = available_backends()["triton"].available
needs_cpu = pytest.mark.skipif(not CPU, reason="the cpu backend (lomo_kernels._C) is not built")

W_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
S_DTYPES = [torch.float32, torch.bfloat16]
KINDS = ["linear", "embedding", "dense"]
SHAPE = (67, 45)  # odd: partial SIMD spans, no dimension a multiple of 16


def bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def rule_for(kind_of_rule, t, stochastic, **kw):
    make = ops.AdamRule.torch_adamw if kind_of_rule == "torch" else ops.AdamRule.apollo_adamw
    return make(0.01, (0.9, 0.99), 1e-8 if kind_of_rule == "torch" else 1e-6, 0.1, t, stochastic=stochastic,
                state_stochastic=stochastic, **kw)


def make_inputs(kind, w_dtype, s_dtype, gen, act_dtype=torch.float32, tokens=29):
    out_f, in_f = SHAPE
    w = torch.randn(out_f, in_f, generator=gen).to(w_dtype)
    m = (torch.randn(out_f, in_f, generator=gen) * 0.1).to(s_dtype)
    v = (torch.rand(out_f, in_f, generator=gen) * 0.01).to(s_dtype)
    if kind == "linear":
        args = (torch.randn(tokens, in_f, generator=gen).to(act_dtype),
                torch.randn(tokens, out_f, generator=gen).to(act_dtype))
    elif kind == "embedding":  # duplicates, and a padding row
        args = (torch.randint(0, out_f, (3, tokens // 3), generator=gen),
                torch.randn(3, tokens // 3, in_f, generator=gen).to(act_dtype))
    else:
        args = (torch.randn(out_f, in_f, generator=gen).to(w_dtype),)
    return w, m, v, args


def run(kind, backend, w, m, v, args, rule, counter=True):
    w, m, v = w.clone(), m.clone(), v.clone()
    c = torch.zeros(1, dtype=torch.int64, device=w.device) if counter else None
    kw = dict(backend=backend, nonfinite=c)
    if kind == "linear":
        ops.adamw_linear_update_(w, m, v, *args, rule, **kw)
    elif kind == "embedding":
        ops.adamw_embedding_update_(w, m, v, *args, rule, padding_idx=5, **kw)
    else:
        ops.adamw_dense_update_(w, m, v, *args, rule, **kw)
    return w, m, v, None if c is None else int(c)


@needs_cpu
@pytest.mark.parametrize("rule_kind", ["torch", "apollo"])
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("s_dtype", S_DTYPES, ids=str)
@pytest.mark.parametrize("w_dtype", W_DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_kernel_is_bitwise_the_reference(kind, w_dtype, s_dtype, stochastic, rule_kind):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{kind}{w_dtype}{s_dtype}{stochastic}{rule_kind}".encode()))
    w0, m0, v0, args = make_inputs(kind, w_dtype, s_dtype, gen)
    state = (w0, m0, v0)
    for t in (1, 2, 3):  # three steps, each from the other's result: the state path is exercised too
        rule = rule_for(rule_kind, t, stochastic, inv_loss_scale=0.5, clip_value=1.5, coef=0.7, seed=11 + t)
        ref = run(kind, "torch", *state, args, rule)
        ours = run(kind, "cpu", *state, args, rule)
        for a, b in zip(ref[:3], ours[:3]):
            assert torch.equal(bits(a), bits(b))
        assert ref[3] == ours[3] == 0
        state = ref[:3]
    assert not torch.equal(state[0], w0)


@needs_cpu
@pytest.mark.parametrize("kind", ["embedding", "dense"])
def test_cpu_roots_of_zero_second_moments_are_the_reference(kind):
    """The cpu kernels send only nonzero new v through at::sqrt (MKL's sqrt is ~7x slower on zeros): pieces
    (16384 elements) all zero, mixed and without zeros, signed zeros, an embedding's never-touched rows."""
    gen = torch.Generator().manual_seed(7)
    rows, dim = 613, 67  # 41071 elements: three pieces, the last partial
    w = torch.randn(rows, dim, generator=gen)
    m = torch.randn(rows, dim, generator=gen) * 0.1
    v = torch.rand(rows, dim, generator=gen) * 0.01
    zero = torch.zeros(rows, dim, dtype=torch.bool)
    zero[:250] = True                                            # the first piece (and then some) all zero
    zero[300:450] = torch.rand(150, dim, generator=gen) < 0.5    # mixed
    m[zero], v[zero] = 0.0, 0.0
    v[:250:7] = -0.0
    if kind == "embedding":  # touched rows among the zero ones and the others; every other row gets g = 0
        ids = torch.cat([torch.arange(0, 250, 31), torch.arange(300, 450, 13), torch.arange(500, 613, 17)])
        args = (ids, torch.randn(ids.numel(), dim, generator=gen))
    else:
        g = torch.randn(rows, dim, generator=gen)
        g[zero] = 0.0
        args = (g,)
    rule = rule_for("torch", 2, False)
    ref = run(kind, "torch", w, m, v, args, rule)
    ours = run(kind, "cpu", w, m, v, args, rule)
    for a, b in zip(ref[:3], ours[:3]):
        assert torch.equal(bits(a), bits(b))
    assert not torch.equal(ref[0], w)


# LOMO_CPU_SIMD: unset or "1" the widest epilogue the CPU has (AVX-512 or AVX2), "avx2" at most AVX2, "0" the
# scalar loop.
SIMD = [pytest.param("1", id="widest"), pytest.param("avx2", id="avx2"), pytest.param("0", id="scalar")]


@needs_cpu
@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("s_dtype", S_DTYPES, ids=str)
@pytest.mark.parametrize("w_dtype", W_DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_vector_and_scalar_epilogues_agree(kind, w_dtype, s_dtype, simd, monkeypatch):
    """Every epilogue equals the reference bit for bit: both rules (apollo's divides the denominator),
    nearest and stochastic rounding, value clipping, and the non-finite guard (old w, m, v bits kept,
    the same count). SHAPE leaves a tail after the last 8 or 16 lanes of every span; fp16 weights
    always take the scalar loop."""
    monkeypatch.setenv("LOMO_CPU_SIMD", simd)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{kind}{w_dtype}{s_dtype}".encode()))
    w0, m0, v0, args = make_inputs(kind, w_dtype, s_dtype, gen)
    v0.view(-1)[9] = float("inf")
    for a in args:
        if a.is_floating_point():
            poison(a, gen)
    for rule_kind in ("torch", "apollo"):
        for stochastic in (False, True):
            rule = rule_for(rule_kind, 2, stochastic, inv_loss_scale=0.5, clip_value=1.5, coef=0.7, seed=3)
            ref, ours = run(kind, "torch", w0, m0, v0, args, rule), run(kind, "cpu", w0, m0, v0, args, rule)
            for a, b in zip(ref[:3], ours[:3]):
                assert torch.equal(bits(a), bits(b))
            assert ours[3] == ref[3] > 0


@needs_cpu
@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("w_dtype", W_DTYPES, ids=str)
def test_cpu_linear_with_16bit_activations(w_dtype, act_dtype):
    """The compiled GEMM of 16-bit operands sums in another order than the reference's fp32 matmul: fp32
    results agree to 1e-6 of the update; 16-bit ones are equal where the fp32 values do not straddle a
    rounding point (>= 97% of elements) and never more than one unit in the last place apart."""
    gen = torch.Generator().manual_seed(5)
    w0, m0, v0, args = make_inputs("linear", w_dtype, torch.float32, gen, act_dtype=act_dtype, tokens=37)
    rule = rule_for("torch", 1, w_dtype != torch.float32, seed=9)
    (wr, mr, vr, _), (wc, mc, vc, _) = run("linear", "torch", w0, m0, v0, args, rule), \
        run("linear", "cpu", w0, m0, v0, args, rule)
    for ours, ref in ((mc, mr), (vc, vr)):
        assert ((ours - ref).abs().max() / ref.abs().max()).item() <= 1e-6
    upd = (wr.double() - w0.double()).abs().max()
    if w_dtype == torch.float32:
        assert ((wc.double() - wr.double()).abs().max() / upd).item() <= 1e-6
    else:
        assert (wc == wr).double().mean().item() >= 0.97
        ulp = (bits(wc).to(torch.int32) - bits(wr).to(torch.int32)).abs()
        assert int(ulp.max()) <= 1


def test_reference_against_float64():
    """The reference's fp32 step (torch_adamw and apollo_adamw foldings, with loss scale, clipping, coef)
    against the same formulas in float64 from the float64 gradient."""
    gen = torch.Generator().manual_seed(6)
    out_f, in_f, tokens = 53, 71, 33
    w0 = torch.randn(out_f, in_f, generator=gen)
    m0 = torch.randn(out_f, in_f, generator=gen) * 0.01
    v0 = torch.rand(out_f, in_f, generator=gen) * 1e-4
    x, dy = torch.randn(tokens, in_f, generator=gen), torch.randn(tokens, out_f, generator=gen)
    for kind_of_rule in ("torch", "apollo"):
        rule = rule_for(kind_of_rule, 4, False, inv_loss_scale=0.25, clip_value=2.0, coef=0.8)
        w, m, v = w0.clone(), m0.clone(), v0.clone()
        ops.adamw_linear_update_(w, m, v, x, dy, rule, backend="torch")
        g = (dy.double().t() @ x.double() * rule.inv_loss_scale).clamp(-rule.clip_value, rule.clip_value) * rule.coef
        m64 = rule.beta1 * m0.double() + (1 - rule.beta1) * g
        v64 = rule.beta2 * v0.double() + (1 - rule.beta2) * g * g
        w64 = rule.decay * w0.double() - rule.step * m64 / (v64.sqrt() / rule.denom_div + rule.eps)
        assert ((m.double() - m64).abs().max() / m64.abs().max()).item() < 1e-6
        assert ((v.double() - v64).abs().max() / v64.abs().max()).item() < 1e-6
        assert ((w.double() - w64).abs().max() / (w64 - w0.double()).abs().max()).item() < 1e-5


def test_apollo_folding_is_apollo_torchs_arithmetic():
    """apollo_adamw: bias correction in the step size, ε after √v, weight decay on the updated weight."""
    lr, (b1, b2), eps, wd, t = 0.01, (0.9, 0.99), 1e-6, 0.1, 3
    rule = ops.AdamRule.apollo_adamw(lr, (b1, b2), eps, wd, t)
    w, m, v, g = 0.3, 0.02, 1e-4, 0.05
    m1, v1 = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    want = (w - lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m1 / (math.sqrt(v1) + eps)) * (1 - lr * wd)
    got = rule.decay * w - rule.step * m1 / (math.sqrt(v1) / rule.denom_div + rule.eps)
    assert got == pytest.approx(want, rel=1e-12)


# --- the non-finite guard -------------------------------------------------------------------------------

def poison(t, gen, n=5):
    flat = t.view(-1)
    for k, i in enumerate(torch.randperm(flat.numel(), generator=gen)[:n].tolist()):
        flat[i] = (float("nan"), float("inf"), -float("inf"))[k % 3]
    return t


BACKENDS = ["cpu"] * CPU + ["triton"] * TRITON


@pytest.mark.skipif(not BACKENDS, reason="neither the cpu nor the triton backend is available")
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_guard_keeps_w_m_v_and_counts_like_the_reference(kind, w_dtype, stochastic):
    s_dtype = torch.bfloat16 if w_dtype == torch.bfloat16 else torch.float32
    gen = torch.Generator().manual_seed(7)
    w0, m0, v0, args = make_inputs(kind, w_dtype, s_dtype, gen)
    w0.view(-1)[4] = float("nan")   # already non-finite: kept and counted
    v0.view(-1)[9] = float("inf")   # a poisoned moment: kept (w finite, but v is not), counted
    for a in args:
        if a.is_floating_point():
            poison(a, gen)
    rule = rule_for("torch", 2, stochastic, seed=5)
    ref = run(kind, "torch", w0, m0, v0, args, rule)
    bad = (bits(ref[0]) == bits(w0)) & (bits(ref[1]) == bits(m0)) & (bits(ref[2]) == bits(v0))
    assert ref[3] > 2 and int(bad.sum()) >= ref[3]
    assert int((~torch.isfinite(ref[0])).sum()) == 1 and int((~torch.isfinite(ref[2])).sum()) == 1
    for backend in BACKENDS:
        if backend == "triton" and kind != "linear":
            continue  # the triton backend runs the reference for embedding and dense updates
        ours = run(kind, backend, w0, m0, v0, args, rule)
        assert ours[3] == ref[3]
        for a, b in zip(ref[:3], ours[:3]):
            if backend == "cpu":
                assert torch.equal(bits(a), bits(b))
            else:  # Triton's tl.dot sums in another order: the guarded elements are the same ones
                assert torch.equal(torch.isfinite(a), torch.isfinite(b))


def test_reference_guard_counts_exactly_the_elements_torch_adamw_makes_non_finite():
    """fp32: the count equals the elements of (w, m, v) that torch.optim.AdamW's own step makes
    non-finite, every other element is torch's result."""
    gen = torch.Generator().manual_seed(8)
    p0 = torch.randn(40, 30, generator=gen)
    grad = poison(torch.randn(40, 30, generator=gen), gen, n=7)
    p = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([p], lr=0.01, weight_decay=0.1, foreach=False)
    p.grad = grad.clone()
    opt.step()
    st = opt.state[p]
    bad = ~(torch.isfinite(p.detach()) & torch.isfinite(st["exp_avg"]) & torch.isfinite(st["exp_avg_sq"]))
    for backend in ["torch"] + ["cpu"] * CPU:
        w, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
        c = torch.zeros(1, dtype=torch.int64)
        ops.adamw_dense_update_(w, m, v, grad, ops.AdamRule.torch_adamw(0.01, (0.9, 0.999), 1e-8, 0.1, 1),
                                backend=backend, nonfinite=c)
        assert int(c) == int(bad.sum()) == 7
        assert torch.equal(w[bad], p0[bad]) and not m[bad].any() and not v[bad].any()
        torch.testing.assert_close(w[~bad], p.detach()[~bad], rtol=1e-6, atol=1e-7)


@needs_cpu
def test_compiled_op_checks_before_writing():
    w = torch.randn(5, 4)
    m, v = torch.zeros(5, 4), torch.zeros(5, 3)
    before = w.clone()
    rule = ops.AdamRule.torch_adamw(0.1, (0.9, 0.999), 1e-8, 0.0, 1)
    args = (rule.decay, rule.step, rule.beta1, rule.beta2, rule.denom_div, rule.eps, 1.0, math.inf, 1.0, False,
            False, 0, None, 0)
    with pytest.raises(RuntimeError, match="exp_avg and exp_avg_sq must be contiguous float32 or bfloat16"):
        torch.ops.lomo_kernels_C.adamw_linear_update(w, m, v, torch.randn(2, 4), torch.randn(2, 5), *args)
    with pytest.raises(RuntimeError, match="expected x"):
        torch.ops.lomo_kernels_C.adamw_linear_update(w, m, torch.zeros(5, 4), torch.randn(2, 3), torch.randn(2, 5),
                                                     *args)
    assert torch.equal(w, before)
    with pytest.raises(ValueError, match="nonfinite must be an int64 tensor"):
        ops.adamw_dense_update_(w, m, torch.zeros(5, 4), torch.randn(5, 4), rule, nonfinite=torch.zeros(1))


# --- thread-count independence of the compiled embedding updates ---------------------------------------

_EMBEDDING_SCRIPT = textwrap.dedent("""
    import sys, torch
    from lomo_kernels import ops
    from lomo_kernels.ops import adamw_update as aops
    gen = torch.Generator().manual_seed(0)
    vocab, dim = 300, 131                       # 300 x 131 > the kernels' parallel grain
    idx = torch.randint(0, 120, (4, 64), generator=gen)   # many duplicate tokens
    # non-dyadic values: their sums depend on the order they are added in
    dy = (torch.rand(4, 64, dim, generator=gen) * 3.3 - 1.1) / 7.0
    w = torch.randn(vocab, dim, generator=gen) / 3.0
    ops.embedding_update_(w, idx, dy, lr=0.1, weight_decay=0.01, backend="cpu")
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    aops.adamw_embedding_update_(w, m, v, idx, dy, aops.AdamRule.torch_adamw(0.01, (0.9, 0.99), 1e-8, 0.1, 1),
                                 backend="cpu")
    torch.save((w, m, v), sys.argv[1])
""")


@needs_cpu
def test_embedding_updates_do_not_depend_on_the_thread_count(tmp_path):
    results = []
    for threads in ("1", "2"):
        out = tmp_path / f"result{threads}.pt"
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        subprocess.run([sys.executable, "-c", _EMBEDDING_SCRIPT, str(out)], check=True, env=env, timeout=300)
        results.append(torch.load(out))
    for a, b in zip(*results):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


# --- the cuda backend (a machine with a GPU; compile checks in test_cuda_build.py) ----------------------

def _cuda_available():
    return torch.cuda.is_available() and available_backends()["cuda"].available


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_available(), reason="needs a GPU and the cuda backend")
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("s_dtype", S_DTYPES, ids=str)
@pytest.mark.parametrize("w_dtype", W_DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["embedding", "dense"])
def test_cuda_rows_and_dense_are_bitwise_the_cpu_reference(kind, w_dtype, s_dtype, stochastic):
    """Same fp32 gradient (dense: given; embedding: duplicates summed in token order on both), same
    per-element math: the CUDA kernels equal the reference run on the GPU (torch's CUDA sqrt is IEEE, as the
    kernels'; on CPU torch's is not) bit for bit, guard included."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"cuda{kind}{w_dtype}{s_dtype}{stochastic}".encode()))
    w0, m0, v0, args = make_inputs(kind, w_dtype, s_dtype, gen)
    poison(args[-1], gen)
    rule = rule_for("torch", 2, stochastic, inv_loss_scale=0.5, clip_value=1.5, coef=0.7, seed=3)
    on_gpu = (w0.cuda(), m0.cuda(), v0.cuda(), tuple(a.cuda() for a in args))
    ref = run(kind, "torch", *on_gpu, rule)
    ours = run(kind, "cuda", *on_gpu, rule)
    assert ours[3] == ref[3] > 0
    for a, b in zip(ref[:3], ours[:3]):
        assert torch.equal(bits(a.cpu()), bits(b.cpu()))


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_available(), reason="needs a GPU and the cuda backend")
@pytest.mark.parametrize("w_dtype,act_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                               (torch.float32, torch.float16), (torch.bfloat16, torch.bfloat16),
                                               (torch.float16, torch.float16), (torch.bfloat16, torch.float32)],
                         ids=str)
@pytest.mark.parametrize("s_dtype", S_DTYPES, ids=str)
def test_cuda_linear_matches_the_reference(w_dtype, act_dtype, s_dtype):
    """The GEMM tiles sum in their own order: m, v within 1e-5 of the reference's, fp32 weights within
    1e-5 of the update, 16-bit weights equal where the fp32 values do not straddle a rounding point."""
    gen = torch.Generator().manual_seed(12)
    w0, m0, v0, args = make_inputs("linear", w_dtype, s_dtype, gen, act_dtype=act_dtype, tokens=77)
    rule = rule_for("torch", 1, w_dtype != torch.float32, seed=2)
    ref = run("linear", "torch", w0, m0, v0, args, rule)
    ours = [t.cpu() if isinstance(t, torch.Tensor) else t
            for t in run("linear", "cuda", w0.cuda(), m0.cuda(), v0.cuda(), tuple(a.cuda() for a in args), rule)]
    tol = 1e-5 if s_dtype == torch.float32 else 2 ** -7
    for a, b in zip(ref[1:3], ours[1:3]):
        assert ((a.float() - b.float()).abs().max() / a.float().abs().max()).item() <= tol
    if w_dtype == torch.float32:
        upd = (ref[0] - w0).abs().max()
        assert ((ours[0] - ref[0]).abs().max() / upd).item() <= 1e-5
    else:
        assert (ours[0] == ref[0]).double().mean().item() >= 0.97


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_available(), reason="needs a GPU and the cuda backend")
def test_cuda_linear_refuses_mixed_16bit_dtypes_before_writing():
    w = torch.randn(16, 8, dtype=torch.bfloat16, device="cuda")
    before = w.clone()
    m, v = torch.zeros(16, 8, device="cuda"), torch.zeros(16, 8, device="cuda")
    x, dy = torch.randn(4, 8, dtype=torch.float16, device="cuda"), torch.randn(4, 16, dtype=torch.float16, device="cuda")
    with pytest.raises((RuntimeError, ValueError), match="16-bit weights need activations of the weight.s own dtype"):
        ops.adamw_linear_update_(w, m, v, x, dy, rule_for("torch", 1, False), backend="cuda")
    assert torch.equal(w, before)
