// Transcendental functions with the same bits on every machine: exp, exp2, expm1, log, tanh and
// cos(2 pi u), from + - * / and exponent-bit arithmetic only, each in one fixed order of operations.
//
// Why: numpy's vector exp/log/power/cos take a different code path per CPU (AVX-512 kernels on one
// machine, the C library's scalar functions on another) and do not agree in the last bit; the C
// library itself differs between systems. The simulated market and the DSI fusion go through these
// instead, so the same seed gives the same bars and the same evidence on any machine.
//
// Accuracy: within 2 ulp of the exact value (tanh 2.5) over the whole double range, measured
// against 120-bit references (tests/test_detmath.py); not correctly rounded. Build with FMA
// contraction off (-ffp-contract=off; NVRTC --fmad=false), as all of cpp/dynamic_core is.
#pragma once
#include "math.hpp"

#if !defined(__CUDACC__) && !defined(__CUDACC_RTC__)
#include <cstring>
#endif

namespace dynamic_core::detmath {

namespace detail {
DC_HOST_DEVICE inline double from_bits(uint64_t b) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(b));
#else
  double d;
  std::memcpy(&d, &b, sizeof d);
  return d;
#endif
}
DC_HOST_DEVICE inline uint64_t to_bits(double d) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(d));
#else
  uint64_t b;
  std::memcpy(&b, &d, sizeof b);
  return b;
#endif
}
// Nearest integer (ties to even) of |x| < 2^51, as a double: adding and removing 1.5 * 2^52 leaves
// no fraction bits.
DC_HOST_DEVICE inline double round_int(double x) {
  constexpr double kShift = 6755399441055744.0;
  return (x + kShift) - kShift;
}
// 2^k, exactly, for k in [-1022, 1023].
DC_HOST_DEVICE inline double pow2(int k) { return from_bits(static_cast<uint64_t>(k + 1023) << 52); }
inline constexpr uint64_t kInfBits = 0x7ff0000000000000ULL;
inline constexpr uint64_t kNanBits = 0x7ff8000000000000ULL;
// p * 2^k for p in [0.5, 2] and any k: in two exact steps where 2^k alone is out of range.
DC_HOST_DEVICE inline double scale(double p, int k) {
  if (k > 1023) return p * pow2(1023) * pow2(k - 1023);
  if (k < -1022) return p * pow2(k + 1000) * pow2(-1000);  // the second step rounds once, into subnormals
  return p * pow2(k);
}

// ln 2 in two parts (fdlibm's): the high part has 32 significant bits, so k * kLn2Hi is exact for
// |k| < 2^21.
inline constexpr double kLn2Hi = 6.93147180369123816490e-01;
inline constexpr double kLn2Lo = 1.90821492927058770002e-10;
inline constexpr double kInvLn2 = 1.44269504088896338700e+00;

// exp(r) - 1 for |r| <= 0.35: Taylor to r^14 (the next term is below 2^-60 of the result), Horner.
DC_HOST_DEVICE inline double expm1_small(double r) {
  double p = 1.0 / 87178291200.0;  // 1/14!
  p = p * r + 1.0 / 6227020800.0;
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  return r + (r * r) * p;
}
}  // namespace detail

// e^x. NaN stays NaN; above ~709.78 it is +inf, below ~-745.13 it is 0.
DC_HOST_DEVICE inline double exp(double x) {
  if (x != x) return x;
  if (x > 709.782712893383973096) return detail::from_bits(detail::kInfBits);
  if (x < -745.13321910194110842) return 0.0;
  const double kd = detail::round_int(x * detail::kInvLn2);
  const double r = (x - kd * detail::kLn2Hi) - kd * detail::kLn2Lo;  // |r| <= ~0.347
  return detail::scale(1.0 + detail::expm1_small(r), static_cast<int>(kd));
}

// 2^x, exact for integer x in range. NaN stays NaN; above 1024 it is +inf, below -1075 it is 0.
DC_HOST_DEVICE inline double exp2(double x) {
  if (x != x) return x;
  if (x >= 1024.0) return detail::from_bits(detail::kInfBits);
  if (x < -1075.0) return 0.0;
  const double kd = detail::round_int(x);
  const double f = x - kd;  // exact, |f| <= 0.5
  const double r = f * detail::kLn2Hi + f * detail::kLn2Lo;
  return detail::scale(1.0 + detail::expm1_small(r), static_cast<int>(kd));
}

// e^x - 1, without the cancellation of exp(x) - 1 near 0: with x = k ln 2 + r,
// e^x - 1 = 2^k (e^r - 1) + (2^k - 1), where 2^k - 1 is exact for |k| <= 53.
DC_HOST_DEVICE inline double expm1(double x) {
  if (x != x) return x;
  if (x > -0.34657359027997264 && x < 0.34657359027997264) return detail::expm1_small(x);
  if (x > 36.0 || x < -36.0) return exp(x) - 1.0;  // e^x >= 2^51 or <= 2^-51: one rounding more
  const double kd = detail::round_int(x * detail::kInvLn2);
  const double r = (x - kd * detail::kLn2Hi) - kd * detail::kLn2Lo;
  const int k = static_cast<int>(kd);
  return detail::pow2(k) * detail::expm1_small(r) + (detail::pow2(k) - 1.0);
}

namespace detail {
// log(x) + e_adj * ln 2 for a positive, normal, finite x and a whole e_adj: no branch (the
// choices are selects), so a loop of it vectorises, with the same bits as one call.
DC_HOST_DEVICE inline double log_normal(double x, double e_adj) {
  const uint64_t b = to_bits(x);
  // the biased exponent as a double, exactly: its 11 bits under the bits of 2^52, minus 2^52
  const double eb = from_bits(0x4330000000000000ULL | (b >> 52)) - 4503599627370496.0;
  double m = from_bits((b & 0x000fffffffffffffULL) | 0x3ff0000000000000ULL);  // [1, 2)
  const bool big = m > 1.4142135623730951;
  m = big ? m * 0.5 : m;  // (0.707, 1.414]
  const double ed = ((eb - 1023.0) + (big ? 1.0 : 0.0)) + e_adj;  // whole numbers: exact
  // log m = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.1716: the odd series to s^25
  const double f = m - 1.0;  // exact (Sterbenz)
  const double s = f / (2.0 + f);
  const double z = s * s;
  double p = 1.0 / 25.0;
  p = p * z + 1.0 / 23.0;
  p = p * z + 1.0 / 21.0;
  p = p * z + 1.0 / 19.0;
  p = p * z + 1.0 / 17.0;
  p = p * z + 1.0 / 15.0;
  p = p * z + 1.0 / 13.0;
  p = p * z + 1.0 / 11.0;
  p = p * z + 1.0 / 9.0;
  p = p * z + 1.0 / 7.0;
  p = p * z + 1.0 / 5.0;
  p = p * z + 1.0 / 3.0;
  // 2s = f - f s, so log m = 2s + 2s z p = f - s (f - 2 z p)
  const double logm = f - s * (f - 2.0 * z * p);
  return ed * kLn2Hi + (ed * kLn2Lo + logm);
}
inline constexpr double kMinNormal = 2.2250738585072014e-308;
inline constexpr double kMaxFinite = 1.7976931348623157e308;
}  // namespace detail

// Natural logarithm. log(0) = -inf, log(x < 0) = NaN, log(+inf) = +inf, NaN stays NaN.
DC_HOST_DEVICE inline double log(double x) {
  if (x >= detail::kMinNormal && x <= detail::kMaxFinite) return detail::log_normal(x, 0.0);
  if (x != x) return x;
  if (x < 0.0) return detail::from_bits(detail::kNanBits);
  if (x == 0.0) return -detail::from_bits(detail::kInfBits);
  if (x > detail::kMaxFinite) return x;
  return detail::log_normal(x * 18014398509481984.0, -54.0);  // subnormal: times 2^54, exactly
}

// log over an array: the branch-free pass over every element (vectorised by the compiler), then
// the elements outside the positive normal range again through log(). The same bits as log().
DC_HOST_DEVICE inline void log_array(const double* x, double* out, long n) {
  for (long i = 0; i < n; ++i) out[i] = detail::log_normal(x[i], 0.0);
  for (long i = 0; i < n; ++i)
    if (!(x[i] >= detail::kMinNormal && x[i] <= detail::kMaxFinite)) out[i] = log(x[i]);
}

// Hyperbolic tangent; tanh(+-inf) = +-1, NaN stays NaN, tiny x gives x.
DC_HOST_DEVICE inline double tanh(double x) {
  if (x != x) return x;
  const double a = x < 0.0 ? -x : x;
  double t;
  if (a > 22.0) {
    t = 1.0;  // 1 - tanh(a) < 2^-63
  } else if (a < 3.7252902984619141e-09) {  // 2^-28: tanh(a) = a to double precision
    t = a;
  } else {
    const double em = expm1(2.0 * a);  // tanh(a) = (e^2a - 1) / (e^2a + 1)
    t = em / (em + 2.0);
  }
  return x < 0.0 ? -t : t;
}

// cos(2 pi u): the turn fraction is taken exactly (u - round(u), then quarter turns), so only
// the final angle of at most pi/4 is rounded. Infinite u gives NaN.
DC_HOST_DEVICE inline double cos2pi(double u) {
  if (u != u || u - u != 0.0) return detail::from_bits(detail::kNanBits);
  if (u >= 4503599627370496.0 || u <= -4503599627370496.0) return 1.0;  // |u| >= 2^52: a whole turn
  const double v = u - detail::round_int(u);       // [-0.5, 0.5], exact
  const double qd = detail::round_int(4.0 * v);    // quarter turns, -2 .. 2
  const double t = v - 0.25 * qd;                  // [-1/8, 1/8], exact
  const double a = t * 6.28318530717958647692;     // |a| <= pi/4
  const double z = a * a;
  // sin a = a (1 - z/3! + z^2/5! - ...) to a^19; cos a = 1 - z/2! + ... to a^20
  double s = -1.0 / 121645100408832000.0;  // -1/19!
  s = s * z + 1.0 / 355687428096000.0;
  s = s * z - 1.0 / 1307674368000.0;
  s = s * z + 1.0 / 6227020800.0;
  s = s * z - 1.0 / 39916800.0;
  s = s * z + 1.0 / 362880.0;
  s = s * z - 1.0 / 5040.0;
  s = s * z + 1.0 / 120.0;
  s = s * z - 1.0 / 6.0;
  const double sin_a = a + a * z * s;
  double c = 1.0 / 2432902008176640000.0;  // 1/20!
  c = c * z - 1.0 / 6402373705728000.0;
  c = c * z + 1.0 / 20922789888000.0;
  c = c * z - 1.0 / 87178291200.0;
  c = c * z + 1.0 / 479001600.0;
  c = c * z - 1.0 / 3628800.0;
  c = c * z + 1.0 / 40320.0;
  c = c * z - 1.0 / 720.0;
  c = c * z + 1.0 / 24.0;
  c = c * z - 0.5;
  const double cos_a = 1.0 + z * c;
  const int q = static_cast<int>(qd) & 3;  // -2 .. 2 -> 2, 3, 0, 1, 2
  if (q == 0) return cos_a;
  if (q == 1) return -sin_a;
  if (q == 2) return -cos_a;
  return sin_a;
}

}  // namespace dynamic_core::detmath
