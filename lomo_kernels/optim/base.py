"""``FusedOptimizer``: the machinery shared by ``Lomo`` and ``AdaLomo``.

It *holds* the model (lomo_kernels.routing): every use of a linear/embedding weight is routed so that
the update happens inside the optimizer's backward pass, and runs LOMO's two-phase protocol when it
is needed:

* ``grad_norm(loss)``: a backward pass in norm-only mode. No weight is written and no gradient
  tensor is kept; every held weight adds ``[‖g‖², count of non-finite entries]`` to a small device
  buffer, synced to the host once at the end. It keeps the graph for the second pass.
* ``fused_backward(loss, lr)``: the backward pass that applies the (clipped) update.

The norm phase is needed for exact global-norm clipping (``clip_grad_norm``) and, with fp16
weights, to find an overflow *before* any weight changes. ``fused_backward`` runs it by itself when
it is needed and ``grad_norm`` was not called for this loss (lomo-optim instead raises, or for fp16
silently turns clipping on at 1.0); calling ``grad_norm`` first, as lomo-optim users do, still works.

When the norm phase finds a non-finite gradient the step is skipped as a whole: no weight is
touched, the fp16 loss scale (if any) is lowered, ``skipped_step`` is True and ``fused_backward``
only frees the graph (a backward pass whose updates are no-ops).

The hold ends with ``close()``, at the end of a ``with`` block, or when the optimizer is garbage
collected; the model is then the plain model again. A backward over a held model that is not this
optimizer's (``loss.backward()``) raises before any weight changes.

Per-parameter rules are small overridable methods, one per kind of use and phase:
``linear_apply`` / ``embedding_apply`` / ``dense_apply`` (subclasses) and ``linear_norm`` /
``embedding_norm`` / ``dense_norm`` (here: the norm of ``g / loss_scale``, the same for every rule).
"""
from __future__ import annotations

import functools
import logging
import math
import weakref

import torch
from torch import nn
from torch.autograd.graph import _engine_run_backward

from .. import ops
from ..ops._common import BACKENDS, ROUNDINGS, mix32_int
from ..routing import hold
from . import _checks

logger = logging.getLogger("lomo_kernels")

STATE_FORMAT = 1
# What a non-finite gradient does to a step (a non-finite loss always skips the step before its backward):
#   skip_step  every step gets a norm phase; a non-finite gradient skips the step, no weight changes
#   raise      the same, then FloatingPointError
#   partial    no extra pass; the step is applied (the default for fp32/bf16 weights)
NONFINITE_MODES = ("skip_step", "raise", "partial")


class FusedOptimizer(torch.optim.Optimizer):
    def __init__(self, model: nn.Module, defaults: dict, *, clip_grad_norm, clip_grad_value, backend: str,
                 rounding: str | None, seed: int, no_decay=(), unfused=(),
                 on_nonfinite: str | None = None, fused_cross_entropy: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__} takes the model (an nn.Module), got {type(model).__name__}")
        defaults["lr"] = _checks.non_negative("lr", defaults["lr"])
        self.clip_grad_norm = _checks.positive("clip_grad_norm", clip_grad_norm, optional=True)
        self.clip_grad_value = _checks.positive("clip_grad_value", clip_grad_value, optional=True)
        _checks.choice("backend", backend, BACKENDS)
        if rounding is not None and rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be None (bf16: stochastic, else nearest) or one of {ROUNDINGS}, got {rounding!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model has no trainable parameters (every parameter has requires_grad=False)")
        self.no_decay = _checks.parameter_names("no_decay", no_decay, model)
        self.unfused = _checks.parameter_names("unfused", unfused, model)
        super().__init__(params, defaults)
        self.model = model
        self.backend = backend
        self.rounding = rounding
        self.seed = seed
        self.step_count = 0
        self.phase = "apply"
        self.clip_coef = 1.0
        # fp16 weights overflow easily: their steps always get a norm phase to catch it before any write.
        self.checks_overflow = any(p.dtype == torch.float16 for p in params)
        if on_nonfinite is not None:
            _checks.choice("on_nonfinite", on_nonfinite, NONFINITE_MODES)
        elif self.checks_overflow:
            on_nonfinite = "skip_step"
        self.on_nonfinite = on_nonfinite or "partial"
        self._fresh_norm = False
        self._overflow = False
        self._checked_graph = None  # the graph check_graph last walked, while it is kept for another phase
        self._norm_stats: dict[torch.device, torch.Tensor] = {}
        self._param_index = {id(p): i for i, p in enumerate(model.parameters())}
        self._param_names = {id(p): n for n, p in model.named_parameters()}
        self._calls: dict[int, int] = {}
        self.last_grad_norm: float | None = None
        self.skipped_step = False
        self.skipped_steps = 0
        # partial mode's per-element guard: elements kept because their update was not finite
        self.last_nonfinite_updates = 0   # in the last applied step
        self.nonfinite_updates = 0        # over all steps
        self.partial_steps = 0            # steps with at least one such element
        self._nonfinite_counters: dict[torch.device, torch.Tensor] = {}
        self.updater = self              # where held weights' gradients go (``reroute`` changes it)
        self.in_fused_backward = False
        self.closed = False
        if not isinstance(fused_cross_entropy, bool):
            raise TypeError(f"fused_cross_entropy must be True or False, got {fused_cross_entropy!r}")
        self.held = hold(model, self, self.unfused)
        # A held causal LM's labelled training forward computes its loss with the LM head's update fused in
        # (no logits, no LM-head gradient) where that applies; why it does not, otherwise.
        self.fused_cross_entropy = False
        self.fused_cross_entropy_reason = "off (fused_cross_entropy=False)"
        if fused_cross_entropy:
            from ..integrations import causal_lm_loss
            from ..fused_cross_entropy import OptimizerHead
            self.fused_cross_entropy_reason = (
                f"{type(self).__name__} has no LM-head rule for the fused loss"
                if OptimizerHead.kind_of(self) is None else causal_lm_loss.why_not_applicable(model, self.held))
            if self.fused_cross_entropy_reason is None:
                causal_lm_loss.FusedCausalLMLoss(model, self.held)
                self.fused_cross_entropy = True
        self._release = weakref.finalize(self, self.held.release)  # garbage collection ends the hold too

    def __init_subclass__(cls, **kwargs):
        """A subclass's ``__init__`` that raises after the hold was taken (a check of its own arguments)
        releases it: a failed construction leaves the model as it was, not held by an unreachable object."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return

        @functools.wraps(init)
        def __init__(self, *args, **kw):
            try:
                init(self, *args, **kw)
            except BaseException:
                held = self.__dict__.get("held")
                if held is not None:
                    held.release()
                raise
        cls.__init__ = __init__

    def __repr__(self) -> str:
        return f"lomo_kernels.{type(self).__name__}(lr={self.lr:g}) at {hex(id(self))}"

    # --- the hold --------------------------------------------------------------------------------

    def close(self) -> None:
        """End the hold: the model is the plain model again (its weights as trained); this optimizer can
        no longer train it. Idempotent."""
        self._release()
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def lm_head_updater(self, param: torch.Tensor):
        """The ``LMHeadUpdater`` (lomo_kernels.fused_cross_entropy) that applies this optimizer's rule to a
        held LM head from the fused loss's chunks, or None (then the model's loss comes from logits)."""
        from ..fused_cross_entropy import OptimizerHead
        return OptimizerHead(self) if OptimizerHead.kind_of(self, param) is not None else None

    def reroute(self, updater) -> None:
        """Send the held weights' gradients to ``updater`` instead of this optimizer's rules (an updater
        that wraps it, e.g. the ZeRO-3 one, which maps each call onto the rank's shard)."""
        self.updater = updater

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

    def nonfinite_counter(self, param: torch.Tensor) -> torch.Tensor | None:
        """The ``nonfinite=`` argument of this step's update ops: a per-device int64 counter when no norm
        phase checked this step's gradient (partial mode), else None (nothing to count; fp32 keeps its
        one-GEMM path). Read once, at the end of the step."""
        if self._fresh_norm:
            return None
        counter = self._nonfinite_counters.get(param.device)
        if counter is None:
            counter = self._nonfinite_counters[param.device] = torch.zeros(1, dtype=torch.int64, device=param.device)
        return counter

    def _read_nonfinite_counters(self) -> None:
        counters, self._nonfinite_counters = self._nonfinite_counters, {}
        count = sum(int(c.item()) for c in counters.values())  # one sync per device, only in partial mode
        self.last_nonfinite_updates = count
        if count:
            self.nonfinite_updates += count
            self.partial_steps += 1
            logger.warning("lomo_kernels: step %d applied partially: %d weight element(s) kept their value "
                           "because their update was not finite", self.step_count, count)

    def weight_decay_for(self, param: torch.Tensor) -> float:
        """The rule's weight decay for ``param``: 0 for the names in ``no_decay``."""
        return 0.0 if self._name(param) in self.no_decay else self.weight_decay

    # --- the Updater protocol (lomo_kernels.routing): dispatch on the phase -------------------------

    def linear(self, param, x, dy):
        if self.phase == "norm":
            self.linear_norm(param, x, dy)
        elif self.phase == "apply":
            self.linear_apply(param, x, dy)

    def embedding(self, param, indices, dy, padding_idx):
        if self.phase == "norm":
            self.embedding_norm(param, indices, dy, padding_idx)
        elif self.phase == "apply":
            self.embedding_apply(param, indices, dy, padding_idx)

    def dense(self, param, grad):
        if self.phase == "norm":
            self.dense_norm(param, grad)
        elif self.phase == "apply":
            self.dense_apply(param, grad)

    def linear_norm(self, param, x, dy):
        ops.linear_grad_sqnorm_(self._stats_for(param), param, x, dy, loss_scale=self.loss_scale,
                                backend=self.backend, name=self._name(param))

    def embedding_norm(self, param, indices, dy, padding_idx):
        ops.embedding_grad_sqnorm_(self._stats_for(param), param, indices, dy, loss_scale=self.loss_scale,
                                   padding_idx=padding_idx, backend=self.backend, name=self._name(param))

    def dense_norm(self, param, grad):
        ops.dense_grad_sqnorm_(self._stats_for(param), param, grad, loss_scale=self.loss_scale,
                               backend=self.backend, name=self._name(param))

    def linear_apply(self, param, x, dy):
        raise NotImplementedError

    def embedding_apply(self, param, indices, dy, padding_idx):
        raise NotImplementedError

    def dense_apply(self, param, grad):
        raise NotImplementedError

    # --- the protocol ----------------------------------------------------------------------------

    def _check_lr(self, lr):
        if lr is None:
            return self.lr
        return _checks.non_negative("lr", lr)

    def _check_loss(self, loss) -> None:
        if self.closed:
            raise RuntimeError(f"{self!r} is closed: it no longer holds the model")
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"loss must be a one-element tensor, got {type(loss).__name__}"
                             + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else ""))
        if not loss.requires_grad:
            raise ValueError("loss does not require grad: it was computed without autograd (torch.no_grad?)")

    def _backward(self, loss: torch.Tensor, retain_graph: bool) -> None:
        self._check_loss(loss)
        if loss.grad_fn is not self._checked_graph:  # the apply phase after a norm phase: walked already
            self.held.check_graph(loss)
        self._checked_graph = loss.grad_fn if retain_graph else None
        self._calls.clear()
        self.in_fused_backward = True
        completed = False
        try:
            scaled = loss * self.loss_scale if self.loss_scale != 1.0 else loss
            # The router stays active inside the backward, where gradient checkpointing recomputes forwards.
            # The engine is called directly: ``Tensor.backward`` is itself a torch function, and a mode's
            # handler runs with the mode switched off.
            with self.held.routing():
                _engine_run_backward((scaled,), (torch.ones_like(scaled),), retain_graph, False, (),
                                     allow_unreachable=True, accumulate_grad=True)
            completed = True
        finally:
            self.in_fused_backward = False
            self.held.end_backward(completed)
            if not retain_graph:
                self.held.end_step()

    def _run_phase(self, phase: str, loss: torch.Tensor, retain_graph: bool) -> None:
        self.phase = phase
        try:
            self._backward(loss, retain_graph=retain_graph)
        finally:
            self.phase = "apply"

    @property
    def needs_norm_phase(self) -> bool:
        """True when every step needs ``grad_norm`` first: global-norm clipping, fp16 overflow checks, or
        ``on_nonfinite`` asking for a step that is skipped whole."""
        return self.clip_grad_norm is not None or self.checks_overflow or self.on_nonfinite != "partial"

    def grad_norm(self, loss: torch.Tensor) -> float:
        """Norm phase: a backward pass that only measures ``‖g‖`` (weights untouched); keeps the graph
        for ``fused_backward``. Returns the global norm of the unscaled gradient, ``inf`` when some
        gradient entry is not finite (the coming ``fused_backward`` then skips the step)."""
        self._norm_stats.clear()
        self._run_phase("norm", loss, retain_graph=True)
        total = torch.stack([s.to(torch.float64).cpu() for s in self._norm_stats.values()]).sum(0) \
            if self._norm_stats else torch.zeros(2, dtype=torch.float64)
        sq, nonfinite = total.tolist()  # the one host sync of the step
        self._overflow = nonfinite != 0 or not math.isfinite(sq)
        norm = math.inf if self._overflow else math.sqrt(sq)
        self.last_grad_norm = norm
        self._fresh_norm = True
        if self._overflow:
            self.clip_coef = 1.0
            self._on_overflow()
        elif self.clip_grad_norm is not None:
            # lomo-optim's clip coefficient
            self.clip_coef = min(1.0, float(self.clip_grad_norm) / (norm + 1e-6))
        return norm

    def _on_overflow(self) -> None:
        """Called by ``grad_norm`` when the gradient is not finite (the loss scaler lowers its scale)."""

    def _on_step_applied(self) -> None:
        """Called after a step was applied (the loss scaler counts a clean step)."""

    def fused_backward(self, loss: torch.Tensor, lr: float | None = None) -> None:
        """Backward pass that applies the update as it goes; ``lr`` overrides ``param_groups[0]["lr"]``.

        A non-finite loss skips the step before any backward. Runs ``grad_norm(loss)`` first if this step
        needs a norm phase (``needs_norm_phase``) and it was not called. Sets ``skipped_step`` (True when
        a non-finite loss or gradient skipped the step); ``on_nonfinite="raise"`` then raises.
        """
        lr = self._check_lr(lr)
        self._check_loss(loss)
        # asked as "is it non-finite?": the planner's fake tensors answer False and take the ordinary path
        bad_loss = bool((~torch.isfinite(loss.detach())).item())
        if bad_loss:
            self._fresh_norm, self._overflow = True, True
        elif self.needs_norm_phase and not self._fresh_norm:
            self.grad_norm(loss)
        self.param_groups[0]["lr"] = lr
        self.skipped_step = self._fresh_norm and self._overflow
        try:
            if self.skipped_step:
                self._run_phase("skip", loss, retain_graph=False)  # frees the graph (and ZeRO-3's gathers)
                self.skipped_steps += 1
                logger.warning("lomo_kernels: step %d skipped: non-finite %s; no weight was changed",
                               self.step_count + 1, "loss" if bad_loss else "gradient")
            else:
                self._run_phase("apply", loss, retain_graph=False)
                self.step_count += 1
                self._read_nonfinite_counters()
                self._on_step_applied()
        finally:
            self._fresh_norm = False
            self._overflow = False
            self.clip_coef = 1.0
        if self.skipped_step and self.on_nonfinite == "raise":
            raise FloatingPointError(f"non-finite {'loss' if bad_loss else 'gradient'} at step {self.step_count + 1} "
                                     "(on_nonfinite='raise'); no weight was changed")

    def step(self, closure=None):
        """No-op: the update was applied during ``fused_backward``. Present for Trainer/scheduler code."""
        return closure() if closure is not None else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """No-op: fused parameters never hold a gradient."""

    # --- checkpoints -----------------------------------------------------------------------------

    def _named_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per-parameter tensors to checkpoint, keyed by parameter name (subclasses with state)."""
        return {}

    def _load_named_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no per-parameter state, but the checkpoint has some "
                             f"for {sorted(state)[:3]}...")

    def _scaler_state(self):
        return None

    def _load_scaler_state(self, state) -> None:
        if state is not None:
            raise ValueError(f"{type(self).__name__} has no loss scaler here, but the checkpoint has its state")

    def state_dict(self) -> dict:
        """Everything an exact resume needs. Per-parameter state is keyed by parameter *name* (not by
        position as in ``torch.optim``), so a checkpoint loads into a freshly built model. Holds only
        tensors, numbers, strings and dicts: loadable with ``torch.load(..., weights_only=True)``."""
        return {"format": STATE_FORMAT, "optimizer": type(self).__name__, "step": self.step_count,
                "seed": self.seed, "skipped_steps": self.skipped_steps,
                "param_groups": [{k: v for k, v in group.items() if k != "params"} for group in self.param_groups],
                "loss_scaler": self._scaler_state(),
                "state": {name: {k: t.detach().clone() for k, t in entry.items()}
                          for name, entry in self._named_state().items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or state_dict.get("format") != STATE_FORMAT:
            raise ValueError("not a lomo_kernels optimizer checkpoint (missing or unknown 'format')")
        if state_dict["optimizer"] != type(self).__name__:
            raise ValueError(f"checkpoint is from {state_dict['optimizer']}, cannot load it into {type(self).__name__}")
        if len(state_dict["param_groups"]) != len(self.param_groups):
            raise ValueError(f"checkpoint has {len(state_dict['param_groups'])} param groups, "
                             f"this optimizer {len(self.param_groups)}")
        self._load_named_state(state_dict["state"])
        self._load_scaler_state(state_dict["loss_scaler"])
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update(saved)
        self.step_count = int(state_dict["step"])
        self.seed = int(state_dict["seed"])
        self.skipped_steps = int(state_dict["skipped_steps"])
