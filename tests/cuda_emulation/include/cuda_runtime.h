// A stand-in for the CUDA runtime, just enough to compile csrc/cuda/zo_pass.cu with a host compiler and run its
// kernels on the CPU (tests/cuda_emulated.py builds it; tests/test_cuda_emulation.py says what it checks).
//
// A launch runs the grid's blocks, and each block's threads, one after another. That is faithful for kernels whose
// threads share nothing (no shared memory, barriers or atomics), as zokern's are: each thread's result cannot depend
// on the order. An element a kernel processes twice, or never, shows as a wrong value; an access past a tensor's
// end, as a changed canary; a 16-byte access to an address that is not 16-byte aligned, which faults on a GPU, as
// a sanitizer report (uint4 and float4 are 16-byte aligned types here too; emulated_pass.cpp handles the reports).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#ifndef ZOKERN_CUDA_EMULATION
#error "tests/cuda_emulation/include is for the host emulation build only (define ZOKERN_CUDA_EMULATION)"
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __grid_constant__
#define __launch_bounds__(...)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

// The built-in variables a kernel reads, set by launch_kernel before each emulated thread runs.
inline dim3 blockIdx, threadIdx, gridDim, blockDim;

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
using cudaStream_t = struct CUstream_st*;

namespace zokern_emulation {

// What a test sets and reads (through emulated_pass.cpp's C functions).
struct State {
  int multiprocessors = 132;  // cudaDevAttrMultiProcessorCount
  int64_t launches = 0;
  int64_t largest_grid = 0;
};
inline State state;

}  // namespace zokern_emulation

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = zokern_emulation::state.multiprocessors;
  return cudaSuccess;
}

// A constant: the launchers cache the answer per device for the life of the process.
template <class Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int, size_t) {
  *blocks = 2;
  return cudaSuccess;
}

inline cudaError_t cudaGetLastError() { return cudaSuccess; }

// The launch that zo_pass.cu makes with <<<grid, threads, 0, stream>>> when compiled by nvcc.
template <class... Params, class... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), int64_t grid, int threads, cudaStream_t, const Args&... args) {
  // CUDA's limit on a kernel's parameters before 12.1 (and the launchers' own assumption, see TileMap).
  static_assert((sizeof(Args) + ... + 0) <= 4096, "kernel parameters exceed 4 KiB");
  if (grid < 1 || grid > 0x7FFFFFFF || threads < 1 || threads > 1024) return cudaErrorInvalidConfiguration;
  auto& s = zokern_emulation::state;
  ++s.launches;
  if (grid > s.largest_grid) s.largest_grid = grid;
  gridDim = {static_cast<unsigned>(grid), 1, 1};
  blockDim = {static_cast<unsigned>(threads), 1, 1};
  for (int64_t b = 0; b < grid; ++b) {
    blockIdx = {static_cast<unsigned>(b), 0, 0};
    for (int t = 0; t < threads; ++t) {
      threadIdx = {static_cast<unsigned>(t), 0, 0};
      kernel(args...);
    }
  }
  return cudaSuccess;
}
