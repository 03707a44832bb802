#!/usr/bin/env bash
# Set everything up (scripts/setup.sh), then run the main job on its embedded default: a short
# full-parameter fine-tune of a small built-in model with fused LOMO on the Python standard library's
# own source files, into runs/default (replaced on each run of this script without arguments).
# Arguments, if any, go to `lomo-kernels train` instead (e.g. --output DIR --optimizer adalomo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ $# -eq 0 ]; then set -- --overwrite; fi
exec .venv/bin/lomo-kernels train "$@"
