// ZOPrO's direction passes on the CPU (their math: zokern/_zopro_reference.py):
//
//   zokern::zopro_reduce(Tensor[] tensors, Tensor?[] vhats, int[] bases, int seed) -> Tensor
//       per tensor, (vhat . n, n . n) in float64 over the Gaussian stream n of `seed`, as an [n_tensors, 2] tensor
//   zokern::zopro_apply_(Tensor(a!)[] tensors, Tensor?[] mus, Tensor?[] vhats, int[] bases, int seed, Tensor coef)
//       x += coef[p, 0] mu + coef[p, 1] vhat + coef[p, 2] n for every tensor p
//
// The direction z = c_mu mu + c_n (n - a vhat) is never materialised: the stream is generated per chunk and combined
// with mu and vhat as they are read. Reductions are summed per chunk and the chunks added in order (deterministic).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <vector>

#include <zokern/stream.h>

#include "chunk_stream.h"

namespace zokern {
namespace {

using namespace cpu;

const float* optional_floats(const c10::List<std::optional<at::Tensor>>& list, size_t k, const at::Tensor& like,
                             const char* what) {
  const std::optional<at::Tensor> t = list.get(k);
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() &&
                  t->numel() == like.numel(),
              "zopro: ", what, "[", k, "] must be a contiguous float32 CPU tensor of ", like.numel(), " elements");
  return t->const_data_ptr<float>();
}

void check_tensors(at::TensorList tensors, at::IntArrayRef bases, size_t n_mu, size_t n_vhat, int64_t seed) {
  TORCH_CHECK(tensors.size() == bases.size() && tensors.size() == n_vhat && (n_mu == 0 || n_mu == tensors.size()),
              "zopro: tensors, companions and bases differ in length");
  TORCH_CHECK(seed >= 0, "zopro: seed must be in [0, 2^63), got ", seed);
  for (size_t k = 0; k < tensors.size(); ++k) {
    TORCH_CHECK(tensors[k].device().is_cpu() && tensors[k].is_contiguous(), "zopro: tensors[", k,
                "] must be a contiguous CPU tensor");
  }
}

at::Tensor zopro_reduce_cpu(at::TensorList tensors, const c10::List<std::optional<at::Tensor>>& vhats,
                            at::IntArrayRef bases, int64_t seed) {
  check_tensors(tensors, bases, 0, vhats.size(), seed);
  std::vector<const float*> vhat(tensors.size());
  for (size_t k = 0; k < tensors.size(); ++k) vhat[k] = optional_floats(vhats, k, tensors[k], "vhats");
  at::Tensor out = at::zeros({static_cast<int64_t>(tensors.size()), 2}, at::TensorOptions().dtype(at::kDouble));
  int64_t n_tasks = 0;
  const std::vector<Job> jobs = chunk_jobs(tensors, bases, &n_tasks);
  if (jobs.empty()) return out;
  gaussian_tables();
  std::vector<double> partial(static_cast<size_t>(2 * n_tasks), 0.0);
  parallel_chunks(jobs, n_tasks, [&](const Job& job, int64_t chunk_begin, int64_t task) {
    alignas(64) float z[kChunk];
    BlockWords words;
    const int64_t lo = std::max(chunk_begin, job.base), last = std::min(chunk_begin + (kChunk - 1), job.last);
    fill_gaussian(static_cast<uint64_t>(seed), chunk_begin, lo, last, z, words);
    const float* v = vhat[job.index] == nullptr ? nullptr : vhat[job.index] + (lo - job.base);
    const int64_t off = lo - chunk_begin;
    double dot = 0.0, nn = 0.0;
    for (int64_t j = 0; j <= last - lo; ++j) {
      const double n = z[off + j];
      nn += n * n;
      if (v != nullptr) dot += static_cast<double>(v[j]) * n;
    }
    partial[static_cast<size_t>(2 * task)] = dot;
    partial[static_cast<size_t>(2 * task + 1)] = nn;
  });
  double* o = out.data_ptr<double>();
  for (const Job& job : jobs) {
    const int64_t n_job_tasks = job.last / kChunk - job.first_chunk + 1;
    for (int64_t t = job.task_begin; t < job.task_begin + n_job_tasks; ++t) {
      o[2 * job.index] += partial[static_cast<size_t>(2 * t)];
      o[2 * job.index + 1] += partial[static_cast<size_t>(2 * t + 1)];
    }
  }
  return out;
}

template <class Format>
void apply_chunk(const Job& job, int64_t chunk_begin, uint64_t seed, const float* mu, const float* vhat,
                 const float* c) {
  alignas(64) float z[kChunk];
  BlockWords words;
  const int64_t lo = std::max(chunk_begin, job.base), last = std::min(chunk_begin + (kChunk - 1), job.last);
  fill_gaussian(seed, chunk_begin, lo, last, z, words);
  const int64_t shift = lo - job.base, off = lo - chunk_begin, n = last - lo + 1;
  auto* __restrict data = static_cast<typename Format::Storage*>(job.data) + shift;
  for (int64_t j = 0; j < n; ++j) {
    float x = add_rn(Format::to_float(data[j]), mul_rn(c[2], z[off + j]));
    if (mu != nullptr) x = add_rn(x, mul_rn(c[0], mu[shift + j]));
    if (vhat != nullptr) x = add_rn(x, mul_rn(c[1], vhat[shift + j]));
    data[j] = Format::round_nearest(x);
  }
}

void zopro_apply_cpu(at::TensorList tensors, const c10::List<std::optional<at::Tensor>>& mus,
                     const c10::List<std::optional<at::Tensor>>& vhats, at::IntArrayRef bases, int64_t seed,
                     const at::Tensor& coef) {
  check_tensors(tensors, bases, mus.size(), vhats.size(), seed);
  TORCH_CHECK(coef.device().is_cpu() && coef.scalar_type() == at::kFloat && coef.is_contiguous() &&
                  coef.numel() == 3 * static_cast<int64_t>(tensors.size()),
              "zopro_apply_: coef must be a contiguous float32 CPU tensor of shape [n_tensors, 3]");
  std::vector<const float*> mu(tensors.size()), vhat(tensors.size());
  for (size_t k = 0; k < tensors.size(); ++k) {
    TORCH_CHECK(tensors[k].scalar_type() == tensors[0].scalar_type(), "zopro_apply_: tensors of one dtype");
    mu[k] = optional_floats(mus, k, tensors[k], "mus");
    vhat[k] = optional_floats(vhats, k, tensors[k], "vhats");
  }
  int64_t n_tasks = 0;
  const std::vector<Job> jobs = chunk_jobs(tensors, bases, &n_tasks);
  if (jobs.empty()) return;
  gaussian_tables();
  const float* c = coef.const_data_ptr<float>();
  auto run = [&](auto format) {
    using Format = decltype(format);
    parallel_chunks(jobs, n_tasks, [&](const Job& job, int64_t chunk_begin, int64_t) {
      apply_chunk<Format>(job, chunk_begin, static_cast<uint64_t>(seed), mu[job.index], vhat[job.index],
                          c + 3 * job.index);
    });
  };
  with_format(tensors[0].scalar_type(), "zopro_apply_", run);
}

}  // namespace
}  // namespace zokern

TORCH_LIBRARY_FRAGMENT(zokern, m) {
  m.def("zopro_reduce(Tensor[] tensors, Tensor?[] vhats, int[] bases, int seed) -> Tensor");
  m.def("zopro_apply_(Tensor(a!)[] tensors, Tensor?[] mus, Tensor?[] vhats, int[] bases, int seed, Tensor coef) -> ()");
}

TORCH_LIBRARY_IMPL(zokern, CPU, m) {
  m.impl("zopro_reduce", &zokern::zopro_reduce_cpu);
  m.impl("zopro_apply_", &zokern::zopro_apply_cpu);
}
