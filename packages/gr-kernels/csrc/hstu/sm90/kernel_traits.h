// Tile shapes, shared-memory layouts, MMA and TMA types of the Hopper (sm90a) HSTU forward kernel.
//
// A CTA owns kBlockM = 128 query rows of one (sequence, head) and runs three warpgroups: warpgroup 0 is the TMA
// producer (one elected thread issues every load), warpgroups 1 and 2 are consumers that each own 64 query rows
// and issue WGMMA. S = Q K^T is an SS GMMA (both operands in shared memory); O += P V is an RS GMMA with P kept in
// registers: the fp32 S accumulator and the 16-bit A operand of the next GMMA have the same per-thread element
// order, so P needs no shuffle. K and V stream through two separate kStages-deep mbarrier pipelines, so S = Q K^T
// of a tile can start while its V is still landing.
#pragma once

#include <cute/tensor.hpp>

#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "hstu/params.h"

namespace gr_kernels {
namespace sm90 {

template <typename Element>
struct CuteType;
template <>
struct CuteType<__nv_bfloat16> {
  using type = cutlass::bfloat16_t;
};
template <>
struct CuteType<__half> {
  using type = cutlass::half_t;
};

// Key-tile width per head dim: the largest that keeps S (fp32), P (16-bit), the rab prefetch and O (fp32) of 64
// rows inside 240 registers per consumer thread without spills (ptxas -v), and two K + two V stages plus Q inside
// 227 KiB of shared memory.
template <int kHeadDim>
struct FwdBlockN;
template <>
struct FwdBlockN<64> {
  static constexpr int value = 128;
};
template <>
struct FwdBlockN<128> {
  static constexpr int value = 128;
};
template <>
struct FwdBlockN<256> {
  static constexpr int value = 64;  // 80 spills (~18 registers) once S(t+1) and P(t) V(t) overlap
};

template <typename Element_, int kHeadDim_>
struct FwdTraits {
  using Element = typename CuteType<Element_>::type;  // cutlass 16-bit type (what GMMA atoms are specialised on)
  using ElementAccum = float;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 128;
  static constexpr int kBlockN = FwdBlockN<kHeadDim>::value;
  static constexpr int kStages = 2;
  static constexpr int kConsumerWarpGroups = kBlockM / 64;
  static constexpr int kThreads = (kConsumerWarpGroups + 1) * 128;
  static constexpr int kConsumerThreads = kConsumerWarpGroups * 128;
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
  static_assert(kHeadDim % 64 == 0, "head dim must be a multiple of 64 (128-byte swizzle rows)");
  static_assert(kBlockN % 16 == 0, "key tile must be a multiple of the GMMA K step (16)");

  using TileShapeQK = cute::Shape<cute::Int<kBlockM>, cute::Int<kBlockN>, cute::Int<kHeadDim>>;  // S = Q K^T
  using TileShapePV = cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>, cute::Int<kBlockN>>;  // O += P V
  using AtomLayout = cute::Layout<cute::Shape<cute::Int<kConsumerWarpGroups>, cute::_1, cute::_1>>;
  using MmaQK = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, ElementAccum, TileShapeQK>(), AtomLayout{}));
  using MmaPV = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<Element, Element, ElementAccum, TileShapePV, cute::GMMA::Major::K,
                                 cute::GMMA::Major::MN>(),
      AtomLayout{}));

  // Head-dim-contiguous tiles with the 128-byte swizzle GMMA and TMA both understand.
  using SmemAtom = cute::GMMA::Layout_K_SW128_Atom<Element>;
  using SmemLayoutQ = decltype(cute::tile_to_shape(SmemAtom{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>>{}));
  using SmemLayoutK = decltype(cute::tile_to_shape(
      SmemAtom{}, cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>, cute::Int<kStages>>{}));
  using SmemLayoutV = SmemLayoutK;
  // V read as the (head dim x keys) B operand of P V: the same bytes, modes swapped (MN-major for the GMMA).
  using SmemLayoutVt = decltype(cute::composition(
      SmemLayoutV{}, cute::make_ordered_layout(
                         cute::Shape<cute::Int<kHeadDim>, cute::Int<kBlockN>, cute::Int<kStages>>{},
                         cute::Step<cute::_2, cute::_1, cute::_3>{})));
  using SmemLayoutO = SmemLayoutQ;  // the epilogue stages O in Q's buffer

  // Global views: jagged [total, heads, dim] as (row, dim, head), dim contiguous.
  using GmemShape = cute::Shape<int32_t, int32_t, int32_t>;
  using GmemStride = cute::Stride<int64_t, cute::_1, int64_t>;
  using GmemLayout = cute::Layout<GmemShape, GmemStride>;
  using TmaQ = decltype(cute::make_tma_copy(
      cute::SM90_TMA_LOAD{}, cute::make_tensor(cute::make_gmem_ptr(static_cast<Element const*>(nullptr)), GmemLayout{}),
      SmemLayoutQ{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>>{}, cute::_1{}));
  using TmaKV = decltype(cute::make_tma_copy(
      cute::SM90_TMA_LOAD{}, cute::make_tensor(cute::make_gmem_ptr(static_cast<Element const*>(nullptr)), GmemLayout{}),
      cute::take<0, 2>(SmemLayoutK{}), cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>>{}, cute::_1{}));

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = typename Pipeline::PipelineState;
  static constexpr uint32_t kTmaBytesQ = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kTmaBytesKV = kBlockN * kHeadDim * sizeof(Element);

  struct SharedStorage {
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>, 1024> q;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutK>, 1024> k;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutV>, 1024> v;
    alignas(16) cutlass::arch::ClusterTransactionBarrier barrier_q;
    typename Pipeline::SharedStorage pipeline_k;
    typename Pipeline::SharedStorage pipeline_v;
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
  static_assert(kSmemBytes <= 227 * 1024, "shared memory budget of one sm90 CTA exceeded");
};

// Kernel arguments: the launch's plain parameters plus the TMA descriptors (passed as __grid_constant__).
template <typename Traits>
struct FwdArgs {
  HstuFwdParams p;
  typename Traits::TmaQ tma_q;
  typename Traits::TmaKV tma_k;
  typename Traits::TmaKV tma_v;
};

}  // namespace sm90
}  // namespace gr_kernels
