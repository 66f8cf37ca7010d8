// Engine errors; the bindings translate each to its class in dynamic_core.errors.
#pragma once
#include <cstdint>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace dynamic_core {

// A batch that strict mode refuses, or a record that cannot be processed.
class InvalidInput : public std::runtime_error {
 public:
  explicit InvalidInput(const std::string& what) : std::runtime_error(what) {}
};

// A batch that strict mode refuses, with the reject reason of every row (0: good), decided under
// the ingress lock so no other feeder can change the verdict before the batch is taken.
class StrictRefusal : public InvalidInput {
 public:
  explicit StrictRefusal(std::vector<uint32_t> reasons)
      : InvalidInput("strict mode refused the batch"), reasons(std::move(reasons)) {}
  std::vector<uint32_t> reasons;
};

// The journal cannot take a record: a write or sync failed (disk full, I/O error), now or
// earlier. Maps to dynamic_core.errors.JournalError.
class JournalFailure : public std::runtime_error {
 public:
  explicit JournalFailure(const std::string& what) : std::runtime_error(what) {}
};

// A blocking call given up because the caller was interrupted (the engine's interrupt check
// said so: a signal such as SIGINT is pending for the Python thread that called it). What was
// done before stays done; the bindings re-raise the pending KeyboardInterrupt.
class Interrupted : public std::runtime_error {
 public:
  Interrupted() : std::runtime_error("interrupted") {}
};

// An engine that would need more memory than the machine has, found before allocating it: a
// std::bad_alloc (MemoryError in Python) that says what needs the memory.
class MemoryBudget : public std::bad_alloc {
 public:
  explicit MemoryBudget(std::string what) : what_(std::move(what)) {}
  const char* what() const noexcept override { return what_.c_str(); }

 private:
  std::string what_;
};

// Bytes of physical memory of this machine (0 when unknown).
uint64_t physical_memory();

// Throws MemoryBudget when `bytes` (what `what` needs) pass the machine's physical memory.
void check_memory(uint64_t bytes, const std::string& what);

}  // namespace dynamic_core
