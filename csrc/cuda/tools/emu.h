// Host emulation of the few CUDA features the attention kernels use, so that
// the kernels' own source runs on a CPU in the tests (no GPU needed).
//
// Each CUDA thread of a block is a fiber (ucontext) on one OS thread; blocks
// run one after another.  Warp-collective primitives (shuffles, ldmatrix,
// mma.sync) gather the inputs of all 32 lanes, and the last lane to arrive
// computes every lane's result from the PTX ISA's fragment layouts (the
// comment at the top of mma.cuh).  cp.async copies are deferred until the
// cp.async.wait_group that covers them, and shared memory starts as 0xFF
// bytes (NaN in 16-bit floats), so a missing wait, a missing barrier or a read
// of an unwritten tile shows up as wrong output.  A block whose fibers all
// wait on barriers that can no longer complete aborts with a message.
//
// Not emulated: timing, bank conflicts, register limits, memory ordering
// between blocks (blocks run sequentially, so atomics are plain adds).
#pragma once
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __align__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__

// dim3 comes with the CUDA headers (host-usable).
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

namespace attnfast {
namespace cuda {
// Dynamic shared memory of the running block (kernels declare it extern).
constexpr size_t kEmuSmemBytes = 228 * 1024;
alignas(16) inline char smem_raw[kEmuSmemBytes];
}  // namespace cuda
}  // namespace attnfast

namespace emu {

struct Lane {
  const void* addr;
  uint32_t a[4], b[2], r[4];
  float c[4], f;
};

struct Warp {
  unsigned gen = 0;
  int count = 0;
  Lane in[2][32], out[2][32];  // double-buffered by generation: a lane is at most one collective ahead
};

struct Copy {
  void* dst;
  const void* src;
  bool valid;
};

struct Runtime {
  ucontext_t sched;
  std::vector<ucontext_t> ctx;
  std::vector<std::vector<char>> stacks;
  std::vector<char> done;
  std::vector<std::vector<std::vector<Copy>>> groups;  // per thread: committed groups (+ the open one last)
  std::vector<Warp> warps;
  std::function<void()> body;
  int n = 0, cur = 0, exited = 0;
  unsigned bar_gen = 0;
  int bar_count = 0;
  std::vector<char> waiting_block;   // per thread: waits at __syncthreads
  std::vector<unsigned> waiting_gen;
  bool progress = false;
  int schedule = 0;  // 0: warps in ascending order, 1: descending
};
inline Runtime rt;

inline void yield() { swapcontext(&rt.ctx[rt.cur], &rt.sched); }

inline void fiber_entry() {
  rt.body();
  rt.done[rt.cur] = 1;
  ++rt.exited;
  rt.progress = true;
}

// Run `body` as blockDim.x fibers of the block blockIdx.
inline void run_block(int threads, const std::function<void()>& body) {
  constexpr size_t kStack = 256 * 1024;
  rt.n = threads;
  rt.body = body;
  rt.ctx.assign(threads, ucontext_t{});
  if (static_cast<int>(rt.stacks.size()) < threads) rt.stacks.resize(threads);
  rt.done.assign(threads, 0);
  rt.waiting_block.assign(threads, 0);
  rt.waiting_gen.assign(threads, 0);
  rt.groups.assign(threads, std::vector<std::vector<Copy>>(1));
  rt.warps.assign((threads + 31) / 32, Warp{});
  rt.exited = 0;
  rt.bar_count = 0;
  for (int i = 0; i < threads; ++i) {
    rt.stacks[i].resize(kStack);
    getcontext(&rt.ctx[i]);
    rt.ctx[i].uc_stack.ss_sp = rt.stacks[i].data();
    rt.ctx[i].uc_stack.ss_size = kStack;
    rt.ctx[i].uc_link = &rt.sched;
    makecontext(&rt.ctx[i], fiber_entry, 0);
  }
  // Warps run greedily, one at a time, until all their lanes wait at a block
  // barrier or exit: each warp gets as far ahead of the others as the block's
  // barriers allow, so a read of shared memory that another warp has not yet
  // written (a missing __syncthreads) reads stale or NaN data.  The order of
  // the warps is ascending or descending (rt.schedule).
  const int nwarps = (threads + 31) / 32;
  auto runnable = [](int i) { return !rt.done[i] && !(rt.waiting_block[i] && rt.bar_gen == rt.waiting_gen[i]); };
  while (rt.exited < threads) {
    bool any = false;
    for (int wi = 0; wi < nwarps; ++wi) {
      const int w = rt.schedule == 1 ? nwarps - 1 - wi : wi;
      do {
        rt.progress = false;
        for (int i = 32 * w; i < 32 * w + 32 && i < threads; ++i) {
          if (!runnable(i)) continue;
          rt.cur = i;
          threadIdx = dim3(i);
          swapcontext(&rt.sched, &rt.ctx[i]);
        }
        any |= rt.progress;
      } while (rt.progress);
    }
    if (!any) {
      std::fprintf(stderr, "emu: deadlock in block (%u, %u, %u): %d of %d threads wait forever\n", blockIdx.x,
                   blockIdx.y, blockIdx.z, threads - rt.exited, threads);
      std::abort();
    }
  }
}

// Launch policy of the emulator (same signature as the GPU's CudaLaunch).
struct Launch {
  template <typename Kernel, typename Params>
  int operator()(Kernel kernel, dim3 grid, int threads, int smem_bytes, const Params& p) const {
    if (static_cast<size_t>(smem_bytes) > attnfast::cuda::kEmuSmemBytes || threads % 32 != 0) return 1;
    blockDim = dim3(threads);
    gridDim = grid;
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          blockIdx = dim3(x, y, z);
          std::memset(attnfast::cuda::smem_raw, 0xFF, smem_bytes);
          run_block(threads, [&] { kernel(p); });
        }
    return 0;
  }
};

inline void block_barrier() {
  const unsigned my = rt.bar_gen;
  rt.progress = true;
  if (++rt.bar_count == rt.n - rt.exited) {
    rt.bar_count = 0;
    ++rt.bar_gen;
    return;
  }
  rt.waiting_block[rt.cur] = 1;
  rt.waiting_gen[rt.cur] = my;
  while (rt.bar_gen == my) yield();
  rt.waiting_block[rt.cur] = 0;
}

// All 32 lanes of the caller's warp fill their input; the last computes all outputs.
template <typename Fill, typename Compute>
Lane warp_collective(Fill fill, Compute compute) {
  const int lane = rt.cur % 32;
  Warp& w = rt.warps[rt.cur / 32];
  const unsigned my = w.gen;
  const int par = my & 1;
  fill(w.in[par][lane]);
  rt.progress = true;
  if (++w.count == 32) {
    w.count = 0;
    compute(w.in[par], w.out[par]);
    ++w.gen;
  } else {
    while (w.gen == my) yield();
  }
  return w.out[par][lane];
}

inline uint16_t elem16(const void* row, int col) { return static_cast<const uint16_t*>(row)[col]; }
inline uint32_t pack16(uint16_t lo, uint16_t hi) { return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16); }

// ldmatrix .x{nmat}, optionally .trans: lanes 8i..8i+7 address the rows of matrix i.
inline void ldmatrix(uint32_t* r, const void* row, int nmat, bool trans) {
  Lane got = warp_collective([&](Lane& in) { in.addr = row; },
                             [&](const Lane* in, Lane* out) {
                               for (int l = 0; l < 32; ++l)
                                 for (int i = 0; i < nmat; ++i) {
                                   if (!trans) {
                                     const void* a = in[8 * i + l / 4].addr;
                                     out[l].r[i] = pack16(elem16(a, 2 * (l % 4)), elem16(a, 2 * (l % 4) + 1));
                                   } else {
                                     out[l].r[i] = pack16(elem16(in[8 * i + 2 * (l % 4)].addr, l / 4),
                                                          elem16(in[8 * i + 2 * (l % 4) + 1].addr, l / 4));
                                   }
                                 }
                             });
  for (int i = 0; i < nmat; ++i) r[i] = got.r[i];
}

inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float f16_bits_to_float(uint16_t b) {
  __half_raw raw;
  raw.x = b;
  return __half2float(__half(raw));
}

// c += A (16x16) * B (16x8) from the lanes' fragments, products summed in fp32.
inline void mma(float* c, const uint32_t* a, const uint32_t* b, bool is_bf16) {
  Lane got = warp_collective(
      [&](Lane& in) {
        for (int i = 0; i < 4; ++i) in.a[i] = a[i], in.c[i] = c[i];
        in.b[0] = b[0];
        in.b[1] = b[1];
      },
      [&](const Lane* in, Lane* out) {
        auto cv = [&](uint32_t v, int half) {
          const uint16_t bits = static_cast<uint16_t>(half ? v >> 16 : v & 0xFFFF);
          return is_bf16 ? bf16_bits_to_float(bits) : f16_bits_to_float(bits);
        };
        float A[16][16], B[16][8];
        for (int l = 0; l < 32; ++l) {
          const int g = l / 4, t = l % 4;
          for (int h = 0; h < 2; ++h) {
            A[g][2 * t + h] = cv(in[l].a[0], h);
            A[g + 8][2 * t + h] = cv(in[l].a[1], h);
            A[g][2 * t + 8 + h] = cv(in[l].a[2], h);
            A[g + 8][2 * t + 8 + h] = cv(in[l].a[3], h);
            B[2 * t + h][g] = cv(in[l].b[0], h);
            B[2 * t + 8 + h][g] = cv(in[l].b[1], h);
          }
        }
        for (int l = 0; l < 32; ++l) {
          const int g = l / 4, t = l % 4;
          for (int e = 0; e < 4; ++e) {
            const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
            float s = in[l].c[e];
            for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
            out[l].c[e] = s;
          }
        }
      });
  for (int e = 0; e < 4; ++e) c[e] = got.c[e];
}

}  // namespace emu

inline void __syncthreads() { emu::block_barrier(); }

inline float __shfl_xor_sync(unsigned /*mask*/, float v, int lane_mask) {
  return emu::warp_collective([&](emu::Lane& in) { in.f = v; },
                              [&](const emu::Lane* in, emu::Lane* out) {
                                for (int l = 0; l < 32; ++l) out[l].f = in[l ^ lane_mask].f;
                              })
      .f;
}

inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
}

namespace attnfast {
namespace cuda {

inline void mma_bf16(float* c, const uint32_t* a, const uint32_t* b) { emu::mma(c, a, b, true); }
inline void mma_f16(float* c, const uint32_t* a, const uint32_t* b) { emu::mma(c, a, b, false); }
inline void ldmatrix_x4(uint32_t* r, const void* row) { emu::ldmatrix(r, row, 4, false); }
inline void ldmatrix_x4_trans(uint32_t* r, const void* row) { emu::ldmatrix(r, row, 4, true); }
inline void ldmatrix_x2_trans(uint32_t* r, const void* row) { emu::ldmatrix(r, row, 2, true); }

inline void cp_async_16(void* smem, const void* gmem, bool valid) {
  emu::rt.groups[emu::rt.cur].back().push_back(emu::Copy{smem, gmem, valid});
}
inline void cp_async_commit() { emu::rt.groups[emu::rt.cur].emplace_back(); }

// Complete every committed group but the newest N (the open group is not committed).
template <int N>
inline void cp_async_wait() {
  auto& gs = emu::rt.groups[emu::rt.cur];
  const int committed = static_cast<int>(gs.size()) - 1;
  const int finish = committed - N;
  for (int i = 0; i < finish; ++i)
    for (const emu::Copy& c : gs[i]) {
      if (c.valid) std::memcpy(c.dst, c.src, 16);
      else std::memset(c.dst, 0, 16);
    }
  if (finish > 0) gs.erase(gs.begin(), gs.begin() + finish);
}

}  // namespace cuda
}  // namespace attnfast
