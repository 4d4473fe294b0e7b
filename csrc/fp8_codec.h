// Saturating round-to-nearest-even float32 -> fp8 encoder and the per-group scale rules of
// docs/SPEC.md, branch-free so that the compiler vectorizes them. They assume IEEE round-to-nearest-
// even without flush-to-zero: the kernel sets that floating-point environment on every worker thread.
#pragma once

#include <cstdint>
#include <cstring>

namespace vie {

// The encoder must inline into the group loops, or GCC sees a call and does not vectorize them.
#define VIE_INLINE inline __attribute__((always_inline))

constexpr int kGroupSize = 128;
constexpr uint8_t kNanCode = 0x7F;

// Compile-time description of an fp8 format (mirrors vllm_indexer_epilog/op/spec.py).
template <int MantissaBits, int Bias, uint8_t MaxCode, uint32_t FmaxBits, int Emax>
struct Fp8Fmt {
  static constexpr int kMant = MantissaBits;
  static constexpr int kBias = Bias;
  static constexpr uint8_t kMaxCode = MaxCode;
  static constexpr uint32_t kFmaxBits = FmaxBits;  // float32 bits of FMAX
  static constexpr int kEmax = Emax;
  static constexpr uint32_t kMinNormalBits = uint32_t(127 + 1 - Bias) << 23;
};
using E4M3 = Fp8Fmt<3, 7, 0x7E, 0x43E00000u, 8>;     // FMAX 448
using E5M2 = Fp8Fmt<2, 15, 0x7B, 0x47600000u, 15>;   // FMAX 57344

VIE_INLINE uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
VIE_INLINE float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// One float32 -> one fp8 byte. Branch-free so that loops over a group vectorize.
template <typename Fmt>
VIE_INLINE uint8_t encode_fp8(float q) {
  const uint32_t bits = f32_bits(q);
  const int32_t mag = int32_t(bits & 0x7FFFFFFFu);
  const int32_t sign = int32_t((bits >> 24) & 0x80u);
  constexpr int kDrop = 23 - Fmt::kMant;
  // Normal range: round the mantissa to m bits (ties to even) and rebias. The result grows with the
  // magnitude, so a min() saturates every finite overflow and Inf to the largest finite code.
  int32_t normal = ((mag + ((1 << (kDrop - 1)) - 1) + ((mag >> kDrop) & 1)) >> kDrop) -
                   ((127 - Fmt::kBias) << Fmt::kMant);
  normal = normal < Fmt::kMaxCode ? normal : Fmt::kMaxCode;
  // Subnormal range: adding 2^k, whose float32 ulp is the fp8 subnormal step 2^(1-bias-m), makes the
  // FPU round |q| to a whole number of steps (ties to even); the low bits of the sum count them.
  constexpr uint32_t kMagicBits = uint32_t(127 + 23 + 1 - Fmt::kBias - Fmt::kMant) << 23;
  const int32_t sub = int32_t(f32_bits(bits_f32(uint32_t(mag)) + bits_f32(kMagicBits)) - kMagicBits);
  int32_t code = (mag < int32_t(Fmt::kMinNormalBits) ? sub : normal) | sign;
  code = mag > 0x7F800000 ? int32_t(kNanCode) : code;
  return uint8_t(code);
}

// Standard mode's x / S without a division per element (Markstein's correction): with r = RN(1/S) from one
// division per group, q0 = RN(x r) is within about an ulp of x / S, the residual x - q0 S is exact in an
// FMA, and one more FMA rounds q0 + residual * r to RN(x / S). The residual is exact only away from
// float32's subnormal range, so the kernel takes this path only for 16-bit inputs and S >= 2^-64
// (kReciprocalMinScaleBits), where tests/backends/quotient_sweep.cpp checks every (x, amax) pair of
// bfloat16 and float16, both formats: the quotient is RN(x / S) bit for bit wherever |x / S| >= 2^-26, and
// below that both give FP8 code 0 (|x| < 2^-90 there, so the residual may round). float32 inputs, and
// groups with a smaller S or an Inf/NaN element (Inf - Inf in the residual), divide. The sign of the
// result must be taken from x: for x = -0 the correction adds +0 and loses it.
constexpr uint32_t kReciprocalMinScaleBits = uint32_t(127 - 64) << 23;

VIE_INLINE float reciprocal_quotient(float x, float s, float r) {
  const float q0 = x * r;
  return __builtin_fmaf(__builtin_fmaf(-q0, s, x), r, q0);
}

// Exponent e of the MX scale 2^e for a group whose finite amax has float32 bits `amax_bits`.
template <typename Fmt, bool RoundScale>
VIE_INLINE int32_t mx_exponent(uint32_t amax_bits) {
  constexpr uint32_t kFloorBits = 0x38D1B717u;  // 1e-4f
  const uint32_t floored = amax_bits > kFloorBits ? amax_bits : kFloorBits;
  if constexpr (RoundScale) {
    // ceil(log2(RN(a / FMAX))) without the division (whose latency sat on each group's critical path).
    // With a = m 2^E and FMAX = f 2^emax (m, f in [1, 2); both normal, a >= 1e-4), RN(a / FMAX) =
    // RN(m / f) 2^(E - emax), and RN(m / f) is in (1/2, 1) for m < f (float32's spacing keeps it off 1),
    // exactly 1 for m = f, in (1, 2) for m > f: the exponent is E - emax, plus one where m > f.
    // tests/backends/quotient_sweep.cpp compares it with the division for every float32 a.
    constexpr uint32_t kFmaxMant = Fmt::kFmaxBits & 0x7FFFFFu;
    return int32_t(floored >> 23) - 127 - Fmt::kEmax + ((floored & 0x7FFFFFu) > kFmaxMant);
  } else {
    return int32_t(floored >> 23) - 127 - Fmt::kEmax;
  }
}

}  // namespace vie
