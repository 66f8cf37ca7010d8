// Enough of CUDA's device-side language for the host to run cuda/*.cu kernels as written: each
// CUDA thread of a block is an OS thread; __syncthreads, warp shuffles and ballots are barriers
// over the block or the warp, with CUDA's semantics (a shuffle from past the warp's end returns
// the caller's own value). Blocks run one at a time, so __shared__ is a static. Kernels that use
// none of these run their threads one after another (launch(..., cooperative = false)).
//
// This is a test harness: it checks the kernels' logic and the host code that drives them
// against the CPU engine on machines without a GPU. It says nothing about NVRTC's code.
#pragma once
#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

namespace emu {
inline thread_local dim3 thread_idx, block_idx;
inline dim3 block_dim, grid_dim;
constexpr int kWarp = 32;
struct Warp {
  explicit Warp(int n) : bar(n) {}
  std::barrier<> bar;
  uint64_t q[kWarp];
  unsigned u[kWarp];
};
inline std::unique_ptr<std::barrier<>> block_bar;
inline std::vector<std::unique_ptr<Warp>> warps;
inline Warp& my_warp() { return *warps[thread_idx.x / kWarp]; }
}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

inline void __syncthreads() { emu::block_bar->arrive_and_wait(); }

// 32- and 64-bit values (uint32_t, double, unsigned long long), as the kernels shuffle them.
template <class T>
inline T __shfl_down_sync(unsigned, T v, int delta) {
  static_assert((sizeof(T) == 4 || sizeof(T) == 8) && std::is_trivially_copyable_v<T>);
  emu::Warp& w = emu::my_warp();
  const unsigned lane = threadIdx.x % emu::kWarp;
  std::memcpy(&w.q[lane], &v, sizeof(T));
  w.bar.arrive_and_wait();
  T r = v;
  if (lane + delta < emu::kWarp) std::memcpy(&r, &w.q[lane + delta], sizeof(T));
  w.bar.arrive_and_wait();
  return r;
}

inline unsigned __ballot_sync(unsigned, int pred) {
  emu::Warp& w = emu::my_warp();
  const unsigned lane = threadIdx.x % emu::kWarp;
  w.u[lane] = pred ? 1u : 0u;
  w.bar.arrive_and_wait();
  unsigned b = 0;
  for (int i = 0; i < emu::kWarp; ++i) b |= w.u[i] << i;
  w.bar.arrive_and_wait();
  return b;
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }

inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return std::atomic_ref<unsigned long long>(*p).fetch_add(v);
}

namespace emu {
// Runs kernel `k` over the grid: cooperative blocks as one OS thread per CUDA thread (the
// block's size a multiple of the warp), others one thread after another.
template <class F>
void run(dim3 grid, dim3 block, bool cooperative, F&& k) {
  grid_dim = grid;
  block_dim = block;
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      const dim3 b{bx, by, 1};
      if (!cooperative) {
        block_idx = b;
        for (unsigned t = 0; t < block.x; ++t) {
          thread_idx = dim3{t, 0, 0};
          k();
        }
        continue;
      }
      block_bar = std::make_unique<std::barrier<>>(block.x);
      warps.clear();
      for (unsigned w = 0; w < (block.x + kWarp - 1) / kWarp; ++w) warps.push_back(std::make_unique<Warp>(kWarp));
      std::vector<std::thread> th;
      th.reserve(block.x);
      for (unsigned t = 0; t < block.x; ++t)
        th.emplace_back([&, t] {
          block_idx = b;
          thread_idx = dim3{t, 0, 0};
          k();
        });
      for (auto& x : th) x.join();
    }
}

template <class T>
T from_bits(uint64_t b) {
  if constexpr (std::is_pointer_v<T>) {
    return reinterpret_cast<T>(static_cast<uintptr_t>(b));
  } else if constexpr (std::is_floating_point_v<T>) {
    T x;
    std::memcpy(&x, &b, sizeof x);
    return x;
  } else {
    return static_cast<T>(b);
  }
}

template <class... A, size_t... I>
void call(void (*k)(A...), const uint64_t* a, std::index_sequence<I...>) {
  k(from_bits<A>(a[I])...);
}

// What a kernel parameter is, for the launcher to check its arguments against (the driver copies
// sizeof(parameter) bytes of each argument whatever the caller meant; CuPy passes a Python int as
// an int64, a numpy scalar as its own dtype, an array as a pointer).
enum ParamKind : int { kInt = 0, kFloat = 1, kPtrInt = 2, kPtrFloat = 3, kPtrOther = 4 };

template <class T>
constexpr int param_kind() {
  if constexpr (std::is_pointer_v<T>) {
    using P = std::remove_cv_t<std::remove_pointer_t<T>>;
    if constexpr (std::is_floating_point_v<P>) return kPtrFloat;
    else if constexpr (std::is_integral_v<P>) return kPtrInt;
    else return kPtrOther;  // a struct (or void) in a byte buffer
  } else if constexpr (std::is_floating_point_v<T>) {
    return kFloat;
  } else {
    return kInt;
  }
}

// sizeof the parameter; for a pointer, sizeof what it points to (1 for void).
template <class T>
constexpr int param_size() {
  if constexpr (std::is_pointer_v<T>) {
    using P = std::remove_cv_t<std::remove_pointer_t<T>>;
    if constexpr (std::is_void_v<P>) return 1;
    else return static_cast<int>(sizeof(P));
  } else {
    return static_cast<int>(sizeof(T));
  }
}

// Kernel k's parameters (kind, size), at most cap of them; returns how many it has.
template <class... A>
int signature(void (*)(A...), int* kinds, int* sizes, int cap) {
  constexpr int n = static_cast<int>(sizeof...(A));
  if constexpr (n > 0) {
    const int k[] = {param_kind<A>()...};
    const int s[] = {param_size<A>()...};
    for (int i = 0; i < n && i < cap; ++i) {
      kinds[i] = k[i];
      sizes[i] = s[i];
    }
  }
  return n;
}

// CUDA's launch limits (every GPU since compute capability 2.0): a block of at most 1024 threads,
// a grid of at most 2^31-1 blocks in x and 65535 in y; none may be 0.
constexpr unsigned kMaxBlock = 1024, kMaxGridX = 2147483647u, kMaxGridY = 65535;

// Launches kernel k with its arguments as 64-bit words (pointers, integers, floats' bits).
// Returns 0, or: -(n+1) for a wrong argument count (n parameters), -1000 for a cooperative block
// that is not whole warps, -1001 for a block size outside [1, 1024], -1002 for a grid outside
// [1, 2^31-1] x [1, 65535].
template <class... A>
int launch(void (*k)(A...), dim3 grid, dim3 block, const uint64_t* a, int nargs, bool cooperative) {
  if (nargs != static_cast<int>(sizeof...(A))) return -static_cast<int>(sizeof...(A)) - 1;
  if (block.x == 0 || block.x > kMaxBlock || block.y != 1 || block.z != 1) return -1001;
  if (grid.x == 0 || grid.x > kMaxGridX || grid.y == 0 || grid.y > kMaxGridY || grid.z != 1) return -1002;
  if (cooperative && block.x % kWarp != 0) return -1000;
  run(grid, block, cooperative, [&] { call(k, a, std::index_sequence_for<A...>{}); });
  return 0;
}
}  // namespace emu
