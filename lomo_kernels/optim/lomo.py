"""``Lomo``: SGD with the update fused into the backward pass; a drop-in for ``lomo_optim.Lomo``."""
from __future__ import annotations

from torch import nn

from .. import ops
from .base import FusedOptimizer


class Lomo(FusedOptimizer):
    """LOMO (Lv et al. 2023): ``W <- (1 - lr·wd)·W - lr·c·clamp(g / loss_scale, ±clip_grad_value)``.

    Same arguments and defaults as lomo-optim 0.1.1; ``backend``, ``rounding`` (None: stochastic for
    bf16 weights, nearest otherwise) and ``seed`` are ours. Use::

        opt = Lomo(model, lr=1e-3, clip_grad_norm=1.0)
        loss = model(**batch).loss
        opt.grad_norm(loss)            # only with clip_grad_norm (or fp16)
        opt.fused_backward(loss, lr)   # backward + update; no optimizer.step()
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, clip_grad_norm: float | None = None,
                 clip_grad_value: float | None = None, weight_decay: float = 0.0, loss_scale_args: dict | None = None,
                 *, backend: str = "auto", rounding: str | None = None, seed: int = 0):
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.weight_decay = weight_decay
        self.loss_scale_args = dict(loss_scale_args or {})
        super().__init__(model, dict(lr=lr, clip_grad_norm=clip_grad_norm, clip_grad_value=clip_grad_value,
                                     weight_decay=weight_decay),
                         clip_grad_norm=clip_grad_norm, clip_grad_value=clip_grad_value, backend=backend,
                         rounding=rounding, seed=seed)

    def sums_contributions(self) -> bool:
        return self.phase == "apply" and self.clip_grad_value is None

    def _rule(self, param, apply_decay):
        return dict(lr=self.lr, weight_decay=self.weight_decay if apply_decay else 0.0, coef=self.clip_coef,
                    loss_scale=self.loss_scale, clip_value=self.clip_grad_value,
                    rounding=self._rounding_for(param), seed=self._seed_for(param), backend=self.backend,
                    name=self._name(param))

    def linear(self, param, x, dy, *, apply_decay=True):
        if self.phase == "norm":
            ops.linear_grad_sqnorm_(self._stats_for(param), param, x, dy, loss_scale=self.loss_scale,
                                    backend=self.backend, name=self._name(param))
        else:
            ops.linear_update_(param, x, dy, **self._rule(param, apply_decay))

    def embedding(self, param, indices, dy, padding_idx, *, apply_decay=True):
        if self.phase == "norm":
            ops.embedding_grad_sqnorm_(self._stats_for(param), param, indices, dy, loss_scale=self.loss_scale,
                                       padding_idx=padding_idx, backend=self.backend, name=self._name(param))
        else:
            ops.embedding_update_(param, indices, dy, padding_idx=padding_idx, **self._rule(param, apply_decay))

    def dense(self, param, grad, *, apply_decay=True):
        if self.phase == "norm":
            ops.dense_grad_sqnorm_(self._stats_for(param), param, grad, loss_scale=self.loss_scale,
                                   backend=self.backend, name=self._name(param))
        else:
            ops.dense_update_(param, grad, **self._rule(param, apply_decay))
