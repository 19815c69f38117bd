#!/usr/bin/env bash
# Everything a lent GPU should tell us, in three device calls, most important first. A session's device time is 15
# minutes in all, machine start included, and one call may run 10: a session runs one stage, on a fresh machine (a
# machine goes back 30 s after a call), so each stage builds zokern and fits its limits, build included, under 600 s.
#   bash benchmarks/gpu_session.sh 1   build; pass bandwidth (bf16, fp32; after checking both backends against the
#                                      reference); ZO step (each mode, graphed included) vs MeZO and AdamW at OPT-1.3B,
#                                      batch 16 x 256, and vs MeZO at OPT-6.7B, batch 1 (issue 5's main targets); then
#                                      the device tests of the backends, the no-sync step and the CUDA-graph step
#   bash benchmarks/gpu_session.sh 2   OPT-13B and Llama-7B at batch 1 (and OPT-30B on an H200), LDSD overhead (full,
#                                      LoRA)
#   bash benchmarks/gpu_session.sh 3   16-bit drift (bf16, and fp16 as MeZO ran), the other device tests (ops,
#                                      stream, merge, scalars, LDSD, ZOPrO's kernels), the preference step at 1.3B
# Each stage's RESULTS.md and step_results.jsonl come back separately: merge them here, then plot the step times here
# (python -m benchmarks.plot_step --device cuda), from the merged rows.
# Each stage appends its tables to benchmarks/RESULTS.md, which it copies to $OUT with its log when the device tool
# provides it. Call it with the device tool's timeout_s at 600.
set -uo pipefail
cd "$(dirname "$0")/.."
stage="${1:-1}"
if [[ ! "$stage" =~ ^[123]$ ]]; then
  echo "usage: bash benchmarks/gpu_session.sh 1|2|3" >&2
  exit 2
fi
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"  # the GPU machine's python3 holds its torch
log="${OUT:-/tmp}/gpu_session_$stage.log"
# Each piece under its own time limit, so that a hang in one (a deadlocked capture, say) leaves time for the rest of
# the call (10 minutes at most); what finished is in RESULTS.md and the log either way.
run() {
  local limit="$1"
  shift
  echo "== $(date +%T) $* (limit ${limit} s)"
  timeout --signal=INT --kill-after=10 "$limit" "$@"
  local status=$?
  echo "== $(date +%T) exit $status"
  save
  return $status
}
# After every piece: a call killed at its limit still brings back what was measured.
save() {
  if [ -n "${OUT:-}" ]; then
    cp benchmarks/RESULTS.md benchmarks/step_results.jsonl "$OUT"/ 2>/dev/null || true
  fi
}
{
  # pyproject.toml's SPDX license needs setuptools >= 77.0.3; torch 2.11 caps it below 82. Should the device's be
  # older, install the wheel carried in .whl/ (run with carry [".whl"]; see .ci/rehearse_device.sh).
  if ! "$PY" -c "import re, sys, setuptools
sys.exit(tuple(map(int, re.findall(r'\d+', setuptools.__version__)[:3])) < (77, 0, 3))"; then
    "$PY" -m pip install -q --no-index --no-deps .whl/setuptools-*.whl || echo "setuptools < 77.0.3 and no wheel in .whl/"
  fi
  command -v nvcc && nvcc --version | tail -1
  # A build error must stop the stage with its message, not leave zokern running without its extension.
  build() {
    run 150 env MAX_JOBS="${MAX_JOBS:-16}" ZOKERN_REQUIRE_BUILD=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
      "$PY" -m pip install -v --no-build-isolation --no-deps -e .  # -v: setup.py's "zokern:" lines say what it chose
  }
  # A stage run on a machine an earlier stage left warm finds the extension built from the same sources: no second
  # build (30-60 s of the call). The stamp is run.sh's: the build inputs' hash, kept in build/ (ignored by git).
  stamp_file=build/.zokern-build-stamp
  stamp=$(cat setup.py pyproject.toml $(find csrc -type f | sort) | sha1sum | cut -d' ' -f1)
  if [ "$(cat "$stamp_file" 2>/dev/null)" = "$stamp" ] &&
    "$PY" -c "import sys, zokern._native as n; sys.exit(not n.cuda_kernel_for('zo_pass_'))" 2>/dev/null; then
    echo "== extension already built from these sources (an earlier stage on this machine): no rebuild"
  else
    build || exit 1
  fi
  # Once, in a rehearsal on the CPU (.ci/rehearse_device.sh), a build that succeeded had no CUDA kernels and could
  # not be made to again (ZOKERN_REQUIRE_BUILD=1 now also fails a build that finds no nvcc): one more build before
  # giving the stage up.
  if ! "$PY" -c "import sys, zokern._native as n; sys.exit(not n.cuda_kernel_for('zo_pass_'))"; then
    echo "== the extension has no CUDA kernels; building again"
    build || exit 1
  fi
  mkdir -p build && echo "$stamp" > "$stamp_file"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv || true
  "$PY" -m zokern info
  "$PY" -c "import setuptools, torch, triton; print('setuptools', setuptools.__version__, 'torch', torch.__version__,
'triton', triton.__version__)"
  "$PY" -c "import sys, zokern; sys.exit('cuda' not in zokern.available_backends())" || exit 1
  case "$stage" in
    1)
      # The measurements first (kernels_gpu checks both backends against the reference before timing them), then
      # the device tests of the kernels and the captured step with what is left; their workers compile Triton
      # kernels in parallel (16 cores).
      run 100 "$PY" -m benchmarks.kernels_gpu
      run 130 "$PY" -m benchmarks.step --model opt-1.3b --batch 16 --seq 256 --backends cuda,triton
      run 80 "$PY" -m benchmarks.step --model opt-6.7b --batch 1 --seq 256 --backends cuda,triton --skip-adamw
      # --maxfail, not -x: one failure must not hide the other tests' results (the captured step's above all).
      run 100 "$PY" -m pytest -q --maxfail=25 -n 8 -p no:cacheprovider tests/test_backends.py tests/test_graph.py \
        tests/test_device_step.py
      ;;
    2)
      run 75 "$PY" -m benchmarks.step --model opt-13b --batch 1 --seq 256 --backends cuda --skip-adamw
      run 80 "$PY" -m benchmarks.step --model llama-7b --batch 1 --seq 256 --backends cuda --skip-adamw
      if "$PY" -c "import sys, torch; sys.exit(torch.cuda.get_device_properties(0).total_memory < 120e9)"; then
        # An H200 (141 GB): OPT-30B's 60 GB of bf16 weights take full-parameter ZO steps too.
        run 120 "$PY" -m benchmarks.step --model opt-30b --batch 1 --seq 256 --backends cuda --skip-adamw
      fi
      run 60 "$PY" -m benchmarks.ldsd --shapes opt-1.3b
      run 30 "$PY" -m benchmarks.ldsd --shapes opt-1.3b-lora
      ;;
    3)
      run 60 "$PY" -m benchmarks.drift --model opt-1.3b --steps 100  # exact mode first: its row is the point
      run 40 "$PY" -m benchmarks.drift --model opt-1.3b --steps 50 --dtype float16  # MeZO's published precision
      run 120 "$PY" -m pytest -q --maxfail=25 -n 8 -p no:cacheprovider tests/test_ops.py tests/test_stream.py \
        tests/test_merge.py tests/test_scalars.py tests/test_ldsd.py tests/test_preference.py
      run 90 "$PY" -m benchmarks.preference_step --size opt-1.3b
      ;;
  esac
} 2>&1 | tee "$log"
