// The lane kernel: one SM, one bar. Pure function of (parameters, state, bank features).
#pragma once
#include <cstdint>

#include "math.hpp"

// Whether kernels are also compiled for x86-64-v3/v4 and picked at load time (kernel_isa).
#if defined(__x86_64__) && !defined(__SANITIZE_THREAD__) && !defined(DC_NO_CLONES)
#define DC_X86_DISPATCH 1
#else
#define DC_X86_DISPATCH 0
#endif

// The instruction sets of those clones, as features added to the build's own target: the ISA of
// arch=x86-64-v3 / -v4 on a default build. (target("arch=...") would replace a -march given with
// DC_ARCH, leaving the clone below the intrinsics' target, which GCC then refuses to inline.)
#define DC_ISA_V3 "sse3,ssse3,sse4.1,sse4.2,popcnt,cx16,sahf,avx,avx2,bmi,bmi2,f16c,fma,lzcnt,movbe,xsave"
#define DC_ISA_V4 DC_ISA_V3 ",avx512f,avx512bw,avx512cd,avx512dq,avx512vl"

namespace dynamic_core {

inline constexpr int kMaxSmLanes = kMaxWarpsPerSm * kWarpSize;
// Distinct features of one kind in one bank: at most one per lane.
inline constexpr int kMaxBankFeatures = kMaxSmLanes;

// Views of one SM's lanes (structure of arrays, kWarpSize-aligned, no aliasing between arrays).
struct LaneView {
  const double* w[kFeatures];
  const int32_t* fidx[kFeatures];
  const double* entry;
  const double* cost;
  const int32_t* lookback;
  const int32_t* long_short;
  const int32_t* active;
  double* score;
  double* equity;
  double* entry_equity;
  double* peak;
  double* max_dd;
  double* ret_sum;
  double* ret_sq;
  const double* credit;
  const int32_t* external;   // kind-1 lanes (score from ext_score)
  const double* ext_score;
  int has_external;          // 0: no kind-1 lane in this view (the override loop is skipped)
  const double* dsi;         // per lane: w_dsi x its stream's DSI evidence, added to the blend
  int has_dsi;               // 0: no lane of this view reads DSI (the term is skipped)
  uint32_t* trades;
  uint32_t* wins;
  uint32_t* n_ret;
  uint32_t* quarantined;
  int32_t* position;
  int32_t* action;
};

// Advances `lanes` lanes (a multiple of kWarpSize, at most kMaxSmLanes) by one bar whose bank
// features are `feat`, bar index `t` and close-to-close return `ret`. Returns the SM summary in
// the canonical order; `updates` gets the number of live lanes, `quarantined` the lanes quarantined by this bar. `poison` (fault injection, -1 =
// none) makes that lane's score NaN, which quarantines it.
//
// Compiled for several instruction sets (picked at load time, see kernel_isa). Results are
// bit-identical across them: FMA contraction is off and float sums keep their fixed order.
Summary sm_step(const LaneView& v, int lanes, const double* feat, int32_t t, double ret, int poison,
                uint64_t& updates, uint64_t& quarantined);

// Instruction-set level of the lane kernel, the bank updates and the DynamicLoRA kernels
// (lora.hpp) in use: 4 (x86-64-v4), 3 (x86-64-v3) or 0 (baseline).
int kernel_isa();
// For tests: use the variants for `level`, at most what the CPU supports (not while an engine
// runs). Returns the level in use.
int set_kernel_isa(int level);

}  // namespace dynamic_core
