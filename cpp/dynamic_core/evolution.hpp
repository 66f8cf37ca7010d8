// Evolution of a running population, in place: each SM is an island whose weakest mature agents
// are replaced by children of its fittest (tournament selection, block crossover, mutation of
// weights, entry threshold and periods), with occasional migrants from the neighbouring SM of the
// same stream and spawns into regions of parameter space the stream lacks.
//
// Periods move on the SM's lattice: the (indicator, period) features its bank already updates.
// A child therefore reads features that have been updated since the first bar (warm state
// inherited, nothing starts cold), the SM's bank and the layout do not change, and a generation
// costs no indicator work. A migrant is accepted only if every feature it uses is on the
// receiving SM's lattice with the same periods.
//
// Everything a generation decides is a function of the SM layout (population-determined), the
// agents' state and (seed, agent id, generation) through the counter-based RNG: the same on any
// thread count, and reproduced by replaying the journaled generation event at the same point.
// Each SM is judged and bred from the generation's starting point alone (its lanes, its
// neighbour's parents, which are never replaced, and its stream's style counts as they were), so
// the SMs run in parallel on the engine's threads; child ids follow the SM order.
#pragma once
#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "population.hpp"
#include "records.hpp"

namespace dynamic_core {

struct EvolutionConfig {
  double replace_fraction = 0.10;  // of each SM's judged agents, the weakest, replaced per generation
  uint32_t tournament = 3;         // tournament size of parent selection
  uint32_t min_trades = 2;         // closed trades to rank by fitness and parent; fewer ranks below all
  uint32_t min_age = 100;          // bars since birth before an agent is judged at all
  double dd_penalty = 0.5;         // fitness = per-bar Sharpe - dd_penalty * max drawdown
  double p_crossover = 0.5;        // second parent, gene blocks taken from either
  double p_migrate = 0.05;         // first parent from the next SM of the stream
  double sigma_weight = 0.15;      // weight mutation (normal, absolute)
  double w_max = 4.0;              // weights stay in [-w_max, w_max]
  double sigma_entry = 0.03;       // entry-threshold mutation
  double entry_min = 0.0;
  double entry_max = 0.95;
  double p_period = 0.25;          // per used feature: move along the lattice
  int32_t period_step = 2;         // at most this many lattice positions per move
  int32_t period_min = 1;          // every period of a feature a child moves to is in bounds
  int32_t period_max = kMaxPeriod;
  double gap_share = 0.25;         // a style with fewer agents than this share of an even split is a gap
  double spawn_fraction = 0.25;    // of an SM's replacements, at most this share spawned into gaps
  int64_t stream = -1;             // evolve only this stream (index), or every stream (-1)
};

// Throws std::invalid_argument naming the first bad field.
void validate_evolution(const EvolutionConfig& c);

// Lineage of the agent in one population slot.
struct Lineage {
  uint32_t agent_id;
  uint32_t parent_a;    // UINT32_MAX for the founding population
  uint32_t parent_b;    // second parent of a crossover, else UINT32_MAX
  uint32_t generation;  // generation of birth, 0 for founders
  int64_t birth_bar;    // bar index of its stream at birth (0 for founders)
};

// One child: where it was born, from whom, and whom it replaced.
struct Birth {
  uint32_t slot;         // population index
  uint32_t agent_id;
  uint32_t replaced_id;
  uint32_t parent_a;
  uint32_t parent_b;
  uint32_t stream;
  uint32_t sm;
  uint32_t how;          // bit 0 crossover, bit 1 migrant parent, bit 2 gap spawn, bit 3 replaced a quarantined agent
  double replaced_fitness;
};

struct GenerationReport {
  uint32_t generation = 0;
  uint64_t judged = 0;      // mature agents (old enough to be judged)
  uint64_t eligible = 0;    // of those, with enough trades to be parents and not replaced
  uint64_t replaced = 0;
  uint64_t crossovers = 0, migrants = 0, spawns = 0, period_moves = 0;
  // fitness of the judged agents with the minimum trade count, before replacement
  double best = 0.0, median = 0.0, mean = 0.0;
  uint64_t style_counts[kFeatures] = {};        // agents per dominant feature after the generation
  std::vector<Birth> births;
};

// Per-bar Sharpe of an agent's warm bars (n returns, their sum and sum of squares) minus the
// drawdown penalty; 0 with no return yet (nothing earned, nothing lost) or a non-finite result.
// Written without branches (every operand defined, the result picked), so a loop over lanes
// vectorises.
inline double agent_fitness(uint32_t n, double sum, double sq, double max_dd, double dd_penalty) {
  const double nn = static_cast<double>(n > 0 ? n : 1u);
  const double mean = sum / nn;
  const double sd = DC_SQRT(moment_variance(sum, sq, nn));
  const bool spread = sd > 0.0;
  const double x = (spread ? mean / (spread ? sd : 1.0) : 0.0) - dd_penalty * max_dd;
  return n > 0 && dc_finite(x) ? x : 0.0;
}

// Buffers of a generation (Engine::evolve), kept between generations for their capacity.
struct EvolutionScratch {
  // A child under construction: a genome (periods, weights, entry, mode, cost) whose used
  // features are on the lattice of the SM it is born in.
  struct Child {
    Genome g;
    int32_t rank[kFeatures];  // lattice rank of each used feature, -1 if unused
  };
  // The parents drawn for one slot (the first draws of its random stream), before the child is
  // varied: lanes (kNone: none), how it was bred, and the stream's counter after the draws.
  struct Pick {
    Child c;  // a migrant parent, expressed on the SM's lattice (kMigrant)
    uint32_t pa, pb, how;
    uint64_t counter;
  };
  // One SM of a generation.
  struct Island {
    std::vector<uint32_t> pool;    // lanes that may parent, in lane order
    std::vector<uint32_t> losers;  // lanes to replace, quarantined first, then weakest first
    std::vector<double> traded;    // fitness of its judged agents with the minimum trade count, lane order
    uint64_t judged = 0;
    double sum = 0.0;  // of `traded`, in lane order
    double best = -std::numeric_limits<double>::infinity();  // of `traded`
    size_t kids = 0;         // children bred so far
    size_t birth_begin = 0;  // its first child in the report's births (and its first id's offset)
    uint64_t period_moves = 0, crossovers = 0, migrants = 0, spawns = 0;
    int64_t dstyle[kFeatures] = {};  // change of its stream's style counts by its children
    void reset() {
      pool.clear();
      losers.clear();
      traded.clear();
      judged = kids = birth_begin = period_moves = crossovers = migrants = spawns = 0;
      sum = 0.0;
      best = -std::numeric_limits<double>::infinity();
      for (int64_t& d : dstyle) d = 0;
    }
  };
  std::vector<Island> isl;  // per SM
  std::vector<std::vector<Pick>> picks_of;  // per thread
  std::vector<double> median_scratch;
  std::vector<std::vector<double>> mid_of;      // per thread: the values it found in the median's bucket
  std::vector<std::vector<uint32_t>> hist_of;  // per thread: judged fitness per value bucket
  __extension__ typedef unsigned __int128 Ranked;  // see Engine::evolve
  std::vector<std::vector<Ranked>> order_of, weakest_of;  // per thread
};

// The features an SM's bank updates, by kind, sorted by their periods: the lattice children move on.
// One buffer per SM, one record of int32 per rank (what a child's move reads of a rank shares a
// cache line): the key's periods, the feature's index in the SM's group bank (what a lane reading
// it holds in LaneArrays::fidx; never 0, the constant feature), and for trend and macd the ranks
// [run_begin, run_end) that share its ATR period (the whole kind for the others).
// Keys: trend (atr, slow, fast), rsi/bb/mom (period), macd (atr, slow, fast, signal) with the
// MACD periods ordered as the bank orders them.
struct SmLattice {
  static constexpr int kKeyLen[kFeatures] = {3, 1, 4, 1, 1};
  static constexpr bool has_runs(int f) { return f == 0 || f == 2; }
  static constexpr int stride(int f) { return kKeyLen[f] + 1 + (has_runs(f) ? 2 : 0); }
  std::vector<int32_t> buf;
  uint32_t off[kFeatures] = {};   // first record of each kind in buf
  int32_t n[kFeatures] = {};      // ranks per kind

  const int32_t* rec(int f, int32_t r) const { return buf.data() + off[f] + static_cast<size_t>(r) * stride(f); }
  std::array<int32_t, 4> key(int f, int32_t r) const {
    const int32_t* p = rec(f, r);  // p[1] is in the record (the group index after a 1-long key)
    const int len = kKeyLen[f];
    return {p[0], len > 1 ? p[1] : 0, len > 2 ? p[2] : 0, len > 3 ? p[3] : 0};
  }
  int32_t group_index(int f, int32_t r) const { return rec(f, r)[kKeyLen[f]]; }
  int32_t run_begin(int f, int32_t r) const { return has_runs(f) ? rec(f, r)[kKeyLen[f] + 1] : 0; }
  int32_t run_end(int f, int32_t r) const { return has_runs(f) ? rec(f, r)[kKeyLen[f] + 2] : n[f]; }
  // First rank whose key is not below k (n[f] if none).
  int32_t lower_bound(int f, const std::array<int32_t, 4>& k) const {
    int32_t lo = 0, hi = n[f];
    while (lo < hi) {
      const int32_t mid = lo + (hi - lo) / 2;
      if (key(f, mid) < k) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }
};
// fmap: SM-relative feature index -> index in the SM's group bank (Engine::sm_fmap_).
SmLattice build_lattice(const Bank& bank, const std::vector<int32_t>& fmap);
// Key of the feature of kind f a genome uses (see SmLattice::key).
std::array<int32_t, 4> genome_key(const Genome& g, int f);
// Writes the periods of lattice key k of kind f into g.
void set_genome_key(Genome& g, int f, const std::array<int32_t, 4>& k);

// Bucket of a finite value: the top 16 bits of an order-preserving key (sign, exponent and 4
// mantissa bits), so buckets ascend with the values.
inline uint32_t value_bucket(double x) {
  uint64_t u;
  std::memcpy(&u, &x, sizeof u);
  u = (u >> 63) ? ~u : u | (uint64_t{1} << 63);
  return static_cast<uint32_t>(u >> 48);
}
constexpr size_t kValueBuckets = size_t{1} << 16;

// Where the median of n > 0 values lies, given how many fall in each value_bucket: bucket b,
// after `below` values in the buckets before it.
struct MedianBucket {
  size_t n = 0, below = 0;
  uint32_t b = 0;
};
inline MedianBucket median_bucket(size_t n, const uint32_t* count) {
  MedianBucket m{n, 0, 0};
  const size_t mid = n / 2;
  while (m.below + count[m.b] <= mid) m.below += count[m.b++];
  return m;
}
// The median from bucket b's values `tmp` (any order; reordered); each(fn) calls fn(x) for every
// value, needed only for an even count whose lower middle value lies below b (rarely).
template <class Each>
inline double median_finish(const MedianBucket& m, std::vector<double>& tmp, Each&& each) {
  const size_t r = m.n / 2 - m.below;
  std::nth_element(tmp.begin(), tmp.begin() + static_cast<std::ptrdiff_t>(r), tmp.end());
  double med = tmp[r];
  if (m.n % 2 == 0) {
    double lo = -std::numeric_limits<double>::infinity();
    if (r > 0) {
      lo = *std::max_element(tmp.begin(), tmp.begin() + static_cast<std::ptrdiff_t>(r));
    } else {  // the lower middle value is the largest below bucket b: another pass
      each([&](double x) {
        if (value_bucket(x) < m.b) lo = std::max(lo, x);
      });
    }
    med = (lo + med) / 2.0;
  }
  return med;
}

}  // namespace dynamic_core
