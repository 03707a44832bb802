"""``AdaLomo``: Adafactor-style adaptive LOMO (Lv et al. 2023b); a drop-in for ``lomo_optim.AdaLomo``.

Per parameter, with ``g = c · clamp(grad / loss_scale, ±clip_grad_value)`` (``c`` the global-norm
clip coefficient) and ``β = 1 - t^decay_rate`` at step ``t = 1, 2, ...``:

    2-D W [m, n]:  R <- β·R + (1-β)·(mean_j g² + eps[0])      C <- β·C + (1-β)·(mean_i g² + eps[0])
                   u_ij = g_ij · rsqrt(R_i / mean(R)) · rsqrt(C_j)
    1-D p:         V <- β·V + (1-β)·(g² + eps[0]);  u = g · rsqrt(V)
    u <- u / max(1, RMS(u) / clip_threshold)
    W <- (1 - lr'·wd)·W - lr'·u       lr' = lr · max(eps[1], RMS(W))

(lomo-optim increments its step counter before the backward pass, so its ``t = 0`` guard never
fires and its first step has ``β = 0``; ours counts the same way.)

A linear layer's statistics must be known before its update, and ``u`` depends on all of ``g``.
``statistics`` picks how they are obtained:

* ``"recompute"`` (default): no gradient tensor ever exists. Three passes over the gradient's tiles
  per layer: row/column sums of ``g²`` (GEMM or token-Gram pass), ``Σu²`` (a norm pass on scaled
  activations), then the fused update (``lomo_kernels.ops.adalomo_stats``).
* ``"materialize"``: compute the layer's fp32 gradient once, use it, free it. One GEMM instead of
  three, but one layer's full fp32 gradient is alive at a time.

Measured trade-off (CPU, one 2048x2048 fp32 layer, ``linear_apply``; bench/bench_lomo_vs_lomo_optim.py,
table in bench/results/lomo_vs_lomo_optim.md; the gradient is 16 MiB):

    tokens  value clip   recompute: time, extra peak     materialize: time, extra peak
    64      none         7.9 ms,   1.6 MiB               23.4 ms, 16.0 MiB
    64      1e-3         52.7 ms,  6.0 MiB               23.0 ms, 16.0 MiB
    1024    none         187 ms,   27.0 MiB              81.1 ms, 16.0 MiB
    1024    1e-3         221 ms,   6.0 MiB               63.7 ms, 16.0 MiB

Recompute never holds a weight-sized tensor; its extra memory is activation-sized (fp32 copies of
``x`` and ``dy`` scaled by the factors, ``O(T·(in+out))``) or row-block-sized (value clipping), so it
wins on memory when tokens per step are few relative to the layer's width, and with few tokens and
no value clipping (token-Gram sums) it is even the faster one. With many tokens it costs ~2.5-3.5x
materialize's time and, without value clipping, its activation copies can exceed one gradient.

Embedding weights: only the touched rows have a gradient (token-sized), but every row's statistic
decays and every row is weight-decayed, exactly as lomo-optim's dense update does.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops
from ..ops import adalomo_stats
from . import _checks
from .base import FusedOptimizer

STATISTICS = ("recompute", "materialize")


def _ema_keeping_finite_(state: torch.Tensor, beta: float, new: torch.Tensor) -> torch.Tensor:
    """``state <- beta*state + (1-beta)*new`` (the same operations as ``mul_(beta).add_(new, alpha=1-beta)``),
    except that an entry whose result is not finite keeps its old value: a non-finite gradient (partial mode)
    must not poison the second moment, or every later update of that row/column would be non-finite too."""
    fresh = state.mul(beta).add_(new, alpha=1.0 - beta)
    return state.copy_(torch.where(torch.isfinite(fresh), fresh, state))

class AdaLomo(FusedOptimizer):
    """Same arguments and defaults as lomo-optim 0.1.1's ``AdaLomo``; ``statistics``, ``backend``,
    ``rounding``, ``seed``, ``no_decay`` and ``unfused`` (as for ``Lomo``) are ours. ``loss_scale`` is a fixed factor (``None``/0: none): the loss is
    multiplied by it and every gradient divided by it. fp16 weights get the norm phase's overflow
    check: a non-finite gradient skips the step (the fixed scale is not changed)."""

    def __init__(self, model: nn.Module, lr: float = 1e-3, loss_scale: float | None = 2**10,
                 eps: tuple[float, float] = (1e-30, 1e-3), clip_threshold: float = 1.0, decay_rate: float = -0.8,
                 clip_grad_norm: float | None = None, clip_grad_value: float | None = None,
                 weight_decay: float = 0.0, *, statistics: str = "recompute", backend: str = "auto",
                 rounding: str | None = None, seed: int = 0, no_decay=(), unfused=(),
                 on_nonfinite: str | None = None, fused_cross_entropy: bool = True):
        weight_decay = _checks.non_negative("weight_decay", weight_decay)
        loss_scale = _checks.number("loss_scale", loss_scale, low=0.0, optional=True)
        if not isinstance(eps, (tuple, list)) or len(eps) != 2:
            raise ValueError(f"eps must be two numbers >= 0 (gradient² floor, parameter-RMS floor), got {eps!r}")
        eps = (_checks.non_negative("eps[0]", eps[0]), _checks.non_negative("eps[1]", eps[1]))
        clip_threshold = _checks.positive("clip_threshold", clip_threshold)
        decay_rate = _checks.number("decay_rate", decay_rate, high=0.0, high_open=True)
        _checks.choice("statistics", statistics, STATISTICS)
        bad = [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad and p.dim() not in (1, 2)]
        if bad:
            raise ValueError(f"AdaLomo handles 1-D and 2-D parameters only; got {bad[:3]}")
        self.weight_decay = weight_decay
        self._loss_scale = float(loss_scale) if loss_scale else 1.0
        self.eps = (float(eps[0]), float(eps[1]))
        self.clip_threshold = clip_threshold
        self.decay_rate = decay_rate
        self.statistics = statistics
        super().__init__(model, dict(lr=lr, eps=self.eps, weight_decay=weight_decay, clip_grad_norm=clip_grad_norm,
                                     clip_grad_value=clip_grad_value),
                         clip_grad_norm=clip_grad_norm, clip_grad_value=clip_grad_value, backend=backend,
                         rounding=rounding, seed=seed, no_decay=no_decay, unfused=unfused,
                         on_nonfinite=on_nonfinite, fused_cross_entropy=fused_cross_entropy)
        if fused_cross_entropy and statistics != "recompute":
            self.fused_cross_entropy_reason = f"AdaLomo's statistics={statistics!r} (the fused loss needs 'recompute')"
        self._norm_sums: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(param) -> this step's sums
        self.exp_avg_sq: dict[str, torch.Tensor] = {}
        self.exp_avg_sq_row: dict[str, torch.Tensor] = {}
        self.exp_avg_sq_col: dict[str, torch.Tensor] = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if p.dim() == 1:
                self.exp_avg_sq[name] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
            else:
                self.exp_avg_sq_row[name] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
                self.exp_avg_sq_col[name] = torch.zeros(p.shape[1], dtype=torch.float32, device=p.device)

    @property
    def loss_scale(self) -> float:
        return self._loss_scale

    # --- the pieces of the rule, each overridable (e.g. by a sharded integration) ------------------

    def beta2t(self) -> float:
        """β2 of the step being applied; the step number ``t`` starts at 1 (β2 = 0: the first
        statistics are the first gradient's)."""
        return 1.0 - math.pow(self.step_count + 1, self.decay_rate)

    def param_rms(self, param: torch.Tensor) -> float:
        return (param.detach().to(torch.float32).norm() / math.sqrt(param.numel())).item()

    def scaled_lr(self, param: torch.Tensor) -> float:
        """lr scaled by the parameter's RMS (floored at ``eps[1]``)."""
        return self.lr * max(self.eps[1], self.param_rms(param))

    def normalizer(self, update_sqnorm: float, numel: int) -> float:
        """``1 / max(1, RMS(u) / clip_threshold)``."""
        return 1.0 / max(1.0, math.sqrt(update_sqnorm / numel) / self.clip_threshold)

    def update_factored_stats(self, name: str, row_sq_mean: torch.Tensor, col_sq_mean: torch.Tensor):
        """Fold this step's mean squares (without eps) into ``R``, ``C``; return the factors
        ``(rsqrt(R / mean(R)), rsqrt(C))`` that scale ``g``'s rows and columns."""
        beta = self.beta2t()
        row = _ema_keeping_finite_(self.exp_avg_sq_row[name], beta, row_sq_mean + self.eps[0])
        col = _ema_keeping_finite_(self.exp_avg_sq_col[name], beta, col_sq_mean + self.eps[0])
        return (row / row.mean()).rsqrt_(), col.rsqrt()

    def _apply_args(self, param: torch.Tensor, coef: float) -> dict:
        return dict(lr=self.scaled_lr(param), weight_decay=self.weight_decay_for(param), coef=coef,
                    rounding=self._rounding_for(param), seed=self._seed_for(param), backend=self.backend,
                    name=self._name(param), nonfinite=self.nonfinite_counter(param))

    def clipped_gradient_(self, grad: torch.Tensor) -> torch.Tensor:
        """``c · clamp(grad / loss_scale, ±clip_grad_value)`` (lomo-optim's order), in place on an fp32 ``grad``."""
        g = grad.to(torch.float32).div_(self.loss_scale)
        if self.clip_grad_value is not None:
            g = g.clamp_(-self.clip_grad_value, self.clip_grad_value)
        if self.clip_coef != 1.0:
            g = g.mul_(self.clip_coef)
        return g

    def direction_(self, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The unnormalized update ``u`` from the full (loss-scaled) gradient of ``param``; consumes
        ``grad`` (an fp32 ``grad`` becomes ``u`` in place, so one gradient-sized tensor is alive)."""
        g = self.clipped_gradient_(grad)
        name = self._name(param)
        if g.dim() == 1:
            beta = self.beta2t()
            v = _ema_keeping_finite_(self.exp_avg_sq[name], beta, g * g + self.eps[0])
            return g.mul_(v.rsqrt())
        # mean squares by norm reductions: no g²-sized temporary
        row_sq_mean = torch.linalg.vector_norm(g, dim=1).square_().div_(g.shape[1])
        col_sq_mean = torch.linalg.vector_norm(g, dim=0).square_().div_(g.shape[0])
        row_scale, col_scale = self.update_factored_stats(name, row_sq_mean, col_sq_mean)
        return g.mul_(row_scale[:, None]).mul_(col_scale)

    # --- the Updater's apply phase -----------------------------------------------------------------

    def dense_apply(self, param, grad):
        """Consumes ``grad`` (see ``direction_``): the callers (hooks, tie buffers) drop it afterwards."""
        u = self.direction_(param, grad)
        coef = self.normalizer(float(u.norm() ** 2), u.numel())
        ops.dense_update_(param, u, **self._apply_args(param, coef))

    def linear_apply(self, param, x, dy):
        if self.statistics == "materialize":
            x32, dy32 = x.to(torch.float32), dy.to(torch.float32)
            self.dense_apply(param, dy32.t() @ x32)
        else:
            self.linear_apply_recompute(param, x, dy)

    def _shares_norm_pass(self) -> bool:
        """Recompute on this optimizer's own updates (not through a wrapper such as ZeRO-3's, which hands
        the norm phase pieces of a weight): the norm phase's pass also yields the row/column sums."""
        return self.statistics == "recompute" and self.updater is self

    def grad_norm(self, loss):
        self._norm_sums = {}
        return super().grad_norm(loss)

    def linear_norm(self, param, x, dy):
        if not self._shares_norm_pass():
            return super().linear_norm(param, x, dy)
        # one pass for both: ‖g‖² for the global norm, and the sums of clamp(g)² the update will need
        row_sums = torch.zeros(param.shape[0], dtype=torch.float32, device=param.device)
        col_sums = torch.zeros(param.shape[1], dtype=torch.float32, device=param.device)
        adalomo_stats.adalomo_sq_sums_(row_sums, col_sums, param, x, dy, loss_scale=self.loss_scale,
                                       clip_value=self.clip_grad_value, stats=self._stats_for(param),
                                       backend=self.backend, name=self._name(param))
        self._norm_sums[id(param)] = (row_sums, col_sums)

    def linear_apply_recompute(self, param, x, dy):
        name, out_f, in_f = self._name(param), param.shape[0], param.shape[1]
        common = dict(loss_scale=self.loss_scale, clip_value=self.clip_grad_value, name=name)
        sums = self._norm_sums.pop(id(param), None) if self._fresh_norm else None
        if sums is not None:  # from this step's norm phase: same x, dy
            row_sums, col_sums = sums
        else:
            row_sums = torch.zeros(out_f, dtype=torch.float32, device=param.device)
            col_sums = torch.zeros(in_f, dtype=torch.float32, device=param.device)
            adalomo_stats.adalomo_sq_sums_(row_sums, col_sums, param, x, dy, backend=self.backend, **common)
        coef_sq = self.clip_coef ** 2
        row_scale, col_scale = self.update_factored_stats(name, row_sums.mul_(coef_sq / in_f),
                                                          col_sums.mul_(coef_sq / out_f))
        stats = torch.zeros(2, dtype=torch.float32, device=param.device)
        adalomo_stats.adalomo_scaled_sqnorm_(stats, param, x, dy, row_scale, col_scale, backend=self.backend, **common)
        coef = self.clip_coef * self.normalizer(coef_sq * stats[0].item(), param.numel())
        args = self._apply_args(param, coef)
        adalomo_stats.adalomo_linear_update_(param, x, dy, row_scale, col_scale, loss_scale=self.loss_scale,
                                             clip_value=self.clip_grad_value, **args)

    def embedding_apply(self, param, indices, dy, padding_idx):
        """Only the touched rows have a gradient: their fp32 rows (token-sized) stand for the whole
        gradient, whose other rows are zero; statistics and weight decay still cover every row."""
        name, vocab = self._name(param), param.shape[0]
        rows, g = adalomo_stats.embedding_row_gradients(param, indices, dy, padding_idx, name=name)
        g = self.clipped_gradient_(g)
        sq = g * g  # touched rows only: token-sized
        row_sq_mean = torch.zeros(vocab, dtype=torch.float32, device=param.device)
        row_sq_mean[rows] = sq.mean(dim=1)
        row_scale, col_scale = self.update_factored_stats(name, row_sq_mean, sq.sum(dim=0) / vocab)
        u = g.mul_(row_scale[rows, None]).mul_(col_scale)
        coef = self.normalizer(float(u.norm() ** 2), param.numel())
        # u's rows are distinct, so the embedding op applies each once (and decays the other rows).
        ops.embedding_update_(param, rows, u, **self._apply_args(param, coef))

    # --- checkpoints -------------------------------------------------------------------------------

    def _named_state(self):
        state = {name: {"exp_avg_sq": v} for name, v in self.exp_avg_sq.items()}
        state.update({name: {"exp_avg_sq_row": self.exp_avg_sq_row[name], "exp_avg_sq_col": self.exp_avg_sq_col[name]}
                      for name in self.exp_avg_sq_row})
        return state

    def _load_named_state(self, state):
        mine = self._named_state()
        if set(state) != set(mine):
            missing, extra = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
            raise ValueError(f"checkpoint's AdaLomo statistics do not match this model: missing {missing[:3]}, "
                             f"unexpected {extra[:3]}")
        for name, entry in mine.items():  # check everything before writing anything
            for key, tensor in entry.items():
                saved = state[name].get(key)
                if saved is None or saved.shape != tensor.shape:
                    raise ValueError(f"checkpoint's {key} for {name!r} is missing or has the wrong shape")
        for name, entry in mine.items():
            for key, tensor in entry.items():
                tensor.copy_(state[name][key])
