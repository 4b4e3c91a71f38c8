// The zeros of the Hopper backward's drab, written without a whole-buffer memset.
//
// drab ([batch, rab_heads, max_seq_len, drab_row_stride], 16-bit) receives the dX tiles as TMA reduce-adds, so the
// tiles some CTA adds into must hold zeros first; everything else is zero because no key or query reaches it
// (rows and keys past a sequence's end, the tiles a causal mask or a window never visits). Zeroing the whole buffer
// up front costs a full write of it before the backward starts (1 GB at batch 32, length 4096), most of which,
// in a jagged batch, lies outside every sequence. Instead:
//   - zero_visited_drab_kernel, launched just before the backward, zeroes only the tiles that will be reduce-added
//     into (the same query_rows rule as the backward's CTAs);
//   - the backward writes the other zeros while it computes: a CTA whose key tile lies past its sequence's end
//     (which has nothing else to do) zeroes its whole key column, and in every other CTA the producer warpgroup's
//     three idle warps zero the rows above and below the query tiles its consumers visit.
// A plane shared by the heads (rab_heads == 1) is zeroed by head 0's CTAs only.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "hstu/mask.h"
#include "hstu/params.h"
#include "hstu/utils.cuh"

namespace gr_kernels {
namespace sm90 {

// Rows [r0, r1) of key column n0 whose (query tile, key tile) blocks the backward reduce-adds dX into: whole query
// tiles from m_begin up to the one holding m_end - 1 (query_rows, the loop of BwdMainloop::load), clipped at
// max_seq_len as TMA clips them; r0 == r1 when the column has no query tile.
template <typename Mainloop>
__host__ __device__ __forceinline__ void drab_visited_rows(const HstuFwdParams& p, const SequenceMask& mask, int n0,
                                                           int& r0, int& r1) {
  int m_begin, m_end;
  Mainloop::query_rows(p, mask, n0, m_begin, m_end);
  r0 = r1 = 0;
  if (m_begin >= m_end) return;
  const int tiles_end = (m_end + Mainloop::kBlockM - 1) / Mainloop::kBlockM * Mainloop::kBlockM;
  r0 = m_begin;
  r1 = tiles_end < p.max_seq_len ? tiles_end : p.max_seq_len;
}

// Whether the CTAs of `head` write the zeros of their drab plane (a shared plane: head 0's only).
__device__ __forceinline__ bool zeroes_drab_plane(const HstuBwdParams& p, int head) {
  return p.drab != nullptr && (p.rab_heads != 1 || head == 0);
}

// Zeroes rows [r0, r1) x keys [n0, n0 + kBlockN) of drab plane `plane` with 16-byte stores, threads `tid` of
// `nthreads`. Keys are cut at the row stride, not at max_seq_len: the padding columns are ours (sliced off by the
// caller), so the stores stay whole. The host checks a 16-byte aligned base and a row stride that is a multiple of 8;
// n0 is a multiple of kBlockN, so every store is aligned.
template <int kBlockN>
__device__ __forceinline__ void zero_drab_rows(const HstuBwdParams& p, int plane, int n0, int r0, int r1, int tid,
                                               int nthreads) {
  constexpr int kVecs = kBlockN / 8;  // 16-byte stores per row of the key tile
  static_assert(kBlockN % 8 == 0, "key tiles come in 16-byte pieces");
  const int64_t stride = p.drab_row_stride;
  const int64_t cols = stride - n0 < kBlockN ? stride - n0 : kBlockN;
  uint16_t* base = static_cast<uint16_t*>(p.drab) + (int64_t(plane) * p.max_seq_len + r0) * stride + n0;
  const int total = (r1 - r0) * kVecs;
  for (int i = tid; i < total; i += nthreads) {
    const int c = (i % kVecs) * 8;
    if (c < cols) *reinterpret_cast<uint4*>(base + int64_t(i / kVecs) * stride + c) = make_uint4(0u, 0u, 0u, 0u);
  }
}

// Grid (key tiles of max_seq_len, rab_heads, batch): zeroes the tiles of drab that the backward reduce-adds into.
template <typename Mainloop>
__global__ void zero_visited_drab_kernel(const __grid_constant__ HstuBwdParams p) {
  const int n0 = blockIdx.x * Mainloop::kBlockN;
  const int b = blockIdx.z;
  const int length = p.seq_offsets[b + 1] - p.seq_offsets[b];
  if (n0 >= length) return;  // no CTA of this key tile reduce-adds anything: the backward zeroes the column
  const SequenceMask mask = SequenceMask::of_sequence(p, b, length);
  int r0, r1;
  drab_visited_rows<Mainloop>(p, mask, n0, r0, r1);
  zero_drab_rows<Mainloop::kBlockN>(p, b * p.rab_heads + blockIdx.y, n0, r0, r1, threadIdx.x, blockDim.x);
}

}  // namespace sm90
}  // namespace gr_kernels
