// The CUDA kernels built for the host emulator (emu.h), as a C library the
// tests load with ctypes:
//   g++ -std=c++17 -O2 -shared -fPIC -DATTNFAST_CUDA_EMULATION -Icsrc/cuda
//       -I<cuda>/include csrc/cuda/tools/emu.cpp -o build/libattnfast_emu.so
#include "flash.h"
#include "flash_bwd.cuh"
#include "flash_fwd.cuh"

using attnfast::cuda::AttnParams;
using attnfast::cuda::BwdParams;
using attnfast::cuda::FwdParams;

extern "C" {

int attnfast_emu_fwd(const FwdParams* p) { return attnfast::cuda::dispatch_fwd(*p, emu::Launch{}); }
int attnfast_emu_bwd(const BwdParams* p) { return attnfast::cuda::dispatch_bwd(*p, emu::Launch{}); }

// 0: warps run in ascending order, 1: descending (see emu.h).
void attnfast_emu_schedule(int order) { emu::rt.schedule = order; }

// Layout facts the Python side checks its ctypes mirror against.
void attnfast_emu_layout(long long* out) {
  static FwdParams f;
  static BwdParams b;
  const auto off = [](const void* base, const void* field) {
    return static_cast<long long>(static_cast<const char*>(field) - static_cast<const char*>(base));
  };
  out[0] = sizeof(AttnParams);
  out[1] = sizeof(FwdParams);
  out[2] = sizeof(BwdParams);
  out[3] = off(&f, &f.mask_st);
  out[4] = off(&f, &f.window_right);
  out[5] = off(&f, &f.lse);
  out[6] = off(&b, &b.dmask);
  out[7] = off(&b, &b.delta_in);
  out[8] = off(&f, &f.total_q);
  out[9] = off(&b, &b.dv_st);
}
}
