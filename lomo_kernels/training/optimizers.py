"""The optimizers the trainer offers, behind one ``step(loss, lr)`` interface.

``lomo`` / ``adalomo`` are this package's fused optimizers; ``lomo-optim`` is the reference LOMO from
PyPI (its AdaLomo needs CUDA, so only its Lomo is offered); ``sgd`` / ``adamw`` are the torch
baselines that keep a full gradient per weight. Fused optimizers update the weights inside the
backward pass, so they must be constructed after the weights are loaded.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from .errors import UsageError

OPTIMIZERS = ("lomo", "adalomo", "sgd", "adamw", "lomo-optim")
# Peak learning rates that train the built-in models from random init (SGD-like rules need a far
# larger lr than AdaLomo's relative updates or AdamW's normalized ones).
DEFAULT_LR = {"lomo": 0.5, "sgd": 0.5, "lomo-optim": 0.5, "adalomo": 1e-2, "adamw": 1e-3}


@dataclass
class StepInfo:
    grad_norm: float | None
    skipped: bool  # fp16 overflow: the whole step was dropped and the loss scale lowered
    nonfinite_updates: int = 0  # weight elements kept (update not finite) in an applied, partial step


def check_optimizer_options(args) -> None:
    """Refuse combinations that cannot run, before anything is loaded or written."""
    if args.optimizer == "lomo-optim" and importlib.util.find_spec("lomo_optim") is None:
        raise UsageError("--optimizer lomo-optim needs the lomo-optim package (pip install lomo-optim==0.1.1)")
    if args.dtype == "fp16" and args.optimizer in ("sgd", "adamw"):
        raise UsageError(f"--dtype fp16 trains fp16 weights, which needs loss scaling; --optimizer {args.optimizer} "
                         "has none here. Use --dtype bf16 or fp32, or a LOMO optimizer")
    if args.optimizer not in ("lomo", "adalomo"):
        if args.rounding is not None:
            raise UsageError(f"--rounding only applies to --optimizer lomo or adalomo, not {args.optimizer}")
        if args.backend != "auto":
            raise UsageError(f"--backend only applies to --optimizer lomo or adalomo, not {args.optimizer}")


class FusedRunner:
    def __init__(self, opt, needs_norm_pass: bool):
        self.opt, self.needs_norm_pass = opt, needs_norm_pass

    def step(self, loss: torch.Tensor, lr: float) -> StepInfo:
        if self.needs_norm_pass:
            self.opt.grad_norm(loss)
        self.opt.fused_backward(loss, lr)
        skipped = bool(getattr(self.opt, "skipped_step", False))
        return StepInfo(getattr(self.opt, "last_grad_norm", None), skipped,
                        0 if skipped else int(getattr(self.opt, "last_nonfinite_updates", 0)))

    def state_dict(self) -> dict:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state)


class TorchRunner:
    def __init__(self, opt: torch.optim.Optimizer, clip_grad_norm: float | None, clip_grad_value: float | None):
        self.opt, self.clip_grad_norm, self.clip_grad_value = opt, clip_grad_norm, clip_grad_value
        self.params = [p for group in opt.param_groups for p in group["params"]]

    def step(self, loss: torch.Tensor, lr: float) -> StepInfo:
        for group in self.opt.param_groups:
            group["lr"] = lr
        loss.backward()
        if self.clip_grad_value is not None:
            torch.nn.utils.clip_grad_value_(self.params, self.clip_grad_value)
        norm = None
        if self.clip_grad_norm is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad_norm))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return StepInfo(norm, False)

    def state_dict(self) -> dict:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state)


def build_runner(args, model: torch.nn.Module):
    clip = dict(clip_grad_norm=args.clip_grad_norm, clip_grad_value=args.clip_grad_value,
                weight_decay=args.weight_decay)
    if args.optimizer in ("lomo", "adalomo"):
        import lomo_kernels

        cls = lomo_kernels.Lomo if args.optimizer == "lomo" else lomo_kernels.AdaLomo
        opt = cls(model, lr=args.lr, **clip, backend=args.backend, rounding=args.rounding, seed=args.seed)
        return FusedRunner(opt, needs_norm_pass=False)  # fused_backward runs the norm phase itself when needed
    if args.optimizer == "lomo-optim":
        import lomo_optim

        return FusedRunner(lomo_optim.Lomo(model, lr=args.lr, **clip), needs_norm_pass=args.clip_grad_norm is not None)
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=args.lr, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    return TorchRunner(opt, args.clip_grad_norm, args.clip_grad_value)
