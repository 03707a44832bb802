"""Autograd Functions whose backward updates the weight instead of returning its gradient.

The router (lomo_kernels.routing) calls them in place of ``F.linear`` / ``torch.addmm`` (GPT-2's
``Conv1D``) / ``F.embedding`` on a held weight. The forward is the very op it replaces, so a held
model's outputs are bitwise the plain model's. Each backward first computes the input (and bias)
gradient with the *pre-update* weight, then hands its use's ``(x, dy)`` to the weight's
``WeightSite``, which applies the update once all of the weight's uses are in. The weight's
gradient slot is ``None``: no weight-sized tensor is built. Outputs may come back as the op's
storage base (see ``own_storage``); the router views them to the op's shape.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def own_storage(out: torch.Tensor) -> torch.Tensor:
    """A custom Function must not return a view of a tensor it made (autograd then refuses in-place ops on
    the output, e.g. ``h = linear(x); h += pos``). ``F.linear`` / ``F.embedding`` return such views
    (``addmm(...).view(...)``): return the contiguous base instead, same memory, for the caller to view
    back to the op's shape with an ordinary, autograd-visible ``view``."""
    base = out._base
    if base is None:
        return out
    if base.is_contiguous() and out.is_contiguous() and base.numel() == out.numel():
        return base
    return out.clone()


def _common_dtype(a: torch.Tensor, b: torch.Tensor):
    """Under autocast, x and dy can differ in dtype; the fused ops take one, so promote the lower."""
    if a.dtype == b.dtype:
        return a, b
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


class FusedLinearFunction(torch.autograd.Function):
    """``F.linear(x, W, b)`` or, with ``in_out_layout``, ``torch.addmm(b, x, W)`` (``Conv1D``, W [in, out])."""

    # forward(ctx, ...) rather than a separate setup_context: with setup_context, Function.apply binds the
    # arguments through inspect.signature on every call (~10 µs, one call per weight use per step).
    @staticmethod
    def forward(ctx, x, weight, bias, site, in_out_layout):
        ctx.save_for_backward(x)
        # Held as plain attributes, not saved tensors: the weight is rewritten in place by this very
        # backward, and autograd's version check would (rightly) refuse a saved tensor changed later.
        ctx.weight, ctx.site, ctx.in_out_layout = weight, site, in_out_layout
        ctx.bias_dtype = bias.dtype if bias is not None else None
        if in_out_layout:
            return torch.addmm(bias, x, weight)
        return own_storage(F.linear(x, weight, bias))

    @staticmethod
    def backward(ctx, dy):
        # Unpacking first: under non-reentrant checkpointing it recomputes the forward, which must route.
        (x,) = ctx.saved_tensors
        with torch._C.DisableTorchFunctionSubclass():  # the weight may be a HeldParameter: plain ops here
            return FusedLinearFunction._backward(ctx, x, dy)

    @staticmethod
    def _backward(ctx, x, dy):
        weight = ctx.weight
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = weight.t() if ctx.in_out_layout else weight
            grad_x = (dy.reshape(-1, dy.shape[-1]).to(weight.dtype) @ w).to(x.dtype).view(x.shape)
        x2, dy2 = _common_dtype(x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]))
        if ctx.needs_input_grad[2]:
            grad_bias = dy2.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        # The weight's update is last: grad_x above already used the old weight.
        if ctx.in_out_layout:  # W [in, out] gets G = xᵀ dy: the linear form with the roles of x and dy swapped
            ctx.site.linear_done(dy2, x2)
        else:
            ctx.site.linear_done(x2, dy2)
        return grad_x, None, grad_bias, None, None


class FusedEmbeddingFunction(torch.autograd.Function):
    """``F.embedding(indices, W, padding_idx)``; the backward updates the touched rows."""

    @staticmethod
    def forward(ctx, indices, weight, padding_idx, site):
        ctx.save_for_backward(indices)
        ctx.padding_idx, ctx.site = padding_idx, site
        return own_storage(F.embedding(indices, weight, padding_idx))

    @staticmethod
    def backward(ctx, dy):
        (indices,) = ctx.saved_tensors
        ctx.site.embedding_done(indices, dy.reshape(*indices.shape, dy.shape[-1]), ctx.padding_idx)
        return None, None, None, None
