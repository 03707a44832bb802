"""lomo_kernels vs the reference lomo-optim 0.1.1 on CPU: step time and tracked peak memory of Lomo and
AdaLomo, without and with global-norm clipping, and AdaLomo's two ways of getting its statistics.

    .venv/bin/python -m bench.bench_lomo_vs_lomo_optim [--quick] [--out bench/results]

writes ``lomo_vs_lomo_optim.{md,csv}``. One fp32 LLaMA-style model, two token counts per step (few
tokens: weights dominate; many: the gradient GEMMs dominate). lomo-optim's AdaLomo calls ``.cuda()``
on its statistics; here ``torch.Tensor.cuda`` is the identity while it is constructed.
"""
from __future__ import annotations

import argparse
import copy
import sys
from unittest import mock

import torch

from lomo_kernels.memory.tracker import MemoryTracker, peak_bytes_profiled

from .common import MiB, device_record, markdown_table, time_fn, write_results

CLIP = 1.0
LR = 1e-4


def build_model(quick: bool):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    if quick:
        config = LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=1, num_attention_heads=4,
                             vocab_size=512, tie_word_embeddings=False)
    else:
        config = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                             vocab_size=16000, tie_word_embeddings=False)
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config).train()


def make_optimizer(method: str, model, clip):
    import lomo_optim

    import lomo_kernels
    if method == "lomo-optim Lomo":
        return lomo_optim.Lomo(model, lr=LR, clip_grad_norm=clip)
    if method == "lomo-optim AdaLomo":
        with mock.patch.object(torch.Tensor, "cuda", lambda self, *args, **kwargs: self):
            return lomo_optim.AdaLomo(model, lr=LR, clip_grad_norm=clip)
    if method == "lomo_kernels Lomo":
        return lomo_kernels.Lomo(model, lr=LR, clip_grad_norm=clip)
    statistics = method.split()[-1]
    return lomo_kernels.AdaLomo(model, lr=LR, clip_grad_norm=clip, statistics=statistics)


METHODS = ("lomo-optim Lomo", "lomo_kernels Lomo", "lomo-optim AdaLomo", "lomo_kernels AdaLomo recompute",
           "lomo_kernels AdaLomo materialize")


def state_tensors(opt):
    return [t for name in ("exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col") for t in getattr(opt, name, {}).values()]


def backward(opt, loss, clip):
    if clip is not None:
        opt.grad_norm(loss)
    opt.fused_backward(loss, LR)


def step(model, opt, batch, clip):
    backward(opt, model(**batch).loss, clip)


def measure(base, batch, method, clip, repeats):
    model = copy.deepcopy(base)
    opt = make_optimizer(method, model, clip)
    timing = time_fn(lambda: step(model, opt, batch, clip), repeats)
    profiled = peak_bytes_profiled(lambda: step(model, opt, batch, clip))
    del opt, model
    model = copy.deepcopy(base)
    tracker = MemoryTracker()
    with tracker:
        tracker.adopt(model.parameters(), "params")
        tracker.adopt(batch.values(), "other")
        hooks = tracker.watch_grads(model.parameters())
        opt = make_optimizer(method, model, clip)
        tracker.adopt(state_tensors(opt), "optimizer_state")
        step(model, opt, batch, clip)  # warm-up: creates lazily built state
        tracker.reset_peak()
        with tracker.phase("activations"):
            loss = model(**batch).loss
        forward = tracker.report()
        tracker.reset_peak()
        with tracker.phase("temporaries", True):
            backward(opt, loss, clip)
        del loss
    for h in hooks:
        h.remove()
    report = tracker.report()
    at_peak = report.at_peak if report.peak_bytes >= forward.peak_bytes else forward.at_peak
    return {"method": method, "clip_norm": "yes" if clip else "no", "median_ms": round(timing.median_ms, 1),
            "iqr_ms": timing.spread, "cpu_ms": round(timing.cpu_median_ms, 1),
            "tracked_peak_MiB": round(max(report.peak_bytes, forward.peak_bytes) / MiB, 2),
            "backward_peak_MiB": round(report.peak_bytes / MiB, 2),
            "grads_MiB": round(at_peak["grads"] / MiB, 2),
            "temporaries_MiB": round(at_peak["temporaries"] / MiB, 2),
            "activations_MiB": round(at_peak["activations"] / MiB, 2),
            "profiled_peak_MiB": round(profiled / MiB, 2)}


def adalomo_layer_tradeoff(quick: bool, repeats: int) -> list[dict]:
    """AdaLomo's update of one square linear layer (``AdaLomo.linear_apply``, the code path the fused
    backward calls) per statistics mode: time and the profiled peak above what was live before."""
    import lomo_kernels
    size = 256 if quick else 2048
    rows = []
    for tokens in ((16,) if quick else (64, 1024)):
        g = torch.Generator().manual_seed(2)
        x, dy = torch.randn(tokens, size, generator=g), torch.randn(tokens, size, generator=g)
        for clip_value in (None, 1e-3):
            for statistics in ("recompute", "materialize"):
                layer = torch.nn.Sequential(torch.nn.Linear(size, size, bias=False))
                opt = lomo_kernels.AdaLomo(layer, lr=LR, statistics=statistics, clip_grad_value=clip_value)
                weight = layer[0].weight
                apply = lambda: opt.linear_apply(weight, x, dy)  # noqa: E731
                timing = time_fn(apply, repeats)
                extra = peak_bytes_profiled(apply)  # sees allocations inside custom ops too
                rows.append({"layer": f"{size}x{size}", "tokens": tokens,
                             "clip_value": "none" if clip_value is None else clip_value, "statistics": statistics,
                             "median_ms": round(timing.median_ms, 1), "cpu_ms": round(timing.cpu_median_ms, 1),
                             "peak_extra_MiB": round(extra / MiB, 2),
                             "weight_gradient_MiB": round(size * size * 4 / MiB, 2)})
                print(rows[-1], file=sys.stderr, flush=True)
    return rows


def run(out_dir: str, quick: bool = False, repeats: int = 3) -> list[dict]:
    base = build_model(quick)
    n_params = sum(p.numel() for p in base.parameters())
    rows = []
    for batch_size, seq_len in ((1, 64), (4, 256)) if not quick else ((1, 16),):
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, base.config.vocab_size, (batch_size, seq_len), generator=g)
        batch = {"input_ids": ids, "labels": ids}
        for method in METHODS:
            for clip in (None, CLIP):
                row = {"tokens": batch_size * seq_len}
                row.update(measure(base, batch, method, clip, 1 if quick else repeats))
                rows.append(row)
                print(row, file=sys.stderr, flush=True)
    notes = [f"LLaMA-style model, {n_params / 1e6:.1f} M parameters, fp32, CPU; lr {LR}; 'clip_norm yes': "
             f"global-norm clipping at {CLIP} (both libraries: grad_norm, then fused_backward)",
             "median_ms / iqr_ms: wall time of a whole step (forward + backward(s) + update) after one warm-up "
             "step; cpu_ms: the process's CPU time (less sensitive to other load on a shared machine)",
             "tracked_peak_MiB: peak of live tensor bytes at the dispatcher (MemoryTracker) during a steady-state "
             "step, parameters and optimizer state included; backward_peak_MiB: the same over the backward pass(es) and "
             "update only (the forward's logits often set the whole step's peak); grads/temporaries/activations: the "
             "split at the step's peak",
             "profiled_peak_MiB: the step's peak above what was live before it, from the profiler's allocator "
             "events (also sees scratch inside lomo_kernels' custom ops, which the dispatcher-level tracker "
             "counts as one call: their row-block temporaries are not in tracked_peak_MiB)",
             "lomo_kernels AdaLomo recompute: no gradient tensor (extra passes for its statistics); "
             "materialize: one layer's fp32 gradient at a time"]
    md_path = write_results(out_dir, "lomo_vs_lomo_optim", "lomo_kernels vs lomo-optim 0.1.1 (CPU)", rows, notes,
                            device_record())
    layer_rows = adalomo_layer_tradeoff(quick, 1 if quick else repeats)
    with open(md_path, "a") as f:
        f.write("\n## AdaLomo statistics: recompute vs materialize, one linear layer\n\n"
                "- `AdaLomo.linear_apply` on one fp32 layer (what the fused backward calls per layer); peak_extra_MiB: "
                "peak allocated above what was live before (profiler allocator events, inside custom ops included); "
                "weight_gradient_MiB: what one fp32 "
                "gradient of the layer takes\n"
                "- recompute: row/col sums pass + Σu² pass + update pass over G's tiles (Gram-matrix 'ghost' sums "
                "when tokens are few and there is no value clipping); materialize: one GEMM, G kept while used\n\n"
                + markdown_table(layer_rows) + "\n")
    return rows + layer_rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model and one repeat (smoke test)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    run(args.out, quick=args.quick, repeats=args.repeats)


if __name__ == "__main__":
    main()
