// Helpers shared by the forward and backward kernels: SiLU pieces, packing, swizzled tile loads, bias planes, launch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include <cute/arch/copy_sm80.hpp>

#include "hstu/params.h"

namespace gr_kernels {

namespace detail {

// The same pointer, opaque to the optimiser: values derived from it cannot be hoisted above this point (e.g. out of a
// loop, where they would occupy registers for the whole loop).
template <typename T>
__device__ __forceinline__ T* opaque(T* ptr) {
  asm volatile("" : "+l"(ptr));
  return ptr;
}
__device__ __forceinline__ int opaque(int value) {
  asm volatile("" : "+r"(value));
  return value;
}

// threadIdx.x read where it is used: a volatile read is not hoisted out of a loop, so values derived from it do not
// stay live (and spill) across the loop.
__device__ __forceinline__ int thread_index_x() {
  int x;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(x));
  return x;
}

// One 8-byte store to a 32-bit shared-memory address (st.shared: no generic-address translation).
__device__ __forceinline__ void st_shared_f32x2(uint32_t addr, float a, float b) {
  asm volatile("st.shared.v2.f32 [%0], {%1, %2};" ::"r"(addr), "f"(a), "f"(b) : "memory");
}

// Inter-CTA ordering of bulk (TMA) stores, for a CTA whose TMA writes must land before another CTA's TMA touches the
// same memory (sm90 only: cp.async.bulk). The writer raises a flag once its stores are in global memory
// (release_flag_after_bulk_stores); the reader waits for the flag before issuing its own bulk operation
// (acquire_flag_before_bulk_ops).

// Once at most kPending of this thread's bulk async-groups are incomplete (the others' writes performed, not only
// their shared-memory reads), fences the async proxy against the generic one and sets *flag = 1 with release
// semantics at GPU scope.
template <int kPending>
__device__ __forceinline__ void release_flag_after_bulk_stores(int* flag) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.wait_group %0;" ::"n"(kPending) : "memory");
  asm volatile("fence.proxy.async.global;" ::: "memory");
#endif
  asm volatile("st.release.gpu.global.b32 [%0], %1;" ::"l"(flag), "r"(1) : "memory");
}

// Spins (with short sleeps) until *flag != 0, acquiring at GPU scope, then fences the generic proxy against the async
// one, so that the bulk operations this thread issues next see the writes the flag released.
__device__ __forceinline__ void acquire_flag_before_bulk_ops(const int* flag) {
  int value;
  for (;;) {
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(value) : "l"(flag) : "memory");
    if (value != 0) break;
    __nanosleep(32);
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.global;" ::: "memory");
#endif
}

// The SiLU's sigmoid follows the element type. bf16 (8-bit mantissa): 0.5 tanh(z / 2) + 0.5, one MUFU.TANH, whose
// relative error (~2^-11) sits 8x under bf16's rounding. fp16 (11-bit mantissa) would see that error at one ulp of
// P, and more at negative z, where sigmoid(z) is small but tanh's absolute error is not: there (kExactSigmoid)
// 1 / (1 + 2^(-z log2 e)), MUFU.EX2 + MUFU.RCP, relative error ~2^-21 (one more special-function op per element).
template <typename Element>
inline constexpr bool kExactSigmoid = std::is_same_v<Element, __half>;

__device__ __forceinline__ float tanh_approx(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// 1 / (1 + 2^m) = sigmoid(-m ln 2); 2^m -> inf at large m gives 0, 2^m -> 0 gives 1.
__device__ __forceinline__ float sigmoid_of_exp2_arg(float m) {
  float t, s;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(t) : "f"(m));
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(s) : "f"(1.f + t));
  return s;
}

constexpr float kLog2e = 1.4426950408889634f;

template <typename Element>
__device__ __forceinline__ float sigmoid(float x) {
  if constexpr (kExactSigmoid<Element>) {
    return sigmoid_of_exp2_arg(x * -kLog2e);
  } else {
    return fmaf(0.5f, tanh_approx(0.5f * x), 0.5f);
  }
}

// f = SiLU(z) and f'(z) = s (1 + z (1 - s)), s = sigmoid(z).
template <typename Element>
__device__ __forceinline__ void silu_and_grad(float z, float& f, float& df) {
  const float s = sigmoid<Element>(z);
  f = z * s;
  df = s * fmaf(z, 1.f - s, 1.f);
}

// SiLU(alpha x) = x * (alpha / 2) (1 + tanh(alpha x / 2)): three instructions and one MUFU (the forward's P; the
// caller passes half_alpha = alpha / 2). kExactSigmoid: x * alpha * sigmoid(alpha x).
template <typename Element>
__device__ __forceinline__ float silu_scaled(float x, float half_alpha) {
  if constexpr (kExactSigmoid<Element>) {
    const float alpha = half_alpha + half_alpha;  // loop-invariant, like the constants below
    return x * alpha * sigmoid_of_exp2_arg(x * (alpha * -kLog2e));
  } else {
    return x * fmaf(half_alpha, tanh_approx(half_alpha * x), half_alpha);
  }
}

// The backward's pair at z = alpha x, already scaled: f = SiLU(z) * scale and g = d f / d x = SiLU'(z) * alpha * scale
// (P and the dX factor, scale = 1 / N). With h = tanh(z / 2), sigmoid(z) = (1 + h) / 2 and z (1 - sigmoid(z)) =
// (z / 2) (1 - h), both share e = coef (1 + h), coef = alpha * scale / 2:
//   f = x e,   g = e (1 + (z / 2) (1 - h)).
// Six instructions (one MUFU) per element where SiLU, its derivative and the two scalings take ten (the compiler may
// not re-associate the products); the caller passes half_alpha = alpha / 2 and coef. kExactSigmoid: the same with
// s = sigmoid(z) from EX2 + RCP, e = 2 coef s and g = e (1 + z (1 - s)).
template <typename Element>
__device__ __forceinline__ void silu_and_grad_scaled(float x, float half_alpha, float coef, float& f, float& g) {
  if constexpr (kExactSigmoid<Element>) {
    const float alpha = half_alpha + half_alpha;
    const float s = sigmoid_of_exp2_arg(x * (alpha * -kLog2e));
    const float e = (coef + coef) * s;
    const float z = alpha * x;
    f = x * e;
    g = fmaf(e, fmaf(-z, s, z), e);
  } else {
    const float w = half_alpha * x;  // z / 2
    const float h = tanh_approx(w);
    const float e = fmaf(coef, h, coef);
    f = x * e;
    g = fmaf(e, fmaf(-w, h, w), e);
  }
}

template <typename Element>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

template <typename Element>
__device__ __forceinline__ float to_float(Element x);

template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <>
__device__ __forceinline__ float to_float<__half>(__half x) {
  return __half2float(x);
}

// Index of the bias plane (of the [batch * rab_heads] planes) that (sequence b, head) reads and whose gradient it
// adds to: shared by every head when there is 1 rab head.
__device__ __forceinline__ int rab_plane(const HstuFwdParams& p, int b, int head) {
  return b * p.rab_heads + (p.rab_heads == 1 ? 0 : head);
}

// Element offset of that [max_seq_len, max_seq_len] plane.
__device__ __forceinline__ int64_t rab_plane_offset(const HstuFwdParams& p, int b, int head) {
  return int64_t(rab_plane(p, b, head)) * p.max_seq_len * p.max_seq_len;
}

// Copies `rows` rows of a [rows, kHeadDim] gmem slab (row stride in elements) into a swizzled smem tile;
// rows at or past `valid_rows` are zero-filled.
template <typename Traits, int kRows>
__device__ __forceinline__ void load_tile(typename Traits::Element* smem, const typename Traits::Element* gmem,
                                          int64_t row_stride, int valid_rows) {
  using Element = typename Traits::Element;
  using Copy = cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>;
  constexpr int kChunks = kRows * Traits::kChunksPerRow;
  for (int c = threadIdx.x; c < kChunks; c += Traits::kThreads) {
    const int row = c / Traits::kChunksPerRow;
    const int col = (c % Traits::kChunksPerRow) * 8;
    const bool pred = row < valid_rows;
    const Element* src = gmem + (pred ? row * row_stride : 0) + col;
    Copy::copy(*reinterpret_cast<const cute::uint128_t*>(src),
               *reinterpret_cast<cute::uint128_t*>(smem + Traits::swizzle(row, col)), pred);
  }
}

}  // namespace detail

// Host side: launches `kernel` with `smem` bytes of dynamic shared memory (opting in above 48 KiB); empty grids are
// no-ops. Returns "" on success, else the CUDA error string.
template <typename Kernel, typename Params>
const char* launch_kernel(Kernel kernel, dim3 grid, int threads, int smem, const Params& p, cudaStream_t stream) {
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return cudaGetErrorString(err);
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return "";
  kernel<<<grid, threads, smem, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? "" : cudaGetErrorString(err);
}

}  // namespace gr_kernels
