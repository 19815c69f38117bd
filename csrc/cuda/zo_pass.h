// CUDA launchers of zokern's fused pass and Philox words. Torch-free: raw pointers, sizes and a stream, so that
// zo_pass.cu compiles with plain nvcc in seconds; csrc/cuda/bindings.cpp adapts them to torch.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace zokern {
namespace gpu {

enum class Format : int { kFloat32, kBFloat16, kFloat16 };

// One contiguous tensor: element j has global stream index base + j. The pass reads source[j] and writes data[j]:
// in place, source is data; out of place (the exact mode's theta + alpha z), another tensor of the same dtype and size.
struct TensorSpan {
  void* data;
  const void* source;
  int64_t numel;
  int64_t base;
};

// A row of zokern._scalars: seed, seed2, rounding_seed, then the float32 bits of alpha, alpha2, lr, weight_decay.
constexpr int64_t kScalarSlots = 8;

struct PassConfig {
  uint64_t seed;
  uint64_t seed2;
  uint64_t rounding_seed;
  float alpha;
  float alpha2;
  float lr;
  float weight_decay;
  float grad;             // used when grad_ptr is null
  const float* grad_ptr;  // device pointer to g, read by the kernel (no host sync); non-finite g: restore only
  const int64_t* scalars;  // device row of kScalarSlots read in place of the seeds and coefficients above (for
                           // CUDA graphs, which replay kernel arguments frozen); null: use the fields
  uint32_t domain;        // 0 gaussian, 1 rademacher
  bool update;
  bool second;
  bool stochastic;        // ignored for float32
};

// The fused pass (docs/stream.md, section 5) over `count` tensors of one format on the current device, in as many
// launches as needed; tensors with no elements are skipped. Returns the first launch error.
cudaError_t launch_zo_pass(const TensorSpan* tensors, int64_t count, Format format, const PassConfig& config,
                           cudaStream_t stream);

// out[4 b + q] = word q of Philox(seed, counter (n lo, n hi, domain, 0)), n = first_block + b, b < n_blocks.
cudaError_t launch_philox_words(uint64_t seed, uint32_t domain, uint64_t first_block, int64_t n_blocks, int64_t* out,
                                cudaStream_t stream);

}  // namespace gpu
}  // namespace zokern
