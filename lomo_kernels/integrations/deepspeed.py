"""Fused updates (``Lomo``, ``AdaLomo``) on models sharded by DeepSpeed ZeRO stage 3.

Route (works on DeepSpeed 0.19.x, see docs/zero3.md): build the model under
``deepspeed.zero.Init``, construct the fused optimizer, then ``attach(optimizer, ds_config)``. It
calls ``deepspeed.initialize`` *without* an optimizer, which installs ZeRO-3's gather/release hooks
(``DeepSpeedZeRoOffload``) on the model; training then calls the model itself (not the engine) and
``optimizer.fused_backward(loss, lr)`` as on one device. The engine's own backward is never used: it
refuses a plain ``loss.backward()`` and cannot run ``engine.backward`` without a DeepSpeed optimizer.

During backward DeepSpeed has gathered each module's full weight; the fused Functions hand
``(weight, x, dy)`` to ``Zero3Updater``, which computes the *data-parallel mean* gradient of this
rank's flat shard ``param.ds_tensor`` and has the optimizer apply its rule there, by one of:

* ``reduce_scatter``: form the layer's gradient (one layer's alive at a time), reduce-scatter it
  over the partition group, update the shard from its slice;
* ``activation_gather``: all-gather the layer's X and dY, and apply the fused linear update to the
  (at most three) rectangles the shard covers. No gradient tensor exists at all.

``auto`` picks per layer by communication volume (``zero3_shard.choose_strategy``). Embeddings take
the same two routes with a dense, shard-sized gradient (the fused embedding rule equals the dense
rule with zero rows for untouched tokens). The norm phase (clipping) accumulates each shard's partial
sum of squares and non-finite count; one all-reduce at the end of the backward makes them global.
After an applying backward every gathered full copy is stale, so all of them are released and the
next forward gathers the updated shards.

``AdaLomo``'s rule needs whole-parameter statistics, so its applying phase works from the shard's
mean gradient (materialized: 1/W of a weight, from either route): partial row/column sums of g² are
all-reduced (m+n numbers) into factored statistics kept identical on every rank, and ``[Σu², Σw²]``
are all-reduced (the update-RMS clip and the parameter-RMS learning-rate scale). The statistics of
1-D parameters are sharded like the parameters.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math

import torch
import torch.distributed as dist
from torch import nn

from .. import ops
from ..kernels import reference, reference_adamw
from ..ops._common import LOW_PRECISION, UpdateRule, apply_rule_
from ..optim.adalomo import AdaLomo
from ..optim.adamw import AdamW
from ..optim.apollo import Apollo, _Projected
from ..optim.base import FusedOptimizer
from ..optim.lomo import Lomo
from .zero3_shard import STRATEGIES, check_resume, check_zero3_config, choose_strategy, flat_range_blocks, \
    shard_range

logger = logging.getLogger("lomo_kernels")

SUPPORTED_OPTIMIZERS = (Lomo, AdaLomo, AdamW)  # AdamW covers Apollo and ApolloMini (its subclasses)

SUPPORTED_DEEPSPEED = ((0, 19), (0, 19))  # (min, max) major.minor verified; see docs/zero3.md


def _deepspeed():
    try:
        import deepspeed
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("ZeRO-3 support needs deepspeed: pip install --no-build-isolation deepspeed==0.19.8") from err
    return deepspeed


def check_deepspeed_version(version: str) -> None:
    major_minor = tuple(int(part) for part in version.split(".")[:2])
    low, high = SUPPORTED_DEEPSPEED
    if not low <= major_minor <= high:
        raise RuntimeError(f"deepspeed {version} is not supported by lomo_kernels' ZeRO-3 integration "
                           f"(verified: {low[0]}.{low[1]}.x to {high[0]}.{high[1]}.x); it relies on ZeRO-3 internals "
                           "(ds_tensor layout, DeepSpeedZeRoOffload hooks)")


class _ShardInfo:
    """Where this rank's shard of one parameter sits in the flattened full parameter."""

    def __init__(self, name: str, param: nn.Parameter, rank: int):
        self.name = name
        self.shape = tuple(param.ds_shape)
        self.numel = int(param.ds_numel)
        self.partition_size = int(param.ds_tensor.numel())
        self.start, self.end = shard_range(self.numel, self.partition_size, rank)


class Zero3Updater:
    """The ``Updater`` (lomo_kernels.routing) of a ZeRO-3 model: redirects each fused update of a gathered
    weight to this rank's shard, with the data-parallel mean gradient; the optimizer's rule does the math."""

    def __init__(self, optimizer: FusedOptimizer, engine, group, strategy: str):
        self.optimizer = optimizer
        self.engine = engine
        self.group = group
        self.rank = dist.get_rank(group=group)
        self.world_size = dist.get_world_size(group=group)
        self.strategy = strategy
        self.shards = {id(p): _ShardInfo(n, p, self.rank) for n, p in optimizer.model.named_parameters()
                       if p.requires_grad}
        self.last_strategy: dict[str, str] = {}  # parameter name -> route its last update took
        self._end_queued = False
        self._backward_counters: dict[nn.Module, tuple[int, int]] = {}

    # --- Updater protocol ------------------------------------------------------------------------

    def _active(self) -> bool:
        """A skipped step's backward (non-finite norm, the same decision on every rank) only frees
        the graph: no communication, no update."""
        if self.optimizer.phase == "skip":
            return False
        self._queue_end_of_backward()
        return True

    def linear(self, param, x, dy):
        if not self._active():
            return
        info = self.shards[id(param)]
        out_f, in_f = info.shape
        x2, dy2 = x.reshape(-1, in_f), dy.reshape(-1, out_f)
        route = self._route(info, choose_strategy(x2.shape[0] * self.world_size * (in_f + out_f), in_f * out_f))
        # APOLLO: the projected gradient R from this rank's own tokens, summed over ranks (rank-sized)
        projected = self._projected_gradient(param, info, x2=x2, dy2=dy2)
        if route == "reduce_scatter":
            padded = self._padded_buffer(param, info)  # the one layer gradient alive now
            torch.mm(dy2.t().to(torch.float32), x2.to(torch.float32), out=padded[:info.numel].view(out_f, in_f))
            self._apply_source(param, info, _FlatSource(info, self._reduce_scatter(padded, info)), projected)
            return
        xs, dys = self._gather_tokens(x2), self._gather_tokens(dy2)
        dys.mul_(1.0 / self.world_size)  # the data-parallel mean, as DeepSpeed averages gradients
        self._apply_source(param, info, _ActivationSource(info, xs, dys), projected)

    def embedding(self, param, indices, dy, padding_idx):
        if not self._active():
            return
        info = self.shards[id(param)]
        vocab, dim = info.shape
        idx, rows = indices.reshape(-1), dy.reshape(-1, dim)
        route = self._route(info, choose_strategy(idx.numel() * self.world_size * (dim + 1), vocab * dim))
        if route == "reduce_scatter":
            padded = self._padded_buffer(param, info)  # one full embedding gradient
            _embedding_grad(idx, rows, padding_idx, 0, vocab, padded[:info.numel].view(vocab, dim))
            self._apply_source(param, info, _FlatSource(info, self._reduce_scatter(padded, info)))
            return
        idx, rows = self._gather_tokens(idx), self._gather_tokens(rows)
        row0, row1 = info.start // dim, -(-info.end // dim)
        covering = rows.new_empty((row1 - row0, dim), dtype=torch.float32)  # shard-sized, not weight-sized
        _embedding_grad(idx, rows, padding_idx, row0, row1, covering)
        grad = covering.view(-1)[info.start - row0 * dim:info.end - row0 * dim].mul_(1.0 / self.world_size)
        self._apply_source(param, info, _FlatSource(info, grad))

    def dense(self, param, grad):
        if not self._active():
            return
        info = self.shards[id(param)]
        self.last_strategy[info.name] = "reduce_scatter"
        projected = self._projected_gradient(param, info, grad=grad)  # the unfused route of a projected weight
        padded = self._padded_buffer(param, info)
        padded[:info.numel].copy_(grad.reshape(-1))
        self._apply_source(param, info, _FlatSource(info, self._reduce_scatter(padded, info)), projected)

    def lm_head_updater(self, param):
        """The fused cross-entropy's LM-head adapter (``Lomo``, ``AdamW`` and an AdamW-ruled ``Apollo`` head,
        ``AdaLomo`` with ``statistics="recompute"``); None (the model's loss from logits) otherwise."""
        opt, info = self.optimizer, self.shards.get(id(param))
        if info is None or not isinstance(opt, (Lomo, AdamW, AdaLomo)):
            return None
        if isinstance(opt, AdaLomo) and (opt.statistics != "recompute" or len(info.shape) != 2):
            return None
        if isinstance(opt, AdamW) and info.name not in opt.exp_avg:  # an APOLLO-projected head
            return None
        return _Zero3LMHead(self, param)

    def keep_head_gathered(self, module, args):
        """Forward pre-hook on the LM head, after DeepSpeed's (which gathered it): a training forward's fused
        loss reads the whole head after the module's forward and in both backwards; stop DeepSpeed's
        post-forward release until the end of the applying backward."""
        if torch.is_grad_enabled():
            for p in module.parameters(recurse=False):
                p.ds_active_sub_modules.add(_KEEP_GATHERED)

    # --- the two routes' pieces --------------------------------------------------------------------

    def _route(self, info: _ShardInfo, automatic: str) -> str:
        route = automatic if self.strategy == "auto" else self.strategy
        self.last_strategy[info.name] = route
        return route

    def _gather_tokens(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's rows, rank-major (ranks must hold equal token counts, as DP micro batches do)."""
        local = local.contiguous()
        out = local.new_empty((self.world_size * local.shape[0], *local.shape[1:]))
        _all_gather_single(out, local, self.group)
        return out

    def _padded_buffer(self, param, info: _ShardInfo) -> torch.Tensor:
        """fp32 [W·P] for a full gradient: its first ``numel`` entries are written, the padding is zero."""
        buffer = torch.empty(info.partition_size * self.world_size, dtype=torch.float32,
                             device=param.ds_tensor.device)
        buffer[info.numel:].zero_()
        return buffer

    def _reduce_scatter(self, padded: torch.Tensor, info: _ShardInfo) -> torch.Tensor:
        """This rank's slice of the mean over ranks of a full padded gradient (each rank passes its own)."""
        shard = padded.new_empty(info.partition_size)
        dist.reduce_scatter_tensor(shard, padded, group=self.group)
        return shard[:info.end - info.start].mul_(1.0 / self.world_size)

    def _needs_shard_grad(self) -> bool:
        """AdaLomo's update needs whole-parameter statistics first; its norm phase is Lomo's."""
        return isinstance(self.optimizer, AdaLomo) and self.optimizer.phase == "apply"

    # --- applying a rule to the shard ---------------------------------------------------------------

    def _apply_source(self, param, info: _ShardInfo, source, projected=None, rule=None):
        """The optimizer's phase on this rank's shard, from the shard's mean gradient ``source``
        (computed from gathered activations or a reduce-scattered slice; maybe empty)."""
        opt = self.optimizer
        if opt.phase == "norm":  # every rule's norm phase is the norm of the shard's gradient
            self._fused_ops(param, info, source)
            return
        with torch.no_grad():
            if isinstance(opt, AdaLomo):
                self._adalomo_shard_update(param, info, source.materialize())  # collective: also when empty
            elif projected is not None:
                self._apollo_shard_update(param, info, source, projected)  # collective: also when empty
            elif isinstance(opt, AdamW):
                self._adamw_shard_update(param, info, source, rule)
            else:
                self._lomo_shard_update(param, info, source, rule)

    def _fused_ops(self, param, info: _ShardInfo, source):
        """The optimizer's own phase (its fused ops, on its backend) on the source's pieces of the shard."""
        opt = self.optimizer
        if isinstance(source, _ActivationSource):
            for b in source.blocks:
                with _param_data(param, _piece(param.ds_tensor, info, b.flat_start, b.rows, b.cols)):
                    opt.linear(param, *source.block_inputs(b))
        elif source.numel:
            with _param_data(param, _flat_shard(param, info)):
                opt.dense(param, source.grad)

    def _lomo_shard_update(self, param, info: _ShardInfo, source, rule=None):
        opt = self.optimizer
        rounding = opt._rounding_for(param)
        if not (rounding == "stochastic" and param.ds_tensor.dtype in LOW_PRECISION):
            self._fused_ops(param, info, source)  # the rounding does not depend on the element's index
            return
        # stochastic rounding keyed by each element's flat index in the full parameter (a single
        # process's bits); one rule (one seed) for the whole use, as one device makes one call
        if rule is None:
            rule = UpdateRule.make(opt.lr, opt.weight_decay_for(param), opt.clip_coef, opt.loss_scale,
                                   opt.clip_grad_value, rounding, opt._seed_for(param), info.name)
        nonfinite = opt.nonfinite_counter(param)
        for chunk in source.chunks():
            apply_rule_(_piece(param.ds_tensor, info, chunk.flat_start, chunk.rows, chunk.cols), chunk.grad, rule,
                        flat_offset=chunk.flat_start, nonfinite=nonfinite)

    def _adamw_shard_update(self, param, info: _ShardInfo, source, rule=None):
        """``AdamW``'s rule (and ``Apollo``'s AdamW part) on the shard with shard-local moments ``m``, ``v``;
        every element's rounding (weight, bf16 state) keyed by its flat index in the full parameter."""
        opt = self.optimizer
        if rule is None:
            rule = opt.adam_rule(param)  # once per use: one seed, as on one device
        m, v = opt.exp_avg[info.name], opt.exp_avg_sq[info.name]
        nonfinite = opt.nonfinite_counter(param)
        for chunk in source.chunks():
            g = reference_adamw.transform_gradient_(chunk.grad, rule)
            args = (info, chunk.flat_start, chunk.rows, chunk.cols)
            reference_adamw.adam_block_(_piece(param.ds_tensor, *args), _piece(m, *args), _piece(v, *args), g, rule,
                                        flat_offset=chunk.flat_start, nonfinite=nonfinite)

    def _projected_gradient(self, param, info: _ShardInfo, *, x2=None, dy2=None, grad=None):
        """APOLLO's ``R`` of a projected weight in its applying phase: ``dyᵀ(x·Pᵀ)`` (right) or ``(dy·P)ᵀx``
        (left) of this rank's tokens, all-reduced to the data-parallel mean (rank-sized, never
        weight-sized), scaled by ``clip_coef / loss_scale``; with the projector ``P``. None otherwise."""
        opt = self.optimizer
        st = getattr(opt, "projectors", {}).get(info.name)
        if st is None or opt.phase != "apply":
            return None
        with torch.no_grad():
            P = opt._projection(st, param)
            if grad is not None:
                g = grad.reshape(info.shape).to(torch.float32)
                R = g @ P.t() if st.right else P.t() @ g
            else:
                x32, dy32 = x2.to(torch.float32), dy2.to(torch.float32)
                R = dy32.t() @ (x32 @ P.t()) if st.right else (dy32 @ P).t() @ x32
            R = R.contiguous()
            dist.all_reduce(R, group=self.group)
            R.mul_(opt.clip_coef / (opt.loss_scale * self.world_size))
        return st, R

    def _apollo_shard_update(self, param, info: _ShardInfo, source, projected):
        """APOLLO's scaled update of the shard: the scale from the all-reduced ``R`` (identical on every
        rank, as are its moments), the limiter's row/column sums of G² from the shard's blocks (m+n
        numbers all-reduced), then ``W <- decay·W - k·row_i·G_ij·col_j`` on the shard's elements."""
        opt = self.optimizer
        st, R = projected
        rows, cols = info.shape
        inv_scale = 1.0 / opt.loss_scale

        def sq_sums():
            sums = torch.zeros(rows + cols, dtype=torch.float32, device=param.ds_tensor.device)
            for chunk in source.chunks():
                sq = chunk.grad.mul(inv_scale).square_()
                sums[chunk.row0:chunk.row0 + chunk.rows] += sq.sum(dim=1)
                sums[rows + chunk.col0:rows + chunk.col0 + chunk.cols] += sq.sum(dim=0)
            dist.all_reduce(sums, group=self.group)
            sums.mul_(opt.clip_coef ** 2)
            return sums[:rows], sums[rows:]

        s, k = opt._scale_and_multiplier(st, R, sq_sums)
        row, col, scalar = opt._vectors(st, s, info.shape)
        args = opt._update_args(param, k * scalar * opt.clip_coef)
        rule = UpdateRule.make(args["lr"], args["weight_decay"], args["coef"], args["loss_scale"], None,
                               args["rounding"], args["seed"], info.name)
        scaled = dataclasses.replace(rule, inv_loss_scale=1.0)
        nonfinite = opt.nonfinite_counter(param)
        for chunk in source.chunks():
            g = chunk.grad.mul(rule.inv_loss_scale).mul_(row[chunk.row0:chunk.row0 + chunk.rows, None])
            g.mul_(col[chunk.col0:chunk.col0 + chunk.cols])
            apply_rule_(_piece(param.ds_tensor, info, chunk.flat_start, chunk.rows, chunk.cols), g, scaled,
                        flat_offset=chunk.flat_start, nonfinite=nonfinite)

    def _adalomo_shard_update(self, param, info: _ShardInfo, grad: torch.Tensor):
        """AdaLomo's rule (optim/adalomo.py) on a flat shard, with whole-parameter statistics."""
        opt = self.optimizer
        g = grad / opt.loss_scale
        if opt.clip_grad_value is not None:
            g.clamp_(-opt.clip_grad_value, opt.clip_grad_value)
        if opt.clip_coef != 1.0:
            g.mul_(opt.clip_coef)
        if len(info.shape) == 1:
            beta = opt.beta2t()
            v = opt.exp_avg_sq[info.name].mul_(beta).add_(g * g + opt.eps[0], alpha=1.0 - beta)
            u = g.mul_(v.rsqrt())
        else:
            rows, cols = info.shape
            blocks = [(b, g[b.flat_start - info.start:][:b.numel].view(b.rows, b.cols))
                      for b in flat_range_blocks(info.start, info.end, cols)]
            sums = g.new_zeros(rows + cols)  # Σ_j g², then Σ_i g², over this shard's part of each row/column
            for b, gb in blocks:
                sq = gb * gb
                sums[b.row0:b.row0 + b.rows] += sq.sum(dim=1)
                sums[rows + b.col0:rows + b.col0 + b.cols] += sq.sum(dim=0)
            dist.all_reduce(sums, group=self.group)
            row_scale, col_scale = opt.update_factored_stats(info.name, sums[:rows] / cols, sums[rows:] / rows)
            for b, gb in blocks:
                gb.mul_(row_scale[b.row0:b.row0 + b.rows, None]).mul_(col_scale[b.col0:b.col0 + b.cols])
            u = g
        shard = _flat_shard(param, info)
        totals = torch.stack([u.double().square().sum(), shard.double().square().sum()])
        dist.all_reduce(totals, group=self.group)
        update_sq, param_sq = totals.tolist()
        coef = opt.normalizer(update_sq, info.numel)
        lr = opt.lr * max(opt.eps[1], math.sqrt(param_sq / info.numel))  # AdaLomo.scaled_lr on the whole W
        rounding, seed = opt._rounding_for(param), opt._seed_for(param)  # one seed per use, on every rank
        if not shard.numel():
            return
        if rounding == "stochastic" and shard.dtype in LOW_PRECISION:  # keyed by the full parameter's index
            rule = UpdateRule.make(lr, opt.weight_decay_for(param), coef, 1.0, None, rounding, seed, info.name)
            apply_rule_(shard, u, rule, flat_offset=info.start, nonfinite=opt.nonfinite_counter(param))
        else:
            ops.dense_update_(shard, u, lr=lr, weight_decay=opt.weight_decay_for(param), coef=coef,
                              rounding=rounding, seed=seed, backend=opt.backend, name=info.name,
                              nonfinite=opt.nonfinite_counter(param))


    # --- once per backward -------------------------------------------------------------------------

    def _queue_end_of_backward(self):
        if not self._end_queued:
            self._end_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def snapshot_backward_counters(self, model, inputs, output):
        """Forward hook on the root module, after DeepSpeed's: remember its per-module backward counters."""
        self._backward_counters = {m: (m.applied_pre_backward_ref_cnt, m.ds_grads_remaining) for m in model.modules()
                                   if "applied_pre_backward_ref_cnt" in m.__dict__ and hasattr(m, "ds_grads_remaining")}

    def _rearm_backward_hooks(self):
        """DeepSpeed counts one gather per module per forward and releases when a module's input
        gradients are all done; the norm phase's backward used both up. Restore them for the second
        (applying) backward over the same graph, so it gathers and releases layer by layer again."""
        for module, (pre_backward, grads_remaining) in self._backward_counters.items():
            module.applied_pre_backward_ref_cnt = pre_backward
            module.ds_grads_remaining = grads_remaining

    def _end_of_backward(self):
        self._end_queued = False
        if self.optimizer.phase == "norm":
            self._all_reduce_norm_stats()
            self._rearm_backward_hooks()
        else:
            # Every full copy still gathered (persistent parameters, leftovers, the fused loss's LM head)
            # predates the update.
            for p in self.optimizer.model.parameters():
                p.ds_active_sub_modules.discard(_KEEP_GATHERED)
            self.engine.empty_partition_cache()

    def _all_reduce_norm_stats(self):
        """One collective per step: [Σ shard sums of squares, Σ non-finite counts] over the group.
        Relies on FusedOptimizer keeping the stats in ``_norm_stats`` (device -> float32 [2])."""
        stats = self.optimizer._norm_stats
        device = next(iter(stats)) if stats else torch.device("cpu")
        total = torch.zeros(2, dtype=torch.float64, device=device)
        for value in stats.values():
            total += value.to(device=device, dtype=torch.float64)
        dist.all_reduce(total, group=self.group)
        stats.clear()
        stats[device] = total

    # --- checkpoints of the shards -----------------------------------------------------------------

    def state_dict(self) -> dict:
        """This rank's shards (plus the layout they fit); pair with ``load_state_dict`` on the same layout."""
        params = dict(self.optimizer.model.named_parameters())
        return {"world_size": self.world_size, "rank": self.rank, "optimizer": self.optimizer.state_dict(),
                "shards": {info.name: _flat_shard(params[info.name], info).detach().clone()
                           for info in self.shards.values()}}

    def load_state_dict(self, state: dict) -> None:
        check_resume(state["world_size"], state["rank"], self.world_size, self.rank)
        params = dict(self.optimizer.model.named_parameters())
        shards = state["shards"]
        for info in self.shards.values():
            saved = shards.get(info.name)
            if saved is None or saved.numel() != info.end - info.start:
                raise ValueError(f"shard checkpoint does not match parameter {info.name!r} "
                                 f"(expected {info.end - info.start} elements, got "
                                 f"{None if saved is None else saved.numel()})")
        self.optimizer.load_state_dict(state["optimizer"])  # checks its own state before writing it
        with torch.no_grad():
            for info in self.shards.values():
                _flat_shard(params[info.name], info).copy_(shards[info.name])
        self.engine.empty_partition_cache()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The full parameters, gathered on every rank (for saving or checking; costs the whole model)."""
        model = self.optimizer.model
        with _deepspeed().zero.GatheredParameters(list(model.parameters())):
            return {name: p.detach().clone() for name, p in model.named_parameters()}


@contextlib.contextmanager
def _param_data(param: nn.Parameter, data: torch.Tensor):
    """Let the optimizer see ``param`` (its identity: name, rounding seed, state) with ``data`` as its
    values, so its rule writes into the shard; restore the gathered full tensor afterwards."""
    saved = param.data
    param.data = data
    try:
        yield
    finally:
        param.data = saved


def _flat_shard(param, info: _ShardInfo) -> torch.Tensor:
    """The valid part of ``param.ds_tensor`` (the last ranks' partitions end in padding)."""
    return param.ds_tensor.narrow(0, 0, info.end - info.start)


def _piece(flat: torch.Tensor, info: _ShardInfo, flat_start: int, rows: int, cols: int) -> torch.Tensor:
    """The ``[rows, cols]`` view of a shard-shaped flat tensor (the weight shard or a moment) at the full
    parameter's flat offset ``flat_start``."""
    return flat.narrow(0, flat_start - info.start, rows * cols).view(rows, cols)


class _Chunk:
    """Rows ``[row0, row0+rows)`` x columns ``[col0, col0+cols)`` of the full parameter (viewed as
    ``[m, n]``; a 1-D one as ``[1, n]``), contiguous at flat offset ``flat_start``, with their fp32 mean
    gradient ``grad`` (``[rows, cols]``, the caller's to modify)."""

    __slots__ = ("flat_start", "row0", "rows", "col0", "cols", "grad")

    def __init__(self, flat_start, row0, rows, col0, cols, grad):
        self.flat_start, self.row0, self.rows, self.col0, self.cols, self.grad = \
            flat_start, row0, rows, col0, cols, grad


def _matrix_cols(info: _ShardInfo) -> int:
    return info.shape[-1] if len(info.shape) == 2 else max(info.numel, 1)


class _FlatSource:
    """The shard's mean gradient as a flat fp32 tensor (reduce-scattered, or an embedding's shard rows)."""

    def __init__(self, info: _ShardInfo, grad: torch.Tensor):
        self.info, self.grad, self.numel = info, grad, grad.numel()

    def materialize(self) -> torch.Tensor:
        return self.grad

    def chunks(self):
        info, cols = self.info, _matrix_cols(self.info)
        for b in flat_range_blocks(info.start, info.end, cols):
            step = reference._rows_per_chunk(b.cols)
            for r in range(0, b.rows, step):
                n = min(step, b.rows - r)
                start = b.flat_start + r * b.cols
                yield _Chunk(start, b.row0 + r, n, b.col0, b.cols,
                             self.grad.narrow(0, start - info.start, n * b.cols).view(n, b.cols))


class _ActivationSource:
    """The mean gradient of the flat range ``[start, end)`` of the full parameter (default: this rank's
    shard) as gathered activations: block ``b`` has gradient ``dys[:, rows_b - row_base]ᵀ · xs[:, cols_b]``
    (``dys`` holds the rows from ``row_base`` on: all of them, or one vocabulary chunk of an LM head),
    computed a chunk of rows at a time (never the weight's size)."""

    def __init__(self, info: _ShardInfo, xs: torch.Tensor, dys: torch.Tensor, start: int | None = None,
                 end: int | None = None, row_base: int = 0):
        self.info, self.xs, self.dys, self.row_base = info, xs, dys, row_base
        self.start = info.start if start is None else start
        self.end = info.end if end is None else end
        self.blocks = flat_range_blocks(self.start, self.end, info.shape[1])
        self.numel = self.end - self.start

    def block_inputs(self, b):
        """``(x, dy)`` whose ``dyᵀx`` is block ``b``'s gradient."""
        r0 = b.row0 - self.row_base
        return self.xs[:, b.col0:b.col0 + b.cols], self.dys[:, r0:r0 + b.rows]

    def chunks(self):
        x32, dy32 = self.xs.to(torch.float32), self.dys.to(torch.float32)
        for b in self.blocks:
            step = reference._rows_per_chunk(b.cols)
            for r in range(0, b.rows, step):
                n = min(step, b.rows - r)
                r0 = b.row0 - self.row_base + r
                grad = dy32[:, r0:r0 + n].t() @ x32[:, b.col0:b.col0 + b.cols]
                yield _Chunk(b.flat_start + r * b.cols, b.row0 + r, n, b.col0, b.cols, grad)

    def materialize(self) -> torch.Tensor:
        """The range's (shard-sized, not weight-sized) flat fp32 gradient."""
        grad = self.xs.new_empty(self.numel, dtype=torch.float32)
        for chunk in self.chunks():
            grad.narrow(0, chunk.flat_start - self.start, chunk.grad.numel()).copy_(chunk.grad.view(-1))
        return grad


class _Zero3LMHead:
    """The fused cross-entropy's ``LMHeadUpdater`` for a ZeRO-3 LM head (``lomo_kernels.fused_cross_entropy``):
    the loss runs on this rank's tokens with the gathered head (kept gathered from the forward to the end
    of the applying backward, as DeepSpeed gathers a module for its forward and backward); per vocabulary
    chunk ``[v0, v1)`` the chunk's ``dr`` of every rank is all-gathered (``H`` once per pass), and this rank
    updates only the part of rows ``[v0, v1)`` its shard holds (activation-gather: neither the logits nor
    any gradient rows beyond chunk x shard exist). ``Lomo`` and ``AdamW`` (``Apollo``'s AdamW-ruled head) in
    one pass; ``AdaLomo`` in its three (row/column sums of u², then Σ(r u c)², then the update), each
    pass's partial statistics all-reduced at its end (m+n numbers, then two)."""

    def __init__(self, updater: "Zero3Updater", param):
        self.z, self.param, self.info = updater, param, updater.shards[id(param)]
        self.hs, self.rule, self.ada = None, None, None

    def passes(self, weight):
        z, opt = self.z, self.z.optimizer
        self.hs, self.rule = None, None
        if not z._active():
            return ()
        z.last_strategy[self.info.name] = "fused_loss"
        if opt.phase == "apply" and isinstance(opt, AdaLomo):
            rows, cols = self.info.shape
            device = self.param.ds_tensor.device
            self.ada = dict(sums=torch.zeros(rows + cols, dtype=torch.float32, device=device),
                            stats=torch.zeros(2, dtype=torch.float64, device=device))
            return ("sums", "scaled_norm", "apply")
        if opt.phase == "apply" and isinstance(opt, AdamW):
            self.rule = opt.adam_rule(self.param)  # one rule (step, seed) for every chunk
        elif opt.phase == "apply":
            rounding = opt._rounding_for(self.param)
            if rounding == "stochastic" and self.param.ds_tensor.dtype in LOW_PRECISION:
                # one seed for the step, as the single-device LomoHead
                self.rule = UpdateRule.make(opt.lr, opt.weight_decay_for(self.param), opt.clip_coef, opt.loss_scale,
                                            opt.clip_grad_value, rounding, opt._seed_for(self.param), self.info.name)
        return (opt.phase,)

    def chunk(self, pass_name, weight, v0, v1, x, dy):
        z, info = self.z, self.info
        if self.hs is None:  # the same H for every chunk of a pass
            self.hs = z._gather_tokens(x)
        dys = z._gather_tokens(dy).mul_(1.0 / z.world_size)  # collective: every rank, every chunk
        d = info.shape[1]
        start, end = max(info.start, v0 * d), min(info.end, v1 * d)
        if start >= end:
            return
        source = _ActivationSource(info, self.hs, dys, start, end, row_base=v0)
        if pass_name in ("sums", "scaled_norm", "apply") and isinstance(z.optimizer, AdaLomo):
            self._adalomo_chunk(pass_name, source)
        else:
            z._apply_source(weight, info, source, rule=self.rule)

    def _adalomo_chunk(self, pass_name, source):
        """AdaLomo's three passes on this rank's part of a chunk (``u = clamp(G / loss_scale, ±clip)``):
        partial row/column sums of u², then partial ``Σ (r_i u_ij c_j)²``, then the update."""
        opt, st, (rows, _) = self.z.optimizer, self.ada, self.info.shape
        with torch.no_grad():
            for chunk in source.chunks():
                u = chunk.grad.mul_(1.0 / opt.loss_scale)
                if opt.clip_grad_value is not None:
                    u.clamp_(-opt.clip_grad_value, opt.clip_grad_value)
                if pass_name == "sums":
                    sq = u * u
                    st["sums"][chunk.row0:chunk.row0 + chunk.rows] += sq.sum(dim=1)
                    st["sums"][rows + chunk.col0:rows + chunk.col0 + chunk.cols] += sq.sum(dim=0)
                    continue
                u.mul_(st["row_scale"][chunk.row0:chunk.row0 + chunk.rows, None])
                u.mul_(st["col_scale"][chunk.col0:chunk.col0 + chunk.cols])
                if pass_name == "scaled_norm":
                    st["stats"][0] += u.double().square().sum()
                else:
                    apply_rule_(_piece(self.param.ds_tensor, self.info, chunk.flat_start, chunk.rows, chunk.cols), u,
                                st["rule"], flat_offset=chunk.flat_start)

    def end_pass(self, pass_name, weight):
        self.hs = None
        opt = self.z.optimizer
        if not isinstance(opt, AdaLomo) or pass_name not in ("sums", "scaled_norm"):
            return
        st, info, group = self.ada, self.info, self.z.group
        rows, cols = info.shape
        coef_sq = opt.clip_coef ** 2
        if pass_name == "sums":  # whole-weight sums (m+n numbers), identical statistics on every rank
            dist.all_reduce(st["sums"], group=group)
            st["row_scale"], st["col_scale"] = opt.update_factored_stats(
                info.name, st["sums"][:rows] * (coef_sq / cols), st["sums"][rows:] * (coef_sq / rows))
            return
        shard = _flat_shard(self.param, info)
        st["stats"][1] = shard.double().square().sum()  # Σw² of the old weight, for lr·RMS(W)
        dist.all_reduce(st["stats"], group=group)
        update_sq, param_sq = st["stats"].tolist()
        coef = opt.clip_coef * opt.normalizer(coef_sq * update_sq, info.numel)
        lr = opt.lr * max(opt.eps[1], math.sqrt(param_sq / info.numel))
        st["rule"] = UpdateRule.make(lr, opt.weight_decay_for(self.param), coef, 1.0, None,
                                     opt._rounding_for(self.param), opt._seed_for(self.param), info.name)


_KEEP_GATHERED = -0x10AD  # a ds_active_sub_modules entry no module has: DeepSpeed does not release the param


def _all_gather_single(out, local, group):
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, local, group=group)


def _embedding_grad(idx, rows, padding_idx, row0, row1, out):
    """Write into ``out`` (fp32 [row1 - row0, dim]) the gradient of embedding rows ``[row0, row1)``
    from the lookups ``idx`` whose output gradients are ``rows``."""
    keep = (idx >= row0) & (idx < row1)
    if padding_idx is not None:
        keep &= idx != padding_idx
    out.zero_().index_add_(0, idx[keep] - row0, rows[keep].to(torch.float32))


def _partition_group(model: nn.Module):
    groups, missing = {}, []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if not hasattr(p, "ds_tensor") or getattr(p, "ds_numel", None) is None:
            missing.append(name)
            continue
        groups.setdefault(id(p.ds_process_group), p.ds_process_group)
    if missing:
        raise ValueError(f"parameters {missing[:3]}{'...' if len(missing) > 3 else ''} are not ZeRO-3 partitioned: "
                         "build the model under deepspeed.zero.Init(config_dict_or_path=ds_config)")
    if len(groups) != 1:
        raise ValueError(f"trainable parameters are partitioned over {len(groups)} different process groups; "
                         "fused ZeRO-3 updates support one data-parallel partition group")
    return next(iter(groups.values()))


def attach(optimizer: FusedOptimizer, ds_config: dict, *, strategy: str = "auto",
           projected: list[str] | None = None) -> Zero3Updater:
    """Make ``optimizer`` (``Lomo``, ``AdaLomo``, ``AdamW``, ``Apollo`` or ``ApolloMini``, constructed on a
    model built under ``deepspeed.zero.Init``, before its first step) update ZeRO-3 shards.

    Checks everything before touching the model: DeepSpeed version, the config
    (``zero3_shard.check_zero3_config``), that every trainable parameter is partitioned over one group,
    no tied parameters. Resizes the optimizer's per-parameter state to the full/shard shapes (AdaLomo's
    statistics; AdamW's moments to this rank's shard). ``Apollo`` built on ``zero.Init``'s placeholders
    saw no 2-D weight, so its projected weights are chosen here from the full shapes: ``projected``
    (names), by default Apollo's own default set (``nn.Linear``/``Conv1D`` weights but the LM head).
    Returns the updater; ``updater.engine`` is DeepSpeed's engine (do not call it: call the model).
    """
    deepspeed = _deepspeed()
    check_deepspeed_version(deepspeed.__version__)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not isinstance(optimizer, FusedOptimizer):
        raise TypeError(f"attach takes a lomo_kernels fused optimizer (Lomo), got {type(optimizer).__name__}")
    check_zero3_config(ds_config)
    if not isinstance(optimizer, SUPPORTED_OPTIMIZERS):
        raise NotImplementedError(f"{type(optimizer).__name__} under ZeRO-3 is not supported "
                                  f"({', '.join(c.__name__ for c in SUPPORTED_OPTIMIZERS)} are)")
    if projected is not None and not isinstance(optimizer, Apollo):
        raise ValueError(f"projected= is for Apollo/ApolloMini, not {type(optimizer).__name__}")
    model = optimizer.model
    group = _partition_group(model)
    if isinstance(optimizer, AdaLomo):
        bad = [(n, tuple(p.ds_shape)) for n, p in model.named_parameters() if p.requires_grad and len(p.ds_shape) > 2]
        if bad:
            raise ValueError(f"AdaLomo handles 1-D and 2-D parameters only; got {bad[:3]}")
    if optimizer.step_count:
        raise ValueError(f"attach the {type(optimizer).__name__} optimizer before its first step (its state gets "
                         "resized to the shards)")
    apollo_names = _apollo_projected(optimizer, projected) if isinstance(optimizer, Apollo) else None
    tied = optimizer.held.shared_weights
    if tied:
        raise ValueError(f"tied parameters {tied} are not supported under ZeRO-3 (their uses' gradients would have "
                         "to be summed in a full-size buffer); untie them (e.g. tie_word_embeddings=False)")
    _restore_plain_linear()
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    updater = Zero3Updater(optimizer, engine, group, strategy)
    if isinstance(optimizer, AdaLomo):
        _shard_adalomo_statistics(optimizer, updater)
    if isinstance(optimizer, Apollo):
        _project_apollo_weights(optimizer, updater, apollo_names)
    if isinstance(optimizer, AdamW):
        _shard_adamw_moments(optimizer, updater)
    optimizer.reroute(updater)
    model.register_forward_hook(updater.snapshot_backward_counters)
    head = model.get_output_embeddings() if getattr(optimizer, "fused_cross_entropy", False) else None
    if head is not None and updater.lm_head_updater(head.weight) is not None:  # the fused loss will engage
        head.register_forward_pre_hook(updater.keep_head_gathered)
    return updater


def _apollo_projected(optimizer: Apollo, projected) -> list[str]:
    """The weights Apollo projects under ZeRO-3 (checked against the full shapes ``ds_shape``)."""
    model = optimizer.model
    params = dict(model.named_parameters())
    if optimizer.projectors:
        raise ValueError("this Apollo already projects weights: it was built on full (gathered) parameters; "
                         "build it on the zero.Init model and let attach choose them (projected=[names])")
    if projected is None:
        try:
            from transformers.pytorch_utils import Conv1D
            kinds = (nn.Linear, Conv1D)
        except ImportError:  # pragma: no cover
            kinds = (nn.Linear,)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        head_weight = getattr(head, "weight", None)
        embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        chosen = {id(m.weight) for m in model.modules()
                  if isinstance(m, kinds) and isinstance(getattr(m, "weight", None), torch.Tensor)
                  and m.weight.requires_grad and len(getattr(m.weight, "ds_shape", ())) == 2
                  and m.weight is not head_weight and id(m.weight) not in embedded}
        names = [n for n, p in params.items() if id(p) in chosen]
    else:
        names = sorted(set(projected))
        unknown = [n for n in names if n not in params or not params[n].requires_grad]
        if unknown:
            raise ValueError(f"projected names {unknown[:3]} are not trainable parameters of the model")
    for name in names:
        shape = tuple(params[name].ds_shape)
        if len(shape) != 2:
            raise ValueError(f"projected parameter {name!r} must be 2-D, got shape {shape}")
        if optimizer.rank > min(shape):
            raise ValueError(f"rank must be <= min(m, n) of every projected weight; {name!r} has shape {shape}, "
                             f"rank is {optimizer.rank} (pass projected=[names] or a smaller rank)")
    return names


def _project_apollo_weights(optimizer: Apollo, updater: "Zero3Updater", names: list[str]) -> None:
    """Give Apollo the projectors it would have built on the full model (apollo-torch's seeds: the
    parameter's 1-based index); their moments (rank-sized) are identical on every rank."""
    params = dict(optimizer.model.named_parameters())
    index = {n: i for i, n in enumerate(params)}
    optimizer.projected_names = frozenset(names)
    optimizer.projectors = {n: _Projected(tuple(params[n].ds_shape), optimizer.rank, optimizer.seed + index[n] + 1,
                                          params[n].ds_tensor.device) for n in names}
    for n in names:
        optimizer.exp_avg.pop(n, None)
        optimizer.exp_avg_sq.pop(n, None)
    optimizer.adam_names -= set(names)


def _shard_adamw_moments(optimizer: AdamW, updater: "Zero3Updater") -> None:
    """AdamW's ``m`` and ``v`` of each (non-projected) parameter cover only this rank's shard: flat, 1/W."""
    params = dict(optimizer.model.named_parameters())
    for name in sorted(optimizer.adam_names):
        info = updater.shards[id(params[name])]
        device = params[name].ds_tensor.device
        optimizer.exp_avg[name] = torch.zeros(info.end - info.start, dtype=optimizer.state_dtype, device=device)
        optimizer.exp_avg_sq[name] = torch.zeros(info.end - info.start, dtype=optimizer.state_dtype, device=device)


def _restore_plain_linear() -> None:
    """``deepspeed.zero.Init`` replaces ``torch.nn.functional.linear`` process-wide by its memory-efficient
    linear (``zero_optimization.memory_efficient_linear``, default true): an autograd Function of its own,
    inside which the router cannot route a held weight. Held weights need the plain ``F.linear`` (routed
    to fused ops, which never save the weight): put it back. Frozen weights then take DeepSpeed's default
    route (the weight is re-gathered for their backward by the module hooks)."""
    from deepspeed.runtime.zero.linear import zero3_linear_wrap
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses

    if torch.nn.functional.linear is zero3_linear_wrap:
        torch.nn.functional.linear = InsertPostInitMethodToModuleSubClasses.linear_bk
        logger.info("lomo_kernels: restored torch.nn.functional.linear (DeepSpeed's memory-efficient linear "
                    "hides weight uses from fused updates; set zero_optimization.memory_efficient_linear=false)")


def _shard_adalomo_statistics(optimizer: AdaLomo, updater: Zero3Updater) -> None:
    """AdaLomo sized its statistics from the placeholder shapes ``zero.Init`` leaves (``[0]``): size
    them from the full shapes instead. 2-D: factored ``R`` [m] and ``C`` [n], identical on every rank;
    1-D: ``V`` covering only this rank's shard."""
    params = dict(optimizer.model.named_parameters())
    for info in updater.shards.values():
        device = params[info.name].ds_tensor.device
        optimizer.exp_avg_sq.pop(info.name, None)
        if len(info.shape) == 1:
            optimizer.exp_avg_sq[info.name] = torch.zeros(info.end - info.start, dtype=torch.float32, device=device)
        else:
            optimizer.exp_avg_sq_row[info.name] = torch.zeros(info.shape[0], dtype=torch.float32, device=device)
            optimizer.exp_avg_sq_col[info.name] = torch.zeros(info.shape[1], dtype=torch.float32, device=device)
