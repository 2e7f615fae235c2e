// AVX2 build of the CPU kernels (x86-64; elsewhere it forwards to the portable build); see isa_build.h.
#define ATTNFAST_ISA_NS isa_avx2
#define ATTNFAST_VEC_BYTES 32
#define ATTNFAST_ISA_TARGET "avx2,fma,f16c"
#include "isa_build.h"
