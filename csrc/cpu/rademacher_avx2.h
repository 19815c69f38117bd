// The Rademacher perturb pass, t <- round(t + alpha z), over whole 32-element words of a 16-bit tensor with AVX2 (and
// F16C for float16), for CPUs without AVX-512 (rademacher_avx512.h): AMD's before Zen 4, Intel's client cores.
//
// Why: on such a CPU the portable loop's float16 pass reached about a quarter of a copy's bandwidth, bound by its
// software conversions (about twenty vector operations per 8 elements each way); F16C's vcvtph2ps/vcvtps2ph are one
// each. A word is four vectors of 8 lanes; lane e of a vector takes sign bit e of its byte of the word, moved to the
// float sign by a variable shift.
// Same bits as the portable loop, as the AVX-512 path: vcvtps2ph rounds to nearest even exactly as
// Float16Format::round_nearest (checked over all 2^32 floats) except that it keeps a NaN's payload, so a word with a
// NaN sum rewrites its NaN lanes as the NaN's sign | 0x7E00. bfloat16 has no AVX2 conversion: its rounding is
// BFloat16Format::round_nearest's integer arithmetic, eight lanes at a time. alpha is finite (zokern.ops checks it),
// so flipping its sign bit is multiplying it by z = -1.
#pragma once

#include <cstdint>

#include "chunk_stream.h"

#ifdef ZK_X86_PATHS

namespace zokern {
namespace cpu {
namespace avx2 {
ZK_QUIET_INTRINSICS_BEGIN

#define ZK_AVX2_F16C __attribute__((target("avx2,f16c")))

inline bool has_path() {
  static const bool ok = cpu_paths_cap() >= CpuPaths::kAvx2 && __builtin_cpu_supports("avx2") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}

// alpha in lane e where bit e of signs is 0 (z = +1), -alpha where it is 1 (bits above 7 are ignored).
ZK_AVX2_F16C inline __m256 signed_alpha(__m256i alpha, uint32_t signs) {
  const __m256i to_sign = _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24);  // bit e to bit 31
  const __m256i flip = _mm256_and_si256(_mm256_sllv_epi32(_mm256_set1_epi32(static_cast<int>(signs)), to_sign),
                                        _mm256_set1_epi32(INT32_MIN));
  return _mm256_castsi256_ps(_mm256_xor_si256(alpha, flip));
}

// Words [first_word, end_word) of the tensor whose element for global index i is at data + i - base; the word's
// sign bits come from words.w[word & 3][(word >> 2) - first_block], as in process_chunk_rademacher.
ZK_AVX2_F16C inline void perturb_words_fp16(uint16_t* data, int64_t base, int64_t first_word, int64_t end_word,
                                           const BlockWords& words, int64_t first_block, float alpha) {
  const __m256i a = _mm256_set1_epi32(static_cast<int>(float_bits(alpha)));
  for (int64_t word = first_word; word < end_word; ++word) {
    const uint32_t signs = words.w[word & 3][(word >> 2) - first_block];
    uint16_t* p = data + ((word << 5) - base);
    __m256 y[4];
    int nan = 0;
    for (int v = 0; v < 4; ++v) {
      const __m256 x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8 * v)));
      y[v] = _mm256_add_ps(x, signed_alpha(a, signs >> (8 * v)));
      nan |= _mm256_movemask_ps(_mm256_cmp_ps(y[v], y[v], _CMP_UNORD_Q));
    }
    for (int v = 0; v < 4; ++v) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8 * v), _mm256_cvtps_ph(y[v], _MM_FROUND_TO_NEAREST_INT));
    }
    if (nan != 0) {  // rare: a NaN weight, or an overflow of inf - inf
      alignas(32) float sums[32];
      for (int v = 0; v < 4; ++v) _mm256_store_ps(sums + 8 * v, y[v]);
      for (int e = 0; e < 32; ++e) {
        if (sums[e] != sums[e]) p[e] = Float16Format::round_nearest(sums[e]);
      }
    }
  }
}

// BFloat16Format::round_nearest on 8 lanes, in the low 16 bits of each.
ZK_AVX2_F16C inline __m256i bf16_round(__m256 y) {
  const __m256i u = _mm256_castps_si256(y);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  // |u| > the infinity's bits: NaN. Both sides are below 2^31, so the signed compare is the unsigned one.
  const __m256i nan =
      _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF)), _mm256_set1_epi32(0x7F800000));
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
}

ZK_AVX2_F16C inline void perturb_words_bf16(uint16_t* data, int64_t base, int64_t first_word, int64_t end_word,
                                           const BlockWords& words, int64_t first_block, float alpha) {
  const __m256i a = _mm256_set1_epi32(static_cast<int>(float_bits(alpha)));
  for (int64_t word = first_word; word < end_word; ++word) {
    const uint32_t signs = words.w[word & 3][(word >> 2) - first_block];
    uint16_t* p = data + ((word << 5) - base);
    __m256i r[4];
    for (int v = 0; v < 4; ++v) {
      const __m256i bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8 * v)));
      const __m256 x = _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16));
      r[v] = bf16_round(_mm256_add_ps(x, signed_alpha(a, signs >> (8 * v))));
    }
    // packus interleaves the two vectors' 128-bit halves; the permute puts the 16 results back in order.
    for (int half = 0; half < 2; ++half) {
      const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r[2 * half], r[2 * half + 1]), 0xD8);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + 16 * half), packed);
    }
  }
}

ZK_QUIET_INTRINSICS_END
#undef ZK_AVX2_F16C

}  // namespace avx2
}  // namespace cpu
}  // namespace zokern
#endif
