#!/usr/bin/env bash
# Not part of CI (it downloads about 5 GB). Rehearses a GPU session's build and tests on this CPU machine with the
# GPU machine's software -- Python 3.12, torch 2.11.0+cu130, triton 3.6, transformers 5.17 -- so that a lent GPU's
# few minutes go to measurements, not to build errors. The CUDA kernels and their torch binding compile for sm_90
# against that torch's own CUDA headers, exactly as benchmarks/gpu_session.sh builds them there (nothing CUDA runs
# here); then the whole test suite runs on the CPU. It also leaves in .whl/ (git-ignored) the setuptools wheel that
# gpu_session.sh installs should the device's setuptools be older than pyproject.toml needs: carry it with [".whl"].
#   bash .ci/rehearse_device.sh        # rehearses HEAD; VENV=DIR reuses a venv; about 10 minutes after downloads
#   TRITON_VARIANTS=all bash .ci/rehearse_device.sh   # also compiles all ~1000 Triton variants (17 min more)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-/tmp/zokern-device-venv}"
python312="${PYTHON312:-python3.12}"
if [ ! -x "$venv/bin/python" ]; then
  # Run, not looked up: a pyenv shim answers `command -v` for a version it then refuses to run.
  "$python312" -c "import sys; sys.exit(sys.version_info[:2] != (3, 12))" 2>/dev/null ||
    { echo "needs Python 3.12 (set PYTHON312)" >&2; exit 2; }
  "$python312" -m venv "$venv"
fi
pip_quiet=(-q --disable-pip-version-check)
"$venv/bin/pip" install "${pip_quiet[@]}" torch==2.11.0 "triton==3.6.*" "transformers==5.17.*" accelerate peft \
  datasets vaderSentiment matplotlib ninja scipy pytest pytest-xdist "setuptools>=77.0.3,<82" wheel
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >>.git/info/exclude
"$venv/bin/pip" download "${pip_quiet[@]}" --no-deps "setuptools==81.0.0" -d .whl

# In a clone: the editable build writes zokern/_C*.so, which must not mix with this checkout's build.
work="$(mktemp -d)"
git clone -q . "$work/main"
if [ -d ../shared ]; then cp -r ../shared "$work/shared"; fi
cd "$work/main"
# As gpu_session.sh builds (torch finds nvcc on PATH; setup.py finds the toolkit behind a wrapper script).
env -u CUDA_HOME MAX_JOBS="${MAX_JOBS:-2}" ZOKERN_REQUIRE_BUILD=1 TORCH_CUDA_ARCH_LIST=9.0 PATH="$venv/bin:$PATH" \
  python -m pip install "${pip_quiet[@]}" --no-build-isolation --no-deps -e .
"$venv/bin/python" -m zokern info
"$venv/bin/python" - <<'EOF'
import torch
import zokern._native as native

assert torch.version.cuda is not None, "the rehearsal needs torch's CUDA build"
missing = [op for op in ("zo_pass_", "zo_copy_pass_", "philox_words_") if not native.cuda_kernel_for(op)]
assert not missing, f"built without CUDA kernels for {missing}"
print("CUDA kernels registered for torch", torch.__version__)
EOF
"$venv/bin/python" -m pytest -q -n "${JOBS:-2}" -p no:cacheprovider tests
if [ "${TRITON_VARIANTS:-}" = all ]; then  # every Triton variant the package can launch, compiled for sm_90 (~17 min)
  "$venv/bin/python" tests/triton_ptx.py --all
fi
