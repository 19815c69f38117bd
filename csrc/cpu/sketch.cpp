// zokern::count_sketch(Tensor[] tensors, int[] keys, int k) -> Tensor: the count-sketch of zokern/preference/sketch.py
// in one pass over the tensors (CPU). Element j of tensor t goes to bucket (w & 0x7FFFFFFF) mod k with sign
// 1 - 2 (w >> 31), w the word j mod 4 of Philox4x32-10 keyed by keys[t] with counter (j / 4, domain 3): the map is
// generated as the data streams by, never stored. Float64 histograms are accumulated per slab of chunks and added in
// slab order, so the result does not depend on the thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include <zokern/stream.h>

#include "chunk_stream.h"

namespace zokern {
namespace {

constexpr uint32_t kDomainSketch = 3;
constexpr int64_t kMaxSlabs = 64;

struct Unit {
  int64_t tensor, start, count;  // a chunk of one tensor: elements [start, start + count)
};

template <class Format>
void sketch_unit(const at::Tensor& t, const Unit& u, uint64_t key, int64_t k, double* hist) {
  const auto* data = static_cast<const typename Format::Storage*>(t.const_data_ptr());
  for (int64_t j = u.start; j < u.start + u.count;) {
    const Philox4 words = philox_block(key, static_cast<uint64_t>(j >> 2), kDomainSketch);
    for (int64_t q = j & 3; q < 4 && j < u.start + u.count; ++q, ++j) {
      const uint32_t w = words.x[q];
      const double x = static_cast<double>(Format::to_float(data[j]));
      hist[(w & 0x7FFFFFFFu) % static_cast<uint32_t>(k)] += (w >> 31) ? -x : x;
    }
  }
}

at::Tensor count_sketch_cpu(at::TensorList tensors, at::IntArrayRef keys, int64_t k) {
  TORCH_CHECK(tensors.size() == keys.size(), "count_sketch: ", tensors.size(), " tensors but ", keys.size(), " keys");
  TORCH_CHECK(k >= 1 && k <= 0x7FFFFFFF, "count_sketch: k must be in [1, 2^31), got ", k);
  std::vector<Unit> units;
  for (size_t t = 0; t < tensors.size(); ++t) {
    const at::Tensor& x = tensors[t];
    TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "count_sketch: tensors[", t, "] must be a contiguous CPU "
                "tensor");
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
                "count_sketch: tensors[", t, "] must be float32, bfloat16 or float16, got ", x.scalar_type());
    TORCH_CHECK(keys[t] >= 0, "count_sketch: keys must be in [0, 2^63), got ", keys[t]);
    for (int64_t start = 0; start < x.numel(); start += cpu::kChunk) {
      units.push_back({static_cast<int64_t>(t), start, std::min(cpu::kChunk, x.numel() - start)});
    }
  }
  at::Tensor out = at::zeros({k}, at::TensorOptions().dtype(at::kDouble));
  if (units.empty()) return out;
  const int64_t n_units = static_cast<int64_t>(units.size()), n_slabs = std::min(n_units, kMaxSlabs);
  std::vector<double> hist(static_cast<size_t>(n_slabs * k), 0.0);
  at::parallel_for(0, n_slabs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      double* h = hist.data() + s * k;
      for (int64_t i = s * n_units / n_slabs; i < (s + 1) * n_units / n_slabs; ++i) {
        const Unit& u = units[static_cast<size_t>(i)];
        const at::Tensor& x = tensors[static_cast<size_t>(u.tensor)];
        const uint64_t key = static_cast<uint64_t>(keys[static_cast<size_t>(u.tensor)]);
        cpu::with_format(x.scalar_type(), "count_sketch",
                         [&](auto format) { sketch_unit<decltype(format)>(x, u, key, k, h); });
      }
    }
  });
  double* o = out.data_ptr<double>();
  for (int64_t s = 0; s < n_slabs; ++s) {
    for (int64_t b = 0; b < k; ++b) o[b] += hist[static_cast<size_t>(s * k + b)];
  }
  return out;
}

}  // namespace
}  // namespace zokern

TORCH_LIBRARY_FRAGMENT(zokern, m) { m.def("count_sketch(Tensor[] tensors, int[] keys, int k) -> Tensor"); }

TORCH_LIBRARY_IMPL(zokern, CPU, m) { m.impl("count_sketch", &zokern::count_sketch_cpu); }
