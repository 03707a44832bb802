#!/usr/bin/env bash
# Create .venv and install everything lomo_kernels needs from this repository's own files.
# Idempotent: a second run only rebuilds what changed. Nothing is downloaded at run time afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# -qq: errors only (this machine's pip config lists local index folders that warn on every lookup)
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -qq)

# torch first and pinned: an unpinned torch (or a build-isolated one) pulls a multi-GB CUDA build.
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -r requirements.txt
# DeepSpeed builds against the installed torch: no build isolation (see DESIGN.md).
"${PIP[@]}" --no-build-isolation -r requirements-deepspeed.txt
# The package itself, editable, with the compiled extension (C++ CPU kernels; CUDA kernels too when
# nvcc is present, unless LOMO_BUILD_CUDA=0).
"${PIP[@]}" --no-build-isolation -e .
.venv/bin/python -c "import lomo_kernels as lk; [print(f'  backend {k:7s} {v}') for k, v in lk.available_backends().items()]"
