"""Fused linear cross-entropy + LM-head update vs the unfused path, on CPU.

One training step of the LM head alone: loss from hidden states ``H [T, d]`` and ``W [V, d]``, its
backward (``dH``) and the SGD/LOMO update of ``W`` (weight decay 0.01; optionally value clipping).

* unfused: ``logits = H @ Wᵀ`` (fp32 [T, V]), ``ForCausalLMLoss``, autograd (``W.grad`` [V, d]), then
  ``torch.optim.SGD(weight_decay)`` (and ``clip_grad_value_``) — the hook way's cost.
* fused: ``fused_linear_cross_entropy(..., updater=LomoHead(...))`` and its backward, at several
  chunk sizes (default = ``choose_chunk_size``'s, 64 MiB budget).

Times are medians over repeats (wall and process CPU time); peak MiB is what the step allocates and has
not freed at its peak, from the torch profiler's allocator events (``peak_bytes_profiled``).
Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m bench.bench_linear_cross_entropy [--repeats N] [--quick]``.
"""
from __future__ import annotations

import argparse
import os

import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from lomo_kernels.fused_cross_entropy import LomoHead, fused_linear_cross_entropy
from lomo_kernels.memory.tracker import peak_bytes_profiled
from lomo_kernels.ops.linear_cross_entropy import choose_chunk_size

from .common import MiB, device_record, time_fn, write_results

LR, WD = 1e-3, 0.01


def make(T, V, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    H = torch.randn(1, T, d, generator=g)
    W = torch.randn(V, d, generator=g) * 0.02
    labels = torch.randint(0, V, (1, T), generator=g)
    return H, W, labels


def unfused_step(H, W, labels, clip):
    Wp = torch.nn.Parameter(W)  # shares W's storage: the step updates W in place, as the fused one does
    opt = torch.optim.SGD([Wp], lr=LR, weight_decay=WD)

    def step():
        Hr = H.detach().requires_grad_()
        loss = ForCausalLMLoss(Hr @ Wp.t(), labels, W.shape[0])
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_value_([Wp], clip)
        opt.step()
        Wp.grad = None
        return Hr.grad
    return step


def fused_step(H, W, labels, clip, chunk):
    head = LomoHead(lr=LR, weight_decay=WD, clip_value=clip)

    def step():
        Hr = H.detach().requires_grad_()
        fused_linear_cross_entropy(Hr, W, labels, updater=head, shift=True, chunk_size=chunk).backward()
        return Hr.grad
    return step


def run(out_dir: str, quick: bool = False, tokens: int = 512, vocab: int = 32000, hidden: int = 256,
        repeats: int = 9) -> list[dict]:
    """The table (``out_dir``/linear_cross_entropy.md and .csv); ``quick``: tiny shapes, 2 repeats.
    Same signature as the suites of ``bench.run_all`` (register it there as "linear_cross_entropy")."""
    T, V, d, reps = tokens, vocab, hidden, repeats
    if quick:
        T, V, d, reps = 64, 1000, 32, 2
    default_chunk = choose_chunk_size(T, V, d)
    chunks = sorted({c for c in (1024, 2048, 4096, 8192, default_chunk, V) if c <= V})
    rows = []
    for clip in (None, 1e-3):
        cases = [("unfused (logits + autograd + torch SGD)", None, unfused_step)]
        cases += [(f"fused, chunk {c}" + (" (default)" if c == default_chunk else "") + (" (one chunk)" if c == V else ""),
                   c, fused_step) for c in chunks]
        base = None
        for label, chunk, maker in cases:
            H, W, labels = make(T, V, d)
            fn = maker(H, W, labels, clip) if chunk is None else maker(H, W, labels, clip, chunk)
            t = time_fn(fn, repeats=reps, warmup=1)
            H, W, labels = make(T, V, d)
            fn = maker(H, W, labels, clip) if chunk is None else maker(H, W, labels, clip, chunk)
            peak = peak_bytes_profiled(fn) / MiB
            base = base or t.median_ms
            rows.append({"path": label, "value clip": "none" if clip is None else clip, "ms (median)": t.median_ms,
                         "IQR ms": t.spread, "CPU ms": t.cpu_median_ms, "vs unfused": t.median_ms / base,
                         "peak MiB": peak})
            print(rows[-1], flush=True)
    logits_mib = T * V * 4 / MiB
    grad_mib = V * d * 4 / MiB
    notes = [f"{T} tokens, vocabulary {V}, hidden {d}, fp32, weight decay {WD}; {reps} repeats after 1 warm-up, "
             "one process, run once (a shared 2-core machine: compare within this table only)",
             f"the unfused step holds the fp32 logits ({logits_mib:.1f} MiB), their gradient (as much) and W.grad "
             f"({grad_mib:.1f} MiB); the fused one holds one chunk's [T, C] tensors and no [V, d] tensor",
             "peak MiB: allocated during the step and not yet freed, at the peak (torch profiler allocator events)",
             "fused: the chunk's logits are computed twice (forward's log-sum-exp pass, backward's recompute): "
             "4 GEMMs of T·V·d per step against the unfused path's 3"]
    print(write_results(out_dir, "linear_cross_entropy", "Fused linear cross-entropy + LM-head update vs unfused (CPU)",
                        rows, notes, device_record()))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 2 repeats (smoke run)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    run(args.out, args.quick, args.tokens, args.vocab, args.hidden, args.repeats)


if __name__ == "__main__":
    main()
