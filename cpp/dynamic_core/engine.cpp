#include "engine.hpp"

#include "errors.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <stdexcept>
#include <thread>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>  // sysconf
#endif

#if defined(__linux__)
#include <pthread.h>
#include <sched.h>
#endif

namespace dynamic_core {

namespace {
int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}
// The now_ns() time `timeout_ns` from now (clamped far out), or -1 (no deadline) when it is < 0.
int64_t deadline_in(int64_t timeout_ns) {
  return timeout_ns >= 0 ? now_ns() + std::min<int64_t>(timeout_ns, INT64_MAX / 4) : -1;
}
// A long wait (for room, for the feed, for a signal the caller drains itself) goes in slices
// of at most this, so ^C (the interrupt check) and close() end it between two.
constexpr int64_t kWaitSliceNs = 100'000'000;
// How often a run that never has to sleep for its signals looks for ^C (drain_into).
constexpr int64_t kInterruptCheckNs = 50'000'000;
// Workers and waiting consumers spin this long, then park. A parked thread takes tens of
// microseconds to wake (much more on a busy or virtual machine), so on a live feed they should
// rarely park; they spin yielding the CPU, so a thread with work (the caller, another worker)
// gets it at once when threads outnumber cores.
constexpr int64_t kSpinNs = 2'000'000;
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
  auto in_range = [](double p) { return p >= kMinPrice && p <= kMaxPrice; };
  if (!(in_range(b.open) && in_range(b.high) && in_range(b.low) && in_range(b.close))) return Reason::PriceOutOfRange;
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
  if (cfg.threads < 1 || cfg.threads > 63) throw std::invalid_argument("threads must be in [1, 63]");
  if (cfg.stall_deadline_ns < 1'000'000) throw std::invalid_argument("stall deadline must be >= 1 ms");
  lanes_.assign(layout_.params);
  const size_t n_lanes = layout_.params.size();
  // From here on the lane arrays are the lanes' parameters (a generation rewrites them); the
  // per-lane records they were built from are released.
  std::vector<LaneParams>().swap(layout_.params);
  state_.init(n_lanes);
  lane_genome_.assign(n_lanes, Genome{});
  lane_lineage_.assign(n_lanes, Lineage{UINT32_MAX, UINT32_MAX, UINT32_MAX, 0, 0});
  lane_id_.assign(n_lanes, UINT32_MAX);
  stream_dsi_.assign(layout_.streams.size(), 0.0);
  stream_flags_.assign(layout_.streams.size(), 0u);
  for (size_t a = 0; a < n; ++a) {
    const uint32_t l = layout_.agent_lane[a];
    lane_genome_[l] = genomes[a];
    lane_lineage_[l] = Lineage{genomes[a].agent_id, UINT32_MAX, UINT32_MAX, 0, 0};
    lane_id_[l] = genomes[a].agent_id;
    next_id_ = std::max(next_id_, genomes[a].agent_id);
  }
  if (n) next_id_ = next_id_ == UINT32_MAX ? UINT32_MAX : next_id_ + 1;
  faults_ = cfg.fault_injection;
  uint64_t max_stream_lanes = kWarpSize;
  for (uint32_t s = 0; s < layout_.streams.size(); ++s) {
    const Stream& st = layout_.streams[s];
    stream_of_.emplace(stream_key(st.instrument, st.timeframe), s);
    max_sms_ = std::max(max_sms_, st.sm_end - st.sm_begin);
    uint64_t lanes = 0;
    for (uint32_t m = st.sm_begin; m < st.sm_end; ++m) lanes += layout_.sms[m].n_warps * kWarpSize;
    max_stream_lanes = std::max(max_stream_lanes, lanes);
  }
  // Window of bars in flight: about 32 MB of SM summaries at most, a power of two in [64, 8192].
  if (cfg.capacity) {
    cap_ = 2;
    while (cap_ < cfg.capacity && cap_ < (1u << 20)) cap_ <<= 1;
    check_memory(static_cast<uint64_t>(cap_) * max_sms_ * sizeof(Summary),
                 "a window of " + std::to_string(cap_) + " bars (capacity) over " + std::to_string(max_sms_) +
                     " SMs of one stream");
  } else {
    const uint64_t fit = (32ull << 20) / (static_cast<uint64_t>(max_sms_) * sizeof(Summary));
    cap_ = 64;
    while (cap_ * 2 <= fit && cap_ < 8192) cap_ <<= 1;
  }
  // Bars per worker batch: long enough to keep an SM's lanes in cache over several bars, short
  // enough (about a quarter of the stall deadline) that heartbeats stay fresh even if every bar
  // is of the largest stream (a worker's share of it). A worker starts from an estimate of
  // ~20 ns per lane and then sizes its batches from its own measured time per lane-update
  // (next_batch); block_bars fixes the size instead.
  lanes_per_bar_ = static_cast<double>(max_stream_lanes) / std::max(cfg.threads, 1);
  if (cfg.block_bars) {
    batch_ = std::min(cfg.block_bars, cap_);
    batch_max_ = batch_;
  } else {
    const double per_bar = 20e-9 * lanes_per_bar_;
    const double fit = (static_cast<double>(cfg.stall_deadline_ns) * 1e-9 / 4.0) / per_bar;
    batch_max_ = std::min<uint32_t>(kMaxBatch, cap_);
    batch_ = std::min(static_cast<uint32_t>(std::clamp(fit, 1.0, static_cast<double>(kMaxBatch))), batch_max_);
  }

  slots_.reset(new Slot[cap_]);
  // not zeroed: a position's summaries are all written (by its units) before consensus reads
  // them, so pages the run never reaches are never touched
  summ_.reset(new Summary[static_cast<size_t>(cap_) * max_sms_]);
  strt_.reset(new StreamRuntime[std::max<size_t>(layout_.streams.size(), 1)]);
  n_workers_ = cfg.threads + 1;  // the last one is the standby
  form_groups();
  const int64_t t_start = now_ns();
  for (uint32_t g = 0; g < groups_.size(); ++g) grt_[g].beat_ns.store(t_start, std::memory_order_relaxed);
  t0_ = std::chrono::steady_clock::now();
  for (int w = 0; w < n_workers_; ++w) {
    workers_.push_back(std::make_unique<Worker>(cap_));
    workers_.back()->standby = w == cfg.threads;
    workers_.back()->beat_ns.store(t_start, std::memory_order_relaxed);
  }
  dead_.reserve(std::min<uint32_t>(cfg.dead_letter_capacity, 1024));
  for (int w = 0; w < n_workers_; ++w) workers_[w]->thread = std::thread([this, w] { worker_main(w); });
  sentinel_ = std::thread([this] { sentinel_main(); });
}

// Groups and their first owners. Every stream is cut into min(SMs, threads) groups of
// contiguous SMs, near-equal in size, and its groups go to distinct workers, the least loaded
// (in lanes) first: each bar is shared among the workers, which keeps every one busy on a live
// feed, and the load stays balanced. Each group gets one bank merged from its SMs' banks, and
// its lanes' feature indices are remapped into it. Only performance depends on this.
void Engine::form_groups() {
  const int threads = cfg_.threads;
  std::vector<uint64_t> load(threads, 0);
  stream_groups_.assign(1, 0);
  group_of_.assign(layout_.sms.size(), 0);
  sm_fmap_.assign(layout_.sms.size(), {});
  std::vector<int> owner;
  for (uint32_t s = 0; s < layout_.streams.size(); ++s) {
    const Stream& st = layout_.streams[s];
    const uint32_t k = st.sm_end - st.sm_begin;
    const uint32_t ng = std::min<uint32_t>(k, static_cast<uint32_t>(threads));
    std::vector<int> order(threads);
    for (int w = 0; w < threads; ++w) order[w] = w;
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return load[a] < load[b]; });
    for (uint32_t j = 0; j < ng; ++j) {
      Group grp{};
      grp.stream = s;
      grp.sm_begin = st.sm_begin + static_cast<uint32_t>(static_cast<uint64_t>(j) * k / ng);
      grp.sm_end = st.sm_begin + static_cast<uint32_t>(static_cast<uint64_t>(j + 1) * k / ng);
      grp.lane_begin = layout_.sms[grp.sm_begin].lane_begin;
      std::vector<const Bank*> banks;
      for (uint32_t m = grp.sm_begin; m < grp.sm_end; ++m) {
        banks.push_back(&layout_.sms[m].bank);
        grp.lanes += layout_.sms[m].n_warps * kWarpSize;
        group_of_[m] = static_cast<uint32_t>(groups_.size());
      }
      std::vector<std::vector<int32_t>> map;
      grp.bank = merge_banks(banks, map);
      for (uint32_t m = grp.sm_begin; m < grp.sm_end; ++m) sm_fmap_[m] = map[m - grp.sm_begin];
      for (uint32_t m = grp.sm_begin; m < grp.sm_end; ++m) {
        const Sm& sm = layout_.sms[m];
        const std::vector<int32_t>& mk = map[m - grp.sm_begin];
        for (uint32_t l = sm.lane_begin; l < sm.lane_begin + sm.n_warps * kWarpSize; ++l)
          for (int f = 0; f < kFeatures; ++f) lanes_.fidx[f][l] = mk[static_cast<size_t>(lanes_.fidx[f][l])];
      }
      const int w = order[j];
      load[w] += grp.lanes;
      owner.push_back(w);
      groups_.push_back(std::move(grp));
    }
    stream_groups_.push_back(static_cast<uint32_t>(groups_.size()));
  }
  // The SMs' own banks only describe them now (layout()): their per-bar state is not needed.
  for (Sm& sm : layout_.sms) sm.bank.release_state();
  grt_.reset(new GroupRuntime[std::max<size_t>(groups_.size(), 1)]);
  for (uint32_t g = 0; g < groups_.size(); ++g) {
    grt_[g].owner.store(owner[g], std::memory_order_relaxed);
    strt_[groups_[g].stream].workers.fetch_or(1ull << owner[g], std::memory_order_relaxed);
  }
}

Engine::~Engine() { close(); }

void Engine::close() {
  // Stop first: a submit parked for room (which may wait for a consumer that is this caller, or
  // gone) sees it and leaves, so the lock below is never waited for forever.
  stop_.store(true, std::memory_order_seq_cst);
  {
    std::lock_guard<std::mutex> g(wait_m_);
    space_cv_.notify_all();
  }
  auto lk = lock_ingress();
  if (closed_) return;
  closed_ = true;
  for (auto& w : workers_) {
    w->wake.fetch_add(1, std::memory_order_seq_cst);
    w->wake.notify_one();
  }
  {
    std::lock_guard<std::mutex> g(sentinel_m_);
    sentinel_cv_.notify_all();
  }
  {
    std::lock_guard<std::mutex> g(wait_m_);
    ready_cv_.notify_all();
    space_cv_.notify_all();
  }
  for (auto& w : workers_)
    if (w->thread.joinable()) w->thread.join();
  if (sentinel_.joinable()) sentinel_.join();
  // Every thread is joined. A group the sentinel moved may have bars nobody ran: its adoption
  // posted to a worker that had already left, or a move waiting for the old owner that no later
  // tick finished. They are run here, so every SM stands at the same bar (as agents() says).
  const uint64_t until = head_.load(std::memory_order_acquire);
  for (uint32_t g = 0; g < groups_.size() && !workers_.empty(); ++g) {
    GroupRuntime& r = grt_[g];
    int32_t w = r.owner.load(std::memory_order_relaxed);
    if (w < 0) r.owner.store(w = 0, std::memory_order_relaxed);  // a move no tick finished: an owner again
    const uint64_t claimed = strt_[groups_[g].stream].claimed.load(std::memory_order_acquire);
    if (r.nproc.load(std::memory_order_acquire) == claimed) continue;
    r.busy.store(0, std::memory_order_relaxed);  // no thread is left inside a claim
    catch_up(w, g, until);
  }
}

const Stream* Engine::find_stream(uint32_t instrument, uint32_t timeframe) const {
  auto it = stream_of_.find(stream_key(instrument, timeframe));
  return it == stream_of_.end() ? nullptr : &layout_.streams[it->second];
}

// ---- workers ---------------------------------------------------------------------------------

void Engine::wake_worker(int w) {
  Worker& k = *workers_[w];
  // seq_cst fence: orders the ring push before the sleeping check (pairs with the worker's
  // fence between setting `sleeping` and re-checking its ring).
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (k.sleeping.load(std::memory_order_relaxed)) {
    k.wake.fetch_add(1, std::memory_order_release);
    k.wake.notify_one();
  }
}

void Engine::worker_main(int w) {
  Worker& me = *workers_[w];
#if defined(__linux__)
  // Live workers on distinct CPUs of the process's set when there are enough: two busy workers
  // then never share a core while another idles (the caller's thread, not pinned, shares with
  // one of them; the spinning workers yield to it).
  if (!me.standby) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) >= cfg_.threads) {
      int k = -1, cpu = -1;
      for (int c = 0; c < CPU_SETSIZE && k < w; ++c)
        if (CPU_ISSET(c, &set)) {
          ++k;
          cpu = c;
        }
      cpu_set_t one;
      CPU_ZERO(&one);
      CPU_SET(cpu, &one);
      pthread_setaffinity_np(pthread_self(), sizeof one, &one);  // best effort
    }
  }
#endif
  std::vector<uint64_t> buf(batch_max_);
  uint32_t want = batch_;  // this worker's batch size (adapted unless block_bars fixes it)
  double ns_per_lane = 0.0;
  uint32_t seen_adopt = 0;
  while (true) {
    const uint32_t gen = me.adopt_gen.load(std::memory_order_acquire);
    if (gen != seen_adopt) {
      std::vector<uint32_t> adopted;
      {
        std::lock_guard<std::mutex> lk(me.adopt_m);
        adopted.swap(me.adopt);
      }
      seen_adopt = gen;
      // seq_cst: the sentinel set this worker's stream bit before posting the adoption, so any
      // bar claimed before this load is either below it or also pushed into this ring.
      const uint64_t until = head_.load(std::memory_order_seq_cst);
      for (uint32_t g : adopted) catch_up(w, g, until);
      me.beat_ns.store(now_ns(), std::memory_order_relaxed);
    }
    // one index load and one index store for the whole batch
    const size_t n = me.ring.try_pop_n(buf.data(), want);
    if (n) {
      const int64_t t_batch = now_ns();
      me.injected_ns = 0;
      const uint64_t lane_bars = process_batch(w, buf.data(), n);
      const int64_t t_done = now_ns();
      const int64_t busy = t_done - t_batch - me.injected_ns;
      me.busy_ns.fetch_add(busy, std::memory_order_relaxed);
      if (!cfg_.block_bars && lane_bars) want = next_batch(lane_bars, busy, ns_per_lane);
      me.beat_ns.store(t_done, std::memory_order_relaxed);
      continue;
    }
    if (stop_.load(std::memory_order_acquire)) break;
    // Spin briefly, then park until ingress or the sentinel wakes us.
    const int64_t t_spin = now_ns();
    bool work = false;
    while (now_ns() - t_spin < kSpinNs && !park_.load(std::memory_order_relaxed)) {
      if (!me.ring.empty() || me.adopt_gen.load(std::memory_order_relaxed) != seen_adopt ||
          stop_.load(std::memory_order_relaxed)) {
        work = true;
        break;
      }
      std::this_thread::yield();
    }
    if (work) continue;
    const uint32_t w0 = me.wake.load(std::memory_order_acquire);
    me.sleeping.store(1, std::memory_order_relaxed);
    // seq_cst fence: the store above is ordered before the ring check below (see wake_worker).
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (me.ring.empty() && me.adopt_gen.load(std::memory_order_relaxed) == seen_adopt &&
        !stop_.load(std::memory_order_relaxed))
      me.wake.wait(w0, std::memory_order_acquire);
    me.sleeping.store(0, std::memory_order_relaxed);
    me.beat_ns.store(now_ns(), std::memory_order_relaxed);
  }
}

uint32_t Engine::next_batch(uint64_t lane_bars, int64_t busy_ns, double& ns_per_lane) const {
  // Time per lane-update of this worker, smoothed over batches; a batch slowed by preemption
  // shrinks the next ones at once and they grow back over a few batches. Per lane, not per
  // bar: a run of bars of a small stream would otherwise size the next batch for its cost,
  // and a batch of the largest stream's bars then outlasted the stall deadline. Small batches
  // overstate it (fixed costs per batch), and so do catch-ups (not counted), erring toward
  // shorter batches.
  const double x = static_cast<double>(std::max<int64_t>(busy_ns, 1)) / static_cast<double>(lane_bars);
  ns_per_lane = ns_per_lane == 0.0 || x > ns_per_lane ? x : 0.75 * ns_per_lane + 0.25 * x;
  const double fit = static_cast<double>(cfg_.stall_deadline_ns) / 4.0 / (ns_per_lane * lanes_per_bar_);
  return static_cast<uint32_t>(std::clamp(fit, 1.0, static_cast<double>(batch_max_)));
}

bool Engine::read_slot(uint64_t q, uint32_t& stream, uint64_t& sidx) {
  Slot& s = slot(q);
  // acquire: pairs with ingress's release store of the tag after filling the slot.
  if (s.tag.load(std::memory_order_acquire) != q + 1) return false;
  stream = s.stream.load(std::memory_order_relaxed);
  sidx = s.sidx.load(std::memory_order_relaxed);
  // acquire fence + re-check: the two fields belong to position q, not to a reuse of the slot
  // (ingress invalidates the tag before it rewrites them).
  std::atomic_thread_fence(std::memory_order_acquire);
  return s.tag.load(std::memory_order_relaxed) == q + 1;
}

uint64_t Engine::process_batch(int w, const uint64_t* pos, size_t n) {
  // Group the batch by stream (positions stay increasing within a stream), then run every SM of
  // the stream this worker owns over them: an SM's lanes stay in cache across the batch.
  thread_local std::vector<std::vector<uint64_t>> lists;
  thread_local std::vector<std::vector<uint32_t>> done;
  thread_local std::vector<uint32_t> touched;
  if (lists.size() < layout_.streams.size()) {
    lists.resize(layout_.streams.size());
    done.resize(layout_.streams.size());
  }
  touched.clear();
  uint64_t lane_bars = 0;  // lane-updates run (catch-ups not counted)
  for (size_t k = 0; k < n; ++k) {
    uint32_t s;
    uint64_t sidx;
    if (!read_slot(pos[k], s, sidx)) continue;  // already completed by an adopter and reused
    if (lists[s].empty()) touched.push_back(s);
    lists[s].push_back(pos[k]);
  }
  for (uint32_t s : touched) {
    auto& list = lists[s];
    auto& cnt = done[s];
    cnt.assign(list.size(), 0);
    for (uint32_t g = stream_groups_[s]; g < stream_groups_[s + 1]; ++g)
      if (grt_[g].owner.load(std::memory_order_relaxed) == w && run_group(w, g, list.data(), list.size(), cnt.data()))
        lane_bars += static_cast<uint64_t>(groups_[g].lanes) * list.size();
    for (size_t k = 0; k < list.size(); ++k)
      if (cnt[k]) finish_units(list[k], cnt[k]);
    list.clear();
  }
  return lane_bars;
}

size_t Engine::unit_block_bytes() {
  static const size_t bytes = [] {
    long l2 = -1;
#if defined(_SC_LEVEL2_CACHE_SIZE)  // glibc's
    l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    if (l2 <= 0) l2 = 512 * 1024;
    return std::clamp<size_t>(static_cast<size_t>(l2), 64 * 1024, 2048 * 1024);
  }();
  return bytes;
}

void Engine::units(uint32_t g, const uint64_t* ps, int nb, int poison, uint64_t& updates) {
  Group& grp = groups_[g];
  Bank& bank = grp.bank;
  const size_t nf = bank.feat.size();
  // One bar's features go to the bank's own row; a block's to a buffer of nb rows.
  thread_local std::vector<double> block;
  if (nb > 1 && block.size() < nf * nb) block.resize(nf * nb);
  double* feat = nb > 1 ? block.data() : bank.feat.data();
  int32_t ts[kUnitBlock];
  double rets[kUnitBlock];
  Summary* outs[kUnitBlock];
  const uint32_t first = layout_.streams[grp.stream].sm_begin;
  for (int j = 0; j < nb; ++j) {
    bank.update_into(slot(ps[j]).bar, feat + nf * j);
    ts[j] = static_cast<int32_t>(bank.nbars - 1 < INT32_MAX ? bank.nbars - 1 : INT32_MAX);
    rets[j] = bank.ret;
    outs[j] = summaries(ps[j]);
  }
  uint64_t q = 0;
  for (uint32_t m = grp.sm_begin; m < grp.sm_end; ++m) {
    const Sm& sm = layout_.sms[m];
    LaneView v = lane_view(lanes_, state_, sm.lane_begin);
    v.has_external = static_cast<int>(sm.has_external);
    v.has_dsi = static_cast<int>(sm.has_dsi);
    const int lanes = static_cast<int>(sm.n_warps) * kWarpSize;
    const int at = poison - static_cast<int>(sm.lane_begin - grp.lane_begin);  // poisoned lane in this SM
    for (int j = 0; j < nb; ++j)
      outs[j][m - first] = sm_step(v, lanes, feat + nf * j, ts[j], rets[j], j == 0 && at >= 0 && at < lanes ? at : -1,
                                   updates, q);
  }
  if (q) grt_[g].quarantined.fetch_add(q, std::memory_order_relaxed);
}

bool Engine::claim(int w, uint32_t g) {
  GroupRuntime& r = grt_[g];
  // Busy first, then check ownership (seq_cst both; the sentinel does the mirror image: owner
  // first, then busy), so a group is never run by two workers. busy counts the workers inside
  // this handshake or holding the group: a worker whose claim fails (a stale adoption, a group
  // moved meanwhile) takes back only its own increment, never the holder's (a flag cleared by
  // a failed claim let the sentinel finish a move while the holder still ran the group).
  r.busy.fetch_add(1, std::memory_order_seq_cst);
  if (r.owner.load(std::memory_order_seq_cst) == w) return true;
  r.busy.fetch_sub(1, std::memory_order_release);
  return false;
}

void Engine::release(int w, uint32_t g, uint64_t np, uint64_t updates) {
  GroupRuntime& r = grt_[g];
  // release: the state written while claimed is visible to whoever reads nproc with acquire.
  r.nproc.store(np, std::memory_order_release);
  r.beat_ns.store(now_ns(), std::memory_order_relaxed);
  r.busy.fetch_sub(1, std::memory_order_release);
  workers_[w]->updates.fetch_add(updates, std::memory_order_relaxed);
}

void Engine::replay(int w, uint32_t g, uint64_t until_pos, uint64_t& np, int& poison, uint64_t& updates) {
  GroupRuntime& r = grt_[g];
  std::atomic<int64_t>& beat = workers_[w]->beat_ns;
  const uint32_t stream = groups_[g].stream;
  // Positions below the tail are complete (this group included), so the scan starts at or after
  // it.
  const uint64_t from = std::max(r.last_pos, tail_.load(std::memory_order_acquire));
  for (uint64_t q = from; q < until_pos; ++q) {
    uint32_t qs;
    uint64_t qi;
    if (!read_slot(q, qs, qi) || qs != stream || qi != np) continue;
    units(g, &q, 1, poison, updates);
    poison = -1;
    ++np;
    r.last_pos = q + 1;
    finish_units(q, 1);
    // a long backlog is run under one claim, publishing no nproc until it ends: the worker's
    // heartbeat says it is alive, or the sentinel takes the adopter for stalled and moves on
    beat.store(now_ns(), std::memory_order_relaxed);
  }
}

void Engine::injected_sleep(int w, int64_t ns) {
  const int64_t t0 = now_ns();
  const int64_t until = t0 + ns;
  while (ns > 0 && !stop_.load(std::memory_order_relaxed)) {
    std::this_thread::sleep_for(std::chrono::nanoseconds(std::min<int64_t>(ns, 1'000'000)));
    ns = until - now_ns();
  }
  workers_[w]->injected_ns += now_ns() - t0;  // not busy time (worker_busy_seconds)
}

bool Engine::run_group(int w, uint32_t g, const uint64_t* pos, size_t n, uint32_t* done) {
  GroupRuntime& r = grt_[g];
  // fault injection: a stall before the group is claimed, or (< 0) holding it
  const int64_t stall = faults_ ? r.stall_ns.exchange(0, std::memory_order_acq_rel) : 0;
  if (stall > 0) injected_sleep(w, stall);
  if (!claim(w, g)) {
    if (stall < 0) r.stall_ns.store(stall, std::memory_order_release);  // for its next claim
    return false;
  }
  if (stall < 0) injected_sleep(w, -stall);
  int poison = faults_ ? r.poison.exchange(-1, std::memory_order_acq_rel) : -1;
  uint64_t updates = 0;
  // acquire: pairs with the release of nproc by the group's previous runner, which may have been
  // another worker (the sentinel moved the group), so its state (banks, lanes, last_pos) is ours
  uint64_t np = r.nproc.load(std::memory_order_acquire);
  // Bars are run in blocks of up to ub, SM by SM, when a block's features fit in a core's L2
  // (unit_block_bytes; a group with very many features runs bar by bar).
  const size_t nf = groups_[g].bank.feat.size();
  const size_t fit = cfg_.unit_block ? cfg_.unit_block : unit_block_bytes() / (sizeof(double) * nf);
  const int ub = static_cast<int>(std::clamp<size_t>(fit, 1, kUnitBlock));
  uint64_t block[kUnitBlock];
  int nb = 0;
  // the poisoned lane, if any, is poisoned on the first bar this call runs
  auto flush = [&] {
    if (!nb) return;
    units(g, block, nb, poison, updates);
    poison = -1;
    nb = 0;
  };
  for (size_t k = 0; k < n; ++k) {
    const uint64_t p = pos[k];
    uint32_t stream;
    uint64_t sidx;
    // a position this group has done may be complete and its slot reused: read it checked
    if (!read_slot(p, stream, sidx)) continue;         // reused: done during a catch-up
    if (sidx < np) continue;                           // done during a catch-up
    if (sidx > np) {  // bars missed before it was moved here
      flush();
      replay(w, g, p, np, poison, updates);
    }
    block[nb++] = p;
    if (nb == ub) flush();
    ++np;
    r.last_pos = p + 1;
    ++done[k];
  }
  flush();
  release(w, g, np, updates);
  return true;
}

void Engine::catch_up(int w, uint32_t g, uint64_t until_pos) {
  if (!claim(w, g)) return;
  uint64_t np = grt_[g].nproc.load(std::memory_order_acquire);  // as in run_group
  uint64_t updates = 0;
  // a poison armed for the group lands on the first bar it runs, here as in run_group: the bar
  // the stalled owner was about to run (with no failover, the same bar)
  int poison = faults_ ? grt_[g].poison.exchange(-1, std::memory_order_acq_rel) : -1;
  replay(w, g, until_pos, np, poison, updates);
  release(w, g, np, updates);
}

void Engine::finish_units(uint64_t p, uint32_t count) {
  // acq_rel: our summaries are released to, and everyone else's acquired by, the last finisher.
  if (slot(p).remaining.fetch_sub(count, std::memory_order_acq_rel) == count) fuse(p);
}

int Engine::latency_bucket(int64_t ns) {
  if (ns <= 1) return 0;
  return std::min(kLatencyBuckets - 1, static_cast<int>(std::log2(static_cast<double>(ns)) * kLatencyBucketsPerOctave));
}

void Engine::fuse(uint64_t p) {
  Slot& s = slot(p);
  const uint32_t st_i = s.stream.load(std::memory_order_relaxed);
  const Stream& st = layout_.streams[st_i];
  // stream_dsi_ changes only between updates (set_dsi waits for idle workers), so every bar of a
  // batch reads the evidence its agents read.
  s.sig = fused_signal(summaries(p), st.sm_end - st.sm_begin, s.bar.ts, s.bar.instrument, s.bar.timeframe, s.seq,
                       cfg_.population_hash, stream_dsi_[st_i], stream_flags_[st_i]);
  latency_[latency_bucket(now_ns() - s.t_in)].fetch_add(1, std::memory_order_relaxed);
  // release: the signal is written before it is marked ready.
  s.ready.store(1, std::memory_order_release);
  notify_ready(p);
}

void Engine::notify_ready(uint64_t p) {
  // seq_cst fence: pairs with the consumer's increment of ready_waiters_ before it re-checks;
  // acquire: the position it waits for was stored before that increment.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (ready_waiters_.load(std::memory_order_acquire) > 0 && wake_pos_.load(std::memory_order_relaxed) == p) {
    std::lock_guard<std::mutex> lk(wait_m_);
    ready_cv_.notify_all();
  }
}

// ---- sentinel --------------------------------------------------------------------------------

void Engine::sentinel_main() {
  const auto period = std::chrono::nanoseconds(std::max<int64_t>(1'000'000, cfg_.stall_deadline_ns / 4));
  const int64_t deadline = cfg_.stall_deadline_ns;
  std::unique_lock<std::mutex> lk(sentinel_m_);
  while (!stop_.load(std::memory_order_acquire)) {
    sentinel_cv_.wait_for(lk, period);
    if (stop_.load(std::memory_order_acquire)) break;
    const int64_t now = now_ns();
    for (uint32_t g = 0; g < groups_.size(); ++g) {
      GroupRuntime& r = grt_[g];
      const int32_t owner = r.owner.load(std::memory_order_seq_cst);
      if (owner < 0) {  // a move waiting for the old owner to leave the group
        if (r.busy.load(std::memory_order_seq_cst) == 0) move_group(g, -1);
        continue;
      }
      const uint64_t claimed = strt_[groups_[g].stream].claimed.load(std::memory_order_acquire);
      const uint64_t np = r.nproc.load(std::memory_order_acquire);
      if (claimed <= np || np != r.seen_nproc || r.pending_since == 0) {
        // idle or progressing: reset the watch
        if (np != r.seen_nproc && r.status.load(std::memory_order_relaxed) == static_cast<uint32_t>(SmStatus::Stalled))
          r.status.store(static_cast<uint32_t>(SmStatus::Ok), std::memory_order_relaxed);
        r.seen_nproc = np;
        r.pending_since = claimed > np ? now : 0;
        if (claimed <= np) r.ok_ns.store(now, std::memory_order_relaxed);
        continue;
      }
      const int64_t worker_age = now - workers_[owner]->beat_ns.load(std::memory_order_relaxed);
      if (now - r.pending_since > deadline && worker_age > deadline) {
        // counted once until it progresses again (a stalled adopter extends the same stall)
        if (r.status.exchange(static_cast<uint32_t>(SmStatus::Stalled), std::memory_order_relaxed) !=
            static_cast<uint32_t>(SmStatus::Stalled))
          r.stalls.fetch_add(1, std::memory_order_relaxed);
        r.pending_since = 0;  // watched again from the next tick
        // Moved only to a worker that is fresh: with every other one stuck too, a move went from
        // one stuck worker to another (or to itself) every deadline, each counted a failover.
        bool elsewhere = false;
        for (int w = 0; w < n_workers_ && !elsewhere; ++w) elsewhere = w != owner && worker_fresh(w, now);
        if (elsewhere) move_group(g, owner);
      }
    }
  }
}

bool Engine::worker_fresh(int w, int64_t now) const {
  // An empty ring alone is not enough: a worker stuck in a batch has popped it (the one just
  // found stalled, among them).
  const Worker& k = *workers_[w];
  return now - k.beat_ns.load(std::memory_order_relaxed) < cfg_.stall_deadline_ns ||
         (k.sleeping.load(std::memory_order_relaxed) && k.ring.empty());
}

// Moves group g away from worker `from` (from < 0: finish a move started earlier).
void Engine::move_group(uint32_t g, int from) {
  GroupRuntime& r = grt_[g];
  static thread_local std::vector<int> move_from;
  if (move_from.size() < groups_.size()) move_from.resize(groups_.size(), -1);
  if (from >= 0) {
    move_from[g] = from;
    // seq_cst: mirror image of the claim in run_group (owner first, then busy).
    r.owner.store(-1, std::memory_order_seq_cst);
    if (r.busy.load(std::memory_order_seq_cst)) {  // finished on a later tick
      r.status.store(static_cast<uint32_t>(SmStatus::Moving), std::memory_order_relaxed);
      return;
    }
  }
  from = move_from[g];
  const int standby = n_workers_ - 1;
  int target = standby;
  const int64_t now = now_ns();
  auto age = [&](int w) { return now - workers_[w]->beat_ns.load(std::memory_order_relaxed); };
  auto fresh = [&](int w) { return worker_fresh(w, now); };
  if (target == from || !fresh(target)) {  // the standby itself is stuck: least-loaded other worker
    size_t best = SIZE_MAX;
    for (int w = 0; w < n_workers_; ++w) {
      if (w == from || !fresh(w)) continue;
      size_t owned = 0;  // lanes
      for (uint32_t k = 0; k < groups_.size(); ++k)
        owned += grt_[k].owner.load(std::memory_order_relaxed) == w ? groups_[k].lanes : 0;
      if (owned < best) {
        best = owned;
        target = w;
      }
    }
    if (best == SIZE_MAX) {  // none is fresh: the one that beat last (not back to `from` if another beat later)
      target = from;
      for (int w = 0; w < n_workers_; ++w)
        if (age(w) < age(target)) target = w;
    }
  }
  if (target == from) {  // nowhere better: it stays (no adoption of itself, no failover counted)
    r.status.store(static_cast<uint32_t>(SmStatus::Stalled), std::memory_order_relaxed);
    r.owner.store(from, std::memory_order_seq_cst);
    return;
  }
  const uint32_t s = groups_[g].stream;
  // The new owner's stream bit is set before the adoption is posted (see worker_main).
  strt_[s].workers.fetch_or(1ull << target, std::memory_order_seq_cst);
  r.owner.store(target, std::memory_order_seq_cst);
  r.status.store(static_cast<uint32_t>(SmStatus::Stalled), std::memory_order_relaxed);
  {
    Worker& t = *workers_[target];
    std::lock_guard<std::mutex> lk(t.adopt_m);
    t.adopt.push_back(g);
    t.adopt_gen.fetch_add(1, std::memory_order_release);
  }
  workers_[target]->wake.fetch_add(1, std::memory_order_release);
  workers_[target]->wake.notify_one();
  bool still = false;
  for (uint32_t k = stream_groups_[s]; k < stream_groups_[s + 1]; ++k)
    still |= grt_[k].owner.load(std::memory_order_relaxed) == from;
  if (!still && from != target) strt_[s].workers.fetch_and(~(1ull << from), std::memory_order_seq_cst);
  failovers_.fetch_add(1, std::memory_order_relaxed);
}

// ---- ingress ---------------------------------------------------------------------------------

size_t Engine::drain(Signal* out, size_t max_n) {
  uint64_t t = tail_.load(std::memory_order_relaxed);
  const uint64_t h = head_.load(std::memory_order_acquire);
  size_t k = 0;
  while (k < max_n && t + k < h && slot(t + k).ready.load(std::memory_order_acquire)) {
    if (out) out[k] = slot(t + k).sig;
    ++k;
  }
  if (k && out && journal_) journal_signals(out, k);  // never throws: see journal_signals
  for (size_t i = 0; i < k; ++i) slot(t + i).ready.store(0, std::memory_order_relaxed);
  t += k;
  if (k) {
    // release: our reads of the slots happen before ingress reuses them.
    tail_.store(t, std::memory_order_release);
    signals_out_.fetch_add(out ? k : 0, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (space_waiters_.load(std::memory_order_relaxed) > 0) {
      std::lock_guard<std::mutex> lk(wait_m_);
      space_cv_.notify_all();
    }
  }
  return k;
}

void Engine::drain_into(std::vector<Signal>& out, bool interruptible) {
  Signal buf[256];
  size_t k;
  {
    std::unique_lock<std::mutex> eg(egress_m_);
    k = wait_and_drain(eg, buf, 256, kWaitSliceNs, drain_batch(), interruptible);
  }
  out.insert(out.end(), buf, buf + k);
  // A run whose signals keep coming never sleeps in wait_and_drain: ^C is looked for here too,
  // at most every kInterruptCheckNs, and ends the run with its signals so far in `out` (a
  // KeyboardInterrupt raised once run() had returned dropped every signal of the batch).
  if (interruptible && interrupted_) {
    thread_local int64_t checked = 0;
    const int64_t now = now_ns();
    if (now - checked >= kInterruptCheckNs) {
      checked = now;
      if (interrupted_()) throw Interrupted();
    }
  }
}

size_t Engine::wait_and_drain(std::unique_lock<std::mutex>& eg, Signal* out, size_t max_n, int64_t timeout_ns,
                              size_t min_n, bool interruptible) {
  size_t k = drain(out, max_n);
  if (k || timeout_ns == 0 || max_n == 0) return k;
  int64_t spin = 0;
  if (min_n <= 1) {  // a consumer waiting for the next signal spins first (latency)
    const int64_t t_start = now_ns();
    spin = timeout_ns < 0 ? kSpinNs : std::min(kSpinNs, timeout_ns);
    while (now_ns() - t_start < spin) {
      if ((k = drain(out, max_n))) return k;
      std::this_thread::yield();
    }
  }
  // Sleep until the next min_n bars in flight (all there are, if fewer) are ready. Only the
  // fuser of the awaited bar wakes us, and we await the furthest one not ready first: bars
  // fused in order then wake a batch consumer once per batch, not once per bar (an earlier bar
  // still missing after that is awaited next).
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::nanoseconds(timeout_ns < 0 ? 0 : timeout_ns - spin);
  auto is_ready = [&](uint64_t q) {
    return q < head_.load(std::memory_order_acquire) && slot(q).ready.load(std::memory_order_acquire);
  };
  while (true) {  // a pass per interrupt check: egress is let go for it, so the bounds are read afresh
    const uint64_t t = tail_.load(std::memory_order_relaxed);  // only egress's holder moves the tail
    const uint64_t h = head_.load(std::memory_order_acquire);
    const uint64_t last = t + (h > t ? std::min<uint64_t>(std::max<size_t>(min_n, 1), h - t) - 1 : 0);
    uint64_t want = t;
    bool check = false;
    while (true) {
      while (want <= last && is_ready(want)) ++want;
      if (want > last) break;  // all of them
      const uint64_t target = is_ready(last) ? want : last;
      wake_pos_.store(target, std::memory_order_seq_cst);
      ready_waiters_.fetch_add(1, std::memory_order_seq_cst);
      bool woke;
      {
        std::unique_lock<std::mutex> lk(wait_m_);
        auto ready = [&] { return stop_.load(std::memory_order_relaxed) || is_ready(target); };
        // in slices, so the interrupt check below ends a long wait
        auto until = std::chrono::steady_clock::now() + std::chrono::nanoseconds(kWaitSliceNs);
        if (timeout_ns >= 0) until = std::min(until, deadline);
        woke = ready_cv_.wait_until(lk, until, ready);
      }
      ready_waiters_.fetch_sub(1, std::memory_order_relaxed);
      if (stop_.load(std::memory_order_relaxed)) break;
      if (!woke && timeout_ns >= 0 && std::chrono::steady_clock::now() >= deadline) break;
      if (!woke && interruptible && interrupted_) {
        check = true;
        break;
      }
    }
    if (!check) break;
    // ^C while it slept ends the wait before anything is drained: the signals stay for the next
    // poll. The check runs Python's signal handlers, so never with egress held: a handler may
    // close the engine, which takes egress (close_journal).
    eg.unlock();
    const bool hit = interrupted_();
    eg.lock();
    if (hit) throw Interrupted();
  }
  return drain(out, max_n);
}

size_t Engine::poll(Signal* out, size_t max_n, int64_t timeout_ns) {
  // Another consumer may hold egress while it waits: wait for it no longer than this timeout,
  // and count that wait against it (a poll with timeout 0 never waits).
  // (try_lock in short sleeps rather than a timed mutex: ThreadSanitizer does not model
  // pthread_mutex_clocklock, and the wait only happens beside another consumer's poll)
  std::unique_lock<std::mutex> lk(egress_m_, std::defer_lock);
  if (timeout_ns < 0) {
    lk.lock();
  } else if (!lk.try_lock()) {
    const int64_t t0 = now_ns();
    while (!lk.try_lock()) {
      if (now_ns() - t0 >= timeout_ns) return 0;
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
    timeout_ns = std::max<int64_t>(0, timeout_ns - (now_ns() - t0));
  }
  return wait_and_drain(lk, out, max_n, timeout_ns, 1, true);
}

size_t Engine::in_flight() const {
  return head_.load(std::memory_order_acquire) - tail_.load(std::memory_order_acquire);
}

size_t Engine::ingest(const Bar* bars, size_t n, uint32_t n_registered, bool wait_for_space,
                      std::vector<Signal>* drain_to, std::vector<AdmittedBar>* admitted,
                      std::unique_lock<std::mutex>* lk, int64_t deadline) {
  if (closed_) throw std::logic_error("engine is closed");
  if (lk && wait_for_space)  // blocking or run(): in pieces, ingress released while waiting (see take)
    return take(bars, n, n_registered, false, drain_to, nullptr, 0, lk, deadline);
  bool validated = false;
  if (!admitted && !drain_to && !wait_for_space && cfg_.backpressure == Backpressure::RejectNew) {
    // reject_new takes the bars up to the first that finds no room. The window only empties
    // while ingress holds its lock (consumers free slots, nothing else takes them), so the room
    // there is now is room for the whole prefix: it is decided before anything is journaled,
    // and the journal holds exactly the bars taken.
    const uint64_t room = window_room();
    if (room >= n) {  // every bar fits (a bar takes at most one slot): nothing to cut, no pre-pass
      take(bars, n, n_registered, false, nullptr, nullptr, 0);
      return n;
    }
    j_reasons_.resize(n);
    validate_locked(bars, n, n_registered, j_reasons_.data());
    validated = true;
    uint64_t need = 0;
    for (size_t i = 0; i < n; ++i) {
      if (j_reasons_[i] != 0 || stream_of_.find(stream_key(bars[i].instrument, bars[i].timeframe)) == stream_of_.end())
        continue;  // rejected or unfollowed: takes no slot
      if (need == room) {
        ++stats_.backpressure_events;
        stats_.backpressure_rejected += n - i;
        n = i;
        break;
      }
      ++need;
    }
  }
  // drop_oldest: a feeder that finds nothing ready to drop waits for the oldest bar in flight,
  // with ingress released meanwhile and no longer than its deadline (see make_room)
  const bool drop = !admitted && !drain_to && cfg_.backpressure == Backpressure::DropOldest;
  return take(bars, n, n_registered, validated, drain_to, admitted, 0, drop ? lk : nullptr, drop ? deadline : -1, drop);
}

void Engine::wait_for_room(std::unique_lock<std::mutex>& lk, uint64_t want, int64_t deadline) {
  space_waiters_.fetch_add(1, std::memory_order_seq_cst);
  lk.unlock();
  {
    std::unique_lock<std::mutex> wl(wait_m_);
    int64_t wait_ns = kWaitSliceNs;
    if (deadline >= 0) wait_ns = std::clamp<int64_t>(deadline - now_ns(), 0, wait_ns);
    space_cv_.wait_for(wl, std::chrono::nanoseconds(wait_ns), [&] {
      return cap_ - (head_.load(std::memory_order_acquire) - tail_.load(std::memory_order_acquire)) >= want ||
             stop_.load(std::memory_order_relaxed);
    });
  }
  space_waiters_.fetch_sub(1, std::memory_order_relaxed);
  if (interrupted_ && interrupted_()) throw Interrupted();  // ingress not held: lk stays released
  lk.lock();
  if (closed_ || stop_.load(std::memory_order_relaxed)) throw std::logic_error("engine is closed");
}

// A batch that may have to wait for room (a blocking submit or step, which releases ingress
// while it waits; run(), whose caller drains its own signals; drop_oldest, which drops the
// oldest) goes in pieces, each no longer than the room the window has when it starts (a bar
// takes at most one slot), journaled and taken before the next. Only ingress fills the window,
// so the room only grows while it holds its lock: a piece needs no wait, and a change made while
// a blocking submit waits (by the consumer it waits for, say) lands between two pieces, journaled
// there. The journal holds exactly the bars taken when close() or a failure ends the batch
// early. A piece waits for a quarter of the window (or the rest of the batch) rather than one
// slot, so a saturated window does not make a journal commit per bar; drop_oldest drops as many
// signals as that piece may need (no more than the bars left in the batch). Room is counted in
// slots: a rejected bar or one no agent follows takes none, so it neither waits for room nor
// makes drop_oldest drop a signal (the batch is validated once to tell, only when it may not fit).
size_t Engine::take(const Bar* bars, size_t n, uint32_t n_registered, bool validated, std::vector<Signal>* drain_to,
                    std::vector<AdmittedBar>* admitted, size_t row0, std::unique_lock<std::mutex>* lk,
                    int64_t deadline, bool drop) {
  const bool may_wait = !admitted && (lk || drain_to || drop);
  // validated: reject_new cut the batch to the room there is
  if (!may_wait || validated || window_room() >= n) {
    take_piece(bars, n, n_registered, validated, drain_to, admitted, row0);
    return n;
  }
  // slots_after[i]: the bars of [i, n) that take a slot (valid, of a stream agents follow). The
  // validation state changes only through this batch's own pieces (the feed is held), so the
  // reasons found here are the ones each piece finds.
  std::vector<uint32_t> reasons(n);
  validate_locked(bars, n, n_registered, reasons.data());
  std::vector<uint64_t> slots_after(n + 1, 0);
  for (size_t k = n; k-- > 0;) {
    const bool followed = stream_of_.count(stream_key(bars[k].instrument, bars[k].timeframe)) != 0;
    slots_after[k] = slots_after[k + 1] + (reasons[k] == 0 && followed);
  }
  size_t i = 0;
  while (i < n) {
    const uint64_t left = slots_after[i];
    const uint64_t want = std::min<uint64_t>(left, std::max<uint64_t>(1, cap_ / 4));
    const bool room = left == 0 || make_room(want, drain_to, lk, deadline, drop);
    // the longest run of bars from i whose slots fit the room there is now
    const uint64_t fit = window_room();
    size_t j = i;
    while (j < n && slots_after[i] - slots_after[j + 1] <= fit) ++j;
    if (j > i) take_piece(bars + i, j - i, n_registered, false, drain_to, nullptr, row0 + i);
    i = j;
    if (!room) {  // the deadline passed: what fitted is taken, the rest is the caller's
      stats_.backpressure_rejected += n - i;
      break;
    }
  }
  return i;
}

bool Engine::make_room(uint64_t want, std::vector<Signal>* drain_to, std::unique_lock<std::mutex>* lk,
                       int64_t deadline, bool drop) {
  if (window_room() >= want) return true;
  ++stats_.backpressure_events;
  while (window_room() < want) {
    if (drain_to) {  // run(): the caller is the consumer; ingress released while it waits (stats() goes on)
      if (stop_.load(std::memory_order_relaxed)) throw std::logic_error("engine is closed");
      if (lk) lk->unlock();
      drain_into(*drain_to);
      if (lk) {
        lk->lock();
        if (closed_ || stop_.load(std::memory_order_relaxed)) throw std::logic_error("engine is closed");
      }
      continue;
    }
    if (drop) {  // drop_oldest: the ready signals first, then wait for the oldest bar in flight
      if (stop_.load(std::memory_order_relaxed)) throw std::logic_error("engine is closed");
      {
        std::lock_guard<std::mutex> eg(egress_m_);
        stats_.backpressure_dropped += drain(nullptr, static_cast<size_t>(want - window_room()));
      }
      if (window_room() >= want) break;
      if (deadline >= 0 && now_ns() >= deadline) return false;
      wait_oldest(lk, deadline);
      continue;
    }
    if (lk) {  // blocking: ingress released while it waits (throws once the engine stops)
      if (deadline >= 0 && now_ns() >= deadline) return false;
      struct Waiting {  // a run or step behind this feeder learns that only a consumer can end the wait
        std::atomic<bool>& flag;
        ~Waiting() { flag.store(false, std::memory_order_release); }
      } waiting{feeder_waits_for_room_};
      feeder_waits_for_room_.store(true, std::memory_order_release);
      wait_for_room(*lk, want, deadline);
      continue;
    }
    throw std::logic_error("make_room: a batch that may not wait found no room");  // take() never asks so
  }
  return true;
}

void Engine::wait_oldest(std::unique_lock<std::mutex>* lk, int64_t deadline) {
  // Holds neither egress (a consumer may poll meanwhile) nor, given the feeder's lock, ingress
  // (stats() and the between-updates changes go on; they land between two pieces of the batch).
  // Polls in sleeps growing from 20 us to 1 ms, for up to 100 ms or the deadline: only a stall
  // (until the sentinel moves the group) makes this wait long, and a fused bar's notification
  // belongs to the waiting consumer (wake_pos_), not to us.
  if (lk) lk->unlock();
  const int64_t t0 = now_ns();
  const int64_t until = deadline >= 0 ? std::min(deadline, t0 + kWaitSliceNs) : t0 + kWaitSliceNs;
  auto ready = [&] {
    const uint64_t t = tail_.load(std::memory_order_acquire);
    return t == head_.load(std::memory_order_acquire) || slot(t).ready.load(std::memory_order_acquire) ||
           stop_.load(std::memory_order_relaxed);
  };
  int64_t nap = 20'000;
  while (!ready() && now_ns() < until) {
    std::this_thread::sleep_for(std::chrono::nanoseconds(nap));
    nap = std::min<int64_t>(nap * 2, 1'000'000);
  }
  if (interrupted_ && interrupted_()) throw Interrupted();  // ingress not held: lk stays released
  if (lk) {
    lk->lock();
    if (closed_ || stop_.load(std::memory_order_relaxed)) throw std::logic_error("engine is closed");
  }
}

void Engine::take_piece(const Bar* bars, size_t n, uint32_t n_registered, bool validated,
                        std::vector<Signal>* drain_to, std::vector<AdmittedBar>* admitted, size_t row0) {
  if (journal_) journal_inputs(bars, n, n_registered, validated);
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
      dead_letter(b, row0 + i, r);
      continue;
    }
    if (st == nullptr) {
      ++stats_.accepted;
      ++seq_;
      ++stats_.skipped_unfollowed;
      continue;
    }
    if (admitted) {  // run outside the workers
      ++stats_.accepted;
      ++seq_;
      st->has_last = true;
      st->last_ts = b.ts;
      ++st->nbars;
      admitted->push_back(AdmittedBar{s, static_cast<uint32_t>(row0 + i), st->nbars - 1, seq_});
      continue;
    }
    // Room in the window?
    uint64_t p = head_.load(std::memory_order_relaxed);
    if (p - tail_.load(std::memory_order_acquire) >= cap_) {
      ++stats_.backpressure_events;
      while (p - tail_.load(std::memory_order_acquire) >= cap_) {
        if (stop_.load(std::memory_order_relaxed)) throw std::logic_error("engine is closed");
        if (drain_to) {  // run(): the caller is the consumer
          std::unique_lock<std::mutex> lk(egress_m_);
          Signal buf[256];
          const size_t k = wait_and_drain(lk, buf, 256, kWaitSliceNs, drain_batch());
          drain_to->insert(drain_to->end(), buf, buf + k);
        } else if (cfg_.backpressure == Backpressure::DropOldest) {
          std::unique_lock<std::mutex> lk(egress_m_);
          const size_t k = wait_and_drain(lk, nullptr, 1, kWaitSliceNs);
          stats_.backpressure_dropped += k;
        } else {  // RejectNew and blocking pieces were sized to the room
          throw std::logic_error("ingest: the window filled while ingress held it");
        }
      }
    }
    ++stats_.accepted;
    ++seq_;
    st->has_last = true;
    st->last_ts = b.ts;
    ++st->nbars;
    Slot& sl = slot(p);
    // The slot last held position p - capacity, complete, yet a worker holding a stale copy of
    // that position may still be reading it (read_slot): the tag goes invalid first, and the
    // release fence orders that before the fields below, so a reader that sees a new value of an
    // atomic field (stream, sidx) fails its tag re-check (a seqlock). The plain fields (bar, seq,
    // t_in) are read only for positions not yet complete, which are never refilled.
    sl.tag.store(0, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_release);
    sl.bar = b;
    sl.seq = seq_;
    sl.t_in = now_ns();
    sl.stream.store(s, std::memory_order_relaxed);
    sl.sidx.store(st->nbars - 1, std::memory_order_relaxed);
    sl.remaining.store(stream_groups_[s + 1] - stream_groups_[s], std::memory_order_relaxed);
    sl.ready.store(0, std::memory_order_relaxed);
    // release: the slot's fields are visible to whoever reads the tag with acquire.
    sl.tag.store(p + 1, std::memory_order_release);
    strt_[s].claimed.fetch_add(1, std::memory_order_release);
    // seq_cst: pairs with the sentinel's seq_cst update of the stream's worker bits (see move_group).
    head_.store(p + 1, std::memory_order_seq_cst);
    const size_t depth = p + 1 - tail_.load(std::memory_order_relaxed);
    if (depth > window_hwm_.load(std::memory_order_relaxed)) window_hwm_.store(depth, std::memory_order_relaxed);
    uint64_t mask = strt_[s].workers.load(std::memory_order_seq_cst);
    while (mask) {
      const int w = __builtin_ctzll(mask);
      mask &= mask - 1;
      Worker& k = *workers_[w];
      while (!k.ring.try_push(p)) {  // only while a stalled worker's ring is full
        if (!(strt_[s].workers.load(std::memory_order_seq_cst) & (1ull << w))) break;
        wake_worker(w);
        std::this_thread::sleep_for(std::chrono::microseconds(50));
      }
      const size_t qd = k.ring.size();
      if (qd > k.hwm.load(std::memory_order_relaxed)) k.hwm.store(qd, std::memory_order_relaxed);
      wake_worker(w);
    }
  }
}

bool Engine::take_feed(std::unique_lock<std::timed_mutex>& feed, int64_t deadline, size_t n,
                       const char* own) {
  if (feed.try_lock()) return true;
  // Another feeder's batch (a blocked submit, a run) holds the feed: wait in slices, so ^C
  // (the interrupt check) and close() end a long wait, with nothing taken. A run or step (own:
  // its name) returns its own bars' signals only: behind a submit waiting for room that only a
  // consumer makes, the earlier signals would come first (check_drained) once it had the feed,
  // and a consumer polling beside it is refused (Engine.poll): it fails at once instead.
  while (true) {
    if (own && feeder_waits_for_room_.load(std::memory_order_acquire)) {
      auto lk = lock_ingress();
      check_drained(own);
    }
    const int64_t slice_end = now_ns() + kWaitSliceNs;
    const int64_t until = deadline < 0 ? slice_end : std::min(deadline, slice_end);
    const std::chrono::steady_clock::time_point at{std::chrono::nanoseconds(until)};
    if (feed.try_lock_until(at)) return true;
    if (deadline >= 0 && now_ns() >= deadline) break;
    if (interrupted_ && interrupted_()) throw Interrupted();
    if (stop_.load(std::memory_order_relaxed)) throw std::logic_error("engine is closed");
  }
  count_refused(n);  // the feed was held past the deadline
  return false;
}

void Engine::count_refused(size_t n) {
  auto lk = lock_ingress();
  if (closed_) throw std::logic_error("engine is closed");
  ++stats_.batches;
  ++stats_.backpressure_events;
  stats_.backpressure_rejected += n;
}

size_t Engine::submit(const Bar* bars, size_t n, uint32_t n_registered, bool strict, int64_t timeout_ns) {
  const int64_t deadline = deadline_in(timeout_ns);
  std::unique_lock<std::timed_mutex> feed(feed_m_, std::defer_lock);
  if (!take_feed(feed, deadline, n)) return 0;  // nothing taken
  auto lk = lock_ingress();
  if (strict) refuse_bad_locked(bars, n, n_registered);
  ++stats_.batches;
  return ingest(bars, n, n_registered, cfg_.backpressure == Backpressure::Block, nullptr, nullptr, &lk, deadline);
}

// step and run hand back the signals of their own bars only: with signals of earlier bars
// still unpolled (a submit not polled, a step that timed out), those would come first.
void Engine::check_drained(const char* what) const {
  if (closed_) throw std::logic_error("engine is closed");
  if (const size_t older = in_flight())
    throw std::logic_error(std::string(what) + "(): " + std::to_string(older) +
                           " signal(s) of earlier bars are not polled yet (a submit, or a step that "
                           "timed out): poll() them first; " + what + "() returns its own bars' signals only");
}

int Engine::step(const Bar& bar, uint32_t n_registered, Signal* out, int64_t timeout_ns, bool strict,
                 int64_t feed_timeout_ns) {
  const int64_t deadline = deadline_in(feed_timeout_ns);
  {
    std::unique_lock<std::timed_mutex> feed(feed_m_, std::defer_lock);
    if (!take_feed(feed, deadline, 1, "step")) return -2;  // the bar is not taken
    auto lk = lock_ingress();
    check_drained("step");
    if (strict) refuse_bad_locked(&bar, 1, n_registered);
    ++stats_.batches;
    const uint64_t h0 = head_.load(std::memory_order_relaxed);
    ingest(&bar, 1, n_registered, true, nullptr, nullptr, &lk);
    if (head_.load(std::memory_order_relaxed) == h0) return -1;
  }
  if (deadline >= 0) {  // what is left of the step's time, when less than the poll's
    const int64_t left = std::max<int64_t>(0, deadline - now_ns());
    if (timeout_ns < 0 || left < timeout_ns) timeout_ns = left;
  }
  return poll(out, 1, timeout_ns) ? 1 : 0;
}

size_t Engine::run(const Bar* bars, size_t n, uint32_t n_registered, std::vector<Signal>& out, bool strict,
                   uint64_t* taken) {
  const auto t0 = std::chrono::steady_clock::now();
  const size_t before = out.size();
  std::unique_lock<std::timed_mutex> feed(feed_m_, std::defer_lock);
  take_feed(feed, -1, n, "run");  // no deadline: true or a throw
  auto lk = lock_ingress();
  check_drained("run");
  if (strict) refuse_bad_locked(bars, n, n_registered);
  ++stats_.batches;
  // bars_in moves only by the feed holder (this call) from here: its change is what it took
  const uint64_t in0 = stats_.bars_in;
  // in pieces, ingress released while it waits for its signals (stats() and the between-updates
  // changes go on, landing between two pieces, journaled there, as beside a blocking submit)
  auto drain_own = [&](bool interruptible) {  // the signals of every bar this run has taken
    while (tail_.load(std::memory_order_acquire) < head_.load(std::memory_order_acquire)) {
      if (stop_.load()) throw std::logic_error("engine is closed");
      drain_into(out, interruptible);
    }
  };
  try {
    ingest(bars, n, n_registered, true, &out, nullptr, &lk);
  } catch (...) {
    // A later piece failed (its journal write, ^C): the pieces taken before it are in flight,
    // and their signals are this run's to hand out (the caller gets them with the exception),
    // not left for a poll() that run() callers never make (the next run() refused on them).
    const std::exception_ptr failure = std::current_exception();
    if (taken) *taken = stats_.bars_in - in0;
    if (lk.owns_lock()) lk.unlock();
    try {
      drain_own(false);  // (a ^C that ended the run does not cut this short)
    } catch (...) {  // closed meanwhile: the first failure is the one to report
    }
    std::rethrow_exception(failure);
  }
  if (taken) *taken = stats_.bars_in - in0;
  lk.unlock();
  try {
    drain_own(true);
  } catch (const Interrupted&) {  // ^C: the rest of the run's signals join it first
    try {
      drain_own(false);
    } catch (...) {
    }
    throw;
  }
  lk.lock();
  stats_.busy_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  lk.unlock();  // the check runs Python's signal handlers: never with ingress held (close takes it)
  // A ^C that came during the run ends it here, with every signal in `out` (the caller gets
  // them with the exception), rather than in Python once run() has returned.
  if (interrupted_ && interrupted_()) throw Interrupted();
  return out.size() - before;
}

void Engine::wait_idle() {
  // Caller holds ingress_m_, so nothing new is claimed (head_ stays) and no slot is refilled.
  // Idle is every claimed bar run by all its SMs and fused: a group publishes nproc before its
  // worker finishes the bar's units, and the last finisher fuses after that, reading the
  // stream's DSI and flags. Without the second check a caller (set_dsi, evolve, wait_all) could
  // go on while a signal was still being fused: a DSI change landing in an earlier bar's signal,
  // or poll() after wait_all missing the last signals.
  uint64_t seen = 0;  // positions below it were found ready (they stay so until drained)
  while (true) {
    bool idle = true;
    for (uint32_t g = 0; g < groups_.size() && idle; ++g)
      idle = grt_[g].nproc.load(std::memory_order_acquire) ==
             strt_[groups_[g].stream].claimed.load(std::memory_order_acquire);
    if (idle) {
      // Every position not yet handed out is ready (a drain racing with this only clears the
      // flags of positions it has taken, below the tail it then publishes: the loop sees them
      // not ready and looks again from the new tail).
      const uint64_t h = head_.load(std::memory_order_acquire);
      for (uint64_t q = std::max(seen, tail_.load(std::memory_order_acquire)); q < h; ++q)
        if (!slot(q).ready.load(std::memory_order_acquire)) {
          idle = false;
          seen = q;
          break;
        }
    }
    if (idle || closed_) return;
    // close() has begun and waits for the ingress lock this caller holds: the workers are leaving
    // (or gone) and claimed bars may never run, so nothing here can wait them out.
    if (stop_.load(std::memory_order_acquire)) throw std::logic_error("engine is closed");
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

size_t Engine::admit(const Bar* bars, size_t n, uint32_t n_registered, std::vector<AdmittedBar>& out, bool strict) {
  std::unique_lock<std::timed_mutex> feed(feed_m_, std::defer_lock);
  take_feed(feed, -1, n);  // no deadline: true or a throw
  auto lk = lock_ingress();
  if (strict) refuse_bad_locked(bars, n, n_registered);
  ++stats_.batches;
  return ingest(bars, n, n_registered, false, nullptr, &out);
}

void Engine::emit_external(const Signal* s, size_t k, uint64_t updates, uint64_t quarantined, double seconds) {
  {
    std::lock_guard<std::mutex> eg(egress_m_);
    if (k && journal_) journal_signals(s, k);
    signals_out_.fetch_add(k, std::memory_order_relaxed);
  }
  ext_updates_.fetch_add(updates, std::memory_order_relaxed);
  ext_quarantined_.fetch_add(quarantined, std::memory_order_relaxed);
  // The health counters the workers keep, kept for the bars run outside them too: each bar counts
  // as claimed and processed by its stream's group (a device plan has one group per stream), and
  // its latency is the batch's, from admission to these signals.
  if (groups_.size() == layout_.streams.size()) {
    for (size_t i = 0; i < k; ++i) {
      auto it = stream_of_.find(stream_key(s[i].instrument, s[i].timeframe));
      if (it == stream_of_.end()) continue;
      strt_[it->second].claimed.fetch_add(1, std::memory_order_relaxed);
      grt_[it->second].nproc.fetch_add(1, std::memory_order_release);
    }
  }
  if (k) latency_[latency_bucket(static_cast<int64_t>(seconds * 1e9))].fetch_add(k, std::memory_order_relaxed);
  if (k > window_hwm_.load(std::memory_order_relaxed)) window_hwm_.store(k, std::memory_order_relaxed);
  auto lk = lock_ingress();
  stats_.busy_seconds += seconds;
}

DevicePlan Engine::device_plan() const {
  DevicePlan p;
  if (groups_.size() != layout_.streams.size())
    throw std::logic_error("a device plan needs one bank per stream (an engine with one worker)");
  p.st_ind_begin.push_back(0);
  p.st_feat_begin.push_back(0);
  for (uint32_t s = 0; s < layout_.streams.size(); ++s) {
    const Stream& st = layout_.streams[s];
    const Bank& b = groups_[s].bank;
    p.st_instrument.push_back(st.instrument);
    p.st_timeframe.push_back(st.timeframe);
    p.st_sm_begin.push_back(st.sm_begin);
    p.st_sm_end.push_back(st.sm_end);
    auto ind = [&](int32_t kind, int32_t a, int32_t b2, int32_t c) {
      p.ind_kind.push_back(kind);
      p.ind_p0.push_back(a);
      p.ind_p1.push_back(b2);
      p.ind_p2.push_back(c);
      p.ind_buf.push_back(-1);
    };
    ind(DevicePlan::Ret, 0, 0, 0);
    const int32_t ema0 = 1;
    for (const Ema& x : b.emas) ind(DevicePlan::Ema, x.n, 0, 0);
    const int32_t rsi0 = ema0 + static_cast<int32_t>(b.emas.size());
    for (const Rsi& x : b.rsis) ind(DevicePlan::Rsi, x.n, 0, 0);
    const int32_t atr0 = rsi0 + static_cast<int32_t>(b.rsis.size());
    for (const Atr& x : b.atrs) ind(DevicePlan::Atr, x.n, 0, 0);
    const int32_t macd0 = atr0 + static_cast<int32_t>(b.atrs.size());
    for (const Macd& x : b.macds) ind(DevicePlan::Macd, x.fast_n, x.slow_n, x.sig_n);
    const int32_t ew0 = macd0 + static_cast<int32_t>(b.macds.size());
    for (const Ew& x : b.ews) ind(DevicePlan::Ew, x.n, 0, 0);
    const int32_t roc0 = ew0 + static_cast<int32_t>(b.ews.size());
    for (const Roc& x : b.rocs) {
      ind(DevicePlan::Roc, x.n, 0, 0);
      p.ind_buf.back() = p.buf_size;
      p.buf_size += x.n;
    }
    p.st_ind_begin.push_back(static_cast<uint32_t>(p.ind_kind.size()));
    auto feat = [&](int32_t kind, int32_t a, int32_t b2, int32_t c, int64_t from) {
      p.feat_kind.push_back(kind);
      p.feat_a.push_back(a);
      p.feat_b.push_back(b2);
      p.feat_c.push_back(c);
      p.feat_from.push_back(from);
    };
    feat(-1, 0, 0, 0, 0);
    for (size_t j = 0; j < b.trend_fast.size(); ++j)
      feat(0, ema0 + b.trend_fast[j], ema0 + b.trend_slow[j], atr0 + b.trend_atr[j], b.feat_from[0][j]);
    for (size_t j = 0; j < b.rsi_f.size(); ++j) feat(1, rsi0 + b.rsi_f[j], 0, 0, b.feat_from[1][j]);
    for (size_t j = 0; j < b.macd_m.size(); ++j)
      feat(2, macd0 + b.macd_m[j], 0, atr0 + b.macd_atr[j], b.feat_from[2][j]);
    for (size_t j = 0; j < b.bb_f.size(); ++j) feat(3, ew0 + b.bb_f[j], 0, 0, b.feat_from[3][j]);
    for (size_t j = 0; j < b.mom_f.size(); ++j) feat(4, roc0 + b.mom_f[j], 0, 0, b.feat_from[4][j]);
    p.st_feat_begin.push_back(static_cast<uint32_t>(p.feat_kind.size()));
  }
  for (const Sm& sm : layout_.sms) {
    p.sm_stream.push_back(sm.stream);
    p.sm_lane_begin.push_back(sm.lane_begin);
    p.sm_lanes.push_back(sm.n_warps * kWarpSize);
  }
  return p;
}

void Engine::read_state(StateArrays& out) {
  std::lock_guard<std::mutex> lk(ingress_m_);
  wait_idle();
  out = state_;
}

void Engine::write_state(const StateArrays& in) {
  auto lk = lock_ingress();
  wait_idle();
  const size_t n = state_.score.size();
  for (size_t m : {in.score.size(), in.equity.size(), in.entry_equity.size(), in.peak.size(), in.max_dd.size(),
                   in.ret_sum.size(), in.ret_sq.size(), in.credit.size(), in.ext_score.size(), in.dsi.size(),
                   in.trades.size(),
                   in.wins.size(), in.n_ret.size(), in.quarantined.size(), in.position.size(), in.action.size()})
    if (m != n) throw std::invalid_argument("agent state arrays must have one value per lane");
  state_ = in;
}

EngineStats Engine::stats() {
  std::lock_guard<std::mutex> lk(ingress_m_);
  EngineStats s = stats_;
  s.dead_letters = dead_.size();
  s.signals = signals_out_.load(std::memory_order_relaxed);
  s.sequence = seq_;
  s.in_flight = in_flight();
  return s;
}

uint64_t Engine::agent_updates() const {
  uint64_t u = 0;
  for (const auto& w : workers_) u += w->updates.load(std::memory_order_relaxed);
  return u + ext_updates_.load(std::memory_order_relaxed);
}

double Engine::worker_busy_seconds() const {
  int64_t ns = 0;
  for (const auto& w : workers_) ns = std::max(ns, w->busy_ns.load(std::memory_order_relaxed));
  return static_cast<double>(ns) * 1e-9;
}

uint64_t Engine::quarantined() const {
  uint64_t q = 0;
  for (uint32_t g = 0; g < groups_.size(); ++g) q += grt_[g].quarantined.load(std::memory_order_relaxed);
  // Modular on purpose: on a backend outside the workers, ext_ counts the quarantines and a
  // generation's replacements take a group's count below 0 (wrapped), so the sum is those now.
  return q + ext_quarantined_.load(std::memory_order_relaxed);
}

void Engine::wait_all() {
  std::lock_guard<std::mutex> lk(ingress_m_);
  wait_idle();
}

double Engine::uptime_s() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
}

std::vector<Engine::SmHealth> Engine::sm_health() const {
  const int64_t now = now_ns();
  std::vector<SmHealth> out(layout_.sms.size());
  for (uint32_t m = 0; m < layout_.sms.size(); ++m) {  // each SM as its group
    const GroupRuntime& r = grt_[group_of_[m]];
    const uint64_t np = r.nproc.load(std::memory_order_acquire);
    const uint64_t claimed = strt_[layout_.sms[m].stream].claimed.load(std::memory_order_acquire);
    // An SM with nothing pending is as fresh as now; one with bars pending, as its last unit of
    // progress or the sentinel's last tick that found it idle, the later (at most a sentinel
    // period early; its last unit alone counted the idle time before the pending bar: 2 s idle
    // read 2.1 s into a bar).
    const int64_t beat = claimed > np ? std::max(r.beat_ns.load(std::memory_order_relaxed),
                                                 r.ok_ns.load(std::memory_order_relaxed))
                                      : now;
    out[m] = SmHealth{r.owner.load(std::memory_order_relaxed), r.status.load(std::memory_order_relaxed),
                      r.stalls.load(std::memory_order_relaxed), std::max<int64_t>(0, now - beat) * 1e-9, np};
  }
  return out;
}

std::vector<Engine::WorkerHealth> Engine::worker_health() const {
  const int64_t now = now_ns();
  std::vector<WorkerHealth> out;
  for (int w = 0; w < n_workers_; ++w) {
    const Worker& k = *workers_[w];
    size_t sms = 0;
    for (uint32_t g = 0; g < groups_.size(); ++g)
      sms += grt_[g].owner.load(std::memory_order_relaxed) == w ? groups_[g].sm_end - groups_[g].sm_begin : 0;
    const bool parked = k.sleeping.load(std::memory_order_relaxed) != 0;
    out.push_back(WorkerHealth{k.ring.size(), k.hwm.load(std::memory_order_relaxed), sms,
                               parked ? 0.0 : std::max<int64_t>(0, now - k.beat_ns.load(std::memory_order_relaxed)) * 1e-9,
                               k.standby, parked, k.updates.load(std::memory_order_relaxed)});
  }
  return out;
}

std::vector<uint64_t> Engine::latency_histogram() const {
  std::vector<uint64_t> h(kLatencyBuckets);
  for (int i = 0; i < kLatencyBuckets; ++i) h[i] = latency_[i].load(std::memory_order_relaxed);
  return h;
}

void Engine::inject_stall(uint32_t sm, int64_t ns, bool hold) {
  if (!faults_) throw std::logic_error("fault injection is not armed (EngineConfig::fault_injection)");
  if (sm >= layout_.sms.size())
    throw std::out_of_range("no such SM: " + std::to_string(sm) + " (SMs are 0.." +
                            std::to_string(layout_.sms.size() - 1) + ")");
  if (ns < 0) throw std::out_of_range("a stall lasts 0 ns or more");
  grt_[group_of_[sm]].stall_ns.store(hold ? -ns : ns, std::memory_order_release);
}

void Engine::inject_poison(uint32_t agent) {
  if (!faults_) throw std::logic_error("fault injection is not armed (EngineConfig::fault_injection)");
  if (agent >= layout_.n_agents)
    throw std::out_of_range("no such agent: " + std::to_string(agent) + " (population positions are 0.." +
                            std::to_string(layout_.n_agents - 1) + ")");
  const uint32_t lane = layout_.agent_lane[agent];
  for (uint32_t m = 0; m < layout_.sms.size(); ++m) {
    const Sm& sm = layout_.sms[m];
    if (lane >= sm.lane_begin && lane < sm.lane_begin + sm.n_warps * kWarpSize) {
      const uint32_t g = group_of_[m];
      grt_[g].poison.store(static_cast<int32_t>(lane - groups_[g].lane_begin), std::memory_order_release);
      return;
    }
  }
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

std::vector<DeadLetter> Engine::dead_letters() {
  std::lock_guard<std::mutex> lk(ingress_m_);
  std::vector<DeadLetter> out;
  out.reserve(dead_.size());
  for (size_t i = 0; i < dead_.size(); ++i) out.push_back(dead_[(dead_head_ + i) % dead_.size()]);
  return out;
}

size_t Engine::validate(const Bar* bars, size_t n, uint32_t n_registered, uint32_t* reasons) {
  std::lock_guard<std::mutex> lk(ingress_m_);
  return validate_locked(bars, n, n_registered, reasons);
}

void Engine::refuse_bad_locked(const Bar* bars, size_t n, uint32_t n_registered) {
  j_reasons_.resize(n);  // ingress's scratch (ingest rewrites it): no allocation per batch
  if (validate_locked(bars, n, n_registered, j_reasons_.data()) > 0)
    throw StrictRefusal(std::vector<uint32_t>(j_reasons_.begin(), j_reasons_.begin() + static_cast<ptrdiff_t>(n)));
}

size_t Engine::validate_locked(const Bar* bars, size_t n, uint32_t n_registered, uint32_t* reasons) {
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

void Engine::set_credit(const uint32_t* agents, const double* credit, size_t n, const std::string& event) {
  for (size_t k = 0; k < n; ++k) {
    if (agents[k] >= layout_.n_agents)
      throw std::invalid_argument("set_credit: agent index " + std::to_string(agents[k]) + " out of range");
    if (!(credit[k] > 0.0 && credit[k] <= kMaxCredit))
      throw std::invalid_argument("set_credit: credit of agent id " + std::to_string(layout_.agent_id[agents[k]]) +
                                  " must be > 0 and at most 1e6 (1.0 is neutral)");
  }
  set_lane_values(state_.credit, agents, credit, n, event);
}

size_t Engine::set_dsi(const uint32_t* instruments, const double* evidence, size_t n, const std::string& event) {
  for (size_t k = 0; k < n; ++k)
    if (!dc_finite(evidence[k]) || evidence[k] < -1.0 || evidence[k] > 1.0)
      throw std::invalid_argument("set_dsi: evidence of instrument " + std::to_string(instruments[k]) +
                                  " must be finite and in [-1, 1]");
  auto lk = lock_ingress();
  wait_idle();  // between updates, like set_credit
  journal_event_locked(event);
  size_t updated = 0;
  for (size_t k = 0; k < n; ++k)
    for (uint32_t s = 0; s < layout_.streams.size(); ++s) {
      const Stream& st = layout_.streams[s];
      if (st.instrument != instruments[k]) continue;
      ++updated;
      stream_dsi_[s] = evidence[k];
      stream_flags_[s] |= kSignalDsi;
      for (uint32_t m = st.sm_begin; m < st.sm_end; ++m) {
        const Sm& sm = layout_.sms[m];
        if (!sm.has_dsi) continue;
        for (uint32_t l = sm.lane_begin; l < sm.lane_begin + sm.n_warps * kWarpSize; ++l)
          if (layout_.lane_agent[l] != UINT32_MAX && !lanes_.external[l])
            state_.dsi[l] = lane_genome_[l].w_dsi * evidence[k];
      }
    }
  return updated;
}

void Engine::set_lane_values(std::vector<double>& dst, const uint32_t* agents, const double* values, size_t n,
                             const std::string& event) {
  auto lk = lock_ingress();
  wait_idle();  // between updates: no worker holds these lanes; the next bar's ring push publishes
  journal_event_locked(event);
  for (size_t k = 0; k < n; ++k) dst[layout_.agent_lane[agents[k]]] = values[k];
}

void Engine::journal_event_locked(const std::string& event) {
  if (event.empty()) return;
  std::lock_guard<std::mutex> jl(journal_m_);
  if (journal_) {
    journal_reported([&] {
      journal_->append(RecordType::Event, event.data(), event.size());
      journal_->commit(true);
    });
  }
}

void Engine::genomes(Genome* out) {
  std::lock_guard<std::mutex> lk(ingress_m_);
  wait_idle();
  for (size_t a = 0; a < layout_.n_agents; ++a) out[a] = lane_genome_[layout_.agent_lane[a]];
}

void Engine::lineage(Lineage* out) {
  std::lock_guard<std::mutex> lk(ingress_m_);
  wait_idle();
  for (size_t a = 0; a < layout_.n_agents; ++a) out[a] = lane_lineage_[layout_.agent_lane[a]];
}

void Engine::set_external_scores(const uint32_t* agents, const double* scores, size_t n, const std::string& event) {
  for (size_t k = 0; k < n; ++k) {
    if (agents[k] >= layout_.n_agents)
      throw std::invalid_argument("set_external_scores: agent index " + std::to_string(agents[k]) + " out of range");
    if (!lanes_.external[layout_.agent_lane[agents[k]]])
      throw std::invalid_argument("set_external_scores: agent id " + std::to_string(layout_.agent_id[agents[k]]) +
                                  " is not an external-score agent (kind 1)");
    if (!dc_finite(scores[k]) || scores[k] < -1.0 || scores[k] > 1.0)
      throw std::invalid_argument("set_external_scores: score of agent id " +
                                  std::to_string(layout_.agent_id[agents[k]]) +
                                  " must be finite and in [-1, 1]");
  }
  set_lane_values(state_.ext_score, agents, scores, n, event);
}

void Engine::agents(AgentRecord* out) {
  std::lock_guard<std::mutex> lk(ingress_m_);
  wait_idle();
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
    r.credit = state_.credit[lane];
    r.fitness = fitness(s.equity, s.max_dd, r.credit);
    if (s.n_ret > 0) {
      const double nr = static_cast<double>(s.n_ret);
      r.ret_mean = s.ret_sum / nr;
      r.ret_std = DC_SQRT(moment_variance(s.ret_sum, s.ret_sq, nr));
    }
    out[a] = r;
  }
  // fields that depend on the SM/stream of the lane
  for (uint32_t m = 0; m < layout_.sms.size(); ++m) {
    const Sm& sm = layout_.sms[m];
    const Stream& st = layout_.streams[sm.stream];
    const double per_year = 31557600.0 / static_cast<double>(st.timeframe);
    const int64_t t = static_cast<int64_t>(st.nbars) - 1;  // bars of the stream seen (all run: wait_idle)
    for (uint32_t l = 0; l < sm.n_warps * kWarpSize; ++l) {
      const uint32_t lane = sm.lane_begin + l;
      const uint32_t a = layout_.lane_agent[lane];
      if (a == UINT32_MAX) continue;
      AgentRecord& r = out[a];
      r.instrument = st.instrument;
      r.timeframe = st.timeframe;
      r.warm = t >= lanes_.lookback[lane];
      r.sharpe = r.ret_std > 0.0 ? r.ret_mean / r.ret_std * DC_SQRT(per_year) : 0.0;
    }
  }
}

// ---- journal ---------------------------------------------------------------------------------

void Engine::open_journal(const std::string& dir, const JournalIdentity& id, const void* meta, size_t meta_n,
                          int fsync_level, uint64_t segment_bytes) {
  auto lk = lock_ingress();
  std::lock_guard<std::mutex> eg(egress_m_);
  std::lock_guard<std::mutex> jl(journal_m_);
  if (journal_) throw std::logic_error("the engine already has a journal");
  if (seq_ != 0 || head_.load() != 0)
    throw std::logic_error("a journal must be opened before the first bar, or replay could not start from it");
  journal_ = std::make_unique<JournalWriter>(dir, id, meta, meta_n, fsync_level, segment_bytes);
}

uint64_t Engine::journal_append(RecordType type, const void* data, size_t n, bool durable) {
  auto lk = lock_ingress();
  std::lock_guard<std::mutex> jl(journal_m_);
  if (!journal_) throw std::logic_error("the engine has no journal");
  uint64_t seq = 0;
  journal_reported([&] {
    seq = journal_->append(type, data, n);
    journal_->commit(durable);
  });
  return seq;
}

JournalStats Engine::journal_stats() {
  std::lock_guard<std::mutex> jl(journal_m_);
  return journal_ ? journal_->stats() : JournalStats{};
}

void Engine::close_journal() {
  auto lk = lock_ingress();
  std::lock_guard<std::mutex> eg(egress_m_);
  std::lock_guard<std::mutex> jl(journal_m_);
  if (!journal_ || journal_->closed()) return;
  journal_reported([&] { journal_->close(); });
  // A failure only signal hashes met (they never throw) is told here at the latest.
  if (journal_->failed() && !journal_failure_told_) {
    journal_failure_told_ = true;
    throw JournalFailure("the journal in " + journal_->dir() + " failed during the run (" + journal_->error() +
                         "); everything committed before the failure is intact and replays");
  }
}

// Caller holds journal_m_. Runs `write`; a JournalFailure it throws goes on to the caller, who is
// then told of the failure (close_journal does not repeat it).
template <class F>
void Engine::journal_reported(F&& write) {
  try {
    write();
  } catch (const JournalFailure&) {
    journal_failure_told_ = true;
    throw;
  }
}

// Caller holds ingress_m_. The same decisions ingest is about to make (validate_locked mirrors
// its checks against the streams' last timestamps), journaled and committed first.
void Engine::journal_inputs(const Bar* bars, size_t n, uint32_t n_registered, bool validated) {
  if (journal_->closed()) return;
  if (!validated) {  // else j_reasons_ holds them already (for a longer batch: the same prefix)
    j_reasons_.resize(n);
    validate_locked(bars, n, n_registered, j_reasons_.data());
  }
  j_bars_.clear();
  j_dead_.clear();
  for (size_t i = 0; i < n; ++i) {
    if (j_reasons_[i] == 0) {
      j_bars_.push_back(bars[i]);
    } else {
      const uint32_t rr[2] = {j_reasons_[i], 0};
      const char* b = reinterpret_cast<const char*>(&bars[i]);
      j_dead_.insert(j_dead_.end(), b, b + sizeof(Bar));
      j_dead_.insert(j_dead_.end(), reinterpret_cast<const char*>(rr), reinterpret_cast<const char*>(rr) + 8);
    }
  }
  std::lock_guard<std::mutex> jl(journal_m_);
  // One commit per batch, its records split to stay under the size limit, each but the last
  // flagged kRecordMore: replay takes a batch only when the whole of it is there. A failure
  // throws before any bar of the batch is taken: the caller keeps them all.
  constexpr size_t kPerRecord = kJournalMaxRecord / sizeof(Bar);
  constexpr size_t kDeadSize = sizeof(Bar) + 8;
  constexpr size_t kDeadPerRecord = kJournalMaxRecord / kDeadSize;
  const size_t records = (j_bars_.size() + kPerRecord - 1) / kPerRecord +
                         (j_dead_.size() / kDeadSize + kDeadPerRecord - 1) / kDeadPerRecord;
  size_t k = 0;
  auto flags = [&] { return ++k < records ? kRecordMore : uint16_t{0}; };
  journal_reported([&] {
    for (size_t i = 0; i < j_bars_.size(); i += kPerRecord)
      journal_->append(RecordType::Bars, j_bars_.data() + i, std::min(kPerRecord, j_bars_.size() - i) * sizeof(Bar),
                       flags());
    for (size_t i = 0; i < j_dead_.size(); i += kDeadPerRecord * kDeadSize)
      journal_->append(RecordType::DeadLetter, j_dead_.data() + i,
                       std::min(kDeadPerRecord * kDeadSize, j_dead_.size() - i), flags());
    journal_->commit(true);
  });
}

// Caller holds egress_m_.
void Engine::journal_signals(const Signal* s, size_t k) {
  j_hashes_.resize(2 * k);
  for (size_t i = 0; i < k; ++i) {
    j_hashes_[2 * i] = s[i].seq;
    j_hashes_[2 * i + 1] = fnv1a64(&s[i], sizeof(Signal));
  }
  std::lock_guard<std::mutex> jl(journal_m_);
  if (journal_->closed() || journal_->failed()) return;
  // Never throws: the signals are computed from journaled inputs and are handed out whatever
  // happens to their hashes (replay counts them unverified). A failure here fails the writer;
  // the next input, or close_journal, reports it.
  constexpr size_t kPerRecord = kJournalMaxRecord / (2 * sizeof(uint64_t));
  try {
    for (size_t i = 0; i < k; i += kPerRecord)
      journal_->append(RecordType::SignalHashes, j_hashes_.data() + 2 * i,
                       std::min(kPerRecord, k - i) * 2 * sizeof(uint64_t));
    journal_->commit(false);
  } catch (const JournalFailure&) {
  }
}

}  // namespace dynamic_core
