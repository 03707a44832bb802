"""Hugging Face ``Trainer`` with lomo_kernels' fused optimizers.

Switching from ``Trainer`` is two lines::

    from lomo_kernels.integrations.transformers import LomoTrainer

    trainer = LomoTrainer(model=model, args=args, train_dataset=ds,
                          optimizer_name="adalomo",              # or "lomo" (the default)
                          optimizer_kwargs={"statistics": "recompute"})
    trainer.train()                                             # resume_from_checkpoint=... works too

What ``TrainingArguments`` mean here:

* ``learning_rate``, ``weight_decay``, ``lr_scheduler_type``/warmup: as usual; the scheduler drives
  ``param_groups[0]["lr"]``, which the fused backward uses, and does not advance on a skipped step
  (a non-finite gradient). Weight decay follows the Trainer's own rule
  (``Trainer.get_decay_parameter_names``: no decay for biases and normalization weights).
* The optimizer holds the model only while ``train()`` runs: when it returns (or raises) the hold is
  released, so the model is the plain model again for evaluation, saving or another trainer.
* ``max_grad_norm > 0``: exact global-norm clipping. Each step's ``fused_backward`` first runs the
  norm-only backward (``grad_norm``). The Trainer's ``optim="lomo"`` route cannot clip: it only
  calls ``fused_backward``, and with lomo-optim that raises once ``clip_grad_norm`` is set.
* Logs: ``loss``, ``grad_norm`` (from the norm phase; absent when a step has none), ``learning_rate``,
  ``skipped_steps`` (steps skipped for a non-finite gradient, cumulative) and, with fp16 weights,
  ``loss_scale``.
* Checkpoints: the optimizer's ``state_dict`` (AdaLomo statistics, step, loss scaler, rounding seed)
  is saved as ``optimizer.pt`` with the model and restored on resume.

Optimizers: ``optimizer_name="lomo"`` (default), ``"adalomo"``, ``"adamw"`` (fused ``torch.optim.AdamW``),
``"apollo"``, ``"apollo-mini"``; their own arguments go in ``optimizer_kwargs`` (e.g. ``{"rank": 64}``).

Fused cross-entropy: ``fused_cross_entropy=True``/``False`` is passed to the optimizer (None, the default:
the optimizer's own default, on where it applies); with it on, a labelled training forward computes the
loss with the LM head's update inside it (no logits). ``trainer.fused_optimizer.fused_cross_entropy`` and
``..._reason`` say whether it is on. ``True`` for an optimizer that does not take it raises.

HiFT (``lomo_kernels.HiFT``: one group of layers per step): ``hift=dict(group_size=2, strategy="down2up")``
wraps any of them; the scheduler then advances once per cycle of groups (HiFT's rule;
``lr_schedule="per_step"`` in the dict: every step), and checkpoints hold HiFT's position and every
group's state.

Not supported (raise at construction): ``gradient_accumulation_steps > 1`` (a fused update cannot
accumulate gradients: none are kept) and ``fp16=True``/``bf16=True`` (autocast with a GradScaler, or
mixed weights; load the model in ``torch.float16``/``torch.bfloat16`` instead: the optimizer does fp16
loss scaling and bf16 stochastic rounding itself).
"""
from __future__ import annotations

from transformers import Trainer

from ..optim import AdaLomo, Lomo
from ..optim.base import FusedOptimizer
from ..optim.hift import HiFT

OPTIMIZERS = {"lomo": Lomo, "adalomo": AdaLomo}
from ..optim import AdamW, Apollo, ApolloMini  # noqa: E402
OPTIMIZERS.update({"adamw": AdamW, "apollo": Apollo, "apollo-mini": ApolloMini})


def _takes(cls, name: str) -> bool:
    """Whether ``cls(...)`` takes the keyword ``name`` (following ``**kwargs`` up the class chain)."""
    import inspect

    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(vars(klass)["__init__"]).parameters
        if name in params:
            return True
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return False
    return False


def build_optimizer(model, args, optimizer_name: str = "lomo", decay_parameters=None,
                    **optimizer_kwargs) -> FusedOptimizer:
    """The fused optimizer a ``LomoTrainer`` builds from ``TrainingArguments`` (``learning_rate``,
    ``weight_decay``, ``max_grad_norm``, ``seed``); ``optimizer_kwargs`` override or extend them.
    ``decay_parameters``: names of the parameters that get weight decay (None: all of them)."""
    if optimizer_name not in OPTIMIZERS:
        raise ValueError(f"optimizer_name must be one of {sorted(OPTIMIZERS)}, got {optimizer_name!r}")
    no_decay = [] if decay_parameters is None else \
        [n for n, p in model.named_parameters() if p.requires_grad and n not in set(decay_parameters)]
    kwargs = dict(lr=args.learning_rate, weight_decay=args.weight_decay, no_decay=no_decay,
                  clip_grad_norm=args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None,
                  seed=args.seed % 2**32)
    kwargs.update(optimizer_kwargs)
    return OPTIMIZERS[optimizer_name](model, **kwargs)


class LomoTrainer(Trainer):
    """``Trainer`` whose backward pass applies a fused update (Lomo, AdaLomo, AdamW, Apollo, ApolloMini, optionally
    under HiFT; see the module doc)."""

    def __init__(self, *args, optimizer_name: str = "lomo", optimizer_kwargs: dict | None = None,
                 hift: dict | None = None, fused_cross_entropy: bool | None = None, **kwargs):
        if optimizer_name not in OPTIMIZERS:
            raise ValueError(f"optimizer_name must be one of {sorted(OPTIMIZERS)}, got {optimizer_name!r}")
        if hift is not None and not isinstance(hift, dict):
            raise TypeError(f"hift must be None or a dict of lomo_kernels.HiFT arguments, got {hift!r}")
        if fused_cross_entropy is not None:
            if not isinstance(fused_cross_entropy, bool):
                raise TypeError(f"fused_cross_entropy must be None, True or False, got {fused_cross_entropy!r}")
            if not _takes(OPTIMIZERS[optimizer_name], "fused_cross_entropy"):
                if fused_cross_entropy:
                    raise ValueError(f"fused_cross_entropy=True: {OPTIMIZERS[optimizer_name].__name__} takes no "
                                     "fused_cross_entropy (it has no fused loss yet)")
                fused_cross_entropy = None  # off already: there is nothing to turn off
        super().__init__(*args, **kwargs)
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError("LomoTrainer needs gradient_accumulation_steps=1: fused updates keep no gradient "
                             "to accumulate (use a larger per_device_train_batch_size)")
        if self.args.fp16 or self.args.bf16:
            raise ValueError("LomoTrainer does not use autocast mixed precision (fp16=/bf16=True): load the model "
                             "in torch.float16 or torch.bfloat16; the optimizer does loss scaling / stochastic "
                             "rounding itself")
        self.optimizer_name = optimizer_name
        self.optimizer_kwargs = dict(optimizer_kwargs or {})
        self.hift_kwargs = dict(hift) if hift is not None else None
        if fused_cross_entropy is not None:
            if "fused_cross_entropy" in self.optimizer_kwargs and \
                    self.optimizer_kwargs["fused_cross_entropy"] != fused_cross_entropy:
                raise ValueError("fused_cross_entropy and optimizer_kwargs['fused_cross_entropy'] disagree")
            self.optimizer_kwargs["fused_cross_entropy"] = fused_cross_entropy
        self._fused: FusedOptimizer | HiFT | None = None

    @property
    def fused_optimizer(self) -> FusedOptimizer:
        """The lomo_kernels optimizer of the current (or, after ``train()``, the last, closed) run."""
        if self._fused is None:
            raise RuntimeError("the optimizer is created when training starts")
        return self._fused

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = model if model is not None else self.model
            self.optimizer = self._fused = build_optimizer(model, self.args, self.optimizer_name,
                                                           decay_parameters=self.get_decay_parameter_names(model),
                                                           **self.optimizer_kwargs)
            if self.hift_kwargs is not None:
                self.optimizer = self._fused = HiFT(self._fused, **self.hift_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The Trainer's scheduler; with HiFT, gated to advance once per cycle (``HiFT.wrap_scheduler``)."""
        created = self.lr_scheduler is None
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if created and isinstance(self._fused, HiFT):
            self.lr_scheduler = self._fused.wrap_scheduler(scheduler)
        return self.lr_scheduler

    def train(self, *args, **kwargs):
        """``Trainer.train``; the fused optimizer's hold on the model ends when it returns or raises."""
        try:
            return super().train(*args, **kwargs)
        finally:
            self.release_optimizer()

    def release_optimizer(self) -> None:
        """Close the fused optimizer (the model is the plain model again); a later ``train()`` builds a new one."""
        if self._fused is not None:
            self._fused.close()
        self.optimizer = None
        self.lr_scheduler = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        del inputs
        # fused_backward runs the norm phase first when clipping (max_grad_norm) or fp16 needs it
        opt = self.fused_optimizer
        opt.fused_backward(loss, self._get_learning_rate())
        if hasattr(self.optimizer, "_is_overflow"):
            # accelerate's optimizer wrapper: the Trainer does not step the scheduler after a skipped step
            self.optimizer._is_overflow = opt.skipped_step
        return loss.detach()

    # There are no gradients for the Trainer to clip or measure: report the norm phase's norm.
    def _clip_grad_norm(self, model):
        return self.fused_optimizer.last_grad_norm

    def _get_grad_norm(self, model, grad_norm=None):
        return self.fused_optimizer.last_grad_norm if grad_norm is None else grad_norm

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self.optimizer is not None:
            opt = self.fused_optimizer
            logs["skipped_steps"] = opt.skipped_steps
            logs["partial_steps"] = getattr(opt, "partial_steps", 0)
            logs["nonfinite_updates"] = getattr(opt, "nonfinite_updates", 0)
            if opt.checks_overflow:
                logs["loss_scale"] = opt.loss_scale
        super().log(logs, *args, **kwargs)
