"""``FusedOptimizer``: the machinery shared by ``Lomo`` and ``AdaLomo``.

It patches the model (lomo_kernels.patch), so the update happens inside ``loss.backward()``, and
runs LOMO's two-phase protocol when exact global-norm clipping is on: ``grad_norm(loss)`` is a
backward pass in norm-only mode (no weight written, no gradient tensor kept, one host sync at the
end), ``fused_backward(loss, lr)`` is the backward pass that applies the clipped update.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..ops._common import ROUNDINGS, mix32_int
from ..patch import check_no_stray_gradients, patch, unpatch


class FusedOptimizer(torch.optim.Optimizer):
    def __init__(self, model: nn.Module, defaults: dict, *, clip_grad_norm, clip_grad_value, backend: str,
                 rounding: str | None, seed: int):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__} takes the model (an nn.Module), got {type(model).__name__}")
        if clip_grad_norm is not None and not clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm should be positive, got {clip_grad_norm}.")
        if clip_grad_value is not None and not clip_grad_value > 0:
            raise ValueError(f"clip_grad_value should be positive, got {clip_grad_value}.")
        if rounding is not None and rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be None (bf16: stochastic, else nearest) or one of {ROUNDINGS}, got {rounding!r}")
        if not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model has no trainable parameters (every parameter has requires_grad=False)")
        super().__init__(params, defaults)
        self.model = model
        self.clip_grad_norm = clip_grad_norm
        self.clip_grad_value = clip_grad_value
        self.backend = backend
        self.rounding = rounding
        self.seed = seed
        self.step_count = 0
        self.phase = "apply"
        self.clip_coef = 1.0
        self._fresh_norm = False
        self._norm_stats: dict[torch.device, torch.Tensor] = {}
        self._param_index = {id(p): i for i, p in enumerate(model.parameters())}
        self._param_names = {id(p): n for n, p in model.named_parameters()}
        self._calls: dict[int, int] = {}
        self.last_grad_norm: float | None = None
        self.skipped_step = False
        self.handle = patch(model, self)

    # --- scalars the subclasses' rules use -------------------------------------------------------

    @property
    def lr(self) -> float:
        return self.param_groups[0]["lr"]

    @property
    def loss_scale(self) -> float:
        """What the loss is multiplied by before backward (and every gradient divided by)."""
        return 1.0

    def _rounding_for(self, param: torch.Tensor) -> str:
        if self.rounding is not None:
            return self.rounding
        return "stochastic" if param.dtype == torch.bfloat16 else "nearest"

    def _seed_for(self, param: torch.Tensor) -> int:
        """A distinct, reproducible rounding seed per (step, parameter, call within the step)."""
        key = id(param)
        call = self._calls.get(key, 0)
        self._calls[key] = call + 1
        index = self._param_index[key]
        return mix32_int(self.seed ^ mix32_int((self.step_count * 0x9E3779B1 + index * 0x85EBCA6B + call) & 0xFFFFFFFF))

    def _name(self, param: torch.Tensor) -> str:
        return self._param_names.get(id(param), "param")

    def _stats_for(self, param: torch.Tensor) -> torch.Tensor:
        stats = self._norm_stats.get(param.device)
        if stats is None:
            stats = self._norm_stats[param.device] = torch.zeros(2, dtype=torch.float32, device=param.device)
        return stats

    # --- the protocol ----------------------------------------------------------------------------

    def _check_lr(self, lr):
        if lr is None:
            return self.lr
        if isinstance(lr, torch.Tensor):
            lr = lr.item()
        if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
            raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
        return float(lr)

    def _backward(self, loss: torch.Tensor, retain_graph: bool) -> None:
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError("loss must be a one-element tensor")
        if not loss.requires_grad:
            raise ValueError("loss does not require grad: it was computed without autograd (torch.no_grad?)")
        self._calls.clear()
        (loss * self.loss_scale if self.loss_scale != 1.0 else loss).backward(retain_graph=retain_graph)
        check_no_stray_gradients(self.handle)

    def grad_norm(self, loss: torch.Tensor) -> float:
        """Norm phase: a backward pass that only measures ``‖g‖`` (weights untouched); keeps the graph
        for ``fused_backward``. Returns the global gradient norm (of the unscaled gradient)."""
        self._norm_stats.clear()
        self.phase = "norm"
        try:
            self._backward(loss, retain_graph=True)
        finally:
            self.phase = "apply"
        total = torch.stack([s.to(torch.float64).cpu() for s in self._norm_stats.values()]).sum(0) \
            if self._norm_stats else torch.zeros(2, dtype=torch.float64)
        sq, nonfinite = total.tolist()  # the one host sync of the step
        norm = math.sqrt(sq) if nonfinite == 0 and math.isfinite(sq) else math.inf
        self.last_grad_norm = norm
        self._fresh_norm = True
        self._after_norm(norm)
        return norm

    def _after_norm(self, norm: float) -> None:
        """lomo-optim's clip coefficient: min(1, max_norm / (norm + 1e-6))."""
        if self.clip_grad_norm is not None and math.isfinite(norm):
            self.clip_coef = min(1.0, float(self.clip_grad_norm) / (norm + 1e-6))
        else:
            self.clip_coef = 1.0

    def fused_backward(self, loss: torch.Tensor, lr: float | None = None) -> None:
        """Backward pass that applies the update as it goes; ``lr`` overrides ``param_groups[0]["lr"]``."""
        lr = self._check_lr(lr)
        if self.clip_grad_norm is not None and not self._fresh_norm:
            raise ValueError("clip_grad_norm is set: call optimizer.grad_norm(loss) before "
                             "optimizer.fused_backward(loss, lr) at every step")
        self.param_groups[0]["lr"] = lr
        self.skipped_step = False
        self._backward(loss, retain_graph=False)
        self._fresh_norm = False
        self.clip_coef = 1.0
        self.step_count += 1

    def step(self, closure=None):
        """No-op: the update was applied during ``fused_backward``. Present for Trainer/scheduler code."""
        return closure() if closure is not None else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """No-op: fused parameters never hold a gradient."""

    def sums_contributions(self) -> bool:
        return False

    def unpatch(self) -> None:
        """Restore the model's modules and hooks; this optimizer can no longer train it."""
        unpatch(self.model)
