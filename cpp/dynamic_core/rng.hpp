// Counter-based random numbers: every draw is a pure function of (seed, agent id, generation,
// counter), so a generation of evolution is the same whichever order, thread or device computes
// it. Integer operations only (SplitMix64 finaliser), identical on the CPU and under CUDA.
#pragma once
#include <cstdint>

#include "math.hpp"

namespace dynamic_core {

DC_HOST_DEVICE inline uint64_t rng_mix(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The stream of draws of one (seed, agent, generation) key.
struct CounterRng {
  uint64_t key;
  uint64_t counter = 0;
  DC_HOST_DEVICE CounterRng(uint64_t seed, uint32_t agent, uint32_t generation)
      : key(rng_mix(rng_mix(seed) ^ (static_cast<uint64_t>(agent) << 32 | generation))) {}
  // SplitMix64 from the key: one finaliser per draw.
  DC_HOST_DEVICE uint64_t next() { return rng_mix(key + 0x9E3779B97F4A7C15ull * counter++); }
  // Uniform in [0, 1) with 53 random bits.
  DC_HOST_DEVICE double uniform() { return static_cast<double>(next() >> 11) * (1.0 / 9007199254740992.0); }
  // Uniform integer in [0, n), n > 0 (multiply-shift; the bias is below 2^-32 for n < 2^32).
  DC_HOST_DEVICE uint32_t below(uint32_t n) {
    return static_cast<uint32_t>(((next() >> 32) * static_cast<uint64_t>(n)) >> 32);
  }
  // About standard normal: the sum of four uniforms (the four 16-bit quarters of one draw, each
  // (k + 1/2) / 2^16), centred and scaled to unit variance (Irwin-Hall; integer sums and one
  // multiply, so bit-identical everywhere). Bounded to +-3.46.
  DC_HOST_DEVICE double normal() {
    const uint64_t x = next();
    const uint64_t s = (x & 0xFFFFu) + (x >> 16 & 0xFFFFu) + (x >> 32 & 0xFFFFu) + (x >> 48) + 2u;  // sum of (k + 1/2), in 2^-16
    return (static_cast<double>(s) * (1.0 / 65536.0) - 2.0) * 1.7320508075688772;
  }
};

}  // namespace dynamic_core
