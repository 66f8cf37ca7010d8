// The DSI run experts (momentum burst, exhaustion, sweep / stop run) as one pass over an
// instrument's ticks: the per-tick state machine python/dynamic_core/learning/dsi/experts.py
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
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

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
    if (mv != 0 && moves == p.burst_moves && agg >= p.burst_share * vol && ts[t] - start_ts <= p.burst_ns)
      momentum.add(t, dir);
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

}  // namespace dynamic_core::dsi
