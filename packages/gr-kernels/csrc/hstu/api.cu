// Dispatch of the forward and backward kernels over dtype and head dim.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "hstu/fwd_split.cuh"
#include "hstu/params.h"
#include "hstu/sm90/bwd_config.h"

namespace gr_kernels {

template <typename Element, int kHeadDim>
const char* run_hstu_fwd(const HstuFwdParams& p, cudaStream_t stream);

#ifdef GR_KERNELS_SM90
namespace sm90 {
template <typename Element, int kHeadDim>
const char* run_hstu_fwd_sm90(const HstuFwdParams& p, cudaStream_t stream);
template <typename Element, int kHeadDim>
const char* run_hstu_bwd_sm90(const HstuBwdParams& p, cudaStream_t stream);
const char* fwd_self_check();
}  // namespace sm90

// The current device is an sm90 (Hopper) GPU. Two attribute reads, no synchronisation (safe under graph capture).
static bool current_device_is_sm90() {
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) return false;
  return major == 9 && minor == 0;
}

// Which forward kernel serves sm90: GR_KERNELS_FWD_KERNEL=sm90 (the WGMMA/TMA kernel of hstu/sm90/) or sm80 (the
// SM80-MMA kernel). Unset: the Hopper kernel, which passes the same GPU parity suite and memcheck set and is faster
// at every benchmarked shape. Read per call (cheap; lets tests and benchmarks switch within one process).
static constexpr bool kDefaultSm90Forward = true;

static bool sm90_forward_selected() {
  const char* v = std::getenv("GR_KERNELS_FWD_KERNEL");
  if (v == nullptr || v[0] == '\0') return kDefaultSm90Forward;
  return std::strcmp(v, "sm90") == 0;
}

// TMA wants 16-byte aligned bases and strides that are multiples of 16 bytes (2-byte elements).
static bool tma_compatible(const void* ptr, int64_t row_stride, int64_t head_stride) {
  return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0 && (row_stride * 2) % 16 == 0 && (head_stride * 2) % 16 == 0;
}

template <typename Element>
static const char* dispatch_head_dim_sm90(const HstuFwdParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return sm90::run_hstu_fwd_sm90<Element, 64>(p, stream);
    case 128: return sm90::run_hstu_fwd_sm90<Element, 128>(p, stream);
    case 256: return sm90::run_hstu_fwd_sm90<Element, 256>(p, stream);
    default: return nullptr;  // not built for sm90: the SM80 kernel decides
  }
}
#endif

template <typename Element>
static const char* dispatch_head_dim(const HstuFwdParams& p, cudaStream_t stream) {
#ifdef GR_KERNELS_SM90
  if (sm90_forward_selected() && current_device_is_sm90() && tma_compatible(p.q, p.q_row_stride, p.q_head_stride) &&
      tma_compatible(p.k, p.k_row_stride, p.k_head_stride) && tma_compatible(p.v, p.v_row_stride, p.v_head_stride)) {
    const char* err = dispatch_head_dim_sm90<Element>(p, stream);
    if (err != nullptr) return err;
  }
#endif
  switch (p.head_dim) {
    case 64: return run_hstu_fwd<Element, 64>(p, stream);
    case 128: return run_hstu_fwd<Element, 128>(p, stream);
    case 256: return run_hstu_fwd<Element, 256>(p, stream);
    default: return "unsupported head dim (built: 64, 128, 256)";
  }
}

const char* hstu_fwd(const HstuFwdParams& p, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (p.num_splits < 1) return "num_splits must be >= 1";
  const bool split = p.num_splits > 1;
  if (split && (p.split_accum == nullptr || reinterpret_cast<std::uintptr_t>(p.split_accum) % 16 != 0)) {
    return "split KV (num_splits > 1) needs a 16-byte aligned fp32 workspace split_accum";
  }
  if (split && !(reinterpret_cast<std::uintptr_t>(p.out) % 16 == 0 && p.o_row_stride % 8 == 0 &&
                 p.o_head_stride % 8 == 0)) {
    return "split KV (num_splits > 1) stores 16-byte chunks: out needs 16-byte aligned rows and heads";
  }
  const bool bf16 = p.dtype == DType::kBFloat16;
  const char* err = bf16 ? dispatch_head_dim<__nv_bfloat16>(p, s) : dispatch_head_dim<__half>(p, s);
  if (!split || err[0] != '\0') return err;
  // Either kernel wrote its fp32 shares into split_accum; sum them into out (same stream, after it).
  return bf16 ? run_hstu_fwd_split_reduce<__nv_bfloat16>(p, s) : run_hstu_fwd_split_reduce<__half>(p, s);
}

template <typename Element, int kHeadDim>
const char* run_hstu_bwd(const HstuBwdParams& p, cudaStream_t stream);

#ifdef GR_KERNELS_SM90
// Which backward kernel serves sm90 at head dims 64/128: GR_KERNELS_BWD_KERNEL=sm90 (the WGMMA/TMA kernel of
// hstu/sm90/) or sm80 (the SM80-MMA kernel). Unset: kDefaultSm90Backward, the Hopper kernel (it passed the parity
// suite incl. the hypothesis test and memcheck on an H200, and runs 2.7x the SM80 kernel at head dim 128). Head dim
// 256 has only the Hopper backward, so it runs there whatever the switch says. Read per call, like the forward's.
static constexpr bool kDefaultSm90Backward = true;

static bool sm90_backward_selected() {
  const char* v = std::getenv("GR_KERNELS_BWD_KERNEL");
  if (v == nullptr || v[0] == '\0') return kDefaultSm90Backward;
  return std::strcmp(v, "sm90") == 0;
}

// The Hopper backward's TMA loads can take this call's q, k, v and dout.
static bool sm90_backward_rows_fit(const HstuBwdParams& p) {
  return tma_compatible(p.q, p.q_row_stride, p.q_head_stride) &&
         tma_compatible(p.k, p.k_row_stride, p.k_head_stride) && tma_compatible(p.v, p.v_row_stride, p.v_head_stride) &&
         tma_compatible(p.dout, p.do_row_stride, p.do_head_stride);
}

template <typename Element>
static const char* dispatch_bwd_head_dim_sm90(const HstuBwdParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return sm90::run_hstu_bwd_sm90<Element, 64>(p, stream);
    case 128: return sm90::run_hstu_bwd_sm90<Element, 128>(p, stream);
    case 256: return sm90::run_hstu_bwd_sm90<Element, 256>(p, stream);
    default: return nullptr;  // not built for sm90: the SM80 kernel decides
  }
}
#endif

bool hstu_bwd_runs_sm90(int head_dim, bool delta_q, bool rab_tma_rows) {
#ifdef GR_KERNELS_SM90
  const bool built = head_dim == 64 || head_dim == 128 || head_dim == 256;
  const bool rab_fits = rab_tma_rows || !sm90::bwd_rab_via_tma(head_dim);
  return built && !delta_q && rab_fits && (sm90_backward_selected() || head_dim == 256) && current_device_is_sm90();
#else
  (void)head_dim;
  (void)delta_q;
  (void)rab_tma_rows;
  return false;
#endif
}

bool hstu_bwd_rab_via_tma(int head_dim) {
#ifdef GR_KERNELS_SM90
  return sm90::bwd_rab_via_tma(head_dim);
#else
  (void)head_dim;
  return false;
#endif
}

// Per sequence, an owner counter per 64 keys and a flag per 64 x 64 block of its shared plane (the layout:
// sm90::drab_sync_blocks).
int64_t hstu_bwd_drab_sync_words(int batch, int heads, int rab_heads, int max_seq_len) {
  if (rab_heads != 1 || heads <= 1 || batch <= 0 || max_seq_len <= 0) return 0;
  const int64_t blocks = sm90::drab_sync_blocks(max_seq_len);
  return int64_t(batch) * blocks * (1 + blocks);
}

// No bias, or one whose rows TMA can load: a 16-byte aligned base and rows of a multiple of 8 elements.
static bool rab_tma_rows(const HstuBwdParams& p) {
  return p.rab == nullptr || (reinterpret_cast<std::uintptr_t>(p.rab) % 16 == 0 && p.max_seq_len % 8 == 0);
}

template <typename Element>
static const char* dispatch_bwd_head_dim(const HstuBwdParams& p, cudaStream_t stream) {
#ifdef GR_KERNELS_SM90
  if (hstu_bwd_runs_sm90(p.head_dim, p.q_offsets != nullptr, rab_tma_rows(p)) && sm90_backward_rows_fit(p)) {
    const char* err = dispatch_bwd_head_dim_sm90<Element>(p, stream);
    if (err != nullptr) return err;
  }
#endif
  if (p.drab != nullptr) {
    return "the SM80-MMA backward accumulates drab in fp32 (drab_accum), but this call gave the Hopper kernel's "
           "16-bit drab (q, k, v, dout or bias rows not 16-byte aligned?)";
  }
  switch (p.head_dim) {
    case 64: return run_hstu_bwd<Element, 64>(p, stream);
    case 128: return run_hstu_bwd<Element, 128>(p, stream);
    case 256:
      return "head dim 256 backward needs the Hopper kernel: an sm90a build, an sm90 GPU, 16-byte aligned rows and "
             "no delta q (q_offsets)";
    default: return "unsupported head dim for the backward (built: 64, 128; 256 on sm90)";
  }
}

const char* hstu_bwd(const HstuBwdParams& p, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  return p.dtype == DType::kBFloat16 ? dispatch_bwd_head_dim<__nv_bfloat16>(p, s)
                                     : dispatch_bwd_head_dim<__half>(p, s);
}

const char* compiled_archs() { return GR_KERNELS_CUDA_ARCHS; }

const char* sm90_fwd_self_check() {
#ifdef GR_KERNELS_SM90
  return sm90::fwd_self_check();
#else
  return nullptr;
#endif
}

}  // namespace gr_kernels
