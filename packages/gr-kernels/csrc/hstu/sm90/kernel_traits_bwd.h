// Tile shapes, shared-memory layouts, MMA and TMA types of the Hopper (sm90a) HSTU backward kernel.
//
// A CTA owns kBlockN keys of one (sequence, head) and walks the kBlockM-row query tiles that can see them. Three
// warpgroups: warpgroup 0 is the TMA producer (K and V once, then Q and dO tiles through two kStages-deep mbarrier
// pipelines; with kDqInStage its warp 1 also issues the dQ reduce-adds; with a bias its warp 2 writes the dX tiles
// into drab and warp 3 (and warp 1 if free) zeroes the rows of drab no tile covers); warpgroups 1 and 2 issue the
// five GEMMs of a query tile as warpgroup MMAs (all SS: both operands in shared memory):
//   S  = Q K^T   and  dP = dO V^T     (M = queries, N = keys, K = head dim; the warpgroups split the keys)
//   dV += P^T dO and  dK += dX^T Q    (M = keys, N = head dim, K = queries; P and dX read transposed from smem)
//   dQ  = dX K                        (M = queries, N = head dim, K = keys; the warpgroups split the head dim)
// P and dX (16-bit) go through double-buffered shared memory because the key-major GEMMs need them transposed and
// dQ needs every key of the tile, which spans both warpgroups. That is the SS plan; the RS plan (kRsDkv: 128-key
// tiles, head dims 64 and 128) computes S^T and dP^T instead (M = keys, each warpgroup its own 64), whose accumulators
// are already the register A operands of dV and dK: P^T and dX^T stay in registers, and only dX goes to shared
// memory, for dQ (mainloop_bwd.cuh, mma_rs). Its bias kernel (kRabTma, head dim 64) loads each bias tile with the Q
// tile through TMA and reads it transposed from shared memory.
//
// Tiles per head dim (BwdTile): the dK + dV accumulators (fp32, kBlockN x kHeadDim each) must fit the consumer
// registers next to S, dP and dQ without serialised GMMAs (ptxas -v; tools/kernel_resources.py): 128 keys at head
// dims 64 and 128 (each warpgroup owns 64 keys of dK/dV: 128 registers a thread at 128; 64 keys at 128 with a bias),
// 64 keys at 256 (each warpgroup owns half of the head dim of all 64 keys). dQ leaves through shared memory and TMA
// reduce-adds (kDqTma), which keeps the atomics' addresses out of the registers: at 64 and 128 from a tile of its own,
// at 256 (no shared memory left) from the tile's Q / dO stage once dV and dK have read it (kDqInStage).
#pragma once

#include <type_traits>

#include <cute/tensor.hpp>

#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "hstu/params.h"
#include "hstu/sm90/bwd_config.h"
#include "hstu/sm90/kernel_traits.h"

namespace gr_kernels {
namespace sm90 {

// kDqTma: each query tile's dQ leaves through shared memory as one TMA reduce-add into dq_accum instead of per-thread
// float2 atomics. That takes a (kBlockM x head dim) fp32 tile of shared memory, which head dim 256 has no room for.
// kRab: the instantiation with a bias, whose loads take registers too.
template <int kHeadDim, bool kRab>
struct BwdTile;
// kRsDkv (128-key tiles): S^T = K Q^T and dP^T = V dO^T instead of S and dP (M = keys), so each warpgroup holds P^T
// and dX^T of its own 64 keys in registers, in the layout of the A operand of dV += P^T dO and dK += dX^T Q: those
// two GEMMs read A from registers (RS) and P never goes to shared memory; dX still does (dQ needs every key of it),
// through transposing stmatrix. Switches: bwd_config.h (GR_HSTU_BWD_RS_DKV=0: the all-SS plan).
// With GR_HSTU_BWD_RS_RAB (bwd_config.h) the bias kernels of head dims 64 and 128 take the RS plan too: the producer
// loads each (query tile, key tile) of the bias with the Q tile through TMA (bias rows 16-byte aligned: the host
// dispatch), and the consumers read it transposed (ldmatrix .trans) in the S^T accumulator's element order. Without
// it: the SS plan with per-thread bias loads.
#ifndef GR_HSTU_BWD_HDIM64_EARLY_S
#define GR_HSTU_BWD_HDIM64_EARLY_S 1
#endif
template <bool kRab>
struct BwdTile<64, kRab> {
  static constexpr int kBlockN = 128;
  static constexpr int kDkvAtomM = 2;  // dK/dV: warpgroups split the keys
  static constexpr bool kDqTma = true;
  static constexpr bool kDqInStage = false;
  static constexpr bool kRsDkv = kRab ? bwd_rab_via_tma(64) : GR_HSTU_BWD_RS_DKV != 0;
  // kEarlyS measured 0-3% slower here (7% with a bias) with the three tile bodies (see BwdTile<128>); with one (H200,
  // B=32, T=4096, two alternating runs) 345 / 346 -> 349 / 351 uniform, 296 / 296 -> 302 / 305 jagged, with a bias
  // unchanged (261 / 262, 206 / 207). -D GR_HSTU_BWD_HDIM64_EARLY_S=0: without it.
  static constexpr bool kEarlyS = kRsDkv && GR_HSTU_BWD_HDIM64_EARLY_S != 0;
};
// Overridable at compile time (-D) to check another register plan without editing (tools/kernel_resources.py); 64
// keys with a bias also need -D GR_HSTU_BWD_HDIM128_RS_RAB=0 (the RS bias plan is 128 keys: BwdTraits asserts it).
#ifndef GR_HSTU_BWD_HDIM128_BLOCK_N
#define GR_HSTU_BWD_HDIM128_BLOCK_N 128
#endif
#ifndef GR_HSTU_BWD_HDIM128_RAB_BLOCK_N
#define GR_HSTU_BWD_HDIM128_RAB_BLOCK_N 64
#endif
// kEarlyS (RS plan): each query tile issues the next tile's S^T = K Q^T as soon as its dQ has left, so that GEMM
// queues behind the tile's dK on the tensor cores instead of starting after it (mainloop_bwd.cuh, mma_rs). H200,
// B=32, T=4096, causal, first with the three tile bodies of for_each_query_tile (ptxas then serialised every GMMA for
// want of registers, C7512): 363-369 -> 373-376 TFLOP/s uniform, 314-317 -> 319-325 jagged; then with one tile body
// whose S^T pointwise pass alone branches (GMMAs asynchronous again): 376 -> 492 uniform, 319 -> 427 jagged. A third
// Q / dO stage measured no faster (with three bodies). -D GR_HSTU_BWD_EARLY_S=0: the schedule before.
#ifndef GR_HSTU_BWD_EARLY_S
#define GR_HSTU_BWD_EARLY_S 1
#endif
template <bool kRab>
struct BwdTile<128, kRab> {
  // 128 keys: each warpgroup owns 64 keys of dK / dV (128 registers a thread). With dQ atomics that spilled and made
  // ptxas serialise the GMMAs (the atomics' addresses stayed live next to the in-flight dK / dV); with dQ through
  // shared memory it fits. With a bias loaded per thread (SS plan), 128 keys spilled more and ran slower than 64
  // (H200: 201-207 against 242 TFLOP/s). The bias kernel runs the RS plan with the bias through TMA, as at head dim 64
  // (ptxas: 16-24 B of spills, no serialised GMMA; GR_HSTU_BWD_HDIM128_RS_RAB in bwd_config.h has the A/B against
  // the 64-key SS tiles that -D GR_HSTU_BWD_HDIM128_RS_RAB=0 still builds).
  static constexpr bool kRsRab = kRab && bwd_rab_via_tma(128);
  static constexpr int kBlockN =
      kRab && !kRsRab ? GR_HSTU_BWD_HDIM128_RAB_BLOCK_N : GR_HSTU_BWD_HDIM128_BLOCK_N;
  static constexpr int kDkvAtomM = kBlockN == 128 ? 2 : 1;  // 64 keys: warpgroups split the head dim
  static constexpr bool kDqTma = true;
  static constexpr bool kDqInStage = false;
  static constexpr bool kRsDkv = (!kRab || kRsRab) && kBlockN == 128 && GR_HSTU_BWD_RS_DKV != 0;
  static constexpr bool kEarlyS = kRsDkv && GR_HSTU_BWD_EARLY_S != 0;
};
// -D GR_HSTU_BWD_HDIM256_DQ_IN_STAGE=0 keeps float2 dQ atomics in the bias-free head-dim-256 kernel (the bias kernel
// always stages). Staged, that kernel first spilled 152 B / 260 B (tools/kernel_resources.py) yet measured 0-5% faster
// than the atomics (H200, T=4096 and 8192, docs/benchmarks/hstu_attention_bwd_d256_staged.md); with st.shared stores
// and the dQ writer warp (mainloop_bwd.cuh) it has no spills and measured 304 -> 388 TFLOP/s
// (docs/benchmarks/hstu_attention_bwd_d256_writer.md).
#ifndef GR_HSTU_BWD_HDIM256_DQ_IN_STAGE
#define GR_HSTU_BWD_HDIM256_DQ_IN_STAGE 1
#endif
template <bool kRab>
struct BwdTile<256, kRab> {
  static constexpr int kBlockN = 64;
  static constexpr int kDkvAtomM = 1;  // dK/dV: warpgroups split the head dim
  // Q, dO, K, V, P, dX already take 224 KB: no room for a dQ tile of its own. kDqInStage: each warpgroup's half of
  // dQ (64 x 128 fp32) is staged in its own halves of the tile's Q and dO stage (2 x 16 KB), which only its own dK and
  // dV GEMMs read once S and dP are done (the warpgroups split the head dim of dK / dV); the dQ writer warp issues
  // the reduce-adds and hands the stage back to the producer when they have read it (mainloop_bwd.cuh, reduce_dq).
  static constexpr bool kDqTma = kRab || GR_HSTU_BWD_HDIM256_DQ_IN_STAGE != 0;
  static constexpr bool kDqInStage = kDqTma;
  static constexpr bool kRsDkv = false;  // the warpgroups split the head dim of dK / dV, not the keys
  // kEarlyS is an RS-plan schedule. Its SS counterpart here (the next tile's S under this tile's dQ staging, and the
  // pointwise pass split around dP) spilled 56 B / 92 B and measured 300 -> 193 TFLOP/s (H200, T=4096).
  static constexpr bool kEarlyS = false;
};

template <typename Element_, int kHeadDim_, bool kRab_ = false>
struct BwdTraits {
  using Element = typename CuteType<Element_>::type;
  using ElementAccum = float;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr bool kRab = kRab_;
  static constexpr int kBlockM = 64;
  static constexpr int kBlockN = BwdTile<kHeadDim, kRab>::kBlockN;
  static constexpr int kStages = 2;
  static constexpr int kConsumerWarpGroups = 2;
  static constexpr int kThreads = (kConsumerWarpGroups + 1) * 128;
  static constexpr int kConsumerThreads = kConsumerWarpGroups * 128;
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
  static constexpr int kDkvAtomM = BwdTile<kHeadDim, kRab>::kDkvAtomM;
  static constexpr int kDkvAtomN = kConsumerWarpGroups / kDkvAtomM;
  static constexpr bool kDqTma = BwdTile<kHeadDim, kRab>::kDqTma;
  static constexpr bool kDqInStage = BwdTile<kHeadDim, kRab>::kDqInStage;
  static constexpr bool kRsDkv = BwdTile<kHeadDim, kRab>::kRsDkv;
  static constexpr bool kEarlyS = BwdTile<kHeadDim, kRab>::kEarlyS;
  static_assert(!kDqInStage || kDkvAtomM == 1, "dQ in the Q/dO stage needs dK / dV split by head dim");
  static_assert(!kEarlyS || kRsDkv, "the next tile's S^T is issued early by the RS plan only");
  static_assert(!kRsDkv || (kDkvAtomM == kConsumerWarpGroups && kBlockM == 64 && kDqTma && !kDqInStage),
                "RS dK / dV: each warpgroup owns the keys of its S^T rows");
  // The bias through TMA into stages of its own (the RS plan's bias kernels): loaded with the Q tile.
  static constexpr bool kRabTma = kRab && kRsDkv;
  // The host dispatch (api.cu) sends a bias call here only with TMA-loadable rows when bwd_rab_via_tma says so.
  static_assert(!kRab || kRabTma == bwd_rab_via_tma(kHeadDim),
                "bias backward: the traits' bias path and bwd_rab_via_tma (bwd_config.h) disagree, e.g. a key-tile "
                "override without -D GR_HSTU_BWD_HDIM128_RS_RAB=0");
  static_assert(kHeadDim % 64 == 0 && kBlockN % 64 == 0, "tiles must be whole 128-byte swizzle rows");

  using _M = cute::Int<kBlockM>;
  using _N = cute::Int<kBlockN>;
  using _D = cute::Int<kHeadDim>;
  using _S = cute::Int<kStages>;

  // S / dP: each warpgroup takes kBlockN / 2 keys of all kBlockM queries.
  using MmaSdP = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, ElementAccum,
                                 cute::Shape<_M, cute::Int<kBlockN / kConsumerWarpGroups>, _D>>(),
      cute::Layout<cute::Shape<cute::_1, cute::Int<kConsumerWarpGroups>, cute::_1>>{}));
  // kRsDkv: S^T / dP^T, each warpgroup takes kBlockN / 2 keys (M) of all kBlockM queries (N); A = K or V, B = Q or dO
  // (both K-major). Unused otherwise (then a placeholder tile).
  using MmaSdPt = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, ElementAccum,
                                 cute::Shape<cute::Int<kRsDkv ? kBlockN / kConsumerWarpGroups : 64>, _M, _D>>(),
      cute::Layout<cute::Shape<cute::Int<kConsumerWarpGroups>, cute::_1, cute::_1>>{}));
  // dK / dV: A = P^T or dX^T (keys x queries; SS: key-contiguous in shared memory = MN-major; kRsDkv: registers),
  // B = dO^T or Q^T (dim x queries, MN-major).
  using MmaDkvOp = std::conditional_t<
      kRsDkv,
      decltype(cute::GMMA::rs_op_selector<Element, Element, ElementAccum,
                                          cute::Shape<cute::Int<kBlockN / kDkvAtomM>, cute::Int<kHeadDim / kDkvAtomN>, _M>,
                                          cute::GMMA::Major::K, cute::GMMA::Major::MN>()),
      decltype(cute::GMMA::ss_op_selector<Element, Element, ElementAccum,
                                          cute::Shape<cute::Int<kBlockN / kDkvAtomM>, cute::Int<kHeadDim / kDkvAtomN>, _M>,
                                          cute::GMMA::Major::MN, cute::GMMA::Major::MN>())>;
  using MmaDkv = decltype(cute::make_tiled_mma(
      MmaDkvOp{}, cute::Layout<cute::Shape<cute::Int<kDkvAtomM>, cute::Int<kDkvAtomN>, cute::_1>>{}));
  // dQ: A = dX (queries x keys, K-major), B = K^T (dim x keys, MN-major); warpgroups split the head dim.
  using MmaDq = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, ElementAccum,
                                 cute::Shape<_M, cute::Int<kHeadDim / kConsumerWarpGroups>, _N>, cute::GMMA::Major::K,
                                 cute::GMMA::Major::MN>(),
      cute::Layout<cute::Shape<cute::_1, cute::Int<kConsumerWarpGroups>, cute::_1>>{}));

  using SmemAtom = cute::GMMA::Layout_K_SW128_Atom<Element>;
  using SmemLayoutQ = decltype(cute::tile_to_shape(SmemAtom{}, cute::Shape<_M, _D, _S>{}));
  using SmemLayoutDo = SmemLayoutQ;
  using SmemLayoutK = decltype(cute::tile_to_shape(SmemAtom{}, cute::Shape<_N, _D>{}));
  using SmemLayoutV = SmemLayoutK;
  // Transposed views (same bytes, modes swapped): Q^T, dO^T as (dim, queries, stage); K^T as (dim, keys).
  using SmemLayoutQt = decltype(cute::composition(
      SmemLayoutQ{}, cute::make_ordered_layout(cute::Shape<_D, _M, _S>{}, cute::Step<cute::_2, cute::_1, cute::_3>{})));
  using SmemLayoutDot = SmemLayoutQt;
  using SmemLayoutKt = decltype(cute::composition(
      SmemLayoutK{}, cute::make_ordered_layout(cute::Shape<_D, _N>{}, cute::Step<cute::_2, cute::_1>{})));
  // P and dX: (queries, keys, buffer), key-contiguous; transposed views (keys, queries, buffer) for dV / dK.
  using SmemLayoutP = decltype(cute::tile_to_shape(SmemAtom{}, cute::Shape<_M, _N, cute::_2>{}));
  using SmemLayoutPt = decltype(cute::composition(
      SmemLayoutP{}, cute::make_ordered_layout(cute::Shape<_N, _M, cute::_2>{}, cute::Step<cute::_2, cute::_1, cute::_3>{})));

  using GmemLayout = typename FwdTraits<Element_, kHeadDim>::GmemLayout;
  using TmaQ = decltype(cute::make_tma_copy(
      cute::SM90_TMA_LOAD{}, cute::make_tensor(cute::make_gmem_ptr(static_cast<Element const*>(nullptr)), GmemLayout{}),
      cute::take<0, 2>(SmemLayoutQ{}), cute::Shape<_M, _D>{}, cute::_1{}));
  using TmaKV = decltype(cute::make_tma_copy(
      cute::SM90_TMA_LOAD{}, cute::make_tensor(cute::make_gmem_ptr(static_cast<Element const*>(nullptr)), GmemLayout{}),
      SmemLayoutK{}, cute::Shape<_N, _D>{}, cute::_1{}));
  // drab = dX: the (query tile, key tile) of the dX buffer is bulk reduce-added (TMA, 16-bit add) into the 16-bit
  // drab planes [batch * rab_heads][max_seq_len rows][drab_row_stride], straight from the same shared memory.
  using TmaDrab = decltype(cute::make_tma_copy(
      cute::SM90_TMA_REDUCE_ADD{}, cute::make_tensor(cute::make_gmem_ptr(static_cast<Element*>(nullptr)), GmemLayout{}),
      cute::take<0, 2>(SmemLayoutP{}), cute::Shape<_M, _N>{}, cute::_1{}));
  // The plane's owner (mainloop_bwd.cuh, write_drab) stores its dX tiles (plain TMA store) where the others add.
  using TmaDrabStore = decltype(cute::make_tma_copy(
      cute::SM90_TMA_STORE{}, cute::make_tensor(cute::make_gmem_ptr(static_cast<Element*>(nullptr)), GmemLayout{}),
      cute::take<0, 2>(SmemLayoutP{}), cute::Shape<_M, _N>{}, cute::_1{}));

  // dQ (fp32, queries x head dim) staged for its TMA reduce-add into dq_accum [total, heads, dim] (fp32): 128-byte
  // swizzled rows of 32 floats, so the accumulator's float2 stores spread over the banks.
  using SmemLayoutDq = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<ElementAccum>{}, cute::Shape<_M, _D>{}));
  // kDqInStage: a quarter of dQ (64 fp32 columns) fills one warpgroup's 16 KB half of a Q or dO stage tile (whose
  // 64-column swizzle atoms stack rows first, so each 128-column half is contiguous).
  using SmemLayoutDqQuarter = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<ElementAccum>{},
                                                           cute::Shape<_M, cute::_64>{}));
  static_assert(!kDqInStage || (kHeadDim == 256 && cute::cosize_v<SmemLayoutDqQuarter> * 4 == kBlockM * kHeadDim),
                "a dQ quarter is half of a 16-bit Q tile");
  using SmemLayoutDqTma = std::conditional_t<kDqInStage, SmemLayoutDqQuarter, SmemLayoutDq>;
  static constexpr int kDqTmaCols = kDqInStage ? 64 : kHeadDim;  // columns of one dQ reduce-add
  using GmemLayoutDq = cute::Layout<cute::Shape<int32_t, int32_t, int32_t>, cute::Stride<int64_t, cute::_1, int64_t>>;
  using TmaDq = decltype(cute::make_tma_copy(
      cute::SM90_TMA_REDUCE_ADD{}, cute::make_tensor(cute::make_gmem_ptr(static_cast<ElementAccum*>(nullptr)), GmemLayoutDq{}),
      SmemLayoutDqTma{}, cute::Shape<_M, cute::Int<kDqTmaCols>>{}, cute::_1{}));
  static constexpr int kDqSmemElems = kDqTma && !kDqInStage ? cute::cosize_v<SmemLayoutDq> : 1;

  // kRabTma: the (query tile, key tile) of the bias, query-major like the dX buffer (one stage per Q stage, filled
  // under the Q stage's barrier); SmemLayoutRabt views it (keys, queries, stage) for the transposing ldmatrix.
  using SmemLayoutRab = decltype(cute::tile_to_shape(SmemAtom{}, cute::Shape<_M, _N, _S>{}));
  using SmemLayoutRabt = decltype(cute::composition(
      SmemLayoutRab{}, cute::make_ordered_layout(cute::Shape<_N, _M, _S>{}, cute::Step<cute::_2, cute::_1, cute::_3>{})));
  using TmaRab = decltype(cute::make_tma_copy(
      cute::SM90_TMA_LOAD{}, cute::make_tensor(cute::make_gmem_ptr(static_cast<Element const*>(nullptr)), GmemLayout{}),
      cute::take<0, 2>(SmemLayoutRab{}), cute::Shape<_M, _N>{}, cute::_1{}));
  static constexpr uint32_t kTmaBytesRab = kRabTma ? kBlockM * kBlockN * sizeof(Element) : 0;

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = typename Pipeline::PipelineState;
  static constexpr uint32_t kTmaBytesQ = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kTmaBytesKV = kBlockN * kHeadDim * sizeof(Element);

  struct SharedStorage {
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>, 1024> q;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutDo>, 1024> dout;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutK>, 1024> k;
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutV>, 1024> v;
    cute::array_aligned<Element, kRsDkv ? 1 : cute::cosize_v<SmemLayoutP>, 1024> p;  // kRsDkv: P stays in registers
    cute::array_aligned<Element, cute::cosize_v<SmemLayoutP>, 1024> dx;
    cute::array_aligned<ElementAccum, kDqSmemElems, 1024> dq;  // kDqTma only (one float otherwise)
    cute::array_aligned<Element, kRabTma ? cute::cosize_v<SmemLayoutRab> : 1, 1024> rab;  // kRabTma only
    alignas(16) cutlass::arch::ClusterTransactionBarrier barrier_kv;
    typename Pipeline::SharedStorage pipeline_q;
    typename Pipeline::SharedStorage pipeline_do;
    int drab_role;  // with drab planes shared by the heads: 0 for the CTA that owns its key columns (bwd_kernel.cuh)
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
  static_assert(kSmemBytes <= 227 * 1024, "shared memory budget of one sm90 CTA exceeded");
};

// Kernel arguments: the launch's plain parameters plus the TMA descriptors (passed as __grid_constant__).
template <typename Traits>
struct BwdArgs {
  HstuBwdParams p;
  typename Traits::TmaQ tma_q;
  typename Traits::TmaQ tma_do;
  typename Traits::TmaKV tma_k;
  typename Traits::TmaKV tma_v;
  typename Traits::TmaDrab tma_drab;  // set only when p.drab is given
  typename Traits::TmaDrabStore tma_drab_store;  // likewise
  typename Traits::TmaDq tma_dq;      // set only with Traits::kDqTma
  typename Traits::TmaRab tma_rab;    // set only with Traits::kRabTma
};

}  // namespace sm90
}  // namespace gr_kernels
