#!/usr/bin/env bash
# Everything a lent GPU should tell us, in two device calls (a session's device time is now 15 minutes in all,
# machine start included, and one call may run 10): run stage 1 first, stage 2 only if time is left.
#   bash benchmarks/gpu_session.sh 1   build; device correctness (CUDA and Triton backends, the no-sync ZOSGD and LDSD
#                                      steps, the cross-step merge, CUDA-graph steps, LDSD); pass bandwidth; ZO step
#                                      (each mode, graphed included) vs MeZO and AdamW at OPT-1.3B, batch 16 x 256
#                                      (issue 5's main target)
#   bash benchmarks/gpu_session.sh 2   OPT-6.7B at batch 1, 16-bit drift, LDSD overhead (full, LoRA), the preference
#                                      policy step at 1.3B, ZOPrO's kernels, the step plot
# Each stage builds zokern against the device's torch first (a fresh machine keeps nothing between sessions) and
# appends its tables to benchmarks/RESULTS.md, which it copies to $OUT when the device tool provides it.
set -uo pipefail
cd "$(dirname "$0")/.."
stage="${1:-1}"
if [[ ! "$stage" =~ ^[12]$ ]]; then
  echo "usage: bash benchmarks/gpu_session.sh 1|2" >&2
  exit 2
fi
MAX_JOBS="${MAX_JOBS:-16}" python -m pip install -q --no-build-isolation --no-deps -e . || exit 1
python -m zokern info
case "$stage" in
  1)
    python -m pytest -q -x -p no:cacheprovider tests/test_backends.py tests/test_ops.py tests/test_stream.py \
      tests/test_device_step.py tests/test_merge.py tests/test_graph.py tests/test_scalars.py tests/test_ldsd.py
    python -m benchmarks.kernels_gpu
    python -m benchmarks.step --model opt-1.3b --batch 16 --seq 256 --backends cuda,triton
    ;;
  2)
    python -m benchmarks.step --model opt-6.7b --batch 1 --seq 256 --backends cuda,triton --skip-adamw
    python -m benchmarks.drift --model opt-1.3b --steps 200
    python -m benchmarks.ldsd --shapes opt-1.3b
    python -m benchmarks.ldsd --shapes opt-1.3b-lora
    python -m pytest -q -x -p no:cacheprovider tests/test_preference.py
    python -m benchmarks.preference_step --size opt-1.3b
    python -m benchmarks.plot_step --device cuda
    ;;
esac
if [ -n "${OUT:-}" ]; then
  cp benchmarks/RESULTS.md benchmarks/step_results.jsonl benchmarks/step_vs_size_cuda.png "$OUT"/ 2>/dev/null || true
fi
