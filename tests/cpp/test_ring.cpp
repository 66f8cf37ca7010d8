// SPSC ring: layout, single-thread semantics, and a two-thread fuzz test with a fixed seed
// (every value arrives once, in order). Also run under ThreadSanitizer in CI.
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
  for (size_t cap : {1u, 2u, 7u, 64u, 1000u}) {
    SpscRing<uint64_t> r(cap);
    const uint64_t n = 200000;
    std::thread producer([&] {
      std::mt19937_64 rng(42 + cap);
      uint64_t next = 0;
      while (next < n) {
        const uint64_t burst = 1 + rng() % 17;
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
