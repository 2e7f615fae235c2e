// Bwd entry point of the GPU build.
#include "flash.h"
#include "flash_bwd.cuh"
#include "launch.cuh"

namespace attnfast {
namespace cuda {

int run_bwd(const BwdParams& p, void* stream) {
  return dispatch_bwd(p, CudaLaunch{static_cast<cudaStream_t>(stream)});
}

}  // namespace cuda
}  // namespace attnfast
