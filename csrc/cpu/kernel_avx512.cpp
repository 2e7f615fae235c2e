// AVX-512 build of the CPU kernels (x86-64; elsewhere it forwards to the portable build); see isa_build.h.
#define ATTNFAST_ISA_NS isa_avx512
#define ATTNFAST_VEC_BYTES 64
#define ATTNFAST_ISA_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c"
#include "isa_build.h"
