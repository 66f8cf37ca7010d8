// Helpers shared by the bind_<component>.cpp files.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <exception>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace dynamic_core::bindings {
namespace py = pybind11;

void bind_records(py::module_& m);
void bind_indicators(py::module_& m);
void bind_engine(py::module_& m);
void bind_bench(py::module_& m);
void bind_journal(py::module_& m);
void bind_lora(py::module_& m);
}  // namespace dynamic_core::bindings
namespace dynamic_core {
class Engine;
}
namespace dynamic_core::bindings {
// The thread that runs the interpreter's exit (dynamic_core registers _core._exiting with
// atexit), once it has begun.
inline std::atomic<bool> g_exiting{false};
inline std::atomic<std::thread::id> g_exiting_thread{};

inline bool interpreter_finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing() != 0;
#else
  return _Py_IsFinalizing() != 0;
#endif
}

// Releases the GIL for the scope, like py::gil_scoped_release, for threads the interpreter may
// abandon. A daemon thread that comes back from native work once the interpreter finalizes is
// ended by CPython with pthread_exit (a forced unwind) from PyEval_RestoreThread; out of a
// noexcept destructor (py::gil_scoped_release's) that unwind aborts the whole process in
// std::terminate. Here such a thread does not touch Python again: it sleeps until the process
// ends (what CPython 3.14 does with daemon threads). One that reaches PyEval_RestoreThread just
// before finalization begins may still be ended there: the destructor lets that unwind through,
// which is safe only when no other exception is propagating (then it would std::terminate too):
// so the bindings release the GIL only through without_gil below, never with a bare GilRelease.
class GilRelease {
 public:
  GilRelease() : state_(PyEval_SaveThread()) {}
  GilRelease(const GilRelease&) = delete;
  GilRelease& operator=(const GilRelease&) = delete;
  ~GilRelease() noexcept(false) {
    if (g_exiting.load(std::memory_order_acquire) && g_exiting_thread.load() != std::this_thread::get_id() &&
        interpreter_finalizing())
      for (;;) std::this_thread::sleep_for(std::chrono::hours(1));
    PyEval_RestoreThread(state_);
  }

 private:
  PyThreadState* state_;
};

// f() with the GIL released; what it returns. An exception from f is caught there and rethrown
// once the GIL is back, so the GIL is never taken while one propagates: a daemon thread that
// CPython ends in PyEval_RestoreThread (the interpreter began to finalize while it waited for
// the GIL, e.g. a blocked submit woken by the close() of an engine at exit) then unwinds cleanly
// instead of aborting the process with "terminate called without an active exception".
template <class F>
auto without_gil(F&& f) {
  using R = std::invoke_result_t<F&>;
  std::exception_ptr err;
  if constexpr (std::is_void_v<R>) {
    {
      GilRelease nogil;
      try {
        f();
      } catch (...) {
        err = std::current_exception();
      }
    }
    if (err) std::rethrow_exception(err);
  } else {
    std::optional<R> r;
    {
      GilRelease nogil;
      try {
        r.emplace(f());
      } catch (...) {
        err = std::current_exception();
      }
    }
    if (err) std::rethrow_exception(err);
    return std::move(*r);
  }
}

// The engine's journal methods (bind_journal.cpp), added by bind_engine.
void bind_engine_journal(py::class_<Engine>& e);

// Copies POD records into a flat uint8 array; Python views it with the matching dtype.
template <class T>
py::array_t<uint8_t> to_bytes(const T* data, size_t n) {
  py::array_t<uint8_t> out(static_cast<py::ssize_t>(n * sizeof(T)));
  if (n) std::memcpy(out.mutable_data(), data, n * sizeof(T));
  return out;
}

// Checks that `a` is a C-contiguous 1-d array of records of sizeof(T) bytes.
template <class T>
const T* records_of(const py::array& a, const char* what) {
  if (a.ndim() != 1 || a.itemsize() != static_cast<py::ssize_t>(sizeof(T)) ||
      !(a.flags() & py::array::c_style))
    throw py::type_error(std::string("expected a contiguous 1-d array of ") + what + " records (" +
                         std::to_string(sizeof(T)) + " bytes each)");
  return static_cast<const T*>(a.data());
}

}  // namespace dynamic_core::bindings
