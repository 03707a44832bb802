"""The ``cpu`` and ``cuda`` backends: the compiled kernels of ``lomo_kernels._C`` (sources in ``csrc/``).

Importing ``_C`` registers the ops ``torch.ops.lomo_kernels_C.*`` with a CPU kernel (C++/OpenMP over
ATen's GEMM) and, in a CUDA build, a CUDA kernel; torch's dispatcher picks the one matching the
tensors' device. The CUDA kernels run on the stream passed here (the current torch stream of the
weight's device), because the torch ``_C`` is built against may have no CUDA support of its own.

The update and norm functions take the same arguments as ``lomo_kernels.kernels.reference``, the
``adamw_*`` ones those of ``lomo_kernels.kernels.reference_adamw``, already checked and flattened by
``lomo_kernels.ops``.
"""
from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch

from ..backends import BackendInfo
from ..ops._common import UpdateRule


@functools.lru_cache(maxsize=None)
def _load() -> tuple[ModuleType | None, str]:
    """``(module, "")``, or ``(None, why)`` when ``lomo_kernels._C`` cannot be imported."""
    try:
        return importlib.import_module("lomo_kernels._C"), ""
    except ImportError as exc:
        return None, f"lomo_kernels._C is not built or does not load ({exc})"


def backend_info(name: str) -> BackendInfo:
    module, why = _load()
    if module is None:
        return BackendInfo(False, why)
    build = module.build_info()
    if name == "cpu":
        return BackendInfo(True, "compiled C++ kernels " + ("with OpenMP" if build["openmp"] else "without OpenMP"))
    if name != "cuda":
        raise ValueError(f"the native module provides the 'cpu' and 'cuda' backends, not {name!r}")
    if not build["cuda"]:
        return BackendInfo(False, f"built without CUDA ({build['no_cuda_reason']})")
    driver, runtime = module.cuda_versions()
    if driver == 0:
        return BackendInfo(False, "no CUDA driver (cudaDriverGetVersion reports none)")
    archs = sorted(int(a) for a in build["cuda_archs"].split(","))
    if driver // 1000 < runtime // 1000:
        # checked before torch.cuda: with a driver that old torch's own CUDA init fails less clearly
        return BackendInfo(False, driver_problem(driver, runtime, None, archs))
    if not torch.cuda.is_available():
        return BackendInfo(False, "no CUDA device")
    major, minor = torch.cuda.get_device_capability()
    problem = driver_problem(driver, runtime, 10 * major + minor, archs)
    if problem:
        return BackendInfo(False, problem)
    return BackendInfo(True, f"compiled CUDA kernels for sm_{{{build['cuda_archs']}}} (CUDA {_version(runtime)}, "
                             f"driver supports {_version(driver)})")


def _version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def driver_problem(driver: int, runtime: int, sm: int | None, archs: list[int]) -> str:
    """Why kernels built with CUDA runtime ``runtime`` cannot run under a driver supporting CUDA ``driver``
    (both 1000*major + 10*minor) on a GPU of compute capability ``sm`` (None: not known yet), "" if they can.

    The kernels carry machine code for every architecture in ``archs`` and PTX for the newest. An older
    driver of the same major version runs the machine code (CUDA's minor-version compatibility) but
    cannot compile the newer toolkit's PTX, so a GPU outside ``archs`` needs a driver at least as new
    as the runtime; a driver of an older major version runs neither."""
    if driver // 1000 < runtime // 1000:
        return (f"the CUDA driver supports CUDA {_version(driver)}, but lomo_kernels._C was built with CUDA "
                f"{_version(runtime)}: a driver for CUDA {runtime // 1000}.x or newer is needed (or rebuild "
                f"with a CUDA {driver // 1000}.x toolkit)")
    if sm is not None and sm < archs[0]:
        return f"the GPU is sm_{sm}, older than the oldest compiled target sm_{archs[0]}"
    if sm is not None and sm not in archs and driver < runtime:
        return (f"the GPU is sm_{sm}, which the kernels reach only through PTX compiled at load time, and the "
                f"driver (CUDA {_version(driver)}) is older than the CUDA {_version(runtime)} that PTX was built "
                f"with; update the driver or rebuild with LOMO_CUDA_ARCHS including {sm}")
    return ""


def _ops():
    module, why = _load()
    if module is None:
        raise RuntimeError(why)
    return torch.ops.lomo_kernels_C


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.device.type == "cuda" else 0


def _rule_args(rule: UpdateRule) -> tuple:
    return (rule.decay, rule.step, rule.inv_loss_scale, rule.clip_value, rule.stochastic, rule.seed)


def linear_update(w: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, rule: UpdateRule,
                  nonfinite: torch.Tensor | None = None) -> None:
    _ops().linear_update(w, x, dy, *_rule_args(rule), nonfinite, _stream(w))


def linear_grad_sqnorm(stats: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, inv_loss_scale: float) -> None:
    _ops().linear_grad_sqnorm(stats, x, dy, inv_loss_scale, _stream(stats))


def linear_grad_sqnorm_ghost(stats: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, inv_loss_scale: float) -> None:
    """The ghost norm ``⟨x xᵀ, dy dyᵀ⟩`` on CPU tensors (the ``cpu`` backend only): the lower triangles of
    both token Gram matrices, from 16-bit operands directly (fp32 accumulation)."""
    _ops().linear_grad_sqnorm_ghost(stats, x, dy, inv_loss_scale, 0)


def adalomo_sq_sums(row_sums: torch.Tensor, col_sums: torch.Tensor, stats: torch.Tensor, x: torch.Tensor,
                    dy: torch.Tensor, inv_loss_scale: float, clip_value: float) -> None:
    """AdaLomo's row/column sums of ``clamp(dyᵀx · inv_loss_scale, ±clip_value)²`` and, from the same pass,
    the norm terms of ``dyᵀx · inv_loss_scale`` into ``stats`` (``cpu`` backend only)."""
    _ops().adalomo_sq_sums(row_sums, col_sums, stats, x, dy, inv_loss_scale, clip_value, 0)


def adalomo_scaled_sqnorm(stats: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, row_scale: torch.Tensor,
                          col_scale: torch.Tensor, inv_loss_scale: float, clip_value: float) -> None:
    _ops().adalomo_scaled_sqnorm(stats, x, dy, row_scale, col_scale, inv_loss_scale, clip_value, 0)


def adalomo_linear_update(w: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, row_scale: torch.Tensor,
                          col_scale: torch.Tensor, rule: UpdateRule, nonfinite: torch.Tensor | None = None) -> None:
    _ops().adalomo_linear_update(w, x, dy, row_scale, col_scale, *_rule_args(rule), nonfinite, 0)


def embedding_update(w: torch.Tensor, idx: torch.Tensor, dy: torch.Tensor, padding_idx: int, rule: UpdateRule,
                     nonfinite: torch.Tensor | None = None) -> None:
    _ops().embedding_update(w, idx, dy, padding_idx, *_rule_args(rule), nonfinite, _stream(w))


def embedding_grad_sqnorm(stats: torch.Tensor, idx: torch.Tensor, dy: torch.Tensor, padding_idx: int,
                          inv_loss_scale: float) -> None:
    _ops().embedding_grad_sqnorm(stats, idx, dy, padding_idx, inv_loss_scale, _stream(stats))


def dense_update(p: torch.Tensor, g: torch.Tensor, rule: UpdateRule, nonfinite: torch.Tensor | None = None) -> None:
    _ops().dense_update(p, g, *_rule_args(rule), nonfinite, _stream(p))


def dense_grad_sqnorm(stats: torch.Tensor, g: torch.Tensor, inv_loss_scale: float) -> None:
    _ops().dense_grad_sqnorm(stats, g, inv_loss_scale, _stream(stats))


# --- AdamW (lomo_kernels.ops.adamw_update; csrc/cpu/adamw.cpp, csrc/cuda/adamw_linear.cu, adamw_rows.cu) ----

def _adam_args(rule) -> tuple:
    return (rule.decay, rule.step, rule.beta1, rule.beta2, rule.denom_div, rule.eps, rule.inv_loss_scale,
            rule.clip_value, rule.coef, rule.stochastic, rule.state_stochastic, rule.seed)


def adamw_linear_update(w: torch.Tensor, m: torch.Tensor, v: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, rule,
                        nonfinite: torch.Tensor | None = None) -> None:
    _ops().adamw_linear_update(w, m, v, x, dy, *_adam_args(rule), nonfinite, _stream(w))


def adamw_embedding_update(w: torch.Tensor, m: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, dy: torch.Tensor,
                           padding_idx: int, rule, nonfinite: torch.Tensor | None = None) -> None:
    _ops().adamw_embedding_update(w, m, v, idx, dy, padding_idx, *_adam_args(rule), nonfinite, _stream(w))


def adamw_dense_update(p: torch.Tensor, m: torch.Tensor, v: torch.Tensor, g: torch.Tensor, rule,
                       nonfinite: torch.Tensor | None = None) -> None:
    _ops().adamw_dense_update(p, m, v, g, *_adam_args(rule), nonfinite, _stream(p))
