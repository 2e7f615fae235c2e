// The one place where runtime parameters become template arguments.
//
//   ELEM_SWITCH(p.elem, T, [&] { ... T ... });
//   HEADDIM_SWITCH(p.D, kD, kFwdHeadDims-like list, [&] { ... kD ... });
//   BOOL_SWITCH(cond, kFlag, [&] { ... kFlag ... });
// Each expands `body` once per value, with the value bound to a constexpr name.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

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

// One head-dim case of the switches below.
#define ATTNFAST_HEADDIM_CASE(D, VALUE, NAME, ...) \
  if ((D) == VALUE) {                              \
    constexpr static int NAME = VALUE;             \
    return __VA_ARGS__();                          \
  }

// Forward head dims: 64, 96, 128, 256 (flash.h: kFwdHeadDims).
#define ATTNFAST_FWD_HEADDIM_SWITCH(D, NAME, ...)          \
  [&] {                                                    \
    ATTNFAST_HEADDIM_CASE(D, 64, NAME, __VA_ARGS__)        \
    ATTNFAST_HEADDIM_CASE(D, 96, NAME, __VA_ARGS__)        \
    ATTNFAST_HEADDIM_CASE(D, 128, NAME, __VA_ARGS__)       \
    constexpr static int NAME = 256;                       \
    return __VA_ARGS__();                                  \
  }()

// Backward head dims: 64, 96, 128 (flash.h: kBwdHeadDims).
#define ATTNFAST_BWD_HEADDIM_SWITCH(D, NAME, ...)          \
  [&] {                                                    \
    ATTNFAST_HEADDIM_CASE(D, 64, NAME, __VA_ARGS__)        \
    ATTNFAST_HEADDIM_CASE(D, 96, NAME, __VA_ARGS__)        \
    constexpr static int NAME = 128;                       \
    return __VA_ARGS__();                                  \
  }()
