// Engine errors; the bindings translate each to its class in dynamic_core.errors.
#pragma once
#include <stdexcept>
#include <string>

namespace dynamic_core {

// A batch that strict mode refuses, or a record that cannot be processed.
class InvalidInput : public std::runtime_error {
 public:
  explicit InvalidInput(const std::string& what) : std::runtime_error(what) {}
};

// The journal cannot take a record: a write or sync failed (disk full, I/O error), now or
// earlier. Maps to dynamic_core.errors.JournalError.
class JournalFailure : public std::runtime_error {
 public:
  explicit JournalFailure(const std::string& what) : std::runtime_error(what) {}
};

}  // namespace dynamic_core
