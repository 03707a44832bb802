"""One training step per method, shared by the memory planner (fake tensors) and the benchmarks (real ones).

    none              forward + backward, gradients kept then dropped: the floor every method pays
    sgd               torch.optim.SGD (no momentum)
    torch-adamw       torch.optim.AdamW (``fused=True``)
    adamw             lomo_kernels.AdamW (fused into the backward: m and v are the only weight-sized state)
    lomo-optim        lomo_optim.Lomo 0.1.1, the reference implementation (hooks, full gradients)
    lomo              lomo_kernels.Lomo (fused: no weight gradient is ever built)
    adalomo           lomo_kernels.AdaLomo
    apollo            lomo_kernels.Apollo (rank ``apollo_rank``, default 256, channel scale)
    apollo-mini       lomo_kernels.ApolloMini (rank 1, tensor scale, scale 128; another ``apollo_rank`` is refused)
    apollo-torch      apollo-torch 1.0.3 ``APOLLOAdamW`` the layer-wise way of its README: one optimizer per
                      parameter, stepped in a post-accumulate-grad hook (so each weight's full gradient
                      exists until its own hook has run); attention/MLP linear weights projected at rank
                      ``apollo_rank`` (default 256), every other parameter plain AdamW
    hift-adamw        lomo_kernels.HiFT(lomo_kernels.AdamW(...)), ``hift_group_size`` layers per group
    hift-torch-adamw  HiFT the reference way: torch.optim.AdamW on the active group from its full gradients;
                      the other groups frozen, their optimizer state (and fp32 masters) on the host
    lora              peft LoRA (rank ``lora_rank``, default 8, alpha = 2·rank, ``target_modules="all-linear"``:
                      every linear layer of attention and MLP, not the LM head), base frozen,
                      torch.optim.AdamW on the adapters

``METHODS`` are the baseline methods that run on any model with their defaults (the step benchmark runs
them all); ``ALL_METHODS`` adds the ones that need more (a rank not above the smallest weight dimension,
decoder layers to group, peft / apollo-torch installed). ``FUSED_METHODS`` update inside backward.

For ``sgd``/``torch-adamw`` (and ``hift-torch-adamw``) on fp16/bf16 weights the step is standard mixed
precision: fp32 master weights hold the optimizer's view, each half-precision gradient is upcast one
parameter at a time, and the result is copied back (the setting of the LOMO paper's AdamW/SGD figures).
``apollo-torch`` steps 16-bit weights directly (its layer-wise examples train in bf16); LoRA adapters are
fp32 (peft's ``autocast_adapter_dtype``), so torch AdamW steps them directly. Norm clipping (``clip``) is
``clip_grad_norm_`` for the torch optimizers and the two-pass ``grad_norm`` protocol for the fused ones;
``apollo-torch`` cannot clip (each parameter steps before the others' gradients exist).

HiFT methods: a step updates one group; ``Trainer.steps_per_cycle`` is the number of groups, and the
planner measures the peak over a whole cycle (the worst group). Inactive groups' optimizer state is
moved to the host (``offload="always"``, so the copies happen on CPU too); allocations the move makes on
the host are tracked in the tracker's ``host`` tally, outside the per-GPU total. With activation
checkpointing, ``model.disable_input_require_grads()`` is called first (docs/hift.md: transformers'
checkpointing makes the embedding output require grad, which undoes HiFT's truncated backward).
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from .tracker import HOST, MemoryTracker

METHODS = ("none", "sgd", "torch-adamw", "adamw", "lomo-optim", "lomo", "adalomo")
ALL_METHODS = METHODS + ("apollo", "apollo-mini", "apollo-torch", "hift-adamw", "hift-torch-adamw", "lora")
# whose update happens inside backward (no persistent weight gradient)
FUSED_METHODS = ("lomo-optim", "lomo", "adalomo", "adamw", "apollo", "apollo-mini", "hift-adamw")
HIFT_METHODS = ("hift-adamw", "hift-torch-adamw")
# methods built on lomo_kernels' FusedOptimizer (they take its keywords: backend, fused_cross_entropy)
OURS = ("lomo", "adalomo", "adamw", "apollo", "apollo-mini", "hift-adamw")
# the package a method needs beyond this one, and the pip requirement to name when it is missing
REQUIRES = {"lomo-optim": ("lomo_optim", "lomo-optim==0.1.1"), "apollo-torch": ("apollo_torch", "apollo-torch==1.0.3"),
            "lora": ("peft", "peft")}
DEFAULT_APOLLO_RANK = {"apollo": 256, "apollo-mini": 1, "apollo-torch": 256}
DEFAULT_LORA_RANK = 8


def missing_requirement(method: str) -> str | None:
    """``None`` when ``method`` can run here, else the pip requirement it needs."""
    need = REQUIRES.get(method)
    if need is None:
        return None
    try:
        __import__(need[0])
    except ImportError:
        return need[1]
    return None


_OPTIMIZER_CLASS = {"lomo": "Lomo", "adalomo": "AdaLomo", "adamw": "AdamW", "apollo": "Apollo",
                    "apollo-mini": "ApolloMini", "hift-adamw": "AdamW"}


def fused_cross_entropy_supported(method: str = "lomo") -> bool:
    """Whether ``method``'s lomo_kernels optimizer takes ``fused_cross_entropy=`` (the loss without logits)."""
    import lomo_kernels
    name = _OPTIMIZER_CLASS.get(method)
    if name is None:
        return False
    for cls in getattr(lomo_kernels, name).__mro__:  # through **kwargs to the class that names its keywords
        if "__init__" not in vars(cls):
            continue
        params = inspect.signature(cls.__init__).parameters
        if "fused_cross_entropy" in params:
            return True
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return False
    return False


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


def _positive_int(label: str, value, optional: bool = True):
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{label} must be a positive int, got {value!r}")
    return value


@dataclass
class StepConfig:
    method: str
    lr: float = 1e-3
    clip_grad_norm: float | None = None
    weight_decay: float = 0.0
    backend: str = "auto"  # lomo_kernels backend of the fused methods
    apollo_rank: int | None = None       # apollo / apollo-torch: 256, apollo-mini: 1
    lora_rank: int = DEFAULT_LORA_RANK
    hift_group_size: int = 1             # decoder layers per HiFT group
    fused_cross_entropy: bool | None = None  # fused methods: None = the optimizer's default

    def __post_init__(self):
        if self.method not in ALL_METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {ALL_METHODS}")
        _positive_int("apollo_rank", self.apollo_rank)
        _positive_int("lora_rank", self.lora_rank, optional=False)
        _positive_int("hift_group_size", self.hift_group_size, optional=False)
        if self.fused_cross_entropy is not None and not isinstance(self.fused_cross_entropy, bool):
            raise ValueError(f"fused_cross_entropy must be None, True or False, got {self.fused_cross_entropy!r}")
        if self.fused_cross_entropy and self.method not in OURS:
            raise ValueError(f"fused_cross_entropy=True needs one of lomo_kernels' fused optimizers {OURS}; "
                             f"method {self.method!r} computes its loss from the logits")
        if self.method == "apollo-torch" and self.clip_grad_norm is not None:
            raise ValueError("apollo-torch layer-wise steps each parameter in its own gradient hook, before the "
                             "other gradients exist: it cannot clip by the global norm (clip_grad_norm must be None)")

    @property
    def rank(self) -> int | None:
        """The APOLLO rank this method uses (its default when ``apollo_rank`` is None)."""
        if self.method not in DEFAULT_APOLLO_RANK:
            return None
        return self.apollo_rank or DEFAULT_APOLLO_RANK[self.method]


@contextlib.contextmanager
def _fake_safe_module_to():
    """``nn.Module.to()`` / ``_apply`` on fake parameters: torch swaps the parameter objects
    (``torch.utils.swap_tensors``), which refuses tensors with a weak reference, and FakeTensorMode keeps one
    to every fake tensor. For fake tensors only, fall back to ``.data`` assignment (what ``_apply`` does for
    real ones); real tensors are untouched."""
    from torch._subclasses.fake_tensor import FakeTensor
    original = torch.utils.swap_tensors

    def swap(t1, t2):
        if isinstance(t1, FakeTensor) and isinstance(t2, FakeTensor):
            with torch.no_grad():
                t1.data = t2.data
            return None
        return original(t1, t2)

    torch.utils.swap_tensors = swap
    try:
        yield
    finally:
        torch.utils.swap_tensors = original


class LayerwiseApollo:
    """apollo-torch's layer-wise recipe: an ``APOLLOAdamW`` per parameter, stepped (then its gradient
    dropped) in a post-accumulate-grad hook. Projected: the 2-D weights of the linear layers that are not
    the LM head or an embedding (lomo_kernels.Apollo's default split)."""

    def __init__(self, model: nn.Module, cfg: StepConfig):
        from apollo_torch import APOLLOAdamW

        from ..optim.apollo import _default_projected
        projected = set(_default_projected(model))
        rank = cfg.rank
        for name, p in model.named_parameters():
            if name in projected and rank > min(p.shape):
                raise ValueError(f"apollo_rank must be <= min(m, n) of every projected weight; {name!r} has shape "
                                 f"{tuple(p.shape)}, apollo_rank is {rank}")
        self.optimizers = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            group = {"params": [p]}
            if name in projected:
                group.update(rank=rank, proj="random", update_proj_gap=200, scale=1.0, proj_type="std",
                             scale_type="channel")
            self.optimizers[p] = APOLLOAdamW([group], lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.hooks = [p.register_post_accumulate_grad_hook(self._hook) for p in self.optimizers]

    def _hook(self, param):
        if param.grad is None:
            return
        opt = self.optimizers[param]
        opt.step()
        opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        """Nothing left to do: every parameter stepped in its hook."""

    def state_tensors(self):
        for opt in self.optimizers.values():
            for state in opt.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor):
                        yield value
                    projector = getattr(value, "ortho_matrix", None)  # apollo-torch's GradientProjector
                    if isinstance(projector, torch.Tensor):
                        yield projector

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def _to_host(tensor: torch.Tensor, tracker: MemoryTracker | None) -> None:
    """Move ``tensor``'s data to a host copy, keeping the tensor object (its ``.data`` is swapped)."""
    with tracker.phase(HOST) if tracker is not None else contextlib.nullcontext():
        host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
        host.copy_(tensor.data)
    tensor.data = host


def _to_device(tensor: torch.Tensor, device: torch.device) -> None:
    tensor.data = tensor.data.to(device, copy=True)


class ReferenceHiFT:
    """HiFT the reference way (misonsky/HiFT's trainer): the active group of layers trains with
    ``torch.optim.AdamW`` from its full gradients (fp32 masters for 16-bit weights), every other group is
    frozen and its optimizer state (and masters) lives on the host; after a step the state goes to the
    host and the next group's comes back. Groups and order: ``lomo_kernels.optim.hift.hift_groups``, down2up."""

    def __init__(self, model: nn.Module, make_optimizer, group_size: int, tracker: MemoryTracker | None):
        from ..optim.hift import hift_groups
        self.tracker = tracker
        self.groups = hift_groups(model, group_size)
        params = dict(model.named_parameters())
        self.group_params = [[params[n] for n in g.names] for g in self.groups]
        self.device = next(iter(params.values())).device
        self.optimizers = [make_optimizer(ps) for ps in self.group_params]
        self.active = 0
        for i in range(1, len(self.groups)):
            self._move(i, to_host=True)
        self._activate()

    def _state(self, i):
        opt = self.optimizers[i]
        return list(opt.state_tensors()) if isinstance(opt, MasterWeights) else list(_state_of(opt))

    def _move(self, i: int, to_host: bool) -> None:
        for t in self._state(i):
            if to_host:
                _to_host(t, self.tracker)
            else:
                _to_device(t, self.device)

    def _activate(self) -> None:
        for i, ps in enumerate(self.group_params):
            for p in ps:
                p.requires_grad_(i == self.active)

    def step(self) -> None:
        self.optimizers[self.active].step()
        for p in self.group_params[self.active]:
            p.grad = None
        self._move(self.active, to_host=True)
        self.active = (self.active + 1) % len(self.groups)
        self._activate()
        self._move(self.active, to_host=False)

    def state_tensors(self):
        return self._state(self.active)

    def close(self) -> None:
        for ps in self.group_params:
            for p in ps:
                p.requires_grad_(True)


class Trainer:
    """Builds ``cfg.method``'s optimizer for ``model`` and runs training steps on it.

    With a ``tracker``, new tensors are counted as activations during forward and as provisional
    temporaries during backward/update; gradients and optimizer state are marked as they appear.
    ``self.model`` is the model to call (for ``lora``: the peft model wrapping ``model``).
    """

    def __init__(self, model: nn.Module, cfg: StepConfig, tracker: MemoryTracker | None = None):
        if cfg.method not in ALL_METHODS:
            raise ValueError(f"unknown method {cfg.method!r}; choose one of {ALL_METHODS}")
        missing = missing_requirement(cfg.method)
        if missing is not None:
            raise ValueError(f"method {cfg.method!r} needs the {missing.split('=')[0]} package (pip install {missing})")
        self.model, self.cfg, self.tracker = model, cfg, tracker
        if cfg.method == "lora":
            self.model = self._wrap_lora(model)
        if cfg.method in HIFT_METHODS and getattr(self.model, "_require_grads_hooks", None):
            self.model.disable_input_require_grads()  # keep HiFT's truncated backward with checkpointing
        params = [p for p in self.model.parameters() if p.requires_grad]
        if tracker is not None:
            tracker.adopt(self.model.parameters(), "params")  # frozen ones (LoRA's base, HiFT) included
            tracker.adopt(self.model.buffers(), "other")
            # registered before the optimizer's own hooks, so they see each gradient before it is consumed
            self._grad_hooks = tracker.watch_grads(params)
        with self._phase("optimizer_state"):
            self.optimizer = self._build(params)
        self._mark_state()

    @property
    def steps_per_cycle(self) -> int:
        """Steps after which every parameter was updated once (HiFT: the number of groups)."""
        if self.cfg.method == "hift-adamw":
            return self.optimizer.num_groups
        if self.cfg.method == "hift-torch-adamw":
            return len(self.optimizer.groups)
        return 1

    def _phase(self, category: str, provisional: bool = False):
        return self.tracker.phase(category, provisional) if self.tracker is not None else contextlib.nullcontext()

    def _wrap_lora(self, model: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model
        config = LoraConfig(r=self.cfg.lora_rank, lora_alpha=2 * self.cfg.lora_rank, target_modules="all-linear",
                            lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
        with self._phase("params"), _fake_safe_module_to():
            return get_peft_model(model, config)

    def _torch_optimizer(self, name: str):
        cfg = self.cfg

        def make(ps):
            if name == "sgd":
                return torch.optim.SGD(ps, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)
            # fused: one kernel per parameter, and no host read of the step count (none exists under fake tensors)
            return torch.optim.AdamW(ps, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)

        def build(ps):
            ps = [p for p in ps if p.requires_grad]
            if ps and ps[0].dtype in (torch.float16, torch.bfloat16):
                return MasterWeights(ps, make)
            return make(ps)
        return build

    def _fused_kwargs(self) -> dict:
        cfg = self.cfg
        kwargs = dict(lr=cfg.lr, clip_grad_norm=cfg.clip_grad_norm, weight_decay=cfg.weight_decay,
                      backend=cfg.backend)
        if cfg.fused_cross_entropy is not None:
            if fused_cross_entropy_supported(cfg.method):
                kwargs["fused_cross_entropy"] = cfg.fused_cross_entropy
            elif cfg.fused_cross_entropy:
                raise ValueError(f"fused_cross_entropy=True: lomo_kernels.{_OPTIMIZER_CLASS[cfg.method]} does not "
                                 "take the fused_cross_entropy keyword yet (its loss is computed from the logits)")
        return kwargs

    def _build(self, params):
        cfg = self.cfg
        if cfg.method == "none":
            return None
        if cfg.method in ("sgd", "torch-adamw", "lora"):
            return self._torch_optimizer("sgd" if cfg.method == "sgd" else "adamw")(params)
        if cfg.method == "hift-torch-adamw":
            return ReferenceHiFT(self.model, self._torch_optimizer("adamw"), cfg.hift_group_size, self.tracker)
        if cfg.method == "lomo-optim":
            from lomo_optim import Lomo as ReferenceLomo
            return ReferenceLomo(self.model, lr=cfg.lr, clip_grad_norm=cfg.clip_grad_norm,
                                 weight_decay=cfg.weight_decay)
        if cfg.method == "apollo-torch":
            return LayerwiseApollo(self.model, cfg)
        import lomo_kernels
        kwargs = self._fused_kwargs()
        if cfg.method == "lomo":
            return lomo_kernels.Lomo(self.model, **kwargs)
        if cfg.method == "adalomo":
            return lomo_kernels.AdaLomo(self.model, **kwargs)
        if cfg.method == "adamw":
            return lomo_kernels.AdamW(self.model, **kwargs)
        if cfg.method == "apollo":
            return lomo_kernels.Apollo(self.model, rank=cfg.rank, **kwargs)
        if cfg.method == "apollo-mini":
            return lomo_kernels.ApolloMini(self.model, rank=cfg.rank, **kwargs)
        # hift-adamw: allocations of the state's moves to the host are host memory
        inner = lomo_kernels.AdamW(self.model, **kwargs)
        try:
            with self._phase(HOST):  # the host copies; the active group's device copy is re-marked after
                hift = lomo_kernels.HiFT(inner, group_size=cfg.hift_group_size, offload="always")
        except ValueError as exc:
            inner.close()
            raise ValueError(f"hift_group_size: {exc}") from None
        to_host = hift.store.to_host

        def to_host_tracked(names):
            with self._phase(HOST):
                to_host(names)
        hift.store.to_host = to_host_tracked
        return hift

    def state_tensors(self):
        opt, method = self.optimizer, self.cfg.method
        if opt is None or method in ("lomo-optim", "lomo"):
            return []
        if method == "adalomo":
            return [t for d in (opt.exp_avg_sq, opt.exp_avg_sq_row, opt.exp_avg_sq_col) for t in d.values()]
        if method in ("adamw", "apollo", "apollo-mini"):
            return _fused_adam_state(opt)
        if method == "hift-adamw":
            store = opt.store
            return [t for key, t in store._tensors_all() if key not in store.on_host]
        if isinstance(opt, (MasterWeights, LayerwiseApollo, ReferenceHiFT)):
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
        if self.cfg.method in OURS or self.cfg.method in ("apollo-torch", "hift-torch-adamw"):
            self.optimizer.close()


def _fused_adam_state(opt) -> list[torch.Tensor]:
    """lomo_kernels.AdamW's moments, and Apollo's rank-sized moments and projections."""
    out = [t for d in (opt.exp_avg, opt.exp_avg_sq) for t in d.values()]
    for st in getattr(opt, "projectors", {}).values():
        out += [st.exp_avg, st.exp_avg_sq] + ([st.projector] if st.projector is not None else [])
    return out
