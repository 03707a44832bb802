"""The optimizers the trainer offers, behind one ``step(loss, lr)`` interface.

``lomo`` / ``adalomo`` / ``adamw`` / ``apollo`` / ``apollo-mini`` are this package's fused optimizers
(``Lomo``, ``AdaLomo``, ``AdamW``, ``Apollo``, ``ApolloMini``: no weight gradient is ever kept), each of
which ``--hift-group-size`` can wrap in ``HiFT`` (one group of layers per step); ``lomo-optim`` is the
reference LOMO from PyPI (its AdaLomo needs CUDA, so only its Lomo is offered); ``sgd`` / ``torch-adamw``
are the torch baselines that keep a full gradient per weight. Fused optimizers update the weights
inside the backward pass, so they must be constructed after the weights are loaded.
"""
from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass

import torch

from .errors import UsageError

OPTIMIZERS = ("lomo", "adalomo", "adamw", "apollo", "apollo-mini", "sgd", "torch-adamw", "lomo-optim")
FUSED = ("lomo", "adalomo", "adamw", "apollo", "apollo-mini")  # this package's: HiFT, --rounding, --backend
APOLLO = ("apollo", "apollo-mini")
# Peak learning rates that train the built-in models from random init (SGD-like rules need a far
# larger lr than AdaLomo's relative updates or the AdamW family's normalized ones). APOLLO: the APOLLO
# paper's 1e-2; on the small preset (100 steps) it ends lower than 1e-3 (held-out 2.55 vs 2.68; Mini 2.77 both).
DEFAULT_LR = {"lomo": 0.5, "adalomo": 1e-2, "adamw": 1e-3, "apollo": 1e-2, "apollo-mini": 1e-2,
              "sgd": 0.5, "torch-adamw": 1e-3, "lomo-optim": 0.5}
# --clip-grad-value when not given: on for the SGD-like rules (it keeps plain SGD/LOMO stable through the
# first steps from random init), off for the AdamW family (Adam normalizes the step; APOLLO cannot clip
# values: the projection of clamp(G) has no thin-GEMM form).
DEFAULT_CLIP_VALUE = {"lomo": 0.05, "adalomo": 0.05, "sgd": 0.05, "lomo-optim": 0.05}
APOLLO_DEFAULT_RANK = 256  # apollo-torch's; capped at the smallest dimension of the projected weights
APOLLO_DEFAULT_GAP = 200   # apollo-torch's update_proj_gap
HIFT_STRATEGIES = ("down2up", "up2down", "random")
HIFT_LR_SCHEDULES = ("per_cycle", "per_step")


@dataclass
class StepInfo:
    grad_norm: float | None
    skipped: bool  # fp16 overflow: the whole step was dropped and the loss scale lowered
    nonfinite_updates: int = 0  # weight elements kept (update not finite) in an applied, partial step


def resolve_optimizer_defaults(args) -> None:
    """Fill in the per-optimizer defaults of options left unset (stored in run.json as resolved)."""
    if args.lr is None:
        args.lr = DEFAULT_LR[args.optimizer]
    if args.clip_grad_value is None:
        args.clip_grad_value = DEFAULT_CLIP_VALUE.get(args.optimizer, 0.0)
    if args.optimizer in APOLLO:
        if args.apollo_update_proj_gap is None:
            args.apollo_update_proj_gap = APOLLO_DEFAULT_GAP
        if args.optimizer == "apollo-mini":
            args.apollo_rank = 1 if args.apollo_rank is None else args.apollo_rank
            args.apollo_scale_type = args.apollo_scale_type or "tensor"
        else:
            args.apollo_scale_type = args.apollo_scale_type or "channel"
    if args.hift_group_size is not None:
        args.hift_strategy = args.hift_strategy or "down2up"
        args.hift_lr_schedule = args.hift_lr_schedule or "per_cycle"
    if args.fused_cross_entropy is None:  # on where the optimizer has an LM-head rule for the fused loss
        args.fused_cross_entropy = args.optimizer in FUSED and takes_fused_cross_entropy(args.optimizer)


def optimizer_class(name: str):
    import lomo_kernels

    return {"lomo": lomo_kernels.Lomo, "adalomo": lomo_kernels.AdaLomo, "adamw": lomo_kernels.AdamW,
            "apollo": lomo_kernels.Apollo, "apollo-mini": lomo_kernels.ApolloMini}[name]


def takes_fused_cross_entropy(name: str) -> bool:
    """Whether the fused optimizer ``name``'s constructor takes ``fused_cross_entropy`` (following ``**kwargs``
    up the class chain, as Apollo passes its own on to AdamW)."""
    for klass in optimizer_class(name).__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(vars(klass)["__init__"]).parameters
        if "fused_cross_entropy" in params:
            return True
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return False
    return False


def check_optimizer_options(args) -> None:
    """Refuse combinations that cannot run, before anything is loaded or written."""
    opt = args.optimizer
    if opt == "lomo-optim" and importlib.util.find_spec("lomo_optim") is None:
        raise UsageError("--optimizer lomo-optim needs the lomo-optim package (pip install lomo-optim==0.1.1)")
    if args.dtype == "fp16" and opt in ("sgd", "torch-adamw"):
        raise UsageError(f"--dtype fp16 trains fp16 weights, which needs loss scaling; --optimizer {opt} "
                         "has none here. Use --dtype bf16 or fp32, or a fused optimizer (lomo, adalomo, adamw, "
                         "apollo, apollo-mini)")
    if opt not in FUSED:
        if args.rounding is not None:
            raise UsageError(f"--rounding only applies to the fused optimizers ({', '.join(FUSED)}), not {opt}")
        if args.backend != "auto":
            raise UsageError(f"--backend only applies to the fused optimizers ({', '.join(FUSED)}), not {opt}")
    if opt in APOLLO and args.clip_grad_value:
        raise UsageError(f"--optimizer {opt} cannot clip gradient values (--clip-grad-value {args.clip_grad_value:g}): "
                         "APOLLO projects the gradient with two thin GEMMs and the projection of clamp(G) has no "
                         "such form; use --clip-grad-norm instead (or --clip-grad-value 0)")
    if opt not in APOLLO:
        for flag, value in (("--apollo-rank", args.apollo_rank), ("--apollo-scale-type", args.apollo_scale_type),
                            ("--apollo-update-proj-gap", args.apollo_update_proj_gap)):
            if value is not None:
                raise UsageError(f"{flag} only applies to --optimizer apollo or apollo-mini, not {opt}")
    else:
        if args.apollo_rank is not None and args.apollo_rank < 1:
            raise UsageError(f"--apollo-rank must be >= 1, got {args.apollo_rank}")
        if args.apollo_update_proj_gap is not None and args.apollo_update_proj_gap < 1:
            raise UsageError(f"--apollo-update-proj-gap must be >= 1, got {args.apollo_update_proj_gap}")
        if opt == "apollo-mini" and (args.apollo_rank != 1 or args.apollo_scale_type != "tensor"):
            raise UsageError("--optimizer apollo-mini is APOLLO with rank 1 and one tensor-wide scale (scale 128); "
                             f"--apollo-rank {args.apollo_rank} / --apollo-scale-type {args.apollo_scale_type} "
                             "need --optimizer apollo")
    if args.fused_cross_entropy and (opt not in FUSED or not takes_fused_cross_entropy(opt)):
        have = [name for name in FUSED if takes_fused_cross_entropy(name)]
        raise UsageError(f"--fused-cross-entropy: --optimizer {opt} has no fused loss (the LM head's update inside "
                         f"the cross-entropy){'' if opt in FUSED else ': it is not a fused optimizer'}; "
                         f"{', '.join(have) or 'none'} {'has' if len(have) == 1 else 'have'} one. Drop the flag "
                         "or pass --no-fused-cross-entropy")
    if args.hift_group_size is None:
        for flag, value in (("--hift-strategy", args.hift_strategy), ("--hift-lr-schedule", args.hift_lr_schedule)):
            if value is not None:
                raise UsageError(f"{flag} needs --hift-group-size (HiFT is off without it)")
    else:
        if opt not in FUSED:
            raise UsageError(f"--hift-group-size wraps a fused optimizer of this package ({', '.join(FUSED)}) in "
                             f"HiFT; --optimizer {opt} keeps whole gradients and cannot be wrapped")
        if args.hift_group_size < 1:
            raise UsageError(f"--hift-group-size must be >= 1 (decoder layers per group), got {args.hift_group_size}")


def check_model_options(args, model: torch.nn.Module, say) -> None:
    """The checks that need the model (APOLLO's rank, HiFT's groups); still before anything is written."""
    if args.optimizer == "apollo":
        from ..optim.apollo import _default_projected

        params = dict(model.named_parameters())
        dims = sorted((min(params[n].shape), n) for n in _default_projected(model))
        if dims:
            most, name = dims[0]
            shape = "x".join(map(str, params[name].shape))
            if args.apollo_rank is None:
                args.apollo_rank = min(APOLLO_DEFAULT_RANK, most)
                if most < APOLLO_DEFAULT_RANK:
                    say(f"--apollo-rank: the default {APOLLO_DEFAULT_RANK} exceeds the smallest dimension of the "
                        f"projected weights ({most}: {name}, {shape}); using rank {most}")
            elif args.apollo_rank > most:
                raise UsageError(f"--apollo-rank {args.apollo_rank} exceeds the smallest dimension of the weights "
                                 f"APOLLO projects ({most}: {name}, {shape}); pass --apollo-rank {most} or less")
        elif args.apollo_rank is None:
            args.apollo_rank = APOLLO_DEFAULT_RANK
    if args.hift_group_size is not None:
        from ..optim.hift import hift_groups

        try:
            hift_groups(model, args.hift_group_size)
        except ValueError as exc:
            raise UsageError(f"--hift-group-size {args.hift_group_size}: {exc}") from None


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

    def schedule_step(self, step: int) -> int:
        """The 1-based step whose scheduled learning rate ``step`` uses."""
        return step

    def state_dict(self) -> dict:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state)


class HiFTRunner(FusedRunner):
    """HiFT over a fused optimizer. ``per_cycle`` (HiFT's rule): every step of a cycle of groups uses the
    schedule's learning rate at the cycle's first step; ``per_step``: the step's own."""

    def schedule_step(self, step: int) -> int:
        if self.opt.lr_schedule == "per_cycle":
            return step - self.opt.position
        return step


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

    def schedule_step(self, step: int) -> int:
        return step

    def state_dict(self) -> dict:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state)


def fused_loss_note(runner) -> str | None:
    """What the run's messages say about the fused cross-entropy (None for optimizers without it)."""
    opt = getattr(runner, "opt", None)
    if opt is None or not hasattr(opt, "fused_cross_entropy_reason"):
        return None
    if opt.fused_cross_entropy:
        return "fused cross-entropy on (the LM head is updated inside the loss; no logits, no head gradient)"
    return f"fused cross-entropy off: {opt.fused_cross_entropy_reason}"


def describe(args) -> str:
    """The optimizer as the run's messages name it."""
    name = args.optimizer
    if args.optimizer == "apollo":
        name += f" (rank {args.apollo_rank}, {args.apollo_scale_type} scale)"
    if args.hift_group_size is not None:
        name = (f"HiFT over {name} ({args.hift_group_size} layer{'s' if args.hift_group_size > 1 else ''} per group, "
                f"{args.hift_strategy}, lr {args.hift_lr_schedule.replace('_', ' ')})")
    return name


def build_runner(args, model: torch.nn.Module):
    clip_value = args.clip_grad_value or None  # 0: off
    clip = dict(clip_grad_norm=args.clip_grad_norm, clip_grad_value=clip_value, weight_decay=args.weight_decay)
    if args.optimizer in FUSED:
        import lomo_kernels

        fused = dict(backend=args.backend, rounding=args.rounding, seed=args.seed)
        if takes_fused_cross_entropy(args.optimizer):
            fused["fused_cross_entropy"] = bool(args.fused_cross_entropy)
        if args.optimizer in ("lomo", "adalomo"):
            cls = lomo_kernels.Lomo if args.optimizer == "lomo" else lomo_kernels.AdaLomo
            opt = cls(model, lr=args.lr, **clip, **fused)
        elif args.optimizer == "adamw":
            opt = lomo_kernels.AdamW(model, lr=args.lr, **clip, **fused)
        else:
            apollo = dict(rank=args.apollo_rank, scale_type=args.apollo_scale_type,
                          update_proj_gap=args.apollo_update_proj_gap)
            clip.pop("clip_grad_value")
            cls = lomo_kernels.Apollo if args.optimizer == "apollo" else lomo_kernels.ApolloMini
            opt = cls(model, lr=args.lr, **apollo, **clip, **fused)
        if args.hift_group_size is not None:
            hift = lomo_kernels.HiFT(opt, group_size=args.hift_group_size, strategy=args.hift_strategy,
                                     seed=args.seed, lr_schedule=args.hift_lr_schedule)
            return HiFTRunner(hift, needs_norm_pass=False)
        return FusedRunner(opt, needs_norm_pass=False)  # fused_backward runs the norm phase itself when needed
    if args.optimizer == "lomo-optim":
        import lomo_optim

        return FusedRunner(lomo_optim.Lomo(model, lr=args.lr, **clip), needs_norm_pass=args.clip_grad_norm is not None)
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=args.lr, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    return TorchRunner(opt, args.clip_grad_norm, clip_value)
