"""Which kernel backends exist in this installation, and which one runs a given call.

    torch   the reference, plain torch, any device (lomo_kernels.kernels.reference)
    cpu     compiled C++ kernels in lomo_kernels._C, CPU tensors
    cuda    compiled CUDA kernels in lomo_kernels._C, CUDA tensors
    triton  Triton kernels, CUDA tensors (CPU tensors only under TRITON_INTERPRET=1, for testing)

``auto`` picks triton, then cuda, then torch for CUDA tensors, and cpu, then torch for CPU tensors.
All backends implement the same semantics (lomo_kernels.ops._common) and are tested against the
reference, so the choice changes speed, not results beyond float rounding. Asking for a backend
that is not available raises; it never silently falls back.

``cpu``/``cuda`` are unavailable (and ``lomo_kernels._C`` is never imported) when the running torch
is not the major.minor the extension was built against (the wheel pins it; see
``torch_build_mismatch``): ``available_backends()`` names both versions. ``cuda`` is also unavailable,
with the reason, when the CUDA driver is missing or older than the runtime ``_C`` was built with
(``lomo_kernels.kernels.native.driver_problem``).
"""
from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from types import ModuleType

import torch


@dataclass(frozen=True)
class BackendInfo:
    available: bool
    detail: str

    def __str__(self) -> str:
        return ("available" if self.available else "unavailable") + f": {self.detail}"


_MODULES = {
    "torch": "lomo_kernels.kernels.reference",
    "cpu": "lomo_kernels.kernels.native",
    "cuda": "lomo_kernels.kernels.native",
    "triton": "lomo_kernels.kernels.triton_update",
}


def torch_build_mismatch() -> str:
    """Why ``lomo_kernels._C`` must not be loaded with the torch running here ("" if it may).

    The installed distribution's metadata pins torch to the major.minor ``_C`` was compiled against
    (``torch>=X.Y,<X.Y+1``, computed by setup.py at build time); a C++ extension is not ABI-compatible
    across torch minor versions, so loading it under another torch could crash instead of failing."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        requires = distribution("lomo_kernels").requires or []
    except PackageNotFoundError:  # a source tree that was never installed: nothing recorded
        return ""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # packaging comes with transformers; without it, do not guess
        return ""
    for text in requires:
        req = Requirement(text)
        if req.name != "torch" or req.marker is not None:
            continue
        lower = [spec.version for spec in req.specifier if spec.operator == ">="]
        if not lower or not any(spec.operator == "<" for spec in req.specifier):
            return ""  # not a build pin (built without torch, hence without _C)
        running = torch.__version__.split("+")[0]
        if req.specifier.contains(running, prereleases=True):
            return ""
        built = ".".join(lower[0].split(".")[:2])
        return (f"lomo_kernels._C was built against torch {built}, but torch {torch.__version__} is installed; "
                f"it is not loaded (a C++ extension is not ABI-compatible across torch minor versions). "
                f"Install torch {built}.* again, or rebuild lomo_kernels against this torch "
                f"(pip install --no-build-isolation --force-reinstall --no-deps <lomo_kernels source>)")
    return ""


def _probe(name: str) -> BackendInfo:
    if name == "torch":
        return BackendInfo(True, f"torch {torch.__version__}")
    if name in ("cpu", "cuda"):
        mismatch = torch_build_mismatch()
        if mismatch:
            return BackendInfo(False, mismatch)
    try:
        module = importlib.import_module(_MODULES[name])
    except Exception as exc:  # an ImportError or a broken build: report it, do not crash the import
        return BackendInfo(False, f"{_MODULES[name]} failed to import ({type(exc).__name__}: {exc})")
    return module.backend_info(name)


@functools.lru_cache(maxsize=None)
def _cached_info(name: str) -> BackendInfo:
    return _probe(name)


def available_backends() -> dict[str, BackendInfo]:
    """Every backend with whether it can run here and why (not)."""
    return {name: _cached_info(name) for name in _MODULES}


def _interpreting_triton() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@torch.compiler.assume_constant_result  # a pure function of installation and device: fold it when compiling
def resolve(requested: str, device: torch.device) -> str:
    """The backend that runs a call on tensors of ``device``; raises if ``requested`` cannot."""
    if requested == "auto":
        order = ("triton", "cuda", "torch") if device.type == "cuda" else ("cpu", "torch")
        for name in order:
            if _cached_info(name).available:
                return name
        return "torch"
    if requested not in _MODULES:
        raise ValueError(f"unknown backend {requested!r}; choose one of {('auto',) + tuple(_MODULES)}")
    info = _cached_info(requested)
    if not info.available:
        raise RuntimeError(f"backend {requested!r} is {info}")
    runs_on = {"torch": None, "cpu": "cpu", "cuda": "cuda",
               "triton": None if _interpreting_triton() else "cuda"}[requested]
    if runs_on is not None and device.type != runs_on:
        raise ValueError(f"backend {requested!r} runs on {runs_on} tensors, got tensors on {device}"
                         + (" (set TRITON_INTERPRET=1 to run Triton kernels on CPU tensors)" if requested == "triton" else ""))
    return requested


def module(name: str) -> ModuleType:
    return importlib.import_module(_MODULES[name])
