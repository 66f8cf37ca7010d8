// O(1)-state streaming indicators with TA-Lib conventions: the same seeding (SMA of the first
// period), the same lookback and the same order of floating-point operations, so the values
// equal TA-Lib's from its first output on. update() returns true once the indicator is warm.
#pragma once
#include "math.hpp"  // also the fixed-width integer types (under NVRTC too)

namespace dynamic_core {

// TA-Lib's PER_TO_K.
DC_HOST_DEVICE inline double per_to_k(int32_t n) { return 2.0 / static_cast<double>(n + 1); }
// TA-Lib's TA_IS_ZERO.

struct Ema {
  int32_t n;
  int32_t count;
  double k;
  double sum;
  double value;

  DC_HOST_DEVICE static constexpr int32_t lookback(int32_t n) { return n - 1; }
  DC_HOST_DEVICE void init(int32_t period) {
    n = period;
    count = 0;
    k = per_to_k(period);
    sum = 0.0;
    value = 0.0;
  }
  DC_HOST_DEVICE bool update(double x) {
    if (count < n) {
      sum += x;
      if (++count < n) return false;
      value = sum / static_cast<double>(n);
      return true;
    }
    // period 1 is the input itself, as in TA-Lib: the blend with k = 1 is not (x - v + v != x
    // once x and v differ by more than 2x; NaN for good after one NaN or inf)
    value = n == 1 ? x : ((x - value) * k) + value;
    return true;
  }
};

// Wilder's RSI as TA-Lib computes it.
struct Rsi {
  int32_t n;
  int32_t count;  // bars seen, saturating at n + 1
  double prev;
  double gain;
  double loss;
  double value;

  DC_HOST_DEVICE static constexpr int32_t lookback(int32_t n) { return n; }
  DC_HOST_DEVICE void init(int32_t period) {
    n = period;
    count = 0;
    prev = gain = loss = value = 0.0;
  }
  DC_HOST_DEVICE void finish() {
    const double t = gain + loss;
    value = t != 0.0 ? 100.0 * (gain / t) : 0.0;  // TA-Lib 0.6+: only an exact 0 gives 0
  }
  DC_HOST_DEVICE bool update(double x) {
    if (count == 0) {
      prev = x;
      count = 1;
      return false;
    }
    const double d = x - prev;
    prev = x;
    if (count <= n) {
      if (d < 0) loss -= d; else gain += d;
      if (++count <= n) return false;
      loss /= n;
      gain /= n;
      finish();
      return true;
    }
    loss *= (n - 1);
    gain *= (n - 1);
    if (d < 0) loss -= d; else gain += d;
    loss /= n;
    gain /= n;
    finish();
    return true;
  }
};

DC_HOST_DEVICE inline double true_range(double high, double low, double prev_close) {
  double greatest = high - low;
  const double v2 = dc_abs(prev_close - high);
  if (v2 > greatest) greatest = v2;
  const double v3 = dc_abs(prev_close - low);
  if (v3 > greatest) greatest = v3;
  return greatest;
}

// Wilder's ATR as TA-Lib computes it (first value: SMA of the first n true ranges).
struct Atr {
  int32_t n;
  int32_t count;
  double prev_close;
  double sum;
  double value;

  DC_HOST_DEVICE static constexpr int32_t lookback(int32_t n) { return n; }
  DC_HOST_DEVICE void init(int32_t period) {
    n = period;
    count = 0;
    prev_close = sum = value = 0.0;
  }
  DC_HOST_DEVICE bool update(double high, double low, double close) {
    if (count == 0) {
      prev_close = close;
      count = 1;
      return false;
    }
    const double tr = true_range(high, low, prev_close);
    prev_close = close;
    if (count <= n) {
      sum += tr;
      if (++count <= n) return false;
      value = sum / static_cast<double>(n);
      return true;
    }
    value *= n - 1;
    value += tr;
    value /= n;
    return true;
  }
};

// TA-Lib's MACD: both EMAs are seeded at bar slow-1 (the fast one with the SMA of the `fast`
// bars ending there, not of the first `fast` bars), the signal line with the SMA of the first
// `signal` MACD values; output starts at bar slow-1 + signal-1.
struct Macd {
  int32_t fast_n;
  int32_t slow_n;
  int32_t sig_n;
  int32_t count;  // bars seen, saturating once warm
  double kf;
  double ks;
  double ksig;
  double fast_sum;
  double slow_sum;
  double sig_sum;
  double fast;
  double slow;
  double macd;
  double signal;
  double hist;

  DC_HOST_DEVICE static constexpr int32_t lookback(int32_t f, int32_t s, int32_t sig) {
    return (s < f ? f : s) - 1 + sig - 1;
  }
  DC_HOST_DEVICE void init(int32_t f, int32_t s, int32_t sig) {
    if (s < f) {  // TA-Lib swaps them
      const int32_t t = f;
      f = s;
      s = t;
    }
    fast_n = f;
    slow_n = s;
    sig_n = sig;
    count = 0;
    kf = per_to_k(f);
    ks = per_to_k(s);
    ksig = per_to_k(sig);
    fast_sum = slow_sum = sig_sum = fast = slow = macd = signal = hist = 0.0;
  }
  DC_HOST_DEVICE bool update(double x) {
    const int32_t t = count;  // index of this bar
    const int32_t warm_at = slow_n - 1 + sig_n - 1;
    if (t <= warm_at) ++count;
    if (t < slow_n - 1) {
      slow_sum += x;
      if (t >= slow_n - fast_n) fast_sum += x;
      return false;
    }
    if (t == slow_n - 1) {
      slow_sum += x;
      fast_sum += x;
      slow = slow_sum / static_cast<double>(slow_n);
      fast = fast_sum / static_cast<double>(fast_n);
    } else {
      slow = ((x - slow) * ks) + slow;
      fast = ((x - fast) * kf) + fast;
    }
    macd = fast - slow;
    const int32_t j = t - (slow_n - 1);
    if (j < sig_n - 1) {
      sig_sum += macd;
      return false;
    }
    if (j == sig_n - 1) {
      sig_sum += macd;
      signal = sig_sum / static_cast<double>(sig_n);
    } else {
      signal = ((macd - signal) * ksig) + signal;
    }
    hist = macd - signal;
    return true;
  }
};

// Exponentially weighted mean and variance (alpha = 2 / (n + 1), seeded with the first value);
// warm after n bars.
struct Ew {
  int32_t n;
  int32_t count;
  double alpha;
  double mean;
  double var;

  DC_HOST_DEVICE static constexpr int32_t lookback(int32_t n) { return n - 1; }
  DC_HOST_DEVICE void init(int32_t period) {
    n = period;
    count = 0;
    alpha = per_to_k(period);
    mean = var = 0.0;
  }
  DC_HOST_DEVICE bool update(double x) {
    if (count == 0) {
      mean = x;
      var = 0.0;
    } else {
      const double d = x - mean;
      mean = mean + alpha * d;
      var = (1.0 - alpha) * (var + alpha * d * d);
    }
    if (count < n) ++count;
    return count >= n;
  }
};

// TA-Lib's ROC: ((x / x[t-n]) - 1) * 100. The n previous values live in caller-owned storage
// `buf` (n doubles), so the state itself stays fixed-size.
struct Roc {
  int32_t n;
  int32_t count;
  int32_t pos;
  int32_t pad_;
  double value;

  DC_HOST_DEVICE static constexpr int32_t lookback(int32_t n) { return n; }
  DC_HOST_DEVICE void init(int32_t period) {
    n = period;
    count = 0;
    pos = 0;
    pad_ = 0;
    value = 0.0;
  }
  DC_HOST_DEVICE bool update(double x, double* buf) {
    bool warm = false;
    if (count >= n) {
      const double old = buf[pos];
      value = old != 0.0 ? ((x / old) - 1.0) * 100.0 : 0.0;
      warm = true;
    } else {
      ++count;
    }
    buf[pos] = x;
    if (++pos == n) pos = 0;
    return warm;
  }
};

}  // namespace dynamic_core
