// Backward launcher: turns (dtype, head dim, mask or not) into one kernel instance.
#include "flash.h"
#include "flash_bwd.cuh"
#include "switch.h"

namespace attnfast {
namespace cuda {

int run_bwd(const BwdParams& p, void* stream) {
  if (!bwd_supports_head_dim(p.D)) return cudaErrorInvalidValue;
  return ATTNFAST_ELEM_SWITCH(p.elem, T, [&] {
    return ATTNFAST_BWD_HEADDIM_SWITCH(p.D, kD, [&] {
      return ATTNFAST_BOOL_SWITCH(p.mask_kind != MaskKind::none, kHasMask, [&] {
        return launch_bwd<T, kD, kHasMask>(p, static_cast<cudaStream_t>(stream));
      });
    });
  });
}

}  // namespace cuda
}  // namespace attnfast
