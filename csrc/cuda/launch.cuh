// Launch policy of the GPU build (the tests' host emulator has its own).
#pragma once
#include <cuda_runtime.h>

namespace attnfast {
namespace cuda {

// How a kernel instance is queued on a GPU: opt in to more than 48 KB of
// dynamic shared memory where needed, launch on `stream`, report the error.
struct CudaLaunch {
  cudaStream_t stream;
  template <typename Kernel, typename Params>
  int operator()(Kernel kernel, dim3 grid, int threads, int smem_bytes, const Params& p) const {
    if (smem_bytes > 48 * 1024) {
      const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
      if (e != cudaSuccess) return e;
    }
    kernel<<<grid, threads, smem_bytes, stream>>>(p);
    return cudaGetLastError();
  }
};

}  // namespace cuda
}  // namespace attnfast
