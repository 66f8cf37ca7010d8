// Microbenchmarks that need native code (used by bench/bench_runtime.py): the SPSC ring between
// two threads, the journal's append, and the lane kernel alone.
#include <algorithm>
#include <chrono>
#include <deque>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "../dynamic_core/journal.hpp"
#include "../dynamic_core/kernel.hpp"
#include "../dynamic_core/population.hpp"
#include "../dynamic_core/ring.hpp"
#include "common.hpp"

namespace dynamic_core::bindings {

namespace {

// ns per element moved from a producer thread to a consumer thread: produce() sends the values
// 1..n, consume() takes n values and returns their sum (checked: nothing lost).
template <class Produce, class Consume>
double timed_transfer(uint64_t n, Produce produce, Consume consume) {
  const auto t0 = std::chrono::steady_clock::now();
  std::thread producer(produce);
  const uint64_t sum = consume();
  producer.join();
  const double dt = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
  if (sum != n * (n + 1) / 2) throw std::runtime_error("ring benchmark lost elements");
  return dt / static_cast<double>(n);
}

// One element per call.
template <class Push, class Pop>
double transfer_ns(uint64_t n, Push push, Pop pop) {
  return timed_transfer(
      n, [&] { for (uint64_t i = 1; i <= n; ++i) push(i); },
      [&] {
        uint64_t sum = 0;
        for (uint64_t k = 0; k < n; ++k) sum += pop();
        return sum;
      });
}

// The bulk calls: the producer offers runs of `batch` consecutive values (keeping what the ring
// did not take), the consumer takes up to `batch` at a time.
double bulk_transfer_ns(uint64_t n, size_t batch, SpscRing<uint64_t>& r) {
  return timed_transfer(
      n,
      [&] {
        std::vector<uint64_t> run(batch);
        for (uint64_t next = 1; next <= n;) {
          const size_t m = static_cast<size_t>(std::min<uint64_t>(batch, n - next + 1));
          for (size_t j = 0; j < m; ++j) run[j] = next + j;
          for (size_t done = 0; done < m;) {
            const size_t k = r.try_push_n(run.data() + done, m - done);
            done += k;
            if (k == 0) cpu_relax();
          }
          next += m;
        }
      },
      [&] {
        std::vector<uint64_t> out(batch);
        uint64_t sum = 0;
        for (uint64_t got = 0; got < n;) {
          const size_t k = r.try_pop_n(out.data(), batch);
          for (size_t j = 0; j < k; ++j) sum += out[j];
          got += k;
          if (k == 0) cpu_relax();
        }
        return sum;
      });
}

// The lane kernel alone (sm_step, the kernel Engine runs): `sms` SMs of 128 lanes with random
// weights, feature indices into a row of `features` values, entries and costs, stepped over
// `bars` bars whose feature rows cycle through `rows` precomputed ones (1: the same row, as
// warm in cache as the row a bank update has just written). No bank update, ingress,
// consensus or signal: what is left is the kernel's own time per lane-update, the ceiling on
// what a worker thread can reach. Returns ns per lane-update and a checksum of the summaries.
struct KernelLanes {
  LaneArrays lanes;
  StateArrays state;
  KernelLanes(size_t n, int features, std::mt19937_64& rng) {
    std::uniform_real_distribution<double> u(-1.0, 1.0);
    for (int f = 0; f < kFeatures; ++f) {
      lanes.w[f].resize(n);
      lanes.fidx[f].resize(n);
      for (size_t i = 0; i < n; ++i) {
        lanes.w[f][i] = u(rng);
        lanes.fidx[f][i] = 1 + static_cast<int32_t>(rng() % static_cast<uint64_t>(features - 1));  // 0: the constant
      }
    }
    lanes.entry.resize(n);
    for (double& x : lanes.entry) x = 0.05 + 0.3 * (u(rng) + 1.0) / 2.0;
    lanes.cost.assign(n, 1e-4);
    lanes.lookback.assign(n, 0);
    lanes.long_short.resize(n);
    for (int32_t& x : lanes.long_short) x = static_cast<int32_t>(rng() & 1);
    lanes.active.assign(n, 1);
    lanes.external.assign(n, 0);
    state.init(n);
  }
  LaneView view(size_t o) { return lane_view(lanes, state, o); }
};

}  // namespace

void bind_bench(py::module_& m) {
  m.def("kernel_bench", [](uint32_t sms, int features, uint32_t bars, uint32_t rows, uint64_t seed) {
        if (sms < 1 || sms > 65536) throw py::value_error("sms must be in [1, 65536]");
        if (features < 2 || features > (1 << 24)) throw py::value_error("features must be in [2, 2^24]");
        if (bars < 1 || rows < 1 || rows > 4096) throw py::value_error("bars must be >= 1 and rows in [1, 4096]");
        constexpr int kLanes = kMaxSmLanes;
        const uint32_t kRows = rows;
        double ns = 0.0, check = 0.0;
        uint64_t updates = 0, quarantined = 0;
        without_gil([&] {
          std::mt19937_64 rng(seed);
          std::uniform_real_distribution<double> u(-0.5, 0.5);
          KernelLanes lanes(static_cast<size_t>(sms) * kLanes, features, rng);
          std::vector<double> feats(static_cast<size_t>(kRows) * static_cast<size_t>(features));
          for (double& x : feats) x = u(rng);
          std::vector<LaneView> views;
          for (uint32_t s = 0; s < sms; ++s) views.push_back(lanes.view(static_cast<size_t>(s) * kLanes));
          for (uint32_t r = 0; r < kRows; ++r) feats[static_cast<size_t>(r) * features] = 0.0;  // the constant feature
          const auto t0 = std::chrono::steady_clock::now();
          for (uint32_t b = 0; b < bars; ++b) {
            const double* feat = feats.data() + static_cast<size_t>(b % kRows) * features;
            const double ret = 0.002 * feat[1];
            for (uint32_t s = 0; s < sms; ++s)
              check += sm_step(views[s], kLanes, feat, static_cast<int32_t>(b), ret, -1, updates, quarantined).sum_w;
          }
          ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
        });
        py::dict d;
        d["ns_per_lane_update"] = ns / (static_cast<double>(bars) * sms * kLanes);
        d["lane_updates"] = updates;
        d["isa"] = kernel_isa();
        d["checksum"] = check;
        return d;
      },
      py::arg("sms") = 1, py::arg("features") = 300, py::arg("bars") = 100000, py::arg("rows") = 1, py::arg("seed") = 1,
      "The lane kernel alone over `sms` SMs of 128 synthetic lanes reading `features` features: "
      "ns per lane-update (no bank, ingress or consensus).");
  m.def("journal_bench", [](const std::string& dir, uint64_t n, size_t payload, int fsync_level, uint64_t batch) {
        std::vector<char> data(payload, 'x');
        double secs = 0.0;
        JournalStats st;
        without_gil([&] {
          JournalIdentity id;
          JournalWriter w(dir, id, nullptr, 0, fsync_level, 64ull << 20);
          const auto t0 = std::chrono::steady_clock::now();
          for (uint64_t i = 1; i <= n; ++i) {
            w.append(RecordType::Event, data.data(), data.size());
            if (i % batch == 0) w.commit(true);
          }
          w.commit(true);
          secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
          st = w.stats();
        });
        py::dict d;
        d["seconds"] = secs;
        d["records"] = n;
        d["syncs"] = st.syncs;
        d["bytes"] = st.bytes;
        return d;
      }, py::arg("dir"), py::arg("n"), py::arg("payload"), py::arg("fsync_level"), py::arg("batch"),
      "Append n records of `payload` bytes to a new journal in dir, committing (and syncing by "
      "fsync_level) every `batch` records; seconds taken.");
  m.def("ring_bench", [](uint64_t n, size_t capacity, size_t batch) {
        if (batch < 1 || capacity < 1) throw py::value_error("batch and capacity must be >= 1");
        batch = std::min(batch, capacity);  // a run is never longer than the ring
        py::dict d;
        double ring = 0.0, bulk = 0.0, locked = 0.0, locked_bulk = 0.0;
        without_gil([&] {
          SpscRing<uint64_t> r(capacity);
          ring = transfer_ns(n, [&](uint64_t v) { r.push(v); }, [&] { return r.pop(); });
          // the same n values in runs of `batch`: one try_push_n / try_pop_n per run
          SpscRing<uint64_t> rb(capacity);
          bulk = bulk_transfer_ns(n, batch, rb);
          std::mutex mu;
          std::deque<uint64_t> q;
          locked = transfer_ns(
              n,
              [&](uint64_t v) {
                while (true) {
                  {
                    std::lock_guard<std::mutex> lk(mu);
                    if (q.size() < capacity) {
                      q.push_back(v);
                      return;
                    }
                  }
                  std::this_thread::yield();
                }
              },
              [&] {
                while (true) {
                  {
                    std::lock_guard<std::mutex> lk(mu);
                    if (!q.empty()) {
                      const uint64_t v = q.front();
                      q.pop_front();
                      return v;
                    }
                  }
                  std::this_thread::yield();
                }
              });
          // the deque in runs too (the peer of the ring's runs): up to `batch` values a lock
          q.clear();
          locked_bulk = timed_transfer(
              n,
              [&] {
                for (uint64_t next = 1; next <= n;) {
                  {
                    std::lock_guard<std::mutex> lk(mu);
                    const uint64_t room = capacity - q.size();
                    const uint64_t m = std::min<uint64_t>({static_cast<uint64_t>(batch), n - next + 1, room});
                    for (uint64_t j = 0; j < m; ++j) q.push_back(next + j);
                    next += m;
                    if (m) continue;
                  }
                  std::this_thread::yield();
                }
              },
              [&] {
                uint64_t sum = 0;
                for (uint64_t got = 0; got < n;) {
                  size_t k = 0;
                  {
                    std::lock_guard<std::mutex> lk(mu);
                    for (; k < batch && !q.empty(); ++k) {
                      sum += q.front();
                      q.pop_front();
                    }
                  }
                  got += k;
                  if (k == 0) std::this_thread::yield();
                }
                return sum;
              });
        });
        d["spsc_ring_ns"] = ring;
        d["spsc_ring_bulk_ns"] = bulk;
        d["locked_deque_ns"] = locked;
        d["locked_deque_bulk_ns"] = locked_bulk;
        return d;
      }, py::arg("n"), py::arg("capacity") = 4096, py::arg("batch") = 64,
      "ns per element moved between two threads: SpscRing one element per push/pop, SpscRing in "
      "runs of `batch` (try_push_n/try_pop_n), and a mutex-guarded std::deque, one element a lock "
      "and in runs of `batch` a lock.");
}

}  // namespace dynamic_core::bindings
