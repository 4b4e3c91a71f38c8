// Dispatch of the forward and backward kernels over dtype and head dim.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "hstu/params.h"

namespace gr_kernels {

template <typename Element, int kHeadDim>
const char* run_hstu_fwd(const HstuFwdParams& p, cudaStream_t stream);

template <typename Element>
static const char* dispatch_head_dim(const HstuFwdParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return run_hstu_fwd<Element, 64>(p, stream);
    case 128: return run_hstu_fwd<Element, 128>(p, stream);
    case 256: return run_hstu_fwd<Element, 256>(p, stream);
    default: return "unsupported head dim (built: 64, 128, 256)";
  }
}

const char* hstu_fwd(const HstuFwdParams& p, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  return p.dtype == DType::kBFloat16 ? dispatch_head_dim<__nv_bfloat16>(p, s) : dispatch_head_dim<__half>(p, s);
}

template <typename Element, int kHeadDim>
const char* run_hstu_bwd(const HstuBwdParams& p, cudaStream_t stream);

template <typename Element>
static const char* dispatch_bwd_head_dim(const HstuBwdParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return run_hstu_bwd<Element, 64>(p, stream);
    case 128: return run_hstu_bwd<Element, 128>(p, stream);
    default: return "unsupported head dim for the backward (built: 64, 128)";
  }
}

const char* hstu_bwd(const HstuBwdParams& p, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  return p.dtype == DType::kBFloat16 ? dispatch_bwd_head_dim<__nv_bfloat16>(p, s)
                                     : dispatch_bwd_head_dim<__half>(p, s);
}

const char* compiled_archs() { return GR_KERNELS_CUDA_ARCHS; }

}  // namespace gr_kernels
