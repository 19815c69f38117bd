#!/usr/bin/env bash
# zokern's two entry points, usable on a fresh machine:
#   bash run.sh demo [ARGS]   install what is missing, then run `zokern demo` (the main job)
#   bash run.sh test [ARGS]   install what is missing, then run the test suite (pytest ARGS)
# An installed torch is never replaced (a GPU user keeps their CUDA build); set PYTHON to pick the interpreter.
set -euo pipefail
caller=$PWD  # the demo runs here: its --out, --model and --data are the user's relative paths
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

has_module() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }

pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

# pyproject.toml's license field is an SPDX expression, which setuptools reads from 77 on; a fresh venv has an older
# one, and --no-build-isolation builds with whatever is installed.
has_build_setuptools() {
  "$PY" -c "import re, setuptools, sys; sys.exit(tuple(map(int, re.findall(r'\d+', setuptools.__version__)[:3])) < (77, 0, 3))" \
    2>/dev/null
}

ensure_torch() {
  if ! has_module torch; then
    echo "run.sh: torch is not installed; installing it (pip's default build for this platform)"
    pip_install torch
  fi
}

# Rebuild the editable install when the C++/CUDA sources or the build script change.
ensure_zokern() {
  local stamp_file=build/.zokern-build-stamp stamp
  stamp=$(cat setup.py pyproject.toml $(find csrc -type f | sort) | sha1sum | cut -d' ' -f1)
  if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] && has_module zokern; then
    return
  fi
  # pip would meet the torch floor by replacing the installed torch: refuse instead, naming it.
  "$PY" zokern/_floors.py
  has_module ninja || pip_install ninja
  has_build_setuptools || pip_install "setuptools>=77.0.3" wheel
  echo "run.sh: building zokern (C++ extension; CUDA kernels too when torch has CUDA and nvcc is found)"
  # --no-build-isolation builds against the installed torch instead of downloading another into a build env.
  pip_install --no-build-isolation -e .
  mkdir -p build && echo "$stamp" > "$stamp_file"
}

ensure_demo_tools() {
  # The preference pipeline: models from transformers configs, data through datasets, a VADER judge, plots.
  has_module transformers || pip_install transformers
  has_module datasets || pip_install datasets
  has_module vaderSentiment || pip_install vaderSentiment
  has_module matplotlib || pip_install matplotlib
}

ensure_test_tools() {
  has_module pytest || pip_install pytest
  has_module xdist || pip_install pytest-xdist
  has_module scipy || pip_install scipy
  # The optimizers' integration tests: the Trainer and a PEFT LoRA model (transformers comes with the demo's tools).
  has_module accelerate || pip_install accelerate
  has_module peft || pip_install peft
  ensure_demo_tools
  if ! has_module triton && [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ]; then
    echo "run.sh: installing triton (its kernels are tested on the CPU through TRITON_INTERPRET=1)"
    pip_install triton
  fi
}

cmd=${1:-}
shift || true
case "$cmd" in
  demo)
    ensure_torch
    ensure_zokern
    ensure_demo_tools
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's zokern, run from the caller's directory
    cd "$caller"
    exec "$PY" -m zokern demo "$@"
    ;;
  test)
    ensure_torch
    ensure_zokern
    ensure_test_tools
    "$PY" -m zokern info
    exec "$PY" -m pytest -n 2 tests "$@"
    ;;
  *)
    echo "usage: bash run.sh demo [ARGS] | bash run.sh test [PYTEST ARGS]" >&2
    exit 2
    ;;
esac
