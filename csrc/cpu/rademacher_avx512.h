// The Rademacher perturb pass, t <- round(t + alpha z), over whole 32-element words of a 16-bit tensor with AVX-512's
// conversions, picked at run time on CPUs that have them (AVX512-BW/VL, and AVX512-BF16 for bfloat16).
//
// Why: the portable loop's 16-bit passes are bound by the core, not by memory (benchmarks/RESULTS.md): widening,
// z from a sign bit and rounding cost about twenty vector operations per 16 elements in float16. Here a word's 32
// sign bits are two mask registers that flip alpha's sign, and the conversions are single instructions:
// vcvtph2ps/vcvtps2ph for float16, vcvtne2ps2bf16 for bfloat16. They give the portable loop's bits, checked
// exhaustively (all 2^32 floats, all 2^16 halves; zeros and infinities included) with one exception each, handled
// here:
// - vcvtne2ps2bf16 treats subnormal inputs as zero and quiets NaNs keeping their payload: a word holding a subnormal
//   or NaN sum (vfpclassps says) takes the integer rounding of BFloat16Format::round_nearest instead (rare);
// - vcvtps2ph keeps a NaN's payload: NaN lanes are set to the NaN's sign | 0x7E00, as Float16Format's.
// alpha is finite (zokern.ops checks it), so flipping its sign bit is multiplying it by z = -1.
#pragma once

#include <cstdint>

#include "chunk_stream.h"

#ifdef ZK_X86_PATHS

namespace zokern {
namespace cpu {
namespace avx512 {
ZK_QUIET_INTRINSICS_BEGIN

// Each path compiled for exactly the features its run-time check asks for.
#define ZK_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define ZK_AVX512_FP16 __attribute__((target("avx512f,avx512bw,avx512vl,f16c")))

inline bool has_bf16_path() {
  static const bool ok = cpu_paths_cap() >= CpuPaths::kAvx512 && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("avx512bf16");
  return ok;
}

inline bool has_fp16_path() {
  static const bool ok = cpu_paths_cap() >= CpuPaths::kAvx512 && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("f16c");
  return ok;
}

// alpha where the element's sign bit is 0 (z = +1), -alpha where it is 1. AVX512F only: both paths inline it.
__attribute__((target("avx512f"))) inline __m512 signed_alpha(__m512i alpha, uint32_t signs16) {
  return _mm512_castsi512_ps(
      _mm512_mask_xor_epi32(alpha, static_cast<__mmask16>(signs16), alpha, _mm512_set1_epi32(INT32_MIN)));
}

// BFloat16Format::round_nearest on 16 lanes: for the vectors vcvtneps2bf16 would get wrong.
ZK_AVX512_BF16 inline __m256i bf16_round_integer(__m512i u) {
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  const __mmask16 nan =
      _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)), _mm512_set1_epi32(0x7F800000));
  return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0)));
}

// Words [first_word, end_word) of the tensor whose element for global index i is at data + i - base; the word's
// sign bits come from words.w[word & 3][(word >> 2) - first_block], as in process_chunk_rademacher. A word is two
// vectors of 16; the rare word with a special sum takes the exact fallback for both.
ZK_AVX512_BF16 inline void perturb_words_bf16(uint16_t* data, int64_t base, int64_t first_word, int64_t end_word,
                                         const BlockWords& words, int64_t first_block, float alpha) {
  const __m512i a = _mm512_set1_epi32(static_cast<int>(float_bits(alpha)));
  constexpr int kSpecial = 0x01 | 0x20 | 0x80;  // vfpclassps: quiet NaN, subnormal, signalling NaN
  for (int64_t word = first_word; word < end_word; ++word) {
    const uint32_t signs = words.w[word & 3][(word >> 2) - first_block];
    uint16_t* p = data + ((word << 5) - base);
    const __m256i* in = reinterpret_cast<const __m256i*>(p);
    const __m512 x0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(in)), 16));
    const __m512 x1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(in + 1)), 16));
    const __m512 y0 = _mm512_add_ps(x0, signed_alpha(a, signs));
    const __m512 y1 = _mm512_add_ps(x1, signed_alpha(a, signs >> 16));
    if ((_mm512_fpclass_ps_mask(y0, kSpecial) | _mm512_fpclass_ps_mask(y1, kSpecial)) == 0) {
      _mm512_storeu_si512(p, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(y1, y0)));  // y0 in the low half
    } else {
      __m256i* out = reinterpret_cast<__m256i*>(p);
      _mm256_storeu_si256(out, bf16_round_integer(_mm512_castps_si512(y0)));
      _mm256_storeu_si256(out + 1, bf16_round_integer(_mm512_castps_si512(y1)));
    }
  }
}

// NaN lanes of the rounded y as Float16Format::round_nearest writes them: the NaN's sign | 0x7E00.
ZK_AVX512_FP16 inline __m256i fp16_canonical_nans(__m512 y, __m256i rounded) {
  const __mmask16 nan = _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q);
  const __m512i sign = _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(y), 16), _mm512_set1_epi32(0x8000));
  return _mm256_mask_blend_epi16(nan, rounded, _mm512_cvtepi32_epi16(_mm512_or_si512(sign, _mm512_set1_epi32(0x7E00))));
}

ZK_AVX512_FP16 inline void perturb_words_fp16(uint16_t* data, int64_t base, int64_t first_word, int64_t end_word,
                                         const BlockWords& words, int64_t first_block, float alpha) {
  const __m512i a = _mm512_set1_epi32(static_cast<int>(float_bits(alpha)));
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  for (int64_t word = first_word; word < end_word; ++word) {
    const uint32_t signs = words.w[word & 3][(word >> 2) - first_block];
    __m256i* p = reinterpret_cast<__m256i*>(data + ((word << 5) - base));
    const __m512 y0 = _mm512_add_ps(_mm512_cvtph_ps(_mm256_loadu_si256(p)), signed_alpha(a, signs));
    const __m512 y1 = _mm512_add_ps(_mm512_cvtph_ps(_mm256_loadu_si256(p + 1)), signed_alpha(a, signs >> 16));
    __m256i out0 = _mm512_cvtps_ph(y0, kRound), out1 = _mm512_cvtps_ph(y1, kRound);
    if ((_mm512_cmp_ps_mask(y0, y0, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(y1, y1, _CMP_UNORD_Q)) != 0) {
      out0 = fp16_canonical_nans(y0, out0);
      out1 = fp16_canonical_nans(y1, out1);
    }
    _mm256_storeu_si256(p, out0);
    _mm256_storeu_si256(p + 1, out1);
  }
}

ZK_QUIET_INTRINSICS_END
#undef ZK_AVX512_BF16
#undef ZK_AVX512_FP16

}  // namespace avx512
}  // namespace cpu
}  // namespace zokern
#endif
