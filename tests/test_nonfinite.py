"""A bad batch never makes a weight non-finite (issue 10, item 1; docs/reliability.md):

* a non-finite loss skips the step before any backward, in every mode and dtype;
* ``on_nonfinite="skip_step"`` (the default for fp16) runs the norm phase every step: an inf that first
  appears part-way through the backward (in one layer's dy) skips the step, every weight bit-identical;
* ``on_nonfinite="raise"``: the same, then ``FloatingPointError``;
* ``on_nonfinite="partial"`` (the default for fp32/bf16): every weight element whose own update is not
  finite keeps its old value, on every backend, and is counted (``last_nonfinite_updates``).
"""
import pytest
import torch

import lomo_kernels as lk
from lomo_kernels.testing import tiny_llama

OPTIMIZERS = {"lomo": lambda m, **kw: lk.Lomo(m, lr=0.1, **kw), "adalomo": lambda m, **kw: lk.AdaLomo(m, lr=0.1, **kw)}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def unchanged(model, before):
    return all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def poison_layer(model, value):
    """Make one decoder layer's output gradient non-finite (it first appears mid-backward)."""
    def hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        out.register_hook(lambda g: torch.full_like(g, value))
    return model.model.layers[0].register_forward_hook(hook)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("mode", [None, "skip_step", "partial"])
def test_non_finite_loss_skips_the_step(name, dtype, mode):
    model = tiny_llama().to(dtype)
    opt = OPTIMIZERS[name](model, on_nonfinite=mode)
    ids = torch.randint(0, 97, (2, 9))
    before = snapshot(model)
    for bad in (float("nan"), float("inf")):
        opt.fused_backward(model(input_ids=ids, labels=ids).loss * bad, 0.1)
        assert opt.skipped_step and unchanged(model, before)
    assert opt.skipped_steps == 2 and opt.step_count == 0
    opt.fused_backward(model(input_ids=ids, labels=ids).loss, 0.1)  # a good batch still trains
    assert not opt.skipped_step and not unchanged(model, before)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("value", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_skip_step_mode_catches_a_non_finite_gradient_mid_backward(name, dtype, value):
    model = tiny_llama().to(dtype)
    opt = OPTIMIZERS[name](model, on_nonfinite="skip_step")
    ids = torch.randint(0, 97, (2, 9))
    before = snapshot(model)
    handle = poison_layer(model, value)
    opt.fused_backward(model(input_ids=ids, labels=ids).loss, 0.1)
    assert opt.skipped_step and unchanged(model, before)
    handle.remove()
    opt.fused_backward(model(input_ids=ids, labels=ids).loss, 0.1)
    assert not opt.skipped_step and all(torch.isfinite(p).all() for p in model.parameters())


def test_raise_mode_raises_after_changing_nothing():
    model = tiny_llama()
    opt = lk.Lomo(model, lr=0.1, on_nonfinite="raise")
    ids = torch.randint(0, 97, (2, 9))
    before = snapshot(model)
    poison_layer(model, float("inf"))
    with pytest.raises(FloatingPointError, match="non-finite gradient at step 1"):
        opt.fused_backward(model(input_ids=ids, labels=ids).loss, 0.1)
    assert unchanged(model, before)
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        opt.fused_backward(model(input_ids=ids, labels=ids).loss * float("nan"), 0.1)


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match=r"on_nonfinite must be one of .*'ignore'"):
        lk.Lomo(tiny_llama(), on_nonfinite="ignore")


# --- partial mode: the per-element guard and its count ------------------------------------------------

from lomo_kernels import ops  # noqa: E402
from lomo_kernels.backends import available_backends  # noqa: E402
from lomo_kernels.ops import adalomo_stats  # noqa: E402

COMPILED = [b for b in ("cpu",) if available_backends()[b].available]
TRITON = available_backends()["triton"].available  # CPU tensors: only under TRITON_INTERPRET=1


def bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def counter():
    return torch.zeros(1, dtype=torch.int64)


def poisoned(*shape, n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=gen)
    flat = t.view(-1)
    picks = torch.randperm(flat.numel(), generator=gen)[:n]
    for k, i in enumerate(picks.tolist()):
        flat[i] = (float("nan"), float("inf"), -float("inf"))[k % 3]
    return t


def run_update(kind, w, backend, rounding, clip_value, weight_decay=0.01):
    c = counter()
    kw = dict(lr=0.1, weight_decay=weight_decay, rounding=rounding, seed=7, backend=backend, nonfinite=c)
    if kind == "linear":
        x, dy = poisoned(11, w.shape[1], n=2, seed=1), poisoned(11, w.shape[0], n=3, seed=2)
        ops.linear_update_(w, x, dy, clip_value=clip_value, **kw)
    elif kind == "dense":
        ops.dense_update_(w, poisoned(*w.shape, n=9, seed=3), clip_value=clip_value, **kw)
    elif kind == "embedding":
        idx = torch.tensor([[3, 5, 3, 0], [7, 5, 1, 3]])
        ops.embedding_update_(w, idx, poisoned(2, 4, w.shape[1], n=5, seed=4), clip_value=clip_value,
                              padding_idx=1, **kw)
    else:  # adalomo's update with value clipping: the compiled op on cpu, the reference on torch
        x, dy = poisoned(11, w.shape[1], n=2, seed=1), poisoned(11, w.shape[0], n=3, seed=2)
        gen = torch.Generator().manual_seed(5)
        row, col = torch.rand(w.shape[0], generator=gen) + 0.5, torch.rand(w.shape[1], generator=gen) + 0.5
        row[2] = float("inf")
        adalomo_stats.adalomo_linear_update_(w, x, dy, row, col, clip_value=clip_value or 0.7, **kw)
    return int(c)


@pytest.mark.skipif(not COMPILED, reason="the cpu backend is not built")
@pytest.mark.parametrize("clip_value", [None, 0.5])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["linear", "dense", "embedding", "adalomo"])
def test_guard_and_count_are_bit_identical_on_reference_and_cpu(kind, dtype, rounding, clip_value):
    shape = (37, 45) if kind != "embedding" else (9, 21)
    w0 = torch.randn(*shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    w0.view(-1)[4] = float("nan")  # an element that is already non-finite stays so, counted
    results = {}
    for backend in ("torch", "cpu"):
        w = w0.clone()
        results[backend] = (w, run_update(kind, w, backend, rounding, clip_value))
    (wt, ct), (wc, cc) = results["torch"], results["cpu"]
    assert ct == cc and ct > 1
    assert torch.equal(bits(wt), bits(wc))
    kept = torch.isnan(wt.view(-1)[4])
    assert bool(kept)
    assert int((~torch.isfinite(wt)).sum()) == 1  # only the element that was already NaN
    # every guarded element kept its old bits; the count is the number of such elements plus the NaN one
    changed = bits(wt) != bits(w0)
    assert ct >= 1 and int((~changed).sum()) >= ct


@pytest.mark.skipif(not TRITON, reason="the triton backend is not available (TRITON_INTERPRET=1 on CPU)")
@pytest.mark.parametrize("clip_value", [None, 0.5])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["linear", "dense", "embedding"])
def test_guard_and_count_on_triton_match_the_reference(kind, dtype, rounding, clip_value):
    shape = (37, 45) if kind != "embedding" else (9, 21)
    w0 = torch.randn(*shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    w0.view(-1)[4] = float("nan")
    wt, wr = w0.clone(), w0.clone()
    ct = run_update(kind, wt, "triton", rounding, clip_value)
    cr = run_update(kind, wr, "torch", rounding, clip_value)
    assert ct == cr > 1
    if kind == "linear" and dtype == torch.float32:
        # two GEMM summation orders (the reference's blocks, the kernel's tiles): the kept elements are the old
        # bits in both, the updated ones agree to fp32 rounding
        kept = bits(wr) == bits(w0)
        assert torch.equal(kept, bits(wt) == bits(w0))
        torch.testing.assert_close(wt[~kept], wr[~kept], rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(bits(wt), bits(wr))


@pytest.mark.parametrize("backend", ["torch"] + COMPILED)
def test_guard_count_matches_the_unguarded_rule(backend):
    """The count is exactly the number of elements the unguarded rule would make non-finite, and every
    other element is what the unguarded rule gives."""
    w0 = torch.randn(37, 45)
    x, dy = poisoned(11, 45, n=2, seed=1), poisoned(11, 37, n=3, seed=2)
    w = w0.clone()
    c = counter()
    ops.linear_update_(w, x, dy, lr=0.1, backend=backend, nonfinite=c)  # a counter: the guarded path
    expect = w0 - 0.1 * (dy.t() @ x)
    bad = ~torch.isfinite(expect)
    assert int(c) == int(bad.sum()) > 0
    assert torch.equal(w[bad], w0[bad])
    torch.testing.assert_close(w[~bad], expect[~bad])


def test_counter_is_checked():
    w = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="nonfinite must be an int64 tensor of shape"):
        ops.linear_update_(w, torch.zeros(2, 4), torch.zeros(2, 3), lr=0.1, nonfinite=torch.zeros(1))


def unfused_sgd_bad_count(model, lr, ids, value):
    """Elements plain SGD (p - lr*grad on an unfused copy, same poisoned backward) would make non-finite."""
    import copy
    ref = copy.deepcopy(model)
    handle = poison_layer(ref, value)
    ref(input_ids=ids, labels=ids).loss.backward()
    handle.remove()
    return sum(int((~torch.isfinite(p.detach().float() - lr * p.grad.float())).sum()) for p in ref.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("value", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_partial_mode_keeps_every_element_whose_update_is_not_finite(name, dtype, value, caplog):
    torch.manual_seed(0)
    model = tiny_llama().to(dtype)
    ids = torch.randint(0, 97, (2, 9))
    runs = {}
    for backend in ["torch"] + COMPILED:
        m = tiny_llama().to(dtype)
        m.load_state_dict(model.state_dict())
        opt = OPTIMIZERS[name](m, backend=backend)
        assert opt.on_nonfinite == "partial"
        before = snapshot(m)
        handle = poison_layer(m, value)
        with caplog.at_level("WARNING", logger="lomo_kernels"):
            opt.fused_backward(m(input_ids=ids, labels=ids).loss, 0.1)
        handle.remove()
        assert not opt.skipped_step and opt.step_count == 1
        assert all(torch.isfinite(p).all() for p in m.parameters())
        assert opt.last_nonfinite_updates > 0 and opt.partial_steps == 1
        assert opt.nonfinite_updates == opt.last_nonfinite_updates
        assert "applied partially" in caplog.text
        # the layers after the poisoned one (their gradients are finite) were updated
        assert not torch.equal(m.model.layers[1].mlp.down_proj.weight, before[[n for n, _ in m.named_parameters()].index(
            "model.layers.1.mlp.down_proj.weight")])
        runs[backend] = (m, opt.last_nonfinite_updates)
        # a clean step afterwards counts nothing
        opt.fused_backward(m(input_ids=ids, labels=ids).loss, 0.1)
        assert opt.last_nonfinite_updates == 0 and opt.partial_steps == 1
        assert all(torch.isfinite(p).all() for p in m.parameters())
    if name == "lomo" and dtype == torch.float32:
        # every element SGD would make non-finite was kept and counted, no other
        assert runs["torch"][1] == unfused_sgd_bad_count(model, 0.1, ids, value)
    if len(runs) == 2:
        (mt, ct), (mc, cc) = runs["torch"], runs["cpu"]
        assert ct == cc


def test_skip_step_mode_passes_no_counter():
    model = tiny_llama()
    opt = lk.Lomo(model, lr=0.1, on_nonfinite="skip_step")
    ids = torch.randint(0, 97, (2, 9))
    opt.fused_backward(model(input_ids=ids, labels=ids).loss, 0.1)
    assert opt.last_nonfinite_updates == 0 and not opt._nonfinite_counters


def test_partial_steps_reach_the_cli_summary():
    from pathlib import Path

    from lomo_kernels.training.optimizers import FusedRunner
    from lomo_kernels.training.report import summarize

    model = tiny_llama()
    runner = FusedRunner(lk.Lomo(model, lr=0.1), needs_norm_pass=False)
    ids = torch.randint(0, 97, (2, 9))
    handle = poison_layer(model, float("inf"))
    info = runner.step(model(input_ids=ids, labels=ids).loss, 0.1)
    handle.remove()
    assert not info.skipped and info.nonfinite_updates > 0
    clean = runner.step(model(input_ids=ids, labels=ids).loss, 0.1)
    assert clean.nonfinite_updates == 0
    history = [{"type": "train", "step": i + 1, "loss": 1.0, "skipped": s.skipped, "nonfinite_updates": s.nonfinite_updates,
                "tokens_per_s": 1.0, "peak_memory_mb": 1.0} for i, s in enumerate([info, clean])]
    summary = summarize(history, Path("run"), 1.0, torch.device("cpu"))
    assert summary["numbers"]["partial_steps"] == 1
    assert summary["numbers"]["nonfinite_updates"] == info.nonfinite_updates
    assert f"1 ({info.nonfinite_updates} weight elements)" in summary["table"]


# --- AdamW and Apollo (issue 10 item 1 for the adaptive rules) -------------------------------------------

ADAPTIVE = {"adamw": lambda m, **kw: lk.AdamW(m, lr=0.01, weight_decay=0.1, **kw),
            "apollo": lambda m, **kw: lk.Apollo(m, lr=0.01, rank=2, weight_decay=0.1, update_proj_gap=1, **kw)}


def state_tensors(opt):
    """Every per-parameter state tensor (moments, projectors, limiter seeds), by (name, key)."""
    return {(n, k): t for n, e in opt.state_dict()["state"].items() for k, t in e.items() if k != "prev_norm"}


def torch_adamw_bad_count(model, ids, value):
    """Elements of (p, exp_avg, exp_avg_sq) torch.optim.AdamW's own step (same poisoned backward, same
    settings) makes non-finite."""
    import copy
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(ref.parameters(), lr=0.01, weight_decay=0.1, foreach=False)
    handle = poison_layer(ref, value)
    ref(input_ids=ids, labels=ids).loss.backward()
    handle.remove()
    opt.step()
    bad = 0
    for p in ref.parameters():
        st = opt.state[p]
        bad += int((~(torch.isfinite(p.detach()) & torch.isfinite(st["exp_avg"])
                      & torch.isfinite(st["exp_avg_sq"]))).sum())
    return bad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ADAPTIVE)
@pytest.mark.parametrize("value", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_adaptive_partial_mode_keeps_and_counts_non_finite_updates(name, dtype, value):
    torch.manual_seed(0)
    model = tiny_llama().to(dtype)
    ids = torch.randint(0, 97, (2, 9))
    counts = {}
    for backend in ["torch"] + COMPILED:
        m = tiny_llama().to(dtype)
        m.load_state_dict(model.state_dict())
        opt = ADAPTIVE[name](m, backend=backend)
        assert opt.on_nonfinite == "partial"
        before = snapshot(m)
        handle = poison_layer(m, value)
        opt.fused_backward(m(input_ids=ids, labels=ids).loss, 0.01)
        handle.remove()
        assert not opt.skipped_step and opt.step_count == 1
        assert all(torch.isfinite(p).all() for p in m.parameters())
        assert all(torch.isfinite(t).all() for t in state_tensors(opt).values() if t.is_floating_point())
        unchanged_elements = sum(int((p == q).sum()) for p, q in zip(m.parameters(), before))
        count = opt.last_nonfinite_updates
        assert 0 < count <= unchanged_elements
        if dtype == torch.float32:
            # weight decay moves every finite element: exactly the guarded ones stayed
            assert count == unchanged_elements
        counts[backend] = count
        # the state was not poisoned: a clean step counts nothing and moves every element again
        before = snapshot(m)
        opt.fused_backward(m(input_ids=ids, labels=ids).loss, 0.01)
        assert opt.last_nonfinite_updates == 0 and opt.partial_steps == 1
        assert all(torch.isfinite(p).all() for p in m.parameters())
        if dtype == torch.float32:
            assert all(not torch.equal(p, q) for p, q in zip(m.parameters(), before))
    if name == "adamw" and dtype == torch.float32:
        assert counts["torch"] == torch_adamw_bad_count(model, ids, value)
    assert len(set(counts.values())) == 1, counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ADAPTIVE)
@pytest.mark.parametrize("value", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_adaptive_skip_step_mode_changes_no_weight_and_no_state(name, dtype, value):
    torch.manual_seed(0)
    model = tiny_llama().to(dtype)
    opt = ADAPTIVE[name](model, on_nonfinite="skip_step")
    ids = torch.randint(0, 97, (2, 9))
    opt.fused_backward(model(input_ids=ids, labels=ids).loss, 0.01)  # a clean step: the state is not zero
    before, state = snapshot(model), {k: t.clone() for k, t in state_tensors(opt).items()}
    handle = poison_layer(model, value)
    opt.fused_backward(model(input_ids=ids, labels=ids).loss, 0.01)
    handle.remove()
    assert opt.skipped_step and opt.step_count == 1
    assert unchanged(model, before)
    after = state_tensors(opt)
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], t) for k, t in state.items())
