"""One training step per method, shared by the memory planner (fake tensors) and the benchmarks (real ones).

    none        forward + backward, gradients kept then dropped: the floor every method pays
    sgd         torch.optim.SGD (no momentum)
    adamw       torch.optim.AdamW
    lomo-optim  lomo_optim.Lomo 0.1.1, the reference implementation (hooks, full gradients)
    lomo        lomo_kernels.Lomo (fused: no weight gradient is ever built)
    adalomo     lomo_kernels.AdaLomo

For ``sgd``/``adamw`` on fp16/bf16 weights the step is standard mixed precision: fp32 master weights
hold the optimizer's view, each half-precision gradient is upcast one parameter at a time, and the
result is copied back (the setting of the LOMO paper's AdamW/SGD figures). Norm clipping (``clip``)
is ``clip_grad_norm_`` for the torch optimizers and the two-pass ``grad_norm`` protocol for the LOMO ones.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .tracker import MemoryTracker

METHODS = ("none", "sgd", "adamw", "lomo-optim", "lomo", "adalomo")
FUSED_METHODS = ("lomo-optim", "lomo", "adalomo")  # whose update happens inside backward


class MasterWeights:
    """fp32 copies of half-precision parameters, stepped by a torch optimizer one parameter at a time,
    so only one fp32 gradient exists at once."""

    def __init__(self, params, make_optimizer):
        self.params = [p for p in params if p.requires_grad]
        self.masters = [p.detach().to(torch.float32) for p in self.params]
        for m in self.masters:
            m.requires_grad_(True)
        self.optimizer = make_optimizer(self.masters)

    def step(self) -> None:
        for p, master in zip(self.params, self.masters):
            if p.grad is None:
                continue
            master.grad = p.grad.to(torch.float32)
            p.grad = None
            self.optimizer.step()  # only the parameter holding a gradient is touched
            master.grad = None
            with torch.no_grad():
                p.copy_(master)

    def state_tensors(self):
        yield from self.masters
        yield from _state_of(self.optimizer)


def _state_of(optimizer: torch.optim.Optimizer):
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                yield value


@dataclass
class StepConfig:
    method: str
    lr: float = 1e-3
    clip_grad_norm: float | None = None
    weight_decay: float = 0.0
    backend: str = "auto"  # lomo_kernels backend for lomo/adalomo


class Trainer:
    """Builds ``cfg.method``'s optimizer for ``model`` and runs training steps on it.

    With a ``tracker``, new tensors are counted as activations during forward and as provisional
    temporaries during backward/update; gradients and optimizer state are marked as they appear.
    """

    def __init__(self, model: nn.Module, cfg: StepConfig, tracker: MemoryTracker | None = None):
        if cfg.method not in METHODS:
            raise ValueError(f"unknown method {cfg.method!r}; choose one of {METHODS}")
        self.model, self.cfg, self.tracker = model, cfg, tracker
        params = [p for p in model.parameters() if p.requires_grad]
        if tracker is not None:
            tracker.adopt(params, "params")
            tracker.adopt(model.buffers(), "other")
            # registered before the optimizer's own hooks, so they see each gradient before it is consumed
            self._grad_hooks = tracker.watch_grads(params)
        with self._phase("optimizer_state"):
            self.optimizer = self._build(params)
        self._mark_state()

    def _phase(self, category: str, provisional: bool = False):
        return self.tracker.phase(category, provisional) if self.tracker is not None else contextlib.nullcontext()

    def _build(self, params):
        cfg = self.cfg
        if cfg.method == "none":
            return None
        if cfg.method in ("sgd", "adamw"):
            def make(ps):
                if cfg.method == "sgd":
                    return torch.optim.SGD(ps, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)
                # fused: one kernel per parameter, and no host read of the step count (none exists under fake tensors)
                return torch.optim.AdamW(ps, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
            if params[0].dtype in (torch.float16, torch.bfloat16):
                return MasterWeights(params, make)
            return make(params)
        if cfg.method == "lomo-optim":
            from lomo_optim import Lomo as ReferenceLomo
            return ReferenceLomo(self.model, lr=cfg.lr, clip_grad_norm=cfg.clip_grad_norm,
                                 weight_decay=cfg.weight_decay)
        import lomo_kernels
        if cfg.method == "lomo":
            return lomo_kernels.Lomo(self.model, lr=cfg.lr, clip_grad_norm=cfg.clip_grad_norm,
                                     weight_decay=cfg.weight_decay, backend=cfg.backend)
        return lomo_kernels.AdaLomo(self.model, lr=cfg.lr, clip_grad_norm=cfg.clip_grad_norm,
                                    weight_decay=cfg.weight_decay, backend=cfg.backend)

    def state_tensors(self):
        opt = self.optimizer
        if opt is None or self.cfg.method in ("lomo-optim", "lomo"):
            return []
        if self.cfg.method == "adalomo":
            return [t for d in (opt.exp_avg_sq, opt.exp_avg_sq_row, opt.exp_avg_sq_col) for t in d.values()]
        if isinstance(opt, MasterWeights):
            return list(opt.state_tensors())
        return list(_state_of(opt))

    def _mark_state(self) -> None:
        if self.tracker is not None:
            for t in self.state_tensors():
                self.tracker.mark(t, "optimizer_state")

    def step(self, batch: dict) -> None:
        cfg, opt = self.cfg, self.optimizer
        with self._phase("activations"):
            loss = self.model(**batch).loss
        with self._phase("temporaries", provisional=True):
            if cfg.method in FUSED_METHODS:
                if cfg.clip_grad_norm is not None:
                    opt.grad_norm(loss)
                opt.fused_backward(loss, cfg.lr)
            else:
                loss.backward()
                if cfg.clip_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad_norm, foreach=False)
                if opt is not None:
                    opt.step()
                for p in self.model.parameters():
                    p.grad = None
        del loss
        self._mark_state()

    def close(self) -> None:
        """Remove our hooks and end the fused optimizer's hold, so the model can be reused."""
        for h in getattr(self, "_grad_hooks", []):
            h.remove()
        if self.cfg.method in ("lomo", "adalomo"):
            self.optimizer.close()
