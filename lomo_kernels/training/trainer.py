"""The training job behind ``lomo-kernels train``: set up (all checks before any write), loop, report."""
from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .data import IGNORE_INDEX, BatchOrder, PackedData, TokenizerAdapter, pack, read_documents, split_eval
from .errors import UsageError
from .optimizers import (build_runner, check_model_options, check_optimizer_options, describe, fused_loss_note,
                         resolve_optimizer_defaults)
from .presets import PRESETS, preset_config
from .report import plot_loss_curve, summarize
from .tokenizer import ByteTokenizer, save_byte_tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SCHEDULES = ("constant", "linear", "cosine")
# Options that belong to one invocation, not to the run (never stored in run.json).
INVOCATION_OPTIONS = {"resume", "overwrite", "config", "output", "progress", "threads"}
METRICS_FILE = "metrics.jsonl"
# Options a resumed run may change; every other option must match the run being resumed.
RESUMABLE_OPTIONS = {"steps", "eval_every", "save_every", "keep_checkpoints", "max_minutes", "device"}


class TrainingDiverged(Exception):
    """The loss became NaN/inf; training stopped and the last good checkpoint was kept."""


def default_warmup(steps: int) -> int:
    """Warm-up steps when --warmup-steps is not given: 10, but never more than a tenth of the run."""
    return min(10, steps // 10)


def lr_at(step: int, args) -> float:
    """Learning rate of 1-based ``step``: linear warmup over ``warmup_steps``, then the schedule."""
    s = step - 1
    if s < args.warmup_steps:
        return args.lr * (s + 1) / args.warmup_steps
    if args.schedule == "constant":
        return args.lr
    progress = (s - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    if args.schedule == "linear":
        return args.lr * (1.0 - progress)
    return args.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def check_options(args) -> None:
    resolve_optimizer_defaults(args)
    if args.warmup_steps is None and isinstance(args.steps, int) and args.steps > 0:
        args.warmup_steps = default_warmup(args.steps)
    positive = [("steps", args.steps), ("batch_size", args.batch_size), ("seq_len", args.seq_len),
                ("lr", args.lr), ("max_eval_sequences", args.max_eval_sequences), ("keep_checkpoints", args.keep_checkpoints)]
    for name, value in positive:
        if not value > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if args.seq_len < 2:
        raise UsageError(f"--seq-len must be >= 2 (a token and its successor), got {args.seq_len}")
    for name in ("max_minutes", "max_data_tokens", "threads"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be > 0 when given, got {value}")
    for name in ("warmup_steps", "weight_decay", "eval_every", "save_every"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not 0 <= args.eval_fraction < 1:
        raise UsageError(f"--eval-fraction must be in [0, 1), got {args.eval_fraction}")
    if args.warmup_steps > args.steps:
        raise UsageError(f"--warmup-steps ({args.warmup_steps}) exceeds --steps ({args.steps})")
    if args.device != "auto":
        try:
            device = torch.device(args.device)
        except RuntimeError as exc:
            raise UsageError(f"--device {args.device}: {exc}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: no CUDA device is available")
    check_optimizer_options(args)


# --- output directory --------------------------------------------------------------------------------

def resolve_run(args, explicit: set[str]):
    """Check the output directory and merge a resumed run's options. Writes nothing.

    Returns (args, the intact checkpoint to resume from or None, the run.json of a resumed run or None,
    the damaged checkpoints newer than it as (path, problem))."""
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {out} exists and is not a directory")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other; pick one")
    has_run = out.is_dir() and ckpt.holds_run(out)
    if args.resume:
        if not has_run:
            raise UsageError(f"--resume: {out} holds no run to resume")
        intact, damaged = ckpt.newest_intact_checkpoint(out)
        if intact is None:
            if damaged:
                raise UsageError(f"--resume: no intact checkpoint in {out / ckpt.CHECKPOINTS}: "
                                 + "; ".join(f"{p.name}: {why}" for p, why in damaged)
                                 + "; start the run again with --overwrite")
            raise UsageError(f"--resume: the run in {out} has no checkpoint yet; start it again with --overwrite")
        run_info = ckpt.read_run_info(out)
        saved = run_info["options"]
        for key in explicit - INVOCATION_OPTIONS - RESUMABLE_OPTIONS:
            if key in saved and getattr(args, key) != saved[key]:
                raise UsageError(f"--resume continues the same run, but --{key.replace('_', '-')} is "
                                 f"{getattr(args, key)!r} here and {saved[key]!r} in {out / ckpt.RUN_FILE}")
        for key, value in saved.items():
            if key not in RESUMABLE_OPTIONS or key not in explicit:
                setattr(args, key, value)
        if saved.get("clip_grad_value", 0.0) is None:  # a run from before 0.0 meant "off" in run.json
            args.clip_grad_value = 0.0
        if "fused_cross_entropy" not in saved:  # a run from before the fused loss: resume it without, exactly
            args.fused_cross_entropy = False
        opt_state = intact.state.get("optimizer")
        if args.optimizer == "adamw" and isinstance(opt_state, dict) and "format" not in opt_state:
            # a run from before --optimizer adamw became the fused AdamW: its checkpoint is torch.optim.AdamW's
            args.optimizer = "torch-adamw"
            print(f"lomo-kernels: note: the run in {out} was started with --optimizer adamw when that meant "
                  "torch.optim.AdamW (now --optimizer torch-adamw); resuming it as torch-adamw", file=sys.stderr)
        reached = intact.state["step"]
        if isinstance(args.steps, int) and args.steps < reached:
            raise UsageError(f"--resume: the run in {out} already reached step {reached} ({intact.path.name}), "
                             f"beyond --steps {args.steps}; --steps is the run's total, so pass --steps above "
                             f"{reached} to train further (nothing was changed)")
        return args, intact, run_info, damaged
    if out.is_dir() and any(out.iterdir()):
        if not has_run:
            raise UsageError(f"--output {out} is not empty and holds no lomo-kernels run; choose another directory")
        if not args.overwrite:
            raise UsageError(f"--output {out} already holds a run; pass --resume to continue it or "
                             "--overwrite to replace it")
    return args, None, None, []


# --- model ---------------------------------------------------------------------------------------------

@dataclass
class ModelSource:
    kind: str  # "preset" or "path"
    spec: str


def resolve_model(spec: str) -> ModelSource:
    path = Path(spec)
    if not path.exists():
        if spec in PRESETS:
            return ModelSource("preset", spec)
        raise UsageError(f"--model {spec}: no such directory, and not a built-in model ({', '.join(PRESETS)})")
    if not path.is_dir():
        raise UsageError(f"--model {spec} is a file; pass a Hugging Face model directory or a built-in name ({', '.join(PRESETS)})")
    if not (path / "config.json").is_file():
        raise UsageError(f"--model {spec} is not a Hugging Face model directory (no config.json)")
    return ModelSource("path", spec)


def load_config_and_tokenizer(source: ModelSource):
    if source.kind == "preset":
        return preset_config(source.spec), ByteTokenizer(), save_byte_tokenizer
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(source.spec)
    except Exception as exc:
        raise UsageError(f"--model {source.spec}: cannot read its config.json ({exc})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.spec)
    except Exception as exc:
        raise UsageError(f"--model {source.spec}: cannot load its tokenizer ({type(exc).__name__}: {exc})") from None
    return config, tokenizer, tokenizer.save_pretrained


def build_model(source: ModelSource, config, dtype: torch.dtype, weights_dir: Path | None, seed: int):
    """Random init for a preset (from ``seed``), else the weights of ``weights_dir`` or the model path."""
    from transformers import AutoModelForCausalLM

    if weights_dir is None and source.kind == "preset":
        torch.manual_seed(seed)
        # built in `dtype` (not cast afterwards) so buffers such as rotary frequencies keep the dtype
        # from_pretrained gives them, and a resumed run computes exactly what the first one did
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
    where = weights_dir if weights_dir is not None else source.spec
    try:
        return AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
    except Exception as exc:
        raise UsageError(f"cannot load a causal LM from {where} ({type(exc).__name__}: {exc})") from None


# --- data ----------------------------------------------------------------------------------------------

def load_data(args, tokenizer) -> tuple[PackedData, PackedData | None, str]:
    source = "the Python standard library" if args.data is None else ", ".join(args.data)
    packed = pack(read_documents(args.data), TokenizerAdapter(tokenizer), args.seq_len,
                  max_tokens=args.max_data_tokens, source=source)
    train, held_out = split_eval(packed, args.eval_fraction, args.max_eval_sequences, args.seed)
    digest = hashlib.sha256(packed.tokens.numpy().tobytes() + packed.labels.numpy().tobytes()).hexdigest()
    return train, held_out, digest


def evaluate(model, data: PackedData, batch_size: int, device) -> float:
    """Mean loss per predicted token over ``data``."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            tokens = data.tokens[start:start + batch_size].to(device)
            labels = data.labels[start:start + batch_size].to(device)
            n = int((labels[:, 1:] != IGNORE_INDEX).sum())
            total += float(model(input_ids=tokens, labels=labels).loss) * n
            count += n
    model.train()
    return total / count


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# --- metrics -------------------------------------------------------------------------------------------

def load_metrics(path: Path, upto_step: int) -> list[dict]:
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["step"] <= upto_step]


def rewrite_metrics(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)


# --- the job -------------------------------------------------------------------------------------------

@dataclass
class Run:
    """Everything the loop needs, prepared and checked."""

    args: object
    out: Path
    model: torch.nn.Module
    runner: object
    order: BatchOrder
    train_data: PackedData
    eval_data: PackedData | None
    save_tokenizer: object
    device: torch.device
    start_step: int
    history: list[dict]
    model_name: str

    def save(self, step: int) -> Path:
        state = {"step": step, "optimizer": self.runner.state_dict(), "data": self.order.state_dict(),
                 "rng": ckpt.rng_state()}
        return ckpt.save_checkpoint(self.out, step, self.model, self.save_tokenizer, state, self.args.keep_checkpoints)


def prepare(args, explicit: set[str], say) -> Run:
    """Check every input (raising UsageError before anything is written), then set up the run directory."""
    args, intact, run_info, damaged = resolve_run(args, explicit)
    resume_from = intact.path if intact is not None else None
    check_options(args)
    out = Path(args.output)
    run_source = ModelSource(**run_info["model_source"]) if run_info else resolve_model(args.model)
    # a resumed run reads config and tokenizer from its checkpoint, which holds them too
    resumed_path = resume_from is not None and run_source.kind == "path"
    source = ModelSource("path", str(resume_from)) if resumed_path else run_source
    config, tokenizer, save_tokenizer = load_config_and_tokenizer(source)
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and args.seq_len > positions:
        raise UsageError(f"--seq-len {args.seq_len} exceeds the model's {positions} positions (max_position_embeddings)")
    train_data, eval_data, digest = load_data(args, tokenizer)
    if run_info and run_info["data_sha256"] != digest:
        raise UsageError("--resume: the data differ from those the run started with; resume needs the same data")
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_model(source, config, DTYPES[args.dtype], resume_from, args.seed).to(device)
    if args.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x renamed it
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if args.hift_group_size is not None and hasattr(model, "disable_input_require_grads"):
            # non-reentrant checkpointing needs no input that requires grad; without it HiFT's backward
            # stops below the active group again (docs/hift.md)
            model.disable_input_require_grads()
    model.config.use_cache = False
    model.train()
    check_model_options(args, model, say)
    try:  # constructor checks (e.g. a model the optimizer cannot hold) are bad input too: before any write
        runner = build_runner(args, model)
    except ValueError as exc:
        raise UsageError(f"--optimizer {args.optimizer}: {exc}") from None
    held = getattr(runner, "opt", None)  # a fused optimizer, or HiFT answering for the one it wraps
    if "fused_cross_entropy" in explicit and args.fused_cross_entropy and not getattr(held, "fused_cross_entropy", True):
        reason = held.fused_cross_entropy_reason
        runner.opt.close()  # asked for explicitly, not silently dropped: bad input, before any write
        raise UsageError(f"--fused-cross-entropy does not apply to this run: {reason} (leave it out to run with the "
                         "model's own loss, or pass --no-fused-cross-entropy)")

    # Everything is checked: from here on the output directory is written.
    if args.overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    leftovers = ckpt.remove_stale_temporaries(out)
    if leftovers:
        say(f"removed what an interrupted save left behind: {', '.join(str(p.relative_to(out)) for p in leftovers)}")
    for path, problem in damaged:
        aside = ckpt.set_aside(path)
        print(f"lomo-kernels: warning: checkpoint {path.name} is damaged ({problem}); set aside as "
              f"{aside.relative_to(out)}, resuming from {resume_from.name} instead", file=sys.stderr)
    if damaged:  # the top-level weights may be the damaged checkpoint's: publish those resumed from
        ckpt.publish_model_files(resume_from, out)
    start_step, order = 0, BatchOrder(len(train_data), args.batch_size, args.seed)
    if resume_from is not None:
        state = intact.state
        runner.load_state_dict(state["optimizer"])
        start_step = state["step"]
        order = BatchOrder(len(train_data), args.batch_size, args.seed, **{k: state["data"][k] for k in ("epoch", "offset")})
        ckpt.set_rng_state(state["rng"])
        say(f"resuming {out} from step {start_step} ({resume_from.name})"
            + (f"; it already reached --steps {args.steps}, nothing to train" if start_step >= args.steps else ""))
    options = {k: v for k, v in vars(args).items() if k not in INVOCATION_OPTIONS}
    ckpt.write_json_atomic(out / ckpt.RUN_FILE, {"options": options, "model_source": vars(run_source), "data_sha256": digest})
    history = load_metrics(out / METRICS_FILE, start_step)
    rewrite_metrics(out / METRICS_FILE, history)

    n_params = sum(p.numel() for p in model.parameters())
    say(f"model {run_source.spec}: {n_params / 1e6:.2f} M parameters, {args.dtype}, on {device}; optimizer {describe(args)}")
    note = fused_loss_note(runner)
    if note:
        say(note)
    say(f"data: {len(train_data)} training and {len(eval_data) if eval_data else 0} held-out sequences "
        f"of {args.seq_len} tokens")
    return Run(args, out, model, runner, order, train_data, eval_data, save_tokenizer, device, start_step, history,
               run_source.spec)


def train_loop(run: Run) -> None:
    """Steps ``start_step+1 .. args.steps`` (or until ``--max-minutes``), with evaluation, metrics and checkpoints."""
    from tqdm.auto import tqdm

    args, device = run.args, run.device
    tokens_per_step = args.batch_size * args.seq_len
    bar = tqdm(total=args.steps, initial=run.start_step, disable=not args.progress, unit="step", dynamic_ncols=True)
    started = time.perf_counter()
    step = run.start_step
    with open(run.out / METRICS_FILE, "a") as metrics:
        def record(entry: dict) -> None:
            run.history.append(entry)
            metrics.write(json.dumps(entry) + "\n")
            metrics.flush()

        while step < args.steps:
            step += 1
            t0 = time.perf_counter()
            index = run.order.next_batch()
            tokens, labels = run.train_data.tokens[index].to(device), run.train_data.labels[index].to(device)
            lr = lr_at(run.runner.schedule_step(step), args)
            loss = run.model(input_ids=tokens, labels=labels).loss
            loss_value = loss.item()
            if not math.isfinite(loss_value):  # checked before the fused update could write bad weights
                bar.close()
                kept = ckpt.latest_checkpoint(run.out)
                raise TrainingDiverged(f"the loss is {loss_value} at step {step}; training stopped. "
                                       + (f"The last good checkpoint is {kept} (its weights are also in {run.out})."
                                          if kept else "No checkpoint had been saved yet."))
            info = run.runner.step(loss, lr)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
            memory = peak_memory_mb(device)
            record({"type": "train", "step": step, "loss": loss_value, "lr": lr, "grad_norm": info.grad_norm,
                    "skipped": info.skipped, "nonfinite_updates": info.nonfinite_updates,
                    "tokens_per_s": tokens_per_step / seconds,
                    "peak_memory_mb": memory, "elapsed_s": time.perf_counter() - started})
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens_per_step / seconds:.0f}", mem=f"{memory:.0f}MB")
            out_of_time = args.max_minutes is not None and time.perf_counter() - started > 60 * args.max_minutes
            final = step == args.steps or out_of_time
            if run.eval_data is not None and ((args.eval_every and step % args.eval_every == 0) or final):
                eval_loss = evaluate(run.model, run.eval_data, args.batch_size, device)
                perplexity = math.exp(min(eval_loss, 700))  # no overflow for a diverging run
                record({"type": "eval", "step": step, "eval_loss": eval_loss, "eval_perplexity": perplexity})
                bar.write(f"step {step}: eval loss {eval_loss:.4f}, perplexity {perplexity:.2f}")
            if (args.save_every and step % args.save_every == 0) or final:
                run.save(step)
            if out_of_time:
                bar.write(f"--max-minutes {args.max_minutes} reached: stopped after step {step} of {args.steps}")
                break
    bar.close()


def run_training(args, explicit: set[str], say=print) -> Path:
    """Train as ``args`` say; returns the run directory. Raises UsageError before writing anything
    if the input is bad, TrainingDiverged if the loss stops being finite."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its per-file load/save bars would interleave with ours
    threads_before = torch.get_num_threads()
    threads = args.threads if args.threads is not None else (None if "OMP_NUM_THREADS" in os.environ else 1)
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        run = prepare(args, explicit, say)
        started = time.perf_counter()
        train_loop(run)
    finally:
        torch.set_num_threads(threads_before)  # leave an in-process caller (e.g. tests) as it was
    summary = summarize(run.history, run.out, time.perf_counter() - started, run.device)
    ckpt.write_json_atomic(run.out / "summary.json", summary["numbers"])
    plot_loss_curve(run.history, run.out / "loss_curve.png",
                    f"{run.model_name}, {describe(run.args)}, lr {run.args.lr:g}, {run.args.dtype}")
    say(summary["table"])
    say(f"outputs in {run.out.resolve()}: model (config.json, model.safetensors, tokenizer), {METRICS_FILE}, "
        f"loss_curve.png, summary.json, checkpoints/")
    return run.out
