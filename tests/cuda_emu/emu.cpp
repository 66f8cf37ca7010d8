// The kernels of cuda/engine.cu built for the host (shim.hpp), behind two C entry points for
// tests/cuda_emu.py: dc_emu_launch(name, grid x, grid y, block, args, nargs, cooperative) and
// dc_emu_signature(name, kinds, sizes, cap), each kernel's parameters for the launcher to check
// its arguments against. DC_EMU_SOURCE, when defined, is the kernel source to build instead of
// cuda/engine.cu (the emulated cupy.RawModule compiles the code it is given).
#include "shim.hpp"

#ifdef DC_EMU_SOURCE
#include DC_EMU_SOURCE
#else
#include "../../cuda/engine.cu"
#endif

#define DC_EMU_KERNELS(X) X(dc_sizes) X(dc_ind_init) X(dc_ind_block) X(dc_feat_block) X(dc_lanes_block) X(dc_fuse_block) X(dc_fuse_wide)

extern "C" int dc_emu_launch(const char* name, unsigned gx, unsigned gy, unsigned bx, const uint64_t* args,
                             int nargs, int cooperative) {
  const dim3 grid{gx, gy, 1}, block{bx, 1, 1};
#define DC_EMU_CASE(k) \
  if (std::strcmp(name, #k) == 0) return emu::launch(k, grid, block, args, nargs, cooperative != 0);
  DC_EMU_KERNELS(DC_EMU_CASE)
#undef DC_EMU_CASE
  return -2000;  // no such kernel
}

extern "C" int dc_emu_signature(const char* name, int* kinds, int* sizes, int cap) {
#define DC_EMU_CASE(k) \
  if (std::strcmp(name, #k) == 0) return emu::signature(k, kinds, sizes, cap);
  DC_EMU_KERNELS(DC_EMU_CASE)
#undef DC_EMU_CASE
  return -2000;  // no such kernel
}
