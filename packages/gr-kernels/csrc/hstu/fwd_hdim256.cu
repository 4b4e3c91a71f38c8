// Forward instantiations for head dim 256 (one file per head dim so they compile in parallel).
#include "hstu/fwd_kernel.cuh"

namespace gr_kernels {
template const char* run_hstu_fwd<__nv_bfloat16, 256>(const HstuFwdParams&, cudaStream_t);
template const char* run_hstu_fwd<__half, 256>(const HstuFwdParams&, cudaStream_t);
}  // namespace gr_kernels
