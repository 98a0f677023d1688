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
# triton (CPU wheel works): the tests check the Triton kernels under its interpreter (TRITON_INTERPRET=1);
# optional, so a failed download only makes those tests skip
pipq --no-deps "triton==3.9.0" || echo "setup: triton not installed; the Triton interpreter tests will skip" >&2
bash .ci/install-data.sh
echo "deftly set up: $("$PY" -c 'import deftly, torch; print("deftly", deftly.__version__, "torch", torch.__version__)')"
