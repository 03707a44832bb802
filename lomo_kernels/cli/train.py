"""Options of ``lomo-kernels train`` and the config-file loader (a config file's keys are option names)."""
from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

from ..ops._common import BACKENDS
from ..training.errors import UsageError
from ..training.optimizers import (APOLLO_DEFAULT_GAP, APOLLO_DEFAULT_RANK, DEFAULT_CLIP_VALUE, DEFAULT_LR,
                                  FUSED, HIFT_LR_SCHEDULES, HIFT_STRATEGIES, OPTIMIZERS)
from ..training.presets import PRESETS
from ..training.trainer import DTYPES, SCHEDULES

DESCRIPTION = """\
Full-parameter fine-tuning of a causal language model, with the optimizer update fused into the
backward pass (LOMO, AdaLomo, AdamW, APOLLO, APOLLO-Mini; optionally HiFT's one group of layers per
step over any of them) or a baseline optimizer for comparison.

With no options it trains the built-in "small" model on the Python standard library's own source
files for a few minutes at most on a 2-core CPU, and prints where its outputs are."""

EPILOG = """\
data formats: a .jsonl file holds one JSON object per line, either {"text": ...} or
{"prompt": ..., "completion": ...} (the loss is then taken on the completion only); any other file
is plain text (one document per file); a directory is read recursively.

examples:
  lomo-kernels train
  lomo-kernels train --model ./my-llama --data train.jsonl --dtype bf16 --lr 1e-2 --output runs/ft
  lomo-kernels train --output runs/ft --resume --steps 2000
  lomo-kernels train --config run.yaml --optimizer adamw --lr 1e-3
  lomo-kernels train --optimizer apollo --apollo-rank 64 --clip-grad-norm 1.0
  lomo-kernels train --optimizer adamw --hift-group-size 2 --hift-strategy random

exit status: 0 done, 1 a file-system error (e.g. disk full, permission denied), 2 bad input (nothing
written; --resume with --steps below the step reached), 3 the loss became NaN/inf (the last good
checkpoint is kept), 130 interrupted."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's line breaks and appends each option's default to its help (unless the
    default is None: such an option's help says what happens without it)."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Raises UsageError instead of printing and exiting, so the caller reports every error one way."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def off_or_positive(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 turns it off), got {text}")
    return value or None


def off_or_positive_kept(text: str) -> float:
    """As ``off_or_positive``, but 0 stays 0.0 (off), so that None can mean "the optimizer's default"."""
    return off_or_positive(text) or 0.0


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def add_train_arguments(parser: argparse.ArgumentParser, suppress_defaults: bool = False) -> None:
    """All options of ``train``; with ``suppress_defaults`` parsing yields only the options given."""

    def add(group, *flags, default=None, **kwargs):
        group.add_argument(*flags, default=argparse.SUPPRESS if suppress_defaults else default, **kwargs)

    g = parser.add_argument_group("model and data")
    add(g, "--model", default="small", metavar="NAME|DIR",
        help=f"a local Hugging Face causal-LM directory, or a built-in LLaMA-style model trained from random "
             f"init with the byte-level tokenizer: {', '.join(f'{k} ({v[0]}x{v[1]} layers)' for k, v in PRESETS.items())}")
    add(g, "--data", nargs="+", metavar="PATH",
        help="text files, JSONL files or directories (default: the Python standard library's .py files)")
    add(g, "--seq-len", type=int, default=128, help="tokens per training sequence (documents are packed)")
    add(g, "--max-data-tokens", type=int, help="read at most this many tokens of data (default: all)")
    add(g, "--eval-fraction", type=float, default=0.05, help="fraction of sequences held out for evaluation (0: none)")
    add(g, "--max-eval-sequences", type=int, default=64, help="cap on the number of held-out sequences")

    g = parser.add_argument_group("optimization")
    add(g, "--optimizer", choices=OPTIMIZERS, default="lomo",
        help="fused, no weight gradient kept: lomo (SGD), adalomo, adamw (torch.optim.AdamW's rule), apollo, "
             "apollo-mini (apollo-torch's APOLLOAdamW rules); baselines that keep every gradient: sgd, torch-adamw "
             "(torch.optim.SGD / AdamW), lomo-optim (the PyPI reference LOMO)")
    add(g, "--lr", type=float,
        help=f"peak learning rate (default by optimizer: {', '.join(f'{k} {v:g}' for k, v in DEFAULT_LR.items())})")
    add(g, "--schedule", choices=SCHEDULES, default="cosine", help="learning-rate schedule after warmup")
    add(g, "--warmup-steps", type=int,
        help="steps of linear warmup from lr/warmup to lr (default: min(10, steps // 10))")
    add(g, "--steps", type=int, default=300, help="total optimizer steps of the run")
    add(g, "--batch-size", type=int, default=16, help="sequences per step")
    add(g, "--clip-grad-norm", type=off_or_positive, default=None,
        help="clip the global gradient norm to this (LOMO: a norm-only backward pass first); 0: off")
    add(g, "--clip-grad-value", type=off_or_positive_kept,
        help="clamp every gradient entry to [-v, v] (free in the fused update; keeps plain SGD/LOMO stable "
             "through the first steps from random init); 0: off (default: "
             f"{', '.join(f'{k} {v:g}' for k, v in DEFAULT_CLIP_VALUE.items())}; off for the AdamW family; "
             "apollo / apollo-mini cannot clip values)")
    add(g, "--weight-decay", type=float, default=0.0, help="decoupled weight decay (w -= lr*wd*w)")
    add(g, "--dtype", choices=tuple(DTYPES), default="fp32",
        help="weight dtype; fp16 uses dynamic loss scaling (fused optimizers and lomo-optim only)")
    add(g, "--rounding", choices=("nearest", "stochastic"),
        help="rounding of bf16/fp16 weight updates, fused optimizers only (default: stochastic for bf16, else nearest)")
    add(g, "--backend", choices=BACKENDS, default="auto", help="kernel backend of the fused optimizers")
    add(g, "--fused-cross-entropy", action=argparse.BooleanOptionalAction,
        help="compute the loss with the LM head's update fused into the cross-entropy (no logits tensor, no LM-head "
             "gradient), where the optimizer has that rule and the model's loss was verified equal to it "
             "(default: on for such optimizers; the run's header says whether it is on and why not; given explicitly "
             "where it cannot apply: exit status 2)")
    add(g, "--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False,
        help="recompute activations in the backward pass to save memory")
    add(g, "--seed", type=int, default=0, help="seed of initialization, data split and order, stochastic rounding")
    add(g, "--device", default="auto", help="cpu, cuda, cuda:N, or auto (a GPU if there is one)")
    add(g, "--threads", type=int,
        help="CPU threads for torch (default: $OMP_NUM_THREADS if set, else 1: OpenMP threads spin-wait, and on "
             "a CPU shared with other jobs two threads ran 15x slower than one here; raise it on a machine of your own)")

    g = parser.add_argument_group("APOLLO (--optimizer apollo / apollo-mini)")
    add(g, "--apollo-rank", type=positive_int,
        help=f"rank of APOLLO's random projection (default: {APOLLO_DEFAULT_RANK}, capped at the smallest dimension "
             "of the projected weights; apollo-mini: 1)")
    add(g, "--apollo-scale-type", choices=("channel", "tensor"),
        help="APOLLO's gradient scale: one per channel, or one for the whole tensor (default: channel; apollo-mini: tensor)")
    add(g, "--apollo-update-proj-gap", type=positive_int,
        help=f"steps between refreshes of the random projection (default: {APOLLO_DEFAULT_GAP})")

    g = parser.add_argument_group("HiFT (one group of layers per step, over a fused optimizer)")
    add(g, "--hift-group-size", type=positive_int, metavar="K",
        help=f"turn HiFT on: train one group of K decoder layers per step (the embedding and the head are "
             f"groups of their own), rotating through the groups; wraps --optimizer {'|'.join(FUSED)} "
             "(default: off)")
    add(g, "--hift-strategy", choices=HIFT_STRATEGIES,
        help="order of the groups: down2up (embedding first), up2down (head first), random (a new seeded "
             "permutation every cycle) (default: down2up)")
    add(g, "--hift-lr-schedule", choices=HIFT_LR_SCHEDULES,
        help="per_cycle (HiFT's): every step of a cycle of groups uses the schedule's lr at the cycle's first "
             "step; per_step: each step its own (default: per_cycle)")

    g = parser.add_argument_group("output and progress")
    add(g, "--output", default="runs/default", metavar="DIR",
        help="run directory: final model (loads with AutoModelForCausalLM.from_pretrained), checkpoints, metrics")
    add(g, "--resume", action="store_true", default=False,
        help="continue the run in --output from its latest checkpoint, exactly (only --steps, --eval-every, "
             "--save-every, --keep-checkpoints, --max-minutes and --device may change, besides --threads and --progress)")
    add(g, "--overwrite", action="store_true", default=False, help="replace the run already in --output")
    add(g, "--eval-every", type=int, default=100, help="evaluate on the held-out split every N steps and at the end (0: only at the end)")
    add(g, "--save-every", type=int, default=100, help="checkpoint every N steps and at the end (0: only at the end)")
    add(g, "--keep-checkpoints", type=int, default=2, help="how many of the newest checkpoints to keep")
    add(g, "--max-minutes", type=float, help="stop (and save) after this much training time")
    add(g, "--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar")
    add(g, "--config", metavar="FILE",
        help="YAML or TOML file of options (keys are option names, e.g. seq_len: 256); the command line overrides it")


def config_tokens(path: str, parser: argparse.ArgumentParser) -> list[str]:
    """The command-line tokens a config file stands for."""
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise UsageError(f"--config {path}: {exc.strerror}") from None
    try:
        if file.suffix == ".toml":
            values = tomllib.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text) or {}
    except Exception as exc:  # yaml.YAMLError / tomllib.TOMLDecodeError: report the parser's message
        raise UsageError(f"--config {path}: not valid {'TOML' if file.suffix == '.toml' else 'YAML'} ({exc})") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a mapping of option names to values")
    actions = parser._option_string_actions  # argparse has no public lookup of an option by name
    tokens = []
    for key, value in values.items():
        flag = "--" + str(key).replace("_", "-")
        action = actions.get(flag)
        if action is None or flag in ("--config", "--help"):
            raise UsageError(f"--config {path}: unknown option {key!r}")
        if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction)):
            if not isinstance(value, bool):
                raise UsageError(f"--config {path}: {key} must be true or false, got {value!r}")
            if value or isinstance(action, argparse.BooleanOptionalAction):
                tokens.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            tokens += [flag, *map(str, value)]
        elif value is not None:
            tokens += [flag, str(value)]
    return tokens
