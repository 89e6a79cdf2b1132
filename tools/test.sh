#!/usr/bin/env bash
# The whole test suite from a fresh clone: set up .venv, lint, then pytest (CPU: Triton kernels run under
# TRITON_INTERPRET=1). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
. .venv/bin/activate
ruff check .
ruff format --check .
python -m pytest -q -n 2 "$@"
