// Exhaustive checks of fp8_codec.h's division-free forms. First mx_exponent<Fmt, true> (MX round_scale's
// exponent from integer bits) against the division, for every finite float32 amax. Then reciprocal_quotient()
// where the CPU kernel uses it: for bfloat16 and
// float16 inputs, each FP8 format, every finite amax whose scale S = RN(amax / FMAX) is at least
// 2^-64 (kReciprocalMinScaleBits) and every x with 0 <= x <= amax, it compares against the correctly
// rounded x / S: the float32 bits must match wherever x / S >= 2^-26, and the FP8 code everywhere (below
// 2^-26 both must encode to 0). Negative x mirror positive x (RN is symmetric; the kernel takes the sign
// from x). Prints one line per case and exits 1 on any mismatch. Built and run by test_quotient_sweep.py.
#include <cstdio>
#include <cstdint>
#include <vector>

#include "fp8_codec.h"

using namespace vie;

static float from16(uint16_t h, bool bf16) {
  if (bf16) return bits_f32(uint32_t(h) << 16);
  // IEEE half -> float, exact (normal, subnormal, zero; the callers pass finite values only).
  const uint32_t e = (h >> 10) & 0x1F, m = h & 0x3FF;
  if (e == 0) return float(m) * bits_f32(uint32_t(127 - 24) << 23);  // m * 2^-24, exact
  return bits_f32(((e + 112) << 23) | (m << 13));
}

template <typename Fmt>
static long long sweep(bool bf16, long long& pairs, long long& exact_pairs) {
  std::vector<float> xs;
  for (uint32_t h = 0; h < 0x8000; ++h) {
    const uint32_t exp_mask = bf16 ? 0x7F80 : 0x7C00;
    if ((h & exp_mask) == exp_mask) continue;  // Inf/NaN: the kernel divides in such groups
    xs.push_back(from16(uint16_t(h), bf16));
  }
  // xs ascends with h for non-negative 16-bit floats.
  const float fmax = bits_f32(Fmt::kFmaxBits);
  const uint32_t tiny = uint32_t(127 - 26) << 23;
  long long bad = 0, n = 0, nx = 0;
#pragma omp parallel for schedule(dynamic, 64) reduction(+ : bad, n, nx)
  for (size_t a = 1; a < xs.size(); ++a) {
    const float s = xs[a] / fmax;
    if (f32_bits(s) < kReciprocalMinScaleBits) continue;
    const float r = 1.0f / s;
    long long local_bad = 0, local_exact = 0;
#pragma omp simd reduction(+ : local_bad, local_exact)
    for (size_t i = 0; i <= a; ++i) {
      const float want = xs[i] / s;
      const float got = reciprocal_quotient(xs[i], s, r);
      const bool exact_zone = f32_bits(want) >= tiny;
      local_exact += exact_zone;
      local_bad += exact_zone ? (f32_bits(got) != f32_bits(want)) : (encode_fp8<Fmt>(got) != encode_fp8<Fmt>(want));
    }
    bad += local_bad;
    nx += local_exact;
    n += (long long)(a + 1);
  }
  pairs = n;
  exact_pairs = nx;
  return bad;
}

// fp8_codec.h's mx_exponent<Fmt, true> (integer bits only) against ceil(log2(RN(a / FMAX))) from the
// division, for every finite float32 a >= 0 (the 1e-4 floor applied as the kernel applies it).
template <typename Fmt>
static long long sweep_mx_exponent(long long& n) {
  constexpr uint32_t kFloorBits = 0x38D1B717u;  // 1e-4f
  long long bad = 0;
#pragma omp parallel for schedule(static) reduction(+ : bad)
  for (long long i = 0; i < 0x7F800000LL; ++i) {
    const uint32_t a = uint32_t(i);
    const uint32_t floored = a > kFloorBits ? a : kFloorBits;
    const uint32_t r = f32_bits(bits_f32(floored) / bits_f32(Fmt::kFmaxBits));
    const int32_t want = int32_t(r >> 23) - 127 + ((r & 0x7FFFFFu) != 0);
    bad += mx_exponent<Fmt, true>(a) != want;
  }
  n = 0x7F800000LL;
  return bad;
}

int main() {
  long long total_bad = 0;
  for (int fmt = 0; fmt < 2; ++fmt) {
    long long n = 0;
    const long long bad = fmt == 0 ? sweep_mx_exponent<E4M3>(n) : sweep_mx_exponent<E5M2>(n);
    std::printf("mx_exponent %s: %lld amax values, %lld mismatches\n", fmt == 0 ? "e4m3fn" : "e5m2", n, bad);
    total_bad += bad;
  }
  for (int bf16 = 1; bf16 >= 0; --bf16) {
    for (int fmt = 0; fmt < 2; ++fmt) {
      long long pairs = 0, exact = 0;
      const long long bad = fmt == 0 ? sweep<E4M3>(bf16, pairs, exact) : sweep<E5M2>(bf16, pairs, exact);
      std::printf("%s %s: %lld pairs (%lld with x/S >= 2^-26, compared as float32), %lld mismatches\n",
                  bf16 ? "bfloat16" : "float16", fmt == 0 ? "e4m3fn" : "e5m2", pairs, exact, bad);
      total_bad += bad;
    }
  }
  return total_bad == 0 ? 0 : 1;
}
