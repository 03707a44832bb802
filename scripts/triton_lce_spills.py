"""Register and spill report of the fused linear cross-entropy's Triton kernels
(``lomo_kernels/kernels/triton_linear_cross_entropy.py``), compiled for sm_86 / sm_90 without a GPU.

The same method as ``scripts/triton_spills.py`` (whose compile and ``ptxas -v`` helpers it imports): each
launch is captured from the backend's own Python functions on CPU tensors of a realistic shape (Llama-2-7B's
head: 2048 tokens, vocabulary 32000, hidden 4096; a 512-column chunk), then compiled exactly as the launch
would be, and its PTX run through Triton's ``ptxas`` with ``-v``. The forward's vocabulary splits are
computed for 132 SMs (an H100/H200) since there is no GPU to ask.

Run without ``TRITON_INTERPRET=1``: ``python scripts/triton_lce_spills.py [--arch 86 90] [--json FILE]``;
exit status 1 if any variant spills.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from triton_spills import _compile_launch, ptxas_report  # noqa: E402

DTYPES = ("float32", "bfloat16", "float16")
ARCHS = (86, 90)
SMS = 132


def variants() -> list[dict]:
    out = []
    for a in DTYPES:
        for extras in (False, True):  # extras: bias, softcap, label smoothing
            out.append(dict(kernel="forward", act=a, w=a, extras=extras))
            out.append(dict(kernel="dlogits", act=a, w=a, extras=extras))
    out.append(dict(kernel="forward", act="bfloat16", w="float32", extras=False))  # mixed: widened operands
    for w in DTYPES:
        out.append(dict(kernel="grad_hidden", act="float32", w=w, extras=False))
        for stochastic in ((False, True) if w != "float32" else (False,)):
            for scaled in (False, True):
                out.append(dict(kernel="rows_update", act="float32", w=w, stochastic=stochastic, scaled=scaled))
    return out


def variant_name(v: dict) -> str:
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    if v["kernel"] == "rows_update":
        mode = "stochastic" if v["stochastic"] else "nearest"
        return f"lce rows_update w={short[v['w']]} {mode}" + (" scaled" if v["scaled"] else "")
    if v["kernel"] == "grad_hidden":
        return f"lce grad_hidden w={short[v['w']]}"
    extras = " bias+softcap+smoothing" if v["extras"] else ""
    return f"lce {v['kernel']} h={short[v['act']]} w={short[v['w']]}{extras}"


def _launches(v: dict) -> list[tuple]:
    import torch

    from lomo_kernels.kernels import triton_linear_cross_entropy as t
    from lomo_kernels.ops._common import UpdateRule

    kernels = (t._lse_kernel, t._dlogits_kernel, t._grad_hidden_kernel, t._rows_update_kernel)
    captured = []

    def capture(kernel):
        def run(*args, grid, warmup, **kwargs):
            captured.append((kernel, args, kwargs))
        return run

    saved = t._check, t._n_splits
    for k in kernels:
        k.run = capture(k)
    t._check = lambda *a: None
    t._n_splits = lambda tb, vb, dev: max(1, min(vb, -(-2 * SMS // tb)))
    try:
        T, V, d, C = 2048, 32000, 4096, 512
        act, w = getattr(torch, v["act"]), getattr(torch, v["w"])
        H = torch.empty(T, d, dtype=act)
        W = torch.empty(V, d, dtype=w)
        y = torch.zeros(T, dtype=torch.int64)
        b = torch.empty(V) if v.get("extras") else None
        eps, cap = (0.1, 30.0) if v.get("extras") else (0.0, 0.0)
        if v["kernel"] == "forward":
            t.forward(H, W, b, y, -100, eps, cap)  # (combines uninitialized partials: nothing ran)
        elif v["kernel"] == "dlogits":
            t.dlogits(H, W, b, y, torch.empty(T), torch.empty(T), 1024, 1024 + C, eps, cap)
        elif v["kernel"] == "grad_hidden":
            t.grad_hidden_add_(torch.empty(T, d), torch.empty(T, C), W, 1024)
        else:
            rule = UpdateRule(decay=0.999, step=1e-3, inv_loss_scale=1.0, clip_value=1.0,
                              stochastic=v["stochastic"], seed=5)
            rs, cs = (torch.empty(C), torch.empty(d)) if v["scaled"] else (None, None)
            t.rows_update(W, 1024, torch.empty(T, d), torch.empty(T, C), rs, cs, rule)
    finally:
        for k in kernels:
            del k.run
        t._check, t._n_splits = saved
    assert captured, f"no launch captured for {variant_name(v)}"
    return captured


def compile_variant(v: dict, arch: int) -> dict:
    t0 = time.perf_counter()
    reports, shared = [], 0
    for kernel, args, kwargs in _launches(v):
        compiled = _compile_launch(kernel, args, kwargs, arch)
        reports.append(ptxas_report(compiled.asm["ptx"], arch))
        shared = max(shared, compiled.metadata.shared)
    worst = {k: max(r[k] for r in reports) for k in reports[0]}
    return {"arch": f"sm_{arch}", "variant": variant_name(v), **worst, "shared_bytes": shared,
            "seconds": round(time.perf_counter() - t0, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--json", help="write the rows here as JSON")
    parser.add_argument("--only", help="only variants whose name contains this")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("run without TRITON_INTERPRET=1: interpreted kernels cannot be compiled for a GPU target")
    rows = [compile_variant(v, arch) for arch in args.arch for v in variants()
            if not args.only or args.only in variant_name(v)]
    for r in rows:
        flag = "  SPILLS" if r["spill_store_bytes"] or r["spill_load_bytes"] or r["stack_bytes"] else ""
        print(f"{r['arch']}  {r['variant']:<48} regs {r['registers']:>3}  stack {r['stack_bytes']:>5}  "
              f"spill st/ld {r['spill_store_bytes']:>5}/{r['spill_load_bytes']:<5} smem {r['shared_bytes']:>6} "
              f"{r['seconds']:>5.1f}s{flag}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if any(r["spill_store_bytes"] or r["spill_load_bytes"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
