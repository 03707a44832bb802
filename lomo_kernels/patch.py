"""Route a model's parameters through fused updates: ``patch(model, updater)`` / ``unpatch(model)``.

* every ``nn.Linear`` and Hugging Face ``Conv1D`` whose weight is trainable runs through
  ``FusedLinearFunction`` (weight updated in its backward, bias through ``updater.dense``);
* every ``nn.Embedding`` runs through ``FusedEmbeddingFunction`` (touched rows only);
* every other trainable parameter gets a post-accumulate-grad hook that applies ``updater.dense``
  and frees the gradient at once.

The ``updater`` (an optimizer: ``Lomo``, ``AdaLomo``) implements the three methods of ``Updater``.

Tied weights (GPT-2's wte/lm_head) are detected. When the updater's rule is linear in the gradient
(``updater.sums_contributions()``: plain SGD without value clipping, in the apply phase) and every
use but one is an embedding lookup (which never reads the weight in its backward), each use applies
its own fused update, weight decay on the first only. Otherwise (norm phase, value clipping, adaptive
rules) the uses' gradients are summed in one fp32 buffer, applied once when the backward pass ends:
the one place a weight-sized gradient exists, and only for tied weights.
"""
from __future__ import annotations

import types
from typing import Protocol

import torch
from torch import nn

from .autograd import FusedEmbeddingFunction, FusedLinearFunction

try:  # transformers is optional at import time
    from transformers.pytorch_utils import Conv1D as _HFConv1D
except Exception:  # pragma: no cover - transformers missing or broken
    _HFConv1D = None


class Updater(Protocol):
    def linear(self, param: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, *, apply_decay: bool = True) -> None:
        """Update ``param`` [out, in] from ``G = dyᵀ x`` (x [T, in], dy [T, out]) — or accumulate its norm."""

    def embedding(self, param: torch.Tensor, indices: torch.Tensor, dy: torch.Tensor, padding_idx: int | None,
                  *, apply_decay: bool = True) -> None:
        """Update the rows of ``param`` that ``indices`` touch (or accumulate their gradient's norm)."""

    def dense(self, param: torch.Tensor, grad: torch.Tensor, *, apply_decay: bool = True) -> None:
        """Update ``param`` from a materialized gradient of its own (small) size (or accumulate its norm)."""

    def sums_contributions(self) -> bool:
        """True when applying a gradient in parts equals applying its sum (linear rule, apply phase)."""


class FusedSite:
    """One trainable parameter routed through fused backward ops; handles ties between its uses."""

    def __init__(self, name: str, param: nn.Parameter, updater: Updater):
        self.name, self.param, self.updater = name, param, updater
        self.uses: list[str] = []  # "linear" / "embedding", one per module using this parameter
        self._buffer: torch.Tensor | None = None
        self._decayed = False
        self._end_queued = False

    @property
    def tied(self) -> bool:
        return len(self.uses) > 1

    def _applies_parts_directly(self) -> bool:
        return self.updater.sums_contributions() and sum(u != "embedding" for u in self.uses) <= 1

    def linear(self, weight, x, dy):
        if not self.tied:
            self.updater.linear(weight, x, dy)
        elif self._applies_parts_directly():
            self.updater.linear(weight, x, dy, apply_decay=self._take_decay())
        else:
            self._accumulate().addmm_(dy.t().to(torch.float32), x.to(torch.float32))

    def embedding(self, weight, indices, dy, padding_idx):
        if not self.tied:
            self.updater.embedding(weight, indices, dy, padding_idx)
        elif self._applies_parts_directly():
            self.updater.embedding(weight, indices, dy, padding_idx, apply_decay=self._take_decay())
        else:
            keep = indices.reshape(-1)
            rows = dy.reshape(-1, dy.shape[-1]).to(torch.float32)
            if padding_idx is not None:
                mask = keep != padding_idx
                keep, rows = keep[mask], rows[mask]
            self._accumulate().index_add_(0, keep, rows)

    def bias_grad(self, bias, grad):
        self.updater.dense(bias, grad.to(torch.float32))

    def _take_decay(self) -> bool:
        self._queue_end_of_backward()
        first, self._decayed = not self._decayed, True
        return first

    def _accumulate(self) -> torch.Tensor:
        if self._buffer is None:
            self._buffer = torch.zeros(self.param.shape, dtype=torch.float32, device=self.param.device)
            self._queue_end_of_backward()
        return self._buffer

    def _queue_end_of_backward(self):
        if not self._end_queued:
            self._end_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _end_of_backward(self):
        self._end_queued, self._decayed = False, False
        if self._buffer is not None:
            buffer, self._buffer = self._buffer, None
            self.updater.dense(self.param, buffer)


def _fused_linear_forward(module, x):
    return FusedLinearFunction.apply(x, module.weight, module.bias, module._lomo_site, False)


def _fused_conv1d_forward(module, x):
    return FusedLinearFunction.apply(x, module.weight, module.bias, module._lomo_site, True)


def _fused_embedding_forward(module, indices):
    return FusedEmbeddingFunction.apply(indices, module.weight, module.padding_idx, module._lomo_site)


def _check_embedding(name: str, module: nn.Embedding):
    unsupported = [attr for attr, bad in (("max_norm", module.max_norm is not None),
                                          ("scale_grad_by_freq", module.scale_grad_by_freq),
                                          ("sparse", module.sparse)) if bad]
    if unsupported:
        raise ValueError(f"embedding {name!r} uses {', '.join(unsupported)}, which fused updates do not support")


class PatchHandle:
    """What ``patch`` changed, so that ``unpatch`` can undo it exactly."""

    def __init__(self):
        self.modules: list[nn.Module] = []
        self.hooks: list = []
        self.sites: dict[int, FusedSite] = {}   # id(param) -> site
        self.hooked: dict[str, nn.Parameter] = {}

    @property
    def fused_params(self) -> dict[str, nn.Parameter]:
        return {site.name: site.param for site in self.sites.values()}


def patch(model: nn.Module, updater: Updater) -> PatchHandle:
    """Route every trainable parameter of ``model`` through ``updater``'s fused updates (see module doc)."""
    if getattr(model, "_lomo_patch", None) is not None:
        raise RuntimeError("model is already patched by lomo_kernels; call lomo_kernels.unpatch(model) first")
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError("model has no trainable parameters (every parameter has requires_grad=False)")
    handle = PatchHandle()
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or not weight.requires_grad:
            continue
        if isinstance(module, nn.Linear) or (_HFConv1D is not None and isinstance(module, _HFConv1D)):
            kind = "linear"
            forward = _fused_linear_forward if isinstance(module, nn.Linear) else _fused_conv1d_forward
        elif isinstance(module, nn.Embedding):
            _check_embedding(mod_name, module)
            kind, forward = "embedding", _fused_embedding_forward
        else:
            continue
        if "forward" in module.__dict__:
            raise RuntimeError(f"module {mod_name!r} already has an instance-level forward (another patch?); "
                               "lomo_kernels will not overwrite it")
        site = handle.sites.get(id(weight))
        if site is None:
            site = handle.sites[id(weight)] = FusedSite(names[id(weight)], weight, updater)
        site.uses.append(kind)
        module._lomo_site = site
        module.forward = types.MethodType(forward, module)
        handle.modules.append(module)
    bias_of_fused = {id(m.bias) for m in handle.modules if getattr(m, "bias", None) is not None}
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in handle.sites or id(param) in bias_of_fused:
            continue
        handle.hooks.append(param.register_post_accumulate_grad_hook(_make_dense_hook(updater)))
        handle.hooked[name] = param
    model._lomo_patch = handle
    return handle


def _make_dense_hook(updater: Updater):
    def hook(param: torch.Tensor) -> None:
        grad, param.grad = param.grad, None
        with torch.no_grad():
            updater.dense(param, grad)
    return hook


def unpatch(model: nn.Module) -> None:
    """Restore every module and hook ``patch`` changed; the model then trains like any torch model."""
    handle: PatchHandle | None = getattr(model, "_lomo_patch", None)
    if handle is None:
        return
    for module in handle.modules:
        del module.forward
        del module._lomo_site
    for hook in handle.hooks:
        hook.remove()
    del model._lomo_patch


def check_no_stray_gradients(handle: PatchHandle) -> None:
    """Raise if a fused parameter received an ordinary gradient: it is used outside the patched modules,
    and that contribution would otherwise be silently dropped."""
    for site in handle.sites.values():
        if site.param.grad is not None:
            site.param.grad = None
            raise RuntimeError(f"parameter {site.name!r} is fused but also used outside the patched modules "
                               "(e.g. a direct matmul with module.weight); its gradient there cannot be fused")
