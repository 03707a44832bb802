"""The CUDA sources compile cleanly: nvcc for one architecture, every warning (host compiler's included)
an error. No GPU needed; skipped without nvcc. The shared per-element header must also compile on its
own with the host compiler, warnings as errors, since the CPU kernels include it too.

(The CUDA kernels' results are compared with the reference by the ``gpu``-marked cases of
test_native_cpu.py, which run on a machine with a GPU.)
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CUDA_SOURCES = sorted((CSRC / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc")
CXX = shutil.which("g++") or shutil.which("c++")
ARCH = "sm_90"
HOST_WARNINGS = "-Wall,-Wextra,-Werror,-ffp-contract=off"


def _compile(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0 and not output, f"{' '.join(cmd)}\n{output}"


def test_cuda_sources_found():
    assert {p.name for p in CUDA_SOURCES} == {"linear.cu", "embedding.cu", "dense.cu"}


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles_without_warnings(source: Path, tmp_path: Path):
    _compile([NVCC, "-std=c++17", f"-arch={ARCH}", "-I", str(CSRC), "-Werror=all-warnings",
              f"-Xcompiler={HOST_WARNINGS}", "-c", str(source), "-o", str(tmp_path / f"{source.stem}.o")])


@pytest.mark.skipif(CXX is None, reason="no host C++ compiler")
@pytest.mark.parametrize("header", ["lomo_math.h", "kernel_types.h"])
def test_shared_header_compiles_with_host_compiler(header: str, tmp_path: Path):
    source = tmp_path / "include_only.cpp"
    source.write_text(f'#include "{header}"\n')
    _compile([CXX, "-std=c++17", "-fsyntax-only", "-pedantic", *HOST_WARNINGS.split(","), "-I", str(CSRC),
              str(source)])
