// CUDA kernels of zokern's fused pass (docs/stream.md, section 5) and of raw Philox words.
//
// Work decomposition. The global index space is cut into tiles of kTileElems consecutive indices aligned to
// kTileElems; a CUDA block processes one tile per iteration of a grid-stride loop, each thread one octet (8
// consecutive indices aligned to 8, the elements of one Gaussian Philox call). One launch covers up to kMaxTensors
// tensors of one format: it enumerates the tiles that intersect each tensor, and a block finds its tile's tensor in
// the cumulative tile counts, which live in the kernel parameters (uniform per block, served by the constant
// cache). A warp's 32 octets are 256 contiguous elements, read and written with 16-byte accesses whenever the
// octet's addresses are 16-byte aligned (the tensor's base index and pointers permit it); octets cut by a tensor's
// ends, or misaligned, use element accesses. Each tensor is read from its source and written to its data, the same
// memory for an in-place pass: the out-of-place pass (the exact mode's theta + alpha z, plain sums rounded to nearest)
// is the same kernel.
//
// Cost per octet: one Philox call and four Box-Muller pairs for Gaussian z; one Philox call for Rademacher z (the
// 16 threads of a 128-element group recompute the same call, which costs the warp no more than one call, as for
// Gaussian z, without the transform); one more call for the second seed's z, and one for the stochastic-rounding
// integers (and one for the second ones, in the octets that need them: one in 8192).
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <type_traits>

#include <zokern/stream.h>

#include "zo_pass.h"

namespace zokern {
namespace gpu {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kTileElems = 8 * kThreads;  // 2048: a multiple of 128, so tiles hold whole Rademacher groups
// Metadata passed by value: 5 arrays of 8 bytes per tensor, 3.75 KiB for 96, under the 4 KiB kernel-parameter limit.
constexpr int kMaxTensors = 96;
constexpr int kMaxDevices = 64;

struct TileMap {
  int64_t tile_end[kMaxTensors];  // tensor k owns the launch's tiles [tile_end[k-1], tile_end[k])
  int64_t base[kMaxTensors];
  int64_t numel[kMaxTensors];
  void* data[kMaxTensors];
  const void* source[kMaxTensors];  // data itself for an in-place pass
  int count;
};

__device__ __forceinline__ int find_tensor(const TileMap& map, int64_t tile) {
  int lo = 0, hi = map.count - 1;  // the first k with tile_end[k] > tile
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (map.tile_end[mid] > tile) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

// ------------------------------------------------------------------------------------------- octet accesses

__device__ __forceinline__ void load_octet(const uint16_t* p, uint16_t v[8]) {
  const uint4 q = *reinterpret_cast<const uint4*>(p);
  const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[2 * i] = static_cast<uint16_t>(w[i]);
    v[2 * i + 1] = static_cast<uint16_t>(w[i] >> 16);
  }
}

__device__ __forceinline__ void store_octet(uint16_t* p, const uint16_t v[8]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) w[i] = static_cast<uint32_t>(v[2 * i]) | (static_cast<uint32_t>(v[2 * i + 1]) << 16);
  *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ void load_octet(const float* p, float v[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0];
  const float4 b = reinterpret_cast<const float4*>(p)[1];
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
  v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}

__device__ __forceinline__ void store_octet(float* p, const float v[8]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}

// ---------------------------------------------------------------------------------------------- the kernels

// The config with its seeds and coefficients read from the device row (zokern._scalars' layout).
__device__ __forceinline__ PassConfig from_row(PassConfig c) {
  const int64_t* row = c.scalars;
  c.seed = static_cast<uint64_t>(row[0]);
  c.seed2 = static_cast<uint64_t>(row[1]);
  c.rounding_seed = static_cast<uint64_t>(row[2]);
  c.alpha = bits_float(static_cast<uint32_t>(row[3]));
  c.alpha2 = bits_float(static_cast<uint32_t>(row[4]));
  c.lr = bits_float(static_cast<uint32_t>(row[5]));
  c.weight_decay = bits_float(static_cast<uint32_t>(row[6]));
  return c;
}

// ----------------------------------------------------------------------------------------------- the pass's math

constexpr uint32_t kDomainRoundingFine = 3;  // the second stochastic-rounding integers (docs/stream.md, section 2)

__device__ __forceinline__ float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// Section 5's add(x, e, w): x + w, and e plus that sum's exact rounding error (TwoSum). A zero term changes no bit
// (x = -0 stays -0), except out of place, whose plain sums turn -0 + +0 into +0 (e is then unused).
__device__ __forceinline__ void add_exact(float& x, float& e, float w, bool in_place = true) {
  if (w == 0.0f && in_place) return;
  const float s = add_rn(x, w);
  const float v = sub_rn(s, x);
  e = add_rn(e, add_rn(sub_rn(x, sub_rn(s, v)), sub_rn(w, v)));
  x = s;
}

// Section 5's pass: x and its exact residual e. update: the update is on, g finite and lr not 0 (never out of
// place). The update leaves weight_decay * x out when weight_decay is 0 (0 * inf would turn an infinite x into NaN).
__device__ __forceinline__ void pass_exact(float& x, float& e, float z1, float z2, const PassScalars& p, bool update,
                                           bool second, bool in_place) {
  e = 0.0f;
  add_exact(x, e, mul_rn(p.alpha, z1), in_place);
  if (update) {
    const float gz = mul_rn(p.grad, z1);
    add_exact(x, e, -mul_rn(p.lr, p.weight_decay != 0.0f ? add_rn(gz, mul_rn(p.weight_decay, x)) : gz));
  }
  if (second) add_exact(x, e, mul_rn(p.alpha2, z2), in_place);
}

// Stochastic rounding of x + e to a 16-bit format (section 5's steps 1-4, in its operations): returns the stored bits
// as decided by s alone, and sets *fine_threshold to f * 65536 where s = k (the element is then t' iff s2 < that),
// else to 0, which no s2 is below. Every step is a float32 operation, subnormals kept.
template <class Fmt>
__device__ __forceinline__ uint16_t round_exact_stochastic(float x, float e, uint32_t s, float* fine_threshold) {
  *fine_threshold = 0.0f;
  float r = 0.0f;
  if (is_finite(e)) add_exact(x, r, e);  // renormalised: |r| is at most half of x's float32 spacing
  const uint16_t nearest = Fmt::round_nearest(x);
  const uint32_t bits = float_bits(x), mag = bits & 0x7FFFFFFFu;
  if (mag == 0 || mag > Fmt::kMaxFiniteBits) return nearest;  // +-0, beyond the format's range, inf or NaN
  const float m = bits_float(mag);
  if (bits != mag) r = -r;  // the residual along the magnitude
  // t: the magnitude's bits rounded toward zero, one step lower where x is on the grid and x + e below it.
  uint32_t t = nearest & 0x7FFFu;
  float lo = Fmt::to_float(static_cast<uint16_t>(t));
  if (lo > m || (lo == m && r < 0.0f)) lo = Fmt::to_float(static_cast<uint16_t>(--t));
  const float span = sub_rn(Fmt::to_float(static_cast<uint16_t>(t + 1)), lo);  // a power of two: exact divisions
  const float d = mul_rn(div_rn(sub_rn(m, lo), span), 65536.0f);
  const float k0 = floorf(d);
  const float frac = add_rn(sub_rn(d, k0), mul_rn(div_rn(r, span), 65536.0f));
  const float whole = floorf(frac);
  const float k = add_rn(k0, whole);
  const float s_f = static_cast<float>(s);
  if (s_f == k) *fine_threshold = mul_rn(sub_rn(frac, whole), 65536.0f);
  return static_cast<uint16_t>(((bits >> 16) & 0x8000u) | (t + (s_f < k ? 1u : 0u)));
}

template <uint32_t kDomain>
__device__ __forceinline__ void z_octet(uint64_t seed, uint64_t octet, float z[8]) {
  if constexpr (kDomain == kDomainGaussian) {
    gaussian_octet(philox_block(seed, octet, kDomainGaussian), z);
  } else {
    rademacher_octet(philox_block(seed, octet >> (kRademacherLog2 - 3), kDomainRademacher), octet, z);
  }
}

template <class Fmt, uint32_t kDomain, bool kSecond, bool kStochastic>
__global__ void __launch_bounds__(kThreads)
    zo_pass_kernel(const __grid_constant__ TileMap map, const PassConfig config, int64_t n_tiles) {
  using Storage = typename Fmt::Storage;
  const PassConfig cfg = config.scalars != nullptr ? from_row(config) : config;
  const float g = cfg.grad_ptr != nullptr ? *cfg.grad_ptr : cfg.grad;
  const bool update = cfg.update && is_finite(g) && cfg.lr != 0.0f;
  const PassScalars p{cfg.alpha, cfg.lr, g, cfg.weight_decay, cfg.alpha2};

  // A block's tiles increase, so after one search its tensor index only walks forward: over the whole grid-stride
  // loop that costs at most one step per tensor, where a search per tile would cost log2(count) steps each.
  int k = find_tensor(map, blockIdx.x);  // the grid has at most n_tiles blocks
  for (int64_t tile = blockIdx.x; tile < n_tiles; tile += gridDim.x) {
    while (map.tile_end[k] <= tile) ++k;
    const int64_t base = map.base[k], numel = map.numel[k];
    const int64_t tile_in_tensor = tile - (k == 0 ? 0 : map.tile_end[k - 1]);
    const uint64_t octet = (static_cast<uint64_t>(base / kTileElems + tile_in_tensor)) * kThreads + threadIdx.x;
    // Local index of the octet's first element; unsigned arithmetic because base + numel may reach 2^63.
    const int64_t j0 = static_cast<int64_t>(octet * 8 - static_cast<uint64_t>(base));
    if (j0 <= -8 || j0 >= numel) continue;
    Storage* data = static_cast<Storage*>(map.data[k]);
    const Storage* source = static_cast<const Storage*>(map.source[k]);
    const bool in_place = source == data;  // out of place (the exact mode's copies): plain sums, update and rounding off
    const bool vector = j0 >= 0 && j0 + 8 <= numel &&
                        ((reinterpret_cast<uintptr_t>(data + j0) | reinterpret_cast<uintptr_t>(source + j0)) & 15) == 0;

    // Loads first: their latency overlaps the generator's arithmetic.
    Storage raw[8];
    if (vector) {
      load_octet(source + j0, raw);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int64_t j = j0 + e;
        raw[e] = j >= 0 && j < numel ? source[j] : Storage{};
      }
    }

    float z1[8], z2[8];
    uint32_t s[8];
    z_octet<kDomain>(cfg.seed, octet, z1);
    if constexpr (kSecond) z_octet<kDomain>(cfg.seed2, octet, z2);
    if constexpr (kStochastic) rounding_octet(philox_block(cfg.rounding_seed, octet, kDomainRounding), s);

    Storage out[8];
    float fine_threshold[8];
    bool fine = false;  // some element's s ties with its k: its s2 decides
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      float x = Fmt::to_float(raw[e]), err;
      pass_exact(x, err, z1[e], kSecond ? z2[e] : 0.0f, p, update, kSecond, in_place);
      if constexpr (kStochastic) {
        out[e] = round_exact_stochastic<Fmt>(x, err, s[e], &fine_threshold[e]);
        fine |= fine_threshold[e] > 0.0f;
      } else {
        out[e] = Fmt::round_nearest(x);
      }
    }
    if constexpr (kStochastic) {
      // s2 matters once in 65536 elements: only those octets make domain 3's Philox call, out of the loop above.
      if (fine) {
        uint32_t s2[8];
        rounding_octet(philox_block(cfg.rounding_seed, octet, kDomainRoundingFine), s2);
#pragma unroll
        for (int e = 0; e < 8; ++e) out[e] += static_cast<float>(s2[e]) < fine_threshold[e] ? 1 : 0;
      }
    }

    if (vector) {
      store_octet(data + j0, out);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int64_t j = j0 + e;
        if (j >= 0 && j < numel) data[j] = out[e];
      }
    }
  }
}

__global__ void philox_words_kernel(uint64_t seed, uint32_t domain, uint64_t first_block, int64_t n_blocks,
                                    int64_t* out) {
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < n_blocks;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const Philox4 r = philox_block(seed, first_block + static_cast<uint64_t>(b), domain);
#pragma unroll
    for (int q = 0; q < 4; ++q) out[4 * b + q] = r.x[q];
  }
}

// ----------------------------------------------------------------------------------------------- launchers

#ifndef ZOKERN_CUDA_EMULATION
// Every launch goes through here. The tests compile this file with g++ against a stand-in CUDA runtime
// (tests/cuda_emulation) whose launch_kernel runs each block's threads one after another on the host.
template <class... Params, class... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), int64_t grid, int threads, cudaStream_t stream,
                          const Args&... args) {
  kernel<<<static_cast<unsigned>(grid), threads, 0, stream>>>(args...);
  return cudaGetLastError();
}
#endif

int sm_count() {
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return std::max(sms, 1);
}

// A grid of one wave of resident blocks: enough to fill the GPU; the grid-stride loop covers the rest.
template <class Fmt, uint32_t kDomain, bool kSecond, bool kStochastic>
cudaError_t launch_tiles(const TileMap& map, int64_t n_tiles, const PassConfig& cfg, cudaStream_t stream) {
  constexpr auto kernel = zo_pass_kernel<Fmt, kDomain, kSecond, kStochastic>;
  static std::atomic<int> blocks_per_sm[kMaxDevices];
  int device = 0;
  cudaGetDevice(&device);
  int per_sm = device < kMaxDevices ? blocks_per_sm[device].load(std::memory_order_relaxed) : 0;
  if (per_sm == 0) {
    const cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0);
    if (err != cudaSuccess) return err;
    per_sm = std::max(per_sm, 1);
    if (device < kMaxDevices) blocks_per_sm[device].store(per_sm, std::memory_order_relaxed);
  }
  const int64_t grid = std::min<int64_t>(n_tiles, static_cast<int64_t>(sm_count()) * per_sm);
  return launch_kernel(kernel, grid, kThreads, stream, map, cfg, n_tiles);
}

template <class Fmt, uint32_t kDomain>
cudaError_t launch_for_domain(const TileMap& map, int64_t n_tiles, const PassConfig& cfg, cudaStream_t stream) {
  if constexpr (std::is_same<Fmt, Float32Format>::value) {  // float32 stores x as is: no stochastic rounding
    return cfg.second ? launch_tiles<Fmt, kDomain, true, false>(map, n_tiles, cfg, stream)
                      : launch_tiles<Fmt, kDomain, false, false>(map, n_tiles, cfg, stream);
  } else if (cfg.second) {
    return cfg.stochastic ? launch_tiles<Fmt, kDomain, true, true>(map, n_tiles, cfg, stream)
                          : launch_tiles<Fmt, kDomain, true, false>(map, n_tiles, cfg, stream);
  } else {
    return cfg.stochastic ? launch_tiles<Fmt, kDomain, false, true>(map, n_tiles, cfg, stream)
                          : launch_tiles<Fmt, kDomain, false, false>(map, n_tiles, cfg, stream);
  }
}

template <class Fmt>
cudaError_t launch_for_format(const TileMap& map, int64_t n_tiles, const PassConfig& cfg, cudaStream_t stream) {
  return cfg.domain == kDomainGaussian ? launch_for_domain<Fmt, kDomainGaussian>(map, n_tiles, cfg, stream)
                                       : launch_for_domain<Fmt, kDomainRademacher>(map, n_tiles, cfg, stream);
}

cudaError_t launch_map(const TileMap& map, int64_t n_tiles, Format format, const PassConfig& cfg,
                       cudaStream_t stream) {
  switch (format) {
    case Format::kFloat32:
      return launch_for_format<Float32Format>(map, n_tiles, cfg, stream);
    case Format::kBFloat16:
      return launch_for_format<BFloat16Format>(map, n_tiles, cfg, stream);
    case Format::kFloat16:
      return launch_for_format<Float16Format>(map, n_tiles, cfg, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_zo_pass(const TensorSpan* tensors, int64_t count, Format format, const PassConfig& config,
                           cudaStream_t stream) {
  TileMap map;
  map.count = 0;
  int64_t n_tiles = 0;
  for (int64_t k = 0; k < count; ++k) {
    const TensorSpan& t = tensors[k];
    if (t.numel == 0) continue;
    const int64_t last = t.base + (t.numel - 1);
    n_tiles += last / kTileElems - t.base / kTileElems + 1;
    map.tile_end[map.count] = n_tiles;
    map.base[map.count] = t.base;
    map.numel[map.count] = t.numel;
    map.data[map.count] = t.data;
    map.source[map.count] = t.source;
    if (++map.count == kMaxTensors) {
      const cudaError_t err = launch_map(map, n_tiles, format, config, stream);
      if (err != cudaSuccess) return err;
      map.count = 0;
      n_tiles = 0;
    }
  }
  return map.count == 0 ? cudaSuccess : launch_map(map, n_tiles, format, config, stream);
}

cudaError_t launch_philox_words(uint64_t seed, uint32_t domain, uint64_t first_block, int64_t n_blocks, int64_t* out,
                                cudaStream_t stream) {
  if (n_blocks == 0) return cudaSuccess;
  constexpr int kWordThreads = 256;
  const int64_t grid = std::min<int64_t>((n_blocks + kWordThreads - 1) / kWordThreads, int64_t{sm_count()} * 8);
  return launch_kernel(philox_words_kernel, grid, kWordThreads, stream, seed, domain, first_block, n_blocks, out);
}

}  // namespace gpu
}  // namespace zokern
