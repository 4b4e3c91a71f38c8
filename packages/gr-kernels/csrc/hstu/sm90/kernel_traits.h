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
#include "hstu/sm90/tile_order.h"

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

// Key-tile width per head dim: the largest that keeps S (fp32), P (16-bit) and O (fp32) of 64 rows inside 240
// registers per consumer thread without spills (ptxas -v; only the per-thread rab-load fallback, which also holds
// the bias of a tile in registers, spills ~100 bytes at head dims 128 and 256), and two K + two V stages plus Q (plus
// two rab stages with TMA rab) inside 227 KiB of shared memory.
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

  // Relative attention bias through TMA (RabSource::kSmem): the [kBlockM x kBlockN] bias tile of each key tile lands
  // in a stage of its own next to the K stage of that tile (same mbarrier, same release), behind SharedStorage so
  // that the other kernels' shared memory stays as it was. Key-contiguous rows with the 128-byte swizzle: the 32-bit
  // reads of the S accumulator order (per warp: 8 rows x one 16-byte chunk) then hit 32 distinct banks.
  using SmemLayoutRab = decltype(cute::tile_to_shape(
      SmemAtom{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kBlockN>, cute::Int<kStages>>{}));
  // Bias view (query position, key position, plane = sequence * rab_heads + rab head): [max_seq_len, max_seq_len]
  // planes, key-contiguous.
  using TmaRab = decltype(cute::make_tma_copy(
      cute::SM90_TMA_LOAD{}, cute::make_tensor(cute::make_gmem_ptr(static_cast<Element const*>(nullptr)), GmemLayout{}),
      cute::take<0, 2>(SmemLayoutRab{}), cute::Shape<cute::Int<kBlockM>, cute::Int<kBlockN>>{}, cute::_1{}));
  static constexpr uint32_t kTmaBytesRab = kBlockM * kBlockN * sizeof(Element);
  static constexpr int kSmemRabOffset = (kSmemBytes + 1023) / 1024 * 1024;  // swizzle atoms want 1024-byte bases
  static constexpr int kSmemBytesRab = kSmemRabOffset + int(cute::cosize_v<SmemLayoutRab> * sizeof(Element));
  static_assert(kSmemBytesRab <= 227 * 1024, "shared memory budget of one sm90 CTA exceeded (TMA bias stages)");
};

// Where a kernel reads the relative attention bias from: nowhere (rab-free kernels), per-thread global loads into
// registers (any rab; the fallback when its rows are not 16-byte aligned), or shared memory that the producer fills
// through TMA with each K tile.
enum class RabSource : int { kNone = 0, kGlobal = 1, kSmem = 2 };

// Kernel arguments: the launch's plain parameters plus the TMA descriptors (passed as __grid_constant__).
template <typename Traits>
struct FwdArgs {
  HstuFwdParams p;
  typename Traits::TmaQ tma_q;
  typename Traits::TmaKV tma_k;
  typename Traits::TmaKV tma_v;
  typename Traits::TmaRab tma_rab;  // built only for RabSource::kSmem launches (value-initialised otherwise)
  FwdTileOrder order;  // unsplit launches: which tile each CTA takes (tile_order.h); split launches use blockIdx
  bool causal_fast = true;  // masked tiles of causal_fast sequences use the few-compare mask (causal_fast.h)
};

}  // namespace sm90
}  // namespace gr_kernels
