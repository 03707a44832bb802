"""plan --recommend: candidates measured on fake tensors, ranked by fit and estimated speed (issue 14).

Small models only: the candidate search, its ranking and micro-batch search, the FLOP count of the traced
step (fused ops included), planned peaks against real tracked CPU steps, the CLI and its bad arguments."""
import json
import math
import warnings

import pytest
import torch

from lomo_kernels.memory import planner
from lomo_kernels.memory import recommend as R
from lomo_kernels.memory.planner import load_config, main

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
        "num_attention_heads": 4, "vocab_size": 300, "max_position_embeddings": 128, "tie_word_embeddings": False}
SGD_ADAMW = R.torch_adamw_name()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOMO_KERNELS_CACHE", str(tmp_path / "cache"))  # never the user's cache


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY))
    return str(path)


@pytest.fixture
def deep(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text(json.dumps(TINY | {"num_hidden_layers": 4}))
    return str(path)


# --- the micro-batch search and the ranking (synthetic peaks: exact answers) -----------------------

@pytest.mark.parametrize("peak, budget, expected", [
    (lambda b: 100 + 10 * b, 175, 7),                       # linear: the line's answer, measured
    (lambda b: 100 + 10 * b + (0 if b < 4 else 30 * (b - 4)), 175, 4),   # convex kink beyond batch 2
    (lambda b: 100 + 10 * b, 115, 1),                       # batch 2 does not fit
    (lambda b: 100.0, 500, 16),                             # flat: the cap
])
def test_largest_batch_is_the_largest_measured_size_that_fits(peak, budget, expected):
    seen = []

    def total_at(b):
        seen.append(b)
        return peak(b), {"activations": peak(b)}, None

    errors = []
    b, (t, _, _) = R._largest_batch(total_at, (peak(1), {}, None), budget, 16, errors, slope=10)
    assert b == expected and t <= budget
    assert b == 1 or b in seen                               # the answer was measured, not extrapolated
    assert expected == 16 or peak(expected + 1) > budget     # and it is the largest


def _cand(method, fits, tokens, total, **kw):
    c = R.Candidate(method, False, "sdpa", "single", 1, batch_size=1, fits=fits, total_bytes=total,
                    per_gpu={"params": total}, tokens_per_gpu_s=tokens, flops=1e12 / (tokens or 1), comm_bytes=0)
    c.step_s = None if tokens is None else 1 / tokens
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def test_rank_puts_fitting_fastest_first_and_says_why_each_loser_loses():
    cands = [_cand("sgd", False, None, 50 * 2**30), _cand("lomo", True, 100.0, 10 * 2**30),
             _cand("lora", True, 300.0, 12 * 2**30), _cand("adalomo", True, 100.0, 9 * 2**30)]
    R._rank(cands, 24 * 2**30)
    assert [c.method for c in cands] == ["lora", "adalomo", "lomo", "sgd"]
    assert [c.rank for c in cands] == [1, 2, 3, 4]
    assert cands[0].why.startswith("recommended")
    assert cands[1].why.startswith("3.00x slower")
    assert "does not fit: 50.00 GiB" in cands[3].why and "> 24 GiB" in cands[3].why


# --- FLOPs of the traced step ----------------------------------------------------------------------

def _linear_flops_per_token(cfg):
    h, i, v, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    return 2 * (L * (4 * h * h + 3 * h * i) + v * h)


def test_traced_flops_count_forward_backward_and_the_fused_weight_gradient_gemms(tiny):
    config, s = load_config(tiny), 32
    h, L = TINY["hidden_size"], TINY["num_hidden_layers"]
    attention = L * 4 * s * s * h                        # QKᵀ and PV, all heads
    forward = _linear_flops_per_token(TINY) * s + attention
    flops = {m: R.traced_flops(config, m, "fp32", 1, s, False, None) for m in ("sgd", "lomo", "lora")}
    assert flops["sgd"] == pytest.approx(3 * forward, rel=1e-6)  # backward: input and weight gradients
    # lomo's weight gradients are never built: counted from the fused ops' shapes, the same GEMMs
    assert flops["lomo"] == pytest.approx(flops["sgd"], rel=1e-6)
    # LoRA (rank 8, all 7 linears of each layer): the frozen base's weight gradients are not computed; the
    # adapters cost 2·T·r·(in+out) forward and twice that backward
    r, i = 8, TINY["intermediate_size"]
    adapters = L * 2 * s * r * (4 * (h + h) + 3 * (h + i))
    assert forward + 3 * adapters < flops["lora"] <= 2 * forward + 3 * adapters < flops["sgd"]
    eager = R.traced_flops(config, "sgd", "fp32", 1, s, False, None, attn="eager")
    assert eager == pytest.approx(flops["sgd"], rel=1e-6)       # sdpa counted as eager's matmuls
    ckpt = R.traced_flops(config, "sgd", "fp32", 1, s, True, None)
    layers_forward = forward - _linear_flops_per_token({**TINY, "num_hidden_layers": 0}) * s
    # recomputed decoder layers, up to the last saved tensor (torch's non-reentrant checkpoint stops early: the
    # down projection's output is not needed by backward, so it is not recomputed)
    down_proj = L * 2 * s * h * TINY["intermediate_size"]
    assert ckpt == pytest.approx(flops["sgd"] + layers_forward - down_proj, rel=1e-6)
    clipped = R.traced_flops(config, "lomo", "fp32", 1, s, False, 1.0)
    assert clipped > 1.5 * flops["lomo"]                       # the norm pass: a second backward


def test_flops_extrapolated_over_depth_are_exact(deep):
    config = load_config(deep)
    full = R.traced_flops(config, "lomo", "fp16", 1, 16, True, None)
    sampled = R.measure(deep, "lomo", "fp16", 1, 16, True, "sdpa", None, 1, check=True)
    assert sampled.flops == pytest.approx(full, rel=1e-9)
    assert abs(sampled.flops_extrapolation_error) < 1e-9
    whole = R.measure(deep, "lomo", "fp16", 1, 16, True, "sdpa", None, None)
    assert sum(sampled.split.values()) == pytest.approx(sum(whole.split.values()), rel=1e-3)
    assert abs(sampled.extrapolation_error) < 1e-3


def test_the_combined_memory_and_flop_pass_measures_what_the_planner_measures(tiny):
    """One fake pass gives the split and the FLOPs; the FLOP counter must not change the memory measured."""
    for method in ("sgd", "lomo"):
        ours = R.measure(tiny, method, "fp16", 2, 32, True, "sdpa", None, None)
        theirs = planner.plan(tiny, method, "fp16", 2, 32, True)
        assert ours.split == theirs.measured, method


# --- planned peaks vs real tracked CPU steps, every candidate that runs here ------------------------

def _runnable_methods():
    return [m for m in R.candidate_methods() if not m.startswith("hift") or TINY["num_hidden_layers"] >= 2]


@pytest.mark.parametrize("checkpointing, attn", [(False, "eager"), (True, "sdpa")])
def test_planned_peak_matches_the_real_tracked_step_within_5_percent(tiny, checkpointing, attn):
    config = load_config(tiny)
    checked = []
    skipped = []
    for method in _runnable_methods():
        try:
            planned = R.measure(tiny, method, "fp32", 2, 32, checkpointing, attn, None, None)
        except ValueError as exc:
            if method.startswith("apollo") and "rank" in str(exc):  # APOLLO's rank 256 > this model's 64
                skipped.append(method)
                continue
            raise
        real_peak, real_split, _ = R.real_tracked_step(config, method, "fp32", 2, 32, checkpointing, attn)
        total = sum(planned.split.values())
        assert total == pytest.approx(real_peak, rel=0.05), method
        for category, nbytes in real_split.items():
            assert abs(planned.split.get(category, 0) - nbytes) <= 0.05 * total, (method, category)
        checked.append(method)
    assert {"sgd", "lomo", "lora"} <= set(checked)
    assert set(checked) | set(skipped) == set(_runnable_methods())


# --- ZeRO arithmetic and communication -------------------------------------------------------------

def test_zero_modes_shard_what_each_shards_and_bound_the_backward_of_torch_optimizers():
    m = R.Measured({"params": 800, "grads": 800, "optimizer_state": 3200, "activations": 0, "temporaries": 100,
                    "other": 0}, gathered_layer_bytes=50, n_params=400, n_trainable=400)
    backward = {"params": 800, "grads": 800, "optimizer_state": 0, "activations": 2000, "temporaries": 300,
                "other": 0}
    z3 = R.per_gpu(m, SGD_ADAMW, "zero3", 8, backward)
    # the optimizer-step peak sharded is 100+100+400+100+50 = 750; the backward's is 100+100+2000+300+50+400
    assert z3 == {"params": 100, "grads": 100, "optimizer_state": 400, "activations": 2000, "temporaries": 300,
                  "other": 0, "gathered_layer": 50}
    z2 = R.per_gpu(m, SGD_ADAMW, "zero2", 8, None)
    assert z2["params"] == 800 and z2["grads"] == 100 and z2["optimizer_state"] == 400 and z2["gathered_layer"] == 0
    fused = R.per_gpu(m, "lomo", "zero3", 8, backward)        # fused: no gradient to shard, no backward bound
    assert fused["grads"] == 800 and fused["params"] == 100 and fused["activations"] == 0
    assert R.per_gpu(m, "lomo", "single", 1) == dict(m.split, gathered_layer=0)


def test_communication_bytes_per_zero_mode():
    shapes = {(10, 20): 2}                                    # two 10x20 weights = all 400 parameters
    ring = 3 / 4
    assert R.comm_bytes(shapes, SGD_ADAMW, "single", 1, 100, 2, 400, 400) == 0
    assert R.comm_bytes(shapes, SGD_ADAMW, "zero2", 4, 100, 2, 400, 400) == pytest.approx(2 * 400 * 2 * ring)
    assert R.comm_bytes(shapes, SGD_ADAMW, "zero3", 4, 100, 2, 400, 400) == pytest.approx(3 * 400 * 2 * ring)
    assert R.comm_bytes(shapes, "lora", "zero3", 4, 100, 2, 400, 10) == pytest.approx((2 * 400 + 10) * 2 * ring)
    # fused: per weight the cheaper of its fp32 gradient (200·4) and the activations (T·(in+out)·2)
    assert R.comm_bytes(shapes, "lomo", "zero3", 4, 5, 2, 400, 400) == pytest.approx(
        (2 * 400 * 2 + 2 * min(800, 5 * 30 * 2)) * ring)


# --- the whole search on a small model -------------------------------------------------------------

def test_recommend_ranks_measured_candidates_on_a_small_model(deep):
    methods = [SGD_ADAMW, "lomo", "lora"]
    # the budget: lomo at micro-batch 1 fits, torch AdamW (fp32 master + m + v) does not
    lomo1 = sum(R.measure(deep, "lomo", "fp16", 1, 64, True, "sdpa", None, 1).split.values())
    adamw1 = sum(R.measure(deep, SGD_ADAMW, "fp16", 1, 64, True, "sdpa", None, 1).split.values())
    assert lomo1 < adamw1
    gib = (lomo1 + adamw1) / 2 / 2**30
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rec = R.recommend(deep, 1, gib, 64, methods=methods, attns=("sdpa", "eager"), max_batch=8)
    assert rec.best is not None and rec.best.fits and rec.best.total_gib <= gib
    fitting = [c for c in rec.candidates if c.fits]
    assert all(c.method != SGD_ADAMW for c in fitting)
    assert rec.candidates[:len(fitting)] == fitting              # fitting ones first
    speeds = [c.tokens_per_gpu_s for c in fitting]
    assert speeds == sorted(speeds, reverse=True)
    for c in fitting:                                            # every chosen micro-batch was measured to fit
        again = sum(R.measure(deep, c.method, "fp16", c.batch_size, 64, c.checkpointing, c.attn, None,
                              1).split.values())
        assert again == c.total_bytes <= gib * 2**30
        assert c.step_s == pytest.approx(c.flops / (R.DEFAULT_TFLOPS * 1e12 * R.DEFAULT_EFFICIENCY))
        assert c.tokens_per_gpu_s == pytest.approx(c.batch_size * 64 / c.step_s)
    for c in rec.candidates[len(fitting):]:
        assert c.step_s is None
        if c.fits is None:   # dominated or bounded by a measured variant, not measured itself
            assert c.why.startswith("not measured: ")
            assert "dominated by its sdpa" in c.why or "does not fit, as its" in c.why
        else:
            assert c.why.startswith("does not fit")
    assert any(c.attn == "eager" and c.fits is None for c in rec.candidates)
    # --exhaustive measures the dominated ones too: eager never beats its sdpa twin, and needs more memory
    full = R.recommend(deep, 1, gib, 64, batch_size=1, methods=["lomo"], attns=("sdpa", "eager"), exhaustive=True)
    twins = {(c.checkpointing, c.attn): c for c in full.candidates}
    assert all(c.fits is not None for c in full.candidates)
    for ckpt in (False, True):
        assert twins[(ckpt, "eager")].total_bytes >= twins[(ckpt, "sdpa")].total_bytes
        if twins[(ckpt, "eager")].fits:
            assert twins[(ckpt, "eager")].tokens_per_gpu_s <= twins[(ckpt, "sdpa")].tokens_per_gpu_s
    assert rec.memory_extrapolation_error is not None and abs(rec.memory_extrapolation_error) < 0.01
    assert rec.flops_extrapolation_error is not None and abs(rec.flops_extrapolation_error) < 1e-6
    # ZeRO over 4 GPUs: the candidates multiply (ZeRO-3 for all, ZeRO-2 for the torch optimizers)
    rec4 = R.recommend(deep, 4, gib, 64, batch_size=1, methods=methods, attns=("sdpa",))
    modes = {(c.method, c.parallel) for c in rec4.candidates}
    assert ("lomo", "zero3") in modes and ("lomo", "zero2") not in modes and ("lora", "zero2") in modes
    assert all(c.batch_size == 1 for c in rec4.candidates)


# --- the command line ------------------------------------------------------------------------------

def test_cli_prints_the_ranked_table_assumptions_and_recommendation(tiny, tmp_path, capsys):
    chart = tmp_path / "rec.png"
    args = ["--recommend", "--model", tiny, "--seq-len", "32", "--gpu-gib", "1", "--method", "sgd,lomo",
            "--max-batch-size", "4", "--chart", str(chart)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Recommendation: " in out and "ESTIMATES" in out and "Assumptions of the time estimate" in out
    assert "71 TFLOP/s peak x 0.4 efficiency" in out and "16 GB/s" in out
    assert "| 1 | " in out and "recommended: fits, fastest estimate" in out
    assert chart.stat().st_size > 1000 and chart.read_bytes()[:4] == b"\x89PNG"
    assert main(args[:-2] + ["--json", "--gpus", "2", "--batch-size", "2", "--gpu-tflops", "100"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["gpus"] == 2 and data["batch_size"] == 2 and data["assumptions"]["gpu_tflops"] == 100
    assert data["recommendation"]["rank"] == 1 and data["recommendation"]["fits"] is True
    assert {c["parallel"] for c in data["candidates"]} == {"zero3", "zero2"}
    assert all(c["micro_batch"] == 2 for c in data["candidates"])
    assert main(args[:-2] + ["--gpu-gib", "0.0001"]) == 1          # nothing fits
    assert "No candidate fits" in capsys.readouterr().out


@pytest.mark.parametrize("extra, flag", [
    (["--model", "no-such-model"], "model"), (["--method", "adam"], "--method"),
    (["--gpus", "0"], "--gpus"), (["--gpus", "1.5"], "--gpus"), (["--gpus", "-2"], "--gpus"),
    (["--gpu-gib", "0"], "--gpu-gib"), (["--gpu-gib", "-3"], "--gpu-gib"), (["--seq-len", "0"], "--seq-len"),
    (["--seq-len", "-5"], "--seq-len"), (["--gpu-tflops", "0"], "--gpu-tflops"),
    (["--gpu-efficiency", "2"], "--gpu-efficiency"), (["--link-gbps", "nan"], "--link-gbps"),
])
def test_bad_arguments_exit_2_naming_the_argument(tiny, capsys, extra, flag):
    args = ["--recommend", "--model", tiny, "--seq-len", "16", "--gpu-gib", "1"] + extra
    try:
        status = main(args)
    except SystemExit as exc:   # argparse's own type errors
        status = exc.code
    assert status == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize("extra, flag", [
    (["--gpus", "2"], "--gpus"), (["--gpu-tflops", "100"], "--gpu-tflops"), (["--exhaustive"], "--exhaustive"),
    (["--chart", "x.png"], "--chart"), (["--hift-group-size", "2"], "--hift-group-size"),
    (["--apollo-rank", "4"], "--apollo-rank"), (["--lora-rank", "4"], "--lora-rank"),
    # typed, even with the default's value
    (["--gpus", "1"], "--gpus"), (["--max-batch-size", "64"], "--max-batch-size"),
    (["--hift-group-size", "1"], "--hift-group-size"), (["--lora-rank", "8"], "--lora-rank"),
])
def test_plan_refuses_options_it_would_ignore(tiny, capsys, extra, flag):
    """Without --recommend (and for methods that do not take them) an option would be silently ignored."""
    assert main(["--model", tiny, "--method", "lomo", "--seq-len", "16"] + extra) == 2
    assert flag in capsys.readouterr().err


def test_recommend_needs_gpu_gib(tiny, capsys):
    assert main(["--recommend", "--model", tiny]) == 2
    assert "--gpu-gib" in capsys.readouterr().err


def test_batch_size_default_is_told_apart_from_a_typed_one(tiny):
    import argparse
    parser = argparse.ArgumentParser()
    planner.add_plan_arguments(parser)
    assert planner.is_default(parser.parse_args([]).batch_size)
    assert parser.parse_args([]).batch_size == 1                  # the plain planner still sees 1
    typed = parser.parse_args(["--batch-size", "1"]).batch_size
    assert typed == 1 and not planner.is_default(typed)
    assert not math.isnan(parser.parse_args([]).gpu_tflops)
