#!/usr/bin/env bash
# Set everything up (scripts/setup.sh), then run the whole test suite on CPU.
# GPU tests are marked `gpu` and skip without a CUDA device; Triton kernels run under the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TRITON_INTERPRET=1 DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec .venv/bin/python -m pytest -q "$@"
