"""The CUDA sources compile cleanly for every target architecture, without register spills. No GPU needed;
skipped without nvcc.

Each .cu file is compiled once for sm_80, sm_86, sm_89 and sm_90 (one nvcc call, one -gencode per
architecture), every warning an error (the host compiler's included), with ``-Xptxas -v``: the report
must show every kernel of every architecture with no stack frame and no spill stores or loads, and the
tensor-core kernels must really use ``mma.sync``, ``ldmatrix`` and ``cp.async`` (read from the PTX nvcc
keeps with ``--keep``). The shared per-element header must also compile on its own with the
host compiler, warnings as errors, since the CPU kernels include it too.

About 60 s on an idle 2-core machine for the SGD-rule files, several minutes for adamw_linear.cu (its
tensor-core kernels inline the AdamW epilogue once per accumulator); nvcc runs the four architectures
one after another and the files run one after another, so the machine's other jobs keep a core. A
loaded machine can take 5x that: each nvcc call may run 30 minutes.

(The CUDA kernels' results are compared with the reference by the ``gpu``-marked cases of
test_native_cpu.py, test_cuda_linear_gpu.py and test_adamw_kernels.py, which run on a machine with a GPU.)
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CUDA_SOURCES = sorted((CSRC / "cuda").glob("*.cu"))
# the files with kernels (driver.cu only asks the driver for its version): ptxas reports on these
KERNEL_SOURCES = [p for p in CUDA_SOURCES if "__global__" in p.read_text()]
NVCC = shutil.which("nvcc")
CXX = shutil.which("g++") or shutil.which("c++")
ARCHS = (80, 86, 89, 90)
HOST_WARNINGS = "-Wall,-Wextra,-Werror,-ffp-contract=off"

_ENTRY = re.compile(r"ptxas info\s*: Compiling entry function '([^']+)' for 'sm_(\d+)'")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"ptxas info\s*: Used (\d+) registers")


def _compile(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{output}"
    return output


def ptxas_report(output: str) -> list[dict]:
    """One row per (kernel, architecture) from ``-Xptxas -v`` output: registers, stack, spill bytes."""
    rows, current = [], None
    for line in output.splitlines():
        if m := _ENTRY.search(line):
            current = {"kernel": m.group(1), "arch": int(m.group(2))}
            rows.append(current)
        elif current is not None and (m := _SPILLS.search(line)):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current is not None and (m := _REGS.search(line)):
            current["registers"] = int(m.group(1))
    return rows


def _is_ptxas_info(line: str) -> bool:
    return line.startswith("ptxas info") or bool(_SPILLS.fullmatch(line.strip()))


def test_cuda_sources_found():
    assert {p.name for p in CUDA_SOURCES} == {"linear.cu", "embedding.cu", "dense.cu", "adamw_linear.cu", "adamw_rows.cu",
                                                "driver.cu"}


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict:
    """source name -> (nvcc output, folder of nvcc's intermediate files: <stem>.compute_<arch>.ptx, ...),
    compiled once for all architectures."""
    if NVCC is None:
        pytest.skip("nvcc not on PATH")
    out = {}
    tmp = tmp_path_factory.mktemp("cuda_objects")
    for source in CUDA_SOURCES:
        keep = tmp / source.stem
        keep.mkdir()
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
        out[source.name] = (_compile([NVCC, "-std=c++17", *gencode, "-I", str(CSRC), "-Werror=all-warnings",
                                      f"-Xcompiler={HOST_WARNINGS}", "-Xptxas", "-v", "--keep", "--keep-dir",
                                      str(keep), "-c", str(source), "-o", str(keep / f"{source.stem}.o")]), keep)
    return out


@pytest.mark.parametrize("source", [p.name for p in CUDA_SOURCES])
def test_cuda_source_compiles_for_every_arch_without_warnings(builds, source: str):
    output, _ = builds[source]
    other = [line for line in output.splitlines() if line.strip() and not _is_ptxas_info(line)]
    assert not other, "\n".join(other)
    if source in {p.name for p in KERNEL_SOURCES}:
        assert {row["arch"] for row in ptxas_report(output)} == set(ARCHS)


@pytest.mark.parametrize("source", [p.name for p in KERNEL_SOURCES])
def test_no_register_spills(builds, source: str):
    rows = ptxas_report(builds[source][0])
    assert rows and all("stack" in r and "registers" in r for r in rows)
    spilling = [r for r in rows if r["stack"] or r["spill_stores"] or r["spill_loads"]]
    assert not spilling, "\n".join(f"sm_{r['arch']} {r['kernel']}: {r}" for r in spilling)
    assert all(r["registers"] <= 255 for r in rows)


def test_linear_tensor_core_kernels_are_there_for_every_arch(builds):
    """bf16 and fp16 operands (with fp32/bf16/fp16 weights) reach the tensor-core kernels, whose PTX for
    each architecture has the bf16 and fp16 m16n8k16 MMA, cp.async and ldmatrix."""
    output, keep = builds["linear.cu"]
    kernels = {(r["kernel"], r["arch"]) for r in ptxas_report(output)}
    for arch in ARCHS:
        tc = [k for k, a in kernels if a == arch and "tc_update_kernel" in k]
        norm = [k for k, a in kernels if a == arch and "tc_grad_sqnorm_kernel" in k]
        assert len(tc) == 6 and len(norm) == 2, (arch, tc, norm)  # W in {f32, bf16, fp16} x A in {bf16, fp16}
        ptx = (keep / f"linear.compute_{arch}.ptx").read_text()
        for instruction in ("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
                            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32", "cp.async.cg.shared.global",
                            "cp.async.wait_group", "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16"):
            assert instruction in ptx, (arch, instruction)


def test_adamw_kernels_are_there_for_every_arch(builds):
    """The AdamW kernels: tensor cores for 16-bit activations (fp32 weights with bf16 or fp16 activations,
    16-bit weights with their own dtype's, x moments fp32/bf16: 8), the SIMT tile for fp32 activations
    (W in {f32, bf16, fp16} x moments: 6), the embedding and dense kernels for every weight x moment x
    gradient dtype; the tensor-core ones use the bf16 and fp16 MMA, every epilogue fma and IEEE sqrt."""
    want = {"adamw_linear.cu": {"adamw_tc_kernel": 8, "adamw_fma_kernel": 6},
            "adamw_rows.cu": {"adamw_embedding_rows_kernel": 18, "adamw_embedding_untouched_kernel": 6,
                              "adamw_dense_kernel": 18}}
    for source, kinds in want.items():
        output, keep = builds[source]
        kernels = {(r["kernel"], r["arch"]) for r in ptxas_report(output)}
        for arch in ARCHS:
            names = [k for k, a in kernels if a == arch]
            assert {kind: sum(kind in k for k in names) for kind in kinds} == kinds, (source, arch)
            ptx = (keep / f"{source[:-3]}.compute_{arch}.ptx").read_text()
            instructions = ["fma.rn.f32", "sqrt.rn.f32"]
            if source == "adamw_linear.cu":
                instructions += ["mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
                                 "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32", "cp.async.cg.shared.global",
                                 "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16"]
            for instruction in instructions:
                assert instruction in ptx, (source, arch, instruction)


# --- the driver check of the cuda backend (lomo_kernels.kernels.native.driver_problem) -------------------

def test_driver_problem_names_both_versions():
    from lomo_kernels.kernels.native import driver_problem

    archs = [80, 86, 89, 90]
    why = driver_problem(12080, 13000, None, archs)
    assert "supports CUDA 12.8" in why and "built with CUDA 13.0" in why
    assert driver_problem(13000, 13010, 90, archs) == ""  # minor-version compatibility: machine code runs
    assert driver_problem(13010, 13000, 100, archs) == ""  # a newer driver JIT-compiles the PTX
    why = driver_problem(13000, 13010, 100, archs)         # an older one cannot compile newer PTX
    assert "sm_100" in why and "PTX" in why and "13.1" in why
    assert "older than the oldest compiled target sm_80" in driver_problem(13000, 13000, 75, archs)


def test_backend_info_refuses_an_old_driver_before_touching_torch_cuda(monkeypatch):
    from types import SimpleNamespace

    from lomo_kernels.kernels import native

    fake = SimpleNamespace(build_info=lambda: {"cuda": True, "cuda_archs": "80,86,89,90", "no_cuda_reason": ""},
                           cuda_versions=lambda: (12040, 13000))
    monkeypatch.setattr(native, "_load", lambda: (fake, ""))

    def no_cuda_init():
        raise AssertionError("torch.cuda was asked before the driver check")

    monkeypatch.setattr(native.torch.cuda, "is_available", no_cuda_init)
    info = native.backend_info("cuda")
    assert not info.available and "supports CUDA 12.4" in info.detail and "CUDA 13.0" in info.detail
    fake.cuda_versions = lambda: (0, 13000)
    info = native.backend_info("cuda")
    assert not info.available and "no CUDA driver" in info.detail


@pytest.mark.skipif(CXX is None, reason="no host C++ compiler")
@pytest.mark.parametrize("header", ["lomo_math.h", "kernel_types.h"])
def test_shared_header_compiles_with_host_compiler(header: str, tmp_path: Path):
    source = tmp_path / "include_only.cpp"
    source.write_text(f'#include "{header}"\n')
    output = _compile([CXX, "-std=c++17", "-fsyntax-only", "-pedantic", *HOST_WARNINGS.split(","), "-I", str(CSRC),
                       str(source)])
    assert not output
