"""Quality benchmark (issue 11, item 6): the embedded default's model and data, the same steps and
batches for every method; held-out loss and perplexity, peak RSS and median step time.

    python -m bench.bench_convergence                 # default: 300 steps (the embedded default's)
    python -m bench.bench_convergence --steps 60      # shorter

Each method runs in its own process (peak RSS is per process): the ``small`` preset (random init, seed
0), byte tokenizer, the standard library's sources packed into 128-token sequences (at most
``--max-data-tokens``), batch 16, warmup then cosine, the same ``BatchOrder``. Lomo/AdaLomo use the
CLI's defaults (value clipping 0.05); the AdamW family uses global-norm clipping at 1.0 (APOLLO cannot
value-clip without a gradient); apollo-torch gets torch's ``clip_grad_norm_`` before its step.
The HiFT rows wrap fused AdamW (norm clip 1.0 over the active group) and Lomo (value clip 0.05), one
decoder layer per group (6 groups: embedding, 4 layers, head), down2up, the learning rate held for
each cycle of groups (the schedule's value at the cycle's first step, HiFT's per-cycle rule).
``--merge`` runs only ``--methods`` and replaces their rows in the existing results (the others kept,
and the Markdown says which rows were rerun).
Writes bench/results/convergence.{md,csv,json,png}.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = {  # name: (lr, description)
    "lomo": (0.5, "Lomo (fused SGD)"),
    "adalomo": (1e-2, "AdaLomo"),
    "torch-adamw": (1e-3, "torch.optim.AdamW (foreach)"),
    "adamw": (1e-3, "lomo_kernels.AdamW (fused)"),
    "apollo": (1e-3, "lomo_kernels.Apollo rank 32, channel"),
    "apollo-mini": (1e-3, "lomo_kernels.ApolloMini (rank 1, tensor, scale 128)"),
    "apollo-torch": (1e-3, "apollo-torch APOLLOAdamW rank 32, channel"),
    "hift-adamw": (1e-3, "HiFT (1 layer per group, down2up) over lomo_kernels.AdamW"),
    "hift-lomo": (0.5, "HiFT (1 layer per group, down2up) over Lomo"),
}
RANK = 32


def lr_at(step: int, steps: int, lr: float) -> float:
    warmup = min(10, steps // 10)
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def make_step(method: str, model):
    import lomo_kernels as lk
    from lomo_kernels.optim.apollo import _default_projected
    if method.startswith("hift-"):
        # HiFT's rule: one group per step; the lr is held for a cycle (the schedule's value at its first step)
        inner = (lk.AdamW(model, lr=1e-3, clip_grad_norm=1.0) if method == "hift-adamw" else
                 lk.Lomo(model, lr=METHODS[method][0], clip_grad_value=0.05))
        opt = lk.HiFT(inner, group_size=1, strategy="down2up")
        step = lambda loss, lr: opt.fused_backward(loss, lr)  # noqa: E731
        step.cycle_length = opt.num_groups
        return step
    if method in ("lomo", "adalomo"):
        cls = lk.Lomo if method == "lomo" else lk.AdaLomo
        opt = cls(model, lr=METHODS[method][0], clip_grad_value=0.05)
        return lambda loss, lr: opt.fused_backward(loss, lr)
    if method in ("adamw", "apollo", "apollo-mini"):
        kw = dict(clip_grad_norm=1.0)
        opt = (lk.AdamW(model, lr=1e-3, **kw) if method == "adamw" else
               lk.Apollo(model, lr=1e-3, rank=RANK, **kw) if method == "apollo" else lk.ApolloMini(model, lr=1e-3, **kw))
        return lambda loss, lr: opt.fused_backward(loss, lr)
    params = [p for p in model.parameters() if p.requires_grad]
    if method == "torch-adamw":
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, foreach=True)
    else:
        from apollo_torch import APOLLOAdamW
        projected = set(_default_projected(model))
        groups = [{"params": [p], **(dict(rank=RANK, proj="random", scale_type="channel", scale=1.0,
                                          update_proj_gap=200, proj_type="std") if n in projected else {})}
                  for n, p in model.named_parameters()]
        opt = APOLLOAdamW(groups, lr=1e-3)

    def step(loss, lr):
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return step


def run_one(method: str, steps: int, max_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM

    from lomo_kernels.training.data import BatchOrder, TokenizerAdapter, pack, read_documents, split_eval
    from lomo_kernels.training.presets import preset_config
    from lomo_kernels.training.tokenizer import ByteTokenizer
    from lomo_kernels.training.trainer import evaluate

    torch.manual_seed(0)
    packed = pack(read_documents(None), TokenizerAdapter(ByteTokenizer()), 128, max_tokens=max_tokens)
    train, held = split_eval(packed, 0.05, 64, 0)
    model = AutoModelForCausalLM.from_config(preset_config("small"), dtype=torch.float32)
    model.train()
    step = make_step(method, model)
    order = BatchOrder(len(train), 16, 0)
    lr0 = METHODS[method][0]
    losses, times = [], []
    for s in range(steps):
        idx = order.next_batch()
        t0 = time.perf_counter()
        loss = model(input_ids=train.tokens[idx], labels=train.labels[idx]).loss
        losses.append(float(loss))
        cycle = getattr(step, "cycle_length", 1)
        step(loss, lr_at(s - s % cycle, steps, lr0))
        times.append(time.perf_counter() - t0)
    held_loss = evaluate(model, held, 16, torch.device("cpu"))
    return {"method": method, "description": METHODS[method][1], "steps": steps, "first_loss": losses[0],
            "final_train_loss": statistics.mean(losses[-10:]), "held_out_loss": held_loss,
            "held_out_ppl": math.exp(held_loss), "median_step_ms": 1000 * statistics.median(times[3:]),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "losses": losses}


SPEED_METHODS = {  # the fused ones with their defaults (the fused cross-entropy on) unless the name says
    "torch-adamw": METHODS["torch-adamw"][1], "adamw": METHODS["adamw"][1], "apollo": METHODS["apollo"][1],
    "lomo": METHODS["lomo"][1],
    "adamw-own-loss": "lomo_kernels.AdamW (fused), fused_cross_entropy=False (the model's own loss, as torch's)",
}


def _speed_steps(base, ids):
    """One step function per method on its own copy of ``base`` (no clipping: a global-norm clip costs the
    fused optimizers a second, norm-only backward pass)."""
    import lomo_kernels as lk
    runs = {}
    # Lomo (fused SGD) is the fused path's floor: routing and per-weight backward nodes without AdamW's
    # moments; the AdamW epilogue costs what fused AdamW takes over it
    for name in SPEED_METHODS:
        model = copy.deepcopy(base).train()
        if name == "torch-adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)

            def step(m=model, o=opt):
                o.zero_grad(set_to_none=True)
                m(input_ids=ids, labels=ids).loss.backward()
                o.step()
        else:
            opt = (lk.AdamW(model, lr=1e-3) if name == "adamw" else lk.Lomo(model, lr=1e-3) if name == "lomo"
                   else lk.AdamW(model, lr=1e-3, fused_cross_entropy=False) if name == "adamw-own-loss"
                   else lk.Apollo(model, lr=1e-3, rank=RANK))

            def step(m=model, o=opt):
                o.fused_backward(m(input_ids=ids, labels=ids).loss, 1e-3)
        runs[name] = step
    return runs


def _speed_table(title: str, runs: dict, steps: int) -> tuple[list[dict], str]:
    """Median process-CPU and wall time per method over ``steps`` rounds (methods interleaved in each round,
    the first 3 rounds dropped as warm-up)."""
    cpu = {n: [] for n in runs}
    wall = {n: [] for n in runs}
    for _ in range(steps):
        for name, step in runs.items():
            c0, t0 = time.process_time(), time.perf_counter()
            step()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - t0)
    rows = [{"model": title, "method": n, "median_cpu_ms": 1000 * statistics.median(cpu[n][3:]),
             "median_wall_ms": 1000 * statistics.median(wall[n][3:])} for n in runs]
    ref, fused = rows[0]["median_cpu_ms"], rows[1]["median_cpu_ms"]
    lines = [f"### {title}", "", "| method | median CPU ms | median wall ms | CPU vs torch AdamW | CPU vs fused AdamW |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {SPEED_METHODS[r['method']]} | {r['median_cpu_ms']:.0f} | {r['median_wall_ms']:.0f} | "
                     f"{r['median_cpu_ms'] / ref:.2f}x | {r['median_cpu_ms'] / fused:.2f}x |")
    return rows, "\n".join(lines)


def speed(steps: int = 30, out: Path = RESULTS) -> list[dict]:
    """Item 7: median step time of torch AdamW (foreach), fused AdamW, Apollo and Lomo, fp32, no clipping, on
    the CPU benchmark model (``bench_cpu_speed.build_model``: 20.8 M parameters, 512 tokens, the model item 7
    names) and on the embedded default's ``small`` preset (0.87 M parameters, 16 x 128 tokens, where the
    fused path's fixed cost per weight weighs most). The fused optimizers use their defaults (the fused
    cross-entropy included); the ratios are of process CPU time (this process only)."""
    from transformers import AutoModelForCausalLM

    from lomo_kernels.training.presets import preset_config

    from .bench_cpu_speed import build_model
    from .common import device_record

    torch.manual_seed(0)
    rows, tables = [], []
    bench_model = build_model(False, torch.float32)
    small = AutoModelForCausalLM.from_config(preset_config("small"), dtype=torch.float32)
    for title, base, shape in (
            (f"CPU benchmark model ({sum(p.numel() for p in bench_model.parameters()) / 1e6:.1f} M parameters, "
             "1 x 512 tokens)", bench_model, (1, 512)),
            (f"`small` preset ({sum(p.numel() for p in small.parameters()) / 1e6:.2f} M parameters, 16 x 128 tokens)",
             small, (16, 128))):
        ids = torch.randint(0, base.config.vocab_size, shape)
        table_rows, text = _speed_table(title, _speed_steps(base, ids), steps)
        rows += table_rows
        tables.append(text)
    # the machine's load average: a shared machine's other jobs slow every method, ratios less so
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    text = (f"Step time, fp32, no clipping, {torch.get_num_threads()} thread(s), medians of {steps - 3} interleaved "
            f"steps (python -m bench.bench_convergence --speed); load average {load}; "
            + "; ".join(f"{k} {v}" for k, v in device_record().items()) + "\n\n" + "\n\n".join(tables) + "\n")
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "adaptive_speed.md").write_text(text)
    print(text)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--max-data-tokens", type=int, default=1 << 21)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--merge", action="store_true",
                    help="keep the existing rows of --out's convergence.json, replacing those of --methods")
    ap.add_argument("--speed", action="store_true", help="only the step-time comparison (issue 11, item 7)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.speed:
        speed(out=Path(args.out))
        return
    if args.one:
        print(json.dumps(run_one(args.one, args.steps, args.max_data_tokens)))
        return
    rows = []
    for method in args.methods.split(","):
        out = subprocess.run([sys.executable, "-m", "bench.bench_convergence", "--one", method, "--steps",
                              str(args.steps), "--max-data-tokens", str(args.max_data_tokens)],
                             check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{method:13s} held-out loss {r['held_out_loss']:.3f} ppl {r['held_out_ppl']:.1f} "
              f"step {r['median_step_ms']:.0f} ms peak {r['peak_rss_mib']:.0f} MiB", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    note = ""
    if args.merge:
        fresh = {r["method"]: r for r in rows}
        old = json.loads((out / "convergence.json").read_text())
        if any(r["steps"] != args.steps for r in old):
            raise SystemExit(f"--merge: the existing rows are not {args.steps}-step runs")
        rows = [fresh.pop(r["method"], r) for r in old] + list(fresh.values())
        note = (f"\n\nRows rerun by `--merge` on {time.strftime('%Y-%m-%d')}: "
                f"{', '.join(r['description'] for r in rows if r['method'] in args.methods.split(','))}; the other "
                "rows are the earlier run's (same code path, steps and batches; step times from another moment "
                "of this shared machine, so compare them loosely).")
    (out / "convergence.json").write_text(json.dumps(rows, indent=1))
    keys = ["method", "description", "steps", "first_loss", "final_train_loss", "held_out_loss", "held_out_ppl",
            "median_step_ms", "peak_rss_mib"]
    with open(out / "convergence.csv", "w", newline="") as f:
        w = csv.DictWriter(f, keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = ["| method | held-out loss | perplexity | train loss (last 10) | median step ms | peak RSS MiB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['description']} | {r['held_out_loss']:.3f} | {r['held_out_ppl']:.1f} | "
                     f"{r['final_train_loss']:.3f} | {r['median_step_ms']:.0f} | {r['peak_rss_mib']:.0f} |")
    (out / "convergence.md").write_text(
        f"Convergence, `small` preset, {rows[0]['steps']} steps x 16 x 128 tokens, fp32, CPU "
        f"(python -m bench.bench_convergence --steps {rows[0]['steps']})\n\n" + "\n".join(lines) + note + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 5))
        for r in rows:
            ax.plot(r["losses"], label=r["description"], lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title("small preset, stdlib sources")
        ax.legend(fontsize=8)
        fig.savefig(out / "convergence.png", dpi=120, bbox_inches="tight")
    except ImportError:
        pass
    print("\n".join(lines))


if __name__ == "__main__":
    main()
