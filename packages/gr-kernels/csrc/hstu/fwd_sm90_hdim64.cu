// Hopper (sm90a) forward instantiations for head dim 64 (one file per head dim so they compile in parallel).
#include "hstu/sm90/fwd_kernel.cuh"

namespace gr_kernels {
namespace sm90 {
template const char* run_hstu_fwd_sm90<__nv_bfloat16, 64>(const HstuFwdParams&, cudaStream_t);
template const char* run_hstu_fwd_sm90<__half, 64>(const HstuFwdParams&, cudaStream_t);
}  // namespace sm90
}  // namespace gr_kernels
