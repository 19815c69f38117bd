#!/usr/bin/env bash
# Everything a lent GPU should tell us, in one device call (the device tool's `run`, about 10 minutes):
#   bash benchmarks/gpu_session.sh
# Builds zokern against the device's torch, checks the CUDA and Triton backends against the reference on the device
# (the test suite's backend tests run there on CUDA tensors), then appends to benchmarks/RESULTS.md: kernel bandwidth
# against a device copy, the ZO step against MeZO and AdamW at OPT-1.3B, 16-bit drift per scheme, LDSD's
# optimizer overhead (full and LoRA shapes), and the preference loop's policy step at 1.3B (ZO vs first order).
# Copies the results to $OUT when the device tool provides it.
set -uo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --no-build-isolation --no-deps -e . || exit 1
python -m zokern info
python -m pytest -q -x -p no:cacheprovider tests/test_backends.py tests/test_ops.py tests/test_stream.py \
  tests/test_ldsd.py tests/test_preference.py
python -m benchmarks.kernels_gpu
python -m benchmarks.step --model opt-1.3b --batch 16 --seq 256 --backends cuda,triton
python -m benchmarks.step --model opt-6.7b --batch 1 --seq 256 --backends cuda,triton --skip-adamw
python -m benchmarks.drift --model opt-1.3b --steps 200
python -m benchmarks.ldsd --shapes opt-1.3b
python -m benchmarks.ldsd --shapes opt-1.3b-lora
python -m benchmarks.preference_step --size opt-1.3b
python -m benchmarks.plot_step --device cuda
if [ -n "${OUT:-}" ]; then
  cp benchmarks/RESULTS.md benchmarks/step_results.jsonl benchmarks/step_vs_size_cuda.png "$OUT"/ 2>/dev/null || true
fi
