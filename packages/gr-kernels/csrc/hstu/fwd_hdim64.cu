// Forward instantiations for head dim 64 (one file per head dim so they compile in parallel).
#include "hstu/fwd_kernel.cuh"

namespace gr_kernels {
template const char* run_hstu_fwd<__nv_bfloat16, 64>(const HstuFwdParams&, cudaStream_t);
template const char* run_hstu_fwd<__half, 64>(const HstuFwdParams&, cudaStream_t);
}  // namespace gr_kernels
