"""Builds lomo_kernels._C with CMake + ninja (see CMakeLists.txt); everything else is in pyproject.toml.

The extension is optional: without a C++ compiler, CMake or torch's CMake files, or when the build
fails, the package installs without it and ``lomo_kernels.available_backends()`` says why the ``cpu``
and ``cuda`` backends are missing.

Environment:
    LOMO_BUILD_CUDA=0        skip the CUDA kernels even when nvcc is found (default: build them if found)
    LOMO_CUDA_ARCHS="80;90"  CUDA architectures (default: 80;86;89;90)
    LOMO_BUILD_JOBS=N        parallel compile jobs (default: the CPU count)
    LOMO_REQUIRE_EXTENSION=1 fail the install when the extension does not build (for CI)

Dependencies are computed here (pyproject.toml declares them dynamic): torch is pinned to the
major.minor of the torch this build compiles ``_C`` against (``torch>=2.13,<2.14`` for 2.13.0), since
a C++ extension is not ABI-compatible across torch minor versions; at run time
``lomo_kernels.backends`` also refuses the ``cpu``/``cuda`` backends, naming both versions, if
another torch was installed over it afterwards.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


# Every third-party package a public entry point imports (lomo_kernels, the CLI, LomoTrainer).
RUNTIME_DEPENDENCIES = [
    "transformers>=4.56",   # from_pretrained(dtype=...)
    "accelerate>=1.1.0",    # transformers.Trainer, hence LomoTrainer
    "safetensors",
    "numpy>=1.17",          # the training data pipeline
    "tqdm",
    "pyyaml",               # train --config FILE.yaml
    "matplotlib",           # the loss-curve plot
]


def torch_requirement() -> str:
    """``torch>=X.Y,<X.(Y+1)`` for the torch importable by this build (the one ``_C`` compiles against)."""
    try:
        import torch
    except ImportError:  # no torch to build against: no extension either, any recent torch will do
        return "torch>=2.4"
    major, minor = (int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    return f"torch>={major}.{minor},<{major}.{minor + 1}"


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _cmake_prefix_path() -> str:
    import pybind11
    import torch.utils

    return ";".join([torch.utils.cmake_prefix_path, pybind11.get_cmake_dir()])


def _want_cuda() -> bool:
    return os.environ.get("LOMO_BUILD_CUDA", "1") != "0" and shutil.which("nvcc") is not None


class CMakeBuild(build_ext):
    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # optional extension: install the pure-Python package anyway
            if os.environ.get("LOMO_REQUIRE_EXTENSION") == "1":
                raise
            print(f"WARNING: lomo_kernels._C was not built ({type(exc).__name__}: {exc}); "
                  "the 'cpu' and 'cuda' backends will be unavailable.", file=sys.stderr)
            for ext in self.extensions:  # never ship a stale module from an earlier build
                Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
            self.extensions = []

    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={_cmake_prefix_path()}",
            f"-DLOMO_BUILD_CUDA={'ON' if _want_cuda() else 'OFF'}",
        ]
        if os.environ.get("LOMO_CUDA_ARCHS"):
            configure.append(f"-DLOMO_CUDA_ARCHS={os.environ['LOMO_CUDA_ARCHS']}")
        jobs = os.environ.get("LOMO_BUILD_JOBS", str(os.cpu_count() or 1))
        subprocess.run(configure, check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", jobs], check=True)


setup(ext_modules=[CMakeExtension("lomo_kernels._C")], cmdclass={"build_ext": CMakeBuild},
      install_requires=[torch_requirement(), *RUNTIME_DEPENDENCIES])
