// Hopper (sm90a) backward instantiations for head dim 64 (one file per head dim so they compile in parallel).
#include "hstu/sm90/bwd_kernel.cuh"

namespace gr_kernels {
namespace sm90 {
template const char* run_hstu_bwd_sm90<__nv_bfloat16, 64>(const HstuBwdParams&, cudaStream_t);
template const char* run_hstu_bwd_sm90<__half, 64>(const HstuBwdParams&, cudaStream_t);
}  // namespace sm90
}  // namespace gr_kernels
