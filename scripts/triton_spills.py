"""Register and spill report of the Triton kernels, compiled for named GPU targets without a GPU.

Each kernel variant (weight dtype x activation dtype x rounding, norm-only, dense, embedding) is compiled
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` exactly as the backend
launches it (same constexprs, num_warps, num_stages, no FMA contraction); the resulting PTX is then run
through the same ``ptxas`` Triton uses, with ``-v``, to read registers, stack frame and spill bytes per
thread. (Triton's own ``CompiledKernel.n_spills`` is only filled in when a driver loads the binary,
which needs a GPU.)

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
    """Every kernel configuration the backend can launch on a GPU (kernel, signature types, constexprs)."""
    out = []
    for w in DTYPES:
        for a in DTYPES:
            for stochastic in ((False, True) if w != "fp32" else (False,)):
                out.append(dict(kernel="linear", w=w, act=a, norm_only=False, stochastic=stochastic))
    for a in DTYPES:
        out.append(dict(kernel="linear", w="fp32", act=a, norm_only=True, stochastic=False))
    for p in DTYPES:
        for g in DTYPES:
            for stochastic in ((False, True) if p != "fp32" else (False,)):
                out.append(dict(kernel="dense", w=p, act=g, norm_only=False, stochastic=stochastic))
    out.append(dict(kernel="dense", w="fp32", act="fp32", norm_only=True, stochastic=False))
    for w in DTYPES:
        for all_rows in (False, True):
            for stochastic in ((False, True) if w != "fp32" else (False,)):
                out.append(dict(kernel="embedding", w=w, act="fp32", all_rows=all_rows, stochastic=stochastic))
    return out


def variant_name(v: dict) -> str:
    if v["kernel"] == "linear":
        mode = "norm" if v["norm_only"] else ("stochastic" if v["stochastic"] else "nearest")
        return f"linear w={v['w']} act={v['act']} {mode}"
    if v["kernel"] == "dense":
        mode = "norm" if v["norm_only"] else ("stochastic" if v["stochastic"] else "nearest")
        return f"dense p={v['w']} g={v['act']} {mode}"
    rows = "all_rows" if v["all_rows"] else "touched"
    return f"embedding w={v['w']} {rows} {'stochastic' if v['stochastic'] else 'nearest'}"


def _source(v: dict):
    import torch
    from triton.compiler import ASTSource

    from lomo_kernels.kernels import triton_update as tu

    scalars = {n: "fp32" for n in ("decay", "step", "inv_loss_scale", "clip_value")}
    scalars["seed_mix"] = "i32"
    if v["kernel"] == "linear":
        sig = {"w_ptr": f"*{v['w']}", "x_ptr": f"*{v['act']}", "dy_ptr": f"*{v['act']}", "stats_ptr": "*fp32"}
        sig.update({n: "i32" for n in ("tokens", "out_features", "in_features", "stride_w_out", "stride_w_in",
                                         "stride_x_tok", "stride_x_in", "stride_dy_tok", "stride_dy_out")})
        sig.update(scalars)
        cfg = tu._gemm_config(getattr(torch, DTYPES[v["act"]]))
        launch = {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}
        const = dict(NORM_ONLY=v["norm_only"], STOCHASTIC=v["stochastic"], DOT_IN_FP32=False,
                     DOT_PRECISION="ieee" if v["act"] == "fp32" else "tf32", **cfg)
        fn = tu._linear_kernel
    elif v["kernel"] == "dense":
        sig = {"p_ptr": f"*{v['w']}", "g_ptr": f"*{v['act']}", "stats_ptr": "*fp32", "numel": "i32",
               "stride_p": "i32", "stride_g": "i32", **scalars}
        const = dict(NORM_ONLY=v["norm_only"], STOCHASTIC=v["stochastic"], BLOCK=tu._DENSE_BLOCK)
        launch = {}
        fn = tu._dense_kernel
    else:
        sig = {"w_ptr": f"*{v['w']}", "g_ptr": "*fp32", "row_of_slot_ptr": "*i64" if not v["all_rows"] else "*i32",
               "slot_of_row_ptr": "*i32" if v["all_rows"] else "*i64", "n_rows": "i32", "dim": "i32",
               **{n: "i32" for n in ("stride_w_row", "stride_w_col", "stride_g_row", "stride_g_col")}, **scalars}
        block_d = 256  # the largest BLOCK_D the backend picks (dim >= 256), the most live values per program
        const = dict(ALL_ROWS=v["all_rows"], STOCHASTIC=v["stochastic"],
                     BLOCK_ROWS=max(1, tu._EMBEDDING_TILE // block_d), BLOCK_D=block_d)
        launch = {}
        fn = tu._embedding_rows_kernel
    for name in const:
        sig[name] = "constexpr"
    return ASTSource(fn, sig, constexprs=const), launch


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
    import triton
    from triton.backends.compiler import GPUTarget

    from lomo_kernels.kernels.triton_update import _NO_FMA

    t0 = time.perf_counter()
    src, launch = _source(v)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={**launch, **_NO_FMA})
    rep = ptxas_report(kernel.asm["ptx"], arch)
    return {"arch": f"sm_{arch}", "variant": variant_name(v), **rep, "shared_bytes": kernel.metadata.shared,
            "seconds": round(time.perf_counter() - t0, 2)}


def report(archs=ARCHS, kernels=None) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("run without TRITON_INTERPRET=1: interpreted kernels cannot be compiled for a GPU target")
    return [compile_variant(v, arch) for arch in archs for v in variants()
            if kernels is None or v["kernel"] in kernels]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--kernel", nargs="+", choices=("linear", "dense", "embedding"))
    parser.add_argument("--json", help="write the rows here as JSON")
    args = parser.parse_args(argv)
    rows = report(args.arch, args.kernel)
    for r in rows:
        flag = "  SPILLS" if r["spill_store_bytes"] or r["spill_load_bytes"] or r["stack_bytes"] else ""
        print(f"{r['arch']}  {r['variant']:<40} regs {r['registers']:>3}  stack {r['stack_bytes']:>5}  "
              f"spill st/ld {r['spill_store_bytes']:>5}/{r['spill_load_bytes']:<5} {r['seconds']:>5.1f}s{flag}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if any(r["spill_store_bytes"] or r["spill_load_bytes"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
