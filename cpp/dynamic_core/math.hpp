// The micro-core arithmetic. Only + - * / and sqrt (which IEEE rounds identically everywhere):
// no libm transcendental calls, so the same code gives bit-identical results in cuda/.
// Build with FMA contraction off (-ffp-contract=off, NVRTC --fmad=false).
#pragma once
#if defined(__CUDACC_RTC__)
// NVRTC has no C++ standard library headers: the fixed-width types the shared headers use.
typedef signed char int8_t;
typedef short int16_t;
typedef int int32_t;
typedef long long int64_t;
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
#else
#include <cstdint>
#endif

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define DC_HOST_DEVICE __host__ __device__
#define DC_SQRT(x) ::sqrt(x)  // IEEE round-to-nearest with the default -prec-sqrt=true
#else
#define DC_HOST_DEVICE
#define DC_SQRT(x) __builtin_sqrt(x)  // one sqrtsd instruction
#endif

namespace dynamic_core {

inline constexpr double kWeakAction = 0.2;
inline constexpr double kStrongAction = 0.6;
inline constexpr int kWarpSize = 32;
inline constexpr int kMaxWarpsPerSm = 4;  // cores_per_sm: 32 .. 128
inline constexpr int kFeatures = 5;  // trend, rsi, macd, bb, mom

DC_HOST_DEVICE inline double dc_abs(double x) { return x < 0.0 ? -x : x; }
DC_HOST_DEVICE inline double dc_max(double a, double b) { return a < b ? b : a; }
// x - x is NaN for +-inf and NaN, 0 otherwise.
DC_HOST_DEVICE inline bool dc_finite(double x) { return (x - x) == 0.0; }

// Close-to-close return of a bar (the first bar of a stream has none: 0).
DC_HOST_DEVICE inline double bar_return(double close, double prev_close) { return close / prev_close - 1.0; }

// Squash to (-1, 1).
DC_HOST_DEVICE inline double soft(double x) { return x / (1.0 + dc_abs(x)); }

// -2 STRONG_SELL, -1 SELL, 0 HOLD, 1 BUY, 2 STRONG_BUY.
// Branch-free: a sum of comparisons.
DC_HOST_DEVICE inline int score_to_action(double s, double weak = kWeakAction,
                                          double strong = kStrongAction) {
  return static_cast<int>(s >= strong) + static_cast<int>(s >= weak) - static_cast<int>(s <= -weak) -
         static_cast<int>(s <= -strong);
}

// ---- features, each in [-1, 1]; 0 when the normaliser is 0 ------------------------------
DC_HOST_DEVICE inline double trend_feature(double ema_fast, double ema_slow, double atr) {
  return atr == 0.0 ? 0.0 : soft((ema_fast - ema_slow) / atr);
}
DC_HOST_DEVICE inline double rsi_feature(double rsi) { return (rsi - 50.0) / 50.0; }
DC_HOST_DEVICE inline double macd_feature(double hist, double atr) {
  return atr == 0.0 ? 0.0 : soft(hist / atr);
}
// Position of the close inside exponentially weighted bands of two standard deviations.
DC_HOST_DEVICE inline double bb_feature(double close, double mean, double var) {
  double sd = var > 0.0 ? DC_SQRT(var) : 0.0;
  return sd == 0.0 ? 0.0 : soft((close - mean) / (2.0 * sd));
}
// Population variance of n values from their sum and sum of squares: sq/n - mean^2, taken as 0
// below 2^-46 of sq/n, the rounding error that one-pass form can carry (sums of up to ~2^20
// values). Equal values left ~1e-17 there, whose square root was a spread of ~1e-8 none of
// them had (a unanimous signal's dispersion, its confidence below 1).
DC_HOST_DEVICE inline double moment_variance(double sum, double sq, double n) {
  const double m2 = sq / n, mean = sum / n;
  const double var = m2 - mean * mean;
  return var > m2 * 0x1p-46 ? var : 0.0;
}

// Rate of change in percent (TA-Lib ROC), squashed.
DC_HOST_DEVICE inline double mom_feature(double roc_pct) { return soft(roc_pct); }

// Weighted blend in a fixed order; `dsi` (the lane's w_dsi x its stream's DSI evidence) is added
// last when it is not 0, so lanes that do not read DSI blend exactly as without it.
DC_HOST_DEVICE inline double blend(const double* w, const double* f, double dsi = 0.0) {
  double x = w[0] * f[0];
  x = x + w[1] * f[1];
  x = x + w[2] * f[2];
  x = x + w[3] * f[3];
  x = x + w[4] * f[4];
  if (dsi != 0.0) x = x + dsi;
  return soft(x);
}

// ---- one agent, one bar -------------------------------------------------------------------
struct LaneState {
  double score;
  double equity;
  double entry_equity;
  double peak;
  double max_dd;
  double ret_sum;
  double ret_sq;
  uint32_t trades;
  uint32_t wins;
  uint32_t n_ret;
  int32_t position;
  int32_t action;
  uint32_t quarantined;
};

DC_HOST_DEVICE inline void lane_init(LaneState& s) {
  s.score = 0.0;
  s.equity = 1.0;
  s.entry_equity = 1.0;
  s.peak = 1.0;
  s.max_dd = 0.0;
  s.ret_sum = 0.0;
  s.ret_sq = 0.0;
  s.trades = 0;
  s.wins = 0;
  s.n_ret = 0;
  s.position = 0;
  s.action = 0;
  s.quarantined = 0;
}

// The micro-core step, written without branches (selects only) so a warp of lanes vectorises on
// the CPU and does not diverge on the GPU. `score` is the blended score of this bar, `ret` the
// bar's close-to-close return (0 on the stream's first bar), `warm` whether every indicator the
// agent uses has produced output, `cost` the cost per unit of position change as a fraction of
// equity. Returns the next state in `o`, and 0 when it would turn non-finite (the caller then
// quarantines the lane and keeps the previous state).
DC_HOST_DEVICE inline int lane_step(const LaneState& s, LaneState& o, double score, double ret, int warm,
                                    double entry, int long_short, double cost) {
  // Conditions are kept as 0/1 integers (not bool) so that every select has one mask width and
  // the lane loop vectorises.
  const int prev = s.position;
  const double g = 1.0 + static_cast<double>(prev) * ret;
  double e = s.equity * g;
  const int up = score > entry ? 1 : 0;
  const int dn = score < -entry ? 1 : 0;
  int pos = up ? 1 : (dn ? -long_short : prev);
  pos = warm ? pos : 0;
  const int d = pos > prev ? pos - prev : prev - pos;
  const double c = cost * static_cast<double>(d);
  e = e - e * c;
  const double r = g * (1.0 - c) - 1.0;
  const int changed = pos != prev ? 1 : 0;
  const int closing = (prev != 0 ? 1 : 0) & changed;
  const int opening = (pos != 0 ? 1 : 0) & changed;
  const int won = e > s.entry_equity ? 1 : 0;
  o.ret_sum = warm ? s.ret_sum + r : s.ret_sum;
  o.ret_sq = warm ? s.ret_sq + r * r : s.ret_sq;
  o.n_ret = s.n_ret + static_cast<uint32_t>(warm);
  o.trades = s.trades + static_cast<uint32_t>(closing);
  o.wins = s.wins + static_cast<uint32_t>(closing & won);
  o.entry_equity = opening ? e : s.entry_equity;
  o.peak = e > s.peak ? e : s.peak;
  const double dd = (o.peak - e) / o.peak;
  o.max_dd = dd > s.max_dd ? dd : s.max_dd;
  o.equity = e;
  o.position = pos;
  o.score = score;
  o.action = score_to_action(score);
  o.quarantined = 0;
  return (dc_finite(e) ? 1 : 0) & (dc_finite(score) ? 1 : 0);
}

// Consensus weight of an agent: equity discounted by its worst drawdown, times the credit its
// live trades earned (1.0 = neutral; set from outside between updates). x * 1.0 is exact, so
// an engine that never sets credit weighs as before. Both factors are floored at 0: a short
// caught in a rise of more than 100% in one bar leaves equity below 0 and, once equity is back
// above 0, a drawdown above 1; such an agent weighs nothing rather than voting inverted.
// Credit is at most kMaxCredit (set_credit refuses more): 1e6 times the weight of the fittest
// agent is already all of the consensus.
inline constexpr double kMaxCredit = 1e6;
DC_HOST_DEVICE inline double fitness(double equity, double max_dd, double credit = 1.0) {
  return dc_max(equity, 0.0) * dc_max(1.0 - max_dd, 0.0) * credit;
}

// ---- SM summaries and fusion ----------------------------------------------------------------
// Floating-point sums go through the canonical order (lanes by a pairwise tree, warps in index
// order, SMs in index order); counts are integers, whose sum does not depend on order.
struct Summary {
  double sum_w;
  double sum_ws;
  double sum_s;
  double sum_s2;
  uint32_t n;
  uint32_t votes[5];  // STRONG_SELL .. STRONG_BUY
};

DC_HOST_DEVICE inline void summary_zero(Summary& a) {
  a.sum_w = 0.0;
  a.sum_ws = 0.0;
  a.sum_s = 0.0;
  a.sum_s2 = 0.0;
  a.n = 0;
  for (int k = 0; k < 5; ++k) a.votes[k] = 0;
}

DC_HOST_DEVICE inline void summary_add(Summary& a, const Summary& b) {
  a.sum_w = a.sum_w + b.sum_w;
  a.sum_ws = a.sum_ws + b.sum_ws;
  a.sum_s = a.sum_s + b.sum_s;
  a.sum_s2 = a.sum_s2 + b.sum_s2;
  a.n += b.n;
  for (int k = 0; k < 5; ++k) a.votes[k] += b.votes[k];
}

// Canonical warp reduction of one float sum: a pairwise tree with strides 16, 8, 4, 2, 1 (the
// order of __shfl_down_sync on the GPU). `v` holds kWarpSize values (0 for lanes that do not
// count); returns the total.
DC_HOST_DEVICE inline double warp_tree(double* v) {
  for (int stride = kWarpSize / 2; stride > 0; stride /= 2)
    for (int i = 0; i < stride; ++i) v[i] = v[i] + v[i + stride];
  return v[0];
}

struct Fused {
  double score;
  double confidence;
  double agreement;
  double dispersion;
  int action;
  uint32_t n;
  uint32_t votes[5];
};

// DynamicFusionAlgo: fuse the summary of every SM of one stream (already added in SM order).
DC_HOST_DEVICE inline Fused fuse(const Summary& t) {
  Fused f;
  f.n = t.n;
  for (int k = 0; k < 5; ++k) f.votes[k] = t.votes[k];
  if (t.n == 0) {
    f.score = 0.0;
    f.confidence = 0.0;
    f.agreement = 0.0;
    f.dispersion = 0.0;
    f.action = 0;
    return f;
  }
  const double n = static_cast<double>(t.n);
  // fitness-weighted; the plain mean when no agent has weight, or when the weighted sums
  // overflowed (equities grown past ~1e300 by absurd prices): inf/inf would be NaN
  const bool weighted = t.sum_w > 0.0 && dc_finite(t.sum_w) && dc_finite(t.sum_ws);
  f.score = weighted ? t.sum_ws / t.sum_w : t.sum_s / n;
  f.action = score_to_action(f.score);
  f.dispersion = DC_SQRT(moment_variance(t.sum_s, t.sum_s2, n));
  uint32_t agree;
  if (f.action > 0) {
    agree = t.votes[3] + t.votes[4];
  } else if (f.action < 0) {
    agree = t.votes[0] + t.votes[1];
  } else {
    agree = t.votes[2];
  }
  f.agreement = static_cast<double>(agree) / n;
  const double conf = f.agreement * (1.0 - f.dispersion);
  f.confidence = conf < 0.0 ? 0.0 : (conf > 1.0 ? 1.0 : conf);
  return f;
}

}  // namespace dynamic_core
