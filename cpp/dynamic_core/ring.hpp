// Bounded single-producer single-consumer ring, after rigtorp/SPSCQueue: the two indices live on
// their own cache lines, and each side keeps a cached copy of the other side's index so that the
// shared line is read only when the cached value says the ring looks full (producer) or empty
// (consumer). One slot is left unused to tell full from empty.
//
// Bulk variants (try_push_n / try_pop_n) move up to n elements with one index load and one index
// store: between two cores the per-element cost is dominated by the index and slot cache lines
// changing hands, and a batch pays for that once (bench/bench_runtime.py measures both).
#pragma once
#include <algorithm>
#include <atomic>
#include <cstddef>
#include <memory>
#include <new>
#include <stdexcept>
#include <thread>
#include <type_traits>

namespace dynamic_core {

inline constexpr size_t kCacheLine = 64;

// A spin-wait hint to the core (a no-op where there is none).
inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

template <class T>
class SpscRing {
  static_assert(std::is_trivially_copyable_v<T>, "ring elements are copied with plain stores");
  static_assert(std::is_nothrow_default_constructible_v<T>);

 public:
  explicit SpscRing(size_t capacity) : cap_(capacity + 1), slots_(new T[capacity + 1]) {
    if (capacity < 1) throw std::invalid_argument("SpscRing capacity must be >= 1");
  }
  SpscRing(const SpscRing&) = delete;
  SpscRing& operator=(const SpscRing&) = delete;

  // Producer side.
  [[nodiscard]] bool try_push(const T& v) noexcept {
    // relaxed: only the producer writes write_.
    const size_t w = write_.load(std::memory_order_relaxed);
    const size_t next = w + 1 == cap_ ? 0 : w + 1;
    if (next == read_cache_) {
      // acquire: the consumer's release store of read_ orders its read of the slot we reuse.
      read_cache_ = read_.load(std::memory_order_acquire);
      if (next == read_cache_) return false;
    }
    slots_[w] = v;
    // release: publishes the slot contents before the new index.
    write_.store(next, std::memory_order_release);
    return true;
  }
  // Pushes the first k <= n elements of v and returns k (0 when full); what is not pushed is left
  // to the caller. All k become visible to the consumer together.
  [[nodiscard]] size_t try_push_n(const T* v, size_t n) noexcept {
    // relaxed: only the producer writes write_.
    const size_t w = write_.load(std::memory_order_relaxed);
    size_t room = free_slots(w, read_cache_);
    if (room < n) {
      // acquire: as in try_push, the consumer is done reading every slot it has released.
      read_cache_ = read_.load(std::memory_order_acquire);
      room = free_slots(w, read_cache_);
    }
    n = std::min(n, room);
    if (n == 0) return 0;
    const size_t first = std::min(n, cap_ - w);
    std::copy_n(v, first, &slots_[w]);
    std::copy_n(v + first, n - first, &slots_[0]);
    // release: publishes all n slots before the new index.
    write_.store(w + n >= cap_ ? w + n - cap_ : w + n, std::memory_order_release);
    return n;
  }
  // Blocking variants: spin with a pause hint, yielding the CPU now and then.
  void push(const T& v) noexcept {
    for (unsigned k = 1; !try_push(v); ++k) backoff(k);
  }

  // Consumer side.
  [[nodiscard]] bool try_pop(T& out) noexcept {
    // relaxed: only the consumer writes read_.
    const size_t r = read_.load(std::memory_order_relaxed);
    if (r == write_cache_) {
      // acquire: pairs with the producer's release store; the slot contents are visible.
      write_cache_ = write_.load(std::memory_order_acquire);
      if (r == write_cache_) return false;
    }
    out = slots_[r];
    // release: the slot is read before the producer may overwrite it.
    read_.store(r + 1 == cap_ ? 0 : r + 1, std::memory_order_release);
    return true;
  }
  // Pops up to max elements into out, oldest first; returns how many (0 when empty).
  [[nodiscard]] size_t try_pop_n(T* out, size_t max) noexcept {
    // relaxed: only the consumer writes read_.
    const size_t r = read_.load(std::memory_order_relaxed);
    size_t avail = used_slots(write_cache_, r);
    if (avail < max) {
      // acquire: pairs with the producer's release store; the slot contents are visible.
      write_cache_ = write_.load(std::memory_order_acquire);
      avail = used_slots(write_cache_, r);
    }
    const size_t n = std::min(max, avail);
    if (n == 0) return 0;
    const size_t first = std::min(n, cap_ - r);
    std::copy_n(&slots_[r], first, out);
    std::copy_n(&slots_[0], n - first, out + first);
    // release: the slots are read before the producer may overwrite them.
    read_.store(r + n >= cap_ ? r + n - cap_ : r + n, std::memory_order_release);
    return n;
  }
  T pop() noexcept {
    T v;
    for (unsigned k = 1; !try_pop(v); ++k) backoff(k);
    return v;
  }

  // Approximate from either side (exact when the other side is idle).
  size_t size() const noexcept {
    // acquire on both: a consistent-enough snapshot for telemetry; never used for correctness.
    const size_t w = write_.load(std::memory_order_acquire);
    const size_t r = read_.load(std::memory_order_acquire);
    return used_slots(w, r);
  }
  bool empty() const noexcept { return size() == 0; }
  size_t capacity() const noexcept { return cap_ - 1; }

 private:
  size_t used_slots(size_t w, size_t r) const noexcept { return w >= r ? w - r : w + cap_ - r; }
  size_t free_slots(size_t w, size_t r) const noexcept { return cap_ - 1 - used_slots(w, r); }
  static void backoff(unsigned k) noexcept {
    if (k % 64 == 0) {
      std::this_thread::yield();
    } else {
      cpu_relax();
    }
  }

  const size_t cap_;
  const std::unique_ptr<T[]> slots_;
  alignas(kCacheLine) std::atomic<size_t> write_{0};
  alignas(kCacheLine) size_t read_cache_ = 0;  // producer's copy of read_
  alignas(kCacheLine) std::atomic<size_t> read_{0};
  alignas(kCacheLine) size_t write_cache_ = 0;  // consumer's copy of write_
  char pad_[kCacheLine - sizeof(size_t)];

  static_assert(std::atomic<size_t>::is_always_lock_free);
};

}  // namespace dynamic_core
