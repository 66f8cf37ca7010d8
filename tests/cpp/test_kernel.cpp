// The vectorised lane kernel (kernel.cpp, every instruction-set clone) against the scalar
// lane_step of math.hpp that the CUDA kernels share: bit-identical state and summaries. Also the
// vectorised feature pass of a bank against the scalar *_feature functions.
#include <limits>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "check.hpp"
#include "dynamic_core/kernel.hpp"
#include "dynamic_core/population.hpp"

using namespace dynamic_core;

namespace {

struct Lanes {
  std::vector<double> w[kFeatures];
  std::vector<int32_t> fidx[kFeatures];
  std::vector<double> entry, cost;
  std::vector<int32_t> lookback, long_short, active, external;
  std::vector<double> ext_score;
  int has_external = 0;
  std::vector<double> dsi;  // w_dsi x evidence per lane
  int has_dsi = 0;
  std::vector<double> score, equity, entry_equity, peak, max_dd, ret_sum, ret_sq, credit;
  std::vector<uint32_t> trades, wins, n_ret, quarantined;
  std::vector<int32_t> position, action;

  explicit Lanes(int n) {
    for (int f = 0; f < kFeatures; ++f) {
      w[f].resize(n);
      fidx[f].resize(n);
    }
    for (auto* v : {&entry, &cost, &score, &equity, &entry_equity, &peak, &max_dd, &ret_sum, &ret_sq})
      v->resize(n);
    credit.assign(n, 1.0);
    for (auto* v : {&lookback, &long_short, &active, &external, &position, &action}) v->resize(n);
    ext_score.resize(n);
    dsi.resize(n);
    for (auto* v : {&trades, &wins, &n_ret, &quarantined}) v->resize(n);
  }
  LaneView view() {
    LaneView v;
    for (int f = 0; f < kFeatures; ++f) {
      v.w[f] = w[f].data();
      v.fidx[f] = fidx[f].data();
    }
    v.entry = entry.data();
    v.cost = cost.data();
    v.lookback = lookback.data();
    v.long_short = long_short.data();
    v.active = active.data();
    v.score = score.data();
    v.equity = equity.data();
    v.entry_equity = entry_equity.data();
    v.peak = peak.data();
    v.max_dd = max_dd.data();
    v.ret_sum = ret_sum.data();
    v.ret_sq = ret_sq.data();
    v.credit = credit.data();
    v.external = external.data();
    v.ext_score = ext_score.data();
    v.has_external = has_external;
    v.dsi = dsi.data();
    v.has_dsi = has_dsi;
    v.trades = trades.data();
    v.wins = wins.data();
    v.n_ret = n_ret.data();
    v.quarantined = quarantined.data();
    v.position = position.data();
    v.action = action.data();
    return v;
  }
};

// The scalar path: blend + lane_step + warp_tree, exactly as a GPU thread does it.
Summary scalar_step(Lanes& L, int lanes, const double* feat, int32_t t, double ret, int poison) {
  double sw[kMaxSmLanes], sws[kMaxSmLanes], ss[kMaxSmLanes], ss2[kMaxSmLanes];
  Summary total;
  summary_zero(total);
  for (int i = 0; i < lanes; ++i) {
    double fw[kFeatures], fv[kFeatures];
    for (int f = 0; f < kFeatures; ++f) {
      fw[f] = L.w[f][i];
      fv[f] = feat[L.fidx[f][i]];
    }
    double score = blend(fw, fv, L.has_dsi ? L.dsi[i] : 0.0);
    if (L.has_external && L.external[i]) score = L.ext_score[i];
    if (i == poison) score = __builtin_nan("");
    const int warm = t >= L.lookback[i];
    const LaneState cur{L.score[i], L.equity[i],  L.entry_equity[i], L.peak[i],     L.max_dd[i],
                        L.ret_sum[i], L.ret_sq[i], L.trades[i],     L.wins[i],     L.n_ret[i],
                        L.position[i], L.action[i], L.quarantined[i]};
    LaneState nx;
    const int ok = lane_step(cur, nx, score, ret, warm, L.entry[i], L.long_short[i], L.cost[i]);
    const int live = (L.active[i] != 0) & (cur.quarantined == 0);
    const int keep = live & ok;
    const LaneState& s = keep ? nx : cur;
    L.score[i] = s.score;
    L.equity[i] = s.equity;
    L.entry_equity[i] = s.entry_equity;
    L.peak[i] = s.peak;
    L.max_dd[i] = s.max_dd;
    L.ret_sum[i] = s.ret_sum;
    L.ret_sq[i] = s.ret_sq;
    L.trades[i] = s.trades;
    L.wins[i] = s.wins;
    L.n_ret[i] = s.n_ret;
    L.position[i] = s.position;
    L.action[i] = s.action;
    L.quarantined[i] = cur.quarantined | static_cast<uint32_t>(live & !ok);
    const int counts = keep & warm;
    const double wgt = fitness(nx.equity, nx.max_dd, L.credit[i]);
    sw[i] = counts ? wgt : 0.0;
    sws[i] = counts ? wgt * nx.score : 0.0;
    ss[i] = counts ? nx.score : 0.0;
    ss2[i] = counts ? nx.score * nx.score : 0.0;
    total.n += static_cast<uint32_t>(counts);
    if (counts) ++total.votes[nx.action + 2];
  }
  for (int w = 0; w < lanes; w += kWarpSize) {
    total.sum_w = total.sum_w + warp_tree(sw + w);
    total.sum_ws = total.sum_ws + warp_tree(sws + w);
    total.sum_s = total.sum_s + warp_tree(ss + w);
    total.sum_s2 = total.sum_s2 + warp_tree(ss2 + w);
  }
  return total;
}

template <class T>
bool same(const std::vector<T>& a, const std::vector<T>& b) {
  return std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// Every feature of a bank recomputed with the scalar feature functions from its indicator outputs;
// true when bit-identical.
bool features_match(const Bank& b, double close) {
  const BankValues& v = b.val;
  std::vector<double> f(b.feat.size(), 0.0);
  for (size_t i = 0; i < b.trend_fast.size(); ++i) {
    const int32_t ef = b.trend_fast[i], es = b.trend_slow[i], a = b.trend_atr[i];
    const bool w = v.ema_ok[ef] != 0.0 && v.ema_ok[es] != 0.0 && v.atr_ok[a] != 0.0;
    f[b.trend_base + i] = w ? trend_feature(v.ema[ef], v.ema[es], v.atr[a]) : 0.0;
  }
  for (size_t i = 0; i < b.rsi_f.size(); ++i)
    f[b.rsi_base + i] = v.rsi_ok[b.rsi_f[i]] != 0.0 ? rsi_feature(v.rsi[b.rsi_f[i]]) : 0.0;
  for (size_t i = 0; i < b.macd_m.size(); ++i) {
    const int32_t m = b.macd_m[i], a = b.macd_atr[i];
    f[b.macd_base + i] = (v.macd_ok[m] != 0.0 && v.atr_ok[a] != 0.0) ? macd_feature(v.macd_hist[m], v.atr[a]) : 0.0;
  }
  for (size_t i = 0; i < b.bb_f.size(); ++i) {
    const int32_t e = b.bb_f[i];
    f[b.bb_base + i] = v.ew_ok[e] != 0.0 ? bb_feature(close, v.ew_mean[e], v.ew_var[e]) : 0.0;
  }
  for (size_t i = 0; i < b.mom_f.size(); ++i)
    f[b.mom_base + i] = v.roc_ok[b.mom_f[i]] != 0.0 ? mom_feature(v.roc[b.mom_f[i]]) : 0.0;
  return f.size() == b.feat.size() && std::memcmp(f.data(), b.feat.data(), f.size() * sizeof(double)) == 0;
}

// The indicators of a bank as plain structs, updated with their scalar update() every bar: the
// reference for the bank's outputs, which switch to the vectorised steady form after warm-up.
struct ScalarBank {
  std::vector<Ema> emas;
  std::vector<Rsi> rsis;
  std::vector<Atr> atrs;
  std::vector<Macd> macds;
  std::vector<Ew> ews;
  std::vector<Roc> rocs;
  std::vector<std::vector<double>> roc_buf;
  explicit ScalarBank(const Bank& b)
      : emas(b.emas), rsis(b.rsis), atrs(b.atrs), macds(b.macds), ews(b.ews), rocs(b.rocs) {
    for (const Roc& r : rocs) roc_buf.emplace_back(static_cast<size_t>(r.n), 0.0);
  }
  // Updates and compares with the bank's outputs of the same bar (values and warm flags).
  bool update_and_match(const Bar& bar, const Bank& b) {
    int kind = 0;
    const BankValues& v = b.val;
    bool ok = true;
    auto same = [&](double x, double y) {  // reports the first difference
      if (ok && std::memcmp(&x, &y, sizeof x) != 0)
        std::fprintf(stderr, "bank kind %d, bar %lld: %.17g (scalar) vs %.17g\n", kind,
                     static_cast<long long>(b.nbars - 1), x, y);
      ok = ok && std::memcmp(&x, &y, sizeof x) == 0;
    };
    for (size_t i = 0; i < emas.size(); ++i) {
      same(emas[i].update(bar.close) ? 1.0 : 0.0, v.ema_ok[i]);
      same(emas[i].value, v.ema[i]);
    }
    kind = 1;
    for (size_t i = 0; i < rsis.size(); ++i) {
      same(rsis[i].update(bar.close) ? 1.0 : 0.0, v.rsi_ok[i]);
      same(rsis[i].value, v.rsi[i]);
    }
    kind = 2;
    for (size_t i = 0; i < atrs.size(); ++i) {
      same(atrs[i].update(bar.high, bar.low, bar.close) ? 1.0 : 0.0, v.atr_ok[i]);
      same(atrs[i].value, v.atr[i]);
    }
    kind = 3;
    for (size_t i = 0; i < macds.size(); ++i) {
      same(macds[i].update(bar.close) ? 1.0 : 0.0, v.macd_ok[i]);
      same(macds[i].hist, v.macd_hist[i]);
    }
    kind = 4;
    for (size_t i = 0; i < ews.size(); ++i) {
      same(ews[i].update(bar.close) ? 1.0 : 0.0, v.ew_ok[i]);
      same(ews[i].mean, v.ew_mean[i]);
      same(ews[i].var, v.ew_var[i]);
    }
    kind = 5;
    for (size_t i = 0; i < rocs.size(); ++i) {
      same(rocs[i].update(bar.close, roc_buf[i].data()) ? 1.0 : 0.0, v.roc_ok[i]);
      same(rocs[i].value, v.roc[i]);
    }
    return ok;
  }
};

void check_bank_features() {
  std::mt19937_64 rng(777);
  auto pick = [&](int lo, int hi) { return lo + static_cast<int32_t>(rng() % static_cast<uint64_t>(hi - lo)); };
  std::vector<Genome> g(300);
  for (size_t i = 0; i < g.size(); ++i) {
    Genome& x = g[i];
    x = Genome{};
    x.agent_id = static_cast<uint32_t>(i);
    x.instrument = 1;
    x.timeframe = 60;
    x.fast = pick(2, 50);
    x.slow = x.fast + pick(1, 150);
    x.rsi_period = pick(2, 31);
    x.macd_fast = pick(2, 21);
    x.macd_slow = x.macd_fast + pick(1, 31);
    x.macd_signal = pick(2, 16);
    x.atr_period = pick(2, 31);
    x.bb_period = pick(2, 51);
    x.mom_period = pick(2, 31);
    x.w_trend = (rng() % 3 == 0) ? 0.0 : 1.0;
    x.w_rsi = x.w_macd = x.w_bb = x.w_mom = 0.5;
    x.entry = 0.1;
  }
  Layout L = build_layout(g.data(), g.size(), 128);
  std::vector<ScalarBank> ref;
  for (const Sm& sm : L.sms) ref.emplace_back(sm.bank);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  double price = 100.0;
  bool all_same = true, values_same = true;
  for (int t = 0; t < 800; ++t) {
    // A flat stretch first (zero ATR and variance: the discarded divisions), then a random walk
    // with the odd zero-range bar and, once every kind is steady, another flat stretch.
    const bool flat = t < 120 || (t >= 600 && t < 660);
    if (!flat) price *= 1.0 + 0.01 * u(rng);
    const double spread = (flat || rng() % 50 == 0) ? 0.0 : 0.002 * price;
    const Bar bar{t * 60'000'000'000LL, 1, 60, price, price + spread, price - spread, price, 1.0};
    for (size_t m = 0; m < L.sms.size(); ++m) {
      Bank& bank = L.sms[m].bank;
      bank.update(bar);
      values_same = values_same && ref[m].update_and_match(bar, bank);
      all_same = all_same && features_match(bank, bar.close);
    }
  }
  CHECK(values_same);
  CHECK(all_same);
  for (const Sm& sm : L.sms)
    for (int k = 0; k < kBankKinds; ++k) CHECK(sm.bank.steady[k]);  // the steady form was exercised
  CHECK(L.sms.size() >= 3);
}

// A bank merged from several SMs' banks (merge_banks) gives every SM's features the same values,
// bit for bit, through its map.
void check_merged_banks() {
  std::mt19937_64 rng(4242);
  auto pick = [&](int lo, int hi) { return lo + static_cast<int32_t>(rng() % static_cast<uint64_t>(hi - lo)); };
  std::vector<Genome> g(700);
  for (size_t i = 0; i < g.size(); ++i) {
    Genome& x = g[i];
    x = Genome{};
    x.agent_id = static_cast<uint32_t>(i);
    x.instrument = 2;
    x.timeframe = 60;
    x.fast = pick(1, 30);
    x.slow = pick(1, 120);  // sometimes below fast
    x.rsi_period = pick(1, 25);
    x.macd_fast = pick(1, 15);
    x.macd_slow = pick(1, 30);  // sometimes below macd_fast (the periods are swapped)
    x.macd_signal = pick(1, 10);
    x.atr_period = pick(1, 30);
    x.bb_period = pick(1, 40);
    x.mom_period = pick(1, 30);
    x.w_trend = (rng() % 4 == 0) ? 0.0 : 1.0;
    x.w_rsi = (rng() % 4 == 0) ? 0.0 : 0.5;
    x.w_macd = (rng() % 4 == 0) ? 0.0 : 0.25;
    x.w_bb = (rng() % 4 == 0) ? 0.0 : -0.5;
    x.w_mom = (rng() % 4 == 0) ? 0.0 : 0.1;
    x.entry = 0.1;
  }
  Layout L = build_layout(g.data(), g.size(), 64);
  CHECK(L.sms.size() >= 6);
  // groups: every SM alone, pairs, and all of them
  std::vector<std::vector<size_t>> groups;
  for (size_t m = 0; m < L.sms.size(); m += 2) groups.push_back({m, m + 1 < L.sms.size() ? m + 1 : m});
  groups.emplace_back();
  for (size_t m = 0; m < L.sms.size(); ++m) groups.back().push_back(m);
  std::vector<Bank> merged;
  std::vector<std::vector<std::vector<int32_t>>> maps;
  for (const auto& grp : groups) {
    std::vector<const Bank*> banks;
    for (size_t m : grp) banks.push_back(&L.sms[m].bank);
    maps.emplace_back();
    merged.push_back(merge_banks(banks, maps.back()));
  }
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  double price = 50.0;
  bool same = true;
  for (int t = 0; t < 300; ++t) {
    price *= 1.0 + 0.01 * u(rng);
    const Bar bar{t * 60'000'000'000LL, 2, 60, price, price * 1.002, price * 0.998, price, 1.0};
    for (Sm& sm : L.sms) sm.bank.update(bar);
    for (size_t k = 0; k < groups.size(); ++k) {
      merged[k].update(bar);
      for (size_t j = 0; j < groups[k].size(); ++j) {
        const Bank& b = L.sms[groups[k][j]].bank;
        for (size_t f = 0; f < b.feat.size(); ++f) {
          const double x = b.feat[f], y = merged[k].feat[static_cast<size_t>(maps[k][j][f])];
          same = same && std::memcmp(&x, &y, sizeof x) == 0;
        }
      }
    }
  }
  CHECK(same);
  // the merged bank of all SMs has no more indicators than their banks together, and fewer
  CHECK(merged.back().distinct_indicators() < [&] {
    size_t n = 0;
    for (const Sm& sm : L.sms) n += sm.bank.distinct_indicators();
    return n;
  }());
}

void check_lanes() {
  std::mt19937_64 rng(12345);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  for (int lanes : {32, 64, 96, 128}) {
    Lanes a(lanes);
    const int n_feat = 40;
    for (int i = 0; i < lanes; ++i) {
      for (int f = 0; f < kFeatures; ++f) {
        a.w[f][i] = (rng() % 4 == 0) ? 0.0 : 2.0 * u(rng);
        a.fidx[f][i] = static_cast<int32_t>(rng() % n_feat);
      }
      a.entry[i] = 0.3 * (u(rng) + 1.0) / 2.0;
      a.cost[i] = 1e-4 * (u(rng) + 1.0);
      a.lookback[i] = static_cast<int32_t>(rng() % 30);
      a.long_short[i] = static_cast<int32_t>(rng() % 2);
      a.active[i] = (rng() % 10) != 0;
      a.credit[i] = (rng() % 3 == 0) ? 1.0 : 0.25 + 3.75 * (u(rng) + 1.0) / 2.0;
      a.external[i] = rng() % 5 == 0;
      a.equity[i] = a.entry_equity[i] = a.peak[i] = 1.0;
    }
    a.has_external = lanes % 64 == 0;  // external-score lanes in half of the sizes
    a.has_dsi = lanes != 64;            // DSI readers (a third of the lanes) in three sizes of four
    for (int i = 0; i < lanes; ++i) a.dsi[i] = (rng() % 3 == 0) ? 0.8 * u(rng) : 0.0;
    Lanes b = a;
    LaneView va = a.view();
    std::vector<double> feat(n_feat);
    bool all_same = true;
    uint64_t updates = 0, quarantined = 0;
    for (int32_t t = 0; t < 400; ++t) {
      feat[0] = 0.0;
      for (int k = 1; k < n_feat; ++k) feat[k] = u(rng);
      for (int i = 0; i < lanes; ++i) a.ext_score[i] = b.ext_score[i] = u(rng);
      if (t == 150)  // the evidence changes
        for (int i = 0; i < lanes; ++i) a.dsi[i] = b.dsi[i] = -0.5 * a.dsi[i];
      // two squeezes (+150%, then +300%): shorts lose more than everything, and some come back
      // above 0 with a drawdown above 1, which must weigh 0 (not less) in every variant
      const double ret = t == 0 ? 0.0 : t == 250 ? 1.5 : t == 253 ? 3.0 : 0.01 * u(rng);
      const int poison = (t == 200) ? 5 : -1;
      const Summary sv = sm_step(va, lanes, feat.data(), t, ret, poison, updates, quarantined);
      const Summary sc = scalar_step(b, lanes, feat.data(), t, ret, poison);
      all_same = all_same && std::memcmp(&sv, &sc, sizeof(Summary)) == 0;
    }
    CHECK(all_same);
    CHECK(same(a.score, b.score) && same(a.equity, b.equity) && same(a.entry_equity, b.entry_equity));
    CHECK(same(a.peak, b.peak) && same(a.max_dd, b.max_dd) && same(a.ret_sum, b.ret_sum));
    CHECK(same(a.ret_sq, b.ret_sq) && same(a.trades, b.trades) && same(a.wins, b.wins));
    CHECK(same(a.n_ret, b.n_ret) && same(a.position, b.position) && same(a.action, b.action));
    CHECK(same(a.quarantined, b.quarantined));
    CHECK_EQ(a.quarantined[5], a.active[5] ? 1u : 0u);
    uint32_t trades = 0;
    for (int i = 0; i < lanes; ++i) trades += a.trades[i];
    CHECK(trades > 0);  // the check exercised position changes
    int over = 0;       // lanes whose drawdown is above 1 with equity above 0
    for (int i = 0; i < lanes; ++i) over += a.max_dd[i] > 1.0 && a.equity[i] > 0.0;
    CHECK(over > 0);
    CHECK(updates > 0);
    CHECK_EQ(quarantined, a.active[5] ? 1u : 0u);
  }
}

// Fusion weighs by fitness; when the weighted sums overflow (equities near the double range,
// credit at its maximum) it falls back to the plain mean instead of inf/inf = NaN or 0.
void check_fuse_overflow() {
  Summary t;
  summary_zero(t);
  t.n = 4;
  t.sum_s = 0.4 * 4;
  t.sum_s2 = 0.16 * 4;
  t.votes[3] = 4;
  t.sum_w = 2.0;
  t.sum_ws = 1.0;
  CHECK_EQ(fuse(t).score, 0.5);  // weighted
  const double inf = std::numeric_limits<double>::infinity();
  t.sum_w = inf;
  t.sum_ws = inf;
  CHECK_EQ(fuse(t).score, 0.4);  // was NaN
  t.sum_ws = 1e300;
  CHECK_EQ(fuse(t).score, 0.4);  // was 0
  t.sum_w = 1e300;
  t.sum_ws = -inf;
  CHECK_EQ(fuse(t).score, 0.4);  // was -inf
  t.sum_w = 0.0;
  t.sum_ws = 0.0;
  CHECK_EQ(fuse(t).score, 0.4);  // no weight: the plain mean, as before
}

}  // namespace

int main() {
  check_fuse_overflow();
  // Every instruction-set variant this CPU runs: the baseline, x86-64-v3, x86-64-v4.
  const int best = kernel_isa();
  for (int level : {0, 3, 4}) {
    if (set_kernel_isa(level) != level) continue;
    check_bank_features();
    check_merged_banks();
    check_lanes();
    std::printf("kernel: instruction-set level %d checked\n", level);
  }
  set_kernel_isa(best);
  return finish("kernel");
}
