// Epilogue of the Hopper HSTU forward kernel: O / N -> 16-bit rows of the jagged output (store), or with split KV
// -> fp32 rows of this split's workspace plane (store_partial).
//
// Each consumer warpgroup stages its own 64 rows of O in the Q buffer (its GMMAs read only those rows of Q, and all
// of them have completed), syncs on a warpgroup-local named barrier, then writes whole 16-byte chunks of the rows
// that belong to the sequence: rows past its end are the next sequence's and must not be touched. seq_start, m0 and
// length count output rows: q's rows (q_offsets) with delta q, the sequence's otherwise.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include "hstu/fwd_split.cuh"
#include "hstu/params.h"
#include "hstu/sm90/kernel_traits.h"
#include "hstu/utils.cuh"

namespace gr_kernels {
namespace sm90 {

template <typename Element_, typename Traits>
struct FwdEpilogue {
  using Element = typename Traits::Element;
  static constexpr int kBlockM = Traits::kBlockM;
  static constexpr int kHeadDim = Traits::kHeadDim;
  static constexpr int kChunksPerRow = kHeadDim / 8;  // 16-byte chunks; the 128-byte swizzle keeps each contiguous
  // User barrier ids: NamedBarrier adds CUTLASS's reserved count (0 = __syncthreads, 1..7 its own), so 0 and 1
  // are hardware barriers 8 and 9.
  static constexpr int kNamedBarrierBase = 0;

  template <typename FragO>
  __device__ static void store(const HstuFwdParams& p, typename Traits::SharedStorage& ss, FragO const& tOrO,
                               int tidx, int seq_start, int head, int m0, int length) {
    using namespace cute;
    Tensor sO = make_tensor(make_smem_ptr(ss.q.data()), typename Traits::SmemLayoutO{});
    typename Traits::MmaPV mma_pv;
    Tensor tOsO = mma_pv.get_thread_slice(tidx).partition_C(sO);
    const float scale = p.inv_scaling_seqlen;
    // Elements 2t, 2t + 1 are adjacent columns (an even one first): one 32-bit shared store per pair.
    CUTE_UNROLL
    for (int t = 0; t < size(tOrO) / 2; ++t) {
      *reinterpret_cast<uint32_t*>(&tOsO(2 * t)) =
          detail::pack2<Element_>(tOrO(2 * t) * scale, tOrO(2 * t + 1) * scale);
    }

    const int warpgroup = tidx / 128;
    cutlass::arch::NamedBarrier::sync(128, kNamedBarrierBase + warpgroup);

    Element_* out = static_cast<Element_*>(p.out) + int64_t(seq_start) * p.o_row_stride +
                    int64_t(head) * p.o_head_stride;
    const int t = tidx % 128;
    CUTE_UNROLL
    for (int c = t; c < 64 * kChunksPerRow; c += 128) {
      const int r = warpgroup * 64 + c / kChunksPerRow;
      const int col = (c % kChunksPerRow) * 8;
      if (m0 + r < length) {
        *reinterpret_cast<uint4*>(out + int64_t(m0 + r) * p.o_row_stride + col) =
            *reinterpret_cast<const uint4*>(&sO(r, col));
      }
    }
  }

  // Split KV: this CTA's share of O / N, in fp32, into plane `split` of p.split_accum (hstu/fwd_split.cuh) straight
  // from the accumulators: each pair (2t, 2t + 1) is two adjacent columns (an even one first), so one 8-byte store,
  // and the four threads of a quad fill 32 contiguous bytes. Only the sequence's query rows are written; the reduce
  // reads no others. q_start, m0 and length count q's rows, as in store().
  template <typename FragO>
  __device__ static void store_partial(const HstuFwdParams& p, FragO const& tOrO, int tidx, int split, int q_start,
                                       int head, int m0, int length) {
    using namespace cute;
    typename Traits::MmaPV mma_pv;
    Tensor tOcO = mma_pv.get_thread_slice(tidx).partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
    const float scale = p.inv_scaling_seqlen;
    float* accum = p.split_accum + split_accum_offset(p, split, q_start, head);
    const int64_t row_stride = int64_t(p.heads) * kHeadDim;
    CUTE_UNROLL
    for (int t = 0; t < size(tOrO) / 2; ++t) {
      const int r = get<0>(tOcO(2 * t));
      const int col = get<1>(tOcO(2 * t));
      if (m0 + r < length) {
        *reinterpret_cast<float2*>(accum + int64_t(m0 + r) * row_stride + col) =
            make_float2(tOrO(2 * t) * scale, tOrO(2 * t + 1) * scale);
      }
    }
  }
};

}  // namespace sm90
}  // namespace gr_kernels
