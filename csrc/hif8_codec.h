// HiFloat8 (quant_mode=2) encoder and decoder on float32 bit patterns, per docs/hifloat8.md.
// Integer-only, so the bytes do not depend on the FPU's rounding mode or flush-to-zero, and
// branch-free (selects, not jumps) so that GCC can vectorize a loop over encode_hif8 with AVX2:
// the variable shifts become vpsllvd/vpsrlvd. Tested against the en_dtypes.hifloat8 cast and the
// torch reference (vllm_indexer_epilog/op/hifloat8.py) by tests/op/test_hifloat8.py.
#pragma once

#include <cstdint>
#include <cstring>

namespace vie {

#ifndef VIE_INLINE
#define VIE_INLINE inline __attribute__((always_inline))
#endif

constexpr uint8_t kHif8NanCode = 0x80;
constexpr uint8_t kHif8InfCode = 0x6F;  // +Inf; -Inf is 0xEF
constexpr uint8_t kHif8MaxCode = 0x6E;  // +2^15, the largest finite magnitude
// Decision boundaries as float32 magnitude bits.
constexpr int32_t kHif8OverflowBits = 0x47200000;   // 40960 = 1.25 * 2^15: rounds past 2^15
constexpr int32_t kHif8MinNormalBits = 0x38000000;  // 2^-15
constexpr int32_t kHif8HalfMinDenormBits = 0x34000000;  // 2^-23: midpoint of 0 and 2^-22

// Mantissa bits kept in the binade of 2^e (tapered precision): 3 for |e| <= 3, 2 for 4..7, 1 above.
VIE_INLINE int32_t hif8_mantissa_bits(int32_t abs_e) {
  return abs_e <= 3 ? 3 : (abs_e <= 7 ? 2 : 1);
}

// Low 7 code bits of a magnitude in [2^-15, 40960). Adding half an ulp of the binade's precision
// and truncating rounds to nearest, ties away from zero; a carry into the exponent leaves a zero
// mantissa, representable at the next binade's precision, so the fields come from the rounded bits.
VIE_INLINE int32_t hif8_normal_code7(int32_t mag) {
  const int32_t e = (mag >> 23) - 127;
  const int32_t drop = 23 - hif8_mantissa_bits(e < 0 ? -e : e);
  const int32_t r = ((mag + (1 << (drop - 1))) >> drop) << drop;
  const int32_t er = (r >> 23) - 127;
  const int32_t ae = er < 0 ? -er : er;
  const int32_t k = hif8_mantissa_bits(ae);
  const int32_t m = (r >> (23 - k)) & ((1 << k) - 1);
  // Exponent field width D: 0, 1, 2, 3, 4 for |e| = 0, 1, 2..3, 4..7, 8..15; its dot prefix is
  // 0001, 001, 01, 10, 11, placed at the top of the 7 magnitude bits.
  const int32_t d = ae == 0 ? 0 : (ae == 1 ? 1 : (ae < 4 ? 2 : (ae < 8 ? 3 : 4)));
  const int32_t prefix = d == 0 ? 0x08 : (d == 1 ? 0x10 : (d == 2 ? 0x20 : (d == 3 ? 0x40 : 0x60)));
  const int32_t top = d > 0 ? d - 1 : 0;  // position of the exponent's sign bit
  // Sign-magnitude exponent: the sign bit, then |e| less its implicit leading 1.
  const int32_t exp_field = d == 0 ? 0 : ((int32_t(er < 0) << top) | (ae - (1 << top)));
  return prefix | (exp_field << k) | m;
}

// Low 7 code bits of a magnitude in [2^-23, 2^-15): denormals are the powers of two 2^-22..2^-16
// (code = e + 23), so 1.f * 2^e rounds up when f >= 1/2 (ties away); everything in [2^-23, 2^-22)
// rounds up to 2^-22, and rounding up out of 2^-16 gives 2^-15, code 0x7E.
VIE_INLINE int32_t hif8_denormal_code7(int32_t mag) {
  int32_t er = (mag >> 23) - 127 + ((mag >> 22) & 1);
  er = er < -22 ? -22 : er;
  return er >= -15 ? 0x7E : er + 23;
}

// HiF8 code of x: round to nearest, ties away from zero; NaN -> 0x80; every value that rounds to
// zero -> 0x00 (0x80 is taken by NaN); |x| >= 40960 and +/-Inf -> +/-Inf (0x6F/0xEF), the
// en_dtypes.hifloat8 cast, or +/-2^15 (0x6E/0xEE) with Saturate (the cast of x clipped to 2^15).
template <bool Saturate = false>
VIE_INLINE uint8_t encode_hif8(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const int32_t mag = bits & 0x7FFFFFFF;
  // Clamp each path's input into its domain so that its shifts stay defined; the select below
  // keeps only the path that applies.
  const int32_t mn = mag < kHif8MinNormalBits ? kHif8MinNormalBits
                     : (mag >= kHif8OverflowBits ? kHif8OverflowBits - 1 : mag);
  const int32_t md = mag < kHif8HalfMinDenormBits ? kHif8HalfMinDenormBits
                     : (mag >= kHif8MinNormalBits ? kHif8MinNormalBits - 1 : mag);
  int32_t c7 = mag < kHif8MinNormalBits ? hif8_denormal_code7(md) : hif8_normal_code7(mn);
  c7 = mag < kHif8HalfMinDenormBits ? 0 : c7;
  c7 = mag >= kHif8OverflowBits ? (Saturate ? kHif8MaxCode : kHif8InfCode) : c7;
  const int32_t code = c7 == 0 ? 0 : (c7 | ((bits >> 24) & 0x80));
  return static_cast<uint8_t>(mag > 0x7F800000 ? kHif8NanCode : code);
}

// Value of a HiF8 code, decoded from the fields (exact: every HiF8 value is a float32).
inline float decode_hif8(uint8_t code) {
  if (code == kHif8NanCode) return __builtin_nanf("");
  const bool neg = (code & 0x80) != 0;
  const int32_t c = code & 0x7F;
  float v;
  if (c == kHif8InfCode) {
    v = __builtin_inff();
  } else if (c < 0x08) {  // dot 0000: zero or the denormal 2^(c - 23)
    v = c == 0 ? 0.0f : __builtin_ldexpf(1.0f, c - 23);
  } else {
    const int32_t d = c < 0x10 ? 0 : (c < 0x20 ? 1 : (c < 0x40 ? 2 : (c < 0x60 ? 3 : 4)));
    const int32_t k = d <= 2 ? 3 : 5 - d;
    const int32_t m = c & ((1 << k) - 1);
    int32_t e = 0;
    if (d > 0) {
      const int32_t f = (c >> k) & ((1 << d) - 1);
      const int32_t ae = (1 << (d - 1)) | (f & ((1 << (d - 1)) - 1));
      e = (f >> (d - 1)) ? -ae : ae;
    }
    v = __builtin_ldexpf(1.0f + float(m) / float(1 << k), e);
  }
  return neg ? -v : v;
}

}  // namespace vie
