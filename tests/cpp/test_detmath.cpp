// detmath.hpp against the C library's long double functions (an independent reference, ~64-bit
// significand): within the documented ulp bound over a sweep of each function's domain, the
// special values, and the same bits from this build (which may target any x86-64 level,
// DC_ARCH=native included) as the digests pinned from the Python module's build.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>

#include "check.hpp"
#include "dynamic_core/detmath.hpp"

namespace dm = dynamic_core::detmath;

namespace {

double ulps(double got, long double ref) {
  const double r = static_cast<double>(ref);
  if (r == 0.0) return got == 0.0 ? 0.0 : 1e300;
  const double u = std::nextafter(std::fabs(r), INFINITY) - std::fabs(r);
  return static_cast<double>(std::fabs(static_cast<long double>(got) - ref) / u);
}

template <class F, class R>
double worst(F f, R ref, double lo, double hi, int n, std::mt19937_64& rng) {
  std::uniform_real_distribution<double> u(lo, hi);
  double w = 0.0;
  for (int i = 0; i < n; ++i) {
    const double x = u(rng);
    const long double r = ref(static_cast<long double>(x));
    if (!std::isfinite(static_cast<double>(r)) || (r != 0 && std::fabs(r) < 2.2250738585072014e-308L)) continue;
    const double e = ulps(f(x), r);
    if (e > w) w = e;
  }
  return w;
}

// FNV-1a over the bits of f at N evenly spaced points of [lo, hi) (only * / + -: the same inputs
// in any build and in numpy).
uint64_t digest(double (*f)(double), double lo, double hi) {
  const int N = 4096;
  uint64_t h = 0xcbf29ce484222325ULL;
  for (int i = 0; i < N; ++i) {
    const double x = lo + (hi - lo) * (static_cast<double>(i) / N);
    const double y = f(x);
    uint64_t b;
    std::memcpy(&b, &y, sizeof b);
    h = (h ^ b) * 0x100000001b3ULL;
  }
  return h;
}

}  // namespace

int main() {
  std::mt19937_64 rng(20261123);
  const int n = 200000;
  // long double references have ~11 bits beyond double: the bound allows for their own error
  const double slack = 0.02;
  CHECK(worst(dm::exp, [](long double x) { return std::exp(x); }, -745.0, 709.7, n, rng) <= 2.0 + slack);
  CHECK(worst(dm::exp, [](long double x) { return std::exp(x); }, -1.0, 1.0, n, rng) <= 2.0 + slack);
  CHECK(worst(dm::exp2, [](long double x) { return std::exp2(x); }, -1022.0, 1023.9, n, rng) <= 2.0 + slack);
  CHECK(worst(dm::expm1, [](long double x) { return std::expm1(x); }, -3.0, 3.0, n, rng) <= 2.0 + slack);
  CHECK(worst(dm::expm1, [](long double x) { return std::expm1(x); }, -1e-6, 1e-6, n, rng) <= 2.0 + slack);
  CHECK(worst(dm::log, [](long double x) { return std::log(x); }, 1e-300, 1e300, n, rng) <= 2.0 + slack);
  CHECK(worst(dm::log, [](long double x) { return std::log(x); }, 0.5, 2.0, n, rng) <= 2.0 + slack);
  CHECK(worst(dm::tanh, [](long double x) { return std::tanh(x); }, -20.0, 20.0, n, rng) <= 2.5 + slack);
  CHECK(worst(dm::tanh, [](long double x) { return std::tanh(x); }, -1.0, 1.0, n, rng) <= 2.5 + slack);
  // cos(2 pi u) from the quarter turn (exact in double) and the long double angle of what is left
  // of it, so the reference keeps its relative accuracy near the zeros
  const long double two_pi = 6.283185307179586476925286766559L;
  auto cos_ref = [&](long double ul) {
    const double u = static_cast<double>(ul);
    const double v = u - std::nearbyint(u), q = std::nearbyint(4.0 * v), t = v - 0.25 * q;
    const long double a = two_pi * static_cast<long double>(t);
    switch (static_cast<int>(q) & 3) {
      case 0: return std::cos(a);
      case 1: return -std::sin(a);
      case 2: return -std::cos(a);
      default: return std::sin(a);
    }
  };
  CHECK(worst(dm::cos2pi, cos_ref, -4.0, 4.0, n, rng) <= 2.0 + slack);
  CHECK(worst(dm::cos2pi, cos_ref, 0.2499, 0.2501, n, rng) <= 2.0 + slack);

  CHECK_EQ(dm::exp(0.0), 1.0);
  CHECK_EQ(dm::exp(-INFINITY), 0.0);
  CHECK_EQ(dm::exp(INFINITY), INFINITY);
  CHECK(std::isnan(dm::exp(NAN)));
  for (int k = -1074; k < 1024; ++k) CHECK_EQ(dm::exp2(k), std::ldexp(1.0, k));
  CHECK_EQ(dm::log(1.0), 0.0);
  CHECK_EQ(dm::log(0.0), -INFINITY);
  CHECK(std::isnan(dm::log(-1.0)));
  CHECK(ulps(dm::log(5e-324), std::log(static_cast<long double>(5e-324))) <= 2.0);  // the least subnormal
  CHECK_EQ(dm::tanh(INFINITY), 1.0);
  CHECK_EQ(dm::cos2pi(0.5), -1.0);
  CHECK_EQ(dm::cos2pi(0.25), 0.0);
  CHECK(std::isnan(dm::cos2pi(INFINITY)));

  // the bits the Python module's build (default x86-64 target) gives on the same inputs
  CHECK_EQ(digest(dm::exp, -745.0, 709.7), 0xeef535d742353b9fULL);
  CHECK_EQ(digest(dm::exp2, -1080.0, 1030.0), 0x515d45c4fab1af5dULL);
  CHECK_EQ(digest(dm::expm1, -40.0, 40.0), 0x4339648dce373e4fULL);
  CHECK_EQ(digest(dm::log, 1e-300, 1e300), 0x1af01e445dd074b0ULL);
  CHECK_EQ(digest(dm::tanh, -25.0, 25.0), 0xcc4831b346cccc85ULL);
  CHECK_EQ(digest(dm::cos2pi, -4.0, 4.0), 0x3d2166385da15825ULL);
  return finish("test_detmath");
}
