// The LDSD passes on the CPU (their math and coefficient layout: zokern/_ldsd_reference.py):
//
//   zokern::ldsd_pass_        mode 0: x += a0 mu + sum_s a_s xi_s; mode 2: the final pass (restore, the theta rule,
//                             the mu update); mode 3: mode 0 and the squared norm of a second row over the same
//                             streams (returned; 0 in the other modes), for a list of tensors of one dtype
//   zokern::ldsd_squared_norm sum of (a0 mu + sum_s a_s xi_s)^2 over a list of float32 tensors, in float64
//
// Per chunk, each seed's stream is generated into one buffer and folded into the running sums of the rows the mode
// needs; one loop over the chunk's elements then applies them. Norms are summed per chunk in float64 and the chunks'
// sums added in task order, so the result does not depend on the thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include <zokern/stream.h>

#include "chunk_stream.h"

namespace zokern {
namespace {

using namespace cpu;

constexpr int kMove = 0, kFinal = 2, kMoveNorm = 3;
constexpr int kSgd = 0, kMomentum = 1, kAdam = 2;

struct LdsdConfig {
  int64_t domain;
  std::vector<uint64_t> seeds;
  const float* coef;  // P, D, M rows of 1 + S values, then ok, c1, c2 (mode 2); one row (modes 0 and norm)
  float lr, weight_decay, momentum, beta1, beta2, adam_eps;
  float one_minus_beta1, one_minus_beta2;  // from beta's double value, rounded once (see _ldsd_reference.py)
  uint64_t rounding_seed;
  bool ok;
};

struct LdsdTensors {
  std::vector<float*> mu, state1, state2;
};

// Folds the streams of every seed into acc[r][j] = coef[r * row] mu_j + sum_s coef[r * row + 1 + s] xi_s,j for rows
// r < n_rows, over the chunk's elements [lo, last].
ZK_INLINE void accumulate(const LdsdConfig& cfg, int n_rows, const float* __restrict mu, int64_t chunk_begin,
                          int64_t lo, int64_t last, float (*acc)[kChunk]) {
  alignas(64) float z[kChunk];
  BlockWords words;
  const int64_t row = static_cast<int64_t>(cfg.seeds.size()) + 1, off = lo - chunk_begin, n = last - lo + 1;
  for (int r = 0; r < n_rows; ++r) {
    const float c = cfg.coef[r * row];
    for (int64_t j = 0; j < n; ++j) acc[r][j] = mul_rn(c, mu[j]);
  }
  for (size_t s = 0; s < cfg.seeds.size(); ++s) {
    fill_z(cfg.domain, cfg.seeds[s], chunk_begin, lo, last, z, words);
    for (int r = 0; r < n_rows; ++r) {
      const float c = cfg.coef[r * row + 1 + static_cast<int64_t>(s)];
      float* __restrict a = acc[r];
      for (int64_t j = 0; j < n; ++j) a[j] = add_rn(a[j], mul_rn(c, z[off + j]));
    }
  }
}

// Returns the chunk's squared norm of the second row in mode 3 (0 otherwise).
template <class Format, int kMode, int kRule, bool kStochastic>
ZK_CPU_CLONES double ldsd_chunk(const Job& job, int64_t chunk_begin, const LdsdConfig& cfg, const LdsdTensors& ts) {
  alignas(64) float acc[3][kChunk];
  alignas(64) uint16_t bits[kChunk];
  alignas(64) float fine[kChunk];
  const int64_t lo = std::max(chunk_begin, job.base);
  const int64_t last = std::min(chunk_begin + (kChunk - 1), job.last);
  const int64_t shift = lo - job.base, n = last - lo + 1;
  float* __restrict mu = ts.mu[job.index] + shift;
  accumulate(cfg, kMode == kFinal ? 3 : (kMode == kMoveNorm ? 2 : 1), mu, chunk_begin, lo, last, acc);
  if (kStochastic) {
    BlockWords words;
    fill_rounding(cfg.rounding_seed, chunk_begin, lo, last, bits, words);
  }
  auto* __restrict data = static_cast<typename Format::Storage*>(job.data) + shift;
  const int64_t off = lo - chunk_begin;
  for (int64_t j = 0; j < n; ++j) {
    // The final pass adds to x as the fused pass does (docs/stream.md, section 5's add(): theta0's e is kept for
    // stochastic rounding, and a zero term leaves x); the move passes are plain sums, as the reference's.
    float x = Format::to_float(data[j]), e = 0.0f;
    if (kMode == kFinal) {
      add_term<kStochastic>(x, e, acc[0][j]);
    } else {
      x = add_rn(x, acc[0][j]);
    }
    if (kMode == kFinal && cfg.ok) {
      const float d = acc[1][j];
      float step = d;
      if (kRule == kMomentum) {
        float& buf = ts.state1[job.index][shift + j];
        step = add_rn(mul_rn(cfg.momentum, buf), d);
        buf = step;
      } else if (kRule == kAdam) {
        float& m = ts.state1[job.index][shift + j];
        float& v = ts.state2[job.index][shift + j];
        m = add_rn(mul_rn(cfg.beta1, m), mul_rn(cfg.one_minus_beta1, d));
        v = add_rn(mul_rn(cfg.beta2, v), mul_rn(mul_rn(cfg.one_minus_beta2, d), d));
        const float c1 = cfg.coef[3 * (cfg.seeds.size() + 1) + 1], c2 = cfg.coef[3 * (cfg.seeds.size() + 1) + 2];
        step = (m / c1) / add_rn(std::sqrt(v / c2), cfg.adam_eps);
      }
      if (cfg.lr != 0.0f) {  // as the fused pass: no update at lr = 0, no weight_decay * x at weight_decay = 0
        const float decay =
            bits_float(select_bits(cfg.weight_decay != 0.0f, float_bits(mul_rn(cfg.weight_decay, x)), 0u));
        add_term<kStochastic>(x, e, -mul_rn(cfg.lr, add_rn(step, decay)));
      }
      mu[j] = acc[2][j];
    }
    if constexpr (kStochastic) {
      data[j] = round_stochastic_exact<Format>(x, e, bits[off + j], fine + off + j);
    } else {
      data[j] = Format::round_nearest(x);
    }
  }
  if constexpr (kStochastic) resolve_ties(cfg.rounding_seed, lo, n, fine + off, data);
  double sum = 0.0;
  if (kMode == kMoveNorm) {
    for (int64_t j = 0; j < n; ++j) sum += static_cast<double>(acc[1][j]) * acc[1][j];
  }
  return sum;
}

// Chunk norms are summed in task order: the result does not depend on the thread count.
template <class Format, int kMode, int kRule, bool kStochastic>
double run_ldsd(const std::vector<Job>& jobs, int64_t n_tasks, const LdsdConfig& cfg, const LdsdTensors& ts) {
  if (cfg.domain == kDomainGaussian) gaussian_tables();
  std::vector<double> partial(kMode == kMoveNorm ? static_cast<size_t>(n_tasks) : 0, 0.0);
  parallel_chunks(jobs, n_tasks, [&](const Job& job, int64_t chunk_begin, int64_t task) {
    const double sum = ldsd_chunk<Format, kMode, kRule, kStochastic>(job, chunk_begin, cfg, ts);
    if (kMode == kMoveNorm) partial[static_cast<size_t>(task)] = sum;
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

template <class Format, int kMode>
double run_ldsd_for(const std::vector<Job>& jobs, int64_t n_tasks, const LdsdConfig& cfg, const LdsdTensors& ts,
                    int64_t rule, bool stochastic) {
  double total = 0.0;
  auto with_rule = [&](auto sr) {
    constexpr bool kSr = decltype(sr)::value && !std::is_same_v<Format, Float32Format>;
    if (kMode != kFinal || rule == kSgd) {
      total = run_ldsd<Format, kMode, kSgd, kSr>(jobs, n_tasks, cfg, ts);
    } else if (rule == kMomentum) {
      total = run_ldsd<Format, kMode, kMomentum, kSr>(jobs, n_tasks, cfg, ts);
    } else {
      total = run_ldsd<Format, kMode, kAdam, kSr>(jobs, n_tasks, cfg, ts);
    }
  };
  with_flag(stochastic, with_rule);
  return total;
}

std::vector<float*> float_pointers(at::TensorList tensors, at::TensorList like, const char* what) {
  std::vector<float*> out;
  for (size_t k = 0; k < tensors.size(); ++k) {
    TORCH_CHECK(tensors[k].device().is_cpu() && tensors[k].scalar_type() == at::kFloat && tensors[k].is_contiguous() &&
                    tensors[k].numel() == like[k].numel(),
                "ldsd_pass_: ", what, "[", k, "] must be a contiguous float32 CPU tensor of ", like[k].numel(),
                " elements");
    out.push_back(tensors[k].data_ptr<float>());
  }
  return out;
}

LdsdConfig make_config(at::IntArrayRef seeds, const at::Tensor& coef, int64_t domain, int64_t rows) {
  TORCH_CHECK(domain == kDomainGaussian || domain == kDomainRademacher, "ldsd: domain must be 0 or 1, got ", domain);
  TORCH_CHECK(coef.device().is_cpu() && coef.scalar_type() == at::kFloat && coef.is_contiguous() &&
                  coef.numel() == rows,
              "ldsd: coef must be a contiguous float32 CPU tensor of ", rows, " values, got ", coef.numel());
  LdsdConfig cfg{};
  cfg.domain = domain;
  for (int64_t s : seeds) {
    TORCH_CHECK(s >= 0, "ldsd: seeds must be in [0, 2^63), got ", s);
    cfg.seeds.push_back(static_cast<uint64_t>(s));
  }
  cfg.coef = coef.data_ptr<float>();
  return cfg;
}

double ldsd_pass_cpu(at::TensorList params, at::TensorList mus, at::TensorList state1, at::TensorList state2,
                   at::IntArrayRef bases, at::IntArrayRef seeds, const at::Tensor& coef, int64_t mode, int64_t rule,
                   int64_t domain, double lr, double weight_decay, double momentum, double beta1, double beta2,
                   double adam_eps, int64_t rounding_seed, bool stochastic) {
  TORCH_CHECK(mode == kMove || mode == kFinal || mode == kMoveNorm,
              "ldsd_pass_: mode must be 0 (move), 2 (final) or 3 (move and norm), got ", mode);
  TORCH_CHECK(rule >= kSgd && rule <= kAdam, "ldsd_pass_: rule must be 0, 1 or 2, got ", rule);
  TORCH_CHECK(params.size() == mus.size() && params.size() == bases.size(), "ldsd_pass_: params, mus and bases "
              "differ in length");
  const int64_t row = static_cast<int64_t>(seeds.size()) + 1;
  LdsdConfig cfg = make_config(seeds, coef, domain, mode == kFinal ? 3 * row + 3 : (mode == kMoveNorm ? 2 * row : row));
  cfg.lr = static_cast<float>(lr);
  cfg.weight_decay = static_cast<float>(weight_decay);
  cfg.momentum = static_cast<float>(momentum);
  cfg.beta1 = static_cast<float>(beta1);
  cfg.beta2 = static_cast<float>(beta2);
  cfg.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  cfg.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  cfg.adam_eps = static_cast<float>(adam_eps);
  cfg.rounding_seed = static_cast<uint64_t>(rounding_seed);
  cfg.ok = mode != kFinal || cfg.coef[3 * row] != 0.0f;
  for (size_t k = 0; k < params.size(); ++k) {
    TORCH_CHECK(params[k].device().is_cpu() && params[k].is_contiguous() &&
                    params[k].scalar_type() == params[0].scalar_type(),
                "ldsd_pass_: params[", k, "] must be a contiguous CPU tensor of params[0]'s dtype");
  }
  LdsdTensors ts;
  ts.mu = float_pointers(mus, params, "mus");
  const int64_t n_states = mode == kFinal ? (rule == kAdam ? 2 : rule == kMomentum ? 1 : 0) : 0;
  TORCH_CHECK(n_states < 1 || state1.size() == params.size(), "ldsd_pass_: the rule needs state1 per tensor");
  TORCH_CHECK(n_states < 2 || state2.size() == params.size(), "ldsd_pass_: the rule needs state2 per tensor");
  if (n_states >= 1) ts.state1 = float_pointers(state1, params, "state1");
  if (n_states >= 2) ts.state2 = float_pointers(state2, params, "state2");
  int64_t n_tasks = 0;
  const std::vector<Job> jobs = chunk_jobs(params, bases, &n_tasks);
  if (jobs.empty()) return 0.0;
  double total = 0.0;
  auto run = [&](auto format) {
    using Format = decltype(format);
    if (mode == kMove) {
      total = run_ldsd_for<Format, kMove>(jobs, n_tasks, cfg, ts, rule, false);
    } else if (mode == kMoveNorm) {
      total = run_ldsd_for<Format, kMoveNorm>(jobs, n_tasks, cfg, ts, rule, false);
    } else {
      total = run_ldsd_for<Format, kFinal>(jobs, n_tasks, cfg, ts, rule, stochastic);
    }
  };
  with_format(params[0].scalar_type(), "ldsd_pass_", run);
  return total;
}

double ldsd_squared_norm_cpu(at::TensorList mus, at::IntArrayRef bases, at::IntArrayRef seeds, const at::Tensor& coef,
                             int64_t domain) {
  TORCH_CHECK(mus.size() == bases.size(), "ldsd_squared_norm: mus and bases differ in length");
  const LdsdConfig cfg = make_config(seeds, coef, domain, static_cast<int64_t>(seeds.size()) + 1);
  LdsdTensors ts;
  ts.mu = float_pointers(mus, mus, "mus");
  int64_t n_tasks = 0;
  const std::vector<Job> jobs = chunk_jobs(mus, bases, &n_tasks);
  if (jobs.empty()) return 0.0;
  if (cfg.domain == kDomainGaussian) gaussian_tables();
  std::vector<double> partial(static_cast<size_t>(n_tasks), 0.0);
  parallel_chunks(jobs, n_tasks, [&](const Job& job, int64_t chunk_begin, int64_t task) {
    alignas(64) float acc[1][kChunk];
    const int64_t lo = std::max(chunk_begin, job.base);
    const int64_t last = std::min(chunk_begin + (kChunk - 1), job.last);
    accumulate(cfg, 1, ts.mu[job.index] + (lo - job.base), chunk_begin, lo, last, acc);
    double sum = 0.0;
    for (int64_t j = 0; j <= last - lo; ++j) sum += static_cast<double>(acc[0][j]) * acc[0][j];
    partial[static_cast<size_t>(task)] = sum;
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

}  // namespace
}  // namespace zokern

TORCH_LIBRARY_FRAGMENT(zokern, m) {
  m.def(
      "ldsd_pass_(Tensor(a!)[] params, Tensor(b!)[] mus, Tensor(c!)[] state1, Tensor(d!)[] state2, int[] bases, "
      "int[] seeds, Tensor coef, int mode, int rule, int domain, float lr, float weight_decay, float momentum, "
      "float beta1, float beta2, float adam_eps, int rounding_seed, bool stochastic) -> float");
  m.def("ldsd_squared_norm(Tensor[] mus, int[] bases, int[] seeds, Tensor coef, int domain) -> float");
}

TORCH_LIBRARY_IMPL(zokern, CPU, m) {
  m.impl("ldsd_pass_", &zokern::ldsd_pass_cpu);
  m.impl("ldsd_squared_norm", &zokern::ldsd_squared_norm_cpu);
}
