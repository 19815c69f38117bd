// zokern's core torch ops: their schemas (for every backend), their CPU kernels, and the Python module zokern._C that
// registers them on import (the other files add their ops with TORCH_LIBRARY_FRAGMENT).
//
//   zokern::zo_pass_      the fused pass of docs/stream.md, section 5, over a list of tensors of one device and dtype
//   zokern::philox_words_ fills an int64 [n, 4] tensor with the words of Philox blocks first_block .. first_block+n-1
//
// The CPU kernel walks the global index space in chunks aligned to kChunk. Per chunk it generates z (and the second
// seed's z and the rounding integers) into small buffers with structure-of-arrays Philox batches, then runs one
// branch-free, vectorisable loop over the chunk's elements. at::parallel_for spreads the chunks of all tensors.
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include <zokern/stream.h>

#include "chunk_stream.h"
#include "rademacher_avx2.h"
#include "rademacher_avx512.h"

namespace zokern {

// Argument checks shared with the CUDA binding (csrc/cuda/bindings.cpp declares them).
void check_pass_inputs(at::TensorList tensors, at::IntArrayRef bases, int64_t seed, int64_t domain, int64_t seed2,
                       int64_t rounding_seed, const std::optional<at::Tensor>& grad_tensor, bool update,
                       c10::DeviceType device_type) {
  TORCH_CHECK(tensors.size() == bases.size(), "zo_pass_: got ", tensors.size(), " tensors but ", bases.size(),
              " bases");
  TORCH_CHECK(domain == kDomainGaussian || domain == kDomainRademacher,
              "zo_pass_: domain must be 0 (gaussian) or 1 (rademacher), got ", domain);
  TORCH_CHECK(seed >= 0 && seed2 >= 0 && rounding_seed >= 0, "zo_pass_: seed, seed2 and rounding_seed must be in "
              "[0, 2^63), got ", seed, ", ", seed2, ", ", rounding_seed);
  for (size_t k = 0; k < tensors.size(); ++k) {
    const at::Tensor& t = tensors[k];
    TORCH_CHECK(t.device().type() == device_type && t.device() == tensors[0].device(), "zo_pass_: tensors[", k,
                "] is on ", t.device(), ", expected ", tensors[0].device(), " (a ", device_type, " device)");
    TORCH_CHECK(t.scalar_type() == tensors[0].scalar_type(), "zo_pass_: tensors[", k, "] has dtype ",
                t.scalar_type(), " but tensors[0] has ", tensors[0].scalar_type());
    TORCH_CHECK(t.is_contiguous(), "zo_pass_: tensors[", k, "] is not contiguous");
    TORCH_CHECK(bases[k] >= 0 && (t.numel() == 0 || t.numel() - 1 <= std::numeric_limits<int64_t>::max() - bases[k]),
                "zo_pass_: bases[", k, "] = ", bases[k], " with numel ", t.numel(), " leaves the index range [0, 2^63)");
  }
  if (!tensors.empty()) {
    const at::ScalarType dtype = tensors[0].scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                "zo_pass_: tensors must be float32, bfloat16 or float16, got ", dtype);
  }
  if (update && grad_tensor.has_value()) {
    const at::Tensor& g = *grad_tensor;
    TORCH_CHECK(g.scalar_type() == at::kFloat && g.numel() == 1, "zo_pass_: grad_tensor must be a one-element "
                "float32 tensor, got ", g.scalar_type(), " with ", g.numel(), " elements");
    TORCH_CHECK(tensors.empty() || g.device() == tensors[0].device(), "zo_pass_: grad_tensor is on ", g.device(),
                " but the tensors are on ", tensors[0].device());
  }
}

void check_philox_inputs(const at::Tensor& out, int64_t seed, int64_t domain, int64_t first_block) {
  TORCH_CHECK(out.scalar_type() == at::kLong && out.dim() == 2 && out.size(1) == 4 && out.is_contiguous(),
              "philox_words_: out must be a contiguous int64 tensor of shape [n, 4], got ", out.scalar_type(), " ",
              out.sizes());
  TORCH_CHECK(seed >= 0, "philox_words_: seed must be in [0, 2^63), got ", seed);
  TORCH_CHECK(domain >= 0 && domain <= 0xFFFFFFFFll, "philox_words_: domain must be in [0, 2^32), got ", domain);
  TORCH_CHECK(first_block >= 0 && out.size(0) <= std::numeric_limits<int64_t>::max() - first_block,
              "philox_words_: first_block must be >= 0 and first_block + n < 2^63, got ", first_block);
}

namespace {

using namespace cpu;

struct PassConfig {
  int64_t domain;
  uint64_t seed, seed2, rounding_seed;
  PassScalars scalars;
};

// docs/stream.md, section 5's pass on one element, rounded and stored. kStochastic: e is kept and x + e rounded,
// *fine as round_stochastic_exact sets it (else untouched).
template <class Format, bool kUpdate, bool kSecond, bool kStochastic>
ZK_INLINE void pass_element_into(typename Format::Storage& d, float z1, float z2, uint32_t s, float* fine,
                                 const PassScalars& p) {
  float x = Format::to_float(d), e = 0.0f;
  add_term<kStochastic>(x, e, mul_rn(p.alpha, z1));
  if (kUpdate) {
    // No weight_decay * x when weight_decay is 0: 0 * inf would turn an infinite weight into NaN. (The + 0 in its
    // place can only turn a -0 u into +0: a zero term either way.)
    const float decay = bits_float(select_bits(p.weight_decay != 0.0f, float_bits(mul_rn(p.weight_decay, x)), 0u));
    add_term<kStochastic>(x, e, -mul_rn(p.lr, add_rn(mul_rn(p.grad, z1), decay)));
  }
  if (kSecond) add_term<kStochastic>(x, e, mul_rn(p.alpha2, z2));
  if constexpr (kStochastic) {
    d = round_stochastic_exact<Format>(x, e, s, fine);
  } else {
    d = Format::round_nearest(x);
  }
}

template <class Format, bool kUpdate, bool kSecond, bool kStochastic>
ZK_CPU_CLONES void process_chunk_gaussian(const Job& job, int64_t chunk_begin, const PassConfig& cfg) {
  alignas(64) float z1[kChunk];
  alignas(64) float z2[kChunk];
  alignas(64) uint16_t s[kChunk];
  alignas(64) float fine[kChunk];
  BlockWords words;
  const int64_t lo = std::max(chunk_begin, job.base);
  const int64_t last = std::min(chunk_begin + (kChunk - 1), job.last);
  fill_gaussian(cfg.seed, chunk_begin, lo, last, z1, words);
  if (kSecond) fill_gaussian(cfg.seed2, chunk_begin, lo, last, z2, words);
  if (kStochastic) fill_rounding(cfg.rounding_seed, chunk_begin, lo, last, s, words);

  auto* __restrict data = static_cast<typename Format::Storage*>(job.data) + (lo - job.base);
  const int64_t off = lo - chunk_begin, n = last - lo + 1;
  const PassScalars p = cfg.scalars;
  for (int64_t j = 0; j < n; ++j) {
    pass_element_into<Format, kUpdate, kSecond, kStochastic>(data[j], z1[off + j], kSecond ? z2[off + j] : 0.0f,
                                                             kStochastic ? s[off + j] : 0u, fine + off + j, p);
  }
  if constexpr (kStochastic) resolve_ties(cfg.rounding_seed, lo, n, fine + off, data);
}

template <class Format, bool kUpdate, bool kSecond, bool kStochastic>
ZK_INLINE void rademacher_element(typename Format::Storage& d, uint32_t bit1, uint32_t bit2, uint16_t s,
                                  float* fine, const PassScalars& p) {
  pass_element_into<Format, kUpdate, kSecond, kStochastic>(d, sign_float(bit1), kSecond ? sign_float(bit2) : 0.0f,
                                                           s, fine, p);
}

// Whole words of a 16-bit perturb pass (no update, second seed or stochastic rounding) with AVX-512 or AVX2 where
// the CPU has them (rademacher_avx512.h, rademacher_avx2.h); false: the caller's portable loop does them. alpha = 0
// takes the portable loop, whose zero term leaves every bit (x + 0 would turn -0 into +0).
template <class Format, bool kUpdate, bool kSecond, bool kStochastic>
bool perturb_words_simd(typename Format::Storage* data, int64_t base, int64_t first_word, int64_t end_word,
                        const BlockWords& words, int64_t first_block, const PassScalars& p) {
#ifdef ZK_X86_PATHS
  if constexpr (!kUpdate && !kSecond && !kStochastic) {
    if (p.alpha == 0.0f) return false;
    if constexpr (std::is_same_v<Format, BFloat16Format>) {
      if (avx512::has_bf16_path()) {
        avx512::perturb_words_bf16(data, base, first_word, end_word, words, first_block, p.alpha);
        return true;
      }
      if (avx2::has_path()) {
        avx2::perturb_words_bf16(data, base, first_word, end_word, words, first_block, p.alpha);
        return true;
      }
    } else if constexpr (std::is_same_v<Format, Float16Format>) {
      if (avx512::has_fp16_path()) {
        avx512::perturb_words_fp16(data, base, first_word, end_word, words, first_block, p.alpha);
        return true;
      }
      if (avx2::has_path()) {
        avx2::perturb_words_fp16(data, base, first_word, end_word, words, first_block, p.alpha);
        return true;
      }
    }
  }
#endif
  (void)data, (void)base, (void)first_word, (void)end_word, (void)words, (void)first_block, (void)p;
  return false;
}

// The Rademacher pass reads its signs straight from the Philox words: the 32 elements of a word share it, and the
// loop over them takes bit e for element e, so z never goes through a buffer as the Gaussian one does. Its 16-bit
// passes are bound by the core, not by memory: this, and prefetching two chunks ahead, took the bf16 perturb pass
// from 31 % to about 40 % of a copy's bandwidth on 2 cores, and the AVX-512 words to about 60 % in bf16 and fp16
// (benchmarks/RESULTS.md).
template <class Format, bool kUpdate, bool kSecond, bool kStochastic>
ZK_CPU_CLONES void process_chunk_rademacher(const Job& job, int64_t chunk_begin, const PassConfig& cfg) {
  alignas(64) uint16_t s[kChunk];
  alignas(64) float fine[kChunk];
  BlockWords words1, words2, scratch;
  const int64_t lo = std::max(chunk_begin, job.base);
  const int64_t last = std::min(chunk_begin + (kChunk - 1), job.last);
  const int64_t first_block = lo >> kRademacherLog2;
  const int64_t n_blocks = (last >> kRademacherLog2) - first_block + 1;
  philox_blocks(cfg.seed, kDomainRademacher, first_block, n_blocks, words1);
  if (kSecond) philox_blocks(cfg.seed2, kDomainRademacher, first_block, n_blocks, words2);
  if (kStochastic) fill_rounding(cfg.rounding_seed, chunk_begin, lo, last, s, scratch);

  auto* __restrict data = static_cast<typename Format::Storage*>(job.data);
  const PassScalars p = cfg.scalars;
  // The chunk after next: the hardware prefetcher lags behind. Distances, not indices, so that nothing overflows
  // when the tensor ends at the stream's last index, 2^63 - 1.
  constexpr int64_t kPerLine = 64 / sizeof(typename Format::Storage);
  const int64_t after_this = job.last - last;
  for (int64_t k = kChunk + 1; k <= std::min(after_this, 2 * kChunk); k += kPerLine) {
    __builtin_prefetch(&data[last - job.base + k], 1);
  }
  // Whole words [first_full, end_full); no overflow at the stream's last index.
  const int64_t first_full = (lo >> 5) + ((lo & 31) != 0), end_full = (last >> 5) + ((last & 31) == 31);
  const bool vectorised = first_full < end_full && perturb_words_simd<Format, kUpdate, kSecond, kStochastic>(
                                                       data, job.base, first_full, end_full, words1, first_block, p);
  for (int64_t word = lo >> 5; word <= (last >> 5); ++word) {  // 32 elements per word
    const int64_t b = (word >> 2) - first_block, q = word & 3, w0 = word << 5;
    const uint32_t w1 = words1.w[q][b], w2 = kSecond ? words2.w[q][b] : 0u;
    if (w0 >= lo && w0 + 31 <= last) {
      if (vectorised) continue;
      for (uint32_t e = 0; e < 32; ++e) {
        rademacher_element<Format, kUpdate, kSecond, kStochastic>(data[w0 + e - job.base], w1 >> e, w2 >> e,
                                                                  kStochastic ? s[w0 + e - chunk_begin] : 0,
                                                                  fine + (w0 + e - chunk_begin), p);
      }
    } else {  // a tensor's first or last, partial word
      const int64_t e_last = std::min<int64_t>(31, last - w0);  // counts within the word: no overflow at 2^63 - 1
      for (int64_t e = std::max<int64_t>(0, lo - w0); e <= e_last; ++e) {
        rademacher_element<Format, kUpdate, kSecond, kStochastic>(data[w0 + e - job.base], w1 >> e, w2 >> e,
                                                                  kStochastic ? s[w0 + e - chunk_begin] : 0,
                                                                  fine + (w0 + e - chunk_begin), p);
      }
    }
  }
  if constexpr (kStochastic) {
    resolve_ties(cfg.rounding_seed, lo, last - lo + 1, fine + (lo - chunk_begin), data + (lo - job.base));
  }
}

template <class Format, bool kUpdate, bool kSecond, bool kStochastic>
void run_pass(const std::vector<Job>& jobs, int64_t n_tasks, const PassConfig& cfg) {
  if (cfg.domain == kDomainGaussian) gaussian_tables();  // built on first use, before the threads need it
  parallel_chunks(jobs, n_tasks, [&](const Job& job, int64_t chunk_begin, int64_t) {
    if (cfg.domain == kDomainRademacher) {
      process_chunk_rademacher<Format, kUpdate, kSecond, kStochastic>(job, chunk_begin, cfg);
    } else {
      process_chunk_gaussian<Format, kUpdate, kSecond, kStochastic>(job, chunk_begin, cfg);
    }
  });
}

template <class Format>
void run_pass_for(const std::vector<Job>& jobs, int64_t n_tasks, const PassConfig& cfg, bool update, bool second,
                  bool stochastic) {
  with_flag(update, [&](auto u) {
    with_flag(second, [&](auto s2) {
      if constexpr (std::is_same_v<Format, Float32Format>) {
        run_pass<Format, decltype(u)::value, decltype(s2)::value, false>(jobs, n_tasks, cfg);
      } else {
        with_flag(stochastic, [&](auto sr) {
          run_pass<Format, decltype(u)::value, decltype(s2)::value, decltype(sr)::value>(jobs, n_tasks, cfg);
        });
      }
    });
  });
}

void zo_pass_cpu(at::TensorList tensors, at::IntArrayRef bases, int64_t seed, double alpha, int64_t domain,
                 double lr, double grad_value, const std::optional<at::Tensor>& grad_tensor, bool update,
                 double weight_decay, int64_t seed2, double alpha2, bool second, int64_t rounding_seed,
                 bool stochastic, const std::optional<at::Tensor>& scalars) {
  check_pass_inputs(tensors, bases, seed, domain, seed2, rounding_seed, grad_tensor, update, c10::DeviceType::CPU);
  TORCH_CHECK(!scalars.has_value(), "zo_pass_: only the CUDA kernels read their scalars from a tensor; on the CPU "
              "pass them as arguments (zokern.ops does)");
  int64_t n_tasks = 0;
  const std::vector<Job> jobs = chunk_jobs(tensors, bases, &n_tasks);
  if (jobs.empty()) return;

  float g = static_cast<float>(grad_value);
  if (update && grad_tensor.has_value()) g = *grad_tensor->const_data_ptr<float>();
  const PassConfig cfg{domain,
                       static_cast<uint64_t>(seed),
                       static_cast<uint64_t>(seed2),
                       static_cast<uint64_t>(rounding_seed),
                       {static_cast<float>(alpha), static_cast<float>(lr), g, static_cast<float>(weight_decay),
                        static_cast<float>(alpha2)}};
  // A non-finite g skips the update: the pass then only restores; lr = 0 leaves it out (section 5).
  const bool do_update = update && is_finite(g) && cfg.scalars.lr != 0.0f;
  switch (tensors[0].scalar_type()) {
    case at::kFloat:
      run_pass_for<Float32Format>(jobs, n_tasks, cfg, do_update, second, false);
      break;
    case at::kBFloat16:
      run_pass_for<BFloat16Format>(jobs, n_tasks, cfg, do_update, second, stochastic);
      break;
    default:  // at::kHalf, the only other dtype check_pass_inputs admits
      run_pass_for<Float16Format>(jobs, n_tasks, cfg, do_update, second, stochastic);
      break;
  }
}

void philox_words_cpu(const at::Tensor& out, int64_t seed, int64_t domain, int64_t first_block) {
  check_philox_inputs(out, seed, domain, first_block);
  TORCH_CHECK(out.device().is_cpu(), "philox_words_: out is on ", out.device(), ", expected cpu");
  int64_t* words = out.mutable_data_ptr<int64_t>();
  // Through the passes' batch generator (at any first block: its counter carries are tested here).
#ifdef ZK_X86_PATHS
  (void)cpu_paths_cap();  // a bad ZOKERN_CPU_PATHS raises here, not in a worker thread
#endif
  at::parallel_for(0, out.size(0), 4096, [&](int64_t begin, int64_t end) {
    BlockWords batch;
    for (int64_t b = begin; b < end; b += kMaxBlocks) {
      const int64_t count = std::min<int64_t>(kMaxBlocks, end - b);
      philox_blocks(static_cast<uint64_t>(seed), static_cast<uint32_t>(domain),
                    static_cast<uint64_t>(first_block + b), count, batch);
      for (int64_t k = 0; k < count; ++k) {
        for (int q = 0; q < 4; ++q) words[4 * (b + k) + q] = batch.w[q][k];
      }
    }
  });
}

}  // namespace
}  // namespace zokern

TORCH_LIBRARY(zokern, m) {
  // Fake (meta) implementations, for torch.compile and opcheck, are registered in Python.
  m.set_python_module("zokern._native");
  m.def(
      "zo_pass_(Tensor(a!)[] tensors, int[] bases, int seed, float alpha, int domain, float lr, float grad_value, "
      "Tensor? grad_tensor, bool update, float weight_decay, int seed2, float alpha2, bool second, "
      "int rounding_seed, bool stochastic, Tensor? scalars=None) -> ()");
  m.def("philox_words_(Tensor(a!) out, int seed, int domain, int first_block) -> ()");
}

TORCH_LIBRARY_IMPL(zokern, CPU, m) {
  m.impl("zo_pass_", &zokern::zo_pass_cpu);
  m.impl("philox_words_", &zokern::philox_words_cpu);
}

// `import zokern._C` loads this library, whose static initialisers above register the ops; the module is empty.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
