// Stand-in for the header that a CUDA build of torch generates and the CPU wheel lacks; .ci/check_cuda.sh needs it
// only to syntax-check csrc/cuda/bindings.cpp against the CPU wheel's other c10/cuda headers.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
