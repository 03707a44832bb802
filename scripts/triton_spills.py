"""Register and spill report of the Triton kernels, compiled for named GPU targets without a GPU.

Each kernel variant (weight dtype x activation dtype x rounding, norm-only, dense, embedding) is compiled
exactly as the backend launches it: the backend's own function (``linear_update`` etc.) is called on CPU
tensors of a realistic shape with the kernels' ``run`` intercepted, and the captured arguments go through
Triton's own binder (``create_function_from_signature`` + ``JITFunction._pack_args``: the same signature,
integer specialization (1 -> constexpr, multiples of 16), pointer alignment, constexprs and options as a
real launch), then ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``. The PTX is run
through the ``ptxas`` Triton uses, with Triton's flags and ``-v``, to read registers, stack frame and
spill bytes per thread. (Triton's own ``CompiledKernel.n_spills`` is only filled in when a driver loads
the binary, which needs a GPU.) It also counts the float atomics in the PTX (``atom``/``red`` on f16, bf16,
f32 or f64): there must be none, since their order changes from run to run (integer atomics, the
non-finite counter's, are exact in any order and not counted).

Must run without ``TRITON_INTERPRET=1`` (under the interpreter ``triton.jit`` returns interpreted
functions that cannot be compiled): ``python scripts/triton_spills.py [--arch 86 90] [--json FILE]``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
ARCHS = (86, 90)


def variants() -> list[dict]:
    """Every kernel configuration the backend can launch on a GPU, at a realistic shape; plus odd shapes
    (no multiple-of-16 specialization) and in_features == 1 (specialized to a constexpr) for the linear
    kernel's 16-bit stochastic epilogue, its heaviest."""
    out = []
    for w in DTYPES:
        for a in DTYPES:
            for stochastic in ((False, True) if w != "fp32" else (False,)):
                out.append(dict(kernel="linear", w=w, act=a, norm_only=False, stochastic=stochastic))
    for a in DTYPES:
        out.append(dict(kernel="linear", w="fp32", act=a, norm_only=True, stochastic=False))
    for w in ("bf16", "fp16"):
        out.append(dict(kernel="linear", w=w, act=w, norm_only=False, stochastic=True, shape=(4095, 4097, 2047)))
        out.append(dict(kernel="linear", w=w, act=w, norm_only=False, stochastic=True, shape=(64, 1, 100)))
    for p in DTYPES:
        for g in DTYPES:
            for stochastic in ((False, True) if p != "fp32" else (False,)):
                out.append(dict(kernel="dense", w=p, act=g, norm_only=False, stochastic=stochastic))
    out.append(dict(kernel="dense", w="fp32", act="fp32", norm_only=True, stochastic=False))
    for w in DTYPES:
        for all_rows in (False, True):
            for stochastic in ((False, True) if w != "fp32" else (False,)):
                out.append(dict(kernel="embedding", w=w, act="fp32", all_rows=all_rows, stochastic=stochastic))
    for a in DTYPES:  # AdaLomo's passes (kernels/triton_adalomo.py): sums + their reductions, scaled norm
        out.append(dict(kernel="adalomo", w="fp32", act=a, mode="sums", stochastic=False))
        out.append(dict(kernel="adalomo", w="fp32", act=a, mode="scaled", stochastic=False))
    for w in DTYPES:  # and the update, on the weight's own dtype as operands, with the non-finite counter
        for stochastic in ((False, True) if w != "fp32" else (False,)):
            out.append(dict(kernel="adalomo", w=w, act=w, mode="update", stochastic=stochastic))
    return out


def variant_name(v: dict) -> str:
    mode = "norm" if v.get("norm_only") else ("stochastic" if v["stochastic"] else "nearest")
    if v["kernel"] == "linear":
        shape = " {}x{} T={}".format(*v["shape"]) if "shape" in v else ""
        return f"linear w={v['w']} act={v['act']} {mode}{shape}"
    if v["kernel"] == "dense":
        return f"dense p={v['w']} g={v['act']} {mode}"
    if v["kernel"] == "adalomo":
        if v["mode"] != "update":
            return f"adalomo {v['mode']} act={v['act']}"
        return f"adalomo update w={v['w']} act={v['act']} {mode}"
    rows = "all_rows" if v["all_rows"] else "touched"
    return f"embedding w={v['w']} {rows} {mode}"


def _launches(v: dict) -> list[tuple]:
    """(kernel, args, kwargs) of every kernel launch the backend makes for variant ``v``, captured from the
    backend's own code on CPU tensors (nothing runs)."""
    import torch

    from lomo_kernels.kernels import triton_adalomo as ta
    from lomo_kernels.kernels import triton_update as tu
    from lomo_kernels.ops._common import UpdateRule

    captured = []
    kernels = (tu._linear_kernel, tu._dense_kernel, tu._embedding_rows_kernel,
               tu._reduce_kernel, ta._sq_sums_kernel, ta._scaled_sqnorm_kernel, ta._update_kernel)

    def capture(kernel):
        def run(*args, grid, warmup, **kwargs):
            captured.append((kernel, args, kwargs))
        return run

    dt = {k: getattr(torch, name) for k, name in DTYPES.items()}
    rule = UpdateRule(decay=0.999, step=1e-3, inv_loss_scale=1.0, clip_value=1.0, stochastic=v["stochastic"], seed=5)
    saved_check, saved_ta_check = tu._check_device, ta._check_device
    for k in kernels:
        k.run = capture(k)
    tu._check_device = ta._check_device = lambda t: None
    try:
        if v["kernel"] == "linear":
            out_f, in_f, tokens = v.get("shape", (4096, 4096, 2048))
            x = torch.empty(tokens, in_f, dtype=dt[v["act"]])
            dy = torch.empty(tokens, out_f, dtype=dt[v["act"]])
            if v["norm_only"]:
                tu.linear_grad_sqnorm(torch.zeros(2), x, dy, 1.0)
            else:
                tu.linear_update(torch.empty(out_f, in_f, dtype=dt[v["w"]]), x, dy, rule)
        elif v["kernel"] == "adalomo":
            out_f, in_f, tokens = 4096, 4096, 2048
            x = torch.empty(tokens, in_f, dtype=dt[v["act"]])
            dy = torch.empty(tokens, out_f, dtype=dt[v["act"]])
            r, c = torch.empty(out_f), torch.empty(in_f)
            if v["mode"] == "sums":
                ta.adalomo_sq_sums(torch.zeros(out_f), torch.zeros(in_f), torch.zeros(2), x, dy, 1.0, 1.0)
            elif v["mode"] == "scaled":
                ta.adalomo_scaled_sqnorm(torch.zeros(2), x, dy, r, c, 1.0, 1.0)
            else:
                ta.adalomo_linear_update(torch.empty(out_f, in_f, dtype=dt[v["w"]]), x, dy, r, c, rule,
                                         torch.zeros(1, dtype=torch.int64))
        elif v["kernel"] == "dense":
            g = torch.empty(1 << 20, dtype=dt[v["act"]])
            if v["norm_only"]:
                tu.dense_grad_sqnorm(torch.zeros(2), g, 1.0)
            else:
                tu.dense_update(torch.empty(1 << 20, dtype=dt[v["w"]]), g, rule)
        else:
            vocab, dim = 32000, 4096
            w = torch.empty(vocab, dim, dtype=dt[v["w"]])
            idx = torch.randint(0, vocab, (512,))
            dy = torch.zeros(512, dim)
            tu.embedding_update(w, idx, dy, -1, UpdateRule(decay=0.999 if v["all_rows"] else 1.0, step=1e-3,
                                                           stochastic=v["stochastic"], seed=5))
    finally:
        for k in kernels:
            del k.run
        tu._check_device, ta._check_device = saved_check, saved_ta_check
    assert captured, f"no launch captured for {variant_name(v)}"
    return captured


def _compile_launch(kernel, args: tuple, kwargs: dict, arch: int):
    """triton.compile of one captured launch for ``arch``, specialized exactly as JITFunction.run does."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


_FLOAT_ATOMIC = re.compile(r"\b(?:atom|red)(?:\.\w+)*\.(?:f16|bf16|f32|f64)(?:x2)?\b")
_PTXAS_LINE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def ptxas_report(ptx: str, arch: int) -> dict:
    """Registers, stack frame and spill bytes per thread from ``ptxas -v`` (Triton's ptxas and flags)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", "--fmad=false", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(arch)}", str(src), "-o", str(Path(tmp) / "k.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    log = proc.stdout + proc.stderr
    stack, stores, loads = (int(x) for x in _PTXAS_LINE.search(log).groups())
    return {"registers": int(_REGS.search(log).group(1)), "stack_bytes": stack, "spill_store_bytes": stores,
            "spill_load_bytes": loads}


def compile_variant(v: dict, arch: int) -> dict:
    t0 = time.perf_counter()
    reports, shared, float_atomics = [], 0, 0
    for kernel, args, kwargs in _launches(v):
        compiled = _compile_launch(kernel, args, kwargs, arch)
        reports.append(ptxas_report(compiled.asm["ptx"], arch))
        shared = max(shared, compiled.metadata.shared)
        float_atomics += len(_FLOAT_ATOMIC.findall(compiled.asm["ptx"]))
    worst = {k: max(r[k] for r in reports) for k in reports[0]}
    return {"arch": f"sm_{arch}", "variant": variant_name(v), **worst, "shared_bytes": shared,
            "float_atomics": float_atomics, "seconds": round(time.perf_counter() - t0, 2)}


def report(archs=ARCHS, kernels=None) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("run without TRITON_INTERPRET=1: interpreted kernels cannot be compiled for a GPU target")
    return [compile_variant(v, arch) for arch in archs for v in variants()
            if kernels is None or v["kernel"] in kernels]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--kernel", nargs="+", choices=("linear", "dense", "embedding", "adalomo"))
    parser.add_argument("--json", help="write the rows here as JSON")
    args = parser.parse_args(argv)
    rows = report(args.arch, args.kernel)
    for r in rows:
        flag = "  SPILLS" if r["spill_store_bytes"] or r["spill_load_bytes"] or r["stack_bytes"] else ""
        flag += "  FLOAT ATOMICS" if r["float_atomics"] else ""
        print(f"{r['arch']}  {r['variant']:<40} regs {r['registers']:>3}  stack {r['stack_bytes']:>5}  "
              f"spill st/ld {r['spill_store_bytes']:>5}/{r['spill_load_bytes']:<5} "
              f"float atomics {r['float_atomics']} {r['seconds']:>5.1f}s{flag}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if any(r["spill_store_bytes"] or r["spill_load_bytes"] or r["float_atomics"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
