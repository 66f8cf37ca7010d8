// Helpers shared by the bind_<component>.cpp files.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstring>
#include <string>
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
