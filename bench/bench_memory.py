"""The memory planner's tables: the LOMO paper's LLaMA-7B figures, then 13B/30B/65B, then 65B on 8×24 GB.

Every number is a plan (lomo_kernels.memory.plan): one steady-state training step of the real code
path run on fake tensors, tracked by category, at fp16 with activation checkpointing.
"""
from __future__ import annotations

import argparse

from lomo_kernels.memory import plan
from lomo_kernels.memory.tracker import GiB

from .common import device_record, new_figure, save_figure, write_results

# LOMO paper (Lv et al. 2023), LLaMA-7B, fp16, activation checkpointing: total per-step peak (GB, 2**30 bytes)
PAPER_7B = {"torch-adamw": 102.20, "sgd": 51.99, "lomo-optim": 14.58}
# The batch that reproduces them: the torch optimizers' peak (after backward) does not depend on it;
# LOMO's is set by the checkpointed activations and the logits, and 6 x 512 = 3072 tokens matches.
PAPER_BATCH, PAPER_SEQ = 6, 512
METHODS = ("torch-adamw", "sgd", "lomo-optim", "lomo", "adalomo")
GPU_3090_GIB = 24.0


def _row(section: str, r, paper: float | None = None) -> dict:
    row = {"section": section, "model": r.model, "method": r.method, "batch": r.batch_size, "seq": r.seq_len,
           "world": r.world_size}
    row.update({c: round(v / GiB, 2) for c, v in r.per_gpu.items()})
    row["total_gib"] = round(r.total_gib, 2)
    row["paper_gib"] = "" if paper is None else paper
    row["vs_paper"] = "" if paper is None else f"{100 * (r.total_gib / paper - 1):+.1f}%"
    row["fits_24gb"] = "yes" if r.total_gib <= GPU_3090_GIB else "no"
    return row


def run(out_dir: str, quick: bool = False) -> list[dict]:
    sample = 1  # layers measured (and twice that), extrapolated to the full depth
    methods = ("torch-adamw", "sgd", "lomo-optim") if quick else METHODS
    rows = [_row("paper check", plan("llama-7b", m, "fp16", PAPER_BATCH, PAPER_SEQ, sample_layers=sample),
                 PAPER_7B.get(m)) for m in methods]
    if not quick:
        for model in ("llama-13b", "llama-30b", "llama-65b"):
            rows += [_row("larger models", plan(model, m, "fp16", PAPER_BATCH, PAPER_SEQ, sample_layers=sample))
                     for m in METHODS]
        for batch in (1, PAPER_BATCH):
            rows += [_row("65B ZeRO-3 x8", plan("llama-65b", m, "fp16", batch, PAPER_SEQ, world_size=8,
                                                sample_layers=sample)) for m in METHODS]
    notes = [f"fp16 weights, activation checkpointing, SDPA attention; batch x seq as listed "
             f"(the LOMO-paper check uses {PAPER_BATCH} x {PAPER_SEQ})",
             "columns in GiB at the step's peak; adamw/sgd keep fp32 master weights (counted as optimizer_state), "
             "lomo-optim runs with clip_grad_norm 1.0 (it requires it for fp16)",
             f"each plan measures {sample} and {2 * sample} layers on fake tensors and extrapolates per layer "
             "(checked equal to the full-depth run for LLaMA-7B)",
             "ZeRO-3 rows are arithmetic: params, persistent grads and optimizer state / world size, plus one "
             "gathered decoder layer; fits_24gb compares with an RTX 3090"]
    write_results(out_dir, "memory_plan", "Planned peak memory per GPU (LLaMA presets)", rows, notes,
                  device_record())
    _plot(rows, out_dir)
    return rows


def _plot(rows, out_dir):
    fig, axes = new_figure(1)
    ax = axes[0]
    sel = [r for r in rows if r["section"] in ("paper check", "larger models")]
    models = list(dict.fromkeys(r["model"] for r in sel))
    methods = list(dict.fromkeys(r["method"] for r in sel))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        vals = [next((r["total_gib"] for r in sel if r["model"] == m and r["method"] == method), 0) for m in models]
        ax.bar([j + i * width for j in range(len(models))], vals, width, label=method)
    ax.axhline(GPU_3090_GIB, color="k", ls="--", lw=0.8, label="24 GB")
    ax.set_yscale("log")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], models)
    ax.set_ylabel("planned peak GiB (one GPU)")
    ax.legend(fontsize=7)
    return save_figure(fig, out_dir, "memory_plan")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    run(args.out, args.quick)


if __name__ == "__main__":
    main()
