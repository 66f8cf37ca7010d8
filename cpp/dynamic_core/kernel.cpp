#include "kernel.hpp"

#include "population.hpp"

namespace dynamic_core {

// The helpers below are always inlined; the ABI note about passing vectors does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace {
constexpr int kVec = 4;
typedef double vd __attribute__((vector_size(kVec * 8)));
typedef int64_t vm __attribute__((vector_size(kVec * 8)));
typedef int32_t vi __attribute__((vector_size(kVec * 4)));
typedef uint32_t vu __attribute__((vector_size(kVec * 4)));
static_assert(kWarpSize % kVec == 0);

inline __attribute__((always_inline)) vd load_d(const double* p) {
  vd x;
  __builtin_memcpy(&x, p, sizeof x);
  return x;
}
inline __attribute__((always_inline)) void store_d(double* p, vd x) { __builtin_memcpy(p, &x, sizeof x); }
inline __attribute__((always_inline)) vd load_i(const int32_t* p) {
  vi x;
  __builtin_memcpy(&x, p, sizeof x);
  return __builtin_convertvector(x, vd);
}
inline __attribute__((always_inline)) void store_i(int32_t* p, vd x) {
  const vi y = __builtin_convertvector(x, vi);
  __builtin_memcpy(p, &y, sizeof y);
}
inline __attribute__((always_inline)) vd load_u(const uint32_t* p) {
  vu x;
  __builtin_memcpy(&x, p, sizeof x);
  return __builtin_convertvector(x, vd);
}
// p[k] += m[k] (m is 0 or 1), in 32-bit integers.
inline __attribute__((always_inline)) void add_u(uint32_t* p, vm m) {
  vu x;
  __builtin_memcpy(&x, p, sizeof x);
  x += __builtin_convertvector(m, vu);
  __builtin_memcpy(p, &x, sizeof x);
}
}  // namespace

#if defined(__x86_64__) && !defined(__SANITIZE_THREAD__) && !defined(DC_NO_CLONES)
#define DC_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DC_CLONES
#endif

DC_CLONES Summary sm_step(const LaneView& v, int lanes, const double* __restrict feat, int32_t t,
                          double ret, int poison, uint64_t& updates,
                          uint64_t& quarantined) {
  const double* __restrict w0 = v.w[0];
  const double* __restrict w1 = v.w[1];
  const double* __restrict w2 = v.w[2];
  const double* __restrict w3 = v.w[3];
  const double* __restrict w4 = v.w[4];
  const int32_t* __restrict f0 = v.fidx[0];
  const int32_t* __restrict f1 = v.fidx[1];
  const int32_t* __restrict f2 = v.fidx[2];
  const int32_t* __restrict f3 = v.fidx[3];
  const int32_t* __restrict f4 = v.fidx[4];
  const double* __restrict entry = v.entry;
  const double* __restrict cost = v.cost;
  const int32_t* __restrict lookback = v.lookback;
  const int32_t* __restrict long_short = v.long_short;
  const int32_t* __restrict active = v.active;
  double* __restrict s_score = v.score;
  double* __restrict s_equity = v.equity;
  double* __restrict s_entry_eq = v.entry_equity;
  double* __restrict s_peak = v.peak;
  double* __restrict s_max_dd = v.max_dd;
  double* __restrict s_ret_sum = v.ret_sum;
  double* __restrict s_ret_sq = v.ret_sq;
  const double* __restrict s_credit = v.credit;
  uint32_t* __restrict s_trades = v.trades;
  uint32_t* __restrict s_wins = v.wins;
  uint32_t* __restrict s_n_ret = v.n_ret;
  uint32_t* __restrict s_quar = v.quarantined;
  int32_t* __restrict s_pos = v.position;
  int32_t* __restrict s_action = v.action;

  // Blended scores first: the feature gathers stay out of the state loop.
  alignas(64) double score_in[kMaxSmLanes];
  for (int i = 0; i < lanes; ++i) {
    const double fw[kFeatures] = {w0[i], w1[i], w2[i], w3[i], w4[i]};
    const double fv[kFeatures] = {feat[f0[i]], feat[f1[i]], feat[f2[i]], feat[f3[i]], feat[f4[i]]};
    score_in[i] = blend(fw, fv);
  }
  if (v.has_external)
    for (int i = 0; i < lanes; ++i)
      if (v.external[i]) score_in[i] = v.ext_score[i];
  if (poison >= 0 && poison < lanes) score_in[poison] = __builtin_nan("");

  alignas(64) double sw[kMaxSmLanes], sws[kMaxSmLanes], ss[kMaxSmLanes], ss2[kMaxSmLanes];
  // lane_step over kVec lanes at a time, written with vector types: the same operations in the
  // same order as the scalar lane_step in math.hpp (tests check bit equality), with every
  // condition a 64-bit mask so that selects vectorise. Integer state is exact in doubles.
  vm vq = {}, vn = {}, vv0 = {}, vv1 = {}, vv2 = {}, vv3 = {}, vv4 = {}, vupd = {};
  const vd zero = {}, one = zero + 1.0, two = one + 1.0, neg1 = zero - 1.0;
  const vd tt = zero + static_cast<double>(t), vret = zero + ret;
  const vm m1 = vm{} + 1;
  for (int i = 0; i < lanes; i += kVec) {
    const vd score = load_d(score_in + i);
    const vm warm = tt >= load_i(lookback + i);
    const vd ent = load_d(entry + i);
    const vd cst = load_d(cost + i);
    const vd ls = load_i(long_short + i);
    const vm live = (load_i(active + i) != zero) & (load_u(s_quar + i) == zero);
    const vd prev = load_i(s_pos + i);
    const vd eq0 = load_d(s_equity + i);
    const vd eeq0 = load_d(s_entry_eq + i);
    const vd peak0 = load_d(s_peak + i);
    const vd mdd0 = load_d(s_max_dd + i);
    const vd rs0 = load_d(s_ret_sum + i);
    const vd rq0 = load_d(s_ret_sq + i);
    const vd g = one + prev * vret;
    vd e = eq0 * g;
    vd pos = (score > ent) ? one : ((score < -ent) ? -ls : prev);
    pos = warm ? pos : zero;
    const vd d = (pos > prev) ? pos - prev : prev - pos;
    const vd c = cst * d;
    e = e - e * c;
    const vd r = g * (one - c) - one;
    const vm changed = pos != prev;
    const vm closing = (prev != zero) & changed;
    const vm opening = (pos != zero) & changed;
    const vm won = e > eeq0;
    const vd rs1 = warm ? rs0 + r : rs0;
    const vd rq1 = warm ? rq0 + r * r : rq0;
    const vd eeq1 = opening ? e : eeq0;
    const vd peak1 = e > peak0 ? e : peak0;
    const vd dd = (peak1 - e) / peak1;
    const vd mdd1 = dd > mdd0 ? dd : mdd0;
    const vd act = ((score >= kStrongAction) ? one : zero) + ((score >= kWeakAction) ? one : zero) -
                   ((score <= -kWeakAction) ? one : zero) - ((score <= -kStrongAction) ? one : zero);
    const vm ok = ((e - e) == zero) & ((score - score) == zero);
    const vm keep = live & ok;
    store_d(s_score + i, keep ? score : load_d(s_score + i));
    store_d(s_equity + i, keep ? e : eq0);
    store_d(s_entry_eq + i, keep ? eeq1 : eeq0);
    store_d(s_peak + i, keep ? peak1 : peak0);
    store_d(s_max_dd + i, keep ? mdd1 : mdd0);
    store_d(s_ret_sum + i, keep ? rs1 : rs0);
    store_d(s_ret_sq + i, keep ? rq1 : rq0);
    const vm kw = keep & warm;
    add_u(s_n_ret + i, kw & m1);
    add_u(s_trades + i, keep & closing & m1);
    add_u(s_wins + i, keep & closing & won & m1);
    store_i(s_pos + i, keep ? pos : prev);
    store_i(s_action + i, keep ? act : load_i(s_action + i));
    add_u(s_quar + i, live & ~ok & m1);
    vq += live & ~ok & m1;  // 0 -> 1: only live lanes (quarantined == 0) can fail
    const vd wgt = ((e < zero) ? zero : e) * (one - mdd1) * load_d(s_credit + i);
    store_d(sw + i, kw ? wgt : zero);
    store_d(sws + i, kw ? wgt * score : zero);
    store_d(ss + i, kw ? score : zero);
    store_d(ss2 + i, kw ? score * score : zero);
    vn += kw & m1;
    vv0 += kw & (act == -two) & m1;
    vv1 += kw & (act == neg1) & m1;
    vv2 += kw & (act == zero) & m1;
    vv3 += kw & (act == one) & m1;
    vv4 += kw & (act == two) & m1;
    vupd += live & m1;
  }
  uint32_t n = 0, v0 = 0, v1 = 0, v2 = 0, v3 = 0, v4 = 0, upd = 0;
  for (int k = 0; k < kVec; ++k) {
    n += static_cast<uint32_t>(vn[k]);
    v0 += static_cast<uint32_t>(vv0[k]);
    v1 += static_cast<uint32_t>(vv1[k]);
    v2 += static_cast<uint32_t>(vv2[k]);
    v3 += static_cast<uint32_t>(vv3[k]);
    v4 += static_cast<uint32_t>(vv4[k]);
    upd += static_cast<uint32_t>(vupd[k]);
    quarantined += static_cast<uint64_t>(vq[k]);
  }
  Summary total;
  summary_zero(total);
  for (int w = 0; w < lanes; w += kWarpSize) {  // warps in index order
    total.sum_w = total.sum_w + warp_tree(sw + w);
    total.sum_ws = total.sum_ws + warp_tree(sws + w);
    total.sum_s = total.sum_s + warp_tree(ss + w);
    total.sum_s2 = total.sum_s2 + warp_tree(ss2 + w);
  }
  total.n = n;
  total.votes[0] = v0;
  total.votes[1] = v1;
  total.votes[2] = v2;
  total.votes[3] = v3;
  total.votes[4] = v4;
  updates += upd;
  return total;
}

// The feature pass, per feature kind: a scalar pass gathers the indicator outputs each distinct
// feature reads into contiguous scratch arrays (padded to whole vectors with a harmless 1.0),
// then a pass written with vector types computes the features with every condition a select (a
// division by a zero normaliser is computed and discarded). Same operations in the same order as
// the *_feature functions of math.hpp; tests compare the two bit for bit.
namespace {
struct Scratch {
  alignas(64) double a[kMaxBankFeatures];
  alignas(64) double b[kMaxBankFeatures];
  alignas(64) double ok[kMaxBankFeatures];
  alignas(64) double out[kMaxBankFeatures];
};
static_assert(kMaxBankFeatures % kVec == 0);

inline int round_up(int n) { return (n + kVec - 1) / kVec * kVec; }
inline __attribute__((always_inline)) vd vsoft(vd x) {
  const vd zero = {};
  return x / ((zero + 1.0) + (x < zero ? -x : x));
}
inline void pad(double* p, int n) {
  for (int i = n; i < round_up(n); ++i) p[i] = 1.0;
}
}  // namespace

DC_CLONES void bank_features(Bank& b, double close) {
  const BankValues& v = b.val;
  double* feat = b.feat.data();
  const double* __restrict ema = v.ema.data();
  const double* __restrict ema_ok = v.ema_ok.data();
  const double* __restrict atr = v.atr.data();
  const double* __restrict atr_ok = v.atr_ok.data();
  Scratch sc;
  double* __restrict ga = sc.a;
  double* __restrict gb = sc.b;
  double* __restrict gok = sc.ok;
  double* __restrict go = sc.out;
  const vd zero = {}, one = zero + 1.0;
  auto emit = [&](uint32_t base, int n) { __builtin_memcpy(feat + base, go, sizeof(double) * n); };
  // soft(a / b), 0 unless warm and b != 0: the trend and MACD features (a = ema_fast - ema_slow
  // or the histogram, b = ATR).
  auto ratio_pass = [&](int n) {
    pad(ga, n), pad(gb, n), pad(gok, n);
    for (int i = 0; i < n; i += kVec) {
      const vd a = load_d(gb + i);
      const vd x = vsoft(load_d(ga + i) / a);
      store_d(go + i, ((load_d(gok + i) != zero) & (a != zero)) ? x : zero);
    }
  };
  // trend: soft((ema_fast - ema_slow) / atr), 0 when atr == 0
  {
    const int32_t* __restrict tf = b.trend_fast.data();
    const int32_t* __restrict ts = b.trend_slow.data();
    const int32_t* __restrict ta = b.trend_atr.data();
    const int n = static_cast<int>(b.trend_fast.size());
    for (int i = 0; i < n; ++i) {
      ga[i] = ema[tf[i]] - ema[ts[i]];
      gb[i] = atr[ta[i]];
      gok[i] = ema_ok[tf[i]] * ema_ok[ts[i]] * atr_ok[ta[i]];
    }
    ratio_pass(n);
    emit(b.trend_base, n);
  }
  // rsi: (rsi - 50) / 50
  {
    const int32_t* __restrict r = b.rsi_f.data();
    const double* __restrict val = v.rsi.data();
    const double* __restrict ok = v.rsi_ok.data();
    const int n = static_cast<int>(b.rsi_f.size());
    for (int i = 0; i < n; ++i) {
      ga[i] = val[r[i]];
      gok[i] = ok[r[i]];
    }
    pad(ga, n), pad(gok, n);
    const vd fifty = zero + 50.0;
    for (int i = 0; i < n; i += kVec) {
      const vd x = (load_d(ga + i) - fifty) / fifty;
      store_d(go + i, load_d(gok + i) != zero ? x : zero);
    }
    emit(b.rsi_base, n);
  }
  // macd: soft(hist / atr), 0 when atr == 0
  {
    const int32_t* __restrict m = b.macd_m.data();
    const int32_t* __restrict ma = b.macd_atr.data();
    const double* __restrict hist = v.macd_hist.data();
    const double* __restrict mok = v.macd_ok.data();
    const int n = static_cast<int>(b.macd_m.size());
    for (int i = 0; i < n; ++i) {
      ga[i] = hist[m[i]];
      gb[i] = atr[ma[i]];
      gok[i] = mok[m[i]] * atr_ok[ma[i]];
    }
    ratio_pass(n);
    emit(b.macd_base, n);
  }
  // bollinger: soft((close - mean) / (2 sd)), sd = sqrt(var) when var > 0, 0 when sd == 0
  {
    const int32_t* __restrict e = b.bb_f.data();
    const double* __restrict mean = v.ew_mean.data();
    const double* __restrict var = v.ew_var.data();
    const double* __restrict ok = v.ew_ok.data();
    const int n = static_cast<int>(b.bb_f.size());
    for (int i = 0; i < n; ++i) {
      ga[i] = mean[e[i]];
      gb[i] = var[e[i]];
      gok[i] = ok[e[i]];
    }
    pad(ga, n), pad(gb, n), pad(gok, n);
    for (int i = 0; i < n; ++i) gb[i] = gb[i] > 0.0 ? DC_SQRT(gb[i]) : 0.0;
    const vd c = zero + close, two = one + one;
    for (int i = 0; i < n; i += kVec) {
      const vd sd = load_d(gb + i);
      const vd x = vsoft((c - load_d(ga + i)) / (two * sd));
      store_d(go + i, ((load_d(gok + i) != zero) & (sd != zero)) ? x : zero);
    }
    emit(b.bb_base, n);
  }
  // momentum: soft(roc)
  {
    const int32_t* __restrict r = b.mom_f.data();
    const double* __restrict val = v.roc.data();
    const double* __restrict ok = v.roc_ok.data();
    const int n = static_cast<int>(b.mom_f.size());
    for (int i = 0; i < n; ++i) {
      ga[i] = val[r[i]];
      gok[i] = ok[r[i]];
    }
    pad(ga, n), pad(gok, n);
    for (int i = 0; i < n; i += kVec) {
      const vd x = vsoft(load_d(ga + i));
      store_d(go + i, load_d(gok + i) != zero ? x : zero);
    }
    emit(b.mom_base, n);
  }
}

}  // namespace dynamic_core
