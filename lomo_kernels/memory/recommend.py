"""``plan --recommend``: which combination of optimizations fits the user's GPUs and runs fastest (issue 14).

    lomo-kernels plan --recommend --gpus N --gpu-gib G --model M --seq-len S [--batch-size B]
                      [--gpu-tflops F --gpu-efficiency E --link-gbps L] [--json] [--chart out.png]

Every candidate is a method (each planner method, plus LoRA through peft with the base frozen) ×
activation checkpointing off/on × attention implementation (eager, sdpa, flash_attention_2) × how the
N GPUs are used (one GPU; ZeRO-3 over N; DeepSpeed ZeRO-2 over N for the torch-optimizer methods) ×
micro-batch size (the given one, or the largest that fits).

Memory is measured, never guessed: each candidate's step runs under ``FakeTensorMode`` with the
allocation tracker (``planner.plan``; LoRA by the same tracker on the peft-wrapped fake model). The
big presets are measured at 1 and 2 layers and extrapolated to the full depth (the error checked at
3 layers is printed). The micro-batch size is searched with measurements: a line through batch 1 and
2 proposes a size, that size is measured, and a secant through the measured points corrects it.
ZeRO is arithmetic on the measured split (see ``_per_gpu``).

Time is an *estimate*: FLOPs counted from the traced step (``FlopCounterMode`` on the fake step,
with the fused ``lomo_kernels`` ops counted as 2·T·in·out per weight-gradient GEMM they compute) at
``--gpu-tflops`` × ``--gpu-efficiency``, plus the ZeRO communication bytes of the step at
``--link-gbps`` (no overlap of compute and communication). The assumptions print with the table.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import methods as _methods
from . import planner
from .methods import FUSED_METHODS, StepConfig, Trainer
from .tracker import GiB, MemoryTracker

PARALLEL_MODES = ("single", "zero3", "zero2")
ATTNS = ("sdpa", "eager", "flash_attention_2")
DEFAULT_TFLOPS = 71.0        # RTX 3090-class fp16 tensor-core peak (dense), the LOMO paper's GPU
DEFAULT_EFFICIENCY = 0.4     # fraction of that peak a training step reaches (assumed, not measured)
DEFAULT_LINK_GBPS = 16.0     # GB/s per GPU for ZeRO collectives: PCIe 4.0 x16 without NVLink (assumed)
DEFAULT_MAX_BATCH = 64
CPU_FLOP_CATEGORIES = ("forward", "backward", "optimizer")


# --- candidates -----------------------------------------------------------------------------------

def all_methods() -> tuple:
    """Every method the Trainer knows (``ALL_METHODS`` once it exists, else ``METHODS``)."""
    return tuple(getattr(_methods, "ALL_METHODS", _methods.METHODS))


def torch_adamw_name() -> str:
    """The planner's name for torch.optim.AdamW (``torch-adamw`` once the fused AdamW took ``adamw``)."""
    return "torch-adamw" if "torch-adamw" in all_methods() else "adamw"


def trainer_has_lora() -> bool:
    return "lora" in all_methods()


def _missing(method: str) -> str | None:
    if method == "lomo-optim":
        return None if planner.has_lomo_optim() else planner.LOMO_OPTIM_MISSING
    if method == "lora":
        return None if importlib.util.find_spec("peft") is not None else "lora needs peft (pip install peft)"
    check = getattr(_methods, "missing_requirement", None)
    need = check(method) if check is not None else None
    return None if need is None else f"{method} needs {need} (pip install {need})"


def is_fused(method: str) -> bool:
    return method in FUSED_METHODS


def uses_torch_optimizer(method: str) -> bool:
    """Methods stepped by a torch optimizer after backward (full gradients exist): ZeRO-2 applies to them."""
    return method == "lora" or (method not in FUSED_METHODS and method != "none")


def candidate_methods(requested: list[str] | None = None) -> list[str]:
    """Every method but ``none`` (plus LoRA), less those whose package is missing here."""
    known = [m for m in all_methods() if m != "none"]
    if "lora" not in known:
        known.append("lora")
    if requested:
        for m in requested:
            if m not in known:
                raise ValueError(f"--method: unknown method {m!r}; choose from {', '.join(known)}")
            if _missing(m):
                raise ValueError(f"--method: {_missing(m)}")
        return [m for m in known if m in requested]
    return [m for m in known if not _missing(m)]


def flash_attn_importable() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@dataclass
class Candidate:
    method: str
    checkpointing: bool
    attn: str
    parallel: str            # single | zero3 | zero2
    gpus: int
    batch_size: int = 0      # micro-batch per GPU (0: none fits)
    fits: bool = False
    per_gpu: dict = field(default_factory=dict)      # bytes by category at the peak, per GPU
    total_bytes: int = 0
    flops: float = 0.0       # per GPU per step
    comm_bytes: float = 0.0  # per GPU per step
    compute_s: float = 0.0
    comm_s: float = 0.0
    step_s: float | None = None
    tokens_per_gpu_s: float | None = None
    notes: list = field(default_factory=list)
    why: str = ""
    rank: int = 0
    measured: Measured | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        par = {"single": "1 GPU", "zero3": f"ZeRO-3 x{self.gpus}", "zero2": f"ZeRO-2 x{self.gpus}"}[self.parallel]
        attn = self.attn + ("*" if self.attn == "flash_attention_2" and not flash_attn_importable() else "")
        return f"{self.method} | ckpt {'on' if self.checkpointing else 'off'} | {attn} | {par}"

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GiB

    def row(self) -> dict:
        out = {"rank": self.rank, "method": self.method, "ckpt": self.checkpointing, "attn": self.attn,
               "parallel": self.parallel, "gpus": self.gpus, "micro_batch": self.batch_size, "fits": self.fits}
        out.update({f"{c}_gib": round(self.per_gpu.get(c, 0) / GiB, 3) for c in _SHOWN})
        out["total_gib"] = round(self.total_gib, 3)
        out["tflops_per_step"] = round(self.flops / 1e12, 3)
        out["comm_gb_per_step"] = round(self.comm_bytes / 1e9, 3)
        out["est_step_s"] = None if self.step_s is None else round(self.step_s, 4)
        out["est_tokens_per_gpu_s"] = None if self.tokens_per_gpu_s is None else round(self.tokens_per_gpu_s, 1)
        out["why"] = self.why
        return out


_SHOWN = ("params", "grads", "optimizer_state", "activations", "temporaries", "other", "gathered_layer")


# --- measuring one step on fake tensors -----------------------------------------------------------

@dataclass
class Measured:
    """One measured (possibly depth-extrapolated) step: split at the peak (unsharded), FLOPs, what ZeRO needs."""
    split: dict
    gathered_layer_bytes: int
    n_params: int
    n_trainable: int
    flops: float = 0.0
    extrapolation_error: float | None = None
    flops_extrapolation_error: float | None = None


def _lora_model(net, rank: int):
    from peft import LoraConfig, get_peft_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(net, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                              target_modules="all-linear"))


def _step_config(method: str, clip, lora_rank: int, dtype: str) -> StepConfig:
    if method == "lomo-optim" and dtype == "fp16" and clip is None:
        clip = 1.0  # lomo-optim 0.1.1 forces it for fp16, as the planner does
    kwargs = {"clip_grad_norm": clip}
    if method == "lora":
        kwargs["lora_rank"] = lora_rank
    fields = getattr(StepConfig, "__dataclass_fields__", {})
    return StepConfig(method, **{k: v for k, v in kwargs.items() if k in fields})


def _fake_step(config, method, dtype, batch_size, seq_len, checkpointing, attn, clip, lora_rank, tracker=None):
    """Build the model (under whatever tensor mode is active) and its trainer, as the planner does; run the
    first step (HiFT: cycle), which creates the optimizer state. LoRA before the Trainer knew it: peft here."""
    net = planner.build_model(config, planner.DTYPES[dtype], checkpointing, attn)
    if method == "lora" and not trainer_has_lora():
        net = _lora_model(net, lora_rank)
        cfg = _step_config(torch_adamw_name(), clip, lora_rank, dtype)
    else:
        cfg = _step_config(method, clip, lora_rank, dtype)
    ids = torch.randint(0, config.vocab_size, (batch_size, seq_len))
    batch = {"input_ids": ids, "labels": ids}
    if tracker is not None:
        tracker.adopt(batch.values(), "other")
        tracker.adopt(net.parameters(), "params")   # frozen ones too (older Trainers adopt only trainable ones)
    trainer = Trainer(net, cfg, tracker)
    for _ in range(getattr(trainer, "steps_per_cycle", 1)):
        trainer.step(batch)
    return net, trainer, batch


_CACHE: dict = {}


def _measure_depth(config, method, dtype, batch_size, seq_len, checkpointing, attn, clip, lora_rank) -> dict:
    """The planner's measurement (second step, or second HiFT cycle, on the fake model under the tracker) with
    the FLOPs of that measured step counted as it runs; cached in memory and on disk."""
    key = json.dumps([config.to_json_string(), method, dtype, batch_size, seq_len, checkpointing, attn, clip,
                      lora_rank])
    if key in _CACHE:
        return _CACHE[key]
    hit = _disk_get(key)
    if hit is not None:
        _CACHE[key] = hit
        return hit
    from torch._subclasses.fake_tensor import FakeTensorMode
    tracker = MemoryTracker()
    with FakeTensorMode(allow_non_fake_inputs=False), planner._DataFreeAnswers():
        with tracker:
            net, trainer, batch = _fake_step(config, method, dtype, batch_size, seq_len, checkpointing, attn, clip,
                                             lora_rank, tracker)
            tracker.reset_peak()
            cycle = getattr(trainer, "steps_per_cycle", 1)
            counter = FlopCount()
            with counter:
                for _ in range(cycle):
                    trainer.step(batch)
        model = getattr(trainer, "model", net)
        out = {"split": dict(tracker.report().at_peak), "gathered": planner.largest_block_bytes(net),
               "n_params": sum(p.numel() for p in model.parameters()),
               "n_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad) if method == "lora"
               else sum(p.numel() for p in net.parameters()),
               "flops": float(counter.total) / cycle}   # HiFT: the mean step of a cycle
        trainer.close()
    _CACHE[key] = out
    _disk_put(key, out)
    return out


def measure(model: str, method: str, dtype: str, batch_size: int, seq_len: int, checkpointing: bool, attn: str,
            clip: float | None, sample_layers: int | None, lora_rank: int = 8, check: bool = False) -> Measured:
    """The unsharded step measured on fake tensors: at the model's depth, or (``sample_layers`` k) at k and 2k
    layers extrapolated linearly (every category and the FLOPs are affine in the depth when the layers are
    alike); ``check`` also measures 3k layers and reports the extrapolation's relative error of the peak."""
    attn_run = "sdpa" if attn == "flash_attention_2" else attn   # flash-attn cannot run on fake CPU tensors
    config = planner.load_config(model)
    layers = config.num_hidden_layers
    settings = (method, dtype, batch_size, seq_len, checkpointing, attn_run, clip, lora_rank)
    if sample_layers is None or 2 * sample_layers >= layers:
        r = _measure_depth(config, *settings)
        return Measured(dict(r["split"]), r["gathered"], r["n_params"], r["n_trainable"], r["flops"])
    k = sample_layers
    small, big = (_measure_depth(planner._with_layers(config, j * k), *settings) for j in (1, 2))

    def line(a, b, to):
        return a + (b - a) * (to - k) / k

    split = {c: max(0, round(line(small["split"][c], big["split"].get(c, 0), layers))) for c in small["split"]}
    err = flop_err = None
    if check and 3 * k <= layers:
        third = _measure_depth(planner._with_layers(config, 3 * k), *settings)
        predicted = sum(line(small["split"][c], big["split"].get(c, 0), 3 * k) for c in small["split"])
        err = predicted / sum(third["split"].values()) - 1
        flop_err = line(small["flops"], big["flops"], 3 * k) / third["flops"] - 1 if third["flops"] else None
    return Measured(split, big["gathered"], round(line(small["n_params"], big["n_params"], layers)),
                    round(line(small["n_trainable"], big["n_trainable"], layers)),
                    line(small["flops"], big["flops"], layers), err, flop_err)


# --- the disk cache: measurements are deterministic for a given code and library version -------------

def _cache_dir() -> str | None:
    if os.environ.get("LOMO_KERNELS_NO_CACHE"):
        return None
    return os.environ.get("LOMO_KERNELS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "lomo_kernels",
                                                             "recommend"))


_VERSION: list = []


def _code_version() -> str:
    """A hash of this package's Python sources and the torch/transformers/peft versions."""
    if not _VERSION:
        import hashlib
        import transformers
        h = hashlib.sha256(f"{torch.__version__} {transformers.__version__}".encode())
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        here = os.path.abspath(__file__)
        for dirpath, _, files in sorted(os.walk(root)):
            for name in sorted(files):
                path = os.path.join(dirpath, name)
                if name.endswith(".py") and os.path.abspath(path) != here:
                    with open(path, "rb") as f:
                        h.update(name.encode() + f.read())
        # of this file, only what measures (the ranking and the printing do not change a measurement)
        for fn in (_measure_depth, _fake_step, _step_config, _lora_model, FlopCount, flop_mapping, _gemm_flops,
                   _x_and_grad_out, _tokens_in_out, _lce_forward_flops, _lce_dlogits_flops, _rows_update_flops,
                   _sdpa_cpu_flops, _sdpa_cpu_backward_flops, trainer_has_lora, torch_adamw_name):
            h.update(inspect.getsource(fn).encode())
        _VERSION.append(h.hexdigest()[:16])
    return _VERSION[0]


def _disk_path(key: str) -> str | None:
    root = _cache_dir()
    if root is None:
        return None
    import hashlib
    return os.path.join(root, _code_version(), hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")


def _disk_get(key: str):
    path = _disk_path(key)
    if path is None or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data["value"] if data.get("key") == key else None


def _disk_put(key: str, value: dict) -> None:
    path = _disk_path(key)
    if path is None:
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"key": key, "value": value}, f)
        os.replace(tmp, path)
    except OSError:
        pass


def real_tracked_step(config, method, dtype="fp32", batch_size=2, seq_len=32, checkpointing=False, attn="sdpa",
                      clip=None, lora_rank=8, seed=0, time_steps: int = 0):
    """The candidate's step on real CPU tensors under the same tracker: (peak bytes, split at the peak,
    median wall seconds of ``time_steps`` further steps or None). The check on the fake-tensor plan, and
    the measured times the time model is calibrated against."""
    torch.manual_seed(seed)
    tracker = MemoryTracker()
    with tracker:
        net, trainer, batch = _fake_step(config, method, dtype, batch_size, seq_len, checkpointing, attn, clip,
                                         lora_rank, tracker)
        tracker.reset_peak()
        for _ in range(getattr(trainer, "steps_per_cycle", 1)):
            trainer.step(batch)
    report = tracker.report()
    seconds = None
    if time_steps:
        times = []
        for _ in range(time_steps):
            t0 = time.perf_counter()
            for _ in range(getattr(trainer, "steps_per_cycle", 1)):
                trainer.step(batch)
            times.append((time.perf_counter() - t0) / getattr(trainer, "steps_per_cycle", 1))
        seconds = sorted(times)[len(times) // 2]
    trainer.close()
    return report.peak_bytes, report.at_peak, seconds


# --- FLOPs of the traced step ---------------------------------------------------------------------

def _tokens_in_out(x, grad_out):
    tokens = math.prod(x[:-1])
    return tokens, x[-1], grad_out[-1]


def _gemm_flops(*args, out_shape=None, **kwargs):
    """A fused weight-gradient GEMM (``dYᵀX``, never materialized): 2·T·in·out; the ghost norm 2·T²·(in+out)."""
    shapes = [a for a in args if isinstance(a, torch.Size)]
    strings = [a for a in args if isinstance(a, str)]
    x, grad_out = _x_and_grad_out(shapes)
    t, fin, fout = _tokens_in_out(x, grad_out)
    if "ghost" in strings:
        return 2 * t * t * (fin + fout)
    return 2 * t * fin * fout


def _x_and_grad_out(shapes):
    # every fused linear op takes (…, x [T, in], grad_out [T, out], …) after its state tensors; pick the last two
    # shapes with the same leading (token) dimensions
    big = [s for s in shapes if len(s) >= 2]
    for i in range(len(big) - 1, 0, -1):
        if big[i][:-1] == big[i - 1][:-1]:
            return big[i - 1], big[i]
    return big[-2], big[-1]


def _lce_forward_flops(hidden, weight, *args, out_shape=None, **kwargs):
    return 2 * math.prod(hidden[:-1]) * hidden[-1] * weight[0]


def _lce_dlogits_flops(hidden, weight, bias, labels, lse, coef, v0, v1, *args, out_shape=None, **kwargs):
    return 2 * math.prod(hidden[:-1]) * hidden[-1] * (v1 - v0)


def _rows_update_flops(weight, row0, x, grad_out, *args, out_shape=None, **kwargs):
    return 2 * math.prod(x[:-1]) * x[-1] * grad_out[-1]


def _sdpa_cpu_flops(q, k, v, *args, out_shape=None, **kwargs):
    b, h, s, d = q
    return 4 * b * h * s * k[-2] * d                     # QKᵀ and PV: what eager's two bmm count


def _sdpa_cpu_backward_flops(grad_out, q, k, v, *args, out_shape=None, **kwargs):
    b, h, s, d = q
    return 8 * b * h * s * k[-2] * d                     # dV, dP, dQ, dK: eager's four backward bmm


class FlopCount(TorchDispatchMode):
    """FLOPs of every op run inside, by torch's FLOP formulas (``torch.utils.flop_counter``) plus ours for the
    fused ops and CPU sdpa. Keeps no reference to any tensor (``FlopCounterMode``'s module tracker does,
    which would change the memory measured alongside)."""

    def __init__(self):
        super().__init__()
        from torch.utils.flop_counter import flop_registry, shape_wrapper
        self.registry = dict(flop_registry) | {k: shape_wrapper(v) for k, v in flop_mapping().items()}
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def flop_mapping() -> dict:
    ops, aten = torch.ops.lomo_kernels, torch.ops.aten
    # FlopCounterMode looks ops up by their overload packet
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops}
    import lomo_kernels.ops  # noqa: F401  (registers the custom ops)
    for name in ("linear_update_", "linear_grad_sqnorm_", "adamw_linear_update_", "adalomo_linear_update_",
                 "adalomo_scaled_sqnorm_", "adalomo_sq_sums_"):
        if hasattr(ops, name):
            mapping[getattr(ops, name)] = _gemm_flops
    if hasattr(ops, "linear_cross_entropy_forward"):
        mapping[ops.linear_cross_entropy_forward] = _lce_forward_flops
        mapping[ops.linear_cross_entropy_dlogits] = _lce_dlogits_flops
        mapping[ops.linear_update_rows_] = _rows_update_flops
    for name in dir(ops):  # ops that land later and read (x, grad_out): count them as one fused GEMM
        op = getattr(ops, name, None)
        if hasattr(op, "default") and op not in mapping:
            args = [a.name for a in op.default._schema.arguments]
            if "x" in args and "grad_out" in args:
                mapping[op] = _gemm_flops
    return mapping


def traced_flops(config, method, dtype, batch_size, seq_len, checkpointing, clip, lora_rank=8, attn="sdpa"):
    """FLOPs of the measured (steady-state) training step of ``config``, counted on the fake step as it runs."""
    return _measure_depth(config, method, dtype, batch_size, seq_len, checkpointing, attn, clip, lora_rank)["flops"]


# --- ZeRO arithmetic and communication ------------------------------------------------------------

def per_gpu(m: Measured, method: str, parallel: str, gpus: int, none_split: dict | None = None) -> dict:
    """Bytes per GPU by category for ``parallel`` over ``gpus`` from the unsharded measured split.

    single: as measured. zero3: parameters (and, for torch optimizers, gradients) and optimizer state
    divided by N, plus one gathered layer. zero2: optimizer state and gradients divided by N, parameters
    replicated. For torch-optimizer methods the unsharded peak is at the optimizer step, where the
    activations are already freed; once the state is sharded the backward's peak can be the higher one,
    so the backward phase is bounded too, from the ``none`` method's step (forward + backward, gradients
    kept) plus this method's sharded optimizer state; the larger of the two is the peak."""
    out = dict(m.split)
    out["gathered_layer"] = 0
    if parallel == "single" or gpus == 1:
        return out
    if parallel == "zero3":
        sharded = ("params", "optimizer_state") if is_fused(method) else ("params", "grads", "optimizer_state")
    else:
        sharded = ("grads", "optimizer_state")

    def shard(split):
        s = dict(split)
        for c in sharded:
            s[c] = -(-s.get(c, 0) // gpus)
        s["gathered_layer"] = m.gathered_layer_bytes if parallel == "zero3" else 0
        return s

    out = shard(out)
    if none_split is not None and uses_torch_optimizer(method) and method != "lora" and not method.startswith("hift"):
        backward = shard(none_split)
        backward["optimizer_state"] = out["optimizer_state"]
        if sum(backward.values()) > sum(out.values()):
            out = backward
    return out


def comm_bytes(model_shapes: dict, method: str, parallel: str, gpus: int, tokens_all: int, elem: int,
               n_params: int, n_trainable: int) -> float:
    """Bytes each GPU sends per step in ZeRO's collectives (ring: each moves (N−1)/N of the tensor).

    zero3: parameters all-gathered for forward and again for backward (2·P), gradients of the trainable
    parameters reduce-scattered (torch optimizers); fused methods update their shard either from a
    reduce-scattered fp32 layer gradient or from the gathered activations, whichever moves less
    (``strategy="auto"``: min(in·out·4, T·(in+out)·elem) per weight). zero2: gradients reduce-scattered
    and updated parameters all-gathered (2·trainable)."""
    if parallel == "single" or gpus == 1:
        return 0.0
    ring = (gpus - 1) / gpus
    if parallel == "zero2":
        return 2 * n_trainable * elem * ring
    gathers = 2 * n_params * elem
    if is_fused(method):
        update = sum(min(fin * fout * 4, tokens_all * (fin + fout) * elem) * count
                     for (fout, fin), count in model_shapes.items())
        rest = n_params - sum(fin * fout * count for (fout, fin), count in model_shapes.items())
        update += rest * elem
    else:
        update = n_trainable * elem
    return (gathers + update) * ring


def weight_shapes(model: str) -> dict:
    """{(out, in): count} of the model's 2-D weights (from the config, on the meta device)."""
    config = planner.load_config(model)
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config)
    shapes: dict = {}
    for p in net.parameters():
        if p.dim() == 2:
            shapes[tuple(p.shape)] = shapes.get(tuple(p.shape), 0) + 1
    return shapes


# --- the search -----------------------------------------------------------------------------------

@dataclass
class Assumptions:
    gpu_tflops: float = DEFAULT_TFLOPS
    gpu_efficiency: float = DEFAULT_EFFICIENCY
    link_gbps: float = DEFAULT_LINK_GBPS

    def lines(self) -> list[str]:
        return [f"compute at {self.gpu_tflops:g} TFLOP/s peak x {self.gpu_efficiency:g} efficiency = "
                f"{self.gpu_tflops * self.gpu_efficiency:g} TFLOP/s sustained per GPU (assumed)",
                f"ZeRO collectives at {self.link_gbps:g} GB/s per GPU, ring algorithms, not overlapped with compute "
                f"(assumed)",
                "FLOPs counted on the traced fake step at the chosen micro-batch (forward, backward, "
                "recomputation, norm pass, fused weight-gradient GEMMs, HiFT's truncated backward, LoRA's frozen "
                "base); attention counted as its matmuls "
                "(eager, sdpa and flash_attention_2 alike: their speed difference is memory traffic, not modelled)",
                "step time = FLOPs / sustained rate + communication bytes / link; tokens/GPU/s = micro-batch x "
                "seq_len / step time"]


@dataclass
class Recommendation:
    model: str
    gpus: int
    gpu_gib: float
    seq_len: int
    dtype: str
    batch_size: int | None
    assumptions: Assumptions
    candidates: list
    best: Candidate | None
    runtime_s: float
    memory_extrapolation_error: float | None
    flops_extrapolation_error: float | None
    batch_linearity_error: float | None
    sample_layers: int | None
    notes: list = field(default_factory=list)

    def to_json(self) -> dict:
        return {"model": self.model, "gpus": self.gpus, "gpu_gib": self.gpu_gib, "seq_len": self.seq_len,
                "dtype": self.dtype, "batch_size": self.batch_size, "assumptions": asdict(self.assumptions),
                "assumption_lines": self.assumptions.lines(), "sample_layers": self.sample_layers,
                "memory_extrapolation_error": self.memory_extrapolation_error,
                "flops_extrapolation_error": self.flops_extrapolation_error,
                "batch_linearity_error": self.batch_linearity_error, "runtime_s": round(self.runtime_s, 2),
                "recommendation": None if self.best is None else self.best.row() | {"label": self.best.label},
                "candidates": [c.row() | {"label": c.label} for c in self.candidates], "notes": self.notes}


def _gib(b: float) -> str:
    return f"{b / GiB:.2f}"


def _sweep_task(task):
    """One (method, checkpointing, attention) family at the first micro-batch; run in a worker process."""
    model, method, dtype, b, seq_len, ckpt, attn, clip, sample_layers, lora_rank = task
    torch.set_num_threads(1)
    try:
        return task, measure(model, method, dtype, b, seq_len, ckpt, attn, clip, sample_layers, lora_rank), None
    except Exception as exc:  # noqa: BLE001  (a method whose fake step fails here is left out, with the reason)
        first = str(exc).splitlines()[0] if str(exc) else ""
        return task, None, f"{type(exc).__name__}: {first}"


def _run_sweep(tasks, jobs: int):
    if jobs <= 1 or len(tasks) < 2:
        return [_sweep_task(t) for t in tasks]
    import multiprocessing
    try:
        ctx = multiprocessing.get_context("fork")
    except ValueError:
        return [_sweep_task(t) for t in tasks]
    # the costliest first (fused methods with checkpointing), so the two workers end together
    order = sorted(range(len(tasks)), key=lambda i: (not is_fused(tasks[i][1]), not tasks[i][5]))
    with ctx.Pool(min(jobs, len(tasks))) as pool:
        results = pool.map(_sweep_task, [tasks[i] for i in order], chunksize=1)
    by_task = {id(tasks[i]): r for i, r in zip(order, results)}
    return [by_task[id(t)] for t in tasks]


def default_jobs() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def recommend(model: str, gpus: int, gpu_gib: float, seq_len: int, batch_size: int | None = None,
              dtype: str = "fp16", methods: list[str] | None = None, clip: float | None = None,
              assumptions: Assumptions | None = None, sample_layers: int | None | str = "auto",
              lora_rank: int = 8, max_batch: int = DEFAULT_MAX_BATCH, attns=ATTNS, jobs: int | None = None,
              search_top: int = 3, exhaustive: bool = False) -> Recommendation:
    """Rank every candidate; see the module docstring. ``sample_layers="auto"``: 1 for models of 4+ layers.

    The micro-batch search (when ``batch_size`` is None) runs, fastest bound first, on the candidates
    whose best possible speed (all compute, the communication amortized away) can still beat the best
    found, and on at least the ``search_top`` fastest; eager attention has sdpa's FLOPs and more memory,
    so it is measured at the first micro-batch and not searched."""
    t0 = time.perf_counter()
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"--gpus must be a positive integer, got {gpus!r}")
    if isinstance(gpu_gib, bool) or not isinstance(gpu_gib, (int, float)) or not math.isfinite(gpu_gib) \
            or gpu_gib <= 0:
        raise ValueError(f"--gpu-gib must be a positive number of GiB, got {gpu_gib!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"--seq-len must be a positive integer, got {seq_len!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"--batch-size must be a positive integer, got {batch_size!r}")
    if not isinstance(lora_rank, int) or lora_rank < 1:
        raise ValueError(f"--lora-rank must be a positive integer, got {lora_rank!r}")
    if dtype not in planner.DTYPES:
        raise ValueError(f"--dtype must be one of {tuple(planner.DTYPES)}, got {dtype!r}")
    assumptions = assumptions or Assumptions()
    for name in ("gpu_tflops", "gpu_efficiency", "link_gbps"):
        v = getattr(assumptions, name)
        if not (math.isfinite(v) and v > 0) or (name == "gpu_efficiency" and v > 1):
            raise ValueError(f"--{name.replace('_', '-')} must be a positive number"
                             f"{' <= 1' if name == 'gpu_efficiency' else ''}, got {v!r}")
    config = planner.load_config(model)   # ValueError naming the model if unknown
    method_list = candidate_methods(methods)
    layers = config.num_hidden_layers
    if sample_layers == "auto":
        sample_layers = 1 if layers >= 4 else None
    if sample_layers is not None and not (isinstance(sample_layers, int) and 1 <= 2 * sample_layers <= layers):
        raise ValueError(f"--sample-layers must be an int in [1, {layers // 2}], got {sample_layers!r}")
    jobs = default_jobs() if jobs is None else jobs
    budget = gpu_gib * GiB
    elem = torch.empty(0, dtype=planner.DTYPES[dtype]).element_size()
    shapes = weight_shapes(model)
    sustained = assumptions.gpu_tflops * 1e12 * assumptions.gpu_efficiency
    link = assumptions.link_gbps * 1e9
    modes = ["single"] if gpus == 1 else ["zero3", "zero2"]
    notes: list[str] = []
    lin_errors: list[float] = []
    b0 = batch_size or 1
    run_attns = [a for a in attns if a != "flash_attention_2"]
    if "flash_attention_2" in attns and "sdpa" not in run_attns:
        run_attns.append("sdpa")

    # 1. every family at the first micro-batch (the bulk of the work: in parallel). Unless ``exhaustive``,
    # in two waves that skip what is dominated: first each method checkpointed with sdpa (its smallest
    # variant); only the methods that fit somehow then without checkpointing; eager attention (sdpa's FLOPs,
    # more memory) is listed, not measured.
    sweep: dict = {}
    broken: dict[str, str] = {}

    def run(tasks):
        for task, result, error in _run_sweep(tasks, jobs):
            if error is not None:
                broken.setdefault(task[1], error)
            else:
                sweep[(task[1], task[5], task[6], task[3])] = result

    def task(m, ck, a, b=b0):
        return (model, m, dtype, b, seq_len, ck, a, clip, sample_layers, lora_rank)

    none_tasks = [task("none", ck, a, b) for ck in (False, True) for a in run_attns for b in (1, 2)] \
        if gpus > 1 and any(uses_torch_optimizer(m) for m in method_list) else []
    if exhaustive:
        run([task(m, ck, a) for m in method_list for ck in (False, True) for a in run_attns] + none_tasks)
    else:
        first_attn = "sdpa" if "sdpa" in run_attns else run_attns[0]
        run([task(m, True, first_attn) for m in method_list] + none_tasks)
        smallest = {}
        for m in method_list:
            if (m, True, first_attn, b0) in sweep:
                split = sweep[(m, True, first_attn, b0)]
                smallest[m] = min(sum(per_gpu(split, m, mode, gpus).values()) for mode in modes)
        run([task(m, False, first_attn) for m, t in smallest.items() if t <= budget])
        if first_attn != "sdpa":
            run([task(m, ck, a) for m in smallest for ck in (False, True) for a in run_attns if a != first_attn])

    def measured(method, ckpt, attn, b) -> Measured:
        attn = "sdpa" if attn == "flash_attention_2" else attn
        key = (method, ckpt, attn, b)
        if key not in sweep:
            sweep[key] = measure(model, method, dtype, b, seq_len, ckpt, attn, clip, sample_layers, lora_rank)
        return sweep[key]

    def none_split(ckpt, attn, b):
        """The ``none`` step (forward + backward, gradients kept): measured at 1 and 2, linear in b beyond."""
        s1, s2 = measured("none", ckpt, attn, 1).split, measured("none", ckpt, attn, 2).split
        return {c: max(0, round(s1[c] + (s2[c] - s1[c]) * (b - 1))) for c in s1}

    def evaluate(c: Candidate, b: int):
        m = measured(c.method, c.checkpointing, c.attn, b)
        ns = none_split(c.checkpointing, c.attn, b) if c.parallel != "single" and uses_torch_optimizer(c.method) \
            and ("none", c.checkpointing, "sdpa" if c.attn == "flash_attention_2" else c.attn, 1) in sweep else None
        split = per_gpu(m, c.method, c.parallel, gpus, ns)
        return sum(split.values()), split, m

    def settle(c: Candidate, b: int, result) -> None:
        c.batch_size, (c.total_bytes, c.per_gpu, c.measured) = b, result
        c.fits = c.total_bytes <= budget
        if not c.fits:
            c.flops, c.step_s, c.tokens_per_gpu_s = c.measured.flops, None, None
            return
        c.flops = c.measured.flops
        c.comm_bytes = comm_bytes(shapes, c.method, c.parallel, gpus, gpus * b * seq_len, elem,
                                  c.measured.n_params, c.measured.n_trainable)
        c.compute_s, c.comm_s = c.flops / sustained, c.comm_bytes / link
        c.step_s = c.compute_s + c.comm_s
        c.tokens_per_gpu_s = b * seq_len / c.step_s

    candidates: list[Candidate] = []
    unmeasured: list[Candidate] = []
    for method in method_list:
        if method in broken:
            continue
        for ckpt in (False, True):
            for attn in attns:
                for mode in modes:
                    if mode == "zero2" and not uses_torch_optimizer(method):
                        continue
                    c = Candidate(method, ckpt, attn, mode, gpus)
                    run_attn = "sdpa" if attn == "flash_attention_2" else attn
                    if (method, ckpt, run_attn, b0) in sweep:
                        settle(c, b0, evaluate(c, b0))
                        candidates.append(c)
                        continue
                    c.batch_size, c.fits = b0, None
                    smallest = sweep.get((method, True, "sdpa", b0))
                    twin = sweep.get((method, ckpt, "sdpa", b0))
                    twin_need = None if twin is None else sum(per_gpu(twin, method, mode, gpus).values())
                    if run_attn == "eager" and twin_need is not None and twin_need <= budget:
                        c.why = ("not measured: dominated by its sdpa variant (the same FLOPs, and eager attention "
                                 "keeps the seq x seq scores: more memory); --exhaustive measures it")
                    elif run_attn == "eager" and twin_need is not None:
                        c.why = (f"not measured: does not fit, as its sdpa variant (eager keeps more) already needs "
                                 f"{twin_need / GiB:.2f} GiB at micro-batch {b0}")
                        c.total_bytes = twin_need
                    elif smallest is not None:
                        need = sum(per_gpu(smallest, method, mode, gpus).values())
                        c.why = (f"not measured: does not fit, as its smallest variant (checkpointed, sdpa) already "
                                 f"needs {need / GiB:.2f} GiB at micro-batch {b0}")
                        c.total_bytes = need
                    else:
                        continue
                    unmeasured.append(c)

    # 2. the micro-batch search, where it can change the ranking
    if batch_size is None and max_batch > 1:
        def bound(c):  # tokens/GPU/s with the communication amortized away: no larger micro-batch beats it
            return seq_len * sustained / (c.flops / c.batch_size)

        searchable = sorted((c for c in candidates if c.fits and c.attn != "eager"), key=bound, reverse=True)
        best_speed, searched, done = 0.0, 0, {}
        for c in searchable:
            if searched >= search_top and bound(c) < best_speed:
                break
            key = (c.method, c.checkpointing, c.parallel)
            if key in done:  # flash_attention_2 is measured as sdpa: the same answer
                settle(c, *done[key])
            else:
                b, result = _largest_batch(lambda bb: evaluate(c, bb), (c.total_bytes, c.per_gpu, c.measured),
                                           budget, max_batch, lin_errors)
                settle(c, b, result)
                done[key] = (b, result)
            c.notes.append("micro-batch searched")
            searched += 1
            best_speed = max(best_speed, c.tokens_per_gpu_s or 0)
        for c in candidates:  # flash_attention_2 rows take their sdpa twin's search (the same measurements)
            key = (c.method, c.checkpointing, c.parallel)
            if c.attn == "flash_attention_2" and c.fits and key in done and "micro-batch searched" not in c.notes:
                settle(c, *done[key])
                c.notes.append("micro-batch searched")
        for c in candidates:
            if c.fits and "micro-batch searched" not in c.notes and c.attn != "eager":
                c.notes.append(f"micro-batch {c.batch_size} (not searched: "
                               + ("eager attention: sdpa's FLOPs and more memory" if c.attn == "eager" else
                                  "even with its communication amortized away it is slower than the best") + ")")
    _rank(candidates, budget)
    best = candidates[0] if candidates and candidates[0].fits else None
    fitting = [c for c in candidates if c.fits]
    candidates = fitting + [c for c in unmeasured if "dominated" in c.why] + \
        [c for c in candidates if not c.fits] + [c for c in unmeasured if "dominated" not in c.why]
    for i, c in enumerate(candidates, 1):
        c.rank = i

    # 3. how far off the depth extrapolation is, checked on the recommendation (and the first loser)
    mem_err = flop_err = None
    if sample_layers is not None:
        for c in [c for c in candidates[:2] if c.fits] or candidates[:1]:
            m = measure(model, c.method, dtype, c.batch_size, seq_len, c.checkpointing,
                        c.attn, clip, sample_layers, lora_rank, check=True)
            if m.extrapolation_error is not None and (mem_err is None or abs(m.extrapolation_error) > abs(mem_err)):
                mem_err = m.extrapolation_error
            if m.flops_extrapolation_error is not None and (flop_err is None or
                                                            abs(m.flops_extrapolation_error) > abs(flop_err)):
                flop_err = m.flops_extrapolation_error
    if any(c.attn == "flash_attention_2" for c in candidates) and not flash_attn_importable():
        notes.append("flash_attention_2* (starred): flash-attn is not importable here, so it is modelled with "
                     "sdpa's measured memory and the same FLOPs")
    if gpus > 1:
        notes.append(f"ZeRO over {gpus} GPUs is arithmetic on the measured single-GPU split (see "
                     "recommend.per_gpu); ZeRO-2 only for the torch-optimizer methods (the fused ones keep no "
                     "gradient to partition)")
    if any(c.method == "lora" for c in candidates):
        notes.append(f"lora: peft LoRA rank {lora_rank} on every attention and MLP linear (all-linear), base "
                     f"frozen, torch AdamW on the adapters")
    if any(c.method.startswith("hift") for c in candidates):
        notes.append("hift-*: a step updates one group of layers (backward truncated below it); its FLOPs and time "
                     "are the mean step of a cycle, and a cycle of steps updates every layer once")
    for method, error in broken.items():
        notes.append(f"{method} left out: its step failed on fake tensors here ({error})")
    lin_err = max(lin_errors, key=abs) if lin_errors else None
    return Recommendation(model, gpus, gpu_gib, seq_len, dtype, batch_size, assumptions, candidates, best,
                          time.perf_counter() - t0, mem_err, flop_err, lin_err, sample_layers, notes)


def _largest_batch(total_at, first, budget, max_batch, lin_errors, slope=None):
    """The largest micro-batch whose *measured* peak fits, given ``first`` = (total, split, measured) at batch
    1. A line from batch 1 with ``slope`` (default: the activations and temporaries at batch 1, the part of
    the peak that grows with the batch) proposes b, and b is measured. The peak is a maximum of phases each
    affine in b, so convex: beyond a measured point it grows at least as fast as the secant into it, and
    between two measured points it stays under their secant. So: if b fits and the secant says b+1 cannot,
    b is the answer; if b fits with room, step on along the secant; if b does not fit, the secant from the
    last fitting size proposes a smaller one. Every returned size was measured. Returns (b, result)."""
    t1 = first[0]
    if slope is None:
        slope = first[1].get("activations", 0) + first[1].get("temporaries", 0)
    slope = max(float(slope), 1.0)
    lo, lo_t, hi = 1, first, None
    b = min(max_batch, 1 + int((budget - t1) // slope))
    for _ in range(8):
        if b <= lo or (hi is not None and b >= hi):
            break
        tb = total_at(b)
        lin_errors.append(tb[0] / (t1 + slope * (b - 1)) - 1)
        secant = max((tb[0] - lo_t[0]) / (b - lo), 1.0)
        if tb[0] <= budget:
            lo, lo_t = b, tb
            if b >= max_batch or tb[0] + secant > budget:
                break
            b = min(max_batch, b + max(1, int((budget - tb[0]) // secant)))
            if hi is not None:
                b = min(b, hi - 1)
        else:
            hi = b
            b = min(hi - 1, lo + int((budget - lo_t[0]) // secant))
    return lo, lo_t


def _rank(candidates: list[Candidate], budget: float) -> None:
    """Fitting candidates first, fastest (tokens/GPU/s) first, then lower peak; then the rest by peak. HiFT
    ranks after the full-update candidates that fit: its step updates one group of layers, so its tokens/s
    are not like-for-like (it is recommended only when nothing else fits)."""
    attn_order = {a: i for i, a in enumerate(ATTNS)}
    candidates.sort(key=lambda c: (not c.fits, c.fits and c.method.startswith("hift"),
                                   -(c.tokens_per_gpu_s or 0) if c.fits else c.total_bytes,
                                   c.total_bytes, attn_order.get(c.attn, 9)))
    best = candidates[0] if candidates and candidates[0].fits else None
    for i, c in enumerate(candidates, 1):
        c.rank = i
        c.why = _why(c, best, budget)


def _why(c: Candidate, best: Candidate | None, budget: float) -> str:
    if not c.fits:
        big = max((k for k in c.per_gpu if c.per_gpu[k]), key=lambda k: c.per_gpu[k])
        return (f"does not fit: {_gib(c.total_bytes)} GiB at micro-batch {c.batch_size} > {budget / GiB:g} GiB "
                f"(largest: {big} {_gib(c.per_gpu[big])} GiB)")
    if c is best:
        return "recommended: fits, fastest estimate" + (" (only HiFT fits)" if c.method.startswith("hift") else "")
    if c.method.startswith("hift") and not best.method.startswith("hift"):
        return ("a HiFT step updates one group of layers: its tokens/s are not like-for-like with a full update "
                f"(estimate {c.tokens_per_gpu_s:.0f} tokens/GPU/s)")
    ratio = best.tokens_per_gpu_s / c.tokens_per_gpu_s
    if ratio < 1 + 1e-9:
        return f"ties on estimated speed; peak {_gib(c.total_bytes)} vs {_gib(best.total_bytes)} GiB" \
               + (" (modelled, not measured)" if c.attn == "flash_attention_2" else "")
    parts = []
    fs, fb = c.flops / c.batch_size, best.flops / best.batch_size
    if fs > fb * 1.005:
        parts.append(f"{fs / fb:.2f}x the FLOPs per sample" + _flop_reason(c, best))
    cs, cb = c.comm_s / c.batch_size, best.comm_s / best.batch_size
    if cs > cb * 1.005 and c.comm_s > 0:
        parts.append(f"communication {c.comm_s:.2f} s/step ({c.comm_bytes / 1e9:.1f} GB)")
    if c.batch_size < best.batch_size and c.comm_s > 0:
        parts.append(f"micro-batch {c.batch_size} vs {best.batch_size} (less to amortize communication over)")
    return f"{ratio:.2f}x slower: " + ("; ".join(parts) or "slower estimate")


def _flop_reason(c: Candidate, best: Candidate) -> str:
    reasons = []
    if c.checkpointing and not best.checkpointing:
        reasons.append("recomputation")
    if best.method == "lora" and c.method != "lora":
        reasons.append("weight gradients of the full model")
    if c.method in ("lomo", "adalomo", "lomo-optim") and best.method not in ("lomo", "adalomo", "lomo-optim"):
        reasons.append("its norm pass (a second backward)")
    if c.method == "adalomo" and best.method == "lomo":
        reasons.append("AdaLomo's statistics GEMMs")
    return f" ({', '.join(reasons)})" if reasons else ""


# --- output ---------------------------------------------------------------------------------------

def format_table(rec: Recommendation) -> str:
    headers = ["#", "candidate", "mb", "fits", "params", "grads", "optim", "activ", "temp", "other", "gathered",
               "total GiB", "est step s", "est tok/GPU/s", "why"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for c in rec.candidates:
        cells = [c.rank, c.label, c.batch_size, "?" if c.fits is None else "yes" if c.fits else "no"]
        if c.fits is None:
            lines.append("| " + " | ".join(str(x) for x in cells + ["-"] * 10 + [c.why]) + " |")
            continue
        cells += [f"{c.per_gpu.get(k, 0) / GiB:.2f}" for k in _SHOWN]
        cells += [f"{c.total_gib:.2f}",
                  "-" if c.step_s is None else f"{c.step_s:.3f}",
                  "-" if c.tokens_per_gpu_s is None else f"{c.tokens_per_gpu_s:,.0f}", c.why]
        lines.append("| " + " | ".join(str(x) for x in cells) + " |")
    return "\n".join(lines)


def _pct(e):
    return "n/a" if e is None else f"{100 * e:+.2f}%"


def format_report(rec: Recommendation) -> str:
    out = [f"Candidates for {rec.model}, seq_len {rec.seq_len}, {rec.dtype}, {rec.gpus} GPU(s) of {rec.gpu_gib:g} "
           f"GiB (peak per GPU in GiB, measured on fake tensors; step time and tokens/GPU/s are ESTIMATES):", "",
           format_table(rec), "", "Assumptions of the time estimate:"]
    out += [f"- {line}" for line in rec.assumptions.lines()]
    out.append("Accuracy of the measurement shortcuts:")
    if rec.sample_layers is not None:
        out.append(f"- memory: measured at {rec.sample_layers} and {2 * rec.sample_layers} layers and extrapolated; "
                   f"worst error checked at {3 * rec.sample_layers} layers: {_pct(rec.memory_extrapolation_error)}")
        out.append(f"- FLOPs: extrapolated the same way; error at {3 * rec.sample_layers} layers: "
                   f"{_pct(rec.flops_extrapolation_error)}")
    else:
        out.append("- memory and FLOPs: measured at the model's full depth (no extrapolation)")
    out.append(f"- micro-batch search: every chosen size is measured, not extrapolated; the straight line from "
               f"micro-batch 1 that proposes the first size missed the measured peak by up to "
               f"{_pct(rec.batch_linearity_error)} (the peak moves between phases as the batch grows), which the "
               f"secant steps then correct")
    for n in rec.notes:
        out.append(f"note: {n}")
    out.append("")
    if rec.best is None:
        out.append(f"No candidate fits in {rec.gpu_gib:g} GiB per GPU. Smallest peak: {rec.candidates[0].label} at "
                   f"{rec.candidates[0].total_gib:.2f} GiB.")
    else:
        b = rec.best
        out.append(f"Recommendation: {b.label}, micro-batch {b.batch_size} per GPU: peak {b.total_gib:.2f} GiB per "
                   f"GPU (of {rec.gpu_gib:g}); estimated {b.step_s:.3f} s/step, {b.tokens_per_gpu_s:,.0f} tokens/GPU/s "
                   f"(an estimate under the assumptions above).")
    out.append(f"({len(rec.candidates)} candidates ranked in {rec.runtime_s:.1f} s)")
    return "\n".join(out)


def write_chart(rec: Recommendation, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cands = rec.candidates
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, max(3.5, 0.22 * len(cands) + 1.5)), sharey=True)
    ys = range(len(cands))
    colors = ["tab:green" if c is rec.best else ("tab:blue" if c.fits else "tab:gray") for c in cands]
    ax1.barh(ys, [c.total_gib for c in cands], color=colors)
    ax1.axvline(rec.gpu_gib, color="red", linestyle="--", label=f"{rec.gpu_gib:g} GiB per GPU")
    ax1.set_xlabel("peak GiB per GPU (measured on fake tensors)")
    ax1.set_yticks(list(ys), [f"{c.label} mb{c.batch_size}" for c in cands], fontsize=6)
    ax1.invert_yaxis()
    ax1.legend(fontsize=7)
    ax2.barh(ys, [c.tokens_per_gpu_s or 0 for c in cands], color=colors)
    ax2.set_xlabel("estimated tokens/GPU/s (0: does not fit)")
    fig.suptitle(f"{rec.model}, seq {rec.seq_len}, {rec.gpus}x{rec.gpu_gib:g} GiB: recommendation "
                 f"{rec.best.label if rec.best else 'none fits'}", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- command line ---------------------------------------------------------------------------------

def _positive_int(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {text}")
        return value
    return parse


def _positive_float(name, at_most=None):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a positive number, got {text!r}") from None
        if not (math.isfinite(value) and value > 0) or (at_most is not None and value > at_most):
            raise argparse.ArgumentTypeError(f"{name} must be a positive number"
                                             f"{f' <= {at_most:g}' if at_most else ''}, got {text}")
        return value
    return parse


def add_recommend_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--recommend", "rank every combination of optimizations for your GPUs")

    def add(flag, **kwargs):  # the planner may already define some (e.g. --lora-rank): share them
        if flag not in parser._option_string_actions:
            group.add_argument(flag, **kwargs)

    add("--recommend", action="store_true",
        help="rank every candidate (method x checkpointing x attention x ZeRO x micro-batch) by fit and estimated "
             "speed, and recommend one; needs --gpu-gib")
    add("--gpus", type=_positive_int("--gpus"), default=1, help="number of GPUs N (default 1)")
    add("--gpu-tflops", type=_positive_float("--gpu-tflops"), default=DEFAULT_TFLOPS,
        help=f"peak dense TFLOP/s of one GPU for the time estimate (default {DEFAULT_TFLOPS:g})")
    add("--gpu-efficiency", type=_positive_float("--gpu-efficiency", 1.0), default=DEFAULT_EFFICIENCY,
        help=f"fraction of the peak a step sustains (default {DEFAULT_EFFICIENCY:g})")
    add("--link-gbps", type=_positive_float("--link-gbps"), default=DEFAULT_LINK_GBPS,
        help=f"GB/s (gigabytes per second) per GPU for ZeRO collectives (default {DEFAULT_LINK_GBPS:g})")
    add("--lora-rank", type=_positive_int("--lora-rank"), default=8, help="LoRA rank r (default 8)")
    add("--max-batch-size", type=_positive_int("--max-batch-size"), default=DEFAULT_MAX_BATCH,
        help=f"upper end of the micro-batch search (default {DEFAULT_MAX_BATCH})")
    add("--jobs", type=_positive_int("--jobs"), default=None,
        help="worker processes for the candidate sweep (default: min(2, CPUs)); measurements are also cached on "
             "disk (~/.cache/lomo_kernels/recommend, keyed by this package's sources; LOMO_KERNELS_NO_CACHE=1 "
             "turns it off)")
    add("--exhaustive", action="store_true",
        help="measure every candidate, also those dominated by a measured one (eager attention where sdpa was "
             "measured; the bigger variants of a method whose smallest does not fit)")
    add("--chart", default=None, help="with --recommend: write a PNG chart of the ranking to this path")


def run_recommend(args: argparse.Namespace) -> int:
    """``plan --recommend``: ranked table (or JSON) on stdout; 0 something fits, 1 nothing fits, 2 bad input."""
    batch = getattr(args, "batch_size", None)
    batch = None if planner.is_default(batch) else batch  # the planner's default 1: search the micro-batch
    method = getattr(args, "method", None)
    methods = None if planner.is_default(method) or method == "all" else \
        [m.strip() for m in method.split(",")]
    if getattr(args, "gpu_gib", None) is None:
        print("error: --recommend needs --gpu-gib (the memory of one GPU, GiB)", file=sys.stderr)
        return planner.EXIT_USAGE
    try:
        rec = recommend(args.model, args.gpus, args.gpu_gib, args.seq_len, batch, args.dtype, methods,
                        args.clip_grad_norm,
                        Assumptions(args.gpu_tflops, args.gpu_efficiency, args.link_gbps),
                        "auto" if args.sample_layers is None else args.sample_layers, getattr(args, "lora_rank", None) or 8,
                        args.max_batch_size, jobs=args.jobs, exhaustive=args.exhaustive)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return planner.EXIT_USAGE
    if args.json:
        print(json.dumps(rec.to_json(), indent=1))
    else:
        print(format_report(rec))
    if args.chart:
        write_chart(rec, args.chart)
        if not args.json:
            print(f"chart: {args.chart}")
    return planner.EXIT_FITS if rec.best is not None else planner.EXIT_DOES_NOT_FIT
