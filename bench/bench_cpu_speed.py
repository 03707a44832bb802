"""CPU speed of the fused steps against the hook way and lomo-optim 0.1.1 (issue 16), in one run.

    .venv/bin/python -m bench.bench_cpu_speed [--quick] [--repeats 7] [--threads 1] [--out bench/results]

writes ``cpu_speed.{md,csv}``. Every step of one table is timed interleaved with the others (repeat r
of every method, then repeat r+1, ...), so that a slow phase of the shared machine hits all methods
alike; the table gives medians and the ratios the issue asks for:

* bf16 weights, 256 and 1024 tokens: our ``Lomo`` step against the *hook way* (autograd builds each
  bf16 weight gradient, a post-accumulate-grad hook applies ``p.add_(g, alpha=-lr)`` and frees it) and
  against lomo-optim's ``Lomo`` (goal: ours <= 1.1x the hook way);
* fp32, 64, 512 and 2048 tokens: ``Lomo`` and ``AdaLomo`` with and without global-norm clipping
  against lomo-optim's (goals: Lomo + clipping <= 0.9x, AdaLomo + clipping <= 0.9x, plain Lomo <= 0.8x);
* the norm-only pass of one linear layer, ghost against GEMM, per token count (the crossover the
  ``cpu`` backend's choice uses);
* the peak scratch of one fused bf16 linear update (profiled allocator events) against one block.

The model is the issue's 20.8 M-parameter LLaMA-style one (hidden 512, MLP 1376, 4 layers, vocabulary
8000, untied), eager attention, batch 1.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from unittest import mock

import torch

from lomo_kernels.memory.tracker import peak_bytes_profiled

from .common import MiB, device_record, markdown_table

LR = 1e-4
CLIP = 1.0


def build_model(quick: bool, dtype: torch.dtype, vocab: int = 8000):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    if quick:
        config = LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=1, num_attention_heads=4,
                             vocab_size=512, tie_word_embeddings=False)
    else:
        config = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                             vocab_size=vocab, tie_word_embeddings=False)
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config).to(dtype).train()


# --- the methods: each returns a step function on its own copy of the model ---------------------------

def hook_way(model, clip):
    """Autograd's weight gradients (in the weights' dtype), applied and freed by a per-parameter hook."""
    assert clip is None

    def apply(p):
        p.data.add_(p.grad, alpha=-LR)
        p.grad = None

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(apply)
    return lambda batch: model(**batch).loss.backward()


def _two_phase(opt, clip):
    def step_fn(model):
        def step(batch):
            loss = model(**batch).loss
            if clip is not None:
                opt.grad_norm(loss)
            opt.fused_backward(loss, LR)
        return step
    return step_fn


def lomo_optim_lomo(model, clip):
    import lomo_optim
    return _two_phase(lomo_optim.Lomo(model, lr=LR, clip_grad_norm=clip), clip)(model)


def lomo_optim_adalomo(model, clip):
    import lomo_optim
    with mock.patch.object(torch.Tensor, "cuda", lambda self, *args, **kwargs: self):  # it calls .cuda()
        opt = lomo_optim.AdaLomo(model, lr=LR, clip_grad_norm=clip)
    return _two_phase(opt, clip)(model)


def ours_lomo(rounding=None):
    def make(model, clip):
        import lomo_kernels
        return _two_phase(lomo_kernels.Lomo(model, lr=LR, clip_grad_norm=clip, rounding=rounding), clip)(model)
    return make


def ours_adalomo(statistics_mode):
    def make(model, clip):
        import lomo_kernels
        opt = lomo_kernels.AdaLomo(model, lr=LR, clip_grad_norm=clip, statistics=statistics_mode)
        return _two_phase(opt, clip)(model)
    return make


def time_interleaved(steps: dict, batch, repeats: int) -> dict:
    """Per method: median wall and CPU ms of a step, after one warm-up step each; the methods take
    turns within every repeat."""
    for step in steps.values():
        step(batch)
    wall = {name: [] for name in steps}
    cpu = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            step(batch)
            wall[name].append((time.perf_counter() - t0) * 1e3)
            cpu[name].append((time.process_time() - c0) * 1e3)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in steps}


def _batch(vocab: int, tokens: int):
    g = torch.Generator().manual_seed(tokens)
    ids = torch.randint(0, vocab, (1, tokens), generator=g)
    return {"input_ids": ids, "labels": ids}


def _rows(table: str, tokens: int, times: dict, baselines: dict, goals: dict) -> list[dict]:
    rows = []
    for name, (wall, cpu) in times.items():
        base = baselines.get(name)
        ratio = round(wall / times[base][0], 3) if base else None
        cpu_ratio = round(cpu / times[base][1], 3) if base else None
        goal = goals.get(name)
        rows.append({"table": table, "tokens": tokens, "method": name, "median_ms": round(wall, 1),
                     "cpu_ms": round(cpu, 1), "vs": base or "", "ratio": "" if ratio is None else ratio,
                     "cpu_ratio": "" if cpu_ratio is None else cpu_ratio,
                     "goal": "" if goal is None else f"<= {goal}",
                     "met": "" if goal is None else ("yes" if ratio <= goal else f"no (+{ratio - goal:.2f})")})
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def bf16_steps(quick: bool, repeats: int) -> list[dict]:
    base = build_model(quick, torch.bfloat16)
    methods = {"hook way (bf16 grads + add_)": (hook_way, None),
               "lomo-optim Lomo": (lomo_optim_lomo, None),
               "ours Lomo (stochastic rounding)": (ours_lomo(), None),
               "ours Lomo (nearest rounding)": (ours_lomo("nearest"), None)}
    hook = "hook way (bf16 grads + add_)"
    baselines = {"ours Lomo (stochastic rounding)": hook, "ours Lomo (nearest rounding)": hook,
                 "lomo-optim Lomo": hook}
    goals = {"ours Lomo (stochastic rounding)": 1.1, "ours Lomo (nearest rounding)": 1.1}
    rows = []
    for tokens in (16,) if quick else (256, 1024):
        steps = {name: make(copy.deepcopy(base), clip) for name, (make, clip) in methods.items()}
        times = time_interleaved(steps, _batch(base.config.vocab_size, tokens), repeats)
        rows += _rows("bf16", tokens, times, baselines, goals)
    return rows


def fp32_steps(quick: bool, repeats: int) -> list[dict]:
    base = build_model(quick, torch.float32)
    methods = {"lomo-optim Lomo": (lomo_optim_lomo, None),
               "ours Lomo": (ours_lomo(), None),
               "lomo-optim Lomo + clip": (lomo_optim_lomo, CLIP),
               "ours Lomo + clip": (ours_lomo(), CLIP),
               "lomo-optim AdaLomo + clip": (lomo_optim_adalomo, CLIP),
               "ours AdaLomo + clip (recompute)": (ours_adalomo("recompute"), CLIP),
               "ours AdaLomo + clip (materialize)": (ours_adalomo("materialize"), CLIP)}
    baselines = {"ours Lomo": "lomo-optim Lomo", "ours Lomo + clip": "lomo-optim Lomo + clip",
                 "ours AdaLomo + clip (recompute)": "lomo-optim AdaLomo + clip",
                 "ours AdaLomo + clip (materialize)": "lomo-optim AdaLomo + clip"}
    goals = {"ours Lomo": 0.8, "ours Lomo + clip": 0.9, "ours AdaLomo + clip (recompute)": 0.9,
             "ours AdaLomo + clip (materialize)": 0.9}
    rows = []
    for tokens in (16,) if quick else (64, 512, 2048):
        steps = {name: make(copy.deepcopy(base), clip) for name, (make, clip) in methods.items()}
        reps = repeats if tokens < 2048 else max(3, repeats // 2)
        times = time_interleaved(steps, _batch(base.config.vocab_size, tokens), reps)
        rows += _rows("fp32", tokens, times, baselines, goals)
        del steps
    return rows


def norm_pass(quick: bool, repeats: int) -> list[dict]:
    """One layer's norm-only pass: the compiled ghost and GEMM methods, and what ``auto`` picks."""
    import lomo_kernels as lk
    rows = []
    shapes = ((172, 64),) if quick else ((512, 512), (1376, 512), (8000, 512))
    for dtype in (torch.float32, torch.bfloat16):
        for out_f, in_f in shapes:
            for tokens in (16, 64) if quick else (64, 128, 256, 512, 1024, 2048):
                w = torch.empty(out_f, in_f, dtype=dtype)
                x, dy = torch.randn(tokens, in_f, dtype=dtype), torch.randn(tokens, out_f, dtype=dtype)
                stats = torch.zeros(2)
                t = {}
                for method in ("gemm", "ghost"):
                    fn = lambda m=method: lk.linear_grad_sqnorm_(stats, w, x, dy, method=m)  # noqa: E731
                    fn()
                    samples = []
                    for _ in range(repeats):
                        t0 = time.perf_counter()
                        fn()
                        samples.append((time.perf_counter() - t0) * 1e3)
                    t[method] = statistics.median(samples)
                chosen = lk.ops.choose_norm_method(tokens, in_f, out_f)
                best = min(t, key=t.get)
                rows.append({"dtype": str(dtype).removeprefix("torch."), "layer": f"{out_f}x{in_f}",
                             "tokens": tokens, "gemm_ms": round(t["gemm"], 3), "ghost_ms": round(t["ghost"], 3),
                             "ghost/gemm": round(t["ghost"] / t["gemm"], 2), "auto picks": chosen,
                             "auto_ms / best_ms": round(t[chosen] / t[best], 2)})
    return rows


def bf16_update_peak(quick: bool) -> list[dict]:
    """Scratch of one fused bf16 linear update (profiled allocator events) against one GEMM block."""
    import lomo_kernels as lk
    out_f, in_f, tokens = (172, 64, 256) if quick else (1376, 512, 4096)
    w = torch.randn(out_f, in_f, dtype=torch.bfloat16)
    x = torch.randn(tokens, in_f, dtype=torch.bfloat16)
    dy = torch.randn(tokens, out_f, dtype=torch.bfloat16) * 1e-2
    rows = []
    for rounding, clip in (("stochastic", None), ("stochastic", 0.01), ("nearest", None)):
        fn = lambda: lk.linear_update_(w, x, dy, lr=LR, clip_value=clip, rounding=rounding)  # noqa: E731
        fn()
        rows.append({"weight": f"{out_f}x{in_f} bf16", "tokens": tokens, "rounding": rounding,
                     "clip_value": "none" if clip is None else clip,
                     "peak_MiB": round(peak_bytes_profiled(fn) / MiB, 3), "one_block_MiB": 1.0,
                     "fp32_activations_MiB": round(tokens * (in_f + out_f) * 4 / MiB, 1)})
    return rows


def run(out_dir: str, quick: bool = False, repeats: int = 7) -> list[dict]:
    import os
    repeats = 1 if quick else repeats
    t0 = time.perf_counter()
    bf16 = bf16_steps(quick, repeats)
    fp32 = fp32_steps(quick, repeats)
    norm = norm_pass(quick, 3 if quick else 7)
    peak = bf16_update_peak(quick)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "cpu_speed.md")
    device = device_record()
    with open(path, "w") as f:
        f.write("# CPU speed: fused steps vs the hook way and lomo-optim 0.1.1 (issue 16)\n\n")
        f.write("Device: " + "; ".join(f"{k} {v}" for k, v in device.items()) + "\n\n")
        f.write(f"- one run of `python -m bench.bench_cpu_speed` ({time.perf_counter() - t0:.0f} s); "
                f"{repeats} repeats per step, methods interleaved within each repeat (2048 tokens: "
                f"{max(3, repeats // 2)}), after one warm-up step each; median wall ms and median CPU ms of "
                "the process; ratio = median / the 'vs' method's median (cpu_ratio: the same for CPU time)\n"
                "- model: LLaMA-style, 20.8 M parameters (hidden 512, MLP 1376, 4 layers, vocabulary 8000, "
                f"untied), batch 1 x tokens; lr {LR}; clipping = global-norm clipping at {CLIP} (grad_norm, "
                "then fused_backward)\n\n")
        f.write("## bf16 weights: our Lomo vs the hook way\n\n" + markdown_table(bf16) + "\n\n")
        f.write("## fp32: Lomo and AdaLomo vs lomo-optim\n\n" + markdown_table(fp32) + "\n\n")
        f.write("## Norm-only pass of one linear layer (cpu backend): ghost vs GEMM\n\n"
                "- `linear_grad_sqnorm_` with method gemm / ghost; 'auto picks' is `choose_norm_method`; "
                "auto_ms / best_ms = 1 where it picks the faster one\n\n" + markdown_table(norm) + "\n\n")
        f.write("## Scratch of one fused bf16 linear update\n\n"
                "- peak bytes allocated during the call (profiler allocator events); the GEMM block is 1 MiB "
                "of fp32; fp32_activations_MiB is what an fp32 copy of x and dy would take\n\n"
                + markdown_table(peak) + "\n")
    rows = bf16 + fp32
    import csv
    with open(os.path.join(out_dir, "cpu_speed.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model and one repeat (smoke test)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run(args.out, quick=args.quick, repeats=args.repeats)


if __name__ == "__main__":
    main()
