// AVX-512 build of the CPU attention kernel.
//
// The standard headers are included before the target pragma so their inline
// functions keep the baseline target; everything compiled after it has
// internal linkage (see attention_kernel.h), so nothing AVX-512 escapes this
// object.  binding.cpp calls into it only when the CPU reports these features.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")
#define ATTNFAST_ISA_NS isa_avx512
#define ATTNFAST_VEC_BYTES 64
#include "attention_kernel.h"
#pragma GCC pop_options
#define ATTNFAST_HAVE_AVX512_BUILD 1
#else
// Other targets: the AVX-512 entry points forward to the portable kernel.
#include "params.h"
namespace attnfast {
namespace cpu {
namespace isa_avx512 {
void attention_fwd(const FwdParams& p) { isa_default::attention_fwd(p); }
void attention_bwd(const BwdParams& p) { isa_default::attention_bwd(p); }
void additive_fwd(const AdditiveParams& p) { isa_default::additive_fwd(p); }
void additive_bwd(const AdditiveParams& p) { isa_default::additive_bwd(p); }
void topk_fwd(const TopkParams& p) { isa_default::topk_fwd(p); }
void topk_bwd(const TopkParams& p) { isa_default::topk_bwd(p); }
}  // namespace isa_avx512
}  // namespace cpu
}  // namespace attnfast
#endif
