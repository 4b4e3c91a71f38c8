// Device helpers shared by the forward and backward kernels: SiLU pieces, packing, swizzled tile loads.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include <cute/arch/copy_sm80.hpp>

namespace gr_kernels {

namespace detail {

__device__ __forceinline__ float fast_sigmoid(float x) {
  // sigmoid(x) = 0.5 tanh(x / 2) + 0.5: one MUFU.TANH instead of an exp and a reciprocal.
  float t;
  asm("tanh.approx.f32 %0, %1;" : "=f"(t) : "f"(0.5f * x));
  return fmaf(0.5f, t, 0.5f);
}

// f = SiLU(z) and f'(z) = s (1 + z (1 - s)), s = sigmoid(z).
__device__ __forceinline__ void silu_and_grad(float z, float& f, float& df) {
  const float s = fast_sigmoid(z);
  f = z * s;
  df = s * fmaf(z, 1.f - s, 1.f);
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

}  // namespace gr_kernels
