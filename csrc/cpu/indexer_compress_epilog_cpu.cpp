// CPU backend of custom::indexer_compress_epilog (docs/SPEC.md).
//
// This file is the whole CPU op: argument checks (the messages and error classes of
// vllm_indexer_epilog/op/validation.py), the slot scan (range, duplicates), and the kernel. Python
// registers `indexer_compress_epilog_boxed` as the CPU kernel of custom::indexer_compress_epilog through
// vie_register_cpu_kernel(), so a decode-size call pays the dispatcher and nothing else.
// The cache and scale are two contiguous tensors or a packed-block pair (op/geometry.py: two strided views
// of one page buffer), told apart by their strides as validation.py does.
// Rows are split across threads; each group of 128 elements is read from x once into a float buffer
// that stays in L1, reduced to its scale, then encoded and stored.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__SSE__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "fp8_codec.h"
#include "hif8_codec.h"

namespace vie {
namespace {

enum class ScaleRule { kStandard, kMxCeil, kMxFloor };

template <typename T>
VIE_INLINE float to_f32(T v) {
  return static_cast<float>(v);
}
template <>
VIE_INLINE float to_f32<c10::BFloat16>(c10::BFloat16 v) {
  return bits_f32(uint32_t(v.x) << 16);
}

// Widens one group into `buf`. fp16 uses F16C 8 lanes at a time: c10::Half's scalar conversion would
// keep the surrounding loop from vectorizing.
template <typename In>
VIE_INLINE void widen(const In* __restrict src, int n, float* __restrict buf) {
  for (int i = 0; i < n; ++i) buf[i] = to_f32(src[i]);
}
#ifdef __F16C__
template <>
VIE_INLINE void widen<c10::Half>(const c10::Half* __restrict src, int n, float* __restrict buf) {
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  for (; i < n; ++i) buf[i] = to_f32(src[i]);
}
#endif

// The scale of one group, from its finite amax: what is stored, and what multiplies or divides x.
struct CodeTable;
struct GroupScale {
  float divisor;     // standard mode: S (x / S)
  float multiplier;  // MX: 2^-e (x * 2^-e rounds exactly like x / 2^e); standard: RN(1/S) where the
                     // vector path divides through it (reciprocal_quotient), else unused
  uint8_t e8m0;      // MX: the stored byte e + 127
  // Standard mode, bf16 groups on the table path (Quotient::kTable): the table of S's significand and the
  // byte that moves it to the group's exponent.
  const CodeTable* table = nullptr;
  uint8_t code_bias = 0;
};

template <typename Fmt, ScaleRule Rule>
VIE_INLINE GroupScale group_scale(uint32_t amax_bits) {
  if constexpr (Rule == ScaleRule::kStandard) {
    return {bits_f32(amax_bits) / bits_f32(Fmt::kFmaxBits), 0.0f, 0};
  } else {
    const int32_t e = mx_exponent<Fmt, Rule == ScaleRule::kMxCeil>(amax_bits);
    return {0.0f, bits_f32(uint32_t(127 - e) << 23), uint8_t(e + 127)};
  }
}

template <typename Fmt, ScaleRule Rule>
VIE_INLINE void store_scale(const GroupScale& gs, float* scale_f32, uint8_t* scale_e8m0) {
  if constexpr (Rule == ScaleRule::kStandard) {
    *scale_f32 = gs.divisor;
  } else {
    *scale_e8m0 = gs.e8m0;
  }
}

// Portable path (tail groups, and CPUs without AVX2): plain loops that GCC vectorizes.
template <typename In, typename Fmt, ScaleRule Rule>
void quantize_group_generic(const In* __restrict src, int n, uint8_t* __restrict dst, float* scale_f32,
                            uint8_t* scale_e8m0) {
  alignas(64) float buf[kGroupSize];
  widen(src, n, buf);
  // Non-negative floats order like their bits; non-finite magnitudes are left out of the max.
  // (GCC does not vectorize this reduction on its own.)
  int32_t amax_i = 0;
#pragma omp simd reduction(max : amax_i)
  for (int i = 0; i < n; ++i) {
    const int32_t mag = int32_t(f32_bits(buf[i]) & 0x7FFFFFFFu);
    const int32_t fin = mag < 0x7F800000 ? mag : 0;
    amax_i = fin > amax_i ? fin : amax_i;
  }
  const GroupScale gs = group_scale<Fmt, Rule>(uint32_t(amax_i));
  store_scale<Fmt, Rule>(gs, scale_f32, scale_e8m0);
  if constexpr (Rule == ScaleRule::kStandard) {
    if (gs.divisor == 0.0f) {
      // Nothing to scale: finite elements are 0x00, Inf saturates, NaN stays NaN.
      for (int i = 0; i < n; ++i) {
        const uint32_t mag = f32_bits(buf[i]) & 0x7FFFFFFFu;
        dst[i] = mag < 0x7F800000u ? uint8_t(0) : encode_fp8<Fmt>(buf[i]);
      }
      return;
    }
    const float s = gs.divisor;
#pragma omp simd
    for (int i = 0; i < n; ++i) dst[i] = encode_fp8<Fmt>(buf[i] / s);  // correctly rounded division
  } else {
    const float inv = gs.multiplier;
#pragma omp simd
    for (int i = 0; i < n; ++i) dst[i] = encode_fp8<Fmt>(buf[i] * inv);
  }
}

// ---- Vector paths: AVX-512 (F/BW/VL) where the compiler targets it, else AVX2 ----------------------
// One body for full groups (stats, scale, quotient, encode) written against a small set of lane operations;
// each ISA supplies those and its own load/narrow/store of a block of codes. -march=native picks the ISA,
// and the build key holds the host's CPU flags, so an AVX-512 host gets its own build. AVX512_BF16 is not
// used: its instructions narrow float32 to bf16 (and dot products), while widening bf16 is a 16-bit shift.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define VIE_AVX512 1
constexpr const char* kIsa = "avx512";
#elif defined(__AVX2__)
constexpr const char* kIsa = "avx2";
#else
constexpr const char* kIsa = "portable";
#endif

#ifdef __AVX2__
// How a group's codes are formed: MX multiplies by 2^-e (exact wherever x / 2^e is, and rounds like it
// where the product is subnormal, being the same real number); standard mode looks bf16 codes up in a
// CodeTable where its conditions hold (kTable, no float arithmetic per element), else uses
// reciprocal_quotient() where fp8_codec.h says it is exact, and vdivps elsewhere.
enum class Quotient { kMultiply, kReciprocal, kDivide, kTable };

// Standard mode's codes of bf16 inputs without float arithmetic per element. For a group whose amax is a
// normal bf16 (1 + a/128) 2^A with S = RN(amax / FMAX) normal, S is RN((1 + a/128) / FMAX) 2^A, so the code
// of a normal x = (1 + m/128) 2^E is a function of (a, m) plus 2^mant (E - A) wherever the code is a normal
// fp8 value (scaling by a power of two commutes with both roundings there). For fixed a the code grows with
// m by at most one step per 8 consecutive m (8 m's span under 1/16 of a binade; fp8 steps are at least
// 1/15 of one, 1/7 for e5m2), so per bucket b = m >> 3 a base code and a threshold on m & 7 give it: two
// 16-entry byte lookups, one per vector. One table per a and format, built once from the scalar encoder.
struct CodeTable {
  alignas(16) uint8_t base[16];  // code of m = 8b + 7 at the reference exponent, less (m >> (7 - mant))
                                 // and the reference exponent's 2^mant E term (mod 256)
  alignas(16) uint8_t thr[16];   // m & 7 below which the code is one less (0: none)
};

template <typename Fmt>
struct CodeTables {
  CodeTable by_a[128];
  bool usable;  // every bucket had at most one step (checked, not assumed)
};

// The reference group: amax exponent field 127, x one binade below (every quotient a normal fp8 value).
constexpr int32_t kTableRefExp = 126;

template <typename Fmt>
CodeTables<Fmt> build_code_tables() {
  CodeTables<Fmt> t{};
  t.usable = true;
  for (uint32_t a = 0; a < 128; ++a) {
    const float s = bits_f32((127u << 23) | (a << 16)) / bits_f32(Fmt::kFmaxBits);
    uint8_t code[128];
    for (uint32_t m = 0; m < 128; ++m) code[m] = encode_fp8<Fmt>(bits_f32((uint32_t(kTableRefExp) << 23) | (m << 16)) / s);
    for (int b = 0; b < 16; ++b) {
      const uint8_t top = code[8 * b + 7];
      int thr = 0;
      for (int j = 0; j < 8; ++j) thr = code[8 * b + j] != top ? j + 1 : thr;
      for (int j = 0; j < 8; ++j) t.usable &= code[8 * b + j] == top - (j < thr ? 1 : 0);
      t.by_a[a].base[b] = uint8_t(top - ((8 * b + 7) >> (7 - Fmt::kMant)) - (kTableRefExp << Fmt::kMant));
      t.by_a[a].thr[b] = uint8_t(thr);
    }
  }
  return t;
}

template <typename Fmt>
const CodeTables<Fmt>& code_tables() {
  static const CodeTables<Fmt> tables = build_code_tables<Fmt>();
  return tables;
}

struct Avx2 {
  using F = __m256;
  using I = __m256i;
  static constexpr int kLanes = 8;
  static constexpr int kBlock = 32;  // inputs per encode_block
  static constexpr uintptr_t kStreamAlign = 32;

  static VIE_INLINE I splat(int32_t v) { return _mm256_set1_epi32(v); }
  static VIE_INLINE I splat16(int16_t v) { return _mm256_set1_epi16(v); }
  static VIE_INLINE F splatf(float v) { return _mm256_set1_ps(v); }
  static VIE_INLINE I bits(F v) { return _mm256_castps_si256(v); }
  static VIE_INLINE F flt(I v) { return _mm256_castsi256_ps(v); }
  static VIE_INLINE I zero() { return _mm256_setzero_si256(); }
  static VIE_INLINE I load(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
  static VIE_INLINE I and_(I a, I b) { return _mm256_and_si256(a, b); }
  static VIE_INLINE I or_(I a, I b) { return _mm256_or_si256(a, b); }
  static VIE_INLINE I add(I a, I b) { return _mm256_add_epi32(a, b); }
  static VIE_INLINE I sub(I a, I b) { return _mm256_sub_epi32(a, b); }
  static VIE_INLINE I min(I a, I b) { return _mm256_min_epi32(a, b); }
  static VIE_INLINE I max(I a, I b) { return _mm256_max_epi32(a, b); }
  static VIE_INLINE I add16(I a, I b) { return _mm256_add_epi16(a, b); }
  static VIE_INLINE I min16(I a, I b) { return _mm256_min_epi16(a, b); }
  static VIE_INLINE I max16(I a, I b) { return _mm256_max_epi16(a, b); }
  static VIE_INLINE I add8(I a, I b) { return _mm256_add_epi8(a, b); }
  static VIE_INLINE I splat8(uint8_t v) { return _mm256_set1_epi8(char(v)); }
  // 16 bytes in every 128-bit lane; lookup() indexes them by each byte's low 4 bits.
  static VIE_INLINE I table16(const uint8_t* p) {
    return _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static VIE_INLINE I lookup(I table, I idx) { return _mm256_shuffle_epi8(table, idx); }
  // v - 1 in each byte where a > b (signed bytes)
  static VIE_INLINE I dec8_where_gt(I v, I a, I b) { return _mm256_add_epi8(v, _mm256_cmpgt_epi8(a, b)); }
  template <int K>
  static VIE_INLINE I srl(I a) { return _mm256_srli_epi32(a, K); }
  template <int K>
  static VIE_INLINE I srl16(I a) { return _mm256_srli_epi16(a, K); }
  static VIE_INLINE F addf(F a, F b) { return _mm256_add_ps(a, b); }
  static VIE_INLINE F mulf(F a, F b) { return _mm256_mul_ps(a, b); }
  static VIE_INLINE F divf(F a, F b) { return _mm256_div_ps(a, b); }
#ifdef __FMA__
  static VIE_INLINE F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static VIE_INLINE F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
#endif
  // a > b (signed) ? t : f, per lane
  static VIE_INLINE I select_gt(I a, I b, I t, I f) { return _mm256_blendv_epi8(f, t, _mm256_cmpgt_epi32(a, b)); }
  static VIE_INLINE int32_t hmax(I v) {
    __m128i m = _mm_max_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0x4E));
    m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0xB1));
    return _mm_cvtsi128_si32(m);
  }
  static VIE_INLINE int32_t hmin(I v) {
    __m128i m = _mm_min_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    m = _mm_min_epi32(m, _mm_shuffle_epi32(m, 0x4E));
    m = _mm_min_epi32(m, _mm_shuffle_epi32(m, 0xB1));
    return _mm_cvtsi128_si32(m);
  }
  static VIE_INLINE bool any_negative32(I v) { return _mm256_movemask_ps(flt(v)) != 0; }
  static VIE_INLINE bool any_negative16(I v) { return (_mm256_movemask_epi8(v) & 0xAAAAAAAA) != 0; }

  // 16 inputs as two vectors whose lanes the 32 -> 16-bit pack puts back in order. bf16 widens by
  // interleaving zero halves (one op per 8 lanes), an order _mm256_packs_epi32 undoes, as it works within
  // 128-bit lanes; other types are reordered to [0-3 | 8-11] and [4-7 | 12-15] for the same pack.
  template <typename In>
  static VIE_INLINE void load_pair(const In* p, F& a, F& b) {
    if constexpr (std::is_same_v<In, c10::BFloat16>) {
      const I v = load(p);
      a = flt(_mm256_unpacklo_epi16(zero(), v));
      b = flt(_mm256_unpackhi_epi16(zero(), v));
    } else {
      F lo, hi;
      if constexpr (std::is_same_v<In, c10::Half>) {
        lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
        hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
      } else {
        lo = _mm256_loadu_ps(p);
        hi = _mm256_loadu_ps(p + 8);
      }
      a = _mm256_permute2f128_ps(lo, hi, 0x20);
      b = _mm256_permute2f128_ps(lo, hi, 0x31);
    }
  }

  // Codes of kBlock inputs: each packs_epi32 yields 16 codes in order; packus_epi16 interleaves the two by
  // 128-bit lane, which the 64-bit permute undoes. Codes are 0..255, so both packs are exact.
  template <typename In, typename Enc>
  static VIE_INLINE void encode_block(const In* src, uint8_t* dst, Enc enc, bool stream) {
    F a0, b0, a1, b1;
    load_pair(src, a0, b0);
    load_pair(src + 16, a1, b1);
    const I p0 = _mm256_packs_epi32(enc(a0), enc(b0));
    const I p1 = _mm256_packs_epi32(enc(a1), enc(b1));
    const I ordered = _mm256_permute4x64_epi64(_mm256_packus_epi16(p0, p1), 0xD8);
    if (stream) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), ordered);
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), ordered);
    }
  }

  // bf16 inputs whose codes come from their raw 16-bit words (MX's exponent shift, standard mode's tables),
  // twice the lanes and no widening or 32 -> 16-bit pack: `enc16` maps raw words to codes without sign
  // (0..255 in each 16-bit lane). The packs order codes and signs alike.
  template <typename Enc16>
  static VIE_INLINE void encode_block_words(const c10::BFloat16* src, uint8_t* dst, Enc16 enc16, bool stream) {
    const I r0 = load(src), r1 = load(src + 16);
    const I signs = and_(_mm256_packus_epi16(_mm256_srli_epi16(r0, 8), _mm256_srli_epi16(r1, 8)),
                         _mm256_set1_epi8(char(0x80)));
    const I codes = _mm256_packus_epi16(enc16(r0), enc16(r1));
    const I ordered = _mm256_permute4x64_epi64(or_(codes, signs), 0xD8);
    if (stream) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), ordered);
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), ordered);
    }
  }

  // The fast block of 16-bit inputs (finite groups whose codes are all normal): `enc` gets |x| and returns
  // codes without sign, and the sign bytes come from the raw inputs' high bytes in one pack, which orders
  // them as packus_epi16 orders the codes. That saves the per-lane sign work (3 ops per 8 inputs) for 5 per
  // 32. fp16 skips load_pair's 128-bit reordering: the codes come out in 32-bit chunks [0 2 4 6 1 3 5 7],
  // which one dword permute undoes, and the signs then take bf16's order fix separately.
  template <typename In, typename Enc>
  static VIE_INLINE void encode_block_fast(const In* src, uint8_t* dst, Enc enc, bool stream) {
    const I abs_mask = splat16(0x7FFF);
    const I r0 = load(src), r1 = load(src + 16);
    const I signs = and_(_mm256_packus_epi16(_mm256_srli_epi16(r0, 8), _mm256_srli_epi16(r1, 8)),
                         _mm256_set1_epi8(char(0x80)));
    const I m0 = and_(r0, abs_mask), m1 = and_(r1, abs_mask);
    I ordered;
    if constexpr (std::is_same_v<In, c10::BFloat16>) {
      const I p0 = _mm256_packs_epi32(enc(flt(_mm256_unpacklo_epi16(zero(), m0))), enc(flt(_mm256_unpackhi_epi16(zero(), m0))));
      const I p1 = _mm256_packs_epi32(enc(flt(_mm256_unpacklo_epi16(zero(), m1))), enc(flt(_mm256_unpackhi_epi16(zero(), m1))));
      ordered = _mm256_permute4x64_epi64(or_(_mm256_packus_epi16(p0, p1), signs), 0xD8);
    } else {
      const I p0 = _mm256_packs_epi32(enc(_mm256_cvtph_ps(_mm256_castsi256_si128(m0))),
                                      enc(_mm256_cvtph_ps(_mm256_extracti128_si256(m0, 1))));
      const I p1 = _mm256_packs_epi32(enc(_mm256_cvtph_ps(_mm256_castsi256_si128(m1))),
                                      enc(_mm256_cvtph_ps(_mm256_extracti128_si256(m1, 1))));
      const I codes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(p0, p1), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      ordered = or_(codes, _mm256_permute4x64_epi64(signs, 0xD8));
    }
    if (stream) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), ordered);
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), ordered);
    }
  }
};

#ifdef VIE_AVX512
struct Avx512 {
  using F = __m512;
  using I = __m512i;
  static constexpr int kLanes = 16;
  static constexpr int kBlock = 64;
  static constexpr uintptr_t kStreamAlign = 64;

  static VIE_INLINE I splat(int32_t v) { return _mm512_set1_epi32(v); }
  static VIE_INLINE I splat16(int16_t v) { return _mm512_set1_epi16(v); }
  static VIE_INLINE F splatf(float v) { return _mm512_set1_ps(v); }
  static VIE_INLINE I bits(F v) { return _mm512_castps_si512(v); }
  static VIE_INLINE F flt(I v) { return _mm512_castsi512_ps(v); }
  static VIE_INLINE I zero() { return _mm512_setzero_si512(); }
  static VIE_INLINE I load(const void* p) { return _mm512_loadu_si512(p); }
  static VIE_INLINE I and_(I a, I b) { return _mm512_and_si512(a, b); }
  static VIE_INLINE I or_(I a, I b) { return _mm512_or_si512(a, b); }
  static VIE_INLINE I add(I a, I b) { return _mm512_add_epi32(a, b); }
  static VIE_INLINE I sub(I a, I b) { return _mm512_sub_epi32(a, b); }
  static VIE_INLINE I min(I a, I b) { return _mm512_min_epi32(a, b); }
  static VIE_INLINE I max(I a, I b) { return _mm512_max_epi32(a, b); }
  static VIE_INLINE I add16(I a, I b) { return _mm512_add_epi16(a, b); }
  static VIE_INLINE I min16(I a, I b) { return _mm512_min_epi16(a, b); }
  static VIE_INLINE I max16(I a, I b) { return _mm512_max_epi16(a, b); }
  static VIE_INLINE I add8(I a, I b) { return _mm512_add_epi8(a, b); }
  static VIE_INLINE I splat8(uint8_t v) { return _mm512_set1_epi8(char(v)); }
  static VIE_INLINE I table16(const uint8_t* p) {
    return _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static VIE_INLINE I lookup(I table, I idx) { return _mm512_shuffle_epi8(table, idx); }
  static VIE_INLINE I dec8_where_gt(I v, I a, I b) {
    return _mm512_mask_sub_epi8(v, _mm512_cmpgt_epi8_mask(a, b), v, _mm512_set1_epi8(1));
  }
  template <int K>
  static VIE_INLINE I srl(I a) { return _mm512_srli_epi32(a, K); }
  template <int K>
  static VIE_INLINE I srl16(I a) { return _mm512_srli_epi16(a, K); }
  static VIE_INLINE F addf(F a, F b) { return _mm512_add_ps(a, b); }
  static VIE_INLINE F mulf(F a, F b) { return _mm512_mul_ps(a, b); }
  static VIE_INLINE F divf(F a, F b) { return _mm512_div_ps(a, b); }
  static VIE_INLINE F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static VIE_INLINE F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  static VIE_INLINE I select_gt(I a, I b, I t, I f) { return _mm512_mask_blend_epi32(_mm512_cmpgt_epi32_mask(a, b), f, t); }
  static VIE_INLINE int32_t hmax(I v) { return _mm512_reduce_max_epi32(v); }
  static VIE_INLINE int32_t hmin(I v) { return _mm512_reduce_min_epi32(v); }
  static VIE_INLINE bool any_negative32(I v) { return _mm512_cmplt_epi32_mask(v, zero()) != 0; }
  static VIE_INLINE bool any_negative16(I v) { return _mm512_movepi16_mask(v) != 0; }

  // 32 inputs as two vectors in the lane order that the 32 -> 16-bit pack (per 128-bit lane) restores:
  // lane k of `a` holds inputs 8k..8k+3, of `b` 8k+4..8k+7. bf16's zero interleave gives exactly that;
  // other types pick 128-bit lanes of two 16-lane loads.
  template <typename In>
  static VIE_INLINE void load_pair(const In* p, F& a, F& b) {
    if constexpr (std::is_same_v<In, c10::BFloat16>) {
      const I v = load(p);
      a = flt(_mm512_unpacklo_epi16(zero(), v));
      b = flt(_mm512_unpackhi_epi16(zero(), v));
    } else {
      F lo, hi;
      if constexpr (std::is_same_v<In, c10::Half>) {
        lo = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
        hi = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16)));
      } else {
        lo = _mm512_loadu_ps(p);
        hi = _mm512_loadu_ps(p + 16);
      }
      a = _mm512_shuffle_f32x4(lo, hi, _MM_SHUFFLE(2, 0, 2, 0));
      b = _mm512_shuffle_f32x4(lo, hi, _MM_SHUFFLE(3, 1, 3, 1));
    }
  }

  // As Avx2::encode_block, twice as wide: after the two packs, 64-bit word 2k holds inputs 8k..8k+7 and
  // word 2k+1 inputs 32+8k..; one permute puts them in order.
  template <typename In, typename Enc>
  static VIE_INLINE void encode_block(const In* src, uint8_t* dst, Enc enc, bool stream) {
    F a0, b0, a1, b1;
    load_pair(src, a0, b0);
    load_pair(src + 32, a1, b1);
    const I p0 = _mm512_packs_epi32(enc(a0), enc(b0));
    const I p1 = _mm512_packs_epi32(enc(a1), enc(b1));
    const I ordered = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7), _mm512_packus_epi16(p0, p1));
    if (stream) {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), ordered);
    } else {
      _mm512_storeu_si512(dst, ordered);
    }
  }

  // As Avx2::encode_block_words.
  template <typename Enc16>
  static VIE_INLINE void encode_block_words(const c10::BFloat16* src, uint8_t* dst, Enc16 enc16, bool stream) {
    const I r0 = load(src), r1 = load(src + 32);
    const I signs = and_(_mm512_packus_epi16(_mm512_srli_epi16(r0, 8), _mm512_srli_epi16(r1, 8)),
                         _mm512_set1_epi8(char(0x80)));
    const I codes = _mm512_packus_epi16(enc16(r0), enc16(r1));
    const I ordered = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7), or_(codes, signs));
    if (stream) {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), ordered);
    } else {
      _mm512_storeu_si512(dst, ordered);
    }
  }

  // As Avx2::encode_block_fast. fp16's codes come out in 32-bit chunks at position 4 (m % 4) + m / 4.
  template <typename In, typename Enc>
  static VIE_INLINE void encode_block_fast(const In* src, uint8_t* dst, Enc enc, bool stream) {
    const I abs_mask = splat16(0x7FFF);
    const I r0 = load(src), r1 = load(src + 32);
    const I signs = and_(_mm512_packus_epi16(_mm512_srli_epi16(r0, 8), _mm512_srli_epi16(r1, 8)),
                         _mm512_set1_epi8(char(0x80)));
    const I m0 = and_(r0, abs_mask), m1 = and_(r1, abs_mask);
    const I qword_order = _mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7);
    I ordered;
    if constexpr (std::is_same_v<In, c10::BFloat16>) {
      const I p0 = _mm512_packs_epi32(enc(flt(_mm512_unpacklo_epi16(zero(), m0))), enc(flt(_mm512_unpackhi_epi16(zero(), m0))));
      const I p1 = _mm512_packs_epi32(enc(flt(_mm512_unpacklo_epi16(zero(), m1))), enc(flt(_mm512_unpackhi_epi16(zero(), m1))));
      ordered = _mm512_permutexvar_epi64(qword_order, or_(_mm512_packus_epi16(p0, p1), signs));
    } else {
      const I p0 = _mm512_packs_epi32(enc(_mm512_cvtph_ps(_mm512_castsi512_si256(m0))),
                                      enc(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(m0, 1))));
      const I p1 = _mm512_packs_epi32(enc(_mm512_cvtph_ps(_mm512_castsi512_si256(m1))),
                                      enc(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(m1, 1))));
      const I chunk_order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
      const I codes = _mm512_permutexvar_epi32(chunk_order, _mm512_packus_epi16(p0, p1));
      ordered = or_(codes, _mm512_permutexvar_epi64(qword_order, signs));
    }
    if (stream) {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), ordered);
    } else {
      _mm512_storeu_si512(dst, ordered);
    }
  }
};
using Simd = Avx512;
#else
using Simd = Avx2;
#endif

// encode_fp8 on a vector. Checked handles everything (subnormals, NaN) like the scalar encoder; without
// it, lanes must be finite with |q| >= the smallest normal fp8 value. Without Saturate, lanes must also
// have |q| <= FMAX. Signed takes the sign bit from `sign` (q's bits, or x's where q may have lost it);
// otherwise q >= 0 and the caller adds the sign.
template <typename V, typename Fmt, bool Checked, bool Saturate, bool Signed>
VIE_INLINE typename V::I encode_lanes(typename V::F q, typename V::I sign) {
  constexpr int kDrop = 23 - Fmt::kMant;
  const auto mag = Signed ? V::and_(V::bits(q), V::splat(0x7FFFFFFF)) : V::bits(q);
  const auto odd = V::and_(V::template srl<kDrop>(mag), V::splat(1));
  // Round to nearest even at bit kDrop and rebias the exponent in one add: the result is the code for
  // every normal fp8 magnitude (smaller ones wrap, and Checked replaces them).
  constexpr int32_t kRoundRebias = int32_t((1u << (kDrop - 1)) - 1 - (uint32_t(127 - Fmt::kBias) << 23));
  auto code = V::template srl<kDrop>(V::add(V::add(mag, V::splat(kRoundRebias)), odd));
  if constexpr (Saturate) code = V::min(code, V::splat(Fmt::kMaxCode));
  if constexpr (Checked) {
    constexpr int32_t kMagicBits = int32_t(127 + 23 + 1 - Fmt::kBias - Fmt::kMant) << 23;
    const auto sum = V::addf(V::flt(mag), V::flt(V::splat(kMagicBits)));
    const auto sub = V::sub(V::bits(sum), V::splat(kMagicBits));
    code = V::select_gt(V::splat(int32_t(Fmt::kMinNormalBits)), mag, sub, code);
  }
  if constexpr (Signed) code = V::or_(code, V::template srl<24>(V::and_(sign, V::splat(int32_t(0x80000000u)))));
  if constexpr (Checked) code = V::select_gt(mag, V::splat(0x7F800000), V::splat(kNanCode), code);
  return code;
}

template <typename V, typename In, typename Fmt, Quotient Q, bool Checked, bool Saturate>
VIE_INLINE void encode_group_simd(const In* __restrict src, uint8_t* __restrict dst, const GroupScale& gs,
                                  bool stream) {
  using F = typename V::F;
  // Unchecked groups of 16-bit inputs encode magnitudes and take the signs from the raw inputs.
  constexpr bool kSigned = Checked || std::is_same_v<In, float>;
  const F s = V::splatf(gs.divisor), m = V::splatf(gs.multiplier);
  auto enc = [&](F x) {
    if constexpr (Q == Quotient::kMultiply) {
      const F q = V::mulf(x, m);
      return encode_lanes<V, Fmt, Checked, Saturate, kSigned>(q, V::bits(q));
    } else if constexpr (Q == Quotient::kReciprocal) {
      const F q0 = V::mulf(x, m);
      const F q = V::fmadd(V::fnmadd(q0, s, x), m, q0);
      return encode_lanes<V, Fmt, Checked, Saturate, kSigned>(q, V::bits(x));
    } else {
      const F q = V::divf(x, s);
      return encode_lanes<V, Fmt, Checked, Saturate, kSigned>(q, V::bits(q));
    }
  };
  if constexpr (Q == Quotient::kMultiply && !Checked && std::is_same_v<In, c10::BFloat16>) {
    // encode_lanes' rounding on bf16 words: drop 7 - m mantissa bits to nearest even, and in the same add
    // lower the exponent by e (the multiply) and rebias it (all mod 2^16: the true sum is a small positive
    // code << kDrop16, since every |q| is a normal fp8 value, or above FMAX when Saturate).
    constexpr int kDrop16 = 7 - Fmt::kMant;
    const int32_t e = int32_t(gs.e8m0) - 127;
    const auto add = V::splat16(int16_t(uint16_t(
        uint32_t((1 << (kDrop16 - 1)) - 1) - (uint32_t(e) << 7) - (uint32_t(127 - Fmt::kBias) << 7))));
    auto enc16 = [&](typename V::I raw) {
      const auto mag = V::and_(raw, V::splat16(0x7FFF));
      const auto odd = V::and_(V::template srl16<kDrop16>(mag), V::splat16(1));
      auto code = V::template srl16<kDrop16>(V::add16(V::add16(mag, add), odd));
      if constexpr (Saturate) code = V::min16(code, V::splat16(Fmt::kMaxCode));
      return code;
    };
    for (int i = 0; i < kGroupSize; i += V::kBlock) V::encode_block_words(src + i, dst + i, enc16, stream);
    return;
  }
  if constexpr (Q == Quotient::kTable) {
    static_assert(!Checked && !Saturate && std::is_same_v<In, c10::BFloat16>, "the table path: plain bf16 groups");
    // code = (raw >> (7 - mant)) + base[b] + bias - [m & 7 < thr[b]] in the low byte of each lane: the
    // shift gives 2^mant E + (m >> (7 - mant)) (the sign lands in the high byte, as do the lookups' bytes
    // for the index's zero high byte), and the byte arithmetic is exact mod 256 since codes are 0..255.
    const auto base = V::add8(V::table16(gs.table->base), V::splat8(gs.code_bias));
    const auto thr = V::table16(gs.table->thr);
    auto enc16 = [&](typename V::I raw) {
      const auto idx = V::and_(V::template srl16<3>(raw), V::splat16(0x000F));
      auto code = V::add16(V::template srl16<7 - Fmt::kMant>(raw), V::lookup(base, idx));
      code = V::and_(V::dec8_where_gt(code, V::lookup(thr, idx), V::and_(raw, V::splat16(0x0007))), V::splat16(0x00FF));
      return code;
    };
    for (int i = 0; i < kGroupSize; i += V::kBlock) V::encode_block_words(src + i, dst + i, enc16, stream);
    return;
  }
  for (int i = 0; i < kGroupSize; i += V::kBlock) {
    if constexpr (kSigned) {
      V::encode_block(src + i, dst + i, enc, stream);
    } else {
      V::encode_block_fast(src + i, dst + i, enc, stream);
    }
  }
}

// What the encode pass needs to know about a group's inputs, as float32 bits.
struct GroupStats {
  uint32_t amax_bits;  // max |x| over finite elements (0 if none)
  uint32_t min_bits;   // min |x| over all elements
  bool nonfinite;      // any Inf or NaN
};

// Adding 2^k (k: the format's lowest exponent bit) to a magnitude keeps finite values positive and
// turns Inf/NaN negative, so one signed max gives the finite amax and the sign bits of an OR tell
// whether any element was not finite.
template <typename V, typename In>
VIE_INLINE GroupStats group_stats_simd(const In* __restrict src) {
  using I = typename V::I;
  if constexpr (std::is_same_v<In, float>) {
    const I bias = V::splat(0x00800000), abs_mask = V::splat(0x7FFFFFFF);
    I acc = bias, any = V::zero(), mn = abs_mask;
    for (int i = 0; i < kGroupSize; i += V::kLanes) {
      const I mag = V::and_(V::load(src + i), abs_mask);
      const I t = V::add(mag, bias);
      acc = V::max(acc, t);
      any = V::or_(any, t);
      mn = V::min(mn, mag);
    }
    return {uint32_t(V::hmax(acc) - 0x00800000), uint32_t(V::hmin(mn)), V::any_negative32(any)};
  } else {
    // 16-bit inputs: magnitudes order like their bits too, so the pass runs on raw bits, twice the lanes,
    // and only the two results are widened.
    constexpr int16_t kBias = std::is_same_v<In, c10::BFloat16> ? 0x0080 : 0x0400;
    const I bias = V::splat16(kBias), abs_mask = V::splat16(0x7FFF);
    I acc = bias, any = V::zero(), mn = abs_mask;
    for (int i = 0; i < kGroupSize; i += 2 * V::kLanes) {
      const I mag = V::and_(V::load(src + i), abs_mask);
      const I t = V::add16(mag, bias);
      acc = V::max16(acc, t);
      any = V::or_(any, t);
      mn = V::min16(mn, mag);
    }
    // Values are non-negative once the bias is gone: widen both halves to 32 bits and reduce.
    const I lo_mask = V::splat(0xFFFF);
    const I acc32 = V::max(V::and_(acc, lo_mask), V::template srl<16>(acc));
    const I mn32 = V::min(V::and_(mn, lo_mask), V::template srl<16>(mn));
    In a, m;
    a.x = uint16_t(V::hmax(acc32) - kBias);
    m.x = uint16_t(V::hmin(mn32));
    return {f32_bits(to_f32(a)), f32_bits(to_f32(m)), V::any_negative16(any)};
  }
}

// A group's encode is decided by a serial chain (amax reduction, scale division, reciprocal, two scalar
// quotients, a branch) that is long next to the encode itself; run group by group, the core mostly waits on
// it. So the kernel plans a batch of groups first (their chains are independent and overlap), then encodes
// them: x is read twice either way, the second time from L1.
enum class Variant : uint8_t { kDone, kChecked, kSaturate, kPlain };

struct GroupPlan {
  GroupScale gs;
  Variant variant;
  Quotient quotient;
};

// Writes `p` field by field: a plan built as a temporary and copied into the batch was stored in pieces
// and reloaded whole, a store-forwarding stall per group that cost about 15% of the kernel's time.
template <typename V, typename In, typename Fmt, ScaleRule Rule>
VIE_INLINE void plan_group_simd(const In* __restrict src, uint8_t* __restrict dst, float* scale_f32,
                                uint8_t* scale_e8m0, const CodeTables<Fmt>* tables, GroupPlan& p) {
  const GroupStats st = group_stats_simd<V>(src);
  p.variant = Variant::kPlain;
  if constexpr (Rule == ScaleRule::kStandard && std::is_same_v<In, c10::BFloat16>) {
    // CodeTable's conditions, decided on integer bits alone so that nothing in the plan waits for the
    // scale's division (its latency was the d = 128 plan's critical path): a finite group; amax >=
    // 2^(emax + 1 - 64), so S > 2^-64 (normal, and RN(amax / FMAX) scales with amax's exponent); min within
    // kTableMargin binades of amax, so every min / S > 2^-(margin + 1) FMAX = 1.75 * 2^(1 - bias), above
    // fp8's smallest normal. No code can pass FMAX's: the largest quotient is FMAX within float32 rounding.
    // Other groups take the quotient checks below.
    constexpr uint32_t kTableMargin = uint32_t(Fmt::kEmax + Fmt::kBias - 2);
    constexpr uint32_t kTableMinAmaxExp = uint32_t(127 - 64 + Fmt::kEmax + 1);
    const uint32_t amax_exp = st.amax_bits >> 23;
    if (tables != nullptr && !st.nonfinite && amax_exp >= kTableMinAmaxExp &&
        (st.min_bits >> 23) + kTableMargin >= amax_exp) {
      store_scale<Fmt, Rule>(group_scale<Fmt, Rule>(st.amax_bits), scale_f32, scale_e8m0);
      p.gs.table = &tables->by_a[(st.amax_bits >> 16) & 0x7F];
      p.gs.code_bias = uint8_t(uint32_t(kTableRefExp + 1 - int32_t(amax_exp)) << Fmt::kMant);
      p.quotient = Quotient::kTable;
      return;
    }
  }
  p.gs = group_scale<Fmt, Rule>(st.amax_bits);
  p.quotient = Quotient::kMultiply;
  if constexpr (Rule == ScaleRule::kStandard) {
    if (p.gs.divisor == 0.0f) {  // rare: encoded at once by the scalar path
      quantize_group_generic<In, Fmt, Rule>(src, kGroupSize, dst, scale_f32, scale_e8m0);
      p.variant = Variant::kDone;
      return;
    }
    p.quotient = Quotient::kDivide;
#ifdef __FMA__
    // Where fp8_codec.h's reciprocal_quotient() is proven exact: one division per group, not per element.
    if (!std::is_same_v<In, float> && !st.nonfinite && f32_bits(p.gs.divisor) >= kReciprocalMinScaleBits) {
      p.gs.multiplier = 1.0f / p.gs.divisor;
      p.quotient = Quotient::kReciprocal;
    }
#endif
  }
  store_scale<Fmt, Rule>(p.gs, scale_f32, scale_e8m0);
  auto quotient = [&](uint32_t x_bits) {
    const float x = bits_f32(x_bits);
    if (p.quotient == Quotient::kMultiply) return x * p.gs.multiplier;
    if (p.quotient == Quotient::kReciprocal) return reciprocal_quotient(x, p.gs.divisor, p.gs.multiplier);
    return x / p.gs.divisor;
  };
  // Scaling is monotonic, so if the smallest magnitude lands in fp8's normal range, all do.
  if (st.nonfinite || f32_bits(quotient(st.min_bits)) < Fmt::kMinNormalBits) {
    p.variant = Variant::kChecked;
    return;
  }
  if (f32_bits(quotient(st.amax_bits)) > Fmt::kFmaxBits) {  // S rounded below amax / FMAX, or OCP floor
    p.variant = Variant::kSaturate;
  }
}

template <typename V, typename In, typename Fmt, Quotient Q>
VIE_INLINE void encode_planned_q(const In* src, uint8_t* dst, const GroupPlan& p, bool stream) {
  switch (p.variant) {
    case Variant::kChecked: return encode_group_simd<V, In, Fmt, Q, true, true>(src, dst, p.gs, stream);
    case Variant::kSaturate: return encode_group_simd<V, In, Fmt, Q, false, true>(src, dst, p.gs, stream);
    case Variant::kPlain: return encode_group_simd<V, In, Fmt, Q, false, false>(src, dst, p.gs, stream);
    case Variant::kDone: return;
  }
}

template <typename V, typename In, typename Fmt, ScaleRule Rule>
VIE_INLINE void encode_planned(const In* src, uint8_t* dst, const GroupPlan& p, bool stream) {
  if constexpr (Rule != ScaleRule::kStandard) {
    encode_planned_q<V, In, Fmt, Quotient::kMultiply>(src, dst, p, stream);
  } else if (p.quotient == Quotient::kTable) {
    // Table groups are always plain (plan_group_simd), and only bf16 groups are ever table groups.
    if constexpr (std::is_same_v<In, c10::BFloat16>) {
      encode_group_simd<V, In, Fmt, Quotient::kTable, false, false>(src, dst, p.gs, stream);
    }
  } else if (p.quotient == Quotient::kReciprocal) {
#ifdef __FMA__
    encode_planned_q<V, In, Fmt, Quotient::kReciprocal>(src, dst, p, stream);
#endif
  } else {
    encode_planned_q<V, In, Fmt, Quotient::kDivide>(src, dst, p, stream);
  }
}

// Full groups of one task, planned kBatch at a time.
template <typename In, typename Fmt, ScaleRule Rule>
class GroupBatch {
 public:
  explicit GroupBatch(bool stream) : stream_(stream) {
    if constexpr (Rule == ScaleRule::kStandard && std::is_same_v<In, c10::BFloat16>) {
      if (code_tables<Fmt>().usable) tables_ = &code_tables<Fmt>();
    }
  }
  ~GroupBatch() { flush(); }
  VIE_INLINE void add(const In* src, uint8_t* dst, float* scale_f32, uint8_t* scale_e8m0) {
    Item& it = items_[n_];
    it.src = src;
    it.dst = dst;
    plan_group_simd<Simd, In, Fmt, Rule>(src, dst, scale_f32, scale_e8m0, tables_, it.plan);
    if (++n_ == kBatch) flush();
  }
  VIE_INLINE void flush() {
    for (int i = 0; i < n_; ++i) encode_planned<Simd, In, Fmt, Rule>(items_[i].src, items_[i].dst, items_[i].plan, stream_);
    n_ = 0;
  }

 private:
  static constexpr int kBatch = 8;
  struct Item {
    const In* src;
    uint8_t* dst;
    GroupPlan plan;
  };
  Item items_[kBatch];
  int n_ = 0;
  bool stream_;
  const CodeTables<Fmt>* tables_ = nullptr;  // standard mode, bf16: the table path (nullptr: never)
};
#else
// Without AVX2 each full group runs the portable loop at once.
template <typename In, typename Fmt, ScaleRule Rule>
class GroupBatch {
 public:
  explicit GroupBatch(bool) {}
  void add(const In* src, uint8_t* dst, float* scale_f32, uint8_t* scale_e8m0) {
    quantize_group_generic<In, Fmt, Rule>(src, kGroupSize, dst, scale_f32, scale_e8m0);
  }
};
#endif  // __AVX2__

// Pins the SSE floating-point environment for the kernel's arithmetic: round to nearest even, no
// flush-to-zero or denormals-are-zero (torch.set_flush_denormal(True) sets both), exceptions masked.
class IeeeFpEnv {
 public:
#if defined(__SSE__)
  IeeeFpEnv() : saved_(_mm_getcsr()) { _mm_setcsr(0x1F80); }
  ~IeeeFpEnv() { _mm_setcsr(saved_); }

 private:
  unsigned int saved_;
#endif
};

// Streaming stores are weakly ordered: fence them before the task reports completion.
class StoreFence {
 public:
  explicit StoreFence(bool active) : active_(active) {}
  ~StoreFence() {
#if defined(__SSE__)
    if (active_) _mm_sfence();
#endif
  }

 private:
  bool active_;
};


// Where the rows of the cache and scale are. A contiguous pair is one block of N rows; a packed-block pair
// (vllm_indexer_epilog/op/geometry.py) has num_blocks blocks of block_size rows, each block's rows
// contiguous, blocks a stride apart in both views: slot s is row s % block_size of block s / block_size.
struct CacheLayout {
  bool packed = false;
  int64_t block_size = 0;          // rows per block (packed only)
  int64_t code_block_bytes = 0;    // block stride of the codes, bytes (packed only)
  int64_t scale_block_elems = 0;   // block stride of the scales, in scale elements (packed only)
};

// Where slot s's row of codes (bytes from the cache's start) and its first scale (elements) are.
class SlotOffsets {
 public:
  SlotOffsets(const CacheLayout& layout, int64_t d, int64_t groups)
      : packed_(layout.packed), bs_(std::max<int64_t>(layout.block_size, 1)), code_block_(layout.code_block_bytes),
        scale_block_(layout.scale_block_elems), d_(d), groups_(groups) {}
  VIE_INLINE std::pair<int64_t, int64_t> operator()(int64_t s) const {
    if (!packed_) return {s * d_, s * groups_};
    const int64_t blk = s / bs_, off = s - blk * bs_;
    return {blk * code_block_ + off * d_, blk * scale_block_ + off * groups_};
  }

 private:
  bool packed_;
  int64_t bs_, code_block_, scale_block_, d_, groups_;
};

// Splits rows over ATen's threads as contiguous stretches, one per thread (each thread streams its own part
// of x), and lets a thread that finishes early take chunks off the far end of another's. On a VM a thread's
// vCPU can start late: with fixed stretches, a 2 ms call then waits for the late one (BENCHMARKS.md, issue
// 18). Handing out every chunk on demand removed that wait but interleaved the threads' reads and cost 8-14%
// when both start on time; here the owner still walks its stretch front to back and only a late stretch is
// shared.
class RowSchedule {
 public:
  // Chunks of ~64K elements: below that a thread wake-up costs more than it saves, so it is also the least
  // work given a thread. Chunks of 8K elements were tried: the claims cost ~5% when both threads start on
  // time; 64K cost nothing measurable and still share a late stretch to within ~15 us (BENCHMARKS.md).
  RowSchedule(int64_t rows, int64_t d) : rows_(rows) {
    // Chunk indices are packed two to a 64-bit word: keep them below 2^31.
    chunk_ = std::max({(int64_t(1) << 16) / d, int64_t(1), (rows + (int64_t(1) << 31) - 1) >> 31});
    int64_t chunks = (rows + chunk_ - 1) / chunk_;
    workers_ = int(std::max<int64_t>(1, std::min<int64_t>(int64_t(at::get_num_threads()), chunks)));
    if (at::in_parallel_region()) workers_ = 1;
    if (workers_ == 1) {
      // Nobody to share with: one claim for all rows, and no allocation (decode-size calls land here).
      chunk_ = std::max<int64_t>(rows, 1);
      chunks = 1;
      stretches_ = &single_;
    } else {
      shared_ = std::make_unique<Stretch[]>(size_t(workers_));
      stretches_ = shared_.get();
    }
    for (int w = 0; w < workers_; ++w) {
      stretches_[w].span.store(pack(chunks * w / workers_, chunks * (w + 1) / workers_), std::memory_order_relaxed);
    }
  }
  RowSchedule(const RowSchedule&) = delete;  // stretches_ may point into this object
  RowSchedule& operator=(const RowSchedule&) = delete;

  // Runs body(next) once per worker, in parallel; next(begin, end) hands out row ranges (the
  // worker's own stretch first, then others' leftovers) until it returns false.
  template <typename Body>
  void run(const Body& body) {
    auto one = [&](int64_t w) {
      body([this, w](int64_t& begin, int64_t& end) { return claim(int(w), begin, end); });
    };
    if (workers_ == 1) {
      one(0);
      return;
    }
    at::parallel_for(0, workers_, 1, [&](int64_t b, int64_t e) {
      for (int64_t w = b; w < e; ++w) one(w);
    });
  }

 private:
  struct alignas(64) Stretch {
    std::atomic<uint64_t> span{0};  // [front, back) in chunks: front in the low half, back in the high
  };
  static uint64_t pack(int64_t front, int64_t back) { return uint64_t(front) | (uint64_t(back) << 32); }

  bool claim(int self, int64_t& begin, int64_t& end) {
    int64_t c = take(stretches_[self].span, true);
    for (int k = 1; c < 0 && k < workers_; ++k) c = take(stretches_[(self + k) % workers_].span, false);
    if (c < 0) return false;
    begin = c * chunk_;
    end = std::min(rows_, begin + chunk_);
    return true;
  }

  // One chunk off the front (the owner) or the back (a thief), or -1 if the stretch is empty.
  static int64_t take(std::atomic<uint64_t>& span, bool front) {
    uint64_t cur = span.load(std::memory_order_relaxed);
    for (;;) {
      const int64_t f = int64_t(cur & 0xffffffffu), b = int64_t(cur >> 32);
      if (f >= b) return -1;
      const uint64_t next = front ? pack(f + 1, b) : pack(f, b - 1);
      if (span.compare_exchange_weak(cur, next, std::memory_order_relaxed)) return front ? f : b - 1;
    }
  }

  int64_t rows_, chunk_;
  int workers_;
  Stretch single_;
  std::unique_ptr<Stretch[]> shared_;
  Stretch* stretches_;
};

constexpr int64_t kPrefetchRows = 16;

// `skip` (nullable) marks rows whose slot a later row also names: each slot is then written by exactly
// one row, codes and scales together, whatever the thread split.
template <typename In, typename Fmt, ScaleRule Rule, typename Slot>
void run(const at::Tensor& cache, const at::Tensor& scale, const at::Tensor& x, const at::Tensor& slot_mapping,
         const CacheLayout& layout, const uint8_t* skip) {
  const int64_t d = x.size(-1);
  const int64_t rows = x.numel() / d;
  const int64_t groups = (d + kGroupSize - 1) / kGroupSize;
  const int64_t full_groups = d / kGroupSize;
  const int tail = int(d - full_groups * kGroupSize);
  const int64_t n_slots = cache.numel() / d;
  const In* xp = static_cast<const In*>(x.const_data_ptr());
  const Slot* sp = slot_mapping.const_data_ptr<Slot>();
  uint8_t* cp = static_cast<uint8_t*>(cache.data_ptr());
  float* sf = Rule == ScaleRule::kStandard ? static_cast<float*>(scale.data_ptr()) : nullptr;
  uint8_t* se = Rule == ScaleRule::kStandard ? nullptr : static_cast<uint8_t*>(scale.data_ptr());
  // Large writes bypass the caches (no read-for-ownership of cache rows that are overwritten whole);
  // small ones stay cached for the attention read that follows. Streaming stores need rows aligned to
  // the vector width (32 or 64 bytes); a packed pair's only if its block stride is a multiple of it too.
#ifdef __AVX2__
  constexpr int64_t kAlign = int64_t(Simd::kStreamAlign);
#else
  constexpr int64_t kAlign = 32;  // unused: the portable path has no streaming stores
#endif
  const bool stream = rows * d >= (int64_t(1) << 20) && d % kAlign == 0 &&
                      reinterpret_cast<uintptr_t>(cp) % kAlign == 0 && (!layout.packed || layout.code_block_bytes % kAlign == 0);
  const SlotOffsets offsets(layout, d, groups);
  RowSchedule(rows, d).run([&](const auto& next) {
    const IeeeFpEnv fp_env;
    const StoreFence fence(stream);
    GroupBatch<In, Fmt, Rule> batch(stream);  // destroyed (flushed) before the fence and the FP environment
    int64_t begin = 0, end = 0;
    while (next(begin, end)) {
      for (int64_t r = begin; r < end; ++r) {
        // A row's scales are a few bytes in a line of their own wherever slots are scattered, and the store
        // waits for that line to be read; fetching it kPrefetchRows rows ahead took 10-15% off the time of
        // shuffled writes (BENCHMARKS.md). Code rows need none: they are whole lines, streamed.
        if (r + kPrefetchRows < rows) {
          const int64_t ps = int64_t(sp[r + kPrefetchRows]);
          if (ps >= 0 && ps < n_slots) {
            const int64_t pso = offsets(ps).second;
            if (sf) __builtin_prefetch(sf + pso, 1, 3);
            if (se) __builtin_prefetch(se + pso, 1, 3);
          }
        }
        const int64_t s = int64_t(sp[r]);
        // The range was checked before any write; this keeps even a bad caller inside the tensors.
        if (s < 0 || s >= n_slots || (skip != nullptr && skip[r])) continue;
        const In* src = xp + r * d;
        const auto [co, so] = offsets(s);
        uint8_t* dst = cp + co;
        for (int64_t g = 0; g < full_groups; ++g) {
          batch.add(src + g * kGroupSize, dst + g * kGroupSize, sf ? sf + so + g : nullptr, se ? se + so + g : nullptr);
        }
        if (tail) {
          const int64_t g = full_groups;
          quantize_group_generic<In, Fmt, Rule>(src + g * kGroupSize, tail, dst + g * kGroupSize,
                                                sf ? sf + so + g : nullptr, se ? se + so + g : nullptr);
        }
      }
    }
  });
}

// HiFloat8 (quant_mode=2): each element of a row becomes HiF8(fl32(x * scale)) (docs/SPEC.md); no group
// scale, and the scale tensor is not touched. A plain loop: the encoder is branch-free integer code that GCC
// vectorizes (docs/hifloat8.md), and x is widened 128 elements at a time into an L1 buffer as in modes 0/1.
// The product runs under IeeeFpEnv, so a subnormal x or scale counts at its exact value.
template <typename In, typename Slot>
void run_hif8(const at::Tensor& cache, const at::Tensor& x, const at::Tensor& slot_mapping, const CacheLayout& layout,
              const uint8_t* skip, float scale) {
  const int64_t d = x.size(-1);
  const int64_t rows = x.numel() / d;
  const int64_t n_slots = cache.numel() / d;
  const In* xp = static_cast<const In*>(x.const_data_ptr());
  const Slot* sp = slot_mapping.const_data_ptr<Slot>();
  uint8_t* cp = static_cast<uint8_t*>(cache.data_ptr());
  const SlotOffsets offsets(layout, d, 0);
  RowSchedule(rows, d).run([&](const auto& next) {
    const IeeeFpEnv fp_env;
    alignas(64) float buf[kGroupSize];
    int64_t begin = 0, end = 0;
    while (next(begin, end)) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t s = int64_t(sp[r]);
        // The range was checked before any write; this keeps even a bad caller inside the tensors.
        if (s < 0 || s >= n_slots || (skip != nullptr && skip[r])) continue;
        const In* src = xp + r * d;
        uint8_t* dst = cp + offsets(s).first;
        for (int64_t c = 0; c < d; c += kGroupSize) {
          const int n = int(std::min<int64_t>(kGroupSize, d - c));
          widen<In>(src + c, n, buf);
          for (int i = 0; i < n; ++i) dst[c + i] = encode_hif8<false>(buf[i] * scale);
        }
      }
    }
  });
}

template <typename In, typename Fmt, ScaleRule Rule>
void dispatch_slots(const at::Tensor& c, const at::Tensor& s, const at::Tensor& x, const at::Tensor& sl,
                    const CacheLayout& layout, const uint8_t* skip) {
  if (sl.scalar_type() == at::kLong) {
    run<In, Fmt, Rule, int64_t>(c, s, x, sl, layout, skip);
  } else {
    run<In, Fmt, Rule, int32_t>(c, s, x, sl, layout, skip);
  }
}

template <typename In, typename Fmt>
void dispatch_rule(const at::Tensor& c, const at::Tensor& s, const at::Tensor& x, const at::Tensor& sl,
                   int64_t quant_mode, bool round_scale, const CacheLayout& layout, const uint8_t* skip) {
  if (quant_mode == 1) {
    dispatch_slots<In, Fmt, ScaleRule::kStandard>(c, s, x, sl, layout, skip);
  } else if (round_scale) {
    dispatch_slots<In, Fmt, ScaleRule::kMxCeil>(c, s, x, sl, layout, skip);
  } else {
    dispatch_slots<In, Fmt, ScaleRule::kMxFloor>(c, s, x, sl, layout, skip);
  }
}

template <typename In>
void dispatch_fmt(const at::Tensor& c, const at::Tensor& s, const at::Tensor& x, const at::Tensor& sl,
                  int64_t quant_mode, bool round_scale, const CacheLayout& layout, const uint8_t* skip) {
  if (c.scalar_type() == at::kFloat8_e4m3fn) {
    dispatch_rule<In, E4M3>(c, s, x, sl, quant_mode, round_scale, layout, skip);
  } else {
    dispatch_rule<In, E5M2>(c, s, x, sl, quant_mode, round_scale, layout, skip);
  }
}

// ---- Argument checks --------------------------------------------------------------------------------
// Same order, error class and leading argument name as validation.py, so that one bad call reads the
// same whichever backend refuses it (tests/backends/test_cpu_native.py compares them).

const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kFloat8_e4m3fn: return "float8_e4m3fn";
    case at::kFloat8_e5m2: return "float8_e5m2";
    case at::kFloat8_e4m3fnuz: return "float8_e4m3fnuz";
    case at::kFloat8_e5m2fnuz: return "float8_e5m2fnuz";
    case at::kFloat8_e8m0fnu: return "float8_e8m0fnu";
    case at::kByte: return "uint8";
    case at::kChar: return "int8";
    case at::kShort: return "int16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kBool: return "bool";
    case at::kComplexFloat: return "complex64";
    case at::kComplexDouble: return "complex128";
    default: return c10::toString(t);
  }
}

std::string torch_dtype(at::ScalarType t) { return std::string("torch.") + dtype_name(t); }

std::string py_tuple(c10::IntArrayRef a) {
  std::ostringstream o;
  o << '(';
  for (size_t i = 0; i < a.size(); ++i) o << (i ? ", " : "") << a[i];
  o << (a.size() == 1 ? ",)" : ")");
  return o.str();
}

// Python's repr() of a float, for the refusal of a foreign `scale` argument.
std::string py_float_repr(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[40];
  for (int prec = 1; prec <= 17; ++prec) {
    std::snprintf(buf, sizeof(buf), "%.*g", prec, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  std::string out(buf);
  if (out.find_first_of(".en") == std::string::npos) out += ".0";
  return out;
}

// Strict mode comes from Python (backends/cpu.py hands over envs.strict(), the package's one parser of
// the variable), asked only when a call names one slot twice: the common call never leaves C++. Until
// Python connects it, strict mode is off (the variable's default).
using StrictSource = int (*)();
std::atomic<StrictSource> g_strict_source{nullptr};

bool strict_mode() {
  const StrictSource source = g_strict_source.load(std::memory_order_acquire);
  return source != nullptr && source() != 0;
}

// Tensor::is_contiguous() of t[0] (the rows of one block), without making the view.
bool block_rows_contiguous(const at::Tensor& t) {
  int64_t expected = 1;
  for (int64_t i = t.dim() - 1; i >= 1; --i) {
    const int64_t size = t.size(i);
    if (size == 0) return true;
    if (size == 1) continue;
    if (t.stride(i) != expected) return false;
    expected *= size;
  }
  return true;
}

// geometry.py's packed_geometry(): the reason the pair is not a packed-block pair ("" if it is), and its
// layout. Same rules and order as the Python.
std::string packed_geometry(const at::Tensor& values, const at::Tensor& scales, CacheLayout& out) {
  std::ostringstream o;
  if (values.dim() < 2 || scales.dim() < 2) {
    o << "a packed indexer cache needs indexer_compress_cache [num_blocks, block_size, (1,) d] and "
         "indexer_compress_scale [num_blocks, block_size, (1,) G], got "
      << py_tuple(values.sizes()) << " and " << py_tuple(scales.sizes());
    return o.str();
  }
  const int64_t nb = values.size(0), d = values.size(-1), g = scales.size(-1);
  if (d < 1 || g < 1) {
    o << "packed cache views need d >= 1 and G >= 1, got " << py_tuple(values.sizes()) << " and "
      << py_tuple(scales.sizes());
    return o.str();
  }
  const int64_t bs = nb ? values.numel() / nb / d : values.size(1);
  if (scales.size(0) != nb || (nb && scales.numel() / nb / g != bs)) {
    o << "indexer_compress_scale " << py_tuple(scales.sizes()) << " must have the block count and block size of "
      << "indexer_compress_cache " << py_tuple(values.sizes());
    return o.str();
  }
  out = CacheLayout{true, bs, 0, 0};
  if (nb == 0) {
    out.packed = false;  // nothing to address (PackedGeometry.block_bytes 0)
    return "";
  }
  const std::pair<const char*, const at::Tensor*> views[] = {{"indexer_compress_cache", &values},
                                                             {"indexer_compress_scale", &scales}};
  for (const auto& [name, t] : views) {
    if (!block_rows_contiguous(*t)) {
      o << name << ": the rows of one block must be contiguous (shape " << py_tuple(t->sizes()) << ", strides "
        << py_tuple(t->strides()) << ")";
      return o.str();
    }
  }
  if (values.storage().data() != scales.storage().data()) {
    return "indexer_compress_cache and indexer_compress_scale must be views of one packed block buffer";
  }
  const int64_t ve = values.element_size(), se = scales.element_size();
  const int64_t block_bytes = values.stride(0) * ve;
  const int64_t value_bytes = bs * d * ve, scale_bytes = bs * g * se;
  if (nb > 1 && scales.stride(0) * se != block_bytes) {
    o << "indexer_compress_scale block stride (" << scales.stride(0) * se
      << " bytes) must equal indexer_compress_cache's (" << block_bytes << " bytes)";
    return o.str();
  }
  const int64_t gap = scales.storage_offset() * se - values.storage_offset() * ve;
  if (gap != value_bytes) {
    o << "indexer_compress_scale must start right after each block's values (" << value_bytes << " bytes in), got "
      << gap;
    return o.str();
  }
  if (nb > 1 && block_bytes < value_bytes + scale_bytes) {
    o << "packed blocks overlap: block stride " << block_bytes << " bytes < " << value_bytes + scale_bytes
      << " bytes per block";
    return o.str();
  }
  out.code_block_bytes = nb > 1 ? block_bytes : 0;
  out.scale_block_elems = nb > 1 ? scales.stride(0) : 0;
  return "";
}

// [first, last + 1) byte of a non-empty tensor.
std::pair<uintptr_t, uintptr_t> byte_extent(const at::Tensor& t) {
  int64_t span = 1;
  for (int64_t i = 0; i < t.dim(); ++i) span += (t.size(i) - 1) * t.stride(i);
  const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
  return {start, start + uintptr_t(span * t.element_size())};
}

bool overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const auto [a0, a1] = byte_extent(a);
  const auto [b0, b1] = byte_extent(b);
  return a0 < b1 && b0 < a1;
}

CacheLayout validate(const at::Tensor& cache, const at::Tensor& scale, const at::Tensor& x,
                     const at::Tensor& slot_mapping, int64_t quant_mode, double scale_value) {
  TORCH_CHECK_VALUE(quant_mode == 0 || quant_mode == 1 || quant_mode == 2,
                    "quant_mode must be 0 (MX, e8m0 scales), 1 (standard, float32 scales) or 2 (HiFloat8), got ",
                    quant_mode);
  // HiFloat8's multiplier: finite once rounded to float32, and 1.0 in the modes that compute their own scales.
  TORCH_CHECK_VALUE(std::isfinite(static_cast<float>(scale_value)), "scale must be finite as a float32, got ",
                    py_float_repr(scale_value));
  TORCH_CHECK_VALUE(quant_mode == 2 || scale_value == 1.0,
                    "scale must be 1.0 unless quant_mode=2 (HiFloat8): modes 0 and 1 compute their own group "
                    "scales; got ", py_float_repr(scale_value));
  const std::pair<const char*, const at::Tensor*> named[] = {
      {"indexer_compress_cache", &cache}, {"indexer_compress_scale", &scale}, {"x", &x}, {"slot_mapping", &slot_mapping}};
  for (const auto& [name, t] : named) {
    TORCH_CHECK_TYPE(t->defined(), name, " must be a torch.Tensor, got NoneType");
  }
  const auto xt = x.scalar_type();
  TORCH_CHECK_TYPE(xt == at::kHalf || xt == at::kBFloat16 || xt == at::kFloat,
                   "x must have dtype float16, bfloat16, float32, got ", torch_dtype(xt));
  const auto ct = cache.scalar_type();
  if (quant_mode == 2) {
    TORCH_CHECK_TYPE(ct == at::kByte,
                     "indexer_compress_cache must have dtype uint8 (HiFloat8 codes) when quant_mode=2, got ",
                     torch_dtype(ct));
  } else {
    TORCH_CHECK_TYPE(ct == at::kFloat8_e4m3fn || ct == at::kFloat8_e5m2,
                     "indexer_compress_cache must have dtype float8_e4m3fn, float8_e5m2, got ", torch_dtype(ct));
  }
  const auto want_scale = quant_mode == 0 ? at::kFloat8_e8m0fnu : at::kFloat;
  TORCH_CHECK_TYPE(scale.scalar_type() == want_scale, "indexer_compress_scale must have dtype ",
                   torch_dtype(want_scale), " when quant_mode=", quant_mode, ", got ",
                   torch_dtype(scale.scalar_type()));
  const auto st = slot_mapping.scalar_type();
  TORCH_CHECK_TYPE(st == at::kInt || st == at::kLong, "slot_mapping must have dtype int32, int64, got ",
                   torch_dtype(st));

  // Written in place: autograd cannot record the write, and torch refuses in-place updates of an
  // inference tensor outside inference mode; both are refused here before any byte is written.
  for (const auto& [name, t] : {named[0], named[1]}) {
    TORCH_CHECK_VALUE(!t->requires_grad(), name,
                      " must not require grad (it is written in place; pass a tensor without requires_grad)");
    TORCH_CHECK_VALUE(!t->is_inference() || c10::InferenceMode::is_enabled(), name,
                      " is an inference tensor (made under torch.inference_mode()) and cannot be written outside "
                      "inference mode; call the op inside torch.inference_mode() or allocate it outside");
  }
  for (const auto& [name, t] : {named[0], named[1], named[3]}) {
    TORCH_CHECK_VALUE(t->device() == x.device(), name, " is on ", t->device(), " but x is on ", x.device(),
                      "; all tensors must share one device");
  }
  // Both contiguous: the contiguous pair. Otherwise they must be a packed-block pair, or the first
  // non-contiguous one is refused as validation.py does.
  CacheLayout layout;
  if (!cache.is_contiguous() || !scale.is_contiguous()) {
    const std::string why = packed_geometry(cache, scale, layout);
    if (!why.empty()) {
      const auto& [name, t] = cache.is_contiguous() ? named[1] : named[0];
      TORCH_CHECK_VALUE(false, name, " must be contiguous (shape ", py_tuple(t->sizes()), ", strides ",
                        py_tuple(t->strides()), "), or indexer_compress_cache and indexer_compress_scale must be "
                        "the two views of a packed-block buffer (", why, ")");
    }
  }
  for (const auto& [name, t] : {named[2], named[3]}) {
    TORCH_CHECK_VALUE(t->is_contiguous(), name, " must be contiguous (shape ", py_tuple(t->sizes()), ", strides ",
                      py_tuple(t->strides()), ")");
  }
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) >= 1, "x must have shape [..., d] with d >= 1, got ",
                    py_tuple(x.sizes()));
  const int64_t d = x.size(-1);
  const int64_t g = (d + kGroupSize - 1) / kGroupSize;
  TORCH_CHECK_VALUE(cache.dim() >= 1 && cache.size(-1) == d,
                    "indexer_compress_cache must have shape [..., d] with d = ", d, " (from x), got ",
                    py_tuple(cache.sizes()));
  TORCH_CHECK_VALUE(scale.dim() >= 1 && scale.size(-1) == g,
                    "indexer_compress_scale must have shape [..., G] with G = ceil(", d, "/128) = ", g, ", got ",
                    py_tuple(scale.sizes()));
  const int64_t n = cache.numel() / d;
  TORCH_CHECK_VALUE(scale.numel() / g == n, "indexer_compress_scale has ", scale.numel() / g,
                    " rows but indexer_compress_cache has ", n, "; they must match");
  const int64_t t_rows = x.numel() / d;
  TORCH_CHECK_VALUE(slot_mapping.numel() == t_rows, "slot_mapping must have one element per row of x (", t_rows,
                    "), got ", slot_mapping.numel());
  // validation.py's check_no_aliasing(): an output's bytes (first to last) must not meet another
  // argument's, except the packed pair's two views, which packed_geometry() found disjoint per element.
  const bool packed_pair = !cache.is_contiguous() || !scale.is_contiguous();
  for (int i = 0; i < 2; ++i) {
    const auto& [out_name, out] = named[i];
    for (int j = i + 1; j < 4; ++j) {
      const auto& [other_name, other] = named[j];
      if (packed_pair && i == 0 && j == 1) continue;
      TORCH_CHECK_VALUE(!overlap(*out, *other), other_name, " overlaps ", out_name, " in memory: ", out_name,
                        " is written in place, so it must not share bytes with another argument");
    }
  }
  return layout;
}

// Rows to skip because a later row names the same slot; empty when every valid slot is unique (the
// normal case, which then allocates nothing).
class LaterRowWins {
 public:
  template <typename Slot>
  LaterRowWins(const Slot* sp, int64_t t, int64_t n) {
    if (t <= 16) {
      // Decode sizes: a few dozen compares beat any table.
      for (int64_t r = 0; r < t; ++r) {
        if (sp[r] < 0) continue;
        for (int64_t k = r + 1; k < t; ++k) {
          if (sp[k] == sp[r]) {
            overwritten(r, t, sp[r]);
            break;
          }
        }
      }
      return;
    }
    // Walk from the last row: a slot already seen belongs to a later row. A bitmap over the N slots
    // while it is no larger than a hash table over the T rows would be; a hash table when N is huge.
    const uint64_t words = (uint64_t(n) + 63) / 64;
    if (words <= uint64_t(4 * t)) {
      std::unique_ptr<uint64_t[]> seen(new uint64_t[words]());
      for (int64_t r = t - 1; r >= 0; --r) {
        const int64_t s = int64_t(sp[r]);
        if (s < 0) continue;
        const uint64_t bit = uint64_t(1) << (s & 63);
        if (seen[s >> 6] & bit) {
          overwritten(r, t, s);
        } else {
          seen[s >> 6] |= bit;
        }
      }
    } else {
      int shift = 64;
      uint64_t cap = 1;
      while (cap < uint64_t(2 * t)) cap <<= 1, --shift;
      const uint64_t mask = cap - 1;
      std::unique_ptr<int64_t[]> table(new int64_t[cap]);
      std::fill_n(table.get(), cap, int64_t(-1));
      for (int64_t r = t - 1; r >= 0; --r) {
        const int64_t s = int64_t(sp[r]);
        if (s < 0) continue;
        // Fibonacci hashing: the top bits of s * 2^64/phi spread consecutive slots apart.
        uint64_t h = shift >= 64 ? 0 : (uint64_t(s) * 0x9E3779B97F4A7C15ull) >> shift;
        while (table[h] != -1 && table[h] != s) h = (h + 1) & mask;
        if (table[h] == s) {
          overwritten(r, t, s);
        } else {
          table[h] = s;
        }
      }
    }
  }

  const uint8_t* skip() const { return skip_.empty() ? nullptr : skip_.data(); }
  int64_t first_slot() const { return first_slot_; }

 private:
  void overwritten(int64_t row, int64_t t, int64_t slot) {
    if (skip_.empty()) {
      skip_.assign(size_t(t), 0);
      first_slot_ = slot;
    }
    skip_[size_t(row)] = 1;
  }

  std::vector<uint8_t> skip_;
  int64_t first_slot_ = -1;
};

template <typename Slot>
void check_slots_and_run(const at::Tensor& cache, const at::Tensor& scale, const at::Tensor& x,
                         const at::Tensor& slot_mapping, int64_t quant_mode, bool round_scale,
                         const CacheLayout& layout, float scale_value) {
  const int64_t t = slot_mapping.numel();
  if (t == 0) return;
  const int64_t n = cache.numel() / x.size(-1);
  const Slot* sp = slot_mapping.const_data_ptr<Slot>();
  Slot lo = sp[0], hi = sp[0];
  for (int64_t r = 1; r < t; ++r) {
    lo = std::min(lo, sp[r]);
    hi = std::max(hi, sp[r]);
  }
  TORCH_CHECK_VALUE(int64_t(lo) >= -1 && int64_t(hi) < n, "slot_mapping values must lie in [-1, ", n,
                    ") (-1 skips a row; ", n, " cache rows), got min ", int64_t(lo), " and max ", int64_t(hi));
  const LaterRowWins dedup(sp, t, n);
  TORCH_CHECK_VALUE(dedup.skip() == nullptr || !strict_mode(),
                    "slot_mapping names the same cache row twice (e.g. slot ", dedup.first_slot(),
                    "); rejected in strict mode (VLLM_INDEXER_EPILOG_STRICT=1)");
  if (quant_mode == 2) {
    switch (x.scalar_type()) {
      case at::kBFloat16:
        return run_hif8<c10::BFloat16, Slot>(cache, x, slot_mapping, layout, dedup.skip(), scale_value);
      case at::kHalf:
        return run_hif8<c10::Half, Slot>(cache, x, slot_mapping, layout, dedup.skip(), scale_value);
      default:
        return run_hif8<float, Slot>(cache, x, slot_mapping, layout, dedup.skip(), scale_value);
    }
  }
  switch (x.scalar_type()) {
    case at::kBFloat16:
      return dispatch_fmt<c10::BFloat16>(cache, scale, x, slot_mapping, quant_mode, round_scale, layout,
                                         dedup.skip());
    case at::kHalf:
      return dispatch_fmt<c10::Half>(cache, scale, x, slot_mapping, quant_mode, round_scale, layout, dedup.skip());
    default:
      return dispatch_fmt<float>(cache, scale, x, slot_mapping, quant_mode, round_scale, layout, dedup.skip());
  }
}

// The op: every check, then the kernel. Nothing is written unless all checks pass.
void checked_epilog(const at::Tensor& cache, const at::Tensor& scale, const at::Tensor& x,
                    const at::Tensor& slot_mapping, int64_t quant_mode, bool round_scale, double scale_value) {
  const CacheLayout layout = validate(cache, scale, x, slot_mapping, quant_mode, scale_value);
  // Rounded once to float32 (nearest even), the multiplier's precision in the contract.
  const float s32 = static_cast<float>(scale_value);
  if (slot_mapping.scalar_type() == at::kLong) {
    check_slots_and_run<int64_t>(cache, scale, x, slot_mapping, quant_mode, round_scale, layout, s32);
  } else {
    check_slots_and_run<int32_t>(cache, scale, x, slot_mapping, quant_mode, round_scale, layout, s32);
  }
}

// Boxed, so one function serves our schema (6 arguments: scale 1.0), Ascend's and the private entry's (7: a
// trailing `float scale`, HiFloat8's multiplier); a Python caller is boxed already, so nothing is lost.
void indexer_compress_epilog_boxed(const c10::OperatorHandle& op, c10::DispatchKeySet, torch::jit::Stack* stack) {
  const size_t n_args = op.schema().arguments().size();
  auto args = torch::jit::last(*stack, n_args);
  const double scale_value = n_args == 7 ? args[6].toDouble() : 1.0;
  checked_epilog(args[0].toTensor(), args[1].toTensor(), args[2].toTensor(), args[3].toTensor(), args[4].toInt(),
                 args[5].toBool(), scale_value);
  torch::jit::drop(*stack, n_args);
}

// The schemas the boxed kernel can read: ours, or ours plus Ascend's `float scale` at the end.
std::string unsupported_schema(const c10::FunctionSchema& schema) {
  static const char* const kNames[] = {"indexer_compress_cache", "indexer_compress_scale", "x", "slot_mapping",
                                       "quant_mode", "round_scale"};
  const auto& a = schema.arguments();
  if (!schema.returns().empty() || (a.size() != 6 && a.size() != 7)) return "unexpected arity";
  for (size_t i = 0; i < 6; ++i) {
    if (a[i].name() != kNames[i]) return "argument " + std::to_string(i) + " is " + a[i].name();
  }
  const bool types_ok = a[0].type()->kind() == c10::TypeKind::TensorType &&
                        a[1].type()->kind() == c10::TypeKind::TensorType &&
                        a[2].type()->kind() == c10::TypeKind::TensorType &&
                        a[3].type()->kind() == c10::TypeKind::TensorType &&
                        a[4].type()->kind() == c10::TypeKind::IntType && a[5].type()->kind() == c10::TypeKind::BoolType;
  if (!types_ok) return "argument types differ";
  if (a.size() == 7 && (a[6].name() != "scale" || a[6].type()->kind() != c10::TypeKind::FloatType)) {
    return "extra argument " + a[6].name();
  }
  return "";
}

}  // namespace
}  // namespace vie

// The library name is a macro so that a second build (the portable one the tests check) can be loaded
// beside the native one. Its op has every check of the public one: no entry point writes unchecked.
#ifndef VIE_LIBRARY_NAME
#define VIE_LIBRARY_NAME vllm_indexer_epilog_cpu
#endif

TORCH_LIBRARY(VIE_LIBRARY_NAME, m) {
  m.def(
      "quantize_scatter(Tensor(a!) indexer_compress_cache, Tensor(b!) indexer_compress_scale, Tensor x, "
      "Tensor slot_mapping, int quant_mode, bool round_scale, float scale=1.0) -> ()");
  m.impl("quantize_scatter", c10::DispatchKey::CPU,
         torch::CppFunction::makeFromBoxedFunction<&vie::indexer_compress_epilog_boxed>());
  // Which vector path this build runs ("avx512", "avx2" or "portable"), for tests and benchmarks.
  m.def("isa() -> str", []() { return std::string(vie::kIsa); });
}

extern "C" __attribute__((visibility("default"))) void vie_set_strict_source(vie::StrictSource source) {
  vie::g_strict_source.store(source, std::memory_order_release);
}

// Registers the boxed kernel as the CPU kernel of custom::indexer_compress_epilog. Called by Python
// (backends/cpu.py), not at load time: Python decides whether the op lacks a CPU kernel, and a second
// build (the portable test library) must never claim custom:: too. Returns 0 on success (or when already
// registered by this library); otherwise 1 with the reason in `err`. No exception crosses ctypes.
extern "C" __attribute__((visibility("default"))) int vie_register_cpu_kernel(char* err, size_t err_len) {
  static std::mutex mu;
  static std::unique_ptr<torch::Library> lib;
  const std::lock_guard<std::mutex> guard(mu);
  auto fail = [&](const std::string& why) {
    std::snprintf(err, err_len, "%s", why.c_str());
    return 1;
  };
  if (lib) return 0;
  try {
    const auto op = c10::Dispatcher::singleton().findSchema({"custom::indexer_compress_epilog", ""});
    if (!op.has_value()) return fail("custom::indexer_compress_epilog is not defined");
    const std::string why = vie::unsupported_schema(op->schema());
    if (!why.empty()) return fail("unsupported schema (" + why + "): " + c10::toString(op->schema()));
    auto l = std::make_unique<torch::Library>(torch::Library::IMPL, "custom", c10::DispatchKey::CPU, __FILE__,
                                              __LINE__);
    l->impl("indexer_compress_epilog",
            torch::CppFunction::makeFromBoxedFunction<&vie::indexer_compress_epilog_boxed>());
    lib = std::move(l);
    return 0;
  } catch (const std::exception& e) {
    return fail(e.what());
  }
}
