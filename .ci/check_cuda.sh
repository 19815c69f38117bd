#!/usr/bin/env bash
# Compile-only checks of the CUDA sources, for CI machines without a GPU (and without a CUDA build of torch):
#   1. csrc/cuda/zo_pass.cu (torch-free) compiles with nvcc for sm_80 and sm_90, warning- and spill-free;
#   2. csrc/cuda/bindings.cpp parses against the installed torch's headers, with a stand-in for the one generated
#      header that the CPU wheel lacks (.ci/cuda_stub).
# Needs the CUDA toolkit: nvcc on PATH (or NVCC=...) and its headers under CUDA_HOME (default /usr/local/cuda).
# Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
CUDA_INCLUDE="${CUDA_HOME:-/usr/local/cuda}/include"
if [[ ! -x "$NVCC" || ! -f "$CUDA_INCLUDE/cuda_runtime_api.h" ]]; then
  echo "check_cuda: no CUDA toolkit (nvcc: '$NVCC', headers: '$CUDA_INCLUDE'); set NVCC and CUDA_HOME" >&2
  exit 1
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

# In the standard torch builds it with: C++17 up to torch 2.12, C++20 from 2.13.
for arch_std in sm_80:c++17 sm_90:c++17 sm_90:c++20; do
  arch="${arch_std%%:*}" std="${arch_std##*:}"
  echo "check_cuda: nvcc -arch=$arch -std=$std csrc/cuda/zo_pass.cu"
  "$NVCC" -c -std="$std" -O3 -arch="$arch" -Icsrc/include -Werror all-warnings -Xptxas -warn-spills,-Werror \
    csrc/cuda/zo_pass.cu -o "$out/zo_pass_$arch.o"
done

mapfile -t torch_includes < <(python3 -c "from torch.utils.cpp_extension import include_paths
print('\n'.join(include_paths()))")
echo "check_cuda: g++ -fsyntax-only csrc/cuda/bindings.cpp against torch $(python3 -c 'import torch; print(torch.__version__)')"
std="$(python3 -c "import torch; print('c++20' if torch.__version__ >= (2, 13) else 'c++17')")"  # as torch builds it
g++ -std="$std" -fsyntax-only -Wall -Werror -DZOKERN_WITH_CUDA "${torch_includes[@]/#/-isystem}" -isystem.ci/cuda_stub \
  -isystem"$CUDA_INCLUDE" -Icsrc/include csrc/cuda/bindings.cpp
echo "check_cuda: all CUDA checks passed"
