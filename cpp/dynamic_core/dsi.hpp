// DSI micro-experts that are sequential by nature, each one pass over an instrument's batch of
// ticks with its state carried between batches (python/dynamic_core/learning/dsi/experts.py).
//
// The run experts (momentum burst, exhaustion, sweep / stop run): the per-tick state machine python/dynamic_core/learning/dsi/experts.py
// describes (RunExperts), with its state carried between batches, so a feed batched anywhere
// gives the same calls.
//
// A run is a maximal stretch of ticks whose last non-flat move points one way (flat ticks
// continue it; a move the other way starts the next). Per tick t with move mv:
//   new run (mv != 0, mv != dir): the finished run's end price (the price before t) joins the
//     last three ends; its direction, moves, aggressive share and largest size z become `prev`;
//     exhaustion fires (sign mv) when prev had >= exhaustion_moves moves, a size z >= climax_z
//     and a direction; the run restarts at t.
//   the run's moves, volume, aggressive volume (aggressor == dir) and largest size z take t.
//   momentum (sign dir): at a move that is the run's burst_moves-th, with aggressive volume
//     >= burst_share * volume and ts - run start <= burst_ns.
//   sweep (sign dir): the previous run pushed past the end before it (e1 beyond e3 against
//     dir) with >= sweep_moves moves and >= sweep_share aggressive volume, and this run has
//     taken back >= sweep_retrace of it; fires when that starts to hold within a run.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

#include "ew.hpp"

namespace dynamic_core::dsi {

struct RunParams {
  double burst_moves, burst_share;
  int64_t burst_ns;
  double exhaustion_moves, climax_z, sweep_moves, sweep_share, sweep_retrace;
};

// The carried state, laid out as the float64 array the Python side holds (kRunState values)
// plus the run's start time.
enum RunSlot : int {
  kDir,
  kMoves,
  kVol,
  kAggVol,
  kMaxZ,
  kArmed,
  kLastPrice,
  kEnd3,  // the last three run ends, oldest first
  kEnd2,
  kEnd1,
  kPrevDir,  // the last finished run
  kPrevMoves,
  kPrevShare,
  kPrevMaxZ,
  kRunState
};

struct Calls {
  std::vector<int64_t> index;
  std::vector<int8_t> sign;
  void add(size_t t, int s) {
    index.push_back(static_cast<int64_t>(t));
    sign.push_back(static_cast<int8_t>(s));
  }
};

// np.maximum: NaN if either is NaN.
inline double nan_max(double a, double b) {
  if (std::isnan(a) || std::isnan(b)) return std::numeric_limits<double>::quiet_NaN();
  return b > a ? b : a;
}

inline void runs(const int64_t* ts, const double* price, const double* size, const int8_t* move,
                 const int8_t* aggressor, const double* zsize, size_t n, const RunParams& p, double* st,
                 int64_t& start_ts, Calls& momentum, Calls& exhaustion, Calls& sweep) {
  int dir = static_cast<int>(st[kDir]);
  double moves = st[kMoves], vol = st[kVol], agg = st[kAggVol], maxz = st[kMaxZ];
  bool armed = st[kArmed] != 0.0;
  double last = st[kLastPrice];
  double e3 = st[kEnd3], e2 = st[kEnd2], e1 = st[kEnd1];
  double pdir = st[kPrevDir], pmoves = st[kPrevMoves], pshare = st[kPrevShare], pmaxz = st[kPrevMaxZ];
  for (size_t t = 0; t < n; ++t) {
    const int mv = move[t];
    if (mv != 0 && mv != dir) {
      e3 = e2;
      e2 = e1;
      e1 = last;
      pdir = dir;
      pmoves = moves;
      pshare = vol > 0.0 ? agg / vol : 0.0;
      pmaxz = maxz;
      if (pmoves >= p.exhaustion_moves && pmaxz >= p.climax_z && pdir != 0.0) exhaustion.add(t, mv);
      dir = mv;
      moves = vol = agg = 0.0;
      maxz = -std::numeric_limits<double>::infinity();
      start_ts = ts[t];
      armed = false;
    }
    moves = moves + (mv != 0 ? 1.0 : 0.0);
    vol = vol + size[t];
    agg = agg + (aggressor[t] == dir ? size[t] : 0.0);
    maxz = nan_max(maxz, zsize[t]);
    // the run's duration in uint64: start and end may be up to 2^64 ns apart (the difference
    // wrapped in int64 and read as a quick run); a time before the start (never after
    // validation) counts as no time
    const bool quick = ts[t] < start_ts || static_cast<uint64_t>(ts[t]) - static_cast<uint64_t>(start_ts) <=
                                               static_cast<uint64_t>(p.burst_ns);
    if (mv != 0 && moves == p.burst_moves && agg >= p.burst_share * vol && quick) momentum.add(t, dir);
    const double d = dir;
    const bool cond = dir != 0 && -d * (e1 - e3) > 0.0 && pmoves >= p.sweep_moves && pshare >= p.sweep_share &&
                      std::fabs(e1 - e2) > 0.0 && d * (price[t] - e1) >= p.sweep_retrace * std::fabs(e1 - e2);
    if (cond && !armed) sweep.add(t, dir);
    armed = cond;
    last = price[t];
  }
  st[kDir] = dir;
  st[kMoves] = moves;
  st[kVol] = vol;
  st[kAggVol] = agg;
  st[kMaxZ] = maxz;
  st[kArmed] = armed ? 1.0 : 0.0;
  st[kLastPrice] = last;
  st[kEnd3] = e3;
  st[kEnd2] = e2;
  st[kEnd1] = e1;
  st[kPrevDir] = pdir;
  st[kPrevMoves] = pmoves;
  st[kPrevShare] = pshare;
  st[kPrevMaxZ] = pmaxz;
}

// The divergence verifier (DivergenceVerifier in experts.py) as one pass over a batch: Wilder
// RSI and the MACD line (EMAs seeded with the first price) over the trade prices, then pivots
// confirmed `pivot` ticks after their centre (a high strictly above the `pivot` prices before
// it and at least the `pivot` after it; a low mirrored), each compared with the previous pivot
// of its kind: a further high (low) with a lower (higher) RSI or MACD line is a divergence,
// signed against it, called at the confirming tick. Every value is the numpy formulation's
// arithmetic in its order.
struct DivParams {
  int32_t rsi_period, macd_fast, macd_slow, pivot;
  int64_t warmup;  // pivots whose centre is an earlier tick of the stream are not compared
};

enum DivSlot : int {
  kDivLastPrice,
  kDivGain,
  kDivLoss,
  kDivEmaFast,
  kDivEmaSlow,
  kDivCount,  // ticks seen before this batch
  kDivHigh,   // price, rsi, macd of the previous pivot high
  kDivLow = kDivHigh + 3,
  kDivState = kDivLow + 3
};

// np.nan_to_num(x, nan=0.0)
inline double nan_to_num(double x) {
  if (std::isnan(x)) return 0.0;
  if (std::isinf(x)) return x > 0 ? std::numeric_limits<double>::max() : std::numeric_limits<double>::lowest();
  return x;
}

// tail: the last 2 * pivot (price, rsi, macd) rows before the batch, row-major; updated.
// rsi_out and macd_out (n values each) take the indicators at each tick.
inline void divergence(const double* price, size_t n, const DivParams& p, double* st, double* tail, Calls& rsi_calls,
                       Calls& macd_calls, double* rsi_out, double* macd_out) {
  if (n == 0) return;
  const size_t k = static_cast<size_t>(p.pivot), k2 = 2 * k;
  std::vector<double> ext((n + k2) * 3);
  std::copy(tail, tail + k2 * 3, ext.begin());
  const double a = 1.0 / p.rsi_period, r = 1.0 - a;
  const double af = 2.0 / (p.macd_fast + 1), as = 2.0 / (p.macd_slow + 1);
  const double rf = 1.0 - af, rs = 1.0 - as;
  const int64_t seen = static_cast<int64_t>(st[kDivCount]);
  double last = st[kDivLastPrice], g = st[kDivGain], l = st[kDivLoss];
  double ef = seen ? st[kDivEmaFast] : price[0], es = seen ? st[kDivEmaSlow] : price[0];
  for (size_t t = 0; t < n; ++t) {
    const double diff = nan_to_num(price[t] - last);
    const double nd = -diff;
    g = ew::step(g, r, (diff >= 0.0 ? diff : 0.0) * a);
    l = ew::step(l, r, (nd >= 0.0 ? nd : 0.0) * a);
    const double tot = g + l;
    ef = ew::step(ef, rf, af * price[t]);
    es = ew::step(es, rs, as * price[t]);
    double* row = &ext[(k2 + t) * 3];
    row[0] = price[t];
    row[1] = tot > 0.0 ? (100.0 * g) / tot : 50.0;
    row[2] = ef - es;
    rsi_out[t] = row[1];
    macd_out[t] = row[2];
    last = price[t];
  }
  double* high = st + kDivHigh;
  double* low = st + kDivLow;
  for (size_t c = k; c < n + k; ++c) {
    if (seen - static_cast<int64_t>(k2) + static_cast<int64_t>(c) < p.warmup) continue;
    const double pc = ext[c * 3];
    // max / min of the k prices before and the k after, NaN if any is NaN (no pivot then)
    double lmax = ext[(c - k) * 3], lmin = lmax, rmax = ext[(c + 1) * 3], rmin = rmax;
    bool nan = std::isnan(pc);
    for (size_t j = 0; j < k; ++j) {
      const double x = ext[(c - k + j) * 3], y = ext[(c + 1 + j) * 3];
      nan = nan || std::isnan(x) || std::isnan(y);
      lmax = x > lmax ? x : lmax;
      lmin = x < lmin ? x : lmin;
      rmax = y > rmax ? y : rmax;
      rmin = y < rmin ? y : rmin;
    }
    if (nan) continue;
    const double* v = &ext[c * 3];
    auto compare = [&](double* prev, int sign) {
      const bool further = sign * (prev[0] - v[0]) > 0;
      if (further && sign * (v[1] - prev[1]) > 0) rsi_calls.add(c - k, sign);
      if (further && sign * (v[2] - prev[2]) > 0) macd_calls.add(c - k, sign);
      prev[0] = v[0];
      prev[1] = v[1];
      prev[2] = v[2];
    };
    if (pc > lmax && pc >= rmax) compare(high, -1);
    else if (pc < lmin && pc <= rmin) compare(low, 1);
  }
  std::copy(ext.end() - static_cast<std::ptrdiff_t>(k2 * 3), ext.end(), tail);
  st[kDivLastPrice] = last;
  st[kDivGain] = g;
  st[kDivLoss] = l;
  st[kDivEmaFast] = ef;
  st[kDivEmaSlow] = es;
  st[kDivCount] = static_cast<double>(seen + static_cast<int64_t>(n));
}

}  // namespace dynamic_core::dsi
