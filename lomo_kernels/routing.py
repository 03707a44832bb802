"""Route a model's weight *uses* through fused updates, whoever makes the call: ``hold(model, owner)``.

A fused optimizer *holds* the weights of the model's ``nn.Linear``, Hugging Face ``Conv1D`` and
``nn.Embedding`` modules (subclasses included). No module's ``forward`` is replaced. Instead every torch
call that receives a held weight is routed, by one of two means:

* a plain ``nn.Parameter`` becomes a ``HeldParameter`` while held (its class changes, the object and its
  data stay): its ``__torch_function__`` sees every call it is passed to, anywhere, and only those calls
  pay (a few µs each);
* parameters that cannot change class (the planner's ``FakeTensor`` ones) get a ``TorchFunctionMode``
  (``Router``), active while a held model (or a module owning a held weight) runs its forward and during
  the optimizer's own backward (where gradient checkpointing recomputes forwards); every call pays.

Routing:

* ``F.linear(x, W, b)``, ``torch.addmm(b, x, W)`` (GPT-2's ``Conv1D``) -> ``FusedLinearFunction``;
* ``F.embedding(idx, W, padding_idx)`` -> ``FusedEmbeddingFunction``;
* any other differentiable use of a held weight inside a held forward (``x @ w.t()``, ``w.sum()``, an op
  the router does not know) raises ``UnfusedUseError`` naming the parameter and the op, before any
  weight changes. A differentiable use outside every held forward (a regularizer in the training loop,
  a graph built before the hold) is the caller's tensor; if it reaches the loss, ``check_graph`` refuses
  it before the backward starts. Calls without autograd (``torch.no_grad``, generation,
  ``state_dict``) pass through untouched, so a held model's forward is bitwise the plain model's.

A weight used once in a step is updated in its use's backward, right after that use's input gradient
(computed with the old weight). A weight used k > 1 times (tied embedding / LM head, a module called
twice, a raw ``F.linear`` beside its module) keeps each use's ``(x, dy)`` (token-sized) until the last
use's backward, then gets one fused update from the concatenated tokens: every use's input gradient
saw the pre-step weight, and weight decay, value clipping, the norm phase and AdaLomo's statistics see
the summed gradient. An embedding use joins a linear one as ``G = one_hot(idx)ᵀ·dy``. No weight-sized
buffer exists. Uses are counted in the forward (recomputation inside a backward is not a new use);
uses whose backward never runs are flushed when the owner's backward pass ends.

Every other trainable parameter (norms, biases, raw ``nn.Parameter`` tensors, and the weights named in
the optimizer's ``unfused=[...]``, e.g. an embedding a model also indexes directly) is *dense*: autograd
sums its uses, and a post-accumulate-grad hook applies the rule and frees the gradient at once.

The hold keeps only a weak reference to its owner: when the optimizer is closed or garbage-collected
the model is the plain model again. Any backward over a held model outside the owner's
``fused_backward``/``grad_norm`` raises before any weight changes.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .autograd import FusedEmbeddingFunction, FusedLinearFunction
from .fused_cross_entropy import FusedLinearCrossEntropy

try:  # transformers is optional at import time
    from transformers.pytorch_utils import Conv1D as _HFConv1D
except Exception:  # pragma: no cover - transformers missing or broken
    _HFConv1D = None


class UnfusedUseError(RuntimeError):
    """A held weight was used by an op that cannot be fused (raised before any weight changes).
    ``parameter`` is its name, ``op`` the op's."""

    def __init__(self, message: str, parameter: str, op: str | None = None):
        super().__init__(message)
        self.parameter, self.op = parameter, op


class Updater(Protocol):
    """What a hold sends each held weight's (summed) gradient to: the optimizer's rule, or a wrapper."""

    def linear(self, param: torch.Tensor, x: torch.Tensor, dy: torch.Tensor) -> None:
        """Update ``param`` [out, in] from ``G = dyᵀ x`` (x [T, in], dy [T, out]), or add to its norm."""

    def embedding(self, param: torch.Tensor, indices: torch.Tensor, dy: torch.Tensor,
                  padding_idx: int | None) -> None:
        """Update the rows of ``param`` that ``indices`` touch (or add their gradient's norm)."""

    def dense(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        """Update ``param`` from a materialized gradient of its own (small) size (or add its norm)."""

    # Optional: ``linear_with_rows(param, x, dy, indices, rows) -> bool`` applies G = dyᵀx plus the
    # embedding rows (a tied weight's two kinds of use) as one step, or returns False to get them as one
    # ``linear`` call with the rows as a one-hot GEMM.
    # Optional: ``lm_head_updater(param)`` -> an ``LMHeadUpdater`` (lomo_kernels.fused_cross_entropy) that
    # takes the weight's gradient from the fused loss chunk by chunk, or None; without one a held model
    # computes its loss the ordinary way (logits).


def lm_head_updater(updater: Updater, param: torch.Tensor):
    """``updater``'s LM-head adapter for ``param``, or None when it has none (see ``Updater``)."""
    make = getattr(updater, "lm_head_updater", None)
    return make(param) if make is not None else None


class Owner(Protocol):
    """The fused optimizer a hold belongs to."""
    updater: Updater            # where gradients go (the optimizer itself, or e.g. the ZeRO-3 wrapper)
    in_fused_backward: bool     # True while its own backward pass runs


def _not_in_backward() -> bool:
    return torch._C._current_graph_task_id() == -1


def _name_of(func) -> str:
    """``Tensor.t``, ``Tensor.T`` (a property), ``torch.matmul``: how the user wrote the op."""
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    if name.endswith("__get__") and hasattr(getattr(func, "__self__", None), "__name__"):
        return f"Tensor.{func.__self__.__name__}"
    if name.startswith("TensorBase."):
        return "Tensor." + name[len("TensorBase."):]
    module = getattr(func, "__module__", None)
    return f"{module}.{name}" if module and "." not in name else name


_LATE_USE = ("parameter {name!r} is used again after its update in this backward pass: its uses were not all "
             "seen in the forward (reentrant gradient checkpointing of a weight shared between checkpointed "
             "segments); use use_reentrant=False. Weights updated earlier in this backward keep their update.")


class WeightSite:
    """One held weight: counts its uses in the forward and turns their backwards into one update."""

    def __init__(self, name: str, param: nn.Parameter, hold: "Hold"):
        self.name, self.param, self.hold = name, param, hold
        self.forward_uses = 0   # routed uses recorded since the last applying backward
        self.pending: list[tuple] = []   # contributions of uses whose backward already ran
        self.updated = False    # updated in the backward now running

    def note_use(self) -> None:
        if _not_in_backward():
            self.forward_uses += 1
        elif self.updated:  # a recomputation (gradient checkpointing) would read the updated weight
            raise RuntimeError(_LATE_USE.format(name=self.name))

    def loss_use(self) -> "LossUse":
        """A use by the fused linear cross-entropy (the weight is an LM head): counted like any other; the
        returned object is the loss's updater."""
        self.note_use()
        return LossUse(self)

    # contributions: ("linear", x, dy) with G = dyᵀ x; ("embedding", indices, dy, padding_idx);
    # ("lm_head", record): a fused loss use whose update waits for the others (DeferredLMHead)
    def linear_done(self, x: torch.Tensor, dy: torch.Tensor) -> None:
        self._done(("linear", x, dy))

    def embedding_done(self, indices: torch.Tensor, dy: torch.Tensor, padding_idx: int | None) -> None:
        self._done(("embedding", indices, dy, padding_idx))

    def _done(self, contribution: tuple) -> None:
        updater = self.hold.updater_in_backward(self.name)
        if self.updated:
            raise RuntimeError(_LATE_USE.format(name=self.name))
        self.pending.append(contribution)
        if len(self.pending) >= self.forward_uses:
            self.flush(updater)

    def flush(self, updater: Updater) -> None:
        parts, self.pending = self.pending, []
        if not parts:
            return
        self.updated = True
        with torch._C.DisableTorchFunctionSubclass():  # the updater's ops on a HeldParameter: no routing
            _apply(updater, self.param, parts, self.name)


class LossUse:
    """The ``LMHeadUpdater`` a held weight's fused-loss use hands its gradient to. The only use in the step:
    the chunks go straight to the owner's LM-head adapter during the loss's backward (no extra GEMM).
    One of several (a tied embedding): the loss's backward leaves a token-sized record, and the site's
    last use applies the summed gradient once (``DeferredLMHead.apply``, with the other uses' tokens)."""

    def __init__(self, site: WeightSite):
        self.site, self.head = site, None

    def defer(self, weight) -> bool:
        return self.site.forward_uses > 1

    def keep(self, weight, record) -> None:
        self.site._done(("lm_head", record))

    def passes(self, weight):
        site = self.site
        updater = site.hold.updater_in_backward(site.name)
        if site.updated:
            raise RuntimeError(_LATE_USE.format(name=site.name))
        self.head = _lm_head_or_raise(updater, weight, site.name)
        site.updated = True
        return self.head.passes(weight)

    def chunk(self, pass_name, weight, v0, v1, x, dy):
        self.head.chunk(pass_name, weight, v0, v1, x, dy)

    def end_pass(self, pass_name, weight):
        self.head.end_pass(pass_name, weight)


def _lm_head_or_raise(updater: Updater, param: torch.Tensor, name: str):
    head = lm_head_updater(updater, param)
    if head is None:
        raise RuntimeError(f"parameter {name!r}: {type(updater).__name__} cannot take an LM-head gradient from the "
                           "fused cross-entropy (no lm_head_updater)")
    return head


def _apply(updater: Updater, param: torch.Tensor, parts: list[tuple], name: str) -> None:
    """Send the sum of the uses' gradients to ``updater`` as one call."""
    records = [args[0] for kind, *args in parts if kind == "lm_head"]
    if records:
        if len(records) > 1:
            raise RuntimeError(f"parameter {name!r} is the LM head of {len(records)} fused losses in one backward (the "
                               "model was called with labels more than once before fused_backward); the fused "
                               "cross-entropy takes one per step. Nothing was changed. Call fused_backward per "
                               "forward, or construct the optimizer with fused_cross_entropy=False to accumulate "
                               "losses from logits")
        linear = [tuple(args) for kind, *args in parts if kind == "linear"]
        embedding = [tuple(args) for kind, *args in parts if kind == "embedding"]
        records[0].apply(param, _lm_head_or_raise(updater, param, name), linear=linear, embedding=embedding)
        return
    if len(parts) == 1:
        kind, *args = parts[0]
        (updater.linear if kind == "linear" else updater.embedding)(param, *args)
        return
    if all(kind == "embedding" for kind, *_ in parts):
        idx, rows = zip(*(_embedding_rows(*args) for _, *args in parts))
        updater.embedding(param, torch.cat(idx), torch.cat(rows), None)
        return
    linear = [args for kind, *args in parts if kind == "linear"]
    rows = [_embedding_rows(*args) for kind, *args in parts if kind == "embedding"]
    x, dy = _cat_promoted([x for x, _ in linear]), _cat_promoted([dy for _, dy in linear])
    if rows:
        idx, dy_rows = torch.cat([i for i, _ in rows]), torch.cat([r for _, r in rows])
        # An updater may take the embedding rows beside the linear tokens directly (cheaper: see Lomo).
        joint = getattr(updater, "linear_with_rows", None)
        if joint is not None and joint(param, x, dy, idx, dy_rows):
            return
        # else G_emb = one_hot(idx)ᵀ · dy: the embedding use in the linear form (token × vocab, like logits)
        x = _cat_promoted([x, dy_rows])
        dy = _cat_promoted([dy, F.one_hot(idx, param.shape[0]).to(dy_rows.dtype)])
    updater.linear(param, x, dy)


def _cat_promoted(tensors: list[torch.Tensor]) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0]
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.cat([t.to(dtype) for t in tensors])


def _embedding_rows(indices, dy, padding_idx):
    idx, rows = indices.reshape(-1), dy.reshape(-1, dy.shape[-1])
    if padding_idx is not None:
        keep = idx != padding_idx
        idx, rows = idx[keep], rows[keep]
    return idx, rows


# --- the router ------------------------------------------------------------------------------------

def _arg(args, kwargs, index, name, default=None):
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def route(site: WeightSite, func, args, kwargs):
    """One torch call with a held weight among its arguments (see the module doc), made with routing off."""
    if func is F.linear and _arg(args, kwargs, 1, "weight") is site.param:
        return _linear(site, args, kwargs)
    if func is F.embedding and _arg(args, kwargs, 1, "weight") is site.param:
        return _embedding(site, args, kwargs)
    if func is torch.addmm and _arg(args, kwargs, 2, "mat2") is site.param \
            and _arg(args, kwargs, 3, "beta", 1) == 1 and _arg(args, kwargs, 4, "alpha", 1) == 1:
        return _addmm(site, args, kwargs)
    out = func(*args, **kwargs)
    # Inside a held model's forward an unfusable use is an error; outside (logging, comparisons) it is the
    # caller's own tensor, and check_graph refuses it before a backward if it reaches the loss.
    if site.hold.forward_depth and torch.is_grad_enabled() and site.param.requires_grad \
            and _differentiable(site.hold, out):
        raise UnfusedUseError(
            f"parameter {site.name!r} is held by a fused optimizer, but `{_name_of(func)}` uses it, which "
            "cannot be fused (only F.linear, F.embedding and Conv1D's addmm can): its gradient would be "
            "built and then lost. No weight was changed. Pass its name in the optimizer's "
            f"unfused=[{site.name!r}] (it is then updated from its own gradient, materialized one "
            "parameter at a time), freeze it, or rewrite the use as F.linear/F.embedding.",
            site.name, _name_of(func))
    return out


def _differentiable(hold: "Hold", out) -> bool:
    if isinstance(out, torch.Tensor):
        return out.requires_grad and hold.sites.get(id(out)) is None  # `w.to(w.dtype)` is w itself
    if isinstance(out, (list, tuple)):
        return any(_differentiable(hold, o) for o in out)
    return False


def _linear(site, args, kwargs):
    x, weight, bias = _arg(args, kwargs, 0, "input"), site.param, _arg(args, kwargs, 2, "bias")
    if not torch.is_grad_enabled() or not weight.requires_grad:
        return F.linear(x, weight, bias)
    if x.numel() == 0:  # no tokens, no gradient: not a use (a held model's fused loss keeps no logits this way)
        with torch.no_grad():
            return F.linear(x, weight, bias)
    site.note_use()
    out = FusedLinearFunction.apply(x, weight, bias, site, False)
    return out.view(*x.shape[:-1], weight.shape[0]) if out.dim() != x.dim() else out


def _addmm(site, args, kwargs):
    bias, x, weight = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "mat1"), site.param
    if not torch.is_grad_enabled() or not weight.requires_grad:
        return torch.addmm(bias, x, weight)
    site.note_use()
    return FusedLinearFunction.apply(x, weight, bias, site, True)


def _embedding(site, args, kwargs):
    indices, weight = _arg(args, kwargs, 0, "input"), site.param
    padding_idx = _arg(args, kwargs, 2, "padding_idx")
    if not torch.is_grad_enabled() or not weight.requires_grad:
        return F.embedding(*args, **kwargs)
    unsupported = [name for i, name in ((3, "max_norm"), (5, "scale_grad_by_freq"), (6, "sparse"))
                   if _arg(args, kwargs, i, name)]
    if unsupported:
        raise UnfusedUseError(f"parameter {site.name!r}: F.embedding with {', '.join(unsupported)} cannot be "
                              f"fused (no weight was changed); pass unfused=[{site.name!r}] to the optimizer",
                              site.name, "F.embedding")
    if padding_idx is not None and padding_idx < 0:
        padding_idx += weight.shape[0]
    site.note_use()
    out = FusedEmbeddingFunction.apply(indices, weight, padding_idx, site)
    return out.view(*indices.shape, weight.shape[1]) if out.dim() != indices.dim() + 1 else out


def _site_in(sites: dict, args, kwargs) -> WeightSite | None:
    """The site of the first held weight among a call's arguments (one level into lists), if any."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            site = sites.get(id(value))
            if site is not None and site.param is value:
                return site
        elif isinstance(value, (list, tuple)):
            for item in value:
                site = sites.get(id(item)) if isinstance(item, torch.Tensor) else None
                if site is not None and site.param is item:
                    return site
    return None


_HELD: dict[int, WeightSite] = {}  # id(param) -> site, for every weight held as a HeldParameter
BY_CLASS = True  # hold plain Parameters as HeldParameters; False: the mode for every model (tests both ways)


class HeldParameter(nn.Parameter):
    """The class a held weight takes while held (real tensors): its ``__torch_function__`` routes every
    call it is passed to, so only calls on held weights pay. Copies and pickles are plain Parameters."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            site = _site_in(_HELD, args, kwargs)
            if site is None:  # not held (any more)
                return func(*args, **kwargs)
            return route(site, func, args, kwargs)

    def __deepcopy__(self, memo):
        with torch._C.DisableTorchFunctionSubclass():
            copy = nn.Parameter(self.data.clone(memory_format=torch.preserve_format), self.requires_grad)
        memo[id(self)] = copy
        return copy


class Router(TorchFunctionMode):
    """The same routing for weights that cannot change class (the planner's ``FakeTensor`` parameters, other
    subclasses): a mode active while a held model's forward or its owner's backward runs (every torch
    call then pays)."""

    def __init__(self, hold: "Hold"):
        super().__init__()
        self.hold = hold

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        site = _site_in(self.hold.sites, args, kwargs)
        if site is None:
            return func(*args, **kwargs)
        return route(site, func, args, kwargs)


# --- the hold ----------------------------------------------------------------------------------------

def _fused_modules(model: nn.Module, unfused: frozenset = frozenset()):
    """(module name, module, kind) of the modules whose weight a fused optimizer holds (``unfused``:
    parameter names left to the dense route)."""
    names = {id(p): n for n, p in model.named_parameters()}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or not weight.requires_grad or names.get(id(weight)) in unfused:
            continue
        if isinstance(module, nn.Linear) or (_HFConv1D is not None and isinstance(module, _HFConv1D)):
            yield name, module, "linear"
        elif isinstance(module, nn.Embedding):
            unsupported = [attr for attr, bad in (("max_norm", module.max_norm is not None),
                                                  ("scale_grad_by_freq", module.scale_grad_by_freq),
                                                  ("sparse", module.sparse)) if bad]
            if unsupported:
                raise ValueError(f"embedding {name!r} uses {', '.join(unsupported)}, which fused updates do not "
                                 "support")
            yield name, module, "embedding"


class Hold:
    """What a fused optimizer holds of a model; ``release()`` gives the plain model back exactly."""

    def __init__(self, model: nn.Module, owner: Owner, unfused: frozenset = frozenset()):
        existing: Hold | None = model.__dict__.get("_lomo_hold")
        if existing is not None:
            holder = existing.owner
            if holder is not None:
                raise RuntimeError(f"model is already held by {holder!r}; call its close() (or leave its `with` "
                                   "block) before attaching another fused optimizer, or lomo_kernels.release(model) "
                                   "if it is out of reach (e.g. an optimizer passed to a HiFT(...) that raised)")
            existing.release()  # its owner is gone
        names = {id(p): n for n, p in model.named_parameters()}
        if not names or not any(p.requires_grad for p in model.parameters()):
            raise ValueError("model has no trainable parameters (every parameter has requires_grad=False)")
        self._model = weakref.ref(model)
        self._owner = weakref.ref(owner)
        self.router = Router(self)
        self.sites: dict[int, WeightSite] = {}
        self.module_uses: dict[int, int] = {}  # id(param) -> number of fused modules owning it (static ties)
        self.dense: dict[str, nn.Parameter] = {}
        self._handles: list = []
        owners = []
        for _, module, _kind in _fused_modules(model, unfused):
            weight = module.weight
            if id(weight) not in self.sites:
                self.sites[id(weight)] = WeightSite(names[id(weight)], weight, self)
                owners.append(module)
            self.module_uses[id(weight)] = self.module_uses.get(id(weight), 0) + 1
        # Plain Parameters become HeldParameters (only calls on them pay); anything else gets the mode.
        self.by_class = BY_CLASS and all(type(site.param) is nn.Parameter for site in self.sites.values())
        if self.by_class:
            for key, site in self.sites.items():
                site.param.__class__ = HeldParameter
                _HELD[key] = site
        self.forward_depth = 0  # > 0 inside a held model's forward (or a module owning a held weight)
        self._mode_depth = 0
        for module in [model, *owners]:
            self._handles.append(module.register_forward_pre_hook(self._enter))
            self._handles.append(module.register_forward_hook(self._exit, always_call=True))
        for name, param in model.named_parameters():
            if param.requires_grad and id(param) not in self.sites:
                self.dense[name] = param
                self._handles.append(param.register_post_accumulate_grad_hook(self._dense_hook(name)))
        model.__dict__["_lomo_hold"] = self

    # --- ownership -----------------------------------------------------------------------------------

    @property
    def owner(self) -> Owner | None:
        return self._owner()

    @property
    def shared_weights(self) -> list[str]:
        """Held weights owned by more than one fused module (tied embeddings / LM heads)."""
        return [site.name for key, site in self.sites.items() if self.module_uses[key] > 1]

    def release(self) -> None:
        """Remove every hook and class change; the model is the plain model again (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for key, site in self.sites.items():
            if _HELD.get(key) is site:
                del _HELD[key]
                site.param.__class__ = nn.Parameter
        self.forward_depth = 0
        while self._mode_depth:
            self.exit_mode()
        model = self._model()
        if model is not None and model.__dict__.get("_lomo_hold") is self:
            del model.__dict__["_lomo_hold"]

    # --- forward -------------------------------------------------------------------------------------

    def _enter(self, module, args):
        self.forward_depth += 1
        self.enter_mode()

    def _exit(self, module, args, output):
        if self.forward_depth:  # 0 when an earlier pre-hook raised before ours ran
            self.forward_depth -= 1
            self.exit_mode()

    def enter_mode(self) -> None:
        if not self.by_class:
            if self._mode_depth == 0:
                self.router.__enter__()
            self._mode_depth += 1

    def exit_mode(self) -> None:
        if not self.by_class and self._mode_depth:
            self._mode_depth -= 1
            if self._mode_depth == 0:
                self.router.__exit__(None, None, None)

    # --- backward ------------------------------------------------------------------------------------

    def updater_in_backward(self, name: str) -> Updater:
        """The owner's updater, or an error (before any write) when this backward is not the owner's."""
        owner = self.owner
        if owner is None:
            raise RuntimeError(f"parameter {name!r}: the fused optimizer holding this model is gone")
        if not owner.in_fused_backward:
            raise RuntimeError(f"parameter {name!r} is held by {owner!r}: run the backward with its "
                               "fused_backward(loss, lr) (a plain loss.backward() or autograd.grad cannot apply "
                               "its update). No weight was changed by this backward.")
        return owner.updater

    def end_backward(self, completed: bool) -> None:
        """After the owner's backward pass (called by the owner, not by autograd: a reentrant checkpoint's
        nested backward must not end it). A completed pass flushes the uses whose backward never ran
        (outputs that did not reach the loss); a failed one drops them."""
        owner = self.owner
        for site in self.sites.values():
            if site.pending and completed and owner is not None:
                site.flush(owner.updater)
            site.pending.clear()
            site.updated = False

    def end_step(self) -> None:
        """After a backward that consumed the graph: the next forward's uses are counted afresh."""
        for site in self.sites.values():
            site.forward_uses = 0

    def _dense_hook(self, name: str):
        def hook(param: torch.Tensor) -> None:
            updater = self.updater_in_backward(name)
            grad, param.grad = param.grad, None
            with torch.no_grad():
                updater.dense(param, grad)
        return hook

    def check_graph(self, loss: torch.Tensor) -> None:
        """Raise if a held weight reaches ``loss`` other than through a fused Function (a use the router
        never saw: e.g. ``loss + w.square().sum()`` outside the model's forward). Runs before a backward."""
        root = loss.grad_fn
        if root is None:
            return
        fused = (FusedLinearFunction._backward_cls, FusedEmbeddingFunction._backward_cls,
                 FusedLinearCrossEntropy._backward_cls)  # each takes its weight at input 1
        seen, stack = {root}, [root]
        while stack:
            node = stack.pop()
            skip_weight = isinstance(node, fused)
            for index, (child, _) in enumerate(node.next_functions):
                if child is None or child in seen:
                    continue
                variable = getattr(child, "variable", None)
                if variable is not None:
                    site = self.sites.get(id(variable))
                    if site is not None and site.param is variable and not (skip_weight and index == 1):
                        raise UnfusedUseError(
                            f"parameter {site.name!r} is held by a fused optimizer but reaches the loss through "
                            f"`{type(node).__name__}`, outside any routed F.linear/F.embedding call; its gradient "
                            f"cannot be fused. No weight was changed. Pass unfused=[{site.name!r}] to the "
                            "optimizer to update it from its own gradient.", site.name, type(node).__name__)
                    continue  # an AccumulateGrad: a leaf, and another use of it may still be checked
                seen.add(child)
                stack.append(child)

    def routing(self):
        """Context manager for the owner's backward: with the mode, calls are routed there too (gradient
        checkpointing recomputes forwards inside the backward); HeldParameters route by themselves."""
        return contextlib.nullcontext() if self.by_class else _ModeOn(self)


class _ModeOn:
    def __init__(self, hold: Hold):
        self.hold = hold

    def __enter__(self):
        self.hold.enter_mode()

    def __exit__(self, *exc):
        self.hold.exit_mode()


def hold(model: nn.Module, owner: Owner, unfused=frozenset()) -> Hold:
    """Hold ``model``'s weights for ``owner`` (a fused optimizer); see the module doc. The parameters named
    in ``unfused`` are updated from their own gradient (the dense route) even if a module would hold them."""
    return Hold(model, owner, frozenset(unfused))


def release(model: nn.Module) -> None:
    """Drop any fused optimizer's hold on ``model`` (the optimizer can no longer train it)."""
    existing: Hold | None = model.__dict__.get("_lomo_hold")
    if existing is not None:
        owner = existing.owner
        if owner is not None and hasattr(owner, "close"):
            owner.close()
        else:
            existing.release()
