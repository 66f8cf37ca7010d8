// The runtime: ingress (validation, sequencing), SM workers on SPSC rings, consensus as soon as
// a bar's SMs are done, egress in bar order, and the health sentinel.
//
// Threads: the caller's thread runs ingress (submit/run) and egress (poll); N worker threads each
// own a fixed set of SMs; one standby worker owns none until the sentinel moves the SMs of a
// stalled worker to it; the sentinel thread watches per-SM heartbeats.
//
// Data path of one bar: ingress claims the next slot of a bounded window (backpressure when
// full), pushes the slot's position into the ring of every worker owning a group of the bar's
// stream; each worker runs those groups (bank update + lane kernel of each SM) and writes one
// summary per SM into the slot; the worker finishing the last group fuses the summaries in
// SM-index order into the signal and marks the slot ready; poll() hands ready slots out in
// position (= bar) order.
//
// Groups: the SMs of a stream are cut into at most `threads` contiguous groups, each run by one
// worker with one bank shared by its SMs (merge_banks): every indicator and feature is updated
// once per group instead of once per SM. Groups are the unit of ownership and failover; which
// group a SM is in, and which worker runs it, changes no result.
#pragma once
#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <string>
#include <unordered_map>
#include <vector>

#include "evolution.hpp"
#include "journal.hpp"
#include "kernel.hpp"
#include "population.hpp"
#include "records.hpp"
#include "ring.hpp"

namespace dynamic_core {

enum class Backpressure : uint32_t { Block = 0, RejectNew = 1, DropOldest = 2 };

struct EngineConfig {
  int cores_per_sm = 128;
  uint64_t population_hash = 0;
  uint32_t dead_letter_capacity = 10000;
  uint32_t block_bars = 0;  // bars a worker takes per batch; 0 = sized from its measured speed
  int threads = 1;          // SM workers (a standby worker is started besides them)
  uint32_t capacity = 0;    // bars in flight or ready but not yet polled; 0 = sized automatically
  Backpressure backpressure = Backpressure::Block;
  int64_t stall_deadline_ns = 50'000'000;
  bool fault_injection = false;  // allow inject_stall / inject_poison
  uint32_t unit_block = 0;  // most bars a group runs SM by SM (1 = bar by bar); 0 = sized from its features
};

inline constexpr int kLatencyBucketsPerOctave = 8;
inline constexpr int kLatencyBuckets = 40 * kLatencyBucketsPerOctave;  // up to ~2^40 ns

struct EngineStats {
  uint64_t batches = 0;
  uint64_t bars_in = 0;
  uint64_t accepted = 0;
  uint64_t skipped_unfollowed = 0;
  uint64_t rejected = 0;
  uint64_t rejects[kReasonCount] = {};
  uint64_t signals = 0;  // handed out by poll/run
  uint64_t dead_letters_dropped = 0;
  uint64_t backpressure_events = 0;    // times ingress found the window full
  uint64_t backpressure_rejected = 0;  // bars refused by reject_new
  uint64_t backpressure_dropped = 0;   // ready signals dropped by drop_oldest
  double busy_seconds = 0.0;           // time spent inside run()
  uint64_t dead_letters = 0;           // kept now
  // taken with the counts above, in one hold of the ingress lock
  uint64_t sequence = 0;  // next signal sequence number
  uint64_t in_flight = 0;  // bars claimed, their signals not yet handed out
};

// Value checks of one bar, without the per-stream ordering check.
Reason check_bar(const Bar& b, uint32_t n_registered);

// check_bar plus time order within the batch for every (instrument, timeframe), followed or not.
size_t validate_bars(const Bar* bars, size_t n, uint32_t n_registered, uint32_t* reasons);

// What a device backend needs to run the population as the engine does: the streams, the SMs,
// one bank per stream (the merged bank of all its SMs, as one worker runs it) and, in the lane
// arrays (Engine::lane_arrays), feature indices into that bank.
//
// Indicators are numbered per stream: 0 is the stream's close-to-close return, then its EMAs,
// RSIs, ATRs, MACDs, EW mean/variances and ROCs in the bank's order. Features are numbered per
// stream as in the bank (0 is the constant 0); a, b, c are the stream-local indicators a feature
// reads (trend: fast EMA, slow EMA, ATR; rsi: RSI; macd: MACD, -, ATR; bb: EW; mom: ROC) and
// `from` the bar index from which it is warm (before that it is 0).
struct DevicePlan {
  enum IndKind : int32_t { Ret = 0, Ema = 1, Rsi = 2, Atr = 3, Macd = 4, Ew = 5, Roc = 6 };
  std::vector<uint32_t> st_instrument, st_timeframe, st_sm_begin, st_sm_end;
  std::vector<uint32_t> st_ind_begin, st_feat_begin;  // size streams + 1
  std::vector<uint32_t> sm_stream, sm_lane_begin, sm_lanes;
  std::vector<int32_t> ind_kind, ind_p0, ind_p1, ind_p2;  // global, stream after stream
  std::vector<int64_t> ind_buf;  // ROC: offset of its n-value buffer; -1 otherwise
  int64_t buf_size = 0;
  std::vector<int32_t> feat_kind, feat_a, feat_b, feat_c;  // global; kind -1: the constant 0
  std::vector<int64_t> feat_from;
};

// Stalled: missed its deadline (moved, or caught up by its adopter), until it progresses again.
// Moving: its stuck worker still holds it; the move completes when that worker lets go.
enum class SmStatus : uint32_t { Ok = 0, Stalled = 1, Moving = 2 };

// Per-group runtime state. Written by the owning worker, except owner/status (sentinel).
struct alignas(kCacheLine) GroupRuntime {
  std::atomic<int32_t> owner{0};
  std::atomic<int32_t> busy{0};       // workers in claim() or holding the group (a count)
  std::atomic<uint64_t> nproc{0};     // bars of its stream processed (published after the state)
  std::atomic<int64_t> beat_ns{0};    // steady-clock time of the last unit of progress
  std::atomic<uint32_t> status{0};    // SmStatus
  std::atomic<uint32_t> stalls{0};    // times detected stalled
  std::atomic<int64_t> stall_ns{0};   // fault injection: sleep this long before (< 0: holding) the next unit
  std::atomic<int32_t> poison{-1};    // fault injection: lane (in the group) whose next score is NaN
  std::atomic<uint64_t> quarantined{0};  // its agents quarantined now (a generation's children replace them)
  std::atomic<int64_t> ok_ns{0};      // sentinel: its last tick that found the group idle
  uint64_t last_pos = 0;              // owner only: position of the last bar processed + 1
  // sentinel only
  uint64_t seen_nproc = 0;
  int64_t pending_since = 0;
};

class Engine {
 public:
  Engine(const Genome* genomes, size_t n, const EngineConfig& cfg);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Batch mode: processes a time-ordered batch and appends one signal per accepted bar of a
  // followed stream, in input order. Must not be mixed with submit/poll from other threads.
  // `strict`: a batch with any bad bar is refused whole (StrictRefusal, nothing taken), judged
  // under the ingress lock (submit, step and admit alike).
  // `taken` (optional) gets the bars of this batch taken, also when it throws after a piece.
  size_t run(const Bar* bars, size_t n, uint32_t n_registered, std::vector<Signal>& out, bool strict = false,
             uint64_t* taken = nullptr);

  // Streaming mode. submit() validates, sequences and dispatches bars; it returns how many of
  // `n` were taken (rejected bad bars count as taken: they are dead-lettered). With
  // Backpressure::Block it waits for room (a consumer must poll); RejectNew stops at the first
  // bar that does not fit; DropOldest drops the oldest ready, unpolled signals to make room.
  // `timeout_ns` (>= 0) bounds Block's wait, and the wait for another feeder's batch: the bars
  // that fit by then are taken and counted as returned, the rest are not (counted as
  // backpressure rejects; resubmit them).
  size_t submit(const Bar* bars, size_t n, uint32_t n_registered, bool strict = false, int64_t timeout_ns = -1);
  // One bar in; its signal out. Returns 1 with *out set, 0 on timeout (the bar was taken: its
  // signal comes later), -1 when the bar yields no signal (rejected, or no agent follows its
  // stream), -2 when another feeder's batch (a blocked submit, a run) held the feed past
  // `feed_timeout_ns` (>= 0; < 0: no limit): the bar was not taken, counted as a submit's would
  // be (one backpressure event, one rejected bar). The wait for the signal ends by the feed's
  // deadline too. Assumes no other consumer.
  int step(const Bar& bar, uint32_t n_registered, Signal* out, int64_t timeout_ns, bool strict = false,
           int64_t feed_timeout_ns = -1);
  // Up to max_n ready signals in bar order; waits up to timeout_ns (<0: forever) for the first.
  size_t poll(Signal* out, size_t max_n, int64_t timeout_ns);
  void wait_all();  // takes the ingress lock, then wait_idle()
  void close();  // joins all threads; idempotent

  // What run() would reject, without changing any state. reasons[i] = 0 for accepted bars.
  size_t validate(const Bar* bars, size_t n, uint32_t n_registered, uint32_t* reasons);

  // Journal (see journal.hpp). Once opened, every batch's accepted bars are journaled (and
  // committed, synced by the fsync level) before any of them is processed, rejected bars as dead
  // letters, and the hashes of the signals handed out by poll/run/step.
  void open_journal(const std::string& dir, const JournalIdentity& id, const void* meta, size_t meta_n,
                    int fsync_level, uint64_t segment_bytes);
  // Appends an owner-encoded record (Control, Instruments, Event) in order with the bars;
  // durable commits sync by the fsync level. Returns the record's sequence number.
  uint64_t journal_append(RecordType type, const void* data, size_t n, bool durable);
  bool has_journal() const { return journal_ != nullptr; }
  // The journal's counts and, in `error`, why it failed (a write or sync error; empty while it
  // works). After a failure every input is refused with JournalFailure; close_journal throws it
  // if no call has yet.
  JournalStats journal_stats();
  void close_journal();
  // In a child made by fork(): lets go of the journal's files without writing (takes no lock:
  // the parent's threads that may have held one are not in the child).
  void forget_journal_after_fork() {
    if (journal_) journal_->forget_after_fork();
  }

  // Device backends: ingress without the workers. Validates, sequences, journals and
  // dead-letters like submit(), and appends the accepted bars of followed streams to `out`
  // instead of running them; the caller runs them and hands their signals to emit_external
  // in order. Not to be mixed with run/submit/step on the same engine.
  size_t admit(const Bar* bars, size_t n, uint32_t n_registered, std::vector<AdmittedBar>& out, bool strict = false);
  // Signals computed outside: journaled (hashes) and counted like polled ones, with the agent
  // updates, quarantines and busy time that produced them.
  void emit_external(const Signal* s, size_t k, uint64_t updates, uint64_t quarantined, double seconds);
  static int latency_bucket(int64_t ns);  // the latency histogram's bucket of a bar-to-signal time
  // Requires one worker (one bank per stream); throws std::logic_error otherwise.
  DevicePlan device_plan() const;
  const LaneArrays& lane_arrays() const { return lanes_; }
  // Agent state, lane order (after the bars in flight): a device backend's mirror, so that
  // agents() and the other readers see its state.
  void read_state(StateArrays& out);
  void write_state(const StateArrays& in);  // throws std::invalid_argument on a size mismatch

  void agents(AgentRecord* out);  // population order; waits for in-flight bars first
  // Sets the consensus-weight credit of agents (population indices) after the bars in flight;
  // throws std::invalid_argument (nothing changed) for an index out of range or a credit that is
  // not finite and positive.
  // With a journal and `event` non-empty, `event` is journaled (an Event record) under the same
  // lock, so no bar can slip between the record and the change.
  void set_credit(const uint32_t* agents, const double* credit, size_t n, const std::string& event = {});
  // Sets the scores of external-score agents (kind 1; population indices) used from the next
  // update on, like set_credit (journaled `event`, same lock). Throws std::invalid_argument
  // (nothing changed) for an index out of range, an agent that is not kind 1, or a score that
  // is not finite or outside [-1, 1].
  void set_external_scores(const uint32_t* agents, const double* scores, size_t n, const std::string& event = {});
  // DSI microstructure evidence in [-1, 1] per instrument id, read from the next update on by the
  // lanes of every stream of that instrument with w_dsi != 0 (as w_dsi x evidence, added to their
  // blend); between updates and journaled like set_credit. Instruments without a stream are
  // skipped; returns the number of streams updated. Throws std::invalid_argument (nothing
  // changes) for evidence that is not finite or outside [-1, 1].
  size_t set_dsi(const uint32_t* instruments, const double* evidence, size_t n, const std::string& event = {});
  double stream_dsi(uint32_t stream) const { return stream_dsi_[stream]; }
  // Signal flags of a stream's signals (kSignalDsi once set_dsi reached it); read between updates.
  uint32_t stream_flags(uint32_t stream) const { return stream_flags_[stream]; }
  // One generation of evolution on the streams in scope (evolution.hpp), between updates;
  // `event` journaled first like set_credit's. Children take the slots (population indices) of
  // the agents they replace, with new agent ids from max(founding ids) + 1 on.
  // `streams` (indices) sets the scope and the order in which streams are bred, which child
  // ids follow; empty: cfg.stream, or every stream in index order.
  GenerationReport evolve(const EvolutionConfig& cfg, uint64_t seed, uint32_t generation,
                          const std::string& event = {}, const std::vector<uint32_t>& streams = {});
  // Hands a report's births buffer back once read, for the next generation's report (a caller
  // that evolves often then allocates and page-faults no fresh buffer each time). Optional.
  void recycle(GenerationReport& r);
  // The current genomes and lineage, population order (after the bars in flight).
  void genomes(Genome* out);
  void lineage(Lineage* out);
  size_t n_agents() const { return layout_.n_agents; }
  const Layout& layout() const { return layout_; }
  EngineStats stats();
  uint64_t agent_updates() const;
  uint64_t quarantined() const;  // agents quarantined so far (as counted by the workers)
  double worker_busy_seconds() const;  // the busiest worker's time spent running bars
  std::vector<DeadLetter> dead_letters();
  const EngineConfig& config() const { return cfg_; }
  uint32_t block_bars() const { return batch_max_; }
  uint32_t capacity() const { return cap_; }
  int threads() const { return cfg_.threads; }

  // Telemetry snapshots (thread-safe).
  struct SmHealth {
    int32_t owner;
    uint32_t status;
    uint32_t stalls;
    double heartbeat_age_s;
    uint64_t processed;
  };
  std::vector<SmHealth> sm_health() const;
  struct WorkerHealth {
    size_t queue_depth, queue_high_water, sms;
    double heartbeat_age_s;
    bool standby, parked;
    uint64_t agent_updates;
  };
  std::vector<WorkerHealth> worker_health() const;
  // Throws std::logic_error naming `what` when signals of earlier bars are not polled yet.
  void check_drained(const char* what) const;
  size_t in_flight() const;  // claimed, not yet polled
  size_t in_flight_high_water() const { return window_hwm_.load(std::memory_order_relaxed); }
  std::vector<uint64_t> latency_histogram() const;  // kLatencyBuckets counts
  uint64_t failovers() const { return failovers_.load(std::memory_order_relaxed); }
  double uptime_s() const;

  // Counts n bars a feeding call gave up on before taking them (its timeout ran out waiting for
  // another feeder), as take_feed counts its own: one backpressure event, n rejected bars.
  void count_refused(size_t n);

  // Fault injection (only with cfg.fault_injection; throws std::logic_error otherwise).
  // Stalls the group of SM sm for ns; `hold`: the worker sleeps holding the group (claimed).
  void inject_stall(uint32_t sm, int64_t ns, bool hold = false);
  void inject_poison(uint32_t agent);  // population index

  // Called by a blocking submit (or step) about every 100 ms while it waits for room, and by a
  // run waiting for its signals, holding no engine lock but the feed's; by any feeding call
  // waiting for another's batch to end, and by poll and step waiting for a signal, holding
  // none: true ends the call with Interrupted (the bars taken before stay taken and journaled).
  // The bindings check for a pending Python signal (^C), which runs Python's signal handlers
  // (one may close the engine). Set once, before the engine is used.
  void set_interrupt_check(std::function<bool()> f) { interrupted_ = std::move(f); }

 private:
  std::function<bool()> interrupted_;
  struct Slot {
    // tag = position + 1 while the slot holds that position (0 before first use and while
    // ingress refills it). Readers that may race with reuse (only after an SM moved) read tag,
    // stream, sidx, tag like a seqlock; the plain fields are read only for positions not yet
    // complete, which ingress never refills.
    std::atomic<uint64_t> tag{0};
    std::atomic<uint32_t> stream{0};
    std::atomic<uint64_t> sidx{0};  // index of the bar within its stream
    std::atomic<uint32_t> remaining{0};
    std::atomic<uint32_t> ready{0};
    Bar bar{};
    uint64_t seq = 0;
    int64_t t_in = 0;
    Signal sig{};
  };
  struct alignas(kCacheLine) Worker {
    explicit Worker(size_t cap) : ring(cap) {}
    SpscRing<uint64_t> ring;
    std::thread thread;
    std::atomic<uint32_t> wake{0};
    std::atomic<int32_t> sleeping{0};
    std::atomic<int64_t> beat_ns{0};
    std::atomic<uint64_t> updates{0};
    std::atomic<int64_t> busy_ns{0};  // time spent running batches
    int64_t injected_ns = 0;          // worker only: fault-injection stalls within the batch running
    std::atomic<size_t> hwm{0};
    std::atomic<uint32_t> adopt_gen{0};
    std::mutex adopt_m;
    std::vector<uint32_t> adopt;  // groups handed over by the sentinel, guarded by adopt_m
    bool standby = false;
  };
  struct alignas(kCacheLine) StreamRuntime {
    std::atomic<uint64_t> claimed{0};  // bars of this stream claimed by ingress
    std::atomic<uint64_t> workers{0};  // bit per worker owning a group of it
  };
  // SMs [sm_begin, sm_end) of one stream, sharing one bank and run by one worker at a time.
  struct Group {
    uint32_t stream;
    uint32_t sm_begin, sm_end;
    uint32_t lane_begin;  // first lane of its first SM
    uint32_t lanes;
    Bank bank;
  };

  void worker_main(int w);
  uint64_t process_batch(int w, const uint64_t* pos, size_t n);  // returns the lane-updates it ran
  // Runs group g over the positions (all of its stream, increasing); catches up on any bar of
  // the stream between the group's last position and the first one given. Returns false if g is
  // not (or no longer) owned by w. done[k] counts the group-units finished for pos[k].
  bool run_group(int w, uint32_t g, const uint64_t* pos, size_t n, uint32_t* done);
  void injected_sleep(int w, int64_t ns);  // fault injection: sleeps ns (until stop), not busy time
  void catch_up(int w, uint32_t g, uint64_t until_pos);
  bool claim(int w, uint32_t g);  // busy/owner handshake; false if w does not own g
  void release(int w, uint32_t g, uint64_t np, uint64_t updates);
  // Runs g over the bars of its stream it has not run, from its last position to until_pos, on
  // worker w, whose heartbeat it keeps up bar by bar.
  void replay(int w, uint32_t g, uint64_t until_pos, uint64_t& np, int& poison, uint64_t& updates);
  // Runs g over nb <= kUnitBlock bars of its stream, in order, SM by SM: each SM's lanes stay
  // in the nearest cache over the block. Every SM steps through the bars in order, so the
  // results do not depend on nb. `poison` (fault injection, -1 = none) is a lane of the group
  // whose score turns NaN on the first bar.
  static constexpr int kUnitBlock = 32;
  // A block's features at most: a core's L2, read once from the OS (512 KiB when it does not
  // say), within [64 KiB, 2 MiB]. Measured with random populations on a 1 MiB L2 (bench
  // throughput, 2 threads): 100k agents, whose groups have ~24k features (192 KiB a bar), ran
  // 5-8% faster than with a quarter of the L2, which left them bar by bar and so reloaded every
  // SM's lanes each bar; 10k agents ran the same. (An earlier measurement on a 512 KiB L2 had
  // favoured a quarter of it.)
  static size_t unit_block_bytes();
  void units(uint32_t g, const uint64_t* ps, int nb, int poison, uint64_t& updates);
  void form_groups();  // groups, their banks and lanes, and their first owners
  void finish_units(uint64_t p, uint32_t count);
  void fuse(uint64_t p);
  void sentinel_main();
  void move_group(uint32_t g, int from);
  // Whether worker w is fresh at `now`: beat within the stall deadline, or parked with nothing to do.
  bool worker_fresh(int w, int64_t now) const;
  void wake_worker(int w);
  void notify_ready(uint64_t p);
  bool claim_space(std::unique_lock<std::mutex>& ingress);
  // `lk` (the caller's hold on ingress_m_), when given with wait_for_space, makes this a
  // blocking submit: the batch goes in pieces that fit the room in the window, each journaled
  // and taken before the next, and ingress_m_ is released while it waits for room (readers and
  // changes go on meanwhile and land between two pieces; other feeders wait on feed_m_).
  // `deadline` (steady-clock ns, < 0: none) bounds a blocking submit's wait: what fits by then
  // is taken and the count returned.
  size_t ingest(const Bar* bars, size_t n, uint32_t n_registered, bool wait_for_space,
                std::vector<Signal>* drain_to, std::vector<AdmittedBar>* admitted = nullptr,
                std::unique_lock<std::mutex>* lk = nullptr, int64_t deadline = -1);
  // Journals bars[0, n) (unless `validated`, checking them first) and takes them, in pieces
  // when it may wait for room (see engine.cpp; `lk`: a blocking feeder's ingress lock, released
  // while it waits); `row0` is the first bar's row in the caller's batch (dead letters name it).
  // Returns how many were taken: all n, unless a blocking feeder's `deadline` passed first.
  size_t take(const Bar* bars, size_t n, uint32_t n_registered, bool validated, std::vector<Signal>* drain_to,
              std::vector<AdmittedBar>* admitted, size_t row0, std::unique_lock<std::mutex>* lk = nullptr,
              int64_t deadline = -1, bool drop = false);
  // take() for a batch of bars that all fit the room the window has now (journaled, then taken).
  void take_piece(const Bar* bars, size_t n, uint32_t n_registered, bool validated, std::vector<Signal>* drain_to,
                  std::vector<AdmittedBar>* admitted, size_t row0);
  // With ingress held, makes `want` slots free in the window: a blocking feeder (`lk`) waits
  // with ingress released, run() drains signals into drain_to, drop_oldest drops the oldest
  // ready ones (counted). Throws once the engine stops. False when a blocking feeder's
  // `deadline` (steady-clock ns, < 0: none) passed first.
  // `drop` (a drop_oldest submit): drops the oldest ready signals, and when none is ready waits
  // for the oldest bar in flight (wait_oldest), up to `deadline`, with ingress released when `lk`
  // is given.
  bool make_room(uint64_t want, std::vector<Signal>* drain_to, std::unique_lock<std::mutex>* lk,
                 int64_t deadline = -1, bool drop = false);
  // drop_oldest's wait: until the oldest bar in flight is ready (or none is in flight), 100 ms
  // or `deadline`, whichever comes first; releases `lk` (ingress) meanwhile when given.
  void wait_oldest(std::unique_lock<std::mutex>* lk, int64_t deadline);
  // Free slots in the window of bars in flight (ingress held: it only grows meanwhile).
  uint64_t window_room() const {
    return cap_ - (head_.load(std::memory_order_relaxed) - tail_.load(std::memory_order_acquire));
  }
  // Releases ingress (`lk`) until the window has `want` free slots (up to 100 ms, or until
  // `deadline`, steady-clock ns, when sooner) or the engine stops (then throws).
  void wait_for_room(std::unique_lock<std::mutex>& lk, uint64_t want, int64_t deadline = -1);
  std::unique_lock<std::mutex> lock_ingress() { return std::unique_lock<std::mutex>(ingress_m_); }
  // A feeding call's turn (feed_m_), waited for until `deadline` (now_ns() clock; < 0: no limit).
  // False when another feeder's batch held it past that: the n bars are not taken and are
  // counted as a blocking submit's unplaced rest (one backpressure event, n rejected). A long
  // wait ends with Interrupted when the interrupt check says so (^C), or std::logic_error once
  // the engine closes; nothing is taken or counted then.
  // own: the name of a call returning its own bars' signals (run, step), which fails at once
  // (check_drained) behind a submit waiting for a consumer's room.
  bool take_feed(std::unique_lock<std::timed_mutex>& feed, int64_t deadline, size_t n,
                 const char* own = nullptr);
  size_t drain(Signal* out, size_t max_n);
  size_t validate_locked(const Bar* bars, size_t n, uint32_t n_registered, uint32_t* reasons);
  // Caller holds ingress_m_: throws StrictRefusal when any bar of the batch is bad.
  void refuse_bad_locked(const Bar* bars, size_t n, uint32_t n_registered);
  void journal_inputs(const Bar* bars, size_t n, uint32_t n_registered, bool validated);
  void journal_signals(const Signal* s, size_t k);
  // Drains up to max_n ready signals; if none is ready, waits up to timeout_ns until the next
  // min_n bars in flight (all of them, if fewer) are ready, then drains. `eg` holds egress_m_.
  // `interruptible`: the interrupt check (^C) ends a wait that slept, before anything is
  // drained (Interrupted); only for callers that can stop there (poll, step, a run's drains).
  // The check runs Python's signal handlers, so `eg` is let go for it.
  size_t wait_and_drain(std::unique_lock<std::mutex>& eg, Signal* out, size_t max_n, int64_t timeout_ns,
                        size_t min_n = 1, bool interruptible = false);
  // run()'s drain: waits a slice for drain_batch() signals (egress lock held), appends them to out.
  void drain_into(std::vector<Signal>& out, bool interruptible = true);
  // Signals run() waits for at a time once the window is full: a quarter of it, at most 256.
  size_t drain_batch() const { return std::max<size_t>(1, std::min<size_t>(256, cap_ / 4)); }
  void wait_idle();  // every claimed bar processed by all its SMs; caller holds ingress_m_
  bool read_slot(uint64_t q, uint32_t& stream, uint64_t& sidx);
  // The next batch size of a worker whose last batch of n bars took busy_ns (ns_per_bar: its
  // running estimate): about a quarter of the stall deadline, 1 to batch_max_ bars.
  uint32_t next_batch(uint64_t lane_bars, int64_t busy_ns, double& ns_per_lane) const;
  void dead_letter(const Bar& b, uint64_t index, Reason r);
  const Stream* find_stream(uint32_t instrument, uint32_t timeframe) const;
  // Writes per-agent lane values (validated by the caller) between updates, journaling `event`
  // under the same lock: the shared body of set_credit and set_external_scores.
  void set_lane_values(std::vector<double>& dst, const uint32_t* agents, const double* values, size_t n,
                       const std::string& event);
  // Journals an owner-encoded event and commits it durably; the caller holds ingress_m_.
  void journal_event_locked(const std::string& event);
  Slot& slot(uint64_t p) { return slots_[p & (cap_ - 1)]; }
  Summary* summaries(uint64_t p) { return summ_.get() + (p & (cap_ - 1)) * max_sms_; }

  EngineConfig cfg_;
  Layout layout_;
  LaneArrays lanes_;
  StateArrays state_;
  // Per lane (an SM's lanes are contiguous, so a generation touches memory SM by SM): the
  // genome as evolved, its lineage and agent id (masked lanes: zero / UINT32_MAX).
  std::vector<Genome> lane_genome_;
  std::vector<Lineage> lane_lineage_;
  std::vector<uint32_t> lane_id_;
  std::vector<std::vector<int32_t>> sm_fmap_;  // per SM: its feature index -> its group bank's
  std::vector<SmLattice> lattice_;  // per SM, built at the first generation, with:
  // per lane: the first stream bar its agent may be judged at, max(birth bar, lookback)
  // (INT64_MAX: never, a padding lane or an external agent)
  std::vector<int64_t> lane_judge_from_;
  std::vector<std::array<int16_t, kFeatures>> lane_rank_;  // per lane: lattice rank of each used feature, -1
  std::vector<int8_t> lane_style_;  // per lane: dominant feature (-1: none)
  std::vector<std::array<int64_t, kFeatures + 1>> styles_;  // per stream: agents per dominant feature, all
  std::vector<double> fit_;  // scratch: fitness per lane of the last generation
  EvolutionScratch evo_;     // scratch of a generation
  std::vector<Birth> births_spare_;  // a report's births buffer handed back (recycle)
  std::vector<double> stream_dsi_;      // per stream: the DSI evidence last set (set_dsi), 0 before
  std::vector<uint32_t> stream_flags_;  // per stream: Signal::flags of its signals (kSignalDsi)
  uint32_t next_id_ = 0;
  std::unordered_map<uint64_t, uint32_t> stream_of_;
  static constexpr uint32_t kMaxBatch = 256;
  uint32_t batch_ = 0;      // a worker's first batch size
  double lanes_per_bar_ = 0;  // lanes a worker runs for a bar of the largest stream (its share)
  uint32_t batch_max_ = 0;  // the most bars a worker takes per batch
  uint32_t cap_ = 0;
  uint32_t max_sms_ = 1;
  int n_workers_ = 0;  // live workers + standby
  bool faults_ = false;
  std::chrono::steady_clock::time_point t0_;

  std::unique_ptr<Slot[]> slots_;
  std::unique_ptr<Summary[]> summ_;  // cap_ x max_sms_, by position
  std::vector<Group> groups_;
  std::vector<uint32_t> group_of_;       // group of each SM
  std::vector<uint32_t> stream_groups_;  // groups of stream s: [stream_groups_[s], stream_groups_[s + 1])
  std::unique_ptr<GroupRuntime[]> grt_;
  std::unique_ptr<StreamRuntime[]> strt_;
  std::vector<std::unique_ptr<Worker>> workers_;
  std::atomic<uint64_t> signals_out_{0};

  // feeders (submit, step, run, admit) one at a time, each batch contiguous; taken before ingress_m_
  // (timed: a submit with a timeout waits for another feeder's batch no longer than that)
  std::timed_mutex feed_m_;
  std::atomic<bool> feeder_waits_for_room_{false};  // the feed's holder waits for a consumer (make_room)
  // ingress (guarded by ingress_m_)
  std::mutex ingress_m_;
  EngineStats stats_;
  uint64_t seq_ = 0;
  std::vector<DeadLetter> dead_;
  size_t dead_head_ = 0;
  alignas(kCacheLine) std::atomic<uint64_t> head_{0};  // next position to claim
  // egress (guarded by egress_m_; a poll waits for another consumer's poll no longer than its
  // own timeout)
  std::mutex egress_m_;
  alignas(kCacheLine) std::atomic<uint64_t> tail_{0};  // next position to hand out
  std::atomic<size_t> window_hwm_{0};

  // waiting: consumers for ready signals, ingress for room
  std::mutex wait_m_;
  std::condition_variable ready_cv_, space_cv_;
  std::atomic<int32_t> ready_waiters_{0}, space_waiters_{0};
  std::atomic<uint64_t> wake_pos_{0};  // the position the waiting consumer waits for

  std::atomic<uint64_t> latency_[kLatencyBuckets] = {};
  std::atomic<uint64_t> failovers_{0};
  std::atomic<uint64_t> ext_updates_{0}, ext_quarantined_{0};  // emit_external
  std::atomic<bool> stop_{false};
  // Set while a between-updates operation (a generation) holds the ingress lock with every bar
  // done: idle workers park at once instead of spinning on the cores it runs on.
  std::atomic<bool> park_{false};
  std::thread sentinel_;
  std::mutex sentinel_m_;
  std::condition_variable sentinel_cv_;
  bool closed_ = false;

  // journal: the writer is used under ingress_m_ (inputs, control) and egress_m_ (signal
  // hashes); journal_m_ serialises the two.
  std::mutex journal_m_;
  std::unique_ptr<JournalWriter> journal_;
  bool journal_failure_told_ = false;  // a JournalFailure has reached a caller
  template <class F>
  void journal_reported(F&& write);
  std::vector<uint32_t> j_reasons_;   // ingress only
  std::vector<Bar> j_bars_;           // ingress only
  std::vector<char> j_dead_;          // ingress only
  size_t j_first_ = 0;                // ingress only: index of the batch's first accepted bar
  std::vector<uint64_t> j_hashes_;    // egress only
};

}  // namespace dynamic_core
