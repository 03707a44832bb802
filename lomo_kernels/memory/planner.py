"""Memory planner: peak memory per GPU of one training step, by running that step on fake tensors.

The model is built from its Hugging Face config under ``FakeTensorMode`` (tensors with shapes,
dtypes and storages, but no data), then two training steps of the real code path run (the second,
in steady state with the optimizer state already present, is the one measured) under a
``MemoryTracker`` that counts live bytes by category. A 65B model plans in seconds on a laptop CPU.

What is modelled, and what is not:
* the tracked bytes are tensor storages the step creates (what a caching allocator would be asked
  for); allocator fragmentation, the CUDA context and kernel workspaces are not included;
* fused ops (``lomo_kernels``' custom ops) allocate nothing in the plan, as the Triton/CUDA kernels
  keep the weight-gradient tiles in registers (the fused cross-entropy's forward too: one Triton kernel;
  its per-chunk logit gradients are op outputs and are counted, with chunks sized for an accelerator's
  64 MiB budget; the CPU reference allocates its chunks inside the ops, which the plan leaves out);
  scalar reads (loss-scale overflow checks, the grad norm, APOLLO's limiter) read 0 (or False) under
  fake tensors: finite, no overflow, no out-of-range index, so every step takes the ordinary path;
  ``unique``/``unique_consecutive``/``nonzero`` are sized for the worst case (all distinct);
* ``nn.Module.to()`` fails on fake parameters (torch swaps parameter objects, and refuses ones with a weak
  reference, which FakeTensorMode keeps): while peft wraps the model (``lora``) the swap falls back to
  ``.data`` assignment, for fake tensors only (``methods._fake_safe_module_to``);
* HiFT methods update one group of layers per step: two whole cycles run (the first creates every
  group's state) and the peak is the second cycle's, i.e. the worst group's step; optimizer state moved to
  the host is reported apart (``host_bytes``), not in the per-GPU total; ``setup_peak_bytes`` is the
  peak before the measured step (construction and warm-up), which can be higher (``lomo_kernels.AdamW``
  allocates every moment on the device before ``HiFT`` moves the inactive groups' to the host);
* ZeRO-3 over ``world_size`` ranks is arithmetic on the measured split: parameters, persistent
  gradients and optimizer state divided by the world size, plus one gathered layer (the largest
  block of the model) in the compute dtype; activations and temporaries are per GPU as measured.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import sys
import warnings
from dataclasses import asdict, astuple, dataclass, field, is_dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from .methods import (ALL_METHODS, DEFAULT_APOLLO_RANK, DEFAULT_LORA_RANK, FUSED_METHODS, HIFT_METHODS, METHODS,
                      StepConfig, Trainer, missing_requirement)
from .tracker import CATEGORIES, GiB, MemoryTracker

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EXIT_FITS, EXIT_DOES_NOT_FIT, EXIT_USAGE = 0, 1, 2
EXIT_STATUS = ("exit status: 0 planned (and, with --gpu-gib, every method fits), 1 a method does not fit in "
               "--gpu-gib, 2 bad input")
LOMO_OPTIM_MISSING = ("the lomo-optim method runs lomo-optim's own code and needs the lomo-optim package "
                      "(pip install lomo-optim==0.1.1, or lomo_kernels[reference])")


class PlanExtrapolationWarning(UserWarning):
    """A plan made with ``sample_layers`` is extrapolated; the message gives its measured error."""


def has_lomo_optim() -> bool:
    try:
        import lomo_optim  # noqa: F401  (the planner runs its code, so it must import, not just exist)
    except ImportError:
        return False
    return True


def _missing_message(method: str) -> str | None:
    if method == "lomo-optim":
        return None if has_lomo_optim() else LOMO_OPTIM_MISSING
    need = missing_requirement(method)
    if need is None:
        return None
    return f"the {method} method runs {need.split('=')[0]}'s own code and needs it installed (pip install {need})"

# LLaMA-1 shapes (Touvron et al. 2023, table 2); "30b" is the model released as 33B. Llama-3-8B: Meta's
# released config.json (grouped-query attention with 8 KV heads, 128256-token vocabulary, untied head).
_LLAMA = dict(vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False)
PRESETS = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "llama-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    "llama-30b": dict(hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52),
    "llama-65b": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
                      rope_theta=500000.0),
}


def load_config(model: str):
    """A preset name (``llama-7b`` …) or a local ``config.json`` (or a folder holding one); never downloads."""
    from transformers import AutoConfig, LlamaConfig
    if model in PRESETS:
        return LlamaConfig(**{**_LLAMA, **PRESETS[model]})
    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    if not os.path.isfile(path):
        raise ValueError(f"model must be one of {sorted(PRESETS)} or a path to a config.json, got {model!r}")
    with open(path) as f:
        data = json.load(f)
    if "model_type" not in data:
        raise ValueError(f"{path} has no 'model_type'; is it a Hugging Face model config?")
    return AutoConfig.for_model(**data)


def build_model(config, dtype: torch.dtype, checkpointing: bool, attn: str = "sdpa") -> nn.Module:
    """The causal-LM for ``config`` in ``dtype`` (under whatever tensor mode is active), in train mode."""
    from transformers import AutoModelForCausalLM
    config._attn_implementation = attn
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the older name is deprecated)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False
    return model.train()


def _with_layers(config, layers: int):
    config = copy.deepcopy(config)
    config.num_hidden_layers = layers
    return config


_MEASURED: dict[tuple, tuple] = {}  # (config json, step settings) -> _measure's result; plans are deterministic


def _measure(config, *settings):
    key = (config.to_json_string(), tuple(astuple(x) if is_dataclass(x) else x for x in settings))
    if key not in _MEASURED:
        _MEASURED[key] = _measure_uncached(config, *settings)
    return _MEASURED[key]


def _measure_uncached(config, dtype, batch_size, seq_len, checkpointing, attn, step: StepConfig):
    """Split at the peak of the second of two steps (HiFT: cycles) on the fake model; gathered-layer bytes;
    parameter count (of the model as built: LoRA's adapters not included); host and setup peaks."""
    tracker = MemoryTracker()
    with FakeTensorMode(allow_non_fake_inputs=False), _DataFreeAnswers(), _accelerator_loss_chunks():
        net = build_model(config, DTYPES[dtype], checkpointing, attn)
        n_params = sum(p.numel() for p in net.parameters())
        gathered = largest_block_bytes(net)
        ids = torch.randint(0, config.vocab_size, (batch_size, seq_len))
        batch = {"input_ids": ids, "labels": ids}
        with tracker:
            tracker.adopt(batch.values(), "other")
            trainer = Trainer(net, step, tracker)
            for _ in range(trainer.steps_per_cycle):
                trainer.step(batch)  # the first step (cycle) creates the optimizer state
            setup_peak = tracker.report().peak_bytes
            tracker.reset_peak()
            for _ in range(trainer.steps_per_cycle):
                trainer.step(batch)
        report = tracker.report()
        extra = {"host_peak": report.host_peak, "setup_peak": setup_peak}
        return report.at_peak, gathered, n_params, extra


@contextlib.contextmanager
def _accelerator_loss_chunks():
    """The fused cross-entropy sizes its vocabulary chunks by the weight's device (16 MiB budget on CPU, 64 MiB
    on accelerators); the fake model sits on "cpu", so plan with the accelerator's budget."""
    try:
        from ..ops import linear_cross_entropy as lce
    except ImportError:
        yield
        return
    saved = dict(lce.DEFAULT_MEMORY_BUDGET)
    lce.DEFAULT_MEMORY_BUDGET["cpu"] = lce.DEFAULT_MEMORY_BUDGET["other"]
    try:
        yield
    finally:
        lce.DEFAULT_MEMORY_BUDGET.update(saved)


def largest_block_bytes(model: nn.Module) -> int:
    """Bytes of the biggest unit ZeRO-3 gathers at once: a repeated block (decoder layer) or a lone parameter."""
    sizes = [p.numel() * p.element_size() for p in model.parameters()]
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            sizes += [sum(p.numel() * p.element_size() for p in block.parameters()) for block in module]
    return max(sizes)


class _DataFreeAnswers(TorchDispatchMode):
    """Answers for the ops whose result depends on data, which fake tensors do not have.

    A value read (``.item()``, ``bool(t)``, ``tolist``) is 0 / False; ``unique``, ``unique_consecutive``
    (AdaLomo's embedding rows) and ``nonzero`` are sized for the worst case (every element distinct /
    non-zero), an upper bound on their memory.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        aten = torch.ops.aten
        if func is aten._local_scalar_dense.default:
            dtype = args[0].dtype
            return False if dtype == torch.bool else 0.0 if dtype.is_floating_point else 0
        if func is aten._unique2.default:
            x = args[0]
            flags = dict(zip(("sorted", "return_inverse", "return_counts"), args[1:])) | (kwargs or {})
            inverse_shape = x.shape if flags.get("return_inverse") else (0,)
            counts_shape = (x.numel(),) if flags.get("return_counts") else (0,)
            return (torch.empty(x.numel(), dtype=x.dtype, device=x.device),
                    torch.empty(inverse_shape, dtype=torch.int64, device=x.device),
                    torch.empty(counts_shape, dtype=torch.int64, device=x.device))
        if func is aten.unique_consecutive.default:
            x = args[0]
            flags = dict(zip(("return_inverse", "return_counts", "dim"), args[1:])) | (kwargs or {})
            if flags.get("dim") is not None:
                return func(*args, **(kwargs or {}))  # not data-free either: let fake tensors say so
            inverse_shape = x.shape if flags.get("return_inverse") else (0,)
            counts_shape = (x.numel(),) if flags.get("return_counts") else (0,)
            return (torch.empty(x.numel(), dtype=x.dtype, device=x.device),
                    torch.empty(inverse_shape, dtype=torch.int64, device=x.device),
                    torch.empty(counts_shape, dtype=torch.int64, device=x.device))
        if func is aten.nonzero.default:
            x = args[0]
            return torch.empty(x.numel(), x.dim(), dtype=torch.int64, device=x.device)
        return func(*args, **(kwargs or {}))


_SHOWN = CATEGORIES + ("gathered_layer",)


@dataclass
class PlanResult:
    model: str
    method: str
    dtype: str
    batch_size: int
    seq_len: int
    checkpointing: bool
    world_size: int
    clip_grad_norm: float | None
    n_params: int
    per_gpu: dict[str, int]          # bytes by category at the peak, per GPU
    measured: dict[str, int]         # the same for the unsharded step as tracked
    gathered_layer_bytes: int = 0
    gpu_gib: float | None = None
    notes: list[str] = field(default_factory=list)
    # --sample-layers: relative error of the extrapolated total, measured at 3x the sampled depth
    extrapolation_error: float | None = None
    host_bytes: int = 0              # host memory the method keeps (HiFT's offloaded state), not in the total
    setup_peak_bytes: int = 0        # peak before the measured step: construction and the warm-up step(s),
    #                                  unsharded (as measured on one GPU; world_size does not divide it)
    options: dict = field(default_factory=dict)  # the method's options (apollo_rank, lora_rank, hift_group_size,
    #                                              fused_cross_entropy) as planned

    @property
    def total_bytes(self) -> int:
        return sum(self.per_gpu.values())

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GiB

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_gib is None else self.total_gib <= self.gpu_gib

    def row(self) -> dict:
        out = {"model": self.model, "method": self.method, "dtype": self.dtype, "batch": self.batch_size,
               "seq": self.seq_len, "ckpt": self.checkpointing, "world": self.world_size}
        out.update({c: round(self.per_gpu[c] / GiB, 2) for c in _SHOWN})
        out["total_gib"] = round(self.total_gib, 2)
        out["host_gib"] = round(self.host_bytes / GiB, 2)
        if self.gpu_gib is not None:
            out["fits"] = f"{'yes' if self.fits else 'no'} ({self.gpu_gib:g} GiB)"
        return out


def plan(model: str = "llama-7b", method: str = "lomo", dtype: str = "fp16", batch_size: int = 1,
         seq_len: int = 512, checkpointing: bool = True, world_size: int = 1, clip_grad_norm: float | None = None,
         gpu_gib: float | None = None, attn: str = "sdpa", backend: str = "auto",
         sample_layers: int | None = None, *, apollo_rank: int | None = None, lora_rank: int = DEFAULT_LORA_RANK,
         hift_group_size: int = 1, fused_cross_entropy: bool | None = None) -> PlanResult:
    """Peak memory per GPU of one steady-state training step; see the module docstring.

    ``sample_layers``: run the step at that many layers and twice as many, and extrapolate linearly to
    the model's depth (exact when every layer is alike; ~10x faster for the big presets).
    ``apollo_rank`` (apollo, apollo-torch: 256; apollo-mini: 1), ``lora_rank`` (lora), ``hift_group_size``
    (decoder layers per HiFT group): the methods' options, ignored by the other methods.
    ``fused_cross_entropy``: passed to lomo_kernels' fused optimizers (None: their default); True is
    refused for methods that compute the loss from the logits."""
    if method not in ALL_METHODS:
        raise ValueError(f"method must be one of {ALL_METHODS}, got {method!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    for label, v in (("batch_size", batch_size), ("seq_len", seq_len), ("world_size", world_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{label} must be a positive integer, got {v!r}")
    notes = []
    if method == "lomo-optim" and dtype == "fp16" and clip_grad_norm is None:
        clip_grad_norm = 1.0  # lomo-optim 0.1.1 forces it for fp16 (its loss scaler needs the norm pass)
        notes.append("lomo-optim with fp16 requires norm clipping; clip_grad_norm=1.0 (its own default)")
    step = StepConfig(method, clip_grad_norm=clip_grad_norm, backend=backend, apollo_rank=apollo_rank,
                      lora_rank=lora_rank, hift_group_size=hift_group_size, fused_cross_entropy=fused_cross_entropy)
    config = load_config(model)
    layers = config.num_hidden_layers
    if sample_layers is not None and not (isinstance(sample_layers, int) and 1 <= 2 * sample_layers <= layers):
        raise ValueError(f"sample_layers must be an int in [1, {layers // 2}] for a model of {layers} layers, "
                         f"got {sample_layers!r}")
    if gpu_gib is not None and not (isinstance(gpu_gib, (int, float)) and math.isfinite(gpu_gib) and gpu_gib > 0):
        raise ValueError(f"gpu_gib must be a positive number of GiB, got {gpu_gib!r}")
    missing = _missing_message(method)
    if missing is not None:
        raise ValueError(missing)
    if method in HIFT_METHODS:
        if world_size > 1:
            raise ValueError(f"world_size must be 1 for {method}: HiFT supports an optimizer that applies its own "
                             "updates only (no ZeRO-3)")
        if hift_group_size > layers:
            raise ValueError(f"hift_group_size must be between 1 and the number of decoder layers ({layers}), "
                             f"got {hift_group_size}")
        if sample_layers is not None and hift_group_size > sample_layers:
            raise ValueError(f"sample_layers ({sample_layers}) must be at least hift_group_size ({hift_group_size}): "
                             "the sampled model needs whole groups")
    options = {k: v for k, v in (("apollo_rank", step.rank), ("lora_rank", lora_rank if method == "lora" else None),
                                 ("hift_group_size", hift_group_size if method in HIFT_METHODS else None),
                                 ("fused_cross_entropy", fused_cross_entropy)) if v is not None}
    extrapolation_error = None
    settings = (dtype, batch_size, seq_len, checkpointing, attn, step)
    if sample_layers is None or 2 * sample_layers == layers:
        measured, gathered, n_params, extra = _measure(config, *settings)
    else:
        # Every category is affine in the layer count when every layer is alike and the peak stays at
        # the same point of the step: measure two depths and extrapolate; a third depth (3N, when the
        # model has that many layers) measures how far off the straight line is.
        small, big = (_measure(_with_layers(config, k * sample_layers), *settings) for k in (1, 2))

        def line(a, b, to: int):
            return round(a + (b - a) * (to - sample_layers) / sample_layers)

        def extrapolate(to: int) -> dict:
            return {c: line(small[0][c], big[0][c], to) for c in small[0]}

        measured = extrapolate(layers)
        gathered = big[1]
        n_params = small[2] + (big[2] - small[2]) * (layers - sample_layers) // sample_layers
        extra = {k: line(small[3][k], big[3][k], layers) for k in small[3]}
        check = 3 * sample_layers
        if check <= layers:
            actual = sum(_measure(_with_layers(config, check), *settings)[0].values())
            extrapolation_error = sum(extrapolate(check).values()) / actual - 1
            warning = (f"--sample-layers {sample_layers}: the peak is extrapolated from {sample_layers} and "
                       f"{2 * sample_layers} layers to {layers}; checked at {check} layers it was off by "
                       f"{100 * extrapolation_error:+.2f}% (run without --sample-layers for the exact figure)")
        else:
            warning = (f"--sample-layers {sample_layers}: the peak is extrapolated from {sample_layers} and "
                       f"{2 * sample_layers} layers to {layers}, unchecked (the model has fewer than "
                       f"{check} layers to check it at; run without --sample-layers for the exact figure)")
        notes.append(warning)
        warnings.warn(warning, PlanExtrapolationWarning, stacklevel=2)
    if world_size == 1:
        gathered = 0
    per_gpu = dict(measured)
    sharded = ("params", "optimizer_state") if method in FUSED_METHODS else ("params", "grads", "optimizer_state")
    for c in sharded:
        per_gpu[c] = -(-per_gpu[c] // world_size)
    per_gpu["gathered_layer"] = gathered
    if world_size > 1:
        notes.append(f"ZeRO-3 over {world_size} ranks modelled arithmetically: {', '.join(sharded)} divided by "
                     f"{world_size}, plus one gathered layer")
        if method in ("adamw", "apollo", "apollo-mini"):
            notes.append(f"{method}: lomo_kernels' AdamW/Apollo have no ZeRO-3 integration yet (only Lomo and "
                         "AdaLomo do); this row is the arithmetic alone")
    if method in HIFT_METHODS:
        notes.append(f"{method}: the peak of the worst group's step over a whole cycle; inactive groups' optimizer "
                     "state on the host (host_gib), not in the total")
    if extra["setup_peak"] > sum(measured.values()):
        notes.append(f"{method}: construction and the warm-up steps peak at {extra['setup_peak'] / GiB:.2f} GiB, "
                     "above the measured step's")
    if method == "apollo-torch" and dtype != "fp32":
        notes.append("apollo-torch steps the 16-bit weights directly (no fp32 master), as its layer-wise examples")
    if method == "lora":
        notes.append(f"lora: rank {lora_rank} adapters (fp32) on every attention/MLP linear layer; n_params is the "
                     "base model's")
    return PlanResult(model, method, dtype, batch_size, seq_len, checkpointing, world_size, clip_grad_norm, n_params,
                      per_gpu, measured, gathered, gpu_gib, notes, extrapolation_error,
                      host_bytes=extra["host_peak"], setup_peak_bytes=extra["setup_peak"], options=options)


# --- command line ---------------------------------------------------------------------------------

class _DefaultInt(int):
    """An option's default, told apart from the same value typed (``is_default``)."""


class _DefaultFloat(float):
    """An option's default, told apart from the same value typed (``is_default``)."""


class _DefaultStr(str):
    """An option's default, told apart from the same value typed (``is_default``)."""


_DEFAULT_KINDS = {int: _DefaultInt, float: _DefaultFloat, str: _DefaultStr}


def mark_defaults(parser: argparse.ArgumentParser, flags) -> None:
    """Make the defaults of ``flags`` (int, float or str) instances of a marker subclass: equal to the plain
    value everywhere, but ``is_default`` tells them apart from a value the user typed."""
    for flag in flags:
        action = parser._option_string_actions[flag]
        kind = _DEFAULT_KINDS.get(type(action.default))
        if kind is not None:
            action.default = kind(action.default)


def is_default(value) -> bool:
    """True for a value no one typed: a marked default (``mark_defaults``), None, or a store_true's False."""
    return value is None or value is False or isinstance(value, tuple(_DEFAULT_KINDS.values()))


# options that only --recommend reads, and those only some methods read (flag -> the methods)
RECOMMEND_ONLY = ("--gpus", "--gpu-tflops", "--gpu-efficiency", "--link-gbps", "--max-batch-size", "--jobs",
                  "--exhaustive", "--chart")
METHOD_OPTIONS = {"--hift-group-size": HIFT_METHODS, "--apollo-rank": tuple(DEFAULT_APOLLO_RANK),
                  "--lora-rank": ("lora",)}


def _positive_gib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of GiB, got {text}")
    return value


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="llama-7b",
                        help=f"a preset ({', '.join(PRESETS)}) or a path to a Hugging Face config.json")
    parser.add_argument("--method", default="lomo",
                        help=f"one or more of {', '.join(ALL_METHODS)} (comma separated), or 'all' (every method "
                             "this installation can run on the model)")
    parser.add_argument("--dtype", default="fp16", choices=tuple(DTYPES))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="activation checkpointing (default: on)")
    parser.add_argument("--world-size", type=int, default=1, help="ZeRO-3 data-parallel ranks (default 1: no ZeRO)")
    parser.add_argument("--clip-grad-norm", type=float, default=None, help="global-norm clipping threshold")
    parser.add_argument("--gpu-gib", type=_positive_gib, default=None,
                        help="GPU memory (GiB, > 0) to check the plan against; exit status 1 if a method does not fit")
    parser.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"), help="attention implementation")
    parser.add_argument("--sample-layers", type=int, default=None,
                        help="measure at N and 2N layers and extrapolate to the model's depth (faster; warns "
                             "with the error measured at 3N layers; default: run the full depth)")
    parser.add_argument("--apollo-rank", type=int, default=None,
                        help="rank of apollo / apollo-torch (default 256) and apollo-mini (default 1)")
    parser.add_argument("--lora-rank", type=int, default=DEFAULT_LORA_RANK,
                        help=f"LoRA rank of the lora method (default {DEFAULT_LORA_RANK})")
    parser.add_argument("--hift-group-size", type=int, default=1,
                        help="decoder layers per HiFT group of hift-adamw / hift-torch-adamw (default 1)")
    parser.add_argument("--fused-cross-entropy", action=argparse.BooleanOptionalAction, default=None,
                        help="lomo_kernels' fused optimizers: compute the loss without logits (default: the "
                             "optimizer's own default)")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    from .recommend import add_recommend_arguments
    add_recommend_arguments(parser)
    mark_defaults(parser, ("--batch-size", "--method", *RECOMMEND_ONLY, *METHOD_OPTIONS))


def format_table(results: list[PlanResult]) -> str:
    rows = [r.row() for r in results]
    headers = list(rows[0])
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(row.get(h, "")) for h in headers) + " |" for row in rows]
    return "\n".join(lines)


def _unused_options(args: argparse.Namespace, methods) -> str | None:
    """An option the user typed that this plan would silently ignore (None: none)."""
    def typed(flag):
        return not is_default(getattr(args, flag.lstrip("-").replace("-", "_"), None))

    given = [flag for flag in RECOMMEND_ONLY if typed(flag)]
    if given:
        return f"{', '.join(given)} only apply with --recommend (the ranking of every candidate for your GPUs)"
    for flag, users in METHOD_OPTIONS.items():
        if typed(flag) and not any(m in users for m in methods):
            return f"{flag} applies to {', '.join(users)}, none of which is planned (--method {args.method})"
    return None


def run_plan(args: argparse.Namespace) -> int:
    """The ``plan`` command: a table (or JSON) on stdout, warnings on stderr; returns the exit status."""
    if getattr(args, "recommend", False):
        from .recommend import run_recommend
        return run_recommend(args)
    skipped = []
    everything = args.method == "all"
    if everything:
        methods = []
        for m in ALL_METHODS:  # `all` means every method this installation can run
            missing = _missing_message(m)
            if missing is None:
                methods.append(m)
            else:
                skipped.append(f"{m} skipped: {missing}")
        if getattr(args, "fused_cross_entropy", None):  # only lomo_kernels' own optimizers take it
            from .methods import OURS
            methods = [m for m in methods if m in OURS]
    else:
        methods = tuple(m.strip() for m in args.method.split(","))
    if args.gpu_gib is not None and not (math.isfinite(args.gpu_gib) and args.gpu_gib > 0):
        print(f"error: --gpu-gib must be a positive number of GiB, got {args.gpu_gib}", file=sys.stderr)
        return EXIT_USAGE
    unused = _unused_options(args, methods)
    if unused:
        print(f"error: {unused}", file=sys.stderr)
        return EXIT_USAGE
    options = dict(apollo_rank=getattr(args, "apollo_rank", None),
                   lora_rank=getattr(args, "lora_rank", DEFAULT_LORA_RANK),
                   hift_group_size=getattr(args, "hift_group_size", 1),
                   fused_cross_entropy=getattr(args, "fused_cross_entropy", None))
    results = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PlanExtrapolationWarning)  # printed below, once
            for m in methods:
                try:
                    results.append(plan(args.model, m, args.dtype, args.batch_size, args.seq_len,
                                        args.checkpointing, args.world_size, args.clip_grad_norm, args.gpu_gib,
                                        args.attn, sample_layers=args.sample_layers, **options))
                except ValueError as exc:
                    # `all`: a method that cannot run on this model (a rank above its widths, a HiFT group
                    # larger than the model, ZeRO-3 with HiFT) is skipped, saying why; named ones are errors
                    if not everything or m in METHODS:
                        raise
                    skipped.append(f"{m} skipped: {exc}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for note in skipped:
        print(f"warning: {note}", file=sys.stderr)
    for r in results:  # extrapolation warnings, with their measured error
        for note in r.notes:
            if note.startswith("--sample-layers"):
                print(f"warning: {r.method}: {note}", file=sys.stderr)
    fits = args.gpu_gib is None or all(r.fits for r in results)
    if args.json:
        print(json.dumps([asdict(r) | {"total_bytes": r.total_bytes} for r in results], indent=1))
    else:
        print(f"Peak memory per GPU (GiB) of one training step, {args.model}, planned on fake tensors:")
        print(format_table(results))
        for note in dict.fromkeys([*(n for r in results for n in r.notes if not n.startswith("--sample-layers")),
                                   *skipped]):
            print(f"note: {note}")
    return EXIT_FITS if fits else EXIT_DOES_NOT_FIT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lomo_kernels.memory", description=__doc__.splitlines()[0],
                                     epilog=EXIT_STATUS)
    add_plan_arguments(parser)
    return run_plan(parser.parse_args(argv))
