// Epilogue of the Hopper HSTU backward kernel: dK and dV (fp32 accumulators) -> 16-bit rows of the contiguous
// [total, heads, dim] gradients. Rows past the sequence end belong to the next sequence and are not written; keys
// that no query sees still get their (zero) rows.
#pragma once

#include <cute/tensor.hpp>

#include "hstu/params.h"
#include "hstu/sm90/kernel_traits_bwd.h"
#include "hstu/utils.cuh"

namespace gr_kernels {
namespace sm90 {

template <typename Element_, typename Traits>
struct BwdEpilogue {
  static constexpr int kBlockN = Traits::kBlockN;
  static constexpr int kHeadDim = Traits::kHeadDim;

  template <typename FragDkv>
  __device__ static void store(const HstuBwdParams& p, FragDkv const& tdKrdK, FragDkv const& tdVrdV, int tidx,
                               int seq_start, int head, int n0, int length) {
    using namespace cute;
    typename Traits::MmaDkv mma_dkv;
    Tensor tdKcdK = mma_dkv.get_thread_slice(tidx).partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));
    const int64_t row_elems = int64_t(p.heads) * kHeadDim;
    const int64_t base = (int64_t(seq_start + n0) * p.heads + head) * kHeadDim;
    Element_* dk = static_cast<Element_*>(p.dk) + base;
    Element_* dv = static_cast<Element_*>(p.dv) + base;
    // Elements 2t, 2t + 1 are adjacent columns (an even one first): one 32-bit store per pair.
    CUTE_UNROLL
    for (int t = 0; t < decltype(size(tdKrdK))::value / 2; ++t) {
      const int r = get<0>(tdKcdK(2 * t));
      const int c = get<1>(tdKcdK(2 * t));
      if (n0 + r < length) {
        *reinterpret_cast<uint32_t*>(dk + r * row_elems + c) = detail::pack2<Element_>(tdKrdK(2 * t), tdKrdK(2 * t + 1));
        *reinterpret_cast<uint32_t*>(dv + r * row_elems + c) = detail::pack2<Element_>(tdVrdV(2 * t), tdVrdV(2 * t + 1));
      }
    }
  }
};

}  // namespace sm90
}  // namespace gr_kernels
