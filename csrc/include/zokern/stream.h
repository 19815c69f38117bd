// The zokern perturbation stream (docs/stream.md, STREAM_VERSION 1) and the per-element math of the fused pass.
//
// Torch-free and header-only: the CPU backend (host C++) and the CUDA kernels (device code) both include this file,
// so the stream and the pass are defined once. Every function is exact integer or IEEE float32 arithmetic except
// the Gaussian transform's log/sqrt/sin/cos, which docs/stream.md, section 3, allows to be approximated within
// 2^-17 (1 + |z|).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define ZK_HD __host__ __device__ __forceinline__
#define ZK_UNROLL _Pragma("unroll")
#else
#define ZK_HD inline
#define ZK_UNROLL _Pragma("GCC unroll 16")
#endif

namespace zokern {

// ------------------------------------------------------------------------------------------------ Philox4x32-10

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

// Counter word 2: separates the streams drawn from one seed.
enum Domain : uint32_t { kDomainGaussian = 0, kDomainRademacher = 1, kDomainRounding = 2 };

// Elements fed by one Philox call: 8 Gaussian normals, 128 Rademacher signs, 8 rounding integers.
constexpr int kGaussianLog2 = 3;
constexpr int kRademacherLog2 = 7;
constexpr int kRoundingLog2 = 3;

struct Philox4 {
  uint32_t x[4];
};

ZK_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

ZK_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  ZK_UNROLL
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mulhi32(kPhiloxM0, c0), lo0 = kPhiloxM0 * c0;
    const uint32_t hi1 = mulhi32(kPhiloxM1, c2), lo1 = kPhiloxM1 * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxW0;  // the bump after the last round is never used
    k1 += kPhiloxW1;
  }
  return {{c0, c1, c2, c3}};
}

// The call every stream makes: key (seed lo, seed hi), counter (block lo, block hi, domain, 0).
ZK_HD Philox4 philox_block(uint64_t seed, uint64_t block, uint32_t domain) {
  return philox4x32_10(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), domain, 0u,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// ----------------------------------------------------------------------------------------- float32 primitives

ZK_HD uint32_t float_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

ZK_HD float bits_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// The pass is specified as separately rounded float32 operations; nvcc would otherwise contract x + a*z into an FMA
// and differ from the other backends by an ulp (which a 16-bit rounding can turn into a 16-bit ulp).
ZK_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

ZK_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

ZK_HD float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

ZK_HD bool is_finite(float x) { return (float_bits(x) & 0x7F800000u) != 0x7F800000u; }

// c ? a : b on bit patterns, as masks. A ternary whose arm is computed with float operations gets sunk into a
// branch, which gcc may not turn back into a select (float operations may trap): the loop would not vectorise.
// Where both arms are already computed integers, a plain ternary is cheaper (a compare and a blend).
ZK_HD uint32_t select_bits(bool c, uint32_t a, uint32_t b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return (a & m) | (b & ~m);
}

// ------------------------------------------------------------------------------------ Gaussian: 8 per call

ZK_HD float fma_rn(float a, float b, float c) {
#ifdef __CUDA_ARCH__
  return __fmaf_rn(a, b, c);
#else
  return std::fmaf(a, b, c);
#endif
}

#if defined(__CUDA_ARCH__) || defined(ZOKERN_CUDA_EMULATION)
// ln u for u in [2^-17, 1), accurate relative to ln u: logf's range reduction (u = 2^e m, m in [2/3, 4/3), f = m - 1
// exact) and ln(1 + f) = f + f^2 P(f), P a degree-6 minimax fit for this use. Over the 65536 possible u its relative
// error is below 2.6e-7 and r = sqrt(-2 ln u) is within 1.2e-7 of exact. It skips logf's zero, subnormal and
// infinity handling, none of which can occur here, which saves about a third of the pair's instructions. __logf is
// no option: MUFU.LG2's error is absolute (2^-21.4 on [0.5, 2]), a 5 % error in r near u = 1, where ln u ~ 7.6e-6.
// Device code only; the tests' host build of the CUDA kernels (ZOKERN_CUDA_EMULATION) checks it on every u.
ZK_HD float log_unit_interval(float u) {
  const int32_t bits = static_cast<int32_t>(float_bits(u));
  const int32_t e = (bits - 0x3F2AAAAB) & static_cast<int32_t>(0xFF800000u);
  const float f = bits_float(static_cast<uint32_t>(bits - e)) - 1.0f;
  float p = -0x1.38aa1p-3f;
  p = fma_rn(p, f, 0x1.5bf77cp-3f);
  p = fma_rn(p, f, -0x1.50b534p-3f);
  p = fma_rn(p, f, 0x1.95e048p-3f);
  p = fma_rn(p, f, -0x1.001094p-2f);
  p = fma_rn(p, f, 0x1.555e4p-2f);
  p = fma_rn(p, f, -0x1.ffffe6p-2f);
  const float ln1pf = fma_rn(mul_rn(f, p), f, f);
  return fma_rn(static_cast<float>(e) * 0x1.0p-23f, 0.693147180559945309f, ln1pf);
}
#endif

// r = sqrt(-2 ln u), u = (lo + 0.5) / 65536, which is exact in float32.
ZK_HD float gaussian_radius(uint32_t lo16) {
#ifdef __CUDA_ARCH__
  const float s = -2.0f * log_unit_interval(fma_rn(static_cast<float>(lo16), 0x1.0p-16f, 0x1.0p-17f));
  float r;
  // One MUFU instruction, about 1 ulp; s >= 1.5e-5, so flushing subnormals changes nothing and skips their fix-up.
  asm("sqrt.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(s));
  return r;
#else
  // In float64, rounded once to float32: the correctly rounded r (tests/test_backends.py checks all 65536 against
  // exact arithmetic), whatever the platform's libm. logf, sinf and cosf are not correctly rounded (glibc's miss at
  // about 1 % of these inputs, each libm elsewhere), and the CPU backend's z would differ between platforms.
  const double u = (static_cast<double>(lo16) + 0.5) / 65536.0;
  return static_cast<float>(std::sqrt(-2.0 * std::log(u)));
#endif
}

// theta = (hi - 32767.5) * (pi / 32768), in (-pi, pi): the range on which the MUFU sine and cosine are accurate.
ZK_HD void gaussian_sincos(uint32_t hi16, float* sin_theta, float* cos_theta) {
  const float theta = (static_cast<float>(hi16) - 32767.5f) * 9.58737992428525768e-05f;
#ifdef __CUDA_ARCH__
  __sincosf(theta, sin_theta, cos_theta);
#else
  *sin_theta = static_cast<float>(std::sin(static_cast<double>(theta)));  // correctly rounded, as gaussian_radius
  *cos_theta = static_cast<float>(std::cos(static_cast<double>(theta)));
#endif
}

// Elements 2p and 2p+1 of a block, from its word p.
ZK_HD void gaussian_pair(uint32_t word, float* even, float* odd) {
  const float r = gaussian_radius(word & 0xFFFFu);
  float s, c;
  gaussian_sincos(word >> 16, &s, &c);
  *even = mul_rn(r, c);
  *odd = mul_rn(r, s);
}

// The 8 normals of one block (global indices 8n .. 8n+7).
ZK_HD void gaussian_octet(const Philox4& w, float z[8]) {
  ZK_UNROLL
  for (int p = 0; p < 4; ++p) gaussian_pair(w.x[p], &z[2 * p], &z[2 * p + 1]);
}

// ---------------------------------------------------------------------------------- Rademacher: 128 per call

// z_i for i = 8m .. 8m+7: bit b = i & 31 of word (i & 127) >> 5 of block i >> 7, as 1 - 2 * bit.
ZK_HD void rademacher_octet(const Philox4& w, uint64_t octet, float z[8]) {
  const uint32_t bits = w.x[(octet & 15) >> 2] >> ((octet & 3) * 8);
  ZK_UNROLL
  for (int e = 0; e < 8; ++e) z[e] = bits_float(0x3F800000u | (((bits >> e) & 1u) << 31));
}

// --------------------------------------------------------------------------- stochastic-rounding integers

// s_i for i = 8n .. 8n+7: half (i & 1) (0 = low) of word (i & 7) >> 1 of block n, domain 2.
ZK_HD void rounding_octet(const Philox4& w, uint32_t s[8]) {
  ZK_UNROLL
  for (int p = 0; p < 4; ++p) {
    s[2 * p] = w.x[p] & 0xFFFFu;
    s[2 * p + 1] = w.x[p] >> 16;
  }
}

// ------------------------------------------------------------------------------------------- storage formats
//
// Each format: to_float (exact), round_nearest (round to nearest even). Stochastic rounding (docs/stream.md, section
// 5) rounds the pass's exact result and lives with the passes (csrc/cpu/chunk_stream.h, csrc/cuda/zo_pass.cu).
// 16-bit formats are stored as their bit patterns (uint16_t), so host and device code share one representation.

struct Float32Format {
  using Storage = float;
  static ZK_HD float to_float(float v) { return v; }
  static ZK_HD float round_nearest(float x) { return x; }
};

struct BFloat16Format {
  using Storage = uint16_t;
  static constexpr uint32_t kMaxFiniteBits = 0x7F7F0000u;  // 3.3895e38

  static ZK_HD float to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

  static ZK_HD uint16_t round_nearest(float x) {
#ifdef __CUDA_ARCH__
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
#else
    const uint32_t u = float_bits(x);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    // NaN as torch's. Integer ternaries (here and in Float16Format) vectorise to a compare and a blend; select_bits'
    // mask arithmetic on a bool cost the CPU's 16-bit passes measurably more.
    return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
#endif
  }
};

struct Float16Format {
  using Storage = uint16_t;
  static constexpr uint32_t kMaxFiniteBits = 0x477FE000u;  // 65504
  static constexpr uint32_t kMinNormalBits = 0x38800000u;  // 2^-14, the smallest normal float16

  static ZK_HD float to_float(uint16_t h) {
#ifdef __CUDA_ARCH__
    return __half2float(__ushort_as_half(h));
#else
    // Exact widening, as c10's fp16_ieee_to_fp32_value.
    const uint32_t w = static_cast<uint32_t>(h) << 16;
    const uint32_t two_w = w + w;
    const float normalized = bits_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = bits_float((two_w >> 17) | (126u << 23)) - 0.5f;
    return bits_float((w & 0x80000000u) | (two_w < (1u << 27) ? float_bits(denormalized) : float_bits(normalized)));
#endif
  }

  static ZK_HD uint16_t round_nearest(float x) {
#ifdef __CUDA_ARCH__
    return __half_as_ushort(__float2half_rn(x));
#else
    // Exact narrowing, as c10's fp16_ieee_from_fp32_value: the float32 addition does the rounding.
    const uint32_t w = float_bits(x);
    const uint32_t shl1_w = w + w;
    uint32_t bias = shl1_w & 0xFF000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    const float base = bits_float((bias >> 1) + 0x07800000u) + (std::fabs(x) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t b = float_bits(base);
    const uint32_t nonsign = ((b >> 13) & 0x7C00u) + (b & 0x0FFFu);
    return static_cast<uint16_t>(((w & 0x80000000u) >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
#endif
  }
};

// ------------------------------------------------------------------------------------------------- the pass

struct PassScalars {
  float alpha;         // a: the perturbation (or -previous alpha to restore)
  float lr;            // applied only when the update is on and grad is finite
  float grad;
  float weight_decay;
  float alpha2;        // b: the second seed's perturbation
};

// The out-of-place perturbation (docs/stream.md, section 5: plain sums, rounded to nearest), in float32 with every
// operation rounded separately.
ZK_HD float perturbed_element(float x, float z1, float z2, const PassScalars& p, bool second) {
  x = add_rn(x, mul_rn(p.alpha, z1));
  if (second) x = add_rn(x, mul_rn(p.alpha2, z2));
  return x;
}

}  // namespace zokern
