"""One training step of small transformers, per method: time and peak memory by category.

Two real ``transformers`` models sized for a CPU, fp32 (on the GPU when there is one):
    llama-weights     LLaMA-style, few tokens per step: parameters dominate memory
    gpt2-activations  GPT-2-style, many tokens per step: activations dominate memory
Methods (lomo_kernels.memory.methods): the forward+backward floor, torch SGD, torch AdamW, lomo-optim's
Lomo, and lomo_kernels' Lomo and AdaLomo, each without and with global-norm clipping (max norm 1.0).
Peak by category is tracked at the dispatcher (MemoryTracker); ``profiled_peak_MiB`` is the whole
step's peak from the profiler's allocator events, independent of the tracker (it also sees scratch
allocated inside fused ops).
"""
from __future__ import annotations

import argparse
import copy

import torch

from lomo_kernels.memory.methods import FUSED_METHODS, METHODS, StepConfig, Trainer
from lomo_kernels.memory.tracker import CATEGORIES, MemoryTracker, peak_bytes_profiled

from .common import MiB, bench_device, device_record, new_figure, save_figure, time_fn, write_results

CLIP = 1.0


def model_specs(quick: bool) -> dict:
    """name -> (config factory, batch size, sequence length)."""
    from transformers import GPT2Config, LlamaConfig
    if quick:
        return {"llama-weights": (lambda: LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=1,
                                                      num_attention_heads=4, vocab_size=512), 1, 16),
                "gpt2-activations": (lambda: GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=256,
                                                        n_positions=128), 2, 64)}
    return {"llama-weights": (lambda: LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                                  num_attention_heads=4, vocab_size=8000,
                                                  tie_word_embeddings=False), 1, 64),
            "gpt2-activations": (lambda: GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=4000,
                                                    n_positions=512), 2, 256)}


def build(config_factory, seed: int = 0):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    config = config_factory()
    config._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(config).to(bench_device()).train()


def _batch(model, batch_size, seq_len, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=g).to(bench_device())
    return {"input_ids": ids, "labels": ids}


def _cases(quick: bool):
    methods = [m for m in METHODS if m != "adalomo" or _has_adalomo()]
    for method in methods:
        yield method, None
        if method != "none" and not quick:
            yield method, CLIP


def _has_adalomo() -> bool:
    import lomo_kernels
    return hasattr(lomo_kernels, "AdaLomo")


def measure(base_model, batch, method: str, clip: float | None, repeats: int) -> dict:
    cfg = StepConfig(method, lr=1e-4, clip_grad_norm=clip)
    # timing: a fresh copy, one warm-up step (creates optimizer state), then the repeats
    model = copy.deepcopy(base_model)
    trainer = Trainer(model, cfg)
    timing = time_fn(lambda: trainer.step(batch), repeats, device=bench_device())
    profiled = peak_bytes_profiled(lambda: trainer.step(batch))
    trainer.close()
    # memory by category: another fresh copy under the tracker, peak of the second (steady-state) step
    model = copy.deepcopy(base_model)
    tracker = MemoryTracker()
    with tracker:
        trainer = Trainer(model, cfg, tracker)
        tracker.adopt(batch.values(), "other")
        trainer.step(batch)
        tracker.reset_peak()
        trainer.step(batch)
    trainer.close()
    report = tracker.report()
    row = {"method": method, "clip_norm": "yes" if clip else "no", "median_ms": round(timing.median_ms, 1),
           "iqr_ms": timing.spread, "cpu_ms": round(timing.cpu_median_ms, 1), "repeats": timing.repeats}
    row.update({f"{c}_MiB": round(report.at_peak[c] / MiB, 2) for c in CATEGORIES})
    row["tracked_peak_MiB"] = round(report.peak_bytes / MiB, 2)
    row["profiled_peak_MiB"] = round(profiled / MiB, 2)
    return row


def run(out_dir: str, quick: bool = False, repeats: int = 3) -> list[dict]:
    repeats = 1 if quick else repeats
    rows = []
    for name, (factory, batch_size, seq_len) in model_specs(quick).items():
        base = build(factory)
        batch = _batch(base, batch_size, seq_len)
        n_params = sum(p.numel() for p in base.parameters())
        for method, clip in _cases(quick):
            row = {"model": name, "params_M": round(n_params / 1e6, 2), "tokens": batch_size * seq_len}
            row.update(measure(base, batch, method, clip, repeats))
            rows.append(row)
    notes = [f"fp32 on {bench_device().type}; lr 1e-4; 'clip_norm yes' is global-norm clipping at 1.0 "
             "(torch: clip_grad_norm_; LOMO methods: their two-backward grad_norm protocol)",
             "median and interquartile range of the step's wall time after one warm-up step; cpu_ms: median "
             "CPU time of the process (robust to other processes sharing the machine)",
             "*_MiB by category: the split at the tracked peak of a steady-state step (MemoryTracker: "
             "activations = created in forward, temporaries = created in backward/update and neither a "
             "gradient nor optimizer state)",
             "profiled_peak_MiB: the step's peak above the bytes live before it, from profiler allocator "
             "events (params and existing state excluded, fused ops' internal scratch included)",
             f"methods: {', '.join(METHODS)}; fused (update inside backward): {', '.join(FUSED_METHODS)}"]
    write_results(out_dir, "step", "Training step per method: time and peak memory by category", rows, notes,
                  device_record())
    _plot(rows, out_dir)
    return rows


def _plot(rows, out_dir):
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = new_figure(len(models))
    for ax, model in zip(axes, models):
        sel = [r for r in rows if r["model"] == model]
        labels = [r["method"] + (" +clip" if r["clip_norm"] == "yes" else "") for r in sel]
        bottom = [0.0] * len(sel)
        for c in CATEGORIES:
            vals = [r[f"{c}_MiB"] for r in sel]
            ax.bar(range(len(sel)), vals, bottom=bottom, label=c)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_xticks(range(len(sel)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("MiB at peak")
        ax.set_title(model)
    axes[0].legend(fontsize=7)
    return save_figure(fig, out_dir, "step")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    run(args.out, args.quick, args.repeats)


if __name__ == "__main__":
    main()
