// Fixed-layout records shared with numpy: the Python dtypes are built from the offsets the
// bindings export, so the two sides cannot drift.
#pragma once
#include "math.hpp"  // the fixed-width integer types, under NVRTC too (cuda/ writes Signal records)
#if !defined(__CUDACC_RTC__)
#include <cstddef>
#include <type_traits>
#define DC_STANDARD_LAYOUT(T) static_assert(std::is_trivially_copyable_v<T> && std::is_standard_layout_v<T>)
#else
#define DC_STANDARD_LAYOUT(T) static_assert(true)
#endif

namespace dynamic_core {

struct Bar {
  int64_t ts;           // ns since the epoch
  uint32_t instrument;  // id from dc.instruments
  uint32_t timeframe;   // seconds
  double open;
  double high;
  double low;
  double close;
  double volume;
};

enum class Mode : uint32_t { LongOnly = 0, LongShort = 1 };

struct Genome {
  uint32_t agent_id;
  uint32_t instrument;
  uint32_t timeframe;
  uint32_t mode;  // Mode
  uint32_t kind;  // 0 = indicator blend; 1 = external score (set from outside per update, e.g. learning agents)
  int32_t fast;   // EMA periods of the trend feature
  int32_t slow;
  int32_t rsi_period;
  int32_t macd_fast;
  int32_t macd_slow;
  int32_t macd_signal;
  int32_t atr_period;
  int32_t bb_period;
  int32_t mom_period;
  double w_trend;
  double w_rsi;
  double w_macd;
  double w_bb;
  double w_mom;
  double entry;     // |score| threshold for taking a position
  double cost_bps;  // cost per unit of position change, in basis points of equity
  double w_dsi;     // weight of the stream's DSI microstructure evidence (Engine::set_dsi); 0: not read
};

struct Signal {
  int64_t ts;
  uint32_t instrument;
  uint32_t timeframe;
  uint64_t seq;              // ingress sequence number of the bar
  uint64_t population_hash;  // provenance
  double score;              // fitness-weighted mean score
  double confidence;
  double agreement;
  double dispersion;
  double dsi;      // the stream's DSI microstructure evidence in [-1, 1] that the bar's agents read
  int32_t action;  // Action: -2..2
  uint32_t n_agents;
  uint32_t votes[5];  // STRONG_SELL, SELL, HOLD, BUY, STRONG_BUY
  uint32_t flags;     // kSignalDsi: `dsi` holds evidence set for the stream (Engine::set_dsi)
};

// Signal::flags bits.
constexpr uint32_t kSignalDsi = 1u;  // DSI evidence was set for the stream before this bar

// A bar admitted for execution outside the engine's workers (a device backend): its stream, its
// position in the batch, its index within the stream and its ingress sequence number.
struct AdmittedBar {
  uint32_t stream;
  uint32_t index;
  uint64_t sidx;
  uint64_t seq;
};

// DynamicFusionAlgo for one bar: the sum of its stream's SM summaries (added in SM order) fused,
// as the signal record (the CPU consensus and cuda/engine.cu both build signals with this).
DC_HOST_DEVICE inline Signal signal_of(const Summary& total, int64_t ts, uint32_t instrument, uint32_t timeframe,
                                       uint64_t seq, uint64_t population_hash, double dsi = 0.0, uint32_t flags = 0) {
  const Fused f = fuse(total);
  Signal sig{};
  sig.ts = ts;
  sig.instrument = instrument;
  sig.timeframe = timeframe;
  sig.seq = seq;
  sig.population_hash = population_hash;
  sig.score = f.score;
  sig.confidence = f.confidence;
  sig.agreement = f.agreement;
  sig.dispersion = f.dispersion;
  sig.dsi = dsi;
  sig.action = f.action;
  sig.n_agents = f.n;
  for (int v = 0; v < 5; ++v) sig.votes[v] = f.votes[v];
  sig.flags = flags;
  return sig;
}

DC_HOST_DEVICE inline Signal fused_signal(const Summary* sm, uint32_t n_sm, int64_t ts, uint32_t instrument,
                                          uint32_t timeframe, uint64_t seq, uint64_t population_hash,
                                          double dsi = 0.0, uint32_t flags = 0) {
  Summary total;
  summary_zero(total);
  for (uint32_t m = 0; m < n_sm; ++m) summary_add(total, sm[m]);  // SM order
  return signal_of(total, ts, instrument, timeframe, seq, population_hash, dsi, flags);
}

struct AgentRecord {
  uint32_t agent_id;
  uint32_t instrument;
  uint32_t timeframe;
  int32_t position;
  int32_t action;
  uint32_t warm;
  uint32_t quarantined;
  uint32_t trades;
  uint32_t wins;
  uint32_t n_returns;
  double score;
  double equity;
  double peak;
  double max_drawdown;
  double ret_mean;
  double ret_std;
  double sharpe;  // per-bar mean / std, annualised by sqrt(bars per calendar year)
  double fitness;  // consensus weight: max(equity, 0) x (1 - max_drawdown) x credit
  double credit;
};

struct DeadLetter {
  Bar bar;
  uint64_t index;  // position in the batch it arrived in
  uint32_t reason;
  uint32_t batch;  // number of the run()/validate call, counted from 0
};

static_assert(sizeof(Bar) == 56);
static_assert(sizeof(Genome) == 120);
static_assert(sizeof(Signal) == 104);
static_assert(sizeof(AgentRecord) == 112);
DC_STANDARD_LAYOUT(Bar);
DC_STANDARD_LAYOUT(Genome);
DC_STANDARD_LAYOUT(Signal);
DC_STANDARD_LAYOUT(AgentRecord);
DC_STANDARD_LAYOUT(AdmittedBar);

// Why a bar was refused. Skipping a valid bar that no agent follows is not a reject.
enum class Reason : uint32_t {
  Ok = 0,
  NonFinite = 1,
  NonPositivePrice = 2,
  HighBelowLow = 3,
  OpenOutOfRange = 4,
  CloseOutOfRange = 5,
  NegativeVolume = 6,
  OutOfOrder = 7,
  DuplicateTimestamp = 8,
  UnknownInstrument = 9,
  BadTimeframe = 10,
  PriceOutOfRange = 11,  // a positive price outside [kMinPrice, kMaxPrice]
};
inline constexpr uint32_t kReasonCount = 12;
// The prices a bar may carry. Far wider than any quote (a price ratio stays below 1e30, its
// square far from overflow), they refuse what only a unit or scaling error makes: a 1e-308
// or subnormal price would turn the next bar's return into inf and quarantine every agent of
// the stream.
inline constexpr double kMinPrice = 1e-15;
inline constexpr double kMaxPrice = 1e15;

DC_HOST_DEVICE inline const char* reason_name(Reason r) {
  switch (r) {
    case Reason::Ok: return "ok";
    case Reason::NonFinite: return "non_finite";
    case Reason::NonPositivePrice: return "non_positive_price";
    case Reason::HighBelowLow: return "high_below_low";
    case Reason::OpenOutOfRange: return "open_out_of_range";
    case Reason::CloseOutOfRange: return "close_out_of_range";
    case Reason::NegativeVolume: return "negative_volume";
    case Reason::OutOfOrder: return "out_of_order";
    case Reason::DuplicateTimestamp: return "duplicate_timestamp";
    case Reason::UnknownInstrument: return "unknown_instrument";
    case Reason::BadTimeframe: return "bad_timeframe";
    case Reason::PriceOutOfRange: return "price_out_of_range";
  }
  return "unknown";
}

// One trade print with the quote in force when it printed. Quotes are optional: bid == ask == 0
// means none was known. `side` is the aggressor as the venue reports it.
enum class TickSide : uint32_t { Unknown = 0, Buy = 1, Sell = 2 };

struct Tick {
  int64_t ts;           // ns since the epoch
  uint32_t instrument;  // id from dc.instruments
  uint32_t side;        // TickSide: 0 unknown, 1 buyer lifted the offer, 2 seller hit the bid
  double price;
  double size;
  double bid;
  double ask;
};

static_assert(sizeof(Tick) == 48);
DC_STANDARD_LAYOUT(Tick);

}  // namespace dynamic_core
