"""Every benchmark in one run: kernels, training steps, memory plans -> bench/results/ (Markdown, CSV, PNG).

    python -m bench.run_all            # the full run (under 15 minutes on a 2-core CPU)
    python -m bench.run_all --quick    # tiny shapes, one repeat: checks the scripts and tables (CI)
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from . import bench_kernels, bench_memory, bench_step
from .common import markdown_table

SUITES = {"kernels": bench_kernels.run, "step": bench_step.run, "memory": bench_memory.run}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results", help="folder for the result files")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one repeat: a smoke run")
    parser.add_argument("--only", choices=tuple(SUITES), action="append", help="run only these suites")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 without a GPU, so that CPU times stay meaningful on a "
                             "shared machine: idle OpenMP workers spin while a preempted one waits)")
    args = parser.parse_args(argv)
    threads = args.threads or (None if torch.cuda.is_available() else 1)
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(saved_threads)


def _run(args) -> int:
    rows = {}
    for name in args.only or SUITES:
        t0 = time.perf_counter()
        rows[name] = SUITES[name](args.out, quick=args.quick)
        table = "memory_plan" if name == "memory" else name
        print(f"{name}: {time.perf_counter() - t0:.0f} s -> {args.out}/{table}.md", flush=True)
    if "step" in rows and "memory" in rows:
        path = os.path.join(args.out, "headline.md")
        with open(path, "w") as f:
            f.write(headline(rows["step"], rows["memory"]))
        print(f"headline -> {path}")
    return 0


def headline(step_rows: list[dict], memory_rows: list[dict]) -> str:
    """The README's tables: planned LLaMA memory beside the LOMO paper's, and the measured step on this machine."""
    planned = [{"model": r["model"], "method": r["method"], "batch x seq": f"{r['batch']} x {r['seq']}",
                "GPUs": r["world"], "planned GiB/GPU": r["total_gib"], "paper GiB": r["paper_gib"],
                "vs paper": r["vs_paper"], "fits 24 GB": r["fits_24gb"]}
               for r in memory_rows if r["model"] == "llama-7b" or r["world"] > 1 and r["batch"] == 1]
    model = step_rows[0]["model"]
    measured = [{"method": r["method"], "clip norm": r["clip_norm"], "step CPU ms": r["cpu_ms"],
                 "peak MiB": r["tracked_peak_MiB"], "grads MiB": r["grads_MiB"],
                 "optimizer state MiB": r["optimizer_state_MiB"]} for r in step_rows if r["model"] == model]
    return (f"## Planned peak memory (fp16, activation checkpointing)\n\n{markdown_table(planned)}\n\n"
            f"## One training step of `{model}` ({step_rows[0]['params_M']} M params, "
            f"{step_rows[0]['tokens']} tokens), measured\n\n{markdown_table(measured)}\n")


if __name__ == "__main__":
    raise SystemExit(main())
