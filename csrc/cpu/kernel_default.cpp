// Portable build of the CPU kernels (baseline x86-64 / any target); see isa_build.h.
#define ATTNFAST_ISA_NS isa_default
#define ATTNFAST_VEC_BYTES 16
#include "isa_build.h"
