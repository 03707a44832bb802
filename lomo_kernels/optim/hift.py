"""``HiFT``: hierarchical block-wise full fine-tuning (Liu et al. 2024) over a fused optimizer.

HiFT updates one *group* of layers per step and rotates through the groups, so only that group needs
a backward for its weights and optimizer state on the device::

    opt = lomo_kernels.HiFT(lomo_kernels.AdaLomo(model, lr=1e-3), group_size=2, strategy="down2up")
    for batch in loader:
        loss = model(**batch).loss
        opt.fused_backward(loss, lr)      # updates the active group, then activates the next one

Grouping rule (HiFT's, for decoder LMs): every trainable parameter whose name contains a ``.N.``
component belongs to the layer named by the prefix up to its first such component (``LAYER_PATTERN``,
e.g. ``model.layers.3``; HiFT's own pattern is ``\\.\\d+\\.``); layers, in the model's order, are cut
into blocks of ``group_size`` (the last block may be shorter). The parameters before the first layer
and those of ``nn.Embedding`` modules form the *embedding* group; the remaining ones (final norm, LM
head) the *head* group. Groups ``[embedding, block 0, ..., block k, head]`` (empty ones dropped) are
visited ``down2up`` (embedding first, HiFT's default), ``up2down`` (head first) or ``random`` (a new
seeded permutation each cycle). HiFT's own trainer counts the embedding and the head (and LLaMA's final
norm, separately) as units of ``group_element``; here ``group_size`` counts decoder layers only.

How a step works here:

* The active group is chosen *before* the forward that uses it: at construction, then at the end of
  each ``fused_backward``. Its parameters have ``requires_grad=True``, every other one ``False``. A held
  weight with ``requires_grad=False`` is used plainly (no fused update, no autograd node), and dense
  parameters without ``requires_grad`` get no gradient, so the wrapped optimizer updates exactly the
  active group. Autograd builds no graph below the lowest active parameter: the backward is truncated
  there (no input-gradient GEMMs for the frozen layers beneath).
* Clipping and fp16 overflow checks (the wrapped optimizer's norm phase) see the active group's
  gradient only, as HiFT's ``clip_grad_norm_`` over the parameters that have a gradient.
* Each group has its own step counter (the wrapped optimizer's ``step_count`` is set to it while the
  group steps): AdaLomo's ``beta2`` schedule, AdamW's bias correction and the rounding seeds follow the
  group's own updates, like ``torch.optim.AdamW``'s per-parameter ``step`` in HiFT's reference code.
* ``lr_schedule="per_cycle"`` (HiFT's): a learning-rate schedule advances once per full cycle of groups;
  ``"per_step"``: once per step. ``schedule_step`` is the count to feed a schedule, ``wrap_scheduler``
  gates a torch LR scheduler accordingly.
* Optimizer state of inactive groups lives on the host (pinned memory when it is on CUDA), the active
  group's on the device: after a group's step its state is copied out on a side stream and the next
  group's state is prefetched on the same stream; the compute stream waits for it before that group's
  backward. On CPU the same calls run and the moves are no-ops (``offload="always"`` forces real
  copies, to test the path). States round-trip bit-exactly (plain copies).

Not like HiFT's code: no optimizer param groups are rebuilt (the fused optimizer has no per-step
param list), no ``empty_cache()``, and with ``group_size`` not dividing the layer count the groups stay
fixed (HiFT's list rotation with a floor-divided cycle length shifts them from cycle to cycle).
"""
from __future__ import annotations

import re
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ..autograd import FusedEmbeddingFunction, FusedLinearFunction
from ..ops._common import mix32_int
from .base import FusedOptimizer

STRATEGIES = ("down2up", "up2down", "random")
LR_SCHEDULES = ("per_cycle", "per_step")
OFFLOADS = ("auto", "always", "never")
LAYER_PATTERN = r"^(.*?\.\d+)\."
HIFT_FORMAT = 1


@dataclass(frozen=True)
class HiFTGroup:
    """One unit of HiFT's rotation: a label (``embedding``, ``model.layers.0-1``, ``head``) and the
    names of its parameters, in the model's order."""
    label: str
    names: tuple[str, ...]


def hift_groups(model: nn.Module, group_size: int = 1) -> list[HiFTGroup]:
    """HiFT's grouping of ``model``'s trainable parameters (see the module doc); raises ``ValueError``
    when no parameter name matches ``LAYER_PATTERN`` or ``group_size`` is not in [1, number of layers]."""
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int (decoder layers per group), got {group_size!r}")
    embedding_weights = {id(m.weight) for m in model.modules()
                         if isinstance(m, nn.Embedding) and isinstance(m.weight, nn.Parameter)}
    layers: dict[str, list[str]] = {}
    before: list[str] = []
    after: list[str] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        match = re.match(LAYER_PATTERN, name)
        if match:
            layers.setdefault(match.group(1), []).append(name)
        elif id(param) in embedding_weights or not layers:
            before.append(name)
        else:
            after.append(name)
    if not layers:
        raise ValueError(f"HiFT's grouping rule found no decoder layers in {type(model).__name__}: no trainable "
                         f"parameter name matches the layer pattern r'{LAYER_PATTERN}' (a '.N.' component, as "
                         "HiFT's r'\\.\\d+\\.'); trainable parameters: "
                         f"{[n for n, p in model.named_parameters() if p.requires_grad][:5]}")
    if group_size < 1 or group_size > len(layers):
        raise ValueError(f"group_size must be between 1 and the number of decoder layers ({len(layers)}: "
                         f"{list(layers)[0]} ... {list(layers)[-1]}), got {group_size}")
    groups = [HiFTGroup("embedding", tuple(before))] if before else []
    prefixes = list(layers)
    for start in range(0, len(prefixes), group_size):
        block = prefixes[start:start + group_size]
        label = block[0] if len(block) == 1 else f"{block[0]}-{block[-1].rsplit('.', 1)[-1]}"
        groups.append(HiFTGroup(label, tuple(n for prefix in block for n in layers[prefix])))
    if after:
        groups.append(HiFTGroup("head", tuple(after)))
    return groups


# --- where the inactive groups' optimizer state lives ----------------------------------------------

class _StateStore:
    """Moves the wrapped optimizer's per-parameter state tensors (``_named_state()``, keyed by name)
    between their home device and the host, keeping each tensor's identity (``t.data`` is swapped), so
    the optimizer's own dicts stay valid. Host copies are pinned when the home device is CUDA; moves
    run on one side stream, and ``ready(names)`` makes the compute stream wait for a prefetch."""

    def __init__(self, optimizer: FusedOptimizer, offload: str):
        self.optimizer = optimizer
        self.offload = offload
        self.home: dict[tuple[str, str], torch.device] = {}
        self.host: dict[tuple[str, str], torch.Tensor] = {}
        self.on_host: set[tuple[str, str]] = set()
        self.streams: dict[torch.device, object] = {}
        self.events: list = []
        self.moves = 0            # tensors moved (both ways), no-op moves included
        self.bytes_copied = 0     # bytes actually copied

    def _tensors(self, names):
        state = self.optimizer._named_state()
        for name in names:
            for key, tensor in state.get(name, {}).items():
                if isinstance(tensor, torch.Tensor):
                    yield (name, key), tensor

    def _stream(self, device: torch.device):
        if device.type != "cuda":
            return None
        stream = self.streams.get(device)
        if stream is None:
            stream = self.streams[device] = torch.cuda.Stream(device=device)
        return stream

    def _copies(self, device: torch.device) -> bool:
        return self.offload == "always" or (self.offload == "auto" and device.type != "cpu")

    def to_host(self, names) -> None:
        """After the group's step: its state to the host (async on CUDA, after the step's kernels)."""
        for key, tensor in self._tensors(names):
            if key in self.on_host:
                continue
            home = self.home.setdefault(key, tensor.device)
            self.moves += 1
            self.on_host.add(key)
            if not self._copies(home):
                continue  # the no-op move: CPU state stays where it is
            host = self.host.get(key)
            if host is None or host.shape != tensor.shape or host.dtype != tensor.dtype:
                host = self.host[key] = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu",
                                                    pin_memory=home.type == "cuda")
            stream = self._stream(home)
            old = tensor.data
            if stream is not None:
                stream.wait_stream(torch.cuda.current_stream(home))
                with torch.cuda.stream(stream):
                    host.copy_(old, non_blocking=True)
                old.record_stream(stream)  # the device block is not reused before the copy is done
            else:
                host.copy_(old)
            tensor.data = host
            self.bytes_copied += host.numel() * host.element_size()

    def to_device(self, names) -> None:
        """Prefetch the group's state to its home device (async on CUDA, on the side stream)."""
        for key, tensor in self._tensors(names):
            if key not in self.on_host:
                continue
            home = self.home[key]
            self.moves += 1
            self.on_host.discard(key)
            if not self._copies(home):
                continue
            stream = self._stream(home)
            if stream is not None:
                with torch.cuda.stream(stream):
                    dev = torch.empty(tensor.shape, dtype=tensor.dtype, device=home)
                    dev.copy_(tensor.data, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
                self.events.append((home, event, dev))
            else:
                dev = tensor.data.to(home, copy=True)
            tensor.data = dev
            self.bytes_copied += dev.numel() * dev.element_size()

    def ready(self) -> None:
        """Before the active group's backward: the compute stream waits for the prefetches."""
        for home, event, dev in self.events:
            current = torch.cuda.current_stream(home)
            current.wait_event(event)
            dev.record_stream(current)
        self.events.clear()

    def synchronize(self) -> None:
        """Before host code reads state tensors (``state_dict``): every pending copy is done."""
        for stream in self.streams.values():
            stream.synchronize()
        self.ready()

    def device_bytes(self) -> int:
        """Bytes of optimizer state resident on its home device (not moved to the host; on CPU with
        ``offload='auto'`` the move is a no-op but is accounted the same way)."""
        return sum(t.numel() * t.element_size() for key, t in self._tensors_all() if key not in self.on_host)

    def _tensors_all(self):
        state = self.optimizer._named_state()
        for name, entry in state.items():
            for key, tensor in entry.items():
                if isinstance(tensor, torch.Tensor):
                    yield (name, key), tensor


# --- the wrapper -------------------------------------------------------------------------------------

class HiFT(torch.optim.Optimizer):
    """HiFT over a fused optimizer of this package (``Lomo``, ``AdaLomo``, ...); see the module doc.

    ``group_size``: decoder layers per group (1 .. number of layers). ``strategy``: ``down2up``
    (embedding first), ``up2down`` (head first) or ``random`` (seeded, a permutation per cycle).
    ``lr_schedule``: ``per_cycle`` (HiFT's: a schedule advances once per cycle) or ``per_step``.
    ``offload``: ``auto`` (inactive groups' state to the host when it lives on an accelerator), ``always``
    (copy even on CPU), ``never``. ``param_groups`` is the wrapped optimizer's (an LR scheduler built
    on this object drives the wrapped optimizer's ``lr``).
    """

    def __init__(self, optimizer: FusedOptimizer, group_size: int = 1, strategy: str = "down2up", seed: int = 0,
                 lr_schedule: str = "per_cycle", *, offload: str = "auto"):
        if not isinstance(optimizer, FusedOptimizer):
            raise TypeError(f"HiFT wraps a lomo_kernels fused optimizer (Lomo, AdaLomo, ...), got "
                            f"{type(optimizer).__name__}")
        if optimizer.closed:
            raise ValueError(f"{optimizer!r} is closed: it no longer holds the model")
        if getattr(optimizer, "_hift", None) is not None and optimizer._hift() is not None:
            raise ValueError(f"{optimizer!r} is already wrapped by {optimizer._hift()!r}")
        if optimizer.updater is not optimizer:
            raise ValueError(f"{optimizer!r} sends its updates to {optimizer.updater!r} (e.g. ZeRO-3); HiFT supports "
                             "an optimizer that applies its own updates only")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
        if offload not in OFFLOADS:
            raise ValueError(f"offload must be one of {OFFLOADS}, got {offload!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
            raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
        model = optimizer.model
        self.groups = hift_groups(model, group_size)
        if getattr(model, "_require_grads_hooks", None):
            warnings.warn("HiFT: the model makes its input embeddings' output require grad (Hugging Face's "
                          "enable_input_require_grads, which activation_checkpointing_enable turns on), so every "
                          "step's backward runs down to the embedding and is not truncated below the active group "
                          "(correct, only slower). With non-reentrant checkpointing (transformers' default) call "
                          "model.disable_input_require_grads() after enabling it.", UserWarning, stacklevel=2)
        params = dict(model.named_parameters())
        trainable = {n for n, p in params.items() if p.requires_grad}
        held = {site.name for site in optimizer.held.sites.values()} | set(optimizer.held.dense)
        missing = sorted(trainable - held)
        if missing:
            raise ValueError(f"parameters {missing[:3]} are trainable but not held by {optimizer!r} (made trainable "
                             "after it was created?)")
        self.defaults = optimizer.defaults
        torch.optim.Optimizer.__init__(self, [p for group in optimizer.param_groups for p in group["params"]],
                                       dict(optimizer.defaults))
        self.param_groups = optimizer.param_groups  # shared: a scheduler on HiFT drives the wrapped lr
        self.optimizer = optimizer
        self.group_size = group_size
        self.strategy = strategy
        self.seed = seed
        self.lr_schedule = lr_schedule
        self.offload = offload
        self._params = {n: params[n] for group in self.groups for n in group.names}
        self._group_of = {id(self._params[n]): i for i, group in enumerate(self.groups) for n in group.names}
        self.step_count = 0          # HiFT steps taken (skipped ones included: the rotation goes on)
        self.cycle = 0               # completed cycles
        self.position = 0            # index of the active group in this cycle's order
        self.order = self._order_for(0)
        self.group_steps = [0] * len(self.groups)  # applied updates per group (its own step clock)
        self.lr_step_due = False     # the last step completed a cycle (per_cycle) / any step (per_step)
        self.closed = False
        self.store = _StateStore(optimizer, offload)
        optimizer._hift = weakref.ref(self)
        self._activate(self.active, prefetch=False)
        for i, group in enumerate(self.groups):
            if i != self.active:
                self.store.to_host(group.names)
        self.store.to_device(self.groups[self.active].names)
        self._restore = weakref.finalize(self, HiFT._restore_flags, list(self._params.values()))

    # --- rotation --------------------------------------------------------------------------------

    def _order_for(self, cycle: int) -> list[int]:
        n = len(self.groups)
        if self.strategy == "down2up":
            return list(range(n))
        if self.strategy == "up2down":
            return list(range(n - 1, -1, -1))
        generator = torch.Generator().manual_seed(mix32_int(self.seed ^ mix32_int(cycle * 0x9E3779B1 + 0x5BD1E995)))
        return torch.randperm(n, generator=generator).tolist()

    @property
    def active(self) -> int:
        """Index (into ``groups``) of the group the next ``fused_backward`` updates."""
        return self.order[self.position]

    @property
    def active_group(self) -> HiFTGroup:
        return self.groups[self.active]

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def schedule_step(self) -> int:
        """How far a learning-rate schedule has advanced: completed cycles (``per_cycle``) or steps taken."""
        return self.cycle if self.lr_schedule == "per_cycle" else self.step_count

    def _activate(self, index: int, prefetch: bool = True) -> None:
        names = set(self.groups[index].names)
        for name, param in self._params.items():
            param.requires_grad_(name in names)
        if prefetch:
            self.store.to_device(self.groups[index].names)

    @staticmethod
    def _restore_flags(params) -> None:
        for param in params:
            param.requires_grad_(True)

    def _advance(self) -> None:
        self.position += 1
        completed = self.position == len(self.order)
        if completed:
            self.cycle += 1
            self.position = 0
            self.order = self._order_for(self.cycle)
        self.lr_step_due = completed or self.lr_schedule == "per_step"

    # --- the protocol ------------------------------------------------------------------------------

    def _check_closed(self) -> None:
        if self.closed:
            raise RuntimeError(f"{self!r} is closed")

    def _check_graph(self, loss: torch.Tensor) -> None:
        """Raise (before any write) if ``loss``'s graph would update a parameter outside the active group:
        the forward ran while another group (or every parameter) was trainable."""
        root = getattr(loss, "grad_fn", None)
        if root is None:
            return
        active = self.active
        fused = (FusedLinearFunction._backward_cls, FusedEmbeddingFunction._backward_cls)
        seen, stack = {root}, [root]
        while stack:
            node = stack.pop()
            if isinstance(node, fused):
                site = getattr(node, "site", None)
                group = self._group_of.get(id(site.param)) if site is not None else None
                if group is not None and group != active:
                    self._wrong_group(site.name, group)
            for child, _ in node.next_functions:
                if child is None or child in seen:
                    continue
                variable = getattr(child, "variable", None)
                if variable is not None:
                    group = self._group_of.get(id(variable))
                    if group is not None and group != active:
                        self._wrong_group(self.optimizer._name(variable), group)
                    continue
                seen.add(child)
                stack.append(child)

    def _wrong_group(self, name: str, group: int):
        raise RuntimeError(f"HiFT: this loss's graph would update {name!r} of group {self.groups[group].label!r}, but "
                           f"the active group is {self.active_group.label!r}: the forward ran before the group was "
                           "activated (forward before creating HiFT, or requires_grad changed by hand). No weight "
                           "was changed.")

    def grad_norm(self, loss: torch.Tensor) -> float:
        """The wrapped optimizer's norm phase over the active group (lomo-optim's protocol)."""
        self._check_closed()
        self._check_graph(loss)
        return self.optimizer.grad_norm(loss)

    def fused_backward(self, loss: torch.Tensor, lr: float | None = None) -> None:
        """Update the active group (the wrapped optimizer's ``fused_backward``, backward truncated below
        the group), move its state to the host, then activate and prefetch the next group."""
        self._check_closed()
        self._check_graph(loss)
        opt, index = self.optimizer, self.active
        self.store.ready()
        total = opt.step_count
        opt.step_count = self.group_steps[index]
        try:
            opt.fused_backward(loss, lr)
        finally:
            applied = opt.step_count - self.group_steps[index]
            self.group_steps[index] = opt.step_count
            opt.step_count = total + applied
        self.step_count += 1
        self.store.to_host(self.groups[index].names)
        self._advance()
        self._activate(self.active)

    def step(self, closure=None):
        """No-op (the update happened in ``fused_backward``); for Trainer / scheduler code."""
        return closure() if closure is not None else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """No-op: no gradients are kept."""

    def wrap_scheduler(self, scheduler) -> "CycleScheduler":
        """A scheduler whose ``step()`` advances ``scheduler`` to ``schedule_step`` (per_cycle: once per cycle)."""
        return CycleScheduler(scheduler, self)

    def close(self) -> None:
        """Close the wrapped optimizer (the model is the plain model again) and make every parameter HiFT
        froze trainable again. Idempotent."""
        if not self.closed:
            self.store.synchronize()
        self._restore()
        self.optimizer.close()
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"lomo_kernels.HiFT({self.optimizer!r}, group_size={self.group_size}, strategy={self.strategy!r}, "
                f"{len(self.groups)} groups)")

    def __getattr__(self, name):
        # lr, loss_scale, last_grad_norm, skipped_step(s), checks_overflow, model, held, ...: the wrapped one's
        if name.startswith("__") or "optimizer" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["optimizer"], name)

    # --- memory ------------------------------------------------------------------------------------

    def device_state_bytes(self) -> int:
        """Bytes of the wrapped optimizer's state currently off the host (on the accelerator)."""
        return self.store.device_bytes()

    # --- checkpoints -------------------------------------------------------------------------------

    def _hift_state(self) -> dict:
        return {"group_size": self.group_size, "strategy": self.strategy, "seed": self.seed,
                "lr_schedule": self.lr_schedule, "groups": [list(g.names) for g in self.groups],
                "step": self.step_count, "cycle": self.cycle, "position": self.position,
                "permutation": list(self.order), "group_steps": list(self.group_steps),
                "lr_step_due": self.lr_step_due}

    def state_dict(self) -> dict:
        """The wrapped optimizer's ``state_dict`` (every group's state, name-keyed) and HiFT's position:
        cycle, position in it, this cycle's permutation, per-group step counts."""
        self.store.synchronize()
        return {"format": HIFT_FORMAT, "hift": self._hift_state(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or state_dict.get("format") != HIFT_FORMAT or "hift" not in state_dict:
            raise ValueError("not a lomo_kernels HiFT checkpoint (missing 'hift' or unknown 'format')")
        saved = state_dict["hift"]
        for key in ("group_size", "strategy", "seed", "lr_schedule"):
            if saved[key] != getattr(self, key):
                raise ValueError(f"checkpoint's HiFT {key} is {saved[key]!r}, this HiFT's {getattr(self, key)!r}")
        if [list(g.names) for g in self.groups] != [list(g) for g in saved["groups"]]:
            raise ValueError("checkpoint's HiFT groups differ from this model's (another model or trainable set)")
        order = self._order_for(int(saved["cycle"]))
        if list(saved["permutation"]) != order:
            raise ValueError(f"checkpoint's permutation {saved['permutation']} is not this HiFT's for cycle "
                             f"{saved['cycle']} ({order})")
        self.store.synchronize()
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.step_count, self.cycle, self.position = int(saved["step"]), int(saved["cycle"]), int(saved["position"])
        self.order = order
        self.group_steps = [int(s) for s in saved["group_steps"]]
        self.lr_step_due = bool(saved["lr_step_due"])
        # the loaded tensors may sit anywhere (a lazily created state comes back on the device): re-place
        self.store.on_host.clear()
        for i, group in enumerate(self.groups):
            if i != self.active:
                self.store.to_host(group.names)
        self._activate(self.active)


class CycleScheduler:
    """Wraps a torch LR scheduler so that ``step()`` advances it only as far as ``hift.schedule_step``
    (once per cycle with ``lr_schedule="per_cycle"``). Everything else is the wrapped scheduler's."""

    def __init__(self, scheduler, hift: HiFT):
        self.scheduler = scheduler
        self.hift = hift
        self._stepped = 0

    def step(self, *args, **kwargs) -> None:
        while self._stepped < self.hift.schedule_step:
            self.scheduler.step(*args, **kwargs)
            self._stepped += 1

    def state_dict(self) -> dict:
        return {"scheduler": self.scheduler.state_dict(), "stepped": self._stepped}

    def load_state_dict(self, state: dict) -> None:
        if "scheduler" in state and "stepped" in state:
            self.scheduler.load_state_dict(state["scheduler"])
            self._stepped = int(state["stepped"])
        else:
            self.scheduler.load_state_dict(state)
            self._stepped = self.hift.schedule_step

    def __getattr__(self, name):
        if name.startswith("__") or "scheduler" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["scheduler"], name)
