// Ingress (validation, sequencing), SM execution and consensus.
#pragma once
#include <cstddef>
#include <cstdint>
#include <unordered_map>
#include <vector>

#include "kernel.hpp"
#include "population.hpp"
#include "records.hpp"

namespace dynamic_core {

struct EngineConfig {
  int cores_per_sm = 128;
  uint64_t population_hash = 0;
  uint32_t dead_letter_capacity = 10000;
  uint32_t block_bars = 0;  // bars per execution block; 0 = sized from the population
};

struct EngineStats {
  uint64_t batches = 0;
  uint64_t bars_in = 0;
  uint64_t accepted = 0;
  uint64_t skipped_unfollowed = 0;
  uint64_t rejected = 0;
  uint64_t rejects[kReasonCount] = {};
  uint64_t signals = 0;
  uint64_t agent_updates = 0;
  uint64_t dead_letters_dropped = 0;
  double busy_seconds = 0.0;
};

// Value checks of one bar, without the per-stream ordering check.
Reason check_bar(const Bar& b, uint32_t n_registered);

// check_bar plus time order within the batch for every (instrument, timeframe), followed or not.
size_t validate_bars(const Bar* bars, size_t n, uint32_t n_registered, uint32_t* reasons);

class Engine {
 public:
  Engine(const Genome* genomes, size_t n, const EngineConfig& cfg);
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Processes a time-ordered batch; appends one signal per accepted bar of a followed stream.
  // Rejected bars are counted and dead-lettered; processing continues.
  size_t run(const Bar* bars, size_t n, uint32_t n_registered, std::vector<Signal>& out);

  // What run() would reject, without changing any state. reasons[i] = 0 for accepted bars.
  size_t validate(const Bar* bars, size_t n, uint32_t n_registered, uint32_t* reasons) const;

  void agents(AgentRecord* out) const;  // population order
  size_t n_agents() const { return layout_.n_agents; }
  const Layout& layout() const { return layout_; }
  const EngineStats& stats() const { return stats_; }
  uint64_t quarantined() const;
  uint64_t sequence() const { return seq_; }
  std::vector<DeadLetter> dead_letters() const;
  const EngineConfig& config() const { return cfg_; }
  uint32_t block_bars() const { return block_bars_; }

 private:
  void process_block(const Bar* bars, const uint32_t* idx, const uint32_t* stream, const uint64_t* seq,
                     size_t n, std::vector<Signal>& out);
  void run_sm(Sm& sm, const Bar* bars, const uint32_t* idx, size_t count, Summary* out);
  LaneView lane_view(uint32_t base);
  void dead_letter(const Bar& b, uint64_t index, Reason r);
  const Stream* find_stream(uint32_t instrument, uint32_t timeframe) const;

  EngineConfig cfg_;
  Layout layout_;
  LaneArrays lanes_;
  StateArrays state_;
  std::unordered_map<uint64_t, uint32_t> stream_of_;
  uint32_t block_bars_ = 0;
  EngineStats stats_;
  uint64_t seq_ = 0;
  std::vector<DeadLetter> dead_;
  size_t dead_head_ = 0;
  // scratch reused across calls
  std::vector<Summary> summaries_;
  std::vector<uint32_t> sm_offset_;
  std::vector<std::vector<uint32_t>> stream_bars_;
  std::vector<uint32_t> kpos_;
};

}  // namespace dynamic_core
