// Split-KV forward ("flash-decoding" for HSTU attention) pieces shared by the Hopper and the SM80-MMA kernels.
//
// HSTU attention has no softmax: O = (1/N) sum over keys of SiLU(alpha (q.k + rab)) * mask * v is additive over key
// ranges. When the query grid is small (delta q: a few query rows against thousands of cached keys) the key tiles
// of each (query tile, head, sequence) are divided among p.num_splits CTAs; each writes its fp32 share of O
// (already scaled by 1/N) to p.split_accum, and the reduce kernel below sums the shares in split order (no atomics:
// deterministic) and casts them to the output dtype. Nothing needs rescaling, unlike softmax flash-decoding.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "hstu/params.h"
#include "hstu/utils.cuh"

namespace gr_kernels {

// Key tiles [lo_s, hi_s) of split `split` of `splits` over the unsplit CTA's tiles [lo, hi): contiguous ranges of
// c = ceil((hi - lo) / splits) tiles in order, the last ones possibly shorter or empty (lo_s >= hi_s). Together
// they cover [lo, hi) exactly once (host-callable so the sm90 self-check can test it).
__host__ __device__ __forceinline__ void split_key_blocks(int lo, int hi, int splits, int split, int& lo_s,
                                                          int& hi_s) {
  const int count = hi > lo ? hi - lo : 0;
  const int chunk = (count + splits - 1) / splits;
  const int first = lo + split * chunk;
  const int last = first + chunk < hi ? first + chunk : hi;
  lo_s = first;
  hi_s = last;
}

// Offset (in floats) of (split, query row, head) in the [num_splits, total_q_rows, heads, head_dim] workspace.
__host__ __device__ __forceinline__ int64_t split_accum_offset(const HstuFwdParams& p, int split, int64_t row,
                                                               int head) {
  return ((int64_t(split) * p.total_q_rows + row) * p.heads + head) * p.head_dim;
}

// One thread per 8 head-dim elements of one (query row, head): sums the shares of every split (split 0 first) and
// stores 16 bytes of the output row.
template <typename Element>
__global__ void __launch_bounds__(256) hstu_fwd_split_reduce_kernel(const HstuFwdParams p) {
  const int chunks = p.head_dim / 8;
  const int64_t work = p.total_q_rows * p.heads * chunks;
  const int64_t plane = p.total_q_rows * p.heads * p.head_dim;  // floats per split
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < work;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row_head = idx / chunks;
    const int col = int(idx % chunks) * 8;
    const int64_t row = row_head / p.heads;
    const int head = int(row_head % p.heads);
    const float* src = p.split_accum + row_head * p.head_dim + col;
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int s = 0; s < p.num_splits; ++s) {
      // Read once: evict-first loads keep the workspace from pushing K/V of the next call out of L2.
      const float4 a = __ldcs(reinterpret_cast<const float4*>(src + s * plane));
      const float4 b = __ldcs(reinterpret_cast<const float4*>(src + s * plane + 4));
      acc[0] += a.x, acc[1] += a.y, acc[2] += a.z, acc[3] += a.w;
      acc[4] += b.x, acc[5] += b.y, acc[6] += b.z, acc[7] += b.w;
    }
    uint4 packed;
    packed.x = detail::pack2<Element>(acc[0], acc[1]);
    packed.y = detail::pack2<Element>(acc[2], acc[3]);
    packed.z = detail::pack2<Element>(acc[4], acc[5]);
    packed.w = detail::pack2<Element>(acc[6], acc[7]);
    Element* out = static_cast<Element*>(p.out) + row * p.o_row_stride + int64_t(head) * p.o_head_stride + col;
    *reinterpret_cast<uint4*>(out) = packed;
  }
}

// Launches the reduce after a split forward kernel on the same stream (graph-capturable: no host sync).
template <typename Element>
const char* run_hstu_fwd_split_reduce(const HstuFwdParams& p, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t work = p.total_q_rows * p.heads * (p.head_dim / 8);
  if (work == 0) return "";
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  const dim3 grid(unsigned(blocks < 65535 ? blocks : 65535));  // grid-stride loop past that
  return launch_kernel(hstu_fwd_split_reduce_kernel<Element>, grid, kThreads, 0, p, stream);
}

}  // namespace gr_kernels
