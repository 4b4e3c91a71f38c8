// Backward instantiations for head dim 128.
#include "hstu/bwd_kernel.cuh"

namespace gr_kernels {
template const char* run_hstu_bwd<__nv_bfloat16, 128>(const HstuBwdParams&, cudaStream_t);
template const char* run_hstu_bwd<__half, 128>(const HstuBwdParams&, cudaStream_t);
}  // namespace gr_kernels
