#!/usr/bin/env bash
# Everything a lent GPU should tell us, in three device calls (the device tool's `run` allows 10 minutes each):
#   bash benchmarks/gpu_session.sh 1   build, device correctness (CUDA and Triton backends, LDSD, ZOPrO), bandwidth
#   bash benchmarks/gpu_session.sh 2   ZO step vs MeZO and AdamW (OPT-1.3B, OPT-6.7B), 16-bit drift
#   bash benchmarks/gpu_session.sh 3   LDSD overhead (full, LoRA), preference policy step at 1.3B, the step plot
# Each stage builds zokern against the device's torch first (a fresh machine keeps nothing between sessions) and
# appends its tables to benchmarks/RESULTS.md, which it copies to $OUT when the device tool provides it.
set -uo pipefail
cd "$(dirname "$0")/.."
stage="${1:-1}"
if [[ ! "$stage" =~ ^[123]$ ]]; then
  echo "usage: bash benchmarks/gpu_session.sh 1|2|3" >&2
  exit 2
fi
python -m pip install -q --no-build-isolation --no-deps -e . || exit 1
python -m zokern info
case "$stage" in
  1)
    python -m pytest -q -x -p no:cacheprovider tests/test_backends.py tests/test_ops.py tests/test_stream.py \
      tests/test_ldsd.py tests/test_preference.py
    python -m benchmarks.kernels_gpu
    ;;
  2)
    python -m benchmarks.step --model opt-1.3b --batch 16 --seq 256 --backends cuda,triton
    python -m benchmarks.step --model opt-6.7b --batch 1 --seq 256 --backends cuda,triton --skip-adamw
    python -m benchmarks.drift --model opt-1.3b --steps 200
    ;;
  3)
    python -m benchmarks.ldsd --shapes opt-1.3b
    python -m benchmarks.ldsd --shapes opt-1.3b-lora
    python -m benchmarks.preference_step --size opt-1.3b
    python -m benchmarks.plot_step --device cuda
    ;;
esac
if [ -n "${OUT:-}" ]; then
  cp benchmarks/RESULTS.md benchmarks/step_results.jsonl benchmarks/step_vs_size_cuda.png "$OUT"/ 2>/dev/null || true
fi
