// SPSC ring: layout, single-thread semantics, and a two-thread fuzz test with a fixed seed
// (every value arrives once, in order). Also run under ThreadSanitizer in CI.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <random>
#include <thread>

#include "check.hpp"
#include "dynamic_core/ring.hpp"

using namespace dynamic_core;

int main() {
  {
    SpscRing<uint64_t> r(3);
    CHECK_EQ(r.capacity(), 3u);
    uint64_t v = 0;
    CHECK(!r.try_pop(v));
    CHECK(r.try_push(1) && r.try_push(2) && r.try_push(3));
    CHECK(!r.try_push(4));  // full
    CHECK_EQ(r.size(), 3u);
    CHECK(r.try_pop(v) && v == 1);
    CHECK(r.try_push(4));
    CHECK(r.try_pop(v) && v == 2);
    CHECK(r.try_pop(v) && v == 3);
    CHECK(r.try_pop(v) && v == 4);
    CHECK(!r.try_pop(v));
    CHECK(r.empty());
  }
  {  // bulk variants, across the wrap
    SpscRing<uint64_t> r(5);
    const uint64_t in[7] = {10, 11, 12, 13, 14, 15, 16};
    uint64_t out[8] = {};
    CHECK_EQ(r.try_pop_n(out, 8), 0u);
    CHECK_EQ(r.try_push_n(in, 3), 3u);
    CHECK_EQ(r.try_pop_n(out, 2), 2u);
    CHECK(out[0] == 10 && out[1] == 11);
    CHECK_EQ(r.try_push_n(in + 3, 4), 4u);  // 12 13 14 15 16 (wraps the storage)
    CHECK_EQ(r.try_push_n(in, 7), 0u);      // full: nothing taken
    CHECK_EQ(r.size(), 5u);
    uint64_t v = 0;
    CHECK(r.try_pop(v) && v == 12);
    CHECK_EQ(r.try_push_n(in, 7), 1u);  // room for one only
    CHECK_EQ(r.try_pop_n(out, 8), 5u);
    CHECK(out[0] == 13 && out[1] == 14 && out[2] == 15 && out[3] == 16 && out[4] == 10);
    CHECK(r.empty());
    CHECK_EQ(r.try_push_n(in, 0), 0u);
    CHECK_EQ(r.try_pop_n(out, 0), 0u);
  }
  for (size_t cap : {1u, 2u, 7u, 64u, 1000u}) {
    SpscRing<uint64_t> r(cap);
    const uint64_t n = 200000;
    std::thread producer([&] {
      std::mt19937_64 rng(42 + cap);
      uint64_t next = 0;
      while (next < n) {
        const uint64_t burst = 1 + rng() % 17;
        if (rng() % 4 == 0) {  // bulk: a run of consecutive values, maybe only partly taken
          uint64_t run[17];
          const uint64_t m = std::min<uint64_t>(burst, n - next);
          for (uint64_t k = 0; k < m; ++k) run[k] = next + k;
          next += r.try_push_n(run, m);
          continue;
        }
        for (uint64_t k = 0; k < burst && next < n; ++k) {
          if (rng() % 3 == 0) {
            r.push(next++);  // blocking variant
          } else if (r.try_push(next)) {
            ++next;
          }
        }
        if (rng() % 64 == 0) std::this_thread::yield();
      }
    });
    std::mt19937_64 rng(7 + cap);
    uint64_t expect = 0, bad = 0;
    while (expect < n) {
      uint64_t v;
      if (rng() % 5 == 0) {  // bulk
        uint64_t run[23];
        const size_t m = r.try_pop_n(run, 1 + rng() % 23);
        for (size_t k = 0; k < m; ++k) bad += run[k] != expect++;
        continue;
      }
      if (rng() % 4 == 0) {
        v = r.pop();
      } else if (!r.try_pop(v)) {
        continue;
      }
      bad += v != expect;
      ++expect;
    }
    producer.join();
    CHECK_EQ(bad, 0u);
    CHECK(r.empty());
  }
  return finish("ring");
}
