#!/usr/bin/env bash
# Set up padless in ./.venv on a fresh machine: a CPU torch first (never a multi-GB CUDA build on a CPU box),
# then padless itself with its dev extra. Idempotent: a second run installs nothing new.
# Override the torch requirement with PADLESS_TORCH_SPEC (default: torch==2.13.0, the CPU build on our machines).
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python_bin" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install -q "${PADLESS_TORCH_SPEC:-torch==2.13.0}"
fi
python -m pip install -q -e ".[dev]"
