"""Live-bytes accounting by category, measured at the dispatcher.

``MemoryTracker`` is a ``TorchDispatchMode``: every tensor an ATen op returns (factory ops included)
has its storage registered once, with a finalizer that subtracts the bytes when the storage dies. So
the total is the bytes of all live storages, exactly, on real tensors and under ``FakeTensorMode``
alike (a fake storage knows its size and dies like a real one). Kernels that allocate scratch inside
one op (a custom op's C++ body, BLAS workspaces) are not seen: the op is one dispatch.

Categories:
    params           parameter storages (adopted when tracking starts)
    grads            storages ever seen as some parameter's ``.grad``
    optimizer_state  what the optimizer keeps between steps (its ``state``, fp32 master weights)
    activations      created during the forward pass (saved for backward, checkpoints, logits)
    temporaries      created during backward or the update and not a grad or state: activation
                     gradients, recomputed (checkpointed) layers, fp32 copies, kernel outputs
    other            buffers and inputs present before the step

Besides these, ``host`` (``HOST``) counts storages allocated in ``phase(HOST)``: copies a method keeps in
host memory (HiFT's offloaded optimizer state). They are tallied apart (``MemoryReport.host_peak``), never
in the total or its peak, which are the accelerator's.

A storage created during backward/update is provisionally a temporary; if it later turns out to be a
gradient or optimizer state it is moved, and the breakdown recorded at the peak is corrected too.
"""
from __future__ import annotations

import contextlib
import itertools
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_iter

CATEGORIES = ("params", "grads", "optimizer_state", "activations", "temporaries", "other")
HOST = "host"  # host memory: tallied, not part of the (device) total
GiB = float(1 << 30)


@dataclass
class _Record:
    uid: int
    nbytes: int
    category: str
    provisional: bool


@dataclass
class MemoryReport:
    """Peak of the tracked live bytes, with the split by category at that moment."""

    peak_bytes: int
    at_peak: dict[str, int]
    final: dict[str, int] = field(default_factory=dict)  # live at the end, by category
    host_peak: int = 0   # peak of the bytes in host memory (``HOST``), not in ``peak_bytes``
    host_final: int = 0


class MemoryTracker(TorchDispatchMode):
    """Counts live storage bytes by category; ``with tracker:`` (inside a FakeTensorMode, if any)."""

    def __init__(self):
        super().__init__()
        self._live: dict[int, _Record] = {}          # storage key (_cdata) -> record
        self._by_category = dict.fromkeys(CATEGORIES, 0)
        self._total = 0
        self._host = 0
        self._host_peak = 0
        self._uids = itertools.count()
        self._moved: dict[int, str] = {}             # uid -> category it was moved to
        self._default = ("other", False)
        self._peak = 0
        self._peak_split = dict(self._by_category)
        self._peak_provisional: list[tuple[int, int, str]] = []
        self._peak_dirty = False

    # --- registration ---------------------------------------------------------------------------
    def _track_storage(self, st: torch.UntypedStorage, category: str, provisional: bool) -> _Record:
        key = st._cdata
        rec = self._live.get(key)
        nbytes = st.nbytes()
        if rec is not None:
            if rec.nbytes != nbytes:  # a storage resized in place (out= ops)
                self._add(rec.category, nbytes - rec.nbytes)
                rec.nbytes = nbytes
            return rec
        rec = _Record(next(self._uids), nbytes, category, provisional)
        self._live[key] = rec
        weakref.finalize(st, self._release, key, rec.uid)
        self._add(category, nbytes)
        return rec

    def _release(self, key: int, uid: int) -> None:
        rec = self._live.get(key)
        if rec is None or rec.uid != uid:
            return
        del self._live[key]
        self._add(rec.category, -rec.nbytes)

    def _add(self, category: str, delta: int) -> None:
        if category == HOST:
            self._host += delta
            self._host_peak = max(self._host_peak, self._host)
            return
        if delta < 0 and self._peak_dirty:
            self._snapshot()  # the peak is about to be left: remember what made it up
        self._by_category[category] += delta
        self._total += delta
        if self._total > self._peak:
            self._peak = self._total
            self._peak_dirty = True

    def _snapshot(self) -> None:
        self._peak_split = dict(self._by_category)
        self._peak_provisional = [(r.uid, r.nbytes, r.category) for r in self._live.values() if r.provisional]
        self._peak_dirty = False

    def adopt(self, tensors, category: str) -> None:
        """Count tensors that already exist (parameters, buffers, inputs) under ``category``."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self.mark(t, category)

    def mark(self, t: torch.Tensor, category: str) -> None:
        """Put ``t``'s storage in ``category`` (registering it if new), e.g. a gradient or a state."""
        rec = self._track_storage(t.untyped_storage(), category, provisional=False)
        if rec.category != category:
            self._add(rec.category, -rec.nbytes)
            self._add(category, rec.nbytes)
            if rec.provisional:
                self._moved[rec.uid] = category
            rec.category = category
        rec.provisional = False

    @contextlib.contextmanager
    def phase(self, category: str, provisional: bool = False):
        """New storages created inside are counted as ``category``; ``provisional`` ones may be moved later."""
        saved = self._default
        self._default = (category, provisional)
        try:
            yield
        finally:
            self._default = saved

    def watch_grads(self, params) -> list:
        """Mark every gradient as it is accumulated (hooks run before any optimizer hook registered later)."""
        def hook(param):
            if param.grad is not None:  # a fused weight's hook fires with no gradient
                self.mark(param.grad, "grads")
        return [p.register_post_accumulate_grad_hook(hook) for p in params if p.requires_grad]

    # --- dispatch ---------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        category, provisional = self._default
        for t in tree_iter(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track_storage(t.untyped_storage(), category, provisional)
        return out

    # --- results ----------------------------------------------------------------------------------
    def reset_peak(self) -> None:
        self._peak = self._total
        self._host_peak = self._host
        self._snapshot()

    @property
    def live_bytes(self) -> int:
        return self._total

    def report(self) -> MemoryReport:
        if self._peak_dirty:
            self._snapshot()
        split = dict(self._peak_split)
        for uid, nbytes, category in self._peak_provisional:
            moved = self._moved.get(uid)
            if moved is not None and moved != category:
                split[category] -= nbytes
                split[moved] += nbytes
        return MemoryReport(self._peak, split, dict(self._by_category), self._host_peak, self._host)


def peak_bytes_profiled(fn) -> int:
    """Peak of the bytes allocated and not yet freed while ``fn()`` runs (above what was live before), from
    the torch profiler's allocator events: every c10 allocation, including those inside custom ops.
    An independent check on ``MemoryTracker``, for real tensors only."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak
