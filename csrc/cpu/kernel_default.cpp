// Portable build of the CPU attention kernel (baseline x86-64 / any target).
#define ATTNFAST_ISA_NS isa_default
#define ATTNFAST_VEC_BYTES 16
#include "attention_kernel.h"
