// CUDA kernels of zokern::zo_pass_, zokern::zo_copy_pass_ and zokern::philox_words_ (schemas in csrc/cpu/): argument
// checks, the current device and stream, then the torch-free launchers of zo_pass.cu. Nothing here synchronises: a grad
// tensor on the device is read by the kernel itself.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "zo_pass.h"

namespace zokern {

// Defined in csrc/cpu/zo_pass.cpp: the checks both backends share.
void check_pass_inputs(at::TensorList tensors, at::IntArrayRef bases, int64_t seed, int64_t domain, int64_t seed2,
                       int64_t rounding_seed, const std::optional<at::Tensor>& grad_tensor, bool update,
                       c10::DeviceType device_type);
void check_philox_inputs(const at::Tensor& out, int64_t seed, int64_t domain, int64_t first_block);

namespace {

gpu::Format format_of(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return gpu::Format::kFloat32;
    case at::kBFloat16:
      return gpu::Format::kBFloat16;
    default:  // at::kHalf, the only other dtype the ops admit
      return gpu::Format::kFloat16;
  }
}

// The perturbation terms of a pass; the update's fields stay off.
gpu::PassConfig perturbation_config(int64_t seed, double alpha, int64_t domain, int64_t seed2, double alpha2,
                                    bool second) {
  gpu::PassConfig config{};
  config.seed = static_cast<uint64_t>(seed);
  config.seed2 = static_cast<uint64_t>(seed2);
  config.alpha = static_cast<float>(alpha);
  config.alpha2 = static_cast<float>(alpha2);
  config.domain = static_cast<uint32_t>(domain);
  config.second = second;
  return config;
}

void launch(const std::vector<gpu::TensorSpan>& spans, const at::Tensor& first, const gpu::PassConfig& config) {
  if (spans.empty()) return;
  const c10::cuda::CUDAGuard guard(first.device());
  C10_CUDA_CHECK(gpu::launch_zo_pass(spans.data(), static_cast<int64_t>(spans.size()), format_of(first.scalar_type()),
                                     config, c10::cuda::getCurrentCUDAStream()));
}

void zo_pass_cuda(at::TensorList tensors, at::IntArrayRef bases, int64_t seed, double alpha, int64_t domain,
                  double lr, double grad_value, const std::optional<at::Tensor>& grad_tensor, bool update,
                  double weight_decay, int64_t seed2, double alpha2, bool second, int64_t rounding_seed,
                  bool stochastic, const std::optional<at::Tensor>& scalars) {
  check_pass_inputs(tensors, bases, seed, domain, seed2, rounding_seed, grad_tensor, update, c10::DeviceType::CUDA);
  if (tensors.empty()) return;
  if (scalars.has_value()) {
    TORCH_CHECK(scalars->scalar_type() == at::kLong && scalars->numel() == gpu::kScalarSlots &&
                    scalars->is_contiguous() && scalars->device() == tensors[0].device(),
                "zo_pass_: scalars must be a contiguous int64 tensor of ", gpu::kScalarSlots, " elements on ",
                tensors[0].device(), ", got ", scalars->scalar_type(), " with ", scalars->numel(), " elements on ",
                scalars->device());
  }
  std::vector<gpu::TensorSpan> spans;
  spans.reserve(tensors.size());
  for (size_t k = 0; k < tensors.size(); ++k) {
    if (tensors[k].numel() > 0) {
      spans.push_back({tensors[k].data_ptr(), tensors[k].const_data_ptr(), tensors[k].numel(), bases[k]});
    }
  }
  gpu::PassConfig config = perturbation_config(seed, alpha, domain, seed2, alpha2, second);
  config.rounding_seed = static_cast<uint64_t>(rounding_seed);
  config.lr = static_cast<float>(lr);
  config.weight_decay = static_cast<float>(weight_decay);
  config.grad = static_cast<float>(grad_value);
  config.grad_ptr = update && grad_tensor.has_value() ? grad_tensor->const_data_ptr<float>() : nullptr;
  config.scalars = scalars.has_value() ? scalars->const_data_ptr<int64_t>() : nullptr;
  config.update = update;
  config.stochastic = stochastic;
  launch(spans, tensors[0], config);
}

// zokern::zo_copy_pass_ (schema in csrc/cpu/copy_pass.cpp): out_k = source_k + alpha z(seed) [+ alpha2 z(seed2)],
// rounded to nearest, by the in-place kernel reading each source and writing its output.
void zo_copy_pass_cuda(at::TensorList out, at::TensorList sources, at::IntArrayRef bases, int64_t seed, double alpha,
                       int64_t domain, int64_t seed2, double alpha2, bool second) {
  TORCH_CHECK(out.size() == sources.size() && out.size() == bases.size(),
              "zo_copy_pass_: out, sources and bases differ in length");
  TORCH_CHECK(domain == 0 || domain == 1, "zo_copy_pass_: domain must be 0 or 1");
  TORCH_CHECK(seed >= 0 && seed2 >= 0, "zo_copy_pass_: seeds must be in [0, 2^63)");
  if (out.empty()) return;
  const at::ScalarType dtype = out[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "zo_copy_pass_: float32, bfloat16 or float16 tensors, got ", dtype);
  std::vector<gpu::TensorSpan> spans;
  spans.reserve(out.size());
  for (size_t k = 0; k < out.size(); ++k) {
    TORCH_CHECK(out[k].is_cuda() && sources[k].device() == out[k].device() && out[k].device() == out[0].device() &&
                    out[k].is_contiguous() && sources[k].is_contiguous() &&
                    out[k].scalar_type() == dtype && sources[k].scalar_type() == dtype &&
                    sources[k].numel() == out[k].numel(),
                "zo_copy_pass_: out[", k, "] and sources[", k,
                "] must be contiguous tensors of one dtype and size on one CUDA device");
    // As the CPU ops check it: the last element's index, base + numel - 1, may be 2^63 - 1.
    TORCH_CHECK(bases[k] >= 0 && (out[k].numel() == 0 || out[k].numel() - 1 <= INT64_MAX - bases[k]),
                "zo_copy_pass_: bases[", k, "] = ", bases[k], " with numel ", out[k].numel(),
                " leaves the stream's index range [0, 2^63)");
    if (out[k].numel() > 0) {
      spans.push_back({out[k].data_ptr(), sources[k].const_data_ptr(), out[k].numel(), bases[k]});
    }
  }
  launch(spans, out[0], perturbation_config(seed, alpha, domain, seed2, alpha2, second));
}

void philox_words_cuda(const at::Tensor& out, int64_t seed, int64_t domain, int64_t first_block) {
  check_philox_inputs(out, seed, domain, first_block);
  TORCH_CHECK(out.is_cuda(), "philox_words_: out is on ", out.device(), ", expected a CUDA device");
  const c10::cuda::CUDAGuard guard(out.device());
  C10_CUDA_CHECK(gpu::launch_philox_words(static_cast<uint64_t>(seed), static_cast<uint32_t>(domain),
                                          static_cast<uint64_t>(first_block), out.size(0),
                                          out.mutable_data_ptr<int64_t>(), c10::cuda::getCurrentCUDAStream()));
}

}  // namespace
}  // namespace zokern

TORCH_LIBRARY_IMPL(zokern, CUDA, m) {
  m.impl("zo_pass_", &zokern::zo_pass_cuda);
  m.impl("zo_copy_pass_", &zokern::zo_copy_pass_cuda);
  m.impl("philox_words_", &zokern::philox_words_cuda);
}
