#!/usr/bin/env bash
# Set up deftly on a fresh machine (Python >= 3.10, CPU): PyTorch's CPU build, deftly with its test
# tools, and the real offline data sets / models the recipes and tests use.
# torch is pinned to 2.13.0 first: a bare `torch` would make pip fetch a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
pipq() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
    pipq "torch==2.13.0"
fi
pipq -e ".[dev]" "torch==2.13.0"
bash .ci/install-data.sh
echo "deftly set up: $("$PY" -c 'import deftly, torch; print("deftly", deftly.__version__, "torch", torch.__version__)')"
