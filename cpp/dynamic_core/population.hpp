// The population laid out for execution: agents sorted by (instrument, timeframe, kind) into
// warps of 32 lanes (the tail of a group masked) and SMs of 1-4 warps, each SM owning the
// indicator bank of its stream. The layout depends only on the population and cores_per_sm.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "indicators.hpp"
#include "kernel.hpp"
#include "math.hpp"
#include "records.hpp"

namespace dynamic_core {

inline constexpr int32_t kMaxPeriod = 100000;
// Cost per unit of position change is at most 10% of equity: a reversal (2 units) then costs at
// most 20%, so equity stays positive (from 5,000 bps a reversal took more than all of it and
// equity went negative and kept compounding).
inline constexpr double kMaxCostBps = 1000.0;
// Weights are at most 1e300 in size: the blend of six (five features and DSI, each in [-1, 1])
// then stays finite. Past that it overflowed to +-inf, soft(inf) = inf/inf was NaN, and a valid
// agent was quarantined; any weight beyond ~1e16 saturates the score at +-1 anyway.
inline constexpr double kMaxWeight = 1e300;

// One bar's indicator outputs of a bank, flat, with warm flags (1.0 warm, 0.0 not).
struct BankValues {
  std::vector<double> ema, atr, macd_hist, rsi, ew_mean, ew_var, roc;
  std::vector<double> ema_ok, atr_ok, macd_ok, rsi_ok, ew_ok, roc_ok;
};

// Indicator kinds of a bank, in update order.
enum BankKind : int { kBankEma, kBankRsi, kBankAtr, kBankMacd, kBankEw, kBankRoc, kBankKinds };

// The steady state of a bank's indicators as structure of arrays. Once every indicator of a kind
// is past its warm-up, its update takes the same branch on every bar; from then on the kind is
// updated from these arrays (and BankValues), vectorised, with the same operations in the same
// order as the indicator structs, which stop being updated.
struct BankSteady {
  std::vector<double> ema_k;
  std::vector<double> rsi_gain, rsi_loss, rsi_nm1, rsi_n;
  std::vector<double> atr_nm1, atr_n;
  std::vector<double> macd_fast, macd_slow, macd_signal, macd_kf, macd_ks, macd_ksig;
  std::vector<double> ew_alpha, ew_om;
  std::vector<int32_t> roc_n;
};

// Feature indices into BankValues, padded with 0 to whole vectors of kBankPad.
inline constexpr int kBankPad = 8;
inline size_t bank_padded(size_t n) { return (n + kBankPad - 1) / kBankPad * kBankPad; }
struct BankIndex {
  std::vector<int32_t> trend_fast, trend_slow, trend_atr, rsi, macd_m, macd_atr, bb, mom;
};

// Shared scratchpad of one SM: every distinct (indicator, period) its lanes use, updated once
// per bar, and the distinct features derived from them. feat[0] is the constant 0 that unused
// features point to.
struct Bank {
  std::vector<Ema> emas;
  std::vector<Rsi> rsis;
  std::vector<Atr> atrs;
  std::vector<Macd> macds;
  std::vector<Ew> ews;
  std::vector<Roc> rocs;
  std::vector<uint32_t> roc_offset;
  std::vector<double> roc_buf;
  // This bar's indicator outputs, flat, and whether each is warm (0/1): what the feature pass
  // reads by index. Up to date for every kind, in either form; padded to whole vectors.
  BankValues val;
  // Steady form, entered a vector (kBankPad indicators) at a time: indicators are sorted by the
  // length of their warm-up, chunk_at[k][c] is the bar index from which every indicator of chunk
  // c of kind k takes its steady branch, steady_chunks[k] how many chunks (from the first) are in
  // the steady form (the rest in the struct form), steady[k] whether all are.
  BankSteady st;
  std::vector<int64_t> chunk_at[kBankKinds];
  int32_t steady_chunks[kBankKinds] = {};
  bool steady[kBankKinds] = {};
  // Closes of the last bars (a power-of-two ring indexed by bar index): the ROC inputs.
  std::vector<double> closes;
  uint32_t closes_mask = 0;
  // Distinct features, structure of arrays of indices into `val`.
  std::vector<int32_t> trend_fast, trend_slow, trend_atr;
  std::vector<int32_t> rsi_f, bb_f, mom_f;
  std::vector<int32_t> macd_m, macd_atr;
  BankIndex pidx;  // the same, padded
  // Features of each kind are sorted by the bar from which they are warm (feat_from, ascending);
  // the first feat_warm[f] of kind f are warm. A feature that is not warm is 0.
  std::vector<int64_t> feat_from[kFeatures];
  int32_t feat_warm[kFeatures] = {};
  std::vector<double> feat;
  uint32_t trend_base = 0, rsi_base = 0, macd_base = 0, bb_base = 0, mom_base = 0;
  int64_t nbars = 0;
  double prev_close = 0.0;
  double ret = 0.0;  // close-to-close return of the current bar

  // Defined with the lane kernel (compiled for several instruction sets).
  void update(const Bar& b);
  // The same, with this bar's features written to out (feat.size() values) instead of feat:
  // every one, the features not warm yet and feat[0] as 0.
  void update_into(const Bar& b, double* out);
  // Sorts the features of each kind by the bar from which they are warm; remap[f][i] is the new
  // index of feature i of kind f (relative to the kind).
  void sort_features(std::vector<uint32_t> (&remap)[kFeatures]);
  // Sizes the outputs and the steady form once the indicators and features are known.
  void resize_values();
  size_t distinct_indicators() const {
    return emas.size() + rsis.size() + atrs.size() + macds.size() + ews.size() + rocs.size();
  }
  size_t n_features() const {
    return trend_fast.size() + rsi_f.size() + macd_m.size() + bb_f.size() + mom_f.size();
  }
  // Switches chunk c of a kind to the steady form (copies the struct state into BankSteady).
  void enter_steady_chunk(int kind, int32_t c);
  // Drops the per-bar state, keeping what describes the bank (indicators and features): for a
  // bank whose lanes an engine serves from a merged bank (merge_banks).
  void release_state();
};

// One bank serving the lanes of several banks of the same stream: every distinct indicator and
// feature of theirs once, fresh (no bar seen). map[k][f] is the index in the merged feature array
// of feature f of banks[k] (map[k][0] = 0, the constant 0). Feature values do not depend on the
// bank they are computed in, so lanes read the same values through either.
Bank merge_banks(const std::vector<const Bank*>& banks, std::vector<std::vector<int32_t>>& map);

// Per-lane parameters (read-only while running).
struct LaneParams {
  double w[kFeatures];
  double entry;
  double cost;  // cost_bps * 1e-4
  uint16_t fidx[kFeatures];
  uint8_t long_short;
  uint8_t active;
  uint8_t external;  // kind 1: the score comes from StateArrays::ext_score, not the blend
  int32_t lookback;  // bar index from which every used indicator is warm
};

// The same parameters as structure-of-arrays, the form the lane kernel vectorises over.
struct LaneArrays {
  std::vector<double> w[kFeatures];
  std::vector<int32_t> fidx[kFeatures];
  std::vector<double> entry, cost;
  std::vector<int32_t> lookback, long_short, active, external;
  void assign(const std::vector<LaneParams>& p);
  // Asks for the cache lines that writing lane i's parameters (a child written into its slot)
  // touches, ahead of the writes: every array but active and external, which a child keeps.
  void prefetch_for_write(size_t i) const {
    for (int f = 0; f < kFeatures; ++f) {
      __builtin_prefetch(w[f].data() + i, 1);
      __builtin_prefetch(fidx[f].data() + i, 1);
    }
    for (const auto* v : {&entry, &cost}) __builtin_prefetch(v->data() + i, 1);
    for (const auto* v : {&lookback, &long_short}) __builtin_prefetch(v->data() + i, 1);
  }
};

// Agent state as structure-of-arrays, padded like the lanes.
struct StateArrays {
  std::vector<double> score, equity, entry_equity, peak, max_dd, ret_sum, ret_sq;
  std::vector<double> credit;  // consensus-weight multiplier from live outcomes, 1.0 = neutral
  std::vector<double> ext_score;  // kind-1 lanes: the score set from outside for the next updates
  std::vector<double> dsi;        // w_dsi x the stream's DSI evidence (Engine::set_dsi), 0 when unread
  std::vector<uint32_t> trades, wins, n_ret, quarantined;
  std::vector<int32_t> position, action;
  void init(size_t n);
  void reset(size_t i);  // lane i back to its initial state (credit 1.0, external score 0.0)
  // Asks for the cache lines reset(i) writes, ahead of it (keep the two lists alike).
  void prefetch_for_write(size_t i) const {
    for (const auto* v : {&score, &equity, &entry_equity, &peak, &max_dd, &credit, &ext_score, &dsi, &ret_sum, &ret_sq})
      __builtin_prefetch(v->data() + i, 1);
    for (const auto* v : {&trades, &wins, &n_ret, &quarantined}) __builtin_prefetch(v->data() + i, 1);
    for (const auto* v : {&position, &action}) __builtin_prefetch(v->data() + i, 1);
  }
  LaneState get(size_t i) const {
    return LaneState{score[i], equity[i], entry_equity[i], peak[i],   max_dd[i], ret_sum[i],    ret_sq[i],
                     trades[i], wins[i],  n_ret[i],        position[i], action[i], quarantined[i]};
  }
};

// The kernel's view of the lanes from `base` on (the first lane of an SM): no external-score or
// DSI lane assumed (has_external, has_dsi 0; the caller sets them per SM).
inline LaneView lane_view(LaneArrays& l, StateArrays& s, size_t base) {
  LaneView v;
  for (int f = 0; f < kFeatures; ++f) {
    v.w[f] = l.w[f].data() + base;
    v.fidx[f] = l.fidx[f].data() + base;
  }
  v.entry = l.entry.data() + base;
  v.cost = l.cost.data() + base;
  v.lookback = l.lookback.data() + base;
  v.long_short = l.long_short.data() + base;
  v.active = l.active.data() + base;
  v.score = s.score.data() + base;
  v.equity = s.equity.data() + base;
  v.entry_equity = s.entry_equity.data() + base;
  v.peak = s.peak.data() + base;
  v.max_dd = s.max_dd.data() + base;
  v.ret_sum = s.ret_sum.data() + base;
  v.ret_sq = s.ret_sq.data() + base;
  v.credit = s.credit.data() + base;
  v.external = l.external.data() + base;
  v.ext_score = s.ext_score.data() + base;
  v.has_external = 0;
  v.dsi = s.dsi.data() + base;
  v.has_dsi = 0;
  v.trades = s.trades.data() + base;
  v.wins = s.wins.data() + base;
  v.n_ret = s.n_ret.data() + base;
  v.quarantined = s.quarantined.data() + base;
  v.position = s.position.data() + base;
  v.action = s.action.data() + base;
  return v;
}

struct Sm {
  uint32_t stream;
  uint32_t lane_begin;  // multiple of kWarpSize
  uint32_t n_warps;
  uint32_t n_active;
  uint32_t has_external;  // any kind-1 lane: the kernel then overrides their blended scores
  uint32_t has_dsi;       // any lane with w_dsi != 0 (set for good once one appears)
  Bank bank;
};

struct Stream {
  uint32_t instrument;
  uint32_t timeframe;
  uint32_t sm_begin;
  uint32_t sm_end;
  uint64_t n_agents;
  int64_t last_ts;
  bool has_last;
  uint64_t nbars;
};

// Validates genomes; throws std::invalid_argument naming the first bad row.
void validate_genomes(const Genome* g, size_t n);

// Lookback (bar index of the first warm bar) of an agent: the largest over used indicators.
int32_t genome_lookback(const Genome& g);

struct Layout {
  std::vector<Stream> streams;
  std::vector<Sm> sms;
  std::vector<LaneParams> params;   // per lane, padded to whole warps (an Engine moves them into
                                    // its lane arrays and releases these)
  std::vector<uint32_t> lane_agent;  // population index of each lane, UINT32_MAX when masked
  std::vector<uint32_t> agent_lane;  // lane of each agent (population order)
  std::vector<uint32_t> agent_id;    // agent_id of each agent (population order)
  size_t n_agents = 0;
};

Layout build_layout(const Genome* g, size_t n, int cores_per_sm);

}  // namespace dynamic_core
