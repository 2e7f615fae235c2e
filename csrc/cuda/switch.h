// The one place where runtime parameters become template arguments.
//
//   ATTNFAST_ELEM_SWITCH(p.elem, T, [&] { ... T ... });
//   ATTNFAST_FWD_HEADDIM_SWITCH(p.D, kD, [&] { ... kD ... });  (and _BWD_: flash.h's lists)
//   ATTNFAST_BOOL_SWITCH(cond, kFlag, [&] { ... kFlag ... });
// Each expands `body` once per value, with the value bound to a constexpr name.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "flash.h"

#define ATTNFAST_BOOL_SWITCH(COND, NAME, ...) \
  [&] {                                       \
    if (COND) {                               \
      constexpr static bool NAME = true;      \
      return __VA_ARGS__();                   \
    } else {                                  \
      constexpr static bool NAME = false;     \
      return __VA_ARGS__();                   \
    }                                         \
  }()

#define ATTNFAST_ELEM_SWITCH(ELEM, NAME, ...)        \
  [&] {                                              \
    if ((ELEM) == ::attnfast::cuda::Elem::bf16) {    \
      using NAME = __nv_bfloat16;                    \
      return __VA_ARGS__();                          \
    } else {                                         \
      using NAME = __half;                           \
      return __VA_ARGS__();                          \
    }                                                \
  }()

namespace attnfast {
namespace cuda {

// f(std::integral_constant<int, D>{}) for the head dim D of `dims` equal to
// d; 1 (cudaErrorInvalidValue) when dims does not list d.
template <int... Ds, typename F>
int switch_head_dim(HeadDims<Ds...> /*dims*/, int d, F&& f) {
  int result = 1;
  (void)((d == Ds && (result = f(std::integral_constant<int, Ds>{}), true)) || ...);
  return result;
}

}  // namespace cuda
}  // namespace attnfast

// Head dims of flash.h's lists: FwdHeadDims and BwdHeadDims.
#define ATTNFAST_HEADDIM_SWITCH(DIMS, D, NAME, ...)                                       \
  ::attnfast::cuda::switch_head_dim(DIMS{}, D, [&](auto NAME##_value) {                  \
    constexpr static int NAME = decltype(NAME##_value)::value;                           \
    return __VA_ARGS__();                                                                \
  })
#define ATTNFAST_FWD_HEADDIM_SWITCH(D, NAME, ...) \
  ATTNFAST_HEADDIM_SWITCH(::attnfast::cuda::FwdHeadDims, D, NAME, __VA_ARGS__)
#define ATTNFAST_BWD_HEADDIM_SWITCH(D, NAME, ...) \
  ATTNFAST_HEADDIM_SWITCH(::attnfast::cuda::BwdHeadDims, D, NAME, __VA_ARGS__)
