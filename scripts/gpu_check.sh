#!/usr/bin/env bash
# The one prepared call for a lent GPU machine (no network, its own CUDA torch and Triton): builds
# lomo_kernels._C in place for the local GPU, runs pytest -m gpu, the kernel and training-step benchmarks
# and a short fine-tune, each step timed, its result written to DIR as JSON and Markdown; a failing step
# is recorded and the next one runs. Whole run under 8 minutes on an H100-class GPU, --quick under 3.
#
#   bash scripts/gpu_check.sh [--quick] [--out DIR] [--dry-run] [--skip a,b] [--only a,b]
#
# Python: $PYTHON if set, else .venv/bin/python if it has a CUDA torch, else python3 on PATH.
# Details and the steps: bench/gpu_check.py.
set -u
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  if [ -x .venv/bin/python ] && .venv/bin/python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    PYTHON=.venv/bin/python
  fi
fi
exec "$PYTHON" bench/gpu_check.py "$@"
