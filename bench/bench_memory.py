"""The memory planner's tables: the LOMO paper's LLaMA-7B figures, 13B/30B/65B, 65B on 8x24 GB, then the
adaptive optimizers, HiFT and LoRA on LLaMA-7B (bf16), and the fused cross-entropy (Llama-3-8B, LLaMA-7B).

Every number is a plan (lomo_kernels.memory.plan): one steady-state training step of the real code
path run on fake tensors, tracked by category (HiFT: the worst group's step of a whole cycle).
"""
from __future__ import annotations

import argparse

from lomo_kernels.memory import plan
from lomo_kernels.memory.methods import fused_cross_entropy_supported
from lomo_kernels.memory.tracker import GiB

from .common import device_record, new_figure, save_figure, write_results

# LOMO paper (Lv et al. 2023), LLaMA-7B, fp16, activation checkpointing: total per-step peak (GB, 2**30 bytes)
PAPER_7B = {"torch-adamw": 102.20, "sgd": 51.99, "lomo-optim": 14.58}
# The batch that reproduces them: the torch optimizers' peak (after backward) does not depend on it;
# LOMO's is set by the checkpointed activations and the logits, and 6 x 512 = 3072 tokens matches.
PAPER_BATCH, PAPER_SEQ = 6, 512
METHODS = ("torch-adamw", "sgd", "lomo-optim", "lomo", "adalomo")
# issues 11, 12 and LoRA: LLaMA-7B, bf16 weights, checkpointing, at 1 x 512 and 6 x 512
ADAPTIVE = ("torch-adamw", "adamw", "apollo", "apollo-mini", "apollo-torch", "lora", "hift-adamw", "hift-torch-adamw")
GPU_3090_GIB = 24.0
GPU_A6000_GIB = 48.0


def _options(r) -> str:
    return " ".join(f"{k}={v}" for k, v in r.options.items())


def _row(section: str, r, paper: float | None = None) -> dict:
    row = {"section": section, "model": r.model, "method": r.method, "options": _options(r), "dtype": r.dtype,
           "batch": r.batch_size, "seq": r.seq_len, "world": r.world_size}
    row.update({c: round(v / GiB, 2) for c, v in r.per_gpu.items()})
    row["total_gib"] = round(r.total_gib, 2)
    row["host_gib"] = round(r.host_bytes / GiB, 2)
    # the construction + warm-up peak as measured, unsharded: shown for one GPU only
    row["setup_peak_gib"] = round(r.setup_peak_bytes / GiB, 2) if r.world_size == 1 else ""
    row["extrapolation_error"] = "" if r.extrapolation_error is None else f"{100 * r.extrapolation_error:+.2f}%"
    row["paper_gib"] = "" if paper is None else paper
    row["vs_paper"] = "" if paper is None else f"{100 * (r.total_gib / paper - 1):+.1f}%"
    row["fits_24gb"] = "yes" if r.total_gib <= GPU_3090_GIB else "no"
    row["fits_48gb"] = "yes" if r.total_gib <= GPU_A6000_GIB else "no"
    return row


def run(out_dir: str, quick: bool = False) -> list[dict]:
    sample = 1  # layers measured (and twice that), extrapolated to the full depth; checked at 3 layers
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
        for batch in (1, PAPER_BATCH):
            rows += [_row("7B bf16: AdamW, APOLLO, HiFT, LoRA", plan("llama-7b", m, "bf16", batch, PAPER_SEQ,
                                                                    sample_layers=sample)) for m in ADAPTIVE]
            # the HiFT paper's setting: fp32 weights (its LLaMA-7B runs fit a 48 GB A6000)
            rows += [_row("7B fp32: HiFT", plan("llama-7b", m, "fp32", batch, PAPER_SEQ, sample_layers=sample))
                     for m in ("hift-adamw", "hift-torch-adamw")]
        if fused_cross_entropy_supported("lomo"):
            for model, batch, seq in (("llama3-8b", 1, 8192), ("llama-7b", 6, 512), ("llama-7b", 1, 4096)):
                rows += [_row("fused cross-entropy (Lomo, bf16)",
                              plan(model, "lomo", "bf16", batch, seq, sample_layers=sample, fused_cross_entropy=fce))
                         for fce in (False, True)]
    notes = ["activation checkpointing, SDPA attention; weights fp16 (first three sections), bf16 or fp32 as listed; "
             f"batch x seq as listed (the LOMO-paper check uses {PAPER_BATCH} x {PAPER_SEQ})",
             "columns in GiB at the step's peak; torch-adamw/sgd (and hift-torch-adamw on 16-bit weights) keep fp32 "
             "master weights (counted as optimizer_state), lomo-optim runs with clip_grad_norm 1.0 (it requires "
             "it for fp16); lomo_kernels' fused optimizers (lomo, adalomo, adamw, apollo, apollo-mini, hift-adamw) "
             "run with their default fused cross-entropy (on: no logits) unless the options column says otherwise",
             "adamw = lomo_kernels.AdamW (fused, fp32 moments); apollo = lomo_kernels.Apollo rank 256, apollo-mini "
             "rank 1; apollo-torch = apollo-torch 1.0.3 APOLLOAdamW layer-wise (per-parameter optimizers in "
             "gradient hooks, bf16 weights stepped directly); lora = peft LoRA rank 8 on every attention/MLP "
             "linear, fp32 adapters, torch AdamW; hift-* = one decoder layer per group, the worst group's step "
             "over a cycle, inactive groups' optimizer state on the host (host_gib, not in total_gib)",
             "setup_peak_gib (one GPU only): the peak before the measured step (construction and warm-up; "
             "lomo_kernels.AdamW makes a parameter's moments at its first update, so under HiFT a group's at a "
             "time)",
             f"each plan measures {sample} and {2 * sample} layers on fake tensors and extrapolates per layer; "
             f"extrapolation_error is the extrapolated total against the plan run at {3 * sample} layers",
             "ZeRO-3 rows are arithmetic: params, persistent grads and optimizer state / world size, plus one "
             "gathered decoder layer; fits_24gb compares with an RTX 3090, fits_48gb with an A6000"]
    write_results(out_dir, "memory_plan", "Planned peak memory per GPU (LLaMA presets)", rows, notes,
                  device_record())
    _plot(rows, out_dir)
    return rows


def _plot(rows, out_dir):
    adaptive = [r for r in rows if r["section"].startswith("7B") and r["batch"] == 1]
    fig, axes = new_figure(2 if adaptive else 1)
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
    ax.set_title("fp16, 6 x 512")
    ax.legend(fontsize=7)
    if adaptive:  # LLaMA-7B at 1 x 512: the split by category
        ax = axes[1]
        labels = [f"{r['method']} {r['dtype']}" for r in adaptive]
        bottom = [0.0] * len(adaptive)
        for c in ("params", "grads", "optimizer_state", "activations", "temporaries"):
            vals = [r[c] for r in adaptive]
            ax.bar(range(len(adaptive)), vals, bottom=bottom, label=c)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.axhline(GPU_3090_GIB, color="k", ls="--", lw=0.8)
        ax.set_xticks(range(len(adaptive)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("planned peak GiB (one GPU)")
        ax.set_title("llama-7b, 1 x 512, checkpointing")
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
