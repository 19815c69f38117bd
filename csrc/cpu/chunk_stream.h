// The CPU kernels' stream generation, shared by the fused pass (zo_pass.cpp) and the LDSD passes (ldsd_pass.cpp):
// the global index space is walked in chunks of kChunk indices aligned to kChunk, and each chunk's slice of a stream
// is generated into a small buffer by structure-of-arrays Philox batches that vectorise.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include <zokern/stream.h>

// Hand-written AVX-512 and AVX2 paths (here, rademacher_avx512.h and rademacher_avx2.h), picked at run time on CPUs
// that have the instructions. ZOKERN_CPU_PATHS caps them: `portable` keeps the portable loops on any CPU (what the
// tests compare the others against), `avx2` the AVX2 paths at most, `avx512` (or unset) the best the CPU has.
#if defined(__x86_64__) && defined(__ELF__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define ZK_X86_PATHS 1
#include <immintrin.h>
// GCC 12's intrinsics seed their "undefined" pass-through vectors from themselves (`__m512i __Y = __Y;`), and -Wall
// then warns at every inlined shift, multiply or conversion that they may be used uninitialized: a false positive,
// silenced around the code that calls them.
#define ZK_QUIET_INTRINSICS_BEGIN \
  _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#define ZK_QUIET_INTRINSICS_END _Pragma("GCC diagnostic pop")
#endif

namespace zokern {
namespace cpu {
// A task is a chunk of kChunk consecutive global indices aligned to kChunk: a multiple of 128, so each Philox block
// of every stream lies in one chunk, and the chunk's z, second z and rounding integers (10 KiB) stay in L1.
constexpr int64_t kChunk = 1024;
constexpr int64_t kMaxBlocks = kChunk >> kGaussianLog2;  // Philox blocks per chunk, 8-element streams
constexpr int64_t kGrainChunks = 16;                     // 16 Ki elements per parallel_for task at least

// r depends only on the low 16 bits of a word and (cos, sin) only on the high 16 bits. Tabulating the header's own
// functions keeps the CPU's z bit-identical to evaluating them, for two L2 lookups per pair instead of three libm
// calls.
struct GaussianTables {
  float radius[1 << 16];
  float cos_sin[1 << 16][2];

  GaussianTables() {
    for (uint32_t v = 0; v < (1u << 16); ++v) {
      radius[v] = gaussian_radius(v);
      gaussian_sincos(v, &cos_sin[v][1], &cos_sin[v][0]);
    }
  }
};

inline const GaussianTables& gaussian_tables() {
  static const GaussianTables tables;
  return tables;
}

// Inlined into the passes' chunk functions, so that they are compiled for each of their target clones.
#if defined(_MSC_VER)
#define ZK_INLINE __forceinline
#else
#define ZK_INLINE inline __attribute__((always_inline))
#endif

// Structure of arrays, so that the ten rounds vectorise across blocks.
struct BlockWords {
  alignas(64) uint32_t w[4][kMaxBlocks];
};

#ifdef ZK_X86_PATHS
enum class CpuPaths { kPortable, kAvx2, kAvx512 };

// The cap ZOKERN_CPU_PATHS sets, read once. A value it does not know is an error at the first pass, not a silent
// fallback (a test that meant to compare the portable loop would compare a path with itself).
inline CpuPaths cpu_paths_cap() {
  static const CpuPaths cap = [] {
    const char* v = std::getenv("ZOKERN_CPU_PATHS");
    const std::string value = v == nullptr ? "" : v;
    if (value.empty() || value == "avx512") return CpuPaths::kAvx512;
    if (value == "avx2") return CpuPaths::kAvx2;
    if (value == "portable") return CpuPaths::kPortable;
    TORCH_CHECK(false, "ZOKERN_CPU_PATHS must be portable, avx2 or avx512 (or unset: the best the CPU has), got '",
                value, "'");
  }();
  return cap;
}

inline bool has_avx512_philox() {
  static const bool ok = cpu_paths_cap() >= CpuPaths::kAvx512 && __builtin_cpu_supports("avx512f");
  return ok;
}

ZK_QUIET_INTRINSICS_BEGIN

// The high and low halves of the 32x32-bit products a * m in 16 lanes: vpmuludq multiplies the even lanes, so the
// odd ones are shifted down first.
__attribute__((target("avx512f"))) inline void mulhilo16(__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

// philox_blocks 16 blocks at a time: 2.3 x the compiler-vectorised x86-64-v4 loop on 128 blocks (240 vs 559 ns,
// measured standalone), which the vectoriser spends on 64-bit multiplies and shuffles. Same words (tests compare).
__attribute__((target("avx512f"))) inline void philox_blocks_avx512(uint32_t k0, uint32_t k1, uint32_t domain,
                                                                    uint32_t n_lo, uint32_t n_hi, int64_t count,
                                                                    BlockWords& out) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t b = 0; b < count; b += 16) {
    __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(n_lo + static_cast<uint32_t>(b))), lane);
    const __mmask16 carry = _mm512_cmplt_epu32_mask(c0, _mm512_set1_epi32(static_cast<int>(n_lo)));
    const __m512i hi_word = _mm512_set1_epi32(static_cast<int>(n_hi));
    __m512i c1 = _mm512_mask_add_epi32(hi_word, carry, hi_word, _mm512_set1_epi32(1));
    __m512i c2 = _mm512_set1_epi32(static_cast<int>(domain)), c3 = _mm512_setzero_si512();
    uint32_t key0 = k0, key1 = k1;
#pragma GCC unroll 10
    for (int round = 0; round < 10; ++round) {
      __m512i hi0, lo0, hi1, lo1;
      mulhilo16(c0, m0, hi0, lo0);
      mulhilo16(c2, m1, hi1, lo1);
      c0 = _mm512_ternarylogic_epi32(hi1, c1, _mm512_set1_epi32(static_cast<int>(key0)), 0x96);  // three-way xor
      c1 = lo1;
      c2 = _mm512_ternarylogic_epi32(hi0, c3, _mm512_set1_epi32(static_cast<int>(key1)), 0x96);
      c3 = lo0;
      key0 += kPhiloxW0;
      key1 += kPhiloxW1;
    }
    const __mmask16 keep = count - b >= 16 ? __mmask16{0xFFFF} : static_cast<__mmask16>((1u << (count - b)) - 1);
    _mm512_mask_storeu_epi32(out.w[0] + b, keep, c0);
    _mm512_mask_storeu_epi32(out.w[1] + b, keep, c1);
    _mm512_mask_storeu_epi32(out.w[2] + b, keep, c2);
    _mm512_mask_storeu_epi32(out.w[3] + b, keep, c3);
  }
}
// AVX2 (no AVX-512): the same 8 blocks at a time, vpmuludq on even and odd lanes. 2.5 x the compiler's AVX2 clone
// on 128 blocks (0.49 vs 1.25 us on an AMD EPYC, measured standalone). Same words (tests compare).
inline bool has_avx2_philox() {
  static const bool ok = cpu_paths_cap() >= CpuPaths::kAvx2 && __builtin_cpu_supports("avx2");
  return ok;
}

__attribute__((target("avx2"))) inline void mulhilo8(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

__attribute__((target("avx2"))) inline void philox_blocks_avx2(uint32_t k0, uint32_t k1, uint32_t domain,
                                                               uint32_t n_lo, uint32_t n_hi, int64_t count,
                                                               BlockWords& out) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i flip = _mm256_set1_epi32(INT32_MIN);  // AVX2 compares signed: x ^ 2^31 orders as unsigned x
  for (int64_t b = 0; b < count; b += 8) {
    __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(n_lo + static_cast<uint32_t>(b))), lane);
    const __m256i carry = _mm256_cmpgt_epi32(_mm256_xor_si256(_mm256_set1_epi32(static_cast<int>(n_lo)), flip),
                                             _mm256_xor_si256(c0, flip));  // c0 < n_lo: all ones, -1
    __m256i c1 = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(n_hi)), carry);
    __m256i c2 = _mm256_set1_epi32(static_cast<int>(domain)), c3 = _mm256_setzero_si256();
    uint32_t key0 = k0, key1 = k1;
#pragma GCC unroll 10
    for (int round = 0; round < 10; ++round) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo8(c0, m0, hi0, lo0);
      mulhilo8(c2, m1, hi1, lo1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(key0)));
      c1 = lo1;
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(key1)));
      c3 = lo0;
      key0 += kPhiloxW0;
      key1 += kPhiloxW1;
    }
    const __m256i words[4] = {c0, c1, c2, c3};
    if (count - b >= 8) {
      for (int q = 0; q < 4; ++q) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.w[q] + b), words[q]);
    } else {  // the batch's last, partial vector: only its blocks are written (out may hold no more)
      alignas(32) uint32_t lanes[8];
      for (int q = 0; q < 4; ++q) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), words[q]);
        for (int64_t j = 0; j < count - b; ++j) out.w[q][b + j] = lanes[j];
      }
    }
  }
}
ZK_QUIET_INTRINSICS_END
#endif

ZK_INLINE void philox_blocks(uint64_t seed, uint32_t domain, uint64_t first, int64_t count, BlockWords& out) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  // 32-bit counter arithmetic (with the carry) keeps the loop in 32-bit lanes.
  const uint32_t n_lo = static_cast<uint32_t>(first), n_hi = static_cast<uint32_t>(first >> 32);
#ifdef ZK_X86_PATHS
  if (count >= 16 && has_avx512_philox()) {  // fewer: one half-empty vector gains nothing (latency-bound rounds)
    philox_blocks_avx512(k0, k1, domain, n_lo, n_hi, count, out);
    return;
  }
  if (count >= 8 && !has_avx512_philox() && has_avx2_philox()) {
    philox_blocks_avx2(k0, k1, domain, n_lo, n_hi, count, out);
    return;
  }
#endif
  for (int32_t b = 0; b < static_cast<int32_t>(count); ++b) {
    const uint32_t c0 = n_lo + static_cast<uint32_t>(b);
    const uint32_t c1 = n_hi + (c0 < n_lo ? 1u : 0u);
    const Philox4 r = philox4x32_10(c0, c1, domain, 0u, k0, k1);
    out.w[0][b] = r.x[0];
    out.w[1][b] = r.x[1];
    out.w[2][b] = r.x[2];
    out.w[3][b] = r.x[3];
  }
}

// The fill_* functions write the elements of the whole Philox blocks that cover global indices [lo, last] into
// buf[i - chunk_begin]; those blocks lie inside the chunk [chunk_begin, chunk_begin + kChunk).

ZK_INLINE void fill_gaussian(uint64_t seed, int64_t chunk_begin, int64_t lo, int64_t last, float* buf,
                          BlockWords& words) {
  const int64_t first = lo >> kGaussianLog2, count = (last >> kGaussianLog2) - first + 1;
  philox_blocks(seed, kDomainGaussian, first, count, words);
  const GaussianTables& tab = gaussian_tables();
  float* out = buf + ((first << kGaussianLog2) - chunk_begin);
  for (int64_t b = 0; b < count; ++b) {
    for (int p = 0; p < 4; ++p) {
      const uint32_t w = words.w[p][b];
      const float r = tab.radius[w & 0xFFFFu];
      const float* cs = tab.cos_sin[w >> 16];
      out[8 * b + 2 * p] = r * cs[0];
      out[8 * b + 2 * p + 1] = r * cs[1];
    }
  }
}

// The Rademacher value of a word's lowest bit: bit 0 -> +1, bit 1 -> -1.
ZK_INLINE float sign_float(uint32_t bits) { return bits_float(0x3F800000u | ((bits & 1u) << 31)); }

ZK_INLINE void fill_rademacher(uint64_t seed, int64_t chunk_begin, int64_t lo, int64_t last, float* buf,
                               BlockWords& words) {
  const int64_t first = lo >> kRademacherLog2, count = (last >> kRademacherLog2) - first + 1;
  philox_blocks(seed, kDomainRademacher, first, count, words);
  float* out = buf + ((first << kRademacherLog2) - chunk_begin);
  for (int64_t b = 0; b < count; ++b) {
    for (int q = 0; q < 4; ++q) {
      const uint32_t w = words.w[q][b];
      float* o = out + 128 * b + 32 * q;
      for (uint32_t e = 0; e < 32; ++e) o[e] = sign_float(w >> e);
    }
  }
}

ZK_INLINE void fill_z(int64_t domain, uint64_t seed, int64_t chunk_begin, int64_t lo, int64_t last, float* buf,
                   BlockWords& words) {
  if (domain == kDomainGaussian) {
    fill_gaussian(seed, chunk_begin, lo, last, buf, words);
  } else {
    fill_rademacher(seed, chunk_begin, lo, last, buf, words);
  }
}

ZK_INLINE void fill_rounding(uint64_t seed, int64_t chunk_begin, int64_t lo, int64_t last, uint16_t* buf,
                             BlockWords& words) {
  const int64_t first = lo >> kRoundingLog2, count = (last >> kRoundingLog2) - first + 1;
  philox_blocks(seed, kDomainRounding, first, count, words);
  uint16_t* out = buf + ((first << kRoundingLog2) - chunk_begin);
  for (int64_t b = 0; b < count; ++b) {
    for (int p = 0; p < 4; ++p) {
      const uint32_t w = words.w[p][b];
      out[8 * b + 2 * p] = static_cast<uint16_t>(w);
      out[8 * b + 2 * p + 1] = static_cast<uint16_t>(w >> 16);
    }
  }
}

// ------------------------------------------------------------- the pass's exact sums and their stochastic rounding

// docs/stream.md, section 5: domain 3 holds the second rounding integers, laid out as domain 2's.
constexpr uint32_t kDomainRoundingFine = 3;

// Section 5's add(x, e, w): a zero term leaves x and e (a -0 weight stays -0); otherwise x + w, and e gathers the
// sum's exact error (Knuth's TwoSum; -ffp-contract=off keeps it exact). kResidual false: x only, for the passes
// whose rounding never reads e. Selects on bit patterns keep the loops branch-free.
template <bool kResidual>
ZK_INLINE void add_term(float& x, float& e, float w) {
  const float s = add_rn(x, w);
  const bool zero = w == 0.0f;
  if (kResidual) {
    // No select for e: at a zero w the error d is 0 wherever x is finite (e + d = e, up to a zero's sign, which the
    // rounding does not read), and where x is not finite (once not finite, it stays so) the rounding reads no e.
    const float v = sub_rn(s, x);
    const float d = add_rn(sub_rn(x, sub_rn(s, v)), sub_rn(w, v));
    e = add_rn(e, d);
  }
  x = bits_float(select_bits(zero, float_bits(x), float_bits(s)));
}

// Section 5's stochastic rounding, step 3, for each 16-bit Format: from the magnitude m (bits mag) of the
// renormalised x and whether its residual points below it (r < 0 along the magnitude), the pattern of t, the
// integer k0 = floor(D), D - k0 and P, Q with R = (r * P) * Q bit for bit as the spec's (r / span) * 65536. Integer
// work where the format allows: nothing here converts a neighbour back to float32.
struct CellOfX {
  uint32_t toward;  // t's pattern (magnitude)
  int32_t k0;
  float d_frac;     // D - k0
  float p, q;
  bool inf_span;    // t is the largest finite value and t' infinite: the spec's D and R are then 0
};

// bf16 keeps float32's exponent: t drops x's low 16 bits, which are D (x - t is a multiple of x's float32 spacing,
// span / 65536); on the grid with r < 0, t is one below and D = 65536. span = 2^(max(ef, 1) - 134) with ef t's
// exponent field, and 1/span = 2^(134 - ef) is a float32 from ef = 7: there r * (1/span) rounds the exact r / span
// once, as the division does. Below (t < 2^-120), r / span = r * 2^(134 - ef) is exact (r is a multiple of 2^-149
// and |r / span| < 2^-12), as are r * 2^(118 - ef) and its product with 2^32.
ZK_INLINE CellOfX cell_of(BFloat16Format, uint32_t mag, bool below) {
  const uint32_t low = mag & 0xFFFFu;
  const bool shift = (low == 0u) & below;
  const uint32_t toward = (mag >> 16) - (shift ? 1u : 0u);
  const uint32_t field = (toward >> 7) & 0xFFu;
  const uint32_t ef = field < 1u ? 1u : field;
  const bool tiny = ef < 7u;
  return {toward,
          shift ? 65536 : static_cast<int32_t>(low),
          0.0f,
          bits_float((tiny ? 245u - ef : 261u - ef) << 23),
          bits_float(tiny ? 0x4F800000u : 0x47800000u),  // 2^32, 2^16
          toward == 0x7F7Fu};
}

// float16 normals: t drops 13 bits of x, D = 8 * those bits (an integer: x's float32 spacing is span / 8192).
// Subnormals (x < 2^-14, spacing 2^-24): D = (x * 2^24 - t) * 65536, exact, with a fraction. span =
// 2^(max(ef, 1) - 25), 1/span a float32 throughout.
ZK_INLINE CellOfX cell_of(Float16Format, uint32_t mag, bool below) {
  const bool normal = mag >= Float16Format::kMinNormalBits;
  // The clamp keeps the conversion defined for every x.
  const float a24 = mul_rn(bits_float(normal ? Float16Format::kMinNormalBits : mag), 0x1.0p24f);
  const int32_t t_sub = static_cast<int32_t>(a24);
  const float d_sub = mul_rn(sub_rn(a24, static_cast<float>(t_sub)), 65536.0f);
  // Selects on bit patterns, not float ternaries: gcc sinks float work into branches otherwise (no vectorising).
  const float d_normal = static_cast<float>(static_cast<int32_t>((mag & 0x1FFFu) << 3));
  const float d = bits_float(select_bits(normal, float_bits(d_normal), float_bits(d_sub)));
  const uint32_t toward0 = normal ? (mag - 0x38000000u) >> 13 : static_cast<uint32_t>(t_sub);
  const bool shift = (d == 0.0f) & below;
  const uint32_t toward = toward0 - (shift ? 1u : 0u);
  const float big_d = bits_float(select_bits(shift, 0x47800000u, float_bits(d)));  // 65536
  const int32_t k0 = static_cast<int32_t>(big_d);  // D >= 0: the conversion is the floor
  const uint32_t field = (toward >> 10) & 0x1Fu;
  const uint32_t ef = field < 1u ? 1u : field;
  return {toward, k0, sub_rn(big_d, static_cast<float>(k0)), bits_float((152u - ef) << 23), 65536.0f,
          toward == 0x7BFFu};
}

// floor(v) for finite v of magnitude below 2^31 (F, within a few units of 0, below), as an integer. Through an
// integer conversion, which vectorises where floorf does not (gcc, with trapping math).
ZK_INLINE int32_t floor_small_int(float v) {
  const int32_t t = static_cast<int32_t>(v);
  return t - (static_cast<float>(t) > v ? 1 : 0);
}

constexpr uint32_t kNoTie = 0xFFFFFFFFu;  // a NaN: round_stochastic_exact's mark of an element without a tie

// Section 5's stochastic rounding of x + e (e: x's residual) to a 16-bit Format with the first rounding integer s.
// Where s ties with k (once in 2^16), the second integer s2 decides: *fine receives F there (away from zero iff
// s2 < f * 65536, f = F - floor(F); F is 0 out of range: never away) and kNoTie elsewhere, and resolve_ties draws
// s2 for those elements only. Comparisons of magnitudes are on bit patterns, and nothing but the final select reads
// round_nearest: float work on a value that may be a NaN constant in one arm gets sunk into a branch, and the loop
// would not vectorise.
template <class Format>
ZK_INLINE uint16_t round_stochastic_exact(float x, float e, uint32_t s, float* fine) {
  // Step 1. x + (-0) is x for every x (a -0 x included), so a zero or non-finite e adds -0 instead of being
  // selected around; r = d: the spec's 0 + d but for a zero's sign, which nothing below reads. Where x is not
  // finite, r may be NaN: only out-of-range work reads it, and selects drop that.
  // e finite and not 0: its magnitude's pattern in [1, 0x7F7FFFFF] (one unsigned compare).
  const float w = bits_float(select_bits((float_bits(e) & 0x7FFFFFFFu) - 1u < 0x7F7FFFFFu, float_bits(e), 0x80000000u));
  const float sum = add_rn(x, w), v = sub_rn(sum, x);
  const float r = add_rn(sub_rn(x, sub_rn(sum, v)), sub_rn(w, v));  // |r| <= x's half spacing
  x = sum;
  const uint32_t u = float_bits(x), mag = u & 0x7FFFFFFFu, sign = u & 0x80000000u;
  const uint32_t r_bits = float_bits(r) ^ sign;  // r along the magnitude
  const CellOfX c = cell_of(Format{}, mag, r_bits > 0x80000000u);  // below: x + e in the cell under x
  // Else to nearest (and not finite). bf16 leaves its zeros in range: from a ±0 x, r is ±0 (x + w = 0 only if
  // exact), so below is false, k0 = 0, F = ±0 and k = 0: the stochastic formula stores x's sign over 0, as rounding
  // to nearest does, and a tie's F = ±0 never moves it.
  constexpr bool kBf16 = std::is_same_v<Format, BFloat16Format>;
  const bool in_range = (kBf16 || mag != 0u) & (mag <= Format::kMaxFiniteBits);
  const float big_r = mul_rn(mul_rn(bits_float(r_bits), c.p), c.q);
  // F = (D - k0) + R; 0 out of range (so that the floor's conversion stays defined) and where span is infinite.
  int32_t whole;
  float frac;
  if constexpr (std::is_same_v<Format, BFloat16Format>) {
    // D is an integer: F = R (a -0 R as +0: no difference below), |R| <= 1/2 in range, floor(F) = -1 iff R < 0.
    frac = bits_float(select_bits(in_range & !c.inf_span, float_bits(big_r), 0u));
    whole = frac < 0.0f ? -1 : 0;
  } else {
    frac = bits_float(select_bits(in_range & !c.inf_span, float_bits(add_rn(c.d_frac, big_r)), 0u));
    whole = floor_small_int(frac);
  }
  const int32_t k = c.k0 + whole;
  const int32_t si = static_cast<int32_t>(s);
  // Ties keep F (resolve_ties takes f = F - floor(F) from it), the others a NaN pattern.
  *fine = bits_float(select_bits(si == k, float_bits(frac), kNoTie));
  const uint32_t stochastic = (sign >> 16) | (c.toward + (si < k ? 1u : 0u));
  if constexpr (kBf16) {
    // Out of range is beyond the largest finite value: round_nearest there, where 0x7F7F is odd (its ties go up, to
    // infinity) and a carry never reaches the sign: (mag + 0x8000) >> 16, or 0x7FC0 for NaN.
    const uint32_t nearest = mag > 0x7F800000u ? 0x7FC0u : ((sign >> 16) | ((mag + 0x8000u) >> 16));
    return static_cast<uint16_t>(select_bits(in_range, stochastic, nearest));
  } else {
    return static_cast<uint16_t>(select_bits(in_range, stochastic, Format::round_nearest(x)));
  }
}

// The ties of round_stochastic_exact over n elements from global index i0 (fine[j] not kNoTie): one Philox call
// (domain 3) each, the same s2 an eager draw would read. The stored value then moves one step away from zero iff
// s2 < f * 65536 with f = F - floor(F), section 5's float32 steps. A vectorised scan first skips the chunks (nearly
// all) that have none.
template <class Storage>
ZK_INLINE void resolve_ties(uint64_t rounding_seed, int64_t i0, int64_t n, const float* fine, Storage* data) {
  uint32_t any = 0;
  for (int64_t j = 0; j < n; ++j) any |= float_bits(fine[j]) != kNoTie ? 1u : 0u;
  if (!any) return;
  for (int64_t j = 0; j < n; ++j) {
    if (float_bits(fine[j]) == kNoTie) continue;
    const float whole = static_cast<float>(floor_small_int(fine[j]));
    const float threshold = mul_rn(sub_rn(fine[j], whole), 65536.0f);
    const uint64_t i = static_cast<uint64_t>(i0 + j);
    const Philox4 w = philox_block(rounding_seed, i >> kRoundingLog2, kDomainRoundingFine);
    const uint32_t s2 = (w.x[(i & 7) >> 1] >> (16 * (i & 1))) & 0xFFFFu;
    if (static_cast<float>(s2) < threshold) ++data[j];
  }
}

// x86-64's baseline, SSE2, has no vector 32x32->64-bit multiply that the vectoriser can use for Philox: AVX2 and
// AVX-512 (x86-64-v4) clones, picked at load time, run the Philox batches 8 or 16 blocks at a time (1.4x and 3.6x
// the SSE2 throughput on an AMD EPYC). setup.py compiles with -ffp-contract=off, so x86-64-v4's FMA leaves the
// pass's float operations separately rounded.
#if defined(__x86_64__) && defined(__ELF__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define ZK_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#elif defined(__x86_64__) && defined(__ELF__) && defined(__clang__) && __clang_major__ >= 14
#define ZK_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define ZK_CPU_CLONES
#endif

// One tensor's share of the pass: its chunks are tasks task_begin, task_begin + 1, ... of one flat task list.
struct Job {
  void* data;
  int64_t index;        // position in the call's tensor list
  int64_t base;
  int64_t last;         // global index of the last element
  int64_t first_chunk;  // global chunk number of the first element
  int64_t task_begin;   // this tensor's first task in the flattened task list
};

// The jobs of the non-empty tensors; *n_tasks receives the number of chunks, all tensors together.
inline std::vector<Job> chunk_jobs(at::TensorList tensors, at::IntArrayRef bases, int64_t* n_tasks) {
  std::vector<Job> jobs;
  jobs.reserve(tensors.size());
  *n_tasks = 0;
  TORCH_CHECK(bases.size() == tensors.size(), "zokern: got ", tensors.size(), " tensors but ", bases.size(), " bases");
  for (size_t k = 0; k < tensors.size(); ++k) {
    const int64_t numel = tensors[k].numel();
    if (numel == 0) continue;
    // Every CPU op's guard (zo_pass_ checks first with its own message): past 2^63, `last` would wrap.
    TORCH_CHECK(bases[k] >= 0 && numel - 1 <= std::numeric_limits<int64_t>::max() - bases[k], "zokern: bases[", k,
                "] = ", bases[k], " with numel ", numel, " leaves the stream's index range [0, 2^63)");
    const int64_t last = bases[k] + (numel - 1);
    const int64_t first_chunk = bases[k] / kChunk;
    jobs.push_back({tensors[k].data_ptr(), static_cast<int64_t>(k), bases[k], last, first_chunk, *n_tasks});
    *n_tasks += last / kChunk - first_chunk + 1;
  }
  return jobs;
}

// Calls f(job, chunk_begin, task) for every task, spread over threads by at::parallel_for.
template <class F>
void parallel_chunks(const std::vector<Job>& jobs, int64_t n_tasks, F&& f) {
#ifdef ZK_X86_PATHS
  (void)cpu_paths_cap();  // a bad ZOKERN_CPU_PATHS raises here, in the caller's thread, not in a worker's
#endif
  at::parallel_for(0, n_tasks, kGrainChunks, [&](int64_t begin, int64_t end) {
    // The last job starting at or before `begin`; empty tensors own no task and are never jobs.
    size_t k = std::upper_bound(jobs.begin(), jobs.end(), begin,
                                [](int64_t task, const Job& job) { return task < job.task_begin; }) -
               jobs.begin() - 1;
    for (int64_t task = begin; task < end; ++task) {
      while (k + 1 < jobs.size() && jobs[k + 1].task_begin <= task) ++k;
      const Job& job = jobs[k];
      f(job, (job.first_chunk + (task - job.task_begin)) * kChunk, task);
    }
  });
}

// Calls f(std::bool_constant<v>{}): turns a runtime flag into a template argument.
template <class F>
void with_flag(bool v, F&& f) {
  if (v) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Calls f(Format{}) with the storage format of a float32, bfloat16 or float16 tensor; raises for other dtypes.
template <class F>
void with_format(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kFloat:
      f(Float32Format{});
      break;
    case at::kBFloat16:
      f(BFloat16Format{});
      break;
    case at::kHalf:
      f(Float16Format{});
      break;
    default:
      TORCH_CHECK(false, op, ": tensors must be float32, bfloat16 or float16, got ", dtype);
  }
}

}  // namespace cpu
}  // namespace zokern
