// zokern::zo_copy_pass_(Tensor(a!)[] out, Tensor[] sources, int[] bases, int seed, float alpha, int domain, int seed2,
//                       float alpha2, bool second) -> ()
// out_k = source_k + alpha z(seed) [+ alpha2 z(seed2)], rounded to nearest in the tensors' dtype: the perturbation
// pass of docs/stream.md, section 5, written out of place. The exact mode materialises theta + alpha z into scratch
// with it in one read of theta and one write, where a copy followed by the in-place pass would take two of each.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include <zokern/stream.h>

#include "chunk_stream.h"

namespace zokern {
namespace {

using namespace cpu;

template <class Format, bool kSecond>
ZK_CPU_CLONES void copy_chunk(const Job& job, const void* source, int64_t chunk_begin, int64_t domain, uint64_t seed,
                              uint64_t seed2, const PassScalars& p) {
  alignas(64) float z1[kChunk];
  alignas(64) float z2[kChunk];
  BlockWords words;
  const int64_t lo = std::max(chunk_begin, job.base), last = std::min(chunk_begin + (kChunk - 1), job.last);
  fill_z(domain, seed, chunk_begin, lo, last, z1, words);
  if (kSecond) fill_z(domain, seed2, chunk_begin, lo, last, z2, words);
  const auto* __restrict src = static_cast<const typename Format::Storage*>(source) + (lo - job.base);
  auto* __restrict out = static_cast<typename Format::Storage*>(job.data) + (lo - job.base);
  const int64_t off = lo - chunk_begin, n = last - lo + 1;
  for (int64_t j = 0; j < n; ++j) {
    const float x = perturbed_element(Format::to_float(src[j]), z1[off + j], kSecond ? z2[off + j] : 0.0f, p, kSecond);
    out[j] = Format::round_nearest(x);
  }
}

void zo_copy_pass_cpu(at::TensorList out, at::TensorList sources, at::IntArrayRef bases, int64_t seed, double alpha,
                      int64_t domain, int64_t seed2, double alpha2, bool second) {
  TORCH_CHECK(out.size() == sources.size() && out.size() == bases.size(), "zo_copy_pass_: out, sources and bases "
              "differ in length");
  TORCH_CHECK(domain == kDomainGaussian || domain == kDomainRademacher, "zo_copy_pass_: domain must be 0 or 1");
  TORCH_CHECK(seed >= 0 && seed2 >= 0, "zo_copy_pass_: seeds must be in [0, 2^63)");
  for (size_t k = 0; k < out.size(); ++k) {
    TORCH_CHECK(out[k].device().is_cpu() && sources[k].device().is_cpu() && out[k].is_contiguous() &&
                    sources[k].is_contiguous() && out[k].scalar_type() == out[0].scalar_type() &&
                    sources[k].scalar_type() == out[k].scalar_type() && sources[k].numel() == out[k].numel(),
                "zo_copy_pass_: out[", k, "] and sources[", k, "] must be contiguous CPU tensors of one dtype and size");
  }
  int64_t n_tasks = 0;
  const std::vector<Job> jobs = chunk_jobs(out, bases, &n_tasks);
  if (jobs.empty()) return;
  if (domain == kDomainGaussian) gaussian_tables();
  const PassScalars p{static_cast<float>(alpha), 0.0f, 0.0f, 0.0f, static_cast<float>(alpha2)};
  std::vector<const void*> src(sources.size());
  for (size_t k = 0; k < sources.size(); ++k) src[k] = sources[k].const_data_ptr();
  with_format(out[0].scalar_type(), "zo_copy_pass_", [&](auto format) {
    using Format = decltype(format);
    with_flag(second, [&](auto s2) {
      parallel_chunks(jobs, n_tasks, [&](const Job& job, int64_t chunk_begin, int64_t) {
        copy_chunk<Format, decltype(s2)::value>(job, src[job.index], chunk_begin, domain, static_cast<uint64_t>(seed),
                                                static_cast<uint64_t>(seed2), p);
      });
    });
  });
}

}  // namespace
}  // namespace zokern

TORCH_LIBRARY_FRAGMENT(zokern, m) {
  m.def(
      "zo_copy_pass_(Tensor(a!)[] out, Tensor[] sources, int[] bases, int seed, float alpha, int domain, int seed2, "
      "float alpha2, bool second) -> ()");
}

TORCH_LIBRARY_IMPL(zokern, CPU, m) { m.impl("zo_copy_pass_", &zokern::zo_copy_pass_cpu); }
