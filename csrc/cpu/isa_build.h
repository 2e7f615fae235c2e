// One ISA's build of the CPU kernels: every entry point of params.h
// (ATTNFAST_CPU_ENTRY_POINTS) and their table, `kernels`, in namespace
// attnfast::cpu::ATTNFAST_ISA_NS.  Each kernel_<isa>.cpp defines
//   ATTNFAST_ISA_NS      the namespace (isa_default, isa_avx2, ...),
//   ATTNFAST_VEC_BYTES   the vector width the kernels are written for (16, 32, 64),
//   ATTNFAST_ISA_TARGET  the GCC target string (x86-64 only; undefined: the baseline target)
// and then includes this file, once.
//
// The standard headers are included before the target pragma so that their
// inline functions keep the baseline target; everything compiled after it has
// internal linkage but the entry points and `kernels` (see tile_ops.h), so no
// inline function compiled for a wider ISA can leak into another object
// through the linker.  The binding calls a build only when the CPU reports its
// features.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>

#include <unistd.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "params.h"

#if !defined(ATTNFAST_ISA_NS) || !defined(ATTNFAST_VEC_BYTES)
#error "define ATTNFAST_ISA_NS and ATTNFAST_VEC_BYTES before including isa_build.h"
#endif

#define ATTNFAST_PRAGMA(x) _Pragma(#x)
#define ATTNFAST_TARGET_PRAGMA(isa) ATTNFAST_PRAGMA(GCC target(isa))

#if !defined(ATTNFAST_ISA_TARGET) || (defined(__x86_64__) && defined(__GNUC__))
#ifdef ATTNFAST_ISA_TARGET
#pragma GCC push_options
ATTNFAST_TARGET_PRAGMA(ATTNFAST_ISA_TARGET)
#endif
#include "attention_kernel.h"
#include "additive_kernel.h"
#include "topk_kernel.h"
#include "probe.h"
#ifdef ATTNFAST_ISA_TARGET
#pragma GCC pop_options
#endif

#else
// A target this compiler cannot build here (not x86-64): the entry points
// forward to the portable build.  (The binding never picks this ISA there.)
namespace attnfast {
namespace cpu {
namespace ATTNFAST_ISA_NS {
#define ATTNFAST_FORWARD_ENTRY(name, P) \
  void name(const P& p) { isa_default::name(p); }
ATTNFAST_CPU_ENTRY_POINTS(ATTNFAST_FORWARD_ENTRY)
#undef ATTNFAST_FORWARD_ENTRY
}  // namespace ATTNFAST_ISA_NS
}  // namespace cpu
}  // namespace attnfast
#endif

namespace attnfast {
namespace cpu {
namespace ATTNFAST_ISA_NS {
#define ATTNFAST_ENTRY_ADDRESS(name, P) &name,
extern const Kernels kernels = {ATTNFAST_CPU_ENTRY_POINTS(ATTNFAST_ENTRY_ADDRESS)};
#undef ATTNFAST_ENTRY_ADDRESS
}  // namespace ATTNFAST_ISA_NS
}  // namespace cpu
}  // namespace attnfast
