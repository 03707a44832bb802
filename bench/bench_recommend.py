"""plan --recommend: calibration of the time model on CPU, and the recommendation for the study's scenarios.

    python -m bench.bench_recommend [--out bench/results] [--quick] [--skip-scenarios]

1. Calibration (``recommend_calibration.csv/.md/.png``): for every candidate that runs here (method x
   activation checkpointing x attention, fp32 on CPU) of a small LLaMA, the real step is timed and its peak
   tracked, and the same step is planned on fake tensors with its FLOPs counted. One CPU FLOP rate is fitted
   (geometric mean of FLOPs/second over the candidates); the table gives each candidate's relative error of
   the FLOP-model time against the measured one, and the planned peak against the tracked one.
2. Scenarios (``recommend_scenarios.csv/.md``, ``recommend_<scenario>.png``): the recommendation for
   llama-7b/13b/65b at 512 and 4096 tokens on 1x24 GiB and 8x24 GiB, and Llama-3-8B at 8192, with the
   runtime of each search.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings

import torch

from lomo_kernels.memory import planner
from lomo_kernels.memory import recommend as R
from lomo_kernels.memory.tracker import GiB

from .common import device_record, new_figure, save_figure, write_results

BENCH_MODEL = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
               "num_attention_heads": 4, "vocab_size": 8000, "max_position_embeddings": 512,
               "tie_word_embeddings": False}
QUICK_MODEL = BENCH_MODEL | {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2, "vocab_size": 2000}


def calibrate(out_dir: str, quick: bool = False, batch_size: int = 2, seq_len: int = 128, repeats: int = 3):
    import json
    spec = QUICK_MODEL if quick else BENCH_MODEL
    path = os.path.join(out_dir, "recommend_bench_model.json")
    os.makedirs(out_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(spec, f)
    config = planner.load_config(path)
    rows = []
    for method in R.candidate_methods():
        for ckpt in (False, True):
            for attn in ("sdpa", "eager"):
                try:
                    m = R.measure(path, method, "fp32", batch_size, seq_len, ckpt, attn, None, None)
                    peak, _, seconds = R.real_tracked_step(config, method, "fp32", batch_size, seq_len, ckpt, attn,
                                                           time_steps=repeats)
                except ValueError as exc:   # e.g. APOLLO's default rank above this model's dimensions
                    print(f"skipped {method} ckpt={ckpt} {attn}: {exc}", file=sys.stderr)
                    continue
                rows.append({"method": method, "ckpt": ckpt, "attn": attn, "gflops": m.flops / 1e9,
                             "measured_ms": seconds * 1e3, "planned_peak_mib": sum(m.split.values()) / 2**20,
                             "tracked_peak_mib": peak / 2**20})
    # one CPU FLOP rate for all: the geometric mean of FLOPs/s
    rate = math.exp(sum(math.log(r["gflops"] * 1e9 / (r["measured_ms"] / 1e3)) for r in rows) / len(rows))
    for r in rows:
        r["cpu_gflop_s"] = r["gflops"] / (r["measured_ms"] / 1e3)
        r["model_ms"] = r["gflops"] * 1e9 / rate * 1e3
        r["time_error_pct"] = 100 * (r["model_ms"] / r["measured_ms"] - 1)
        r["peak_error_pct"] = 100 * (r["planned_peak_mib"] / r["tracked_peak_mib"] - 1)
    errors = [abs(r["time_error_pct"]) for r in rows]
    peak_errors = [abs(r["peak_error_pct"]) for r in rows]
    summary = {"fitted_cpu_gflop_s": rate / 1e9, "time_mean_abs_error_pct": sum(errors) / len(errors),
               "time_max_abs_error_pct": max(errors), "peak_max_abs_error_pct": max(peak_errors),
               "candidates": len(rows)}
    notes = [f"model: LLaMA {spec['num_hidden_layers']} layers, hidden {spec['hidden_size']}, vocab "
             f"{spec['vocab_size']}; fp32, micro-batch {batch_size} x {seq_len} tokens, real CPU steps (median of "
             f"{repeats}) vs the FLOP model at one fitted CPU rate {rate / 1e9:.2f} GFLOP/s",
             f"time model error over {len(rows)} candidates: mean |error| {summary['time_mean_abs_error_pct']:.1f}%, "
             f"max {summary['time_max_abs_error_pct']:.1f}%",
             f"planned peak (fake tensors) vs tracked real peak: max |error| {summary['peak_max_abs_error_pct']:.2f}%",
             "a CPU is not a GPU: the fit checks that the traced FLOPs rank the candidates' step times, not the "
             "GPU efficiency"]
    write_results(out_dir, "recommend_calibration", "plan --recommend: time model vs measured CPU steps", rows,
                  notes, device_record())
    fig, axes = new_figure(1)
    ax = axes[0]
    for attn, marker in (("sdpa", "o"), ("eager", "s")):
        pts = [r for r in rows if r["attn"] == attn]
        ax.scatter([r["measured_ms"] for r in pts], [r["model_ms"] for r in pts], marker=marker, label=attn)
    lo = min(min(r["measured_ms"], r["model_ms"]) for r in rows) * 0.8
    hi = max(max(r["measured_ms"], r["model_ms"]) for r in rows) * 1.2
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured CPU step (ms)")
    ax.set_ylabel("FLOP model at one fitted rate (ms)")
    ax.set_title(f"time model calibration: mean |err| {summary['time_mean_abs_error_pct']:.0f}%", fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, out_dir, "recommend_calibration")
    return rows, summary


SCENARIOS = [(m, s, g) for m in ("llama-7b", "llama-13b", "llama-65b") for s in (512, 4096) for g in (1, 8)] + \
            [("llama3-8b", 8192, 1), ("llama3-8b", 8192, 8)]


def scenarios(out_dir: str, gpu_gib: float = 24.0, chosen=None, methods=None):
    rows = []
    for model, seq, gpus in chosen or SCENARIOS:
        if model not in planner.PRESETS:
            print(f"skipped {model}: not a planner preset here", file=sys.stderr)
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rec = R.recommend(model, gpus, gpu_gib, seq, methods=methods)
        wall = time.perf_counter() - t0
        name = f"{model}_{seq}_{gpus}x{gpu_gib:g}"
        R.write_chart(rec, os.path.join(out_dir, f"recommend_{name}.png"))
        with open(os.path.join(out_dir, f"recommend_{name}.md"), "w") as f:
            f.write(f"# plan --recommend --model {model} --seq-len {seq} --gpus {gpus} --gpu-gib {gpu_gib:g}\n\n")
            f.write("```\n" + R.format_report(rec) + "\n```\n")
        b = rec.best
        fitting = [c for c in rec.candidates if c.fits]
        row = {"model": model, "seq_len": seq, "gpus": gpus, "gpu_gib": gpu_gib,
               "methods": "all" if methods is None else " ".join(methods),
               "recommendation": b.label if b else "nothing fits", "micro_batch": b.batch_size if b else 0,
               "peak_gib": round(b.total_gib, 2) if b else None,
               "est_tokens_per_gpu_s": round(b.tokens_per_gpu_s, 1) if b else None,
               "fitting_candidates": len(fitting), "candidates": len(rec.candidates),
               "fitting_methods": " ".join(sorted({c.method for c in fitting})),
               "runner_up": next((c.label for c in fitting[1:] if c.method != (b.method if b else None)), ""),
               "memory_extrapolation_error_pct": None if rec.memory_extrapolation_error is None
               else round(100 * rec.memory_extrapolation_error, 3),
               "batch_line_gap_pct": None if rec.batch_linearity_error is None
               else round(100 * rec.batch_linearity_error, 2),
               "runtime_s": round(wall, 1), "cpu_s": round(time.process_time() - c0, 1)}
        rows.append(row)
        print(row, flush=True)
        write_results(out_dir, "recommend_scenarios", "plan --recommend for the study's scenarios (24 GiB GPUs)",
                      rows, ["default assumptions: " + "; ".join(R.Assumptions().lines())], device_record())
    if rows:
        write_results(out_dir, "recommend_scenarios", "plan --recommend for the study's scenarios (24 GiB GPUs)",
                      rows, ["default assumptions: " + "; ".join(R.Assumptions().lines()),
                             "runtime: wall seconds of each search on this machine (cached measurements are reused "
                             "across scenarios of the same model and context: later rows are warm)"],
                      device_record())
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("bench", "results"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-scenarios", action="store_true")
    parser.add_argument("--skip-calibration", action="store_true")
    parser.add_argument("--only", default=None, help="comma-separated model:seq:gpus scenarios")
    parser.add_argument("--methods", default=None, help="comma-separated candidate methods (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if not args.skip_calibration:
        _, summary = calibrate(args.out, args.quick)
        print(summary)
    if not args.skip_scenarios:
        chosen = None
        if args.only:
            chosen = [(m, int(s), int(g)) for m, s, g in (x.split(":") for x in args.only.split(","))]
        scenarios(args.out, chosen=chosen, methods=args.methods.split(",") if args.methods else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
