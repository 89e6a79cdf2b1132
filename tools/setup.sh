#!/usr/bin/env bash
# Set up padless in ./.venv on a fresh machine: a CPU torch first (never a multi-GB CUDA build on a CPU box),
# then padless itself with its dev extra. Idempotent: a second run installs nothing new.
# Override the torch requirement with PADLESS_TORCH_SPEC (default: torch==2.13.0; its CPU build without an NVIDIA
# GPU: from PyTorch's CPU index where reachable, else whatever build the configured index serves).
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python_bin" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" >/dev/null 2>&1; then
  # PyPI's Linux torch is the CUDA build (several GB with its nvidia-* packages). Without an NVIDIA GPU, PyTorch's
  # CPU index is added where it is reachable; its +cpu build of the same version wins over PyPI's.
  cpu_index=()
  if ! command -v nvidia-smi >/dev/null 2>&1 &&
    python -c "import urllib.request; urllib.request.urlopen('https://download.pytorch.org/whl/cpu/torch/', timeout=5)" \
      >/dev/null 2>&1; then
    cpu_index=(--extra-index-url https://download.pytorch.org/whl/cpu)
  fi
  python -m pip install -q ${cpu_index[@]+"${cpu_index[@]}"} "${PADLESS_TORCH_SPEC:-torch==2.13.0}"
fi
python -m pip install -q -e ".[dev]"
