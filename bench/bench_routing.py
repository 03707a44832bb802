"""Cost of routing weight uses (lomo_kernels.routing) against another checkout of the package.

Times one fused Lomo step (forward + fused backward, without and with global-norm clipping) on the
benchmark models of ``bench_step`` (full sizes), in this checkout and in ``--baseline`` (a path to
another checkout, e.g. ``git worktree add /tmp/before <commit>`` with its ``_C`` copied in, and this
checkout's ``ops/``, ``kernels/`` and ``backends.py`` so that only the layers above differ), each in
its own subprocess, alternating rounds so that machine load hits both alike. Reports medians and the
ratio. Writes ``bench/results/routing.md`` / ``.csv``.

    python -m bench.bench_routing --baseline /tmp/before
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _measure(steps: int) -> dict:
    """In a subprocess: median seconds per step per (model, clip) for the package on sys.path."""
    import torch

    import lomo_kernels as lk
    from bench.bench_step import model_specs
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    out = {"package": lk.__file__}
    for name, (make_config, batch, seq) in model_specs(quick=False).items():
        for clip in (None, 1.0):
            torch.manual_seed(0)
            config = make_config()
            config._attn_implementation = "eager"
            model = AutoModelForCausalLM.from_config(config).train()
            ids = torch.randint(0, config.vocab_size, (batch, seq))
            opt = lk.Lomo(model, lr=1e-4, clip_grad_norm=clip)
            times = []
            for _ in range(steps + 2):
                start = time.perf_counter()
                opt.fused_backward(model(input_ids=ids, labels=ids).loss, 1e-4)
                times.append(time.perf_counter() - start)
            out[f"{name}, {'norm clip' if clip else 'no clip'}"] = statistics.median(times[2:])
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="path to the checkout to compare against")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--note", default="", help="what the baseline is (written under the title)")
    parser.add_argument("--_measure", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._measure:
        print(json.dumps(_measure(args._measure)))
        return
    trees = {"this checkout": str(ROOT), "baseline": str(Path(args.baseline).resolve())}
    runs: dict[str, list[dict]] = {label: [] for label in trees}
    for _ in range(args.rounds):
        for label, tree in trees.items():
            # this file runs as a script against the tree's package (first on the path) and bench_step
            env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1")
            result = subprocess.run([sys.executable, __file__, "--baseline", tree, "--_measure", str(args.steps)],
                                    cwd=tree, env=env, check=True, capture_output=True, text=True)
            runs[label].append(json.loads(result.stdout.strip().splitlines()[-1]))
    for label, tree in trees.items():
        assert runs[label][0].pop("package").startswith(tree), f"{label} did not import its own lomo_kernels"
        for r in runs[label][1:]:
            r.pop("package")
    rows = []
    for case in runs["this checkout"][0]:
        new = statistics.median(r[case] for r in runs["this checkout"])
        old = statistics.median(r[case] for r in runs["baseline"])
        rows.append((case, old * 1e3, new * 1e3, new / old))
    lines = ["# Routing overhead: one fused Lomo step, this checkout vs a baseline checkout", "",
             f"CPU, 1 thread, fp32, bench_step's full-size models; median of {args.rounds} rounds × "
             f"{args.steps} steps, rounds alternating between the two checkouts.", "",
             *([f"Baseline: {args.note}", ""] if args.note else []),
             "| model, clipping | baseline ms | this checkout ms | ratio |", "|---|---|---|---|"]
    lines += [f"| {case} | {old:.1f} | {new:.1f} | {ratio:.3f} |" for case, old, new, ratio in rows]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "routing.md").write_text("\n".join(lines) + "\n")
    (out / "routing.csv").write_text("case,baseline_ms,this_ms,ratio\n"
                                     + "".join(f"\"{c}\",{o:.3f},{n:.3f},{r:.4f}\n" for c, o, n, r in rows))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
