// Fwd entry point of the GPU build.
#include "flash.h"
#include "flash_fwd.cuh"
#include "launch.cuh"

namespace attnfast {
namespace cuda {

int run_fwd(const FwdParams& p, void* stream) {
  return dispatch_fwd(p, CudaLaunch{static_cast<cudaStream_t>(stream)});
}

}  // namespace cuda
}  // namespace attnfast
