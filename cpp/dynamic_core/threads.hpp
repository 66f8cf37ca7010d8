// A few threads for a parallel pass (evolution's phases, the LoRA bindings' row ranges).
#pragma once

#include <exception>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

namespace dynamic_core {

// body(t) on `threads` threads (t: the thread's index; the caller is thread 0), as many as can
// be started (their count is passed to `started` before thread 0 runs its body); `stop` is
// called when a body throws. The first exception is rethrown once all have joined.
template <class B, class S, class N = void (*)(int)>
void run_threads(int threads, B&& body, S&& stop, N&& started = [](int) {}) {
  std::exception_ptr error;
  std::mutex error_m;
  auto guarded = [&](int t) {
    try {
      body(t);
    } catch (...) {
      std::lock_guard<std::mutex> g(error_m);
      if (!error) error = std::current_exception();
      stop();
    }
  };
  std::vector<std::thread> extra;
  extra.reserve(static_cast<size_t>(threads - 1));
  try {
    for (int t = 1; t < threads; ++t) extra.emplace_back(guarded, t);
  } catch (const std::system_error&) {
    // no more threads to be had: those started and this one share the work
  }
  started(static_cast<int>(extra.size()) + 1);
  guarded(0);
  for (std::thread& th : extra) th.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace dynamic_core
