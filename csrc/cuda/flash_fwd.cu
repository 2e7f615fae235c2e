// Forward launcher: turns (dtype, head dim, mask or not) into one kernel instance.
#include "flash.h"
#include "flash_fwd.cuh"
#include "switch.h"

namespace attnfast {
namespace cuda {

int run_fwd(const FwdParams& p, void* stream) {
  if (!fwd_supports_head_dim(p.D)) return cudaErrorInvalidValue;
  return ATTNFAST_ELEM_SWITCH(p.elem, T, [&] {
    return ATTNFAST_FWD_HEADDIM_SWITCH(p.D, kD, [&] {
      return ATTNFAST_BOOL_SWITCH(p.mask_kind != MaskKind::none, kHasMask, [&] {
        return launch_fwd<T, kD, kHasMask>(p, static_cast<cudaStream_t>(stream));
      });
    });
  });
}

}  // namespace cuda
}  // namespace attnfast
