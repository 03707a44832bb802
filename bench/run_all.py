"""Every benchmark in one run: kernels, training steps, memory plans -> bench/results/ (Markdown, CSV, PNG).

    python -m bench.run_all            # the full run (under 15 minutes on a 2-core CPU)
    python -m bench.run_all --quick    # tiny shapes, one repeat: checks the scripts and tables (CI)
"""
from __future__ import annotations

import argparse
import time

import torch

from . import bench_kernels, bench_memory, bench_step

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
    if threads is not None:
        torch.set_num_threads(threads)
    for name in args.only or SUITES:
        t0 = time.perf_counter()
        SUITES[name](args.out, quick=args.quick)
        table = "memory_plan" if name == "memory" else name
        print(f"{name}: {time.perf_counter() - t0:.0f} s -> {args.out}/{table}.md", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
