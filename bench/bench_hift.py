"""HiFT's truncated backward on CPU: step time per strategy and group size against the wrapped fused
optimizer on all layers, in one run.

    .venv/bin/python -m bench.bench_hift [--quick] [--cycles 2] [--out bench/results]

writes ``hift.{md,csv}``. One fp32 LLaMA-style model; a HiFT step is a forward plus ``fused_backward``
of the active group only (the backward stops at the lowest active layer, frozen layers above it run
only their input-gradient GEMMs). Times are per step, averaged over whole cycles (every group once),
after one warm-up cycle; the baseline is the wrapped optimizer training every layer each step. The
per-group table shows where the saving comes from (down2up, one layer per group).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import lomo_kernels

from .common import device_record, write_results

LR = 1e-4


def build_model(quick: bool):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    if quick:
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                             vocab_size=128, tie_word_embeddings=False)
    else:
        config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=8,
                             vocab_size=4096, tie_word_embeddings=False)
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config).train()


def make_inner(name: str, model):
    if name == "Lomo":
        return lomo_kernels.Lomo(model, lr=LR)
    return lomo_kernels.AdaLomo(model, lr=LR)


def timed_step(model, opt, ids):
    """(forward, backward) CPU time of this process in ms: with one thread, not inflated by other
    processes on a shared machine (wall time is)."""
    t0 = time.process_time()
    loss = model(input_ids=ids, labels=ids).loss
    t1 = time.process_time()
    opt.fused_backward(loss, LR)
    t2 = time.process_time()
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3


def run_baseline(inner_name, quick, batch, steps):
    model = build_model(quick)
    with make_inner(inner_name, model) as opt:
        times = [timed_step(model, opt, batch) for _ in range(steps + 1)][1:]
    return statistics.median(f + b for f, b in times), statistics.median(b for _, b in times)


def run_hift(inner_name, quick, batch, group_size, strategy, cycles):
    model = build_model(quick)
    hift = lomo_kernels.HiFT(make_inner(inner_name, model), group_size=group_size, strategy=strategy, seed=0)
    n = hift.num_groups
    per_cycle, per_group = [], {}
    try:
        for cycle in range(cycles + 1):
            steps = []
            for _ in range(n):
                label = hift.active_group.label
                f, b = timed_step(model, hift, batch)
                steps.append((f, b))
                if cycle > 0:
                    per_group.setdefault(label, []).append((f, b))
            if cycle > 0:  # the first cycle warms up
                per_cycle.append((statistics.fmean(f + b for f, b in steps), statistics.fmean(b for _, b in steps)))
    finally:
        hift.close()
    step = statistics.median(s for s, _ in per_cycle)
    backward = statistics.median(b for _, b in per_cycle)
    groups = {label: (statistics.median(f + b for f, b in v), statistics.median(b for _, b in v))
              for label, v in per_group.items()}
    return n, step, backward, groups


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model, one measured cycle (smoke test)")
    parser.add_argument("--cycles", type=int, default=3, help="measured cycles per configuration (after one warm-up)")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    cycles = 1 if args.quick else args.cycles
    torch.manual_seed(0)
    torch.set_num_threads(1)
    batch_size, seq = (2, 16) if args.quick else (4, 64)
    model = build_model(args.quick)
    layers = model.config.num_hidden_layers
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq))
    del model
    group_sizes = sorted({1, 2, layers // 2, layers})
    configs = [("Lomo", g, s) for g in group_sizes for s in ("down2up", "up2down", "random")]
    configs += [("AdaLomo", g, "down2up") for g in group_sizes]
    rows, group_rows = [], []
    baselines = {}
    for inner in ("Lomo", "AdaLomo"):
        step, backward = run_baseline(inner, args.quick, ids, steps=8 if not args.quick else 2)
        baselines[inner] = (step, backward)
        rows.append({"optimizer": inner, "method": "all layers", "group size": "-", "groups": 1,
                     "step ms": round(step, 2), "backward ms": round(backward, 2), "step vs all layers": 1.0,
                     "backward vs all layers": 1.0})
        print(rows[-1], file=sys.stderr)
    for inner, group_size, strategy in configs:
        n, step, backward, groups = run_hift(inner, args.quick, ids, group_size, strategy, cycles)
        base_step, base_backward = baselines[inner]
        rows.append({"optimizer": inner, "method": f"HiFT {strategy}", "group size": group_size, "groups": n,
                     "step ms": round(step, 2), "backward ms": round(backward, 2),
                     "step vs all layers": round(step / base_step, 3),
                     "backward vs all layers": round(backward / base_backward, 3)})
        print(rows[-1], file=sys.stderr)
        if inner == "Lomo" and group_size == 1 and strategy == "down2up":
            for label, (s, b) in groups.items():
                group_rows.append({"group (down2up, size 1)": label, "step ms": round(s, 2),
                                   "backward ms": round(b, 2), "backward vs all layers": round(b / base_backward, 3)})
    notes = [f"model: LLaMA-style, {layers} layers, {params / 1e6:.1f} M parameters, fp32; batch {batch_size} x "
             f"{seq} tokens; {torch.get_num_threads()} thread(s)",
             "times are CPU time of the process (process_time, 1 thread), robust to other load on the machine; "
             "step = forward + fused_backward; HiFT rows: mean step over a whole cycle (every group once), median "
             f"over {cycles} measured cycle(s) after a warm-up cycle; all-layers rows: median of steps",
             "the saving is the backward below the active group (never run) and the weight-gradient GEMMs of "
             "frozen layers above it (only input gradients flow through them); the forward is unchanged",
             "strategy only changes the order, not the set of steps in a cycle: equal means are expected, "
             "differences between strategies are noise"]
    md = write_results(args.out, "hift", "HiFT (truncated backward) vs all layers, CPU", rows, notes,
                       device_record())
    if group_rows:
        from .common import markdown_table
        with open(md, "a") as f:
            f.write("\nPer group (Lomo, down2up, one layer per group): the lower the group, the longer its "
                    "backward.\n\n" + markdown_table(group_rows) + "\n")
    print(open(md).read())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
