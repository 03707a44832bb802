"""Microbenchmark of one linear layer's weight update: fused vs hook-based vs the bare gradient matmul.

    matmul  G = dyᵀ x alone: the floor (any update needs at least this GEMM)
    hook    G = dyᵀ x, then W.add_(G, alpha=-lr) (plus clamp_ with value clipping): what a
            per-parameter gradient hook does, a weight-sized gradient included
    fused   lomo_kernels.linear_update_ on each available backend: no weight-sized gradient

Shapes: LLaMA-7B's attention (q/k/v/o), MLP up/gate and MLP down matrices scaled down by ``--scale``,
over token counts 128…4096. Peak bytes are measured from the profiler's allocator events.
"""
from __future__ import annotations

import argparse

import torch

import lomo_kernels
from lomo_kernels.memory.tracker import peak_bytes_profiled

from .common import MiB, bench_device, device_record, new_figure, save_figure, time_fn, write_results

LLAMA7B_LINEARS = {"attn 4096x4096": (4096, 4096), "mlp-up 11008x4096": (11008, 4096),
                   "mlp-down 4096x11008": (4096, 11008)}
LR, CLIP = 1e-3, 0.01
_TIME = "median_ms" if torch.cuda.is_available() else "cpu_ms"  # the plotted time


def _backends(device: torch.device) -> list[str]:
    names = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
    available = lomo_kernels.available_backends()
    return [n for n in names if available[n].available] + ["torch"]


def _variants(w, x, dy, clip: float | None, device):
    def matmul():
        torch.mm(dy.t(), x)

    def hook():
        # lomo-optim's hook on the gradient autograd built: fp32 copies of gradient and weight (no-ops for fp32)
        g = torch.mm(dy.t(), x).to(torch.float32)
        if clip is not None:
            g.clamp_(-clip, clip)
        w32 = w.to(torch.float32)
        w32.add_(g, alpha=-LR)
        if w32 is not w:
            w.copy_(w32)

    rounding = "nearest" if w.dtype == torch.float32 else "stochastic"  # Lomo's default for bf16
    out = {"matmul": matmul, "hook": hook}
    for backend in _backends(device):
        out[f"fused[{backend}]"] = (lambda b=backend: lomo_kernels.linear_update_(
            w, x, dy, lr=LR, clip_value=clip, rounding=rounding, backend=b))
    return out


def run(out_dir: str, quick: bool = False, scale: int = 8, repeats: int = 5) -> list[dict]:
    device = bench_device()
    tokens_list = (128, 512) if quick else (128, 512, 1024, 2048, 4096)
    shapes = dict(list(LLAMA7B_LINEARS.items())[:1]) if quick else LLAMA7B_LINEARS
    scale = 16 if quick else scale
    repeats = 1 if quick else repeats
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for label, (out_f, in_f) in shapes.items():
            out_f, in_f = out_f // scale, in_f // scale
            for tokens in tokens_list:
                w = torch.randn(out_f, in_f, device=device, dtype=dtype)
                x = torch.randn(tokens, in_f, device=device, dtype=dtype)
                dy = torch.randn(tokens, out_f, device=device, dtype=dtype) * 1e-2
                for clip in (None, CLIP):
                    for name, fn in _variants(w, x, dy, clip, device).items():
                        if name == "matmul" and clip is not None:
                            continue  # the floor does not depend on the rule
                        t = time_fn(fn, repeats, device=device)
                        rows.append({"dtype": str(dtype).removeprefix("torch."), "layer": label,
                                     "shape": f"{out_f}x{in_f}", "tokens": tokens,
                                     "rule": "sgd" if clip is None else "sgd+clip_value", "variant": name,
                                     "median_ms": round(t.median_ms, 3), "iqr_ms": t.spread,
                                     "cpu_ms": round(t.cpu_median_ms, 3), "repeats": t.repeats,
                                     "peak_MiB": round(peak_bytes_profiled(fn) / MiB, 3),
                                     "weight_MiB": round(w.numel() * w.element_size() / MiB, 3)})
    notes = [f"weights, activations and output gradients in the row's dtype; lr {LR}; clip_value {CLIP} for "
             f"the sgd+clip_value rule; shapes are LLaMA-7B's divided by {scale}; bf16 fused updates round "
             "stochastically (Lomo's default for bf16)",
             "median and interquartile range (iqr) of wall time over the repeats, after one warm-up run; "
             "cpu_ms: median CPU time of the process (on a shared machine the wall time also counts other "
             "processes' turns; the CPU time does not)",
             "peak_MiB: bytes allocated during the call and not yet freed, at their peak (torch profiler "
             "allocator events); the hook (lomo-optim's: gradient, then fp32 copies of gradient and weight) "
             "and the matmul floor hold a weight-sized gradient, fused ones only bounded scratch",
             "fused[cpu] is the compiled C++ backend, fused[torch] the plain-torch reference (row-blocked)"]
    write_results(out_dir, "kernels", "Linear-layer weight update: fused vs hook vs matmul floor", rows, notes,
                  device_record())
    _plot(rows, out_dir)
    return rows


def _plot(rows, out_dir):
    fig, axes = new_figure(2)
    layer = rows[0]["layer"]
    for ax, dtype in zip(axes, ("float32", "bfloat16")):
        sel = [r for r in rows if r["layer"] == layer and r["dtype"] == dtype and r["rule"] == "sgd"]
        for variant in dict.fromkeys(r["variant"] for r in sel):
            pts = [(r["tokens"], r[_TIME]) for r in sel if r["variant"] == variant]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=variant)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens")
        ax.set_ylabel(f"{_TIME} (median)")
        ax.set_title(f"{layer} ({sel[0]['shape']}), {dtype}, sgd")
        ax.legend(fontsize=8)
    return save_figure(fig, out_dir, "kernels")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--scale", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    run(args.out, args.quick, args.scale, args.repeats)


if __name__ == "__main__":
    main()
