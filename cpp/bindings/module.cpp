#include "../dynamic_core/errors.hpp"

#include <system_error>
#include "common.hpp"

namespace py = pybind11;
using namespace dynamic_core::bindings;

PYBIND11_MODULE(_core, m) {
  m.doc() = "dynamic_core native engine (private; use the dynamic_core package)";
  bind_records(m);
  bind_indicators(m);
  bind_engine(m);
  bind_bench(m);
  bind_journal(m);
  bind_lora(m);
  m.def("_exiting", [] {
          g_exiting_thread.store(std::this_thread::get_id());
          g_exiting.store(true, std::memory_order_release);
        },
        "Marks the calling thread as the one running the interpreter's exit (an atexit hook of "
        "dynamic_core; see GilRelease in cpp/bindings/common.hpp).");
  // Engine errors map to dynamic_core.errors; everything else keeps pybind11's mapping.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const dynamic_core::StrictRefusal& e) {
      // the same error a caller-side check raises (dynamic_core.market.refuse_bad: rows, reasons)
      py::array_t<uint32_t> reasons(static_cast<py::ssize_t>(e.reasons.size()));
      std::copy(e.reasons.begin(), e.reasons.end(), reasons.mutable_data());
      try {
        py::module_::import("dynamic_core.market").attr("refuse_bad")(reasons);
      } catch (py::error_already_set& err) {
        err.restore();
        return;
      }
      py::object cls = py::module_::import("dynamic_core.errors").attr("InvalidInput");
      PyErr_SetString(cls.ptr(), e.what());
    } catch (const dynamic_core::InvalidInput& e) {
      py::object cls = py::module_::import("dynamic_core.errors").attr("InvalidInput");
      PyErr_SetString(cls.ptr(), e.what());
    } catch (const dynamic_core::Interrupted&) {
      // the interrupt check left the signal handler's exception (KeyboardInterrupt) pending
      if (!PyErr_Occurred()) PyErr_SetNone(PyExc_KeyboardInterrupt);
    } catch (const dynamic_core::JournalFailure& e) {
      py::object cls = py::module_::import("dynamic_core.errors").attr("JournalError");
      PyErr_SetString(cls.ptr(), e.what());
    } catch (const std::system_error& e) {
      // An errno: OSError(errno, message), Python picks the subclass (FileExistsError,
      // PermissionError...). Other categories keep pybind11's RuntimeError.
      const auto& cat = e.code().category();
      if (cat != std::generic_category() && cat != std::system_category()) throw;
      PyErr_SetObject(PyExc_OSError, py::make_tuple(e.code().value(), std::string(e.what())).ptr());
    }
  });
}
