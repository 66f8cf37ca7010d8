#include "engine.hpp"

#include <algorithm>
#include <chrono>
#include <stdexcept>

namespace dynamic_core {

namespace {
inline uint64_t stream_key(uint32_t instrument, uint32_t timeframe) {
  return (static_cast<uint64_t>(instrument) << 32) | timeframe;
}
}  // namespace

Reason check_bar(const Bar& b, uint32_t n_registered) {
  if (b.instrument >= n_registered) return Reason::UnknownInstrument;
  if (b.timeframe == 0) return Reason::BadTimeframe;
  if (!(dc_finite(b.open) && dc_finite(b.high) && dc_finite(b.low) && dc_finite(b.close) &&
        dc_finite(b.volume)))
    return Reason::NonFinite;
  if (!(b.open > 0.0 && b.high > 0.0 && b.low > 0.0 && b.close > 0.0)) return Reason::NonPositivePrice;
  if (b.high < b.low) return Reason::HighBelowLow;
  if (b.open < b.low || b.open > b.high) return Reason::OpenOutOfRange;
  if (b.close < b.low || b.close > b.high) return Reason::CloseOutOfRange;
  if (b.volume < 0.0) return Reason::NegativeVolume;
  return Reason::Ok;
}

size_t validate_bars(const Bar* bars, size_t n, uint32_t n_registered, uint32_t* reasons) {
  std::unordered_map<uint64_t, int64_t> last;
  size_t bad = 0;
  for (size_t i = 0; i < n; ++i) {
    Reason r = check_bar(bars[i], n_registered);
    if (r == Reason::Ok) {
      const uint64_t key = stream_key(bars[i].instrument, bars[i].timeframe);
      auto it = last.find(key);
      if (it != last.end() && bars[i].ts < it->second) r = Reason::OutOfOrder;
      else if (it != last.end() && bars[i].ts == it->second) r = Reason::DuplicateTimestamp;
      else last[key] = bars[i].ts;
    }
    reasons[i] = static_cast<uint32_t>(r);
    bad += r != Reason::Ok;
  }
  return bad;
}

Engine::Engine(const Genome* genomes, size_t n, const EngineConfig& cfg)
    : cfg_(cfg), layout_(build_layout(genomes, n, cfg.cores_per_sm)) {
  lanes_.assign(layout_.params);
  state_.init(layout_.params.size());
  uint32_t max_sms = 1;
  for (uint32_t s = 0; s < layout_.streams.size(); ++s) {
    const Stream& st = layout_.streams[s];
    stream_of_.emplace(stream_key(st.instrument, st.timeframe), s);
    max_sms = std::max(max_sms, st.sm_end - st.sm_begin);
  }
  // Bound the per-block summary buffer to about 10 MB while keeping an SM's lanes in cache over
  // many bars.
  block_bars_ = cfg.block_bars ? cfg.block_bars : std::clamp<uint32_t>((1u << 17) / max_sms, 32u, 8192u);
  stream_bars_.resize(layout_.streams.size());
  sm_offset_.resize(layout_.sms.size() + 1);
  dead_.reserve(std::min<uint32_t>(cfg.dead_letter_capacity, 1024));
}

const Stream* Engine::find_stream(uint32_t instrument, uint32_t timeframe) const {
  auto it = stream_of_.find(stream_key(instrument, timeframe));
  return it == stream_of_.end() ? nullptr : &layout_.streams[it->second];
}

void Engine::dead_letter(const Bar& b, uint64_t index, Reason r) {
  const uint32_t cap = cfg_.dead_letter_capacity;
  if (cap == 0) {
    ++stats_.dead_letters_dropped;
    return;
  }
  DeadLetter d{b, index, static_cast<uint32_t>(r), static_cast<uint32_t>(stats_.batches)};
  if (dead_.size() < cap) {
    dead_.push_back(d);
  } else {  // keep the newest `cap`; the oldest is counted as dropped
    dead_[dead_head_] = d;
    dead_head_ = (dead_head_ + 1) % cap;
    ++stats_.dead_letters_dropped;
  }
}

std::vector<DeadLetter> Engine::dead_letters() const {
  std::vector<DeadLetter> out;
  out.reserve(dead_.size());
  for (size_t i = 0; i < dead_.size(); ++i) out.push_back(dead_[(dead_head_ + i) % dead_.size()]);
  return out;
}

size_t Engine::validate(const Bar* bars, size_t n, uint32_t n_registered, uint32_t* reasons) const {
  std::unordered_map<uint32_t, int64_t> last;  // stream -> last ts seen in this batch
  size_t bad = 0;
  for (size_t i = 0; i < n; ++i) {
    Reason r = check_bar(bars[i], n_registered);
    if (r == Reason::Ok) {
      auto it = stream_of_.find(stream_key(bars[i].instrument, bars[i].timeframe));
      if (it != stream_of_.end()) {
        const Stream& st = layout_.streams[it->second];
        auto lt = last.find(it->second);
        bool has = lt != last.end() || st.has_last;
        int64_t prev = lt != last.end() ? lt->second : st.last_ts;
        if (has && bars[i].ts < prev) r = Reason::OutOfOrder;
        else if (has && bars[i].ts == prev) r = Reason::DuplicateTimestamp;
        else last[it->second] = bars[i].ts;
      }
    }
    reasons[i] = static_cast<uint32_t>(r);
    bad += r != Reason::Ok;
  }
  return bad;
}

size_t Engine::run(const Bar* bars, size_t n, uint32_t n_registered, std::vector<Signal>& out) {
  const auto t0 = std::chrono::steady_clock::now();
  const size_t before = out.size();
  std::vector<uint32_t> idx, stream;
  std::vector<uint64_t> seq;
  const size_t block = block_bars_;
  idx.reserve(std::min(n, block));
  stream.reserve(idx.capacity());
  seq.reserve(idx.capacity());
  stats_.bars_in += n;
  for (size_t i = 0; i < n; ++i) {
    const Bar& b = bars[i];
    Reason r = check_bar(b, n_registered);
    Stream* st = nullptr;
    uint32_t s = 0;
    if (r == Reason::Ok) {
      auto it = stream_of_.find(stream_key(b.instrument, b.timeframe));
      if (it != stream_of_.end()) {
        s = it->second;
        st = &layout_.streams[s];
        if (st->has_last && b.ts < st->last_ts) r = Reason::OutOfOrder;
        else if (st->has_last && b.ts == st->last_ts) r = Reason::DuplicateTimestamp;
      }
    }
    if (r != Reason::Ok) {
      ++stats_.rejected;
      ++stats_.rejects[static_cast<uint32_t>(r)];
      dead_letter(b, i, r);
      continue;
    }
    ++stats_.accepted;
    ++seq_;
    if (st == nullptr) {
      ++stats_.skipped_unfollowed;
      continue;
    }
    st->has_last = true;
    st->last_ts = b.ts;
    ++st->nbars;
    idx.push_back(static_cast<uint32_t>(i));
    stream.push_back(s);
    seq.push_back(seq_);
    if (idx.size() == block) {
      process_block(bars, idx.data(), stream.data(), seq.data(), idx.size(), out);
      idx.clear();
      stream.clear();
      seq.clear();
    }
  }
  if (!idx.empty()) process_block(bars, idx.data(), stream.data(), seq.data(), idx.size(), out);
  ++stats_.batches;
  stats_.busy_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return out.size() - before;
}

void Engine::process_block(const Bar* bars, const uint32_t* idx, const uint32_t* stream,
                           const uint64_t* seq, size_t n, std::vector<Signal>& out) {
  for (auto& v : stream_bars_) v.clear();
  kpos_.resize(n);
  for (size_t k = 0; k < n; ++k) {
    auto& v = stream_bars_[stream[k]];
    kpos_[k] = static_cast<uint32_t>(v.size());
    v.push_back(idx[k]);
  }
  const auto& sms = layout_.sms;
  sm_offset_[0] = 0;
  for (size_t m = 0; m < sms.size(); ++m)
    sm_offset_[m + 1] = sm_offset_[m] + static_cast<uint32_t>(stream_bars_[sms[m].stream].size());
  summaries_.resize(sm_offset_[sms.size()]);
  // Each SM runs its stream's bars of the block in order; SMs are independent of each other.
  for (size_t m = 0; m < sms.size(); ++m) {
    const auto& v = stream_bars_[sms[m].stream];
    if (!v.empty()) run_sm(layout_.sms[m], bars, v.data(), v.size(), summaries_.data() + sm_offset_[m]);
  }
  // Consensus in bar order; SMs of a stream in index order.
  for (size_t k = 0; k < n; ++k) {
    const Stream& st = layout_.streams[stream[k]];
    Summary total;
    summary_zero(total);
    for (uint32_t m = st.sm_begin; m < st.sm_end; ++m) summary_add(total, summaries_[sm_offset_[m] + kpos_[k]]);
    const Fused f = fuse(total);
    const Bar& b = bars[idx[k]];
    Signal sig{};
    sig.ts = b.ts;
    sig.instrument = b.instrument;
    sig.timeframe = b.timeframe;
    sig.seq = seq[k];
    sig.population_hash = cfg_.population_hash;
    sig.score = f.score;
    sig.confidence = f.confidence;
    sig.agreement = f.agreement;
    sig.dispersion = f.dispersion;
    sig.action = f.action;
    sig.n_agents = f.n;
    for (int v = 0; v < 5; ++v) sig.votes[v] = f.votes[v];
    out.push_back(sig);
  }
  stats_.signals += n;
}

LaneView Engine::lane_view(uint32_t base) {
  LaneView v;
  for (int f = 0; f < kFeatures; ++f) {
    v.w[f] = lanes_.w[f].data() + base;
    v.fidx[f] = lanes_.fidx[f].data() + base;
  }
  v.entry = lanes_.entry.data() + base;
  v.cost = lanes_.cost.data() + base;
  v.lookback = lanes_.lookback.data() + base;
  v.long_short = lanes_.long_short.data() + base;
  v.active = lanes_.active.data() + base;
  v.score = state_.score.data() + base;
  v.equity = state_.equity.data() + base;
  v.entry_equity = state_.entry_equity.data() + base;
  v.peak = state_.peak.data() + base;
  v.max_dd = state_.max_dd.data() + base;
  v.ret_sum = state_.ret_sum.data() + base;
  v.ret_sq = state_.ret_sq.data() + base;
  v.trades = state_.trades.data() + base;
  v.wins = state_.wins.data() + base;
  v.n_ret = state_.n_ret.data() + base;
  v.quarantined = state_.quarantined.data() + base;
  v.position = state_.position.data() + base;
  v.action = state_.action.data() + base;
  return v;
}

void Engine::run_sm(Sm& sm, const Bar* bars, const uint32_t* idx, size_t count, Summary* out) {
  Bank& bank = sm.bank;
  const LaneView v = lane_view(sm.lane_begin);
  const int lanes = static_cast<int>(sm.n_warps) * kWarpSize;
  uint64_t updates = 0;
  for (size_t k = 0; k < count; ++k) {
    bank.update(bars[idx[k]]);
    const int32_t t = static_cast<int32_t>(bank.nbars - 1 < INT32_MAX ? bank.nbars - 1 : INT32_MAX);
    out[k] = sm_step(v, lanes, bank.feat.data(), t, bank.ret, -1, updates);
  }
  stats_.agent_updates += updates;
}

uint64_t Engine::quarantined() const {
  uint64_t q = 0;
  for (size_t i = 0; i < lanes_.active.size(); ++i) q += lanes_.active[i] && state_.quarantined[i];
  return q;
}

void Engine::agents(AgentRecord* out) const {
  for (size_t a = 0; a < layout_.n_agents; ++a) {
    const uint32_t lane = layout_.agent_lane[a];
    const LaneState s = state_.get(lane);
    AgentRecord r{};
    r.agent_id = layout_.agent_id[a];
    r.position = s.position;
    r.action = s.action;
    r.quarantined = s.quarantined;
    r.trades = s.trades;
    r.wins = s.wins;
    r.n_returns = s.n_ret;
    r.score = s.score;
    r.equity = s.equity;
    r.peak = s.peak;
    r.max_drawdown = s.max_dd;
    r.fitness = fitness(s.equity, s.max_dd);
    if (s.n_ret > 0) {
      const double nr = static_cast<double>(s.n_ret);
      const double mean = s.ret_sum / nr;
      double var = s.ret_sq / nr - mean * mean;
      if (var < 0.0) var = 0.0;
      r.ret_mean = mean;
      r.ret_std = DC_SQRT(var);
    }
    out[a] = r;
  }
  // fields that depend on the SM/stream of the lane
  for (const Sm& sm : layout_.sms) {
    const Stream& st = layout_.streams[sm.stream];
    const double per_year = 31557600.0 / static_cast<double>(st.timeframe);
    const int64_t t = sm.bank.nbars - 1;
    for (uint32_t l = 0; l < sm.n_warps * kWarpSize; ++l) {
      const uint32_t lane = sm.lane_begin + l;
      const uint32_t a = layout_.lane_agent[lane];
      if (a == UINT32_MAX) continue;
      AgentRecord& r = out[a];
      r.instrument = st.instrument;
      r.timeframe = st.timeframe;
      r.warm = t >= layout_.params[lane].lookback;
      r.sharpe = r.ret_std > 0.0 ? r.ret_mean / r.ret_std * DC_SQRT(per_year) : 0.0;
    }
  }
}

}  // namespace dynamic_core
