// Portable build of the CPU attention kernel (baseline x86-64 / any target).
#define ATTNFAST_ISA_NS isa_default
#include "attention_kernel.h"
