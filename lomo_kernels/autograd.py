"""Autograd Functions whose backward updates the weight instead of returning its gradient.

Each backward first computes the input gradient with the *pre-update* weight, then hands
``(weight, x, dy)`` to the parameter's ``FusedSite`` (lomo_kernels.patch), which calls the
optimizer's fused op. The weight's gradient slot is ``None``: no weight-sized tensor is built.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _common_dtype(a: torch.Tensor, b: torch.Tensor):
    """Under autocast, x and dy can differ in dtype; the fused ops take one, so promote the lower."""
    if a.dtype == b.dtype:
        return a, b
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


class FusedLinearFunction(torch.autograd.Function):
    """``y = x Wᵀ + b`` (``nn.Linear``) or, with ``in_out_layout``, ``y = x W + b`` (GPT-2's ``Conv1D``)."""

    @staticmethod
    def forward(x, weight, bias, site, in_out_layout):
        if in_out_layout:
            y = x.reshape(-1, x.shape[-1]) @ weight
            if bias is not None:
                y = y + bias
            return y.view(*x.shape[:-1], weight.shape[1])
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, site, in_out_layout = inputs
        ctx.save_for_backward(x)
        # Held as plain attributes, not saved tensors: the weight is rewritten in place by this very
        # backward, and autograd's version check would (rightly) refuse a saved tensor changed later.
        ctx.weight, ctx.bias, ctx.site, ctx.in_out_layout = weight, bias, site, in_out_layout

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        weight = ctx.weight
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = weight.t() if ctx.in_out_layout else weight
            grad_x = (dy.to(weight.dtype) @ w).to(x.dtype)
        x2, dy2 = _common_dtype(x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]))
        if ctx.bias is not None and ctx.bias.requires_grad:
            ctx.site.bias_grad(ctx.bias, dy2.sum(0, dtype=torch.float32))
        # The weight update is last: grad_x above already used the old weight.
        if ctx.in_out_layout:  # W [in, out] gets G = xᵀ dy: the linear op with the roles of x and dy swapped
            ctx.site.linear(weight, dy2, x2)
        else:
            ctx.site.linear(weight, x2, dy2)
        return grad_x, None, None, None, None


class FusedEmbeddingFunction(torch.autograd.Function):
    @staticmethod
    def forward(indices, weight, padding_idx, site):
        return F.embedding(indices, weight, padding_idx)

    @staticmethod
    def setup_context(ctx, inputs, output):
        indices, weight, padding_idx, site = inputs
        ctx.save_for_backward(indices)
        ctx.weight, ctx.padding_idx, ctx.site = weight, padding_idx, site

    @staticmethod
    def backward(ctx, dy):
        (indices,) = ctx.saved_tensors
        ctx.site.embedding(ctx.weight, indices, dy, ctx.padding_idx)
        return None, None, None, None
