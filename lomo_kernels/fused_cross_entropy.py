"""The causal-LM loss with the LM head's update fused into its backward: no logits, no LM-head gradient.

``fused_linear_cross_entropy(hidden, weight, labels, bias=None, *, updater, ...)`` returns the loss
transformers' ``ForCausalLMLoss`` computes from ``logits = hidden @ weightᵀ (+ bias)`` (``shift=True``:
the labels are shifted as there; ``num_items_in_batch``: summed loss / that count; fp32 throughout;
``softcap``: Gemma-2's ``final_logit_softcapping``; ``label_smoothing`` as ``F.cross_entropy``'s, which
transformers' Trainer applies through its ``LabelSmoother``). Two differences, both deliberate: an
all-ignored batch has loss 0 (transformers: NaN from 0/0) and contributes no update; the logits are
fp32 from the GEMM on (transformers rounds them to the model dtype first).

Its backward (``FusedLinearCrossEntropy``) walks the vocabulary in chunks (size:
``lomo_kernels.ops.linear_cross_entropy.choose_chunk_size``); for each chunk ``[v0, v1)`` it recomputes
the chunk's logits from ``H`` and the *old* ``W[v0:v1]``, forms ``dr`` (the gradient of the loss with
respect to those logits, fp32 ``[T, v1−v0]``), adds ``dr·W[v0:v1]`` to ``dH``, and only then hands
``(W, v0, v1, H, dr)`` to the updater, which may update rows ``[v0, v1)`` of ``W`` — they are never read
again. The weight's gradient slot is ``None``; the bias (if any) gets an ordinary ``[V]`` gradient (a
dense parameter for the optimizer's hooks).

The updater protocol (``LMHeadUpdater``), by what it needs to know before it can write:

* element-wise rules (LOMO: decay, value clipping, loss scale, stochastic rounding) and the norm phase
  need nothing: one pass, ``passes = ("apply",)`` or ``("norm",)``; the sum of the chunks' ``‖G_c‖²`` is
  the exact ``‖G‖²`` (disjoint rows);
* rules that need whole-``W`` statistics first (AdaLomo's factored second moment: column sums over all
  rows, then ``Σu²``) ask for several passes, e.g. ``("sums", "scaled_norm", "apply")``: each pass
  recomputes every chunk's ``dr`` (one more logits GEMM per pass), ``end_pass`` turns the pass's
  statistics into what the next needs, and only the last pass writes.

Adapters: ``LomoHead`` (the rule's scalars given directly), ``NormHead`` (adds to a stats buffer), and
``OptimizerHead(optimizer)``, which follows a ``lomo_kernels`` ``Lomo``, ``AdaLomo`` or ``AdamW`` through its phases
(``optimizer.phase``: "norm", "apply", "skip"). A weight with other uses in the step (a tied embedding)
defers its update: ``DeferredLMHead``.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol

import torch

from .ops import adalomo_stats, adamw_update
from .ops import linear_cross_entropy as lce
from .ops._common import UpdateRule, check_stats, mix32_int
from .ops.linear_update import linear_grad_sqnorm_


class LMHeadUpdater(Protocol):
    """What ``FusedLinearCrossEntropy``'s backward hands the LM head's gradient to, chunk by chunk."""

    def passes(self, weight: torch.Tensor) -> tuple[str, ...]:
        """Called once at the start of the backward: the names of the passes over the chunks (``()``: none,
        the backward then only computes ``dH``). Only the last may write ``weight``."""

    def chunk(self, pass_name: str, weight: torch.Tensor, v0: int, v1: int, x: torch.Tensor,
              dy: torch.Tensor) -> None:
        """One chunk of ``G = dyᵀx`` for rows ``[v0, v1)`` of ``weight`` [V, d] (``x`` [T, d] and ``dy``
        [T, v1−v0], both fp32; ``dy`` already carries the upstream gradient, hence any loss scale). In the
        last pass it may update ``weight[v0:v1]`` in place; it must not keep ``dy``."""

    def end_pass(self, pass_name: str, weight: torch.Tensor) -> None:
        """After every chunk of a pass."""

    # Optional: ``defer(weight) -> bool`` and ``keep(weight, record)``. When ``defer`` answers True the
    # backward computes dH (and db) only and hands ``keep`` a ``DeferredLMHead`` (the weight has other uses
    # still to come, e.g. a tied embedding); ``record.apply(weight, updater, ...)`` runs the update later.


class LomoHead:
    """LOMO's rule with fixed scalars (``linear_update_``'s arguments), in one pass; stochastic rounding
    bit-for-bit as ``linear_update_`` on the whole weight with the same seed."""

    def __init__(self, *, lr: float, weight_decay: float = 0.0, coef: float = 1.0, loss_scale: float = 1.0,
                 clip_value: float | None = None, rounding: str = "nearest", seed: int = 0, backend: str = "auto",
                 name: str = "lm_head", nonfinite: torch.Tensor | None = None):
        UpdateRule.make(lr, weight_decay, coef, loss_scale, clip_value, rounding, seed, name)  # check now
        self.args = dict(lr=lr, weight_decay=weight_decay, coef=coef, loss_scale=loss_scale, clip_value=clip_value,
                         rounding=rounding, seed=seed, backend=backend, name=name, nonfinite=nonfinite)

    def passes(self, weight):
        return ("apply",)

    def chunk(self, pass_name, weight, v0, v1, x, dy):
        lce.linear_update_rows_(weight, v0, x, dy, **self.args)

    def end_pass(self, pass_name, weight):
        pass


class NormHead:
    """The norm phase: adds ``[‖G / loss_scale‖², non-finite count]`` to ``stats`` (float32 (2,))."""

    def __init__(self, stats: torch.Tensor, *, loss_scale: float = 1.0, backend: str = "auto", name: str = "lm_head"):
        UpdateRule.make(0.0, loss_scale=loss_scale, name=name)
        self.stats, self.loss_scale, self.backend, self.name = stats, loss_scale, backend, name

    def passes(self, weight):
        check_stats(self.stats, weight, self.name)
        return ("norm",)

    def chunk(self, pass_name, weight, v0, v1, x, dy):
        linear_grad_sqnorm_(self.stats, weight[v0:v1], x, dy, loss_scale=self.loss_scale, backend=self.backend,
                            name=self.name)

    def end_pass(self, pass_name, weight):
        pass


def chunk_seed(seed: int, first_row: int) -> int:
    """The stochastic-rounding seed of the head's chunk starting at ``first_row`` (the AdamW ops hash an
    element's index within the rows they are given: without a seed per chunk, every chunk would repeat the
    first one's draws). The first chunk keeps the step's seed."""
    return seed if first_row == 0 else mix32_int(seed ^ mix32_int(first_row))


class OptimizerHead:
    """Follows a ``lomo_kernels`` optimizer through its phases for its held LM-head weight.

    norm phase: the chunks' norms go into the optimizer's norm buffer (so its global norm, clip
    coefficient and overflow check are exact). apply phase: ``Lomo`` — its rule (lr, decay with
    ``no_decay``, clip coefficient, value clipping, loss scale, rounding and one seed per step, as its
    ``linear_apply``) in one pass; ``AdamW`` (and ``Apollo``'s AdamW-ruled head) — its element-wise rule on
    the chunk's rows of ``W``, ``m`` and ``v`` in one pass (exact: the rule is per element; stochastic
    rounding hashes the element's index in the chunk with a seed of the chunk's own, ``chunk_seed``: the
    chunks' draws are independent, though not the bits an unchunked update would draw); ``AdaLomo`` — three passes
    (row/column sums of ``u²``, then ``Σ(r u c)²``, then the update), exactly its ``linear_apply`` with
    ``statistics="recompute"``. skip: nothing.
    """

    def __init__(self, optimizer):
        self.opt = optimizer
        self._state = None
        self._kind = self.kind_of(optimizer)
        if self._kind is None:
            raise TypeError(f"OptimizerHead supports lomo_kernels Lomo, AdaLomo (statistics='recompute'), AdamW and "
                            f"Apollo's AdamW-ruled weights, got {type(optimizer).__name__}")

    @staticmethod
    def kind_of(optimizer, param: torch.Tensor | None = None) -> str | None:
        """Which rule ``optimizer`` applies to ``param`` as an LM head (None: not one the fused loss can take)."""
        from .optim import AdaLomo, AdamW, Lomo
        if isinstance(optimizer, AdaLomo):
            return "adalomo" if optimizer.statistics == "recompute" else None
        if isinstance(optimizer, Lomo):
            return "lomo"
        if isinstance(optimizer, AdamW):  # Apollo too: its head is AdamW-ruled unless projected
            if param is not None and optimizer._name(param) not in optimizer.adam_names:
                return None
            return "adamw"
        return None

    def passes(self, weight):
        opt, phase = self.opt, self.opt.phase
        if phase == "norm":
            self._state = NormHead(opt._stats_for(weight), loss_scale=opt.loss_scale, backend=opt.backend,
                                   name=opt._name(weight))
            return self._state.passes(weight)
        if phase != "apply":
            self._state = None
            return ()
        if self._kind == "lomo":
            self._state = LomoHead(**opt._rule(weight))
            return ("apply",)
        if self._kind == "adamw":
            self._state = ("adamw", opt.adam_rule(weight))  # one rule (step count, seed) for every chunk
            return ("apply",)
        name = opt._name(weight)
        out_f, in_f = weight.shape
        self._state = dict(name=name, row=torch.zeros(out_f, dtype=torch.float32, device=weight.device),
                           col=torch.zeros(in_f, dtype=torch.float32, device=weight.device),
                           stats=torch.zeros(2, dtype=torch.float32, device=weight.device))
        return ("sums", "scaled_norm", "apply")

    def chunk(self, pass_name, weight, v0, v1, x, dy):
        if isinstance(self._state, tuple):
            m, v, name = self.opt._moments(weight)
            rule = dataclasses.replace(self._state[1], seed=chunk_seed(self._state[1].seed, v0))
            adamw_update.adamw_linear_update_(weight[v0:v1], m[v0:v1], v[v0:v1], x, dy, rule,
                                              backend=self.opt.backend, name=name,
                                              nonfinite=self.opt.nonfinite_counter(weight))
            return
        if not isinstance(self._state, dict):
            self._state.chunk(pass_name, weight, v0, v1, x, dy)
            return
        opt, st = self.opt, self._state
        common = dict(loss_scale=opt.loss_scale, clip_value=opt.clip_grad_value, name=st["name"])
        w = weight[v0:v1]
        if pass_name == "sums":
            adalomo_stats.adalomo_sq_sums_(st["row"][v0:v1], st["col"], w, x, dy, **common)
        elif pass_name == "scaled_norm":
            adalomo_stats.adalomo_scaled_sqnorm_(st["stats"], w, x, dy, st["row_scale"][v0:v1], st["col_scale"],
                                                 backend=opt.backend, **common)
        else:
            lce.linear_update_rows_(weight, v0, x, dy, row_scale=st["row_scale"][v0:v1].contiguous(),
                                    col_scale=st["col_scale"], loss_scale=opt.loss_scale,
                                    clip_value=opt.clip_grad_value, **st["args"])

    def end_pass(self, pass_name, weight):
        if not isinstance(self._state, dict):
            self._state = None if isinstance(self._state, tuple) else self._state
            return
        opt, st = self.opt, self._state
        out_f, in_f = weight.shape
        coef_sq = opt.clip_coef ** 2
        if pass_name == "sums":
            st["row_scale"], st["col_scale"] = opt.update_factored_stats(
                st["name"], st["row"].mul_(coef_sq / in_f), st["col"].mul_(coef_sq / out_f))
        elif pass_name == "scaled_norm":
            coef = opt.clip_coef * opt.normalizer(coef_sq * st["stats"][0].item(), weight.numel())
            st["args"] = opt._apply_args(weight, coef)  # lr·RMS(W) of the old W, one seed for the step
        else:
            self._state = None


def _updater_passes(updater, weight) -> tuple[str, ...]:
    if updater is None:
        return ()
    return tuple(updater.passes(weight))


class DeferredLMHead:
    """The token-sized record of one fused loss use whose LM-head update must wait: the weight has other
    uses in the step whose backward has not run yet (a tied embedding: its backward comes after the
    head's). Holds ``H``, the labels, ``lse`` and the per-token coefficients (``[T, d]`` + 3·``[T]``),
    never the logits.

    An updater opts in with ``defer(weight) -> bool`` (True: the Function's backward computes ``dH`` and
    ``db`` only and hands this record to ``updater.keep(weight, record)``). ``apply`` later runs any
    ``LMHeadUpdater``'s passes over the chunks, recomputing each chunk's ``dr_c`` from the record (one more
    logits GEMM), with the other uses' contributions appended to each chunk as extra tokens: the
    update is from the summed gradient, applied once (decay once, value clipping and norms of the sum)."""

    def __init__(self, hidden2, weight, bias, labels1, lse, coef, cfg):
        self.hidden2, self.bias, self.labels1, self.lse, self.coef, self.cfg = hidden2, bias, labels1, lse, coef, cfg
        self.shape = tuple(weight.shape)

    def apply(self, weight: torch.Tensor, updater: LMHeadUpdater, linear=(), embedding=()) -> None:
        """``linear``: ``(x [T_k, d], dy [T_k, V])`` of other ``F.linear(x, weight)`` uses; ``embedding``:
        ``(indices, dy [..., d], padding_idx)`` of ``F.embedding(indices, weight)`` uses (their gradient
        ``one_hot(indices)ᵀ·dy`` joins as tokens ``x = dy``, ``dy = one_hot(indices)[:, v0:v1]``)."""
        if tuple(weight.shape) != self.shape:
            raise ValueError(f"DeferredLMHead: weight of shape {tuple(weight.shape)}, recorded {self.shape}")
        d = weight.shape[1]
        lin = [(x.reshape(-1, d).to(torch.float32), dy.reshape(-1, dy.shape[-1])) for x, dy in linear]
        emb = []
        for indices, dy, padding_idx in embedding:
            idx = indices.reshape(-1).to(torch.int64)
            keep = idx != padding_idx if padding_idx is not None else torch.ones_like(idx, dtype=torch.bool)
            emb.append((idx[keep], dy.reshape(-1, d)[keep].to(torch.float32)))
        extra_x = [x for x, _ in lin] + [e for _, e in emb]

        def on_chunk(name, v0, v1, h32, dr):
            if not extra_x:
                updater.chunk(name, weight, v0, v1, h32, dr)
                return
            parts = [dr] + [dy[:, v0:v1].to(torch.float32) for _, dy in lin]
            for idx, _e in emb:
                onehot = torch.zeros(idx.shape[0], v1 - v0, dtype=torch.float32, device=dr.device)
                inside = ((idx >= v0) & (idx < v1)).nonzero().squeeze(1)
                onehot[inside, idx[inside] - v0] = 1.0
                parts.append(onehot)
            updater.chunk(name, weight, v0, v1, torch.cat([h32] + extra_x), torch.cat(parts))

        with torch.no_grad():
            lce.chunk_loop(self.hidden2, weight, self.bias, self.labels1, self.lse, self.coef, self.cfg,
                           _updater_passes(updater, weight), on_chunk, lambda name: updater.end_pass(name, weight),
                           need_grad_hidden=False, need_grad_bias=False)


class FusedLinearCrossEntropy(torch.autograd.Function):
    """``loss = CE(softcap(hidden2 @ Wᵀ + b), labels1) / denom``; backward: ``dH``, ``db``, and the updater
    gets the LM head's gradient chunk by chunk (no gradient for ``weight``).

    Inputs (already checked and flattened by ``fused_linear_cross_entropy``): ``hidden2 [T, d]``,
    ``weight [V, d]``, ``bias [V]`` or None, ``labels1`` int64 [T] (shifted), ``denom`` fp32 scalar
    tensor, ``updater`` (``LMHeadUpdater`` or None: then ``weight`` is left alone), ``cfg``
    (``LossConfig``). Saved for the backward: ``hidden2``, ``labels1``, ``lse [T]`` (fp32) — token-sized."""

    @staticmethod
    def forward(ctx, hidden2, weight, bias, labels1, denom, updater, cfg):
        loss_sum, lse = lce.forward(hidden2, weight, bias, labels1, cfg)
        ctx.save_for_backward(hidden2, labels1, lse, denom)
        # the weight (and bias) as plain attributes: the backward rewrites the weight in place, and autograd's
        # version check would refuse a saved tensor changed later
        ctx.weight, ctx.bias, ctx.updater, ctx.cfg = weight, bias, updater, cfg
        return loss_sum / denom

    @staticmethod
    def backward(ctx, grad_loss):
        hidden2, labels1, lse, denom = ctx.saved_tensors
        with torch._C.DisableTorchFunctionSubclass():  # a held weight (HeldParameter): plain ops on it here
            return FusedLinearCrossEntropy._backward(ctx, grad_loss, hidden2, labels1, lse, denom)

    @staticmethod
    def _backward(ctx, grad_loss, hidden2, labels1, lse, denom):
        cfg, weight, bias = ctx.cfg, ctx.weight, ctx.bias
        coef = torch.where(labels1 != cfg.ignore_index, grad_loss.to(torch.float32) / denom, 0.0)
        updater = ctx.updater
        if updater is not None and getattr(updater, "defer", None) is not None and updater.defer(weight):
            updater.keep(weight, DeferredLMHead(hidden2, weight, bias, labels1, lse, coef, cfg))
            updater = None
        grad_h, grad_b = lce.chunk_loop(
            hidden2, weight, bias, labels1, lse, coef, cfg, _updater_passes(updater, weight),
            lambda name, v0, v1, x, dy: updater.chunk(name, weight, v0, v1, x, dy),  # noqa: B023
            lambda name: updater.end_pass(name, weight),
            need_grad_hidden=ctx.needs_input_grad[0], need_grad_bias=ctx.needs_input_grad[2])
        if grad_h is not None:
            grad_h = grad_h.to(hidden2.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, None, grad_b, None, None, None, None


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """transformers' shift: ``pad(labels, (0, 1), ignore_index)[..., 1:]`` (position i predicts i+1)."""
    return torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               bias: torch.Tensor | None = None, *, updater: LMHeadUpdater | None,
                               ignore_index: int = -100, num_items_in_batch=None, label_smoothing: float = 0.0,
                               softcap: float | None = None, shift: bool = False, chunk_size: int | None = None,
                               memory_budget: int | None = None, backend: str = "auto",
                               name: str = "lm_head") -> torch.Tensor:
    """The mean causal-LM loss of ``logits = hidden @ weightᵀ (+ bias)`` (see the module docstring) as an
    fp32 scalar; its backward gives ``hidden`` (and ``bias``) their gradients and ``updater`` the LM
    head's, chunk by chunk; ``weight`` gets no ``.grad``. ``hidden [..., d]``, ``labels`` with hidden's
    leading shape (``shift=True``: unshifted, as transformers' ``labels=`` argument). ``backend`` runs the
    loss's own kernels (the updater's row updates follow the updater's backend). Every check (shapes,
    dtypes, the label range) runs here, before anything is computed or written."""
    if shift and isinstance(labels, torch.Tensor):
        labels = shift_labels(labels, ignore_index)
    hidden2, labels1 = lce.check_inputs(hidden, weight, labels, bias, ignore_index, name)
    cfg = lce.LossConfig.make(ignore_index, label_smoothing, softcap, chunk_size, tokens=hidden2.shape[0],
                              vocab=weight.shape[0], hidden=weight.shape[1], weight_dtype=weight.dtype,
                              memory_budget=memory_budget, device=weight.device, backend=backend)
    denom = lce.normalizer(labels1, cfg, num_items_in_batch)
    return FusedLinearCrossEntropy.apply(hidden2, weight, bias, labels1, denom, updater, cfg)
