#include "population.hpp"

#include "errors.hpp"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <stdexcept>
#include <string>

namespace dynamic_core {

namespace {

bool finite(double x) { return dc_finite(x); }

// First-use ids of an SM's (or a merged stream's) indicators and features, keyed by kind and
// parameters: one open-addressing table (linear probing, at most half full) for every kind. A
// merged bank of a large stream interns millions of keys into a table of ~10^5: one probe is one
// cache line where a tree walk was ~17 dependent misses.
class Interner {
 public:
  enum Kind : uint32_t { kEma = 1, kAtr, kTrend, kRsiF, kRsi, kMacd, kMacdF, kBbF, kEw, kMomF, kRoc };

  // The id of (kind, a, b, c), or `next` when it is new (then it is that key's id).
  uint32_t get(Kind kind, int32_t a, int32_t b, int32_t c, size_t next) {
    if ((used_ + 1) * 2 > slots_.size()) grow();
    const Slot key{static_cast<uint32_t>(kind), a, b, c, static_cast<uint32_t>(next)};
    for (size_t i = hash(key) & (slots_.size() - 1);; i = (i + 1) & (slots_.size() - 1)) {
      Slot& s = slots_[i];
      if (s.kind == 0) {
        s = key;
        ++used_;
        return key.id;
      }
      if (s.kind == key.kind && s.a == a && s.b == b && s.c == c) return s.id;
    }
  }

 private:
  struct Slot {
    uint32_t kind;  // 0: empty
    int32_t a, b, c;
    uint32_t id;
  };
  static uint64_t hash(const Slot& k) {
    uint64_t h = (static_cast<uint64_t>(k.kind) << 32) ^ static_cast<uint32_t>(k.a);
    const uint64_t bc = (static_cast<uint64_t>(static_cast<uint32_t>(k.b)) << 32) | static_cast<uint32_t>(k.c);
    h = h * 0x9e3779b97f4a7c15ull ^ bc;
    h ^= h >> 31;  // splitmix64's finaliser
    h *= 0xbf58476d1ce4e5b9ull;
    h ^= h >> 27;
    h *= 0x94d049bb133111ebull;
    return h ^ (h >> 31);
  }
  void grow() {
    std::vector<Slot> old(std::max<size_t>(64, slots_.size() * 2));
    old.swap(slots_);
    for (const Slot& s : old)
      if (s.kind != 0) {
        size_t i = hash(s) & (slots_.size() - 1);
        while (slots_[i].kind != 0) i = (i + 1) & (slots_.size() - 1);
        slots_[i] = s;
      }
  }
  std::vector<Slot> slots_;
  size_t used_ = 0;
};

// Builds the bank of one SM while its lanes are added; indices are relative per kind until
// finish() turns feature indices absolute.
struct BankBuilder {
  explicit BankBuilder(Bank& bank) : b(bank) {}
  Bank& b;
  Interner ids;
  using K = Interner::Kind;

  uint32_t ema(int32_t n) {
    const auto i = ids.get(K::kEma, n, 0, 0, b.emas.size());
    if (i == b.emas.size()) b.emas.emplace_back().init(n);
    return i;
  }
  uint32_t atr(int32_t n) {
    const auto i = ids.get(K::kAtr, n, 0, 0, b.atrs.size());
    if (i == b.atrs.size()) b.atrs.emplace_back().init(n);
    return i;
  }
  uint32_t trend(int32_t f, int32_t s, int32_t a) {
    const auto i = ids.get(K::kTrend, f, s, a, b.trend_fast.size());
    if (i == b.trend_fast.size()) {
      b.trend_fast.push_back(ema(f));
      b.trend_slow.push_back(ema(s));
      b.trend_atr.push_back(atr(a));
    }
    return i;
  }
  uint32_t rsi(int32_t n) {
    const auto i = ids.get(K::kRsiF, n, 0, 0, b.rsi_f.size());
    if (i == b.rsi_f.size()) {
      const auto r = ids.get(K::kRsi, n, 0, 0, b.rsis.size());
      if (r == b.rsis.size()) b.rsis.emplace_back().init(n);
      b.rsi_f.push_back(r);
    }
    return i;
  }
  uint32_t macd(int32_t f, int32_t s, int32_t sig, int32_t a) {
    const auto m = ids.get(K::kMacd, f, s, sig, b.macds.size());
    if (m == b.macds.size()) b.macds.emplace_back().init(f, s, sig);
    const auto i = ids.get(K::kMacdF, static_cast<int32_t>(m), a, 0, b.macd_m.size());
    if (i == b.macd_m.size()) {
      b.macd_m.push_back(m);
      b.macd_atr.push_back(atr(a));
    }
    return i;
  }
  uint32_t bb(int32_t n) {
    const auto i = ids.get(K::kBbF, n, 0, 0, b.bb_f.size());
    if (i == b.bb_f.size()) {
      const auto e = ids.get(K::kEw, n, 0, 0, b.ews.size());
      if (e == b.ews.size()) b.ews.emplace_back().init(n);
      b.bb_f.push_back(e);
    }
    return i;
  }
  uint32_t mom(int32_t n) {
    const auto i = ids.get(K::kMomF, n, 0, 0, b.mom_f.size());
    if (i == b.mom_f.size()) {
      const auto r = ids.get(K::kRoc, n, 0, 0, b.rocs.size());
      if (r == b.rocs.size()) {
        b.rocs.emplace_back().init(n);
        b.roc_offset.push_back(static_cast<uint32_t>(b.roc_buf.size()));
        b.roc_buf.resize(b.roc_buf.size() + static_cast<size_t>(n), 0.0);
      }
      b.mom_f.push_back(r);
    }
    return i;
  }
  // Relative feature index of each kind -> its index once the features are sorted (finish).
  std::vector<uint32_t> remap[kFeatures];
  void finish() {
    b.sort_features(remap);
    b.trend_base = 1;
    b.rsi_base = b.trend_base + static_cast<uint32_t>(b.trend_fast.size());
    b.macd_base = b.rsi_base + static_cast<uint32_t>(b.rsi_f.size());
    b.bb_base = b.macd_base + static_cast<uint32_t>(b.macd_m.size());
    b.mom_base = b.bb_base + static_cast<uint32_t>(b.bb_f.size());
    b.feat.assign(b.mom_base + b.mom_f.size(), 0.0);
    b.resize_values();
  }
};

}  // namespace

Bank merge_banks(const std::vector<const Bank*>& banks, std::vector<std::vector<int32_t>>& map) {
  Bank out;
  BankBuilder bb(out);
  map.assign(banks.size(), {});
  // Indicators are interned by their parameters (MACDs by their ordered periods, equal inputs
  // giving equal state), features by their indicators: one of each, in first-use order.
  std::vector<uint32_t> rel[kFeatures];
  for (size_t k = 0; k < banks.size(); ++k) {
    const Bank& b = *banks[k];
    for (auto& r : rel) r.clear();
    for (size_t i = 0; i < b.trend_fast.size(); ++i)
      rel[0].push_back(bb.trend(b.emas[b.trend_fast[i]].n, b.emas[b.trend_slow[i]].n, b.atrs[b.trend_atr[i]].n));
    for (size_t i = 0; i < b.rsi_f.size(); ++i) rel[1].push_back(bb.rsi(b.rsis[b.rsi_f[i]].n));
    for (size_t i = 0; i < b.macd_m.size(); ++i) {
      const Macd& m = b.macds[b.macd_m[i]];
      rel[2].push_back(bb.macd(m.fast_n, m.slow_n, m.sig_n, b.atrs[b.macd_atr[i]].n));
    }
    for (size_t i = 0; i < b.bb_f.size(); ++i) rel[3].push_back(bb.bb(b.ews[b.bb_f[i]].n));
    for (size_t i = 0; i < b.mom_f.size(); ++i) rel[4].push_back(bb.mom(b.rocs[b.mom_f[i]].n));
    // feature f of bank k: its kind from the bases, then the merged relative index (made absolute
    // below, once the merged bases are known)
    std::vector<int32_t>& mk = map[k];
    mk.assign(b.feat.size(), 0);
    const uint32_t base[kFeatures] = {b.trend_base, b.rsi_base, b.macd_base, b.bb_base, b.mom_base};
    for (int f = 0; f < kFeatures; ++f)
      for (size_t i = 0; i < rel[f].size(); ++i) mk[base[f] + i] = static_cast<int32_t>(rel[f][i]);
  }
  bb.finish();
  const uint32_t mbase[kFeatures] = {out.trend_base, out.rsi_base, out.macd_base, out.bb_base, out.mom_base};
  for (size_t k = 0; k < banks.size(); ++k) {
    const Bank& b = *banks[k];
    const uint32_t base[kFeatures] = {b.trend_base, b.rsi_base, b.macd_base, b.bb_base, b.mom_base};
    const uint32_t end[kFeatures] = {b.rsi_base, b.macd_base, b.bb_base, b.mom_base,
                                     static_cast<uint32_t>(b.feat.size())};
    for (int f = 0; f < kFeatures; ++f)
      for (uint32_t i = base[f]; i < end[f]; ++i)
        map[k][i] = static_cast<int32_t>(mbase[f] + bb.remap[f][static_cast<size_t>(map[k][i])]);
  }
  return out;
}

void Bank::release_state() {
  val = BankValues{};
  st = BankSteady{};
  pidx = BankIndex{};
  std::vector<double>().swap(closes);
  std::vector<double>().swap(roc_buf);
}

namespace {
// Bar index (from 0) from which an indicator takes its steady branch on every update:
//   Ema: count >= n, count = min(t, n) at entry                -> t >= n
//   Rsi, Atr: count > n, count = min(t, n + 1)                  -> t >= n + 1
//   Macd: count > slow - 1 + signal - 1, saturating there + 1    -> t >= slow + signal - 1
//   Ew: count >= n (warm; the update itself is the same from count 1) -> t >= n
//   Roc: count >= n                                              -> t >= n
// Every indicator is warm from then on (enter_steady_chunk sets the flags).
int64_t steady_from(const Ema& e) { return e.n; }
int64_t steady_from(const Rsi& r) { return static_cast<int64_t>(r.n) + 1; }
int64_t steady_from(const Atr& a) { return static_cast<int64_t>(a.n) + 1; }
int64_t steady_from(const Macd& m) { return static_cast<int64_t>(m.slow_n) + m.sig_n - 1; }
int64_t steady_from(const Ew& e) { return e.n; }
int64_t steady_from(const Roc& r) { return r.n; }

// Length of a bank's ring of closes for ROC periods up to max_period: the power of two above it.
size_t closes_ring(int32_t max_period) {
  size_t h = 1;
  while (h < static_cast<size_t>(max_period) + 1) h <<= 1;
  return h;
}

// Sorts v by steady_from (stable) and returns the new index of each old one.
template <class T>
std::vector<int32_t> sort_by_warmup(std::vector<T>& v) {
  std::vector<int32_t> order(v.size()), inv(v.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return steady_from(v[a]) < steady_from(v[b]); });
  std::vector<T> sorted;
  sorted.reserve(v.size());
  for (size_t i = 0; i < order.size(); ++i) {
    sorted.push_back(v[order[i]]);
    inv[order[i]] = static_cast<int32_t>(i);
  }
  v.swap(sorted);
  return inv;
}
// The bar from which each chunk of kBankPad indicators (sorted) is steady: its last one's.
template <class T>
void chunk_thresholds(const std::vector<T>& v, std::vector<int64_t>& at) {
  at.clear();
  for (size_t c = 0; c * kBankPad < v.size(); ++c)
    at.push_back(steady_from(v[std::min(v.size(), (c + 1) * kBankPad) - 1]));
}
}  // namespace

void Bank::sort_features(std::vector<uint32_t> (&remap)[kFeatures]) {
  // Bar index from which a feature is warm: the latest of its indicators' first warm bars.
  auto lb_ema = [&](int32_t i) { return static_cast<int64_t>(Ema::lookback(emas[i].n)); };
  auto lb_atr = [&](int32_t i) { return static_cast<int64_t>(Atr::lookback(atrs[i].n)); };
  auto lb_macd = [&](int32_t i) {
    return static_cast<int64_t>(Macd::lookback(macds[i].fast_n, macds[i].slow_n, macds[i].sig_n));
  };
  std::vector<int64_t> from[kFeatures];
  for (size_t i = 0; i < trend_fast.size(); ++i)
    from[0].push_back(std::max({lb_ema(trend_fast[i]), lb_ema(trend_slow[i]), lb_atr(trend_atr[i])}));
  for (int32_t r : rsi_f) from[1].push_back(Rsi::lookback(rsis[r].n));
  for (size_t i = 0; i < macd_m.size(); ++i) from[2].push_back(std::max(lb_macd(macd_m[i]), lb_atr(macd_atr[i])));
  for (int32_t e : bb_f) from[3].push_back(Ew::lookback(ews[e].n));
  for (int32_t r : mom_f) from[4].push_back(Roc::lookback(rocs[r].n));
  std::vector<int32_t>* idx[kFeatures][3] = {{&trend_fast, &trend_slow, &trend_atr},
                                             {&rsi_f, nullptr, nullptr},
                                             {&macd_m, &macd_atr, nullptr},
                                             {&bb_f, nullptr, nullptr},
                                             {&mom_f, nullptr, nullptr}};
  for (int f = 0; f < kFeatures; ++f) {
    std::vector<uint32_t> order(from[f].size());
    std::iota(order.begin(), order.end(), 0u);
    std::stable_sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) { return from[f][a] < from[f][b]; });
    remap[f].assign(order.size(), 0);
    for (size_t i = 0; i < order.size(); ++i) remap[f][order[i]] = static_cast<uint32_t>(i);
    for (auto* v : idx[f]) {
      if (!v) continue;
      std::vector<int32_t> sorted(v->size());
      for (size_t i = 0; i < order.size(); ++i) sorted[i] = (*v)[order[i]];
      v->swap(sorted);
    }
  }
}

void Bank::resize_values() {
  // Indicators of each kind in order of warm-up length (only their order changes; features
  // follow them), so the steady form can be entered a chunk at a time.
  {
    const auto ie = sort_by_warmup(emas), ia = sort_by_warmup(atrs), im = sort_by_warmup(macds);
    const auto ir = sort_by_warmup(rsis), iw = sort_by_warmup(ews);
    const std::vector<uint32_t> off(roc_offset);
    const auto ic = sort_by_warmup(rocs);
    for (size_t i = 0; i < off.size(); ++i) roc_offset[ic[i]] = off[i];
    for (auto& x : trend_fast) x = ie[x];
    for (auto& x : trend_slow) x = ie[x];
    for (auto& x : trend_atr) x = ia[x];
    for (auto& x : macd_m) x = im[x];
    for (auto& x : macd_atr) x = ia[x];
    for (auto& x : rsi_f) x = ir[x];
    for (auto& x : bb_f) x = iw[x];
    for (auto& x : mom_f) x = ic[x];
  }
  chunk_thresholds(emas, chunk_at[kBankEma]);
  chunk_thresholds(rsis, chunk_at[kBankRsi]);
  chunk_thresholds(atrs, chunk_at[kBankAtr]);
  chunk_thresholds(macds, chunk_at[kBankMacd]);
  chunk_thresholds(ews, chunk_at[kBankEw]);
  chunk_thresholds(rocs, chunk_at[kBankRoc]);
  for (int k = 0; k < kBankKinds; ++k) {
    steady_chunks[k] = 0;
    steady[k] = chunk_at[k].empty();
  }
  // Features in order of their first warm bar (sort_features): the first feat_warm[f] of kind f
  // are warm, the others 0.
  for (auto& v : feat_from) v.clear();
  for (size_t i = 0; i < trend_fast.size(); ++i)
    feat_from[0].push_back(std::max({static_cast<int64_t>(Ema::lookback(emas[trend_fast[i]].n)),
                                     static_cast<int64_t>(Ema::lookback(emas[trend_slow[i]].n)),
                                     static_cast<int64_t>(Atr::lookback(atrs[trend_atr[i]].n))}));
  for (int32_t r : rsi_f) feat_from[1].push_back(Rsi::lookback(rsis[r].n));
  for (size_t i = 0; i < macd_m.size(); ++i) {
    const Macd& m = macds[macd_m[i]];
    feat_from[2].push_back(std::max(static_cast<int64_t>(Macd::lookback(m.fast_n, m.slow_n, m.sig_n)),
                                    static_cast<int64_t>(Atr::lookback(atrs[macd_atr[i]].n))));
  }
  for (int32_t e : bb_f) feat_from[3].push_back(Ew::lookback(ews[e].n));
  for (int32_t r : mom_f) feat_from[4].push_back(Roc::lookback(rocs[r].n));
  for (int f = 0; f < kFeatures; ++f) feat_warm[f] = 0;

  // Outputs and steady state are padded to whole vectors of kBankPad with harmless constants
  // (the padding is updated with the rest and never read).
  const size_t ne = bank_padded(emas.size()), na = bank_padded(atrs.size()), nm = bank_padded(macds.size());
  const size_t nr = bank_padded(rsis.size()), nw = bank_padded(ews.size()), nc = bank_padded(rocs.size());
  val.ema.assign(ne, 0.0);
  val.ema_ok.assign(ne, 0.0);
  val.atr.assign(na, 0.0);
  val.atr_ok.assign(na, 0.0);
  val.macd_hist.assign(nm, 0.0);
  val.macd_ok.assign(nm, 0.0);
  val.rsi.assign(nr, 0.0);
  val.rsi_ok.assign(nr, 0.0);
  val.ew_mean.assign(nw, 0.0);
  val.ew_var.assign(nw, 0.0);
  val.ew_ok.assign(nw, 0.0);
  val.roc.assign(nc, 0.0);
  val.roc_ok.assign(nc, 0.0);

  // The steady form's constants and state (see steady_from).
  st = BankSteady{};
  st.ema_k.assign(ne, 0.0);
  for (size_t i = 0; i < emas.size(); ++i) st.ema_k[i] = emas[i].k;
  st.rsi_nm1.assign(nr, 0.0);
  st.rsi_n.assign(nr, 1.0);
  for (size_t i = 0; i < rsis.size(); ++i) {
    st.rsi_nm1[i] = static_cast<double>(rsis[i].n - 1);
    st.rsi_n[i] = static_cast<double>(rsis[i].n);
  }
  st.rsi_gain.assign(nr, 0.0);
  st.rsi_loss.assign(nr, 0.0);
  st.atr_nm1.assign(na, 0.0);
  st.atr_n.assign(na, 1.0);
  for (size_t i = 0; i < atrs.size(); ++i) {
    st.atr_nm1[i] = static_cast<double>(atrs[i].n - 1);
    st.atr_n[i] = static_cast<double>(atrs[i].n);
  }
  st.macd_kf.assign(nm, 0.0);
  st.macd_ks.assign(nm, 0.0);
  st.macd_ksig.assign(nm, 0.0);
  for (size_t i = 0; i < macds.size(); ++i) {
    st.macd_kf[i] = macds[i].kf;
    st.macd_ks[i] = macds[i].ks;
    st.macd_ksig[i] = macds[i].ksig;
  }
  st.macd_fast.assign(nm, 0.0);
  st.macd_slow.assign(nm, 0.0);
  st.macd_signal.assign(nm, 0.0);
  st.ew_alpha.assign(nw, 0.0);
  st.ew_om.assign(nw, 1.0);
  for (size_t i = 0; i < ews.size(); ++i) {
    st.ew_alpha[i] = ews[i].alpha;
    st.ew_om[i] = 1.0 - ews[i].alpha;
  }
  int32_t max_roc = 0;
  st.roc_n.assign(nc, 1);
  for (size_t i = 0; i < rocs.size(); ++i) {
    st.roc_n[i] = rocs[i].n;
    max_roc = rocs[i].n > max_roc ? rocs[i].n : max_roc;
  }
  closes.clear();
  closes_mask = 0;
  if (!rocs.empty()) {
    const size_t h = closes_ring(max_roc);
    closes.assign(h, 0.0);
    closes_mask = static_cast<uint32_t>(h - 1);
  }

  // Feature indices padded with 0 (a valid index whenever the kind has a feature).
  auto padded = [](const std::vector<int32_t>& v) {
    std::vector<int32_t> p(v);
    p.resize((v.size() + kBankPad - 1) / kBankPad * kBankPad, 0);
    return p;
  };
  pidx.trend_fast = padded(trend_fast);
  pidx.trend_slow = padded(trend_slow);
  pidx.trend_atr = padded(trend_atr);
  pidx.rsi = padded(rsi_f);
  pidx.macd_m = padded(macd_m);
  pidx.macd_atr = padded(macd_atr);
  pidx.bb = padded(bb_f);
  pidx.mom = padded(mom_f);
}

void LaneArrays::assign(const std::vector<LaneParams>& p) {
  const size_t n = p.size();
  for (int f = 0; f < kFeatures; ++f) {
    w[f].resize(n);
    fidx[f].resize(n);
  }
  entry.resize(n);
  cost.resize(n);
  lookback.resize(n);
  long_short.resize(n);
  active.resize(n);
  external.resize(n);
  for (size_t i = 0; i < n; ++i) {
    for (int f = 0; f < kFeatures; ++f) {
      w[f][i] = p[i].w[f];
      fidx[f][i] = p[i].fidx[f];
    }
    entry[i] = p[i].entry;
    cost[i] = p[i].cost;
    lookback[i] = p[i].lookback;
    long_short[i] = p[i].long_short;
    active[i] = p[i].active;
    external[i] = p[i].external;
  }
}

void StateArrays::init(size_t n) {
  LaneState z;
  lane_init(z);
  score.assign(n, z.score);
  equity.assign(n, z.equity);
  entry_equity.assign(n, z.entry_equity);
  peak.assign(n, z.peak);
  max_dd.assign(n, z.max_dd);
  credit.assign(n, 1.0);
  ext_score.assign(n, 0.0);
  dsi.assign(n, 0.0);
  ret_sum.assign(n, z.ret_sum);
  ret_sq.assign(n, z.ret_sq);
  trades.assign(n, z.trades);
  wins.assign(n, z.wins);
  n_ret.assign(n, z.n_ret);
  quarantined.assign(n, z.quarantined);
  position.assign(n, z.position);
  action.assign(n, z.action);
}

void StateArrays::reset(size_t i) {
  LaneState z;
  lane_init(z);
  score[i] = z.score;
  equity[i] = z.equity;
  entry_equity[i] = z.entry_equity;
  peak[i] = z.peak;
  max_dd[i] = z.max_dd;
  credit[i] = 1.0;
  ext_score[i] = 0.0;
  dsi[i] = 0.0;
  ret_sum[i] = z.ret_sum;
  ret_sq[i] = z.ret_sq;
  trades[i] = z.trades;
  wins[i] = z.wins;
  n_ret[i] = z.n_ret;
  quarantined[i] = z.quarantined;
  position[i] = z.position;
  action[i] = z.action;
}

void validate_genomes(const Genome* g, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    const Genome& x = g[i];
    const int32_t periods[] = {x.fast,      x.slow,        x.rsi_period, x.macd_fast, x.macd_slow,
                               x.macd_signal, x.atr_period, x.bb_period,  x.mom_period};
    std::string why;
    for (int32_t p : periods)
      if (p < 1 || p > kMaxPeriod) why = "period outside [1, " + std::to_string(kMaxPeriod) + "]";
    const double reals[] = {x.w_trend, x.w_rsi, x.w_macd, x.w_bb, x.w_mom, x.entry, x.cost_bps, x.w_dsi};
    for (double r : reals)
      if (!finite(r)) why = "non-finite weight, entry or cost";
    for (double w : {x.w_trend, x.w_rsi, x.w_macd, x.w_bb, x.w_mom, x.w_dsi})
      if (finite(w) && std::fabs(w) > kMaxWeight) why = "weight beyond +-1e300 (the blend would overflow)";
    if (x.entry < 0.0) why = "negative entry";
    if (x.cost_bps < 0.0 || x.cost_bps > kMaxCostBps) why = "cost_bps outside [0, 1000]";
    if (x.mode > 1) why = "unknown mode";
    if (x.kind > 1) why = "unknown kind";
    if (x.timeframe == 0) why = "timeframe 0";
    if (x.agent_id == 0xFFFFFFFFu) why = "agent_id 2^32 - 1 (it names no agent in lineage and births)";
    if (!why.empty())
      throw std::invalid_argument("invalid genome at row " + std::to_string(i) + " (agent_id " +
                                  std::to_string(x.agent_id) + "): " + why);
  }
}

int32_t genome_lookback(const Genome& g) {
  int32_t lb = 0;
  auto use = [&](int32_t v) { lb = v > lb ? v : lb; };
  if (g.w_trend != 0.0) {
    use(Ema::lookback(g.fast));
    use(Ema::lookback(g.slow));
    use(Atr::lookback(g.atr_period));
  }
  if (g.w_rsi != 0.0) use(Rsi::lookback(g.rsi_period));
  if (g.w_macd != 0.0) {
    use(Macd::lookback(g.macd_fast, g.macd_slow, g.macd_signal));
    use(Atr::lookback(g.atr_period));
  }
  if (g.w_bb != 0.0) use(Ew::lookback(g.bb_period));
  if (g.w_mom != 0.0) use(Roc::lookback(g.mom_period));
  return lb;
}

// Bytes of price history the banks of a layout hold for momentum (ROC): per SM, a ring of n
// closes for each distinct period n and a power-of-two ring of closes longer than the longest,
// each twice (the SM's bank and the merged bank serving its group). Agents in `order` (sorted by
// stream); SMs of `lanes` lanes, cut as build_layout cuts them. Computed before any is allocated.
uint64_t history_bytes(const Genome* g, const std::vector<uint32_t>& order, size_t lanes) {
  uint64_t total = 0;
  std::vector<int32_t> periods;
  auto add_sm = [&] {
    if (periods.empty()) return;
    std::sort(periods.begin(), periods.end());
    periods.erase(std::unique(periods.begin(), periods.end()), periods.end());
    uint64_t sum = closes_ring(periods.back());
    for (int32_t p : periods) sum += static_cast<uint64_t>(p);
    total += 2 * sizeof(double) * sum;
    periods.clear();
  };
  size_t i = 0;
  while (i < order.size()) {
    const Genome& head = g[order[i]];
    size_t j = i;
    while (j < order.size() && g[order[j]].instrument == head.instrument && g[order[j]].timeframe == head.timeframe) ++j;
    for (size_t a = i; a < j; a += lanes) {
      for (size_t k = a; k < std::min(j, a + lanes); ++k) {
        const Genome& x = g[order[k]];
        if (x.kind == 0 && x.w_mom != 0.0) periods.push_back(x.mom_period);
      }
      add_sm();
    }
    i = j;
  }
  return total;
}

uint64_t physical_memory() {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  return pages > 0 && page > 0 ? static_cast<uint64_t>(pages) * static_cast<uint64_t>(page) : 0;
}

void check_memory(uint64_t bytes, const std::string& what) {
  const uint64_t have = physical_memory();
  if (have && bytes > have) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.1f GiB, more than the %.1f GiB", static_cast<double>(bytes) / (1ull << 30),
                  static_cast<double>(have) / (1ull << 30));
    throw MemoryBudget(what + " would need at least " + buf + " of memory this machine has");
  }
}

Layout build_layout(const Genome* g, size_t n, int cores_per_sm) {
  if (cores_per_sm < 32 || cores_per_sm > 128 || cores_per_sm % kWarpSize != 0)
    throw std::invalid_argument("cores_per_sm must be 32, 64, 96 or 128, got " +
                                std::to_string(cores_per_sm));
  validate_genomes(g, n);
  Layout L;
  L.n_agents = n;
  std::vector<uint32_t> order(n);
  std::iota(order.begin(), order.end(), 0u);
  std::stable_sort(order.begin(), order.end(), [g](uint32_t a, uint32_t b) {
    if (g[a].instrument != g[b].instrument) return g[a].instrument < g[b].instrument;
    if (g[a].timeframe != g[b].timeframe) return g[a].timeframe < g[b].timeframe;
    return g[a].kind < g[b].kind;
  });
  const uint32_t warps_per_sm = static_cast<uint32_t>(cores_per_sm / kWarpSize);
  check_memory(history_bytes(g, order, warps_per_sm * kWarpSize), "the momentum periods' price history");
  L.agent_lane.assign(n, 0);
  L.agent_id.resize(n);
  for (size_t a = 0; a < n; ++a) L.agent_id[a] = g[a].agent_id;
  size_t i = 0;
  while (i < n) {
    const Genome& head = g[order[i]];
    size_t j = i;
    while (j < n && g[order[j]].instrument == head.instrument && g[order[j]].timeframe == head.timeframe) ++j;
    Stream st{};
    st.instrument = head.instrument;
    st.timeframe = head.timeframe;
    st.sm_begin = static_cast<uint32_t>(L.sms.size());
    st.n_agents = j - i;
    const size_t group = j - i;
    const size_t warps = (group + kWarpSize - 1) / kWarpSize;
    for (size_t w0 = 0; w0 < warps; w0 += warps_per_sm) {
      Sm sm{};
      sm.stream = static_cast<uint32_t>(L.streams.size());
      sm.lane_begin = static_cast<uint32_t>(L.params.size());
      sm.n_warps = static_cast<uint32_t>(std::min<size_t>(warps_per_sm, warps - w0));
      BankBuilder bb(sm.bank);
      const size_t lanes = static_cast<size_t>(sm.n_warps) * kWarpSize;
      for (size_t l = 0; l < lanes; ++l) {
        const size_t k = i + w0 * kWarpSize + l;
        LaneParams p{};
        if (k < j) {
          const uint32_t a = order[k];
          const Genome& x = g[a];
          p.active = 1;
          p.w[0] = x.w_trend;
          p.w[1] = x.w_rsi;
          p.w[2] = x.w_macd;
          p.w[3] = x.w_bb;
          p.w[4] = x.w_mom;
          p.entry = x.entry;
          p.cost = x.cost_bps * 1e-4;
          p.long_short = x.mode == static_cast<uint32_t>(Mode::LongShort);
          p.lookback = genome_lookback(x);
          p.external = x.kind == 1;
          if (!p.external && x.w_dsi != 0.0) sm.has_dsi = 1;
          if (p.external) {
            // no bank features: the score is set from outside; periods still set the warm-up
            for (int f = 0; f < kFeatures; ++f) p.w[f] = 0.0;
            sm.has_external = 1;
          } else {
            // relative index + 1 per kind; 0 = unused
            // (at most kMaxSmLanes features per kind: they fit)
            auto rel = [](uint32_t i) { return static_cast<uint16_t>(i + 1); };
            p.fidx[0] = x.w_trend != 0.0 ? rel(bb.trend(x.fast, x.slow, x.atr_period)) : 0;
            p.fidx[1] = x.w_rsi != 0.0 ? rel(bb.rsi(x.rsi_period)) : 0;
            p.fidx[2] = x.w_macd != 0.0 ? rel(bb.macd(x.macd_fast, x.macd_slow, x.macd_signal, x.atr_period)) : 0;
            p.fidx[3] = x.w_bb != 0.0 ? rel(bb.bb(x.bb_period)) : 0;
            p.fidx[4] = x.w_mom != 0.0 ? rel(bb.mom(x.mom_period)) : 0;
          }
          ++sm.n_active;
          L.agent_lane[a] = static_cast<uint32_t>(L.params.size());
          L.lane_agent.push_back(a);
        } else {
          L.lane_agent.push_back(UINT32_MAX);
        }
        L.params.push_back(p);
      }
      bb.finish();
      const uint32_t base[kFeatures] = {sm.bank.trend_base, sm.bank.rsi_base, sm.bank.macd_base,
                                        sm.bank.bb_base, sm.bank.mom_base};
      for (size_t l = 0; l < lanes; ++l) {
        LaneParams& p = L.params[sm.lane_begin + l];
        for (int f = 0; f < kFeatures; ++f)
          p.fidx[f] = p.fidx[f] == 0 ? 0 : static_cast<uint16_t>(base[f] + bb.remap[f][p.fidx[f] - 1u]);
      }
      L.sms.push_back(std::move(sm));
    }
    st.sm_end = static_cast<uint32_t>(L.sms.size());
    L.streams.push_back(st);
    i = j;
  }
  return L;
}

}  // namespace dynamic_core
