"""``lomo-kernels``: the command-line front end (``train``, and ``plan`` when the memory planner is installed)."""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch

from ..training import TrainingDiverged, UsageError, run_training
from .train import DESCRIPTION, EPILOG, HelpFormatter, Parser, add_train_arguments, config_tokens

EXIT_OS, EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 1, 2, 3, 130
EXIT_STATUS = """\
exit status:
  train: 0 done, 1 a file-system error (disk full, permission denied), 2 bad input (nothing written),
         3 the loss became NaN/inf (the last good checkpoint is kept), 130 interrupted
  plan:  0 planned (and, with --gpu-gib, every method fits), 1 a method does not fit in --gpu-gib,
         2 bad input"""


def _has_planner() -> bool:
    try:
        return importlib.util.find_spec("lomo_kernels.memory.planner") is not None
    except ImportError:
        return False


def build_parser(suppress_defaults: bool = False) -> Parser:
    parser = Parser(prog="lomo-kernels", description="Fused-update full-parameter fine-tuning (LOMO kernels). "
                    "Run without a command to train the built-in default.", epilog=EXIT_STATUS,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = commands.add_parser("train", help="fine-tune a causal LM (the default command)", description=DESCRIPTION,
                                epilog=EPILOG, formatter_class=HelpFormatter)
    add_train_arguments(train, suppress_defaults)
    if _has_planner():
        from ..memory import planner

        plan = commands.add_parser("plan", help="estimate peak training memory of a model and method",
                                   description="Peak memory per GPU of one training step of each method, planned "
                                   "by running the real step on fake tensors (no GPU, no weights needed).",
                                   epilog=planner.EXIT_STATUS)
        planner.add_plan_arguments(plan)
    return parser


def _expand_config(argv: list[str], parser: Parser) -> list[str]:
    """Put the tokens of ``train --config FILE`` before the command line's, so the command line wins."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv[1:])
    if known.config is None:
        return argv
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    return argv[:1] + config_tokens(known.config, train_parser) + argv[1:]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():
        # transformers imports DeepSpeed (when installed) on save; naming its accelerator spares the user
        # its "unable to detect" warning on CPU machines.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not argv:
        print("lomo-kernels: no command given, running the default `lomo-kernels train` (see lomo-kernels --help)")
        argv = ["train"]
    try:
        parser = build_parser()
        if argv[0] == "train":
            argv = _expand_config(argv, parser)
        args = parser.parse_args(argv)
        if args.command is None:
            parser.error("choose a command")
        if args.command == "plan":
            from ..memory import planner

            return planner.run_plan(args) or 0
        explicit = set(vars(build_parser(suppress_defaults=True).parse_args(argv))) - {"command"}
        run_training(args, explicit)
        return 0
    except UsageError as exc:
        print(f"lomo-kernels: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except PermissionError as exc:  # named as such, with the path it concerns
        print(f"lomo-kernels: error: permission denied: {exc.filename or exc} (check that this user may read "
              "and write it); the latest complete checkpoint (if any) is intact", file=sys.stderr)
        return EXIT_OS
    except OSError as exc:  # the file system said no (disk full, ...): not a bug to trace
        print(f"lomo-kernels: error: {exc}; the latest complete checkpoint (if any) is intact", file=sys.stderr)
        return EXIT_OS
    except KeyboardInterrupt:
        print("lomo-kernels: interrupted; the latest checkpoint (if any) is intact", file=sys.stderr)
        return EXIT_INTERRUPTED
    except TrainingDiverged as exc:
        print(f"lomo-kernels: error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
