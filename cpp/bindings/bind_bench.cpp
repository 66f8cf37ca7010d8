// Microbenchmarks that need native threads (used by bench/bench_runtime.py).
#include <algorithm>
#include <chrono>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "../dynamic_core/journal.hpp"
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

}  // namespace

void bind_bench(py::module_& m) {
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
