"""``plan --recommend``: which combination of optimizations fits the user's GPUs and runs fastest (issue 14).

Being built; until then ``--recommend`` is refused with exit status 2."""
from __future__ import annotations

import argparse
import sys


def add_recommend_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recommend", action="store_true",
                        help="rank every candidate combination of optimizations (not available yet)")


def run_recommend(args: argparse.Namespace) -> int:
    print("error: --recommend is not available yet", file=sys.stderr)
    return 2
