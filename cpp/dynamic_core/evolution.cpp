#include "evolution.hpp"
#include "threads.hpp"

#include <algorithm>
#include <atomic>
#include <exception>
#include <mutex>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>

#include "engine.hpp"
#include "rng.hpp"

namespace dynamic_core {

namespace {
constexpr uint32_t kNone = UINT32_MAX;
constexpr int64_t kNeverJudged = INT64_MAX;  // Engine::lane_judge_from_ of lanes never judged
constexpr uint32_t kCrossover = 1, kMigrant = 2, kSpawn = 4, kQuarantined = 8;

bool in_unit(double x) { return x >= 0.0 && x <= 1.0; }

double& weight(Genome& g, int f) {
  switch (f) {
    case 0: return g.w_trend;
    case 1: return g.w_rsi;
    case 2: return g.w_macd;
    case 3: return g.w_bb;
    default: return g.w_mom;
  }
}
double weight(const Genome& g, int f) { return weight(const_cast<Genome&>(g), f); }

// The feature with the largest |weight| (the lowest index on ties), or -1 if all are 0.
int style_of(const Genome& g) {
  int best = -1;
  double top = 0.0;
  for (int f = 0; f < kFeatures; ++f) {
    const double a = std::fabs(weight(g, f));
    if (a > top) {
      top = a;
      best = f;
    }
  }
  return best;
}
}  // namespace

void validate_evolution(const EvolutionConfig& c) {
  auto bad = [](const std::string& what) { throw std::invalid_argument("evolution config: " + what); };
  if (!in_unit(c.replace_fraction)) bad("replace_fraction must be in [0, 1]");
  if (c.tournament < 1 || c.tournament > 64) bad("tournament must be in [1, 64]");
  if (!(c.dd_penalty >= 0.0) || !std::isfinite(c.dd_penalty)) bad("dd_penalty must be finite and >= 0");
  if (!in_unit(c.p_crossover) || !in_unit(c.p_migrate) || !in_unit(c.p_period))
    bad("p_crossover, p_migrate and p_period must be in [0, 1]");
  if (!(c.sigma_weight >= 0.0) || !std::isfinite(c.sigma_weight) || !(c.sigma_entry >= 0.0) ||
      !std::isfinite(c.sigma_entry))
    bad("sigma_weight and sigma_entry must be finite and >= 0");
  if (!(c.w_max > 0.0) || !std::isfinite(c.w_max)) bad("w_max must be finite and > 0");
  if (!(c.entry_min >= 0.0) || !(c.entry_max >= c.entry_min) || !std::isfinite(c.entry_max))
    bad("entry bounds must satisfy 0 <= entry_min <= entry_max (finite)");
  if (c.period_step < 1 || c.period_step > 1000) bad("period_step must be in [1, 1000]");
  if (c.period_min < 1 || c.period_max > kMaxPeriod || c.period_min > c.period_max)
    bad("period bounds must satisfy 1 <= period_min <= period_max <= " + std::to_string(kMaxPeriod));
  if (!in_unit(c.gap_share) || !in_unit(c.spawn_fraction)) bad("gap_share and spawn_fraction must be in [0, 1]");
}

std::array<int32_t, 4> genome_key(const Genome& g, int f) {
  switch (f) {
    case 0: return {g.atr_period, g.slow, g.fast, 0};
    case 1: return {g.rsi_period, 0, 0, 0};
    case 2: {
      const int32_t lo = std::min(g.macd_fast, g.macd_slow), hi = std::max(g.macd_fast, g.macd_slow);
      return {g.atr_period, hi, lo, g.macd_signal};
    }
    case 3: return {g.bb_period, 0, 0, 0};
    default: return {g.mom_period, 0, 0, 0};
  }
}

void set_genome_key(Genome& g, int f, const std::array<int32_t, 4>& k) {
  switch (f) {
    case 0: g.atr_period = k[0]; g.slow = k[1]; g.fast = k[2]; break;
    case 1: g.rsi_period = k[0]; break;
    case 2: g.atr_period = k[0]; g.macd_slow = k[1]; g.macd_fast = k[2]; g.macd_signal = k[3]; break;
    case 3: g.bb_period = k[0]; break;
    default: g.mom_period = k[0]; break;
  }
}

SmLattice build_lattice(const Bank& b, const std::vector<int32_t>& fmap) {
  SmLattice L;
  const uint32_t base[kFeatures] = {b.trend_base, b.rsi_base, b.macd_base, b.bb_base, b.mom_base};
  std::vector<std::array<int32_t, 4>> keys[kFeatures];
  for (size_t i = 0; i < b.trend_fast.size(); ++i)
    keys[0].push_back({b.atrs[b.trend_atr[i]].n, b.emas[b.trend_slow[i]].n, b.emas[b.trend_fast[i]].n, 0});
  for (int32_t r : b.rsi_f) keys[1].push_back({b.rsis[r].n, 0, 0, 0});
  for (size_t i = 0; i < b.macd_m.size(); ++i) {
    const Macd& m = b.macds[b.macd_m[i]];
    keys[2].push_back({b.atrs[b.macd_atr[i]].n, m.slow_n, m.fast_n, m.sig_n});
  }
  for (int32_t e : b.bb_f) keys[3].push_back({b.ews[e].n, 0, 0, 0});
  for (int32_t r : b.mom_f) keys[4].push_back({b.rocs[r].n, 0, 0, 0});
  size_t total = 0;
  for (int f = 0; f < kFeatures; ++f) {
    L.n[f] = static_cast<int32_t>(keys[f].size());
    L.off[f] = static_cast<uint32_t>(total);
    total += keys[f].size() * static_cast<size_t>(SmLattice::stride(f));
  }
  L.buf.assign(total, 0);
  for (int f = 0; f < kFeatures; ++f) {
    std::vector<int32_t> order(keys[f].size());
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int32_t x, int32_t y) { return keys[f][x] < keys[f][y]; });
    const int32_t n = L.n[f], len = SmLattice::kKeyLen[f];
    for (int32_t r = 0; r < n; ++r) {
      int32_t* p = L.buf.data() + L.off[f] + static_cast<size_t>(r) * SmLattice::stride(f);
      for (int i = 0; i < len; ++i) p[i] = keys[f][order[r]][i];
      const size_t fidx = base[f] + static_cast<size_t>(order[r]);  // SM-relative feature index
      if (fidx >= fmap.size() || fmap[fidx] == 0)
        throw std::logic_error("evolution: a feature of the SM's bank is missing from its group map");
      p[len] = fmap[fidx];
    }
    if (SmLattice::has_runs(f)) {
      int32_t i = 0;
      while (i < n) {
        int32_t j = i;
        while (j < n && L.rec(f, j)[0] == L.rec(f, i)[0]) ++j;
        for (int32_t k = i; k < j; ++k) {
          int32_t* p = L.buf.data() + L.off[f] + static_cast<size_t>(k) * SmLattice::stride(f);
          p[len + 1] = i;
          p[len + 2] = j;
        }
        i = j;
      }
    }
  }
  return L;
}

namespace {

// Rank of key k in the lattice of kind f, or -1 if the SM's bank has no such feature.
int32_t find_rank(const SmLattice& L, int f, const std::array<int32_t, 4>& k) {
  const int32_t r = L.lower_bound(f, k);
  if (r == L.n[f] || L.key(f, r) != k) return -1;
  return r;
}

bool key_in_bounds(const std::array<int32_t, 4>& k, int f, const EvolutionConfig& c) {
  const int used = f == 2 ? 4 : (f == 0 ? 3 : 1);
  for (int i = 0; i < used; ++i)
    if (k[i] < c.period_min || k[i] > c.period_max) return false;
  return true;
}

using Child = EvolutionScratch::Child;
using Pick = EvolutionScratch::Pick;
using Island = EvolutionScratch::Island;

// Asks for the cache lines of [p, p + n) ahead of their use.
inline void prefetch_range(const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  for (size_t o = 0; o < n; o += 64) __builtin_prefetch(c + o);
  if (n) __builtin_prefetch(c + n - 1);
}

// Populations from this many lanes run a generation's per-SM phases on the engine's thread count.
constexpr size_t kParallelLanes = 16384;

// Threads that run several phases one after the other, each a loop over [0, n) taken in chunks,
// with barriers between them: one set of threads for a whole generation instead of threads
// started for each phase. run() calls body(t) on every thread (t: its index; the caller is 0).
class Team {
 public:
  struct Stopped {};  // thrown at a barrier once another thread has failed

  template <class B>
  void run(int threads, B&& body) {
    std::atomic<bool> go{false};  // the others wait until the team's size is known
    run_threads(threads, [&](int t) {
      if (t == 0) {
        go.store(true, std::memory_order_release);
      } else {
        while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
      }
      body(t);
    }, [&] { stopped_.store(true, std::memory_order_relaxed); }, [&](int started) { size_ = started; });
  }
  static constexpr int kPhases = 3;      // loops per run, each with its own counter
  static constexpr uint32_t kChunk = 8;  // loop() hands out [k * kChunk, (k + 1) * kChunk)
  // f(i, t) for the i of [0, n) this thread takes, in chunks from the phase's own counter
  template <class F>
  void loop(int phase, uint32_t n, int t, F&& f) {
    std::atomic<uint32_t>& next = next_[phase];
    for (uint32_t i; !stopped_.load(std::memory_order_relaxed) && (i = next.fetch_add(kChunk, std::memory_order_relaxed)) < n;)
      for (uint32_t j = i; j < std::min(n, i + kChunk); ++j) f(j, t);
  }
  // returns once every thread has arrived; what each wrote before is visible to all after
  void barrier() {
    const uint32_t gen = gen_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == size_) {
      arrived_.store(0, std::memory_order_relaxed);
      gen_.store(gen + 1, std::memory_order_release);
      return;
    }
    for (uint32_t spins = 0; gen_.load(std::memory_order_acquire) == gen; ++spins) {
      if (stopped_.load(std::memory_order_relaxed)) throw Stopped{};
      if (spins > 256) std::this_thread::yield();
    }
  }

 private:
  std::atomic<uint32_t> next_[kPhases] = {};
  std::atomic<uint32_t> arrived_{0}, gen_{0};
  std::atomic<bool> stopped_{false};
  uint32_t size_ = 1;  // threads in the team (set before any of them runs its body)
};

// f(i, t) for i in [0, n) on `threads` threads (t: the thread's index; the caller is thread 0),
// taken in chunks.
template <class F>
void for_each_parallel(uint32_t n, int threads, F&& f) {
  if (threads <= 1 || n < 2) {
    for (uint32_t i = 0; i < n; ++i) f(i, 0);
    return;
  }
  Team team;
  team.run(threads, [&](int t) { team.loop(0, n, t, f); });
}

// Expresses a parent genome on lattice L; false if a feature it uses is not there.
bool express(const Genome& parent, const SmLattice& L, Child& c) {
  c.g = parent;
  for (int f = 0; f < kFeatures; ++f) {
    c.rank[f] = -1;
    if (weight(parent, f) == 0.0) continue;
    c.rank[f] = find_rank(L, f, genome_key(parent, f));
    if (c.rank[f] < 0) return false;
  }
  return true;
}

}  // namespace

GenerationReport Engine::evolve(const EvolutionConfig& cfg, uint64_t seed, uint32_t generation,
                                const std::string& event, const std::vector<uint32_t>& streams) {
  validate_evolution(cfg);
  if (generation == 0) throw std::invalid_argument("evolution: generation 0 is the founders'; count from 1");
  if (cfg.stream >= static_cast<int64_t>(layout_.streams.size()))
    throw std::invalid_argument("evolution config: stream " + std::to_string(cfg.stream) + " out of range (" +
                                std::to_string(layout_.streams.size()) + " streams)");
  // the streams in scope, in the order their SMs are judged and bred (child ids follow it)
  std::vector<uint32_t> scope(streams);
  if (scope.empty()) {
    if (cfg.stream >= 0) scope.push_back(static_cast<uint32_t>(cfg.stream));
    else
      for (uint32_t s = 0; s < layout_.streams.size(); ++s) scope.push_back(s);
  }
  {
    std::vector<char> seen(layout_.streams.size(), 0);
    for (uint32_t s : scope) {
      if (s >= layout_.streams.size() || seen[s])
        throw std::invalid_argument("evolution: stream list holds an unknown or repeated stream " + std::to_string(s));
      seen[s] = 1;
    }
  }
  auto lk = lock_ingress();
  wait_idle();  // between updates, like set_credit
  // Children take ids from next_id_ up, 2^32 - 2 the last (2^32 - 1 names no agent). Near the
  // end, the most this generation can breed is counted (its replace_fraction of each SM's
  // agents, and the quarantined ones), before anything is journaled or changed.
  if (next_id_ > UINT32_MAX - 1 - lanes_.active.size()) {
    uint64_t most = 0;
    for (uint32_t s : scope)
      for (uint32_t m = layout_.streams[s].sm_begin; m < layout_.streams[s].sm_end; ++m) {
        const Sm& sm = layout_.sms[m];
        uint64_t agents = 0, quarantined = 0;
        for (uint32_t l = sm.lane_begin; l < sm.lane_begin + sm.n_warps * kWarpSize; ++l) {
          if (layout_.lane_agent[l] == kNone || lanes_.external[l]) continue;
          ++agents;
          quarantined += state_.quarantined[l] != 0;
        }
        most += static_cast<uint64_t>(cfg.replace_fraction * static_cast<double>(agents)) + quarantined;
      }
    if (next_id_ + most > uint64_t{UINT32_MAX} - 1)
      throw std::overflow_error("evolution: agent ids exhausted (this generation may breed " + std::to_string(most) +
                                " children; the next id is " + std::to_string(next_id_) + ", the last 2^32 - 2)");
  }
  journal_event_locked(event);
  // idle workers park (nothing reaches them before this returns) rather than spin beside it
  struct Park {
    std::atomic<bool>& flag;
    ~Park() { flag.store(false, std::memory_order_relaxed); }
  } park{park_};
  park_.store(true, std::memory_order_relaxed);

  const uint32_t n_sms = static_cast<uint32_t>(layout_.sms.size());
  const int threads = layout_.lane_agent.size() >= kParallelLanes ? std::max(1, cfg_.threads) : 1;

  if (lattice_.size() != n_sms) {
    // first generation: each SM's lattice, the bar each lane may be judged from and each
    // stream's style counts, kept current from then on
    lattice_.assign(n_sms, SmLattice{});
    lane_judge_from_.assign(lanes_.active.size(), kNeverJudged);
    lane_rank_.assign(lanes_.active.size(), {-1, -1, -1, -1, -1});
    lane_style_.assign(lanes_.active.size(), -1);
    styles_.assign(layout_.streams.size(), {});
    for_each_parallel(n_sms, threads, [&](uint32_t m, int) {
      const Sm& sm = layout_.sms[m];
      lattice_[m] = build_lattice(sm.bank, sm_fmap_[m]);
      const SmLattice& L = lattice_[m];
      for (uint32_t l = sm.lane_begin; l < sm.lane_begin + sm.n_warps * kWarpSize; ++l) {
        if (layout_.lane_agent[l] == kNone || lanes_.external[l]) continue;
        lane_judge_from_[l] = std::max(lane_lineage_[l].birth_bar, static_cast<int64_t>(lanes_.lookback[l]));
        const Genome& g = lane_genome_[l];
        for (int f = 0; f < kFeatures; ++f)  // a used feature (weight != 0) is in its SM's bank
          if (weight(g, f) != 0.0) lane_rank_[l][f] = static_cast<int16_t>(find_rank(L, f, genome_key(g, f)));
        lane_style_[l] = static_cast<int8_t>(style_of(g));
      }
    });
    for (const Sm& sm : layout_.sms)
      for (uint32_t l = sm.lane_begin; l < sm.lane_begin + sm.n_warps * kWarpSize; ++l) {
        if (layout_.lane_agent[l] == kNone || lanes_.external[l]) continue;
        ++styles_[sm.stream][kFeatures];
        if (lane_style_[l] >= 0) ++styles_[sm.stream][lane_style_[l]];
      }
  }

  GenerationReport rep;
  rep.generation = generation;
  std::vector<uint32_t> sm_order;
  std::vector<char> in_scope(n_sms, 0);
  for (uint32_t s : scope)
    for (uint32_t m = layout_.streams[s].sm_begin; m < layout_.streams[s].sm_end; ++m) {
      sm_order.push_back(m);
      in_scope[m] = 1;
    }
  const uint32_t n_order = static_cast<uint32_t>(sm_order.size());

  // Each SM is judged (phase 1, in parallel over SMs); the ids are then handed out in SM order
  // (serially: an SM's count of children is known once every SM is judged); then each SM is bred
  // with its children, ids and lineage written into their slots (phase 2, in parallel), reading
  // only the generation's starting point: its lanes, its neighbour's parents (never replaced)
  // and its stream's style counts as they were. Nothing depends on the thread count or on which
  // thread runs an SM.

  EvolutionScratch& X = evo_;
  if (X.isl.size() != n_sms) {
    X.isl.assign(n_sms, Island{});
    for (uint32_t m = 0; m < n_sms; ++m) {  // room for every lane of the SM: no growth later
      const size_t nl = static_cast<size_t>(layout_.sms[m].n_warps) * kWarpSize;
      X.isl[m].pool.reserve(nl);
      X.isl[m].losers.reserve(nl);
      X.isl[m].traded.reserve(nl);
    }
  }
  std::vector<Island>& isl = X.isl;
  fit_.resize(lanes_.active.size());  // read only for the lanes judged below
  double* fit = fit_.data();
  const uint32_t* lane_agent = layout_.lane_agent.data();
  const uint32_t* lane_id = lane_id_.data();
  const uint32_t* quar = state_.quarantined.data();
  const uint32_t* n_ret = state_.n_ret.data();
  const uint32_t* trades = state_.trades.data();
  const double* ret_sum = state_.ret_sum.data();
  const double* ret_sq = state_.ret_sq.data();
  const double* max_dd = state_.max_dd.data();
  const int64_t* judge_from = lane_judge_from_.data();
  // Rank of a judged lane, weakest first: its fitness (agents short of the minimum trade count
  // below every other), then its agent id, so the order is a function of the population; the
  // lane rides in the low bits. One 128-bit integer, compared without branches.
  using Ranked = EvolutionScratch::Ranked;
  // (The id and lane are joined in 64 bits first: with the lane widened to 128 bits, GCC kept a
  // 128-bit induction variable in the judging loop.)
  auto ranked = [](bool traded, double x, uint32_t id, uint32_t l) {
    x += 0.0;  // -0 ranks as +0
    uint64_t u;
    std::memcpy(&u, &x, sizeof u);
    // order-preserving bits of the fitness (all of them flipped below 0, the sign bit above),
    // 0 below every finite value when short of the trade count; no branches
    u ^= static_cast<uint64_t>(static_cast<int64_t>(u) >> 63) | (uint64_t{1} << 63);
    u &= uint64_t{0} - static_cast<uint64_t>(traded);
    return static_cast<Ranked>(u) << 64 | (static_cast<uint64_t>(id) << 32 | l);
  };
  auto lane_of = [](Ranked r) { return static_cast<uint32_t>(r); };
  auto traded_rank = [](Ranked r) { return static_cast<uint64_t>(r >> 64) != 0; };

  // ---- phase 1: judge every SM of the streams in scope --------------------------------------
  X.order_of.resize(static_cast<size_t>(threads));
  X.hist_of.resize(static_cast<size_t>(threads));
  for (std::vector<uint32_t>& h : X.hist_of) h.assign(kValueBuckets, 0);  // fitness histogram (median)
  X.weakest_of.resize(static_cast<size_t>(threads));
  X.mid_of.resize(static_cast<size_t>(threads));
  {
    uint32_t widest = 0;  // lanes of the widest SM
    for (uint32_t m : sm_order) widest = std::max(widest, layout_.sms[m].n_warps * kWarpSize);
    for (std::vector<Ranked>& v : X.order_of) v.resize(widest);
    for (std::vector<Ranked>& v : X.weakest_of) v.resize(widest);
    X.picks_of.resize(static_cast<size_t>(threads));
    for (std::vector<Pick>& v : X.picks_of) v.reserve(widest);
  }
  auto judge_sm = [&](uint32_t i, int t) {
    const uint32_t m = sm_order[i];
    const Sm& sm = layout_.sms[m];
    // bars of the stream seen (all of them run: wait_idle); a device backend advances no bank here
    const int64_t born_by = static_cast<int64_t>(layout_.streams[sm.stream].nbars) - static_cast<int64_t>(cfg.min_age);
    Island& I = isl[m];
    I.reset();
    uint32_t* hist = X.hist_of[t].data();
    Ranked* order = X.order_of[t].data();  // the judged, lane order
    size_t n_ord = 0;
    const uint32_t lb = sm.lane_begin, le = sm.lane_begin + sm.n_warps * kWarpSize;
    // The arrays as locals: read through the closure, every store below might alias them, and
    // the loops reloaded each pointer per lane.
    double* const ft = fit;
    const uint32_t *const q = quar, *const tr = trades, *const ids = lane_id;
    const int64_t* const jf = judge_from;
    const uint32_t min_trades = cfg.min_trades;
    // every lane's fitness first (no branches: vectorised), read below for the judged ones
    {
      const uint32_t* const nr = n_ret;
      const double *const rs = ret_sum, *const rq = ret_sq, *const dd = max_dd;
      const double pen = cfg.dd_penalty;
      for (uint32_t l = lb; l < le; ++l) ft[l] = agent_fitness(nr[l], rs[l], rq[l], dd[l], pen);
    }
    I.traded.resize(le - lb);  // room reserved: no allocation
    double* const traded_x = I.traded.data();  // the traded ones' fitness, lane order
    size_t n_tr = 0;
    for (uint32_t l = lb; l < le; ++l) {
      const int64_t from = jf[l];  // kNeverJudged: a padding lane or an external agent
      if (q[l] && from != kNeverJudged) [[unlikely]] {
        I.losers.push_back(l);
        ft[l] = std::numeric_limits<double>::quiet_NaN();
        continue;
      }
      // Judged unless too young: fewer than min_age bars since birth, or since its features
      // warmed up (the last generation's children, scattered: no branch). Written either way,
      // kept when counted.
      const bool judged = from <= born_by;
      const double x = ft[l];
      const bool traded = tr[l] >= min_trades;
      traded_x[n_tr] = x;
      n_tr += traded & judged;
      order[n_ord] = ranked(traded, x, ids[l], l);
      n_ord += judged;
    }
    I.traded.resize(n_tr);
    I.judged = n_ord;
    {  // for the report: sum (lane order), best, and the median's histogram
      double sum = 0.0, best = -std::numeric_limits<double>::infinity();
      for (size_t k = 0; k < n_tr; ++k) {
        const double x = traded_x[k];
        sum += x;
        best = std::max(best, x);
        ++hist[value_bucket(x)];
      }
      I.sum = sum;
      I.best = best;
    }
    // the n_rep weakest, weakest first; the pool is the rest (those with the trade count), in
    // lane order: everything stronger than the last loser (a traded rank is above 0)
    // (all but one at most: replace_fraction 1 keeps the fittest to breed from, rather than
    // leaving no parent and replacing nobody)
    const size_t n_rep = std::min(static_cast<size_t>(cfg.replace_fraction * static_cast<double>(n_ord)),
                                  n_ord > 0 ? n_ord - 1 : 0);
    Ranked last = 0;
    if (n_rep > 0) {
      // the n_rep weakest seen so far, ascending: most lanes are rejected by one comparison
      Ranked* w = X.weakest_of[t].data();
      size_t k = 0;
      for (size_t j = 0; j < n_ord; ++j) {
        const Ranked x = order[j];
        if (k == n_rep) {
          if (!(x < w[k - 1])) continue;
          --k;  // the strongest of them leaves
        }
        size_t p = k++;
        for (; p > 0 && x < w[p - 1]; --p) w[p] = w[p - 1];
        w[p] = x;
      }
      for (size_t j = 0; j < n_rep; ++j) I.losers.push_back(lane_of(w[j]));
      last = w[n_rep - 1];
    }
    I.pool.resize(n_ord);
    uint32_t* pool = I.pool.data();
    size_t n_pool = 0;
    for (size_t j = 0; j < n_ord; ++j) {
      const Ranked x = order[j];
      pool[n_pool] = lane_of(x);
      n_pool += traded_rank(x) & (x > last);
    }
    I.pool.resize(n_pool);
  };
  size_t n_traded = 0;
  auto better = [&](uint32_t x, uint32_t y) {  // fitter, then lower agent id (no branches: random)
    const double fx = fit[x], fy = fit[y];
    return (fx > fy) | ((fx == fy) & (lane_id[x] < lane_id[y]));
  };
  // A parent of the SM itself: its genome and the lattice ranks of its features, as kept per lane.
  auto express_local = [&](uint32_t lane, Child& c) {
    c.g = lane_genome_[lane];
    for (int f = 0; f < kFeatures; ++f) c.rank[f] = lane_rank_[lane][f];
  };
  auto tournament = [&](const std::vector<uint32_t>& pool, CounterRng& rng) {
    uint32_t best = pool[rng.below(static_cast<uint32_t>(pool.size()))];
    for (uint32_t k = 1; k < cfg.tournament; ++k) {
      const uint32_t c = pool[rng.below(static_cast<uint32_t>(pool.size()))];
      best = better(c, best) ? c : best;
    }
    return best;
  };
  // The pool of SM m's neighbour in the same stream (migrants come from there), if it may parent.
  auto neighbour_pool = [&](uint32_t m) -> const std::vector<uint32_t>* {
    const Stream& st = layout_.streams[layout_.sms[m].stream];
    if (st.sm_end - st.sm_begin < 2) return nullptr;
    const uint32_t nb = m + 1 < st.sm_end ? m + 1 : st.sm_begin;
    return in_scope[nb] && !isl[nb].pool.empty() ? &isl[nb].pool : nullptr;
  };
  // The first draws of a slot's random stream: its first parent, a migrant from the
  // neighbouring SM when drawn and expressible on lattice L (then in pk.c), else one of the
  // SM's own pool; kNone (no child for the slot) when neither.
  auto first_parent = [&](const Island& I, const SmLattice& L, const std::vector<uint32_t>* nb_pool,
                          CounterRng& rng, Pick& pk) {
    pk.pa = kNone;
    if (nb_pool && rng.uniform() < cfg.p_migrate) {
      const uint32_t cand = tournament(*nb_pool, rng);
      if (express(lane_genome_[cand], L, pk.c)) {
        pk.pa = cand;
        pk.how |= kMigrant;
      }
    }
    if (pk.pa == kNone && !I.pool.empty()) pk.pa = tournament(I.pool, rng);
  };
  // Children SM m will breed (one per slot with a parent), known before any is bred so that
  // the ids can be handed out first: every slot has one when the SM's own pool may parent;
  // with an empty pool only those whose migrant draw succeeds (the draws repeated here).
  auto children_of = [&](uint32_t m) -> size_t {
    const Island& I = isl[m];
    if (I.losers.empty()) return 0;
    const std::vector<uint32_t>* nb_pool = neighbour_pool(m);
    if (!I.pool.empty()) return I.losers.size();
    if (!nb_pool) return 0;
    size_t n = 0;
    Pick pk;
    for (uint32_t slot_lane : I.losers) {
      CounterRng rng(seed, lane_id[slot_lane], generation);
      pk.how = 0;
      first_parent(I, lattice_[m], nb_pool, rng, pk);
      n += pk.pa != kNone;
    }
    return n;
  };
  // Serial, after judging: the report's counts, and the ids, handed out in SM order and within
  // an SM in breeding order (weakest slot first), from next_id_ up.
  uint32_t first_id = next_id_;
  auto after_judge = [&] {
    size_t n_kids = 0;
    for (uint32_t m : sm_order) {
      Island& I = isl[m];
      rep.judged += I.judged;
      rep.eligible += I.pool.size();
      n_traded += I.traded.size();
      I.birth_begin = n_kids;
      n_kids += children_of(m);
    }
    rep.replaced = n_kids;
    rep.births.swap(births_spare_);  // a buffer handed back by recycle, if any
    rep.births.resize(n_kids);       // before any slot is written (see phase 2)
    next_id_ += static_cast<uint32_t>(n_kids);
  };

  // The fitness summary (best, median, mean): thread 0 finds the median's bucket, each SM's
  // values in it are collected as the SM is bred (its island is read then anyway), and thread 0
  // selects the median from them after breeding.
  MedianBucket mb;
  auto summary = [&] {
    if (n_traded == 0) {
      rep.best = rep.median = rep.mean = std::numeric_limits<double>::quiet_NaN();
      return;
    }
    double sum = 0.0, best = -std::numeric_limits<double>::infinity();
    for (uint32_t m : sm_order) {  // SM sums (each in lane order) in SM order: deterministic
      sum += isl[m].sum;
      best = std::max(best, isl[m].best);
    }
    rep.mean = sum / static_cast<double>(n_traded);
    rep.best = best;
    std::vector<uint32_t>& count = X.hist_of[0];
    for (size_t t = 1; t < X.hist_of.size(); ++t)
      for (size_t k = 0; k < kValueBuckets; ++k) count[k] += X.hist_of[t][k];
    mb = median_bucket(n_traded, count.data());
    for (std::vector<double>& mid : X.mid_of) {  // no allocation from here
      mid.clear();
      mid.reserve(count[mb.b]);
    }
    X.median_scratch.reserve(count[mb.b]);
  };
  auto collect_median = [&](const Island& I, int t) {  // the SM's values in the median's bucket
    if (n_traded == 0) return;
    std::vector<double>& mid = X.mid_of[t];
    for (double x : I.traded)
      if (value_bucket(x) == mb.b) [[unlikely]] mid.push_back(x);
  };
  auto finish_median = [&] {
    if (n_traded == 0) return;
    std::vector<double>& tmp = X.median_scratch;  // the bucket's values (their order is immaterial)
    tmp.clear();
    for (const std::vector<double>& mid : X.mid_of) tmp.insert(tmp.end(), mid.begin(), mid.end());
    rep.median = median_finish(mb, tmp, [&](auto&& fn) {
      for (uint32_t m : sm_order)
        for (double x : isl[m].traded) fn(x);
    });
  };

  // ---- phase 2: children, SM by SM, weakest slot first, each written into its slot ----------
  // Parents are never slots: pools hold no loser, so what a child overwrites is read by no other
  // child, whichever thread breeds it. Nothing here allocates (picks have room for the widest
  // SM), so no error leaves a generation half written.
  // the lines pass 2 reads of a parent: its genome and its lattice ranks
  auto prefetch_parent = [&](uint32_t lane) {
    const char* g = reinterpret_cast<const char*>(&lane_genome_[lane]);
    __builtin_prefetch(g);
    __builtin_prefetch(g + 64);
    __builtin_prefetch(g + sizeof(Genome) - 1);
    __builtin_prefetch(&lane_rank_[lane]);
  };
  // the lines pass 2 writes of a slot: its genome, lattice ranks, judging bar, parameters and
  // paper state (written child after child, each a miss on ~35 lines without this)
  auto prefetch_slot = [&](uint32_t lane) {
    char* g = reinterpret_cast<char*>(&lane_genome_[lane]);
    __builtin_prefetch(g, 1);
    __builtin_prefetch(g + 64, 1);
    __builtin_prefetch(g + sizeof(Genome) - 1, 1);
    __builtin_prefetch(&lane_rank_[lane], 1);
    __builtin_prefetch(&lane_judge_from_[lane], 1);
    __builtin_prefetch(&lane_id_[lane], 1);
    __builtin_prefetch(&lane_lineage_[lane], 1);
    lanes_.prefetch_for_write(lane);
    state_.prefetch_for_write(lane);
  };
  auto breed_sm = [&](uint32_t i, int t) {
    const uint32_t m = sm_order[i];
    Island& I = isl[m];
    collect_median(I, t);
    if (I.losers.empty()) return;
    const Sm& sm = layout_.sms[m];
    const Stream& st = layout_.streams[sm.stream];
    const SmLattice& L = lattice_[m];
    const auto& cnt0 = styles_[sm.stream];  // agents per style (dominant feature), then all, as they were
    const double even = static_cast<double>(cnt0[kFeatures]) / kFeatures;
    uint32_t spawns_left = static_cast<uint32_t>(cfg.spawn_fraction * static_cast<double>(I.losers.size()));
    const std::vector<uint32_t>* nb_pool = neighbour_pool(m);
    if (I.pool.empty() && !nb_pool) return;
    // The SM's lattice, read by period moves in pass 2 at ranks not known yet: all of it, early.
    prefetch_range(L.buf.data(), L.buf.size() * sizeof(int32_t));
    {  // what the tournaments and slots read of this SM: fitness, ids, pool, flags
      const size_t lb = sm.lane_begin, nl = static_cast<size_t>(sm.n_warps) * kWarpSize;
      prefetch_range(fit + lb, nl * sizeof(double));
      prefetch_range(lane_id + lb, nl * sizeof(uint32_t));
      prefetch_range(quar + lb, nl * sizeof(uint32_t));
      prefetch_range(lane_style_.data() + lb, nl);
      prefetch_range(I.pool.data(), I.pool.size() * sizeof(uint32_t));
      prefetch_range(I.losers.data(), I.losers.size() * sizeof(uint32_t));
    }
    // Pass 1: each slot's parents (the first draws of its stream), with their genomes and
    // lattice ranks prefetched, and the slot's own lines, so pass 2 finds them in cache instead
    // of waiting on each in turn.
    std::vector<Pick>& picks = X.picks_of[t];
    picks.resize(I.losers.size());
    for (size_t k = 0; k < I.losers.size(); ++k) {
      const uint32_t slot_lane = I.losers[k];
      Pick& pk = picks[k];
      prefetch_slot(slot_lane);
      CounterRng rng(seed, lane_id[slot_lane], generation);
      pk.how = quar[slot_lane] ? kQuarantined : 0;
      pk.pb = kNone;
      first_parent(I, L, nb_pool, rng, pk);
      if (pk.pa == kNone) continue;  // no child for this slot
      __builtin_prefetch(&layout_.agent_id[lane_agent[slot_lane]], 1);  // its id is written in pass 2
      if (!(pk.how & kMigrant)) prefetch_parent(pk.pa);
      // crossover partner
      if (I.pool.size() > 1 && rng.uniform() < cfg.p_crossover) {
        uint32_t pb = tournament(I.pool, rng);
        if (pb == pk.pa) pb = tournament(I.pool, rng);
        if (pb != pk.pa) {
          pk.pb = pb;
          pk.how |= kCrossover;
          prefetch_parent(pb);
        }
      }
      pk.counter = rng.counter;
    }
    // Pass 2: the children, weakest slot first, each continuing its own random stream.
    for (size_t k = 0; k < I.losers.size(); ++k) {
      const uint32_t slot_lane = I.losers[k];
      const Pick& pk = picks[k];
      if (pk.pa == kNone) continue;
      CounterRng rng(seed, lane_id[slot_lane], generation);
      rng.counter = pk.counter;
      uint32_t how = pk.how;
      const uint32_t pa = pk.pa, pb = pk.pb;

      // the style this child is spawned into, if the stream lacks one
      int gap = -1;
      if (spawns_left > 0) {
        int64_t least = INT64_MAX;
        for (int f = 0; f < kFeatures; ++f) {
          const int64_t n = cnt0[f] + I.dstyle[f];
          if (L.n[f] > 0 && static_cast<double>(n) < cfg.gap_share * even && n < least) {
            least = n;
            gap = f;
          }
        }
      }

      const size_t birth = I.birth_begin + I.kids++;
      const uint32_t id = first_id + static_cast<uint32_t>(birth);
      Child c;  // every field is assigned below
      if (how & kMigrant) c = pk.c;
      else express_local(pa, c);

      // crossover: gene blocks {trend, macd, atr}, rsi, bb, mom, {entry, mode} from either parent
      if (pb != kNone) {
        Child d;  // express_local assigns every field
        express_local(pb, d);
        if (rng.uniform() < 0.5) {
          for (int f : {0, 2}) {
            weight(c.g, f) = weight(d.g, f);
            c.rank[f] = d.rank[f];
          }
          c.g.atr_period = d.g.atr_period;
          c.g.fast = d.g.fast, c.g.slow = d.g.slow;
          c.g.macd_fast = d.g.macd_fast, c.g.macd_slow = d.g.macd_slow, c.g.macd_signal = d.g.macd_signal;
        }
        for (int f : {1, 3, 4})
          if (rng.uniform() < 0.5) {
            weight(c.g, f) = weight(d.g, f);
            c.rank[f] = d.rank[f];
            set_genome_key(c.g, f, genome_key(d.g, f));
          }
        if (rng.uniform() < 0.5) {
          c.g.entry = d.g.entry;
          c.g.mode = d.g.mode;
          c.g.w_dsi = d.g.w_dsi;
        }
      }

      // mutation: weights and entry (normal steps, clamped), periods (steps along the lattice
      // within the same ATR run and the period bounds)
      for (int f = 0; f < kFeatures; ++f) {
        double& w = weight(c.g, f);
        if (w == 0.0) continue;
        w = std::clamp(w + cfg.sigma_weight * rng.normal(), -cfg.w_max, cfg.w_max);
        if (w == 0.0) w = f == 0 ? 1e-9 : -1e-9;  // a used feature stays used
      }
      c.g.entry = std::clamp(c.g.entry + cfg.sigma_entry * rng.normal(), cfg.entry_min, cfg.entry_max);
      if (c.g.w_dsi != 0.0) {  // a DSI reader stays one (drawn only for them)
        c.g.w_dsi = std::clamp(c.g.w_dsi + cfg.sigma_weight * rng.normal(), -cfg.w_max, cfg.w_max);
        if (c.g.w_dsi == 0.0) c.g.w_dsi = 1e-9;
      }
      for (int f = 0; f < kFeatures; ++f) {
        if (c.rank[f] < 0 || rng.uniform() >= cfg.p_period) continue;
        const int32_t span = 2 * cfg.period_step;
        int32_t step = static_cast<int32_t>(rng.below(static_cast<uint32_t>(span))) - cfg.period_step;
        if (step >= 0) ++step;  // never 0
        const int32_t r = std::clamp(c.rank[f] + step, L.run_begin(f, c.rank[f]), L.run_end(f, c.rank[f]) - 1);
        if (r == c.rank[f]) continue;
        const std::array<int32_t, 4> k = L.key(f, r);
        if (!key_in_bounds(k, f, cfg)) continue;
        c.rank[f] = r;
        set_genome_key(c.g, f, k);
        ++I.period_moves;
      }
      // trend and macd share the ATR period: both stay in the run of the parent's ATR, so
      // moving one never changes the other's

      // spawn into a gap: the gap's feature becomes the dominant one
      if (gap >= 0 && style_of(c.g) != gap) {
        double& w = weight(c.g, gap);
        if (c.rank[gap] < 0) {
          // pick a feature of that kind: in the ATR run of the other ATR feature when it is used
          int32_t lo = 0, hi = L.n[gap];
          const int other = gap == 0 ? 2 : (gap == 2 ? 0 : -1);
          if (other >= 0 && c.rank[other] >= 0) {
            lo = L.lower_bound(gap, {c.g.atr_period, 0, 0, 0});
            hi = L.lower_bound(gap, {c.g.atr_period + 1, 0, 0, 0});
          }
          // one of the ranks in bounds, drawn uniformly: counted, then found (no allocation)
          uint32_t n_ok = 0;
          for (int32_t r = lo; r < hi; ++r) n_ok += key_in_bounds(L.key(gap, r), gap, cfg);
          if (n_ok > 0) {
            uint32_t k = rng.below(n_ok);
            int32_t r = lo;
            for (;; ++r)
              if (key_in_bounds(L.key(gap, r), gap, cfg) && k-- == 0) break;
            c.rank[gap] = r;
            set_genome_key(c.g, gap, L.key(gap, r));
          }
        }
        if (c.rank[gap] >= 0) {
          double top = 0.0;
          for (int f = 0; f < kFeatures; ++f)
            if (f != gap) top = std::max(top, std::fabs(weight(c.g, f)));
          const double mag = cfg.w_max * (0.5 + 0.5 * rng.uniform());
          w = (rng.uniform() < 0.5 ? -mag : mag);
          if (top >= mag) {  // shrink the others below it
            const double k = 0.5 * mag / top;
            for (int f = 0; f < kFeatures; ++f)
              if (f != gap) weight(c.g, f) *= k;
          }
          how |= kSpawn;
          --spawns_left;
        }
      }

      c.g.instrument = st.instrument;
      c.g.timeframe = st.timeframe;
      c.g.kind = 0;
      c.g.agent_id = id;
      const int before = lane_style_[slot_lane], after = style_of(c.g);
      if (before >= 0) --I.dstyle[before];
      if (after >= 0) ++I.dstyle[after];
      // its birth, id and lineage (parents are never slots: their ids stay as they were)
      Birth& b = rep.births[birth];
      b = Birth{lane_agent[slot_lane], id, lane_id[slot_lane], lane_id[pa], pb == kNone ? kNone : lane_id[pb],
                sm.stream, m, how, fit[slot_lane]};
      layout_.agent_id[lane_agent[slot_lane]] = id;
      lane_id_[slot_lane] = id;
      lane_lineage_[slot_lane] = Lineage{id, b.parent_a, b.parent_b, generation, static_cast<int64_t>(st.nbars)};

      // into the slot: the lane arrays the kernel reads, as build_layout derives a lane's
      // parameters from a genome, and fresh paper state
      lane_genome_[slot_lane] = c.g;
      lane_style_[slot_lane] = static_cast<int8_t>(after);
      const double w[kFeatures] = {c.g.w_trend, c.g.w_rsi, c.g.w_macd, c.g.w_bb, c.g.w_mom};
      const int32_t lookback = genome_lookback(c.g);
      for (int f = 0; f < kFeatures; ++f) {  // the features it reads (the lattice is in cache here)
        const bool used = c.rank[f] >= 0 && w[f] != 0.0;
        lane_rank_[slot_lane][f] = static_cast<int16_t>(used ? c.rank[f] : -1);
        lanes_.w[f][slot_lane] = w[f];
        lanes_.fidx[f][slot_lane] = used ? L.group_index(f, c.rank[f]) : 0;
      }
      lanes_.entry[slot_lane] = c.g.entry;
      lanes_.cost[slot_lane] = c.g.cost_bps * 1e-4;
      lanes_.lookback[slot_lane] = lookback;
      lanes_.long_short[slot_lane] = c.g.mode == static_cast<uint32_t>(Mode::LongShort);
      state_.reset(slot_lane);
      GroupRuntime& gr = grt_[group_of_[m]];
      if (faults_) {  // a poison armed for the agent this child replaces is gone with it
        int32_t armed = static_cast<int32_t>(slot_lane - groups_[group_of_[m]].lane_begin);
        gr.poison.compare_exchange_strong(armed, -1, std::memory_order_acq_rel);
      }
      if (c.g.w_dsi != 0.0) {  // reads its stream's DSI evidence from its first bar
        state_.dsi[slot_lane] = c.g.w_dsi * stream_dsi(sm.stream);
        layout_.sms[m].has_dsi = 1;
      }
      lane_judge_from_[slot_lane] = std::max(static_cast<int64_t>(st.nbars), static_cast<int64_t>(lookback));
      // the quarantined agent it replaces is gone: stats()["quarantined"] counts those now
      if (how & kQuarantined) gr.quarantined.fetch_sub(1, std::memory_order_relaxed);
      I.crossovers += (how & kCrossover) != 0;
      I.migrants += (how & kMigrant) != 0;
      I.spawns += (how & kSpawn) != 0;
    }
  };

  // ---- serial, after breeding: the report's sums and the streams' style counts -------------
  auto after_breed = [&] {
    for (uint32_t m : sm_order) {
      const Island& I = isl[m];
      rep.crossovers += I.crossovers;
      rep.migrants += I.migrants;
      rep.spawns += I.spawns;
      rep.period_moves += I.period_moves;
      for (int f = 0; f < kFeatures; ++f) styles_[layout_.sms[m].stream][f] += I.dstyle[f];
    }
  };

  // The phases on one team of threads; the serial steps on thread 0 between barriers.
  Team team;
  team.run(threads, [&](int t) {
    team.loop(0, n_order, t, judge_sm);
    team.barrier();
    if (t == 0) {
      after_judge();
      summary();
    }
    team.barrier();
    team.loop(1, n_order, t, breed_sm);
    team.barrier();
    if (t == 0) {
      after_breed();
      finish_median();
    }
  });
  for (uint32_t s : scope)
    for (int f = 0; f < kFeatures; ++f) rep.style_counts[f] += static_cast<uint64_t>(styles_[s][f]);
  return rep;
}

void Engine::recycle(GenerationReport& r) {
  auto lk = lock_ingress();
  r.births.clear();
  if (r.births.capacity() > births_spare_.capacity()) births_spare_.swap(r.births);
}

}  // namespace dynamic_core
