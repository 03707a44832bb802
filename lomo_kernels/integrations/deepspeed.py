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
import logging
import math

import torch
import torch.distributed as dist
from torch import nn

from .. import ops
from ..optim.adalomo import AdaLomo
from ..optim.base import FusedOptimizer
from ..optim.lomo import Lomo
from .zero3_shard import STRATEGIES, check_resume, check_zero3_config, choose_strategy, flat_range_blocks, \
    shard_range

logger = logging.getLogger("lomo_kernels")

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
        if route == "reduce_scatter":
            padded = self._padded_buffer(param, info)  # the one layer gradient alive now
            torch.mm(dy2.t().to(torch.float32), x2.to(torch.float32), out=padded[:info.numel].view(out_f, in_f))
            self._apply_shard_grad(param, info, self._reduce_scatter(padded, info))
            return
        xs, dys = self._gather_tokens(x2), self._gather_tokens(dy2)
        dys.mul_(1.0 / self.world_size)  # the data-parallel mean, as DeepSpeed averages gradients
        blocks = flat_range_blocks(info.start, info.end, in_f)
        if self._needs_shard_grad():
            grad = xs.new_empty(info.end - info.start, dtype=torch.float32)  # shard-sized, not weight-sized
            for b in blocks:
                torch.mm(dys[:, b.row0:b.row0 + b.rows].t().to(torch.float32),
                         xs[:, b.col0:b.col0 + b.cols].to(torch.float32),
                         out=grad[b.flat_start - info.start:][:b.numel].view(b.rows, b.cols))
            self._apply_shard_grad(param, info, grad)
            return
        for b in blocks:
            piece = param.ds_tensor.narrow(0, b.flat_start - info.start, b.numel).view(b.rows, b.cols)
            with _param_data(param, piece):
                self.optimizer.linear(param, xs[:, b.col0:b.col0 + b.cols], dys[:, b.row0:b.row0 + b.rows])

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
            self._apply_shard_grad(param, info, self._reduce_scatter(padded, info))
            return
        idx, rows = self._gather_tokens(idx), self._gather_tokens(rows)
        row0, row1 = info.start // dim, -(-info.end // dim)
        covering = rows.new_empty((row1 - row0, dim), dtype=torch.float32)  # shard-sized, not weight-sized
        _embedding_grad(idx, rows, padding_idx, row0, row1, covering)
        grad = covering.view(-1)[info.start - row0 * dim:info.end - row0 * dim].mul_(1.0 / self.world_size)
        self._apply_shard_grad(param, info, grad)

    def dense(self, param, grad):
        if not self._active():
            return
        info = self.shards[id(param)]
        self.last_strategy[info.name] = "reduce_scatter"
        padded = self._padded_buffer(param, info)
        padded[:info.numel].copy_(grad.reshape(-1))
        self._apply_shard_grad(param, info, self._reduce_scatter(padded, info))

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

    def _apply_shard_grad(self, param, info: _ShardInfo, grad: torch.Tensor):
        """Apply the optimizer's rule to this rank's shard from its mean gradient (flat, maybe empty)."""
        if self._needs_shard_grad():
            self._adalomo_shard_update(param, info, grad)  # collective: also with an empty shard
        elif grad.numel():
            with _param_data(param, _flat_shard(param, info)):
                self.optimizer.dense(param, grad)

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
        if shard.numel():
            ops.dense_update_(shard, u, lr=lr, weight_decay=opt.weight_decay_for(param), coef=coef,
                              rounding=opt._rounding_for(param), seed=opt._seed_for(param), backend=opt.backend,
                              name=info.name)

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
            # Every full copy still gathered (persistent parameters, leftovers) predates the update.
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


def attach(optimizer: FusedOptimizer, ds_config: dict, *, strategy: str = "auto") -> Zero3Updater:
    """Make ``optimizer`` (``Lomo`` or ``AdaLomo``, constructed on a model built under
    ``deepspeed.zero.Init``, before its first step) update ZeRO-3 shards.

    Checks everything before touching the model: DeepSpeed version, the config
    (``zero3_shard.check_zero3_config``), that every trainable parameter is partitioned over one group,
    no tied parameters. Resizes AdaLomo's statistics to the full/shard shapes. Returns the updater;
    ``updater.engine`` is DeepSpeed's engine (do not call it: call the model).
    """
    deepspeed = _deepspeed()
    check_deepspeed_version(deepspeed.__version__)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not isinstance(optimizer, FusedOptimizer):
        raise TypeError(f"attach takes a lomo_kernels fused optimizer (Lomo), got {type(optimizer).__name__}")
    check_zero3_config(ds_config)
    if not isinstance(optimizer, (Lomo, AdaLomo)):
        raise NotImplementedError(f"{type(optimizer).__name__} under ZeRO-3 is not supported (Lomo and AdaLomo are)")
    model = optimizer.model
    group = _partition_group(model)
    if isinstance(optimizer, AdaLomo):
        bad = [(n, tuple(p.ds_shape)) for n, p in model.named_parameters() if p.requires_grad and len(p.ds_shape) > 2]
        if bad:
            raise ValueError(f"AdaLomo handles 1-D and 2-D parameters only; got {bad[:3]}")
        if optimizer.step_count:
            raise ValueError("attach the AdaLomo optimizer before its first step (its statistics get resized)")
    tied = optimizer.held.shared_weights
    if tied:
        raise ValueError(f"tied parameters {tied} are not supported under ZeRO-3 (their uses' gradients would have "
                         "to be summed in a full-size buffer); untie them (e.g. tie_word_embeddings=False)")
    _restore_plain_linear()
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    updater = Zero3Updater(optimizer, engine, group, strategy)
    if isinstance(optimizer, AdaLomo):
        _shard_adalomo_statistics(optimizer, updater)
    optimizer.reroute(updater)
    model.register_forward_hook(updater.snapshot_backward_counters)
    return updater


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
