// Backward instantiations for head dim 64.
#include "hstu/bwd_kernel.cuh"

namespace gr_kernels {
template const char* run_hstu_bwd<__nv_bfloat16, 64>(const HstuBwdParams&, cudaStream_t);
template const char* run_hstu_bwd<__half, 64>(const HstuBwdParams&, cudaStream_t);
}  // namespace gr_kernels
