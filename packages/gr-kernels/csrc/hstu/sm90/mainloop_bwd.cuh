// Mainloop of the Hopper HSTU backward kernel: the producer's TMA loads and the consumers' GMMA + pointwise work.
//
// Per query tile (walked upwards from the first one that can see the CTA's keys), in the SS plan (mma_ss; the RS plan
// of 128-key tiles without a bias, mma_rs, is described there):
//   producer : Q tile -> stage (pipeline_q), dO tile -> stage (pipeline_do)
//   consumer : S = Q K^T, dP = dO V^T (issued back to back); then, element by element,
//              P = SiLU(alpha (S + rab)) * mask / N and dX = dP * SiLU'(z) * mask * alpha / N, both to shared
//              memory (stmatrix); both warpgroups sync; dQ = dX K, dV += P^T dO, dK += dX^T Q are issued together,
//              and (bias kernels) the drab writer warp moves the dX tile into drab (write_drab); dQ is added
//              into the fp32 dq buffer: with kDqTma (head dims 64, 128) it is written to its own shared-memory tile
//              while dV and dK still run and, after a second barrier, one thread issues its TMA reduce-add; with
//              kDqInStage (256; dV, dQ, dK issued in that order) each warpgroup writes its half into its halves of
//              the tile's Q / dO stage, the dO half once its dV has read it (dK still running), the Q half after dK,
//              and announces it to the dQ writer (warp 1 of the producer warpgroup, reduce_dq), which issues the
//              reduce-adds and hands the stage back to the producer once they have read it; else (256 built with
//              GR_HSTU_BWD_HDIM256_DQ_IN_STAGE=0, no bias) each thread adds its elements with float2 atomics while dV
//              and dK still run. The two consumer warpgroups move in step (dQ needs every
//              key of dX).
// P / dX use two shared-memory buffers (alternating per tile): a warpgroup writing tile t + 1's buffer has passed
// the barrier of tile t, which the other warpgroup reached only after its GEMMs of tile t - 1 (same buffer) retired,
// and which the TMA thread and the drab writer reached only after the reduce-adds (stores) of tile t - 1 had read
// their dX / dQ (bulk wait_group.read). The one dQ buffer (kDqTma, not in stage) is rewritten after that barrier too.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include "hstu/mask.h"
#include "hstu/params.h"
#include "hstu/sm90/kernel_traits_bwd.h"
#include "hstu/sm90/mainloop_fwd.cuh"  // unpack2
#include "hstu/sm90/causal_fast.h"
#include "hstu/utils.cuh"

namespace gr_kernels {
namespace sm90 {

// One warpgroup-wide SS GEMM (both operands shared-memory descriptors): C (+)= A B over all K steps, issued
// asynchronously as one commit group; the caller waits (warpgroup_wait<N>) and fences C before reading it.
template <bool kZeroInit, typename TiledMma, typename TensorA, typename TensorB, typename TensorC>
__device__ __forceinline__ void warpgroup_gemm_ss(TiledMma& mma, TensorA const& tA, TensorB const& tB, TensorC& tC) {
  using namespace cute;
  warpgroup_fence_operand(tC);
  warpgroup_arrive();
  if constexpr (kZeroInit) mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int k = 0; k < size<2>(tA); ++k) {
    gemm(mma, tA(_, _, k), tB(_, _, k), tC);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
}

template <typename Element_, typename Traits>
struct BwdMainloop {
  using Element = typename Traits::Element;
  static constexpr int kBlockM = Traits::kBlockM;
  static constexpr int kBlockN = Traits::kBlockN;
  static constexpr int kHeadDim = Traits::kHeadDim;
  using SharedStorage = typename Traits::SharedStorage;
  using Pipeline = typename Traits::Pipeline;
  using PipelineState = typename Traits::PipelineState;
  // User barrier id 0 (hardware barrier 8: CUTLASS reserves 0..7): both consumer warpgroups, once per tile.
  static constexpr int kPdxBarrier = 0;
  // kDqTma: every dQ element of the tile is in shared memory (both warpgroups); kDqInStage: ids 1..4, one per
  // (warpgroup, stage): dq_stage_barrier.
  static constexpr int kDqBarrier = 1;

  // The threads of the per-tile dX barrier (kPdxBarrier): both consumer warpgroups, plus in the bias kernels the drab
  // writer warp (write_drab; it only keeps step when the bias is frozen). A compile-time count: a runtime one (drab
  // given or not) made ptxas spill at head dim 256.
  static constexpr int kPdxThreads = Traits::kConsumerThreads + (Traits::kRab ? 32 : 0);
  // The drab owner raises a tile's flag one tile late (write_drab): at head dim 64, whose tiles take about as long as
  // a bulk store takes to land, not at 128 / 256, where the other heads' slack matters more. H200, B=32, T=4096,
  // trainable bias, late everywhere against at once everywhere (each with its zeroing plan, packages/gr-kernels
  // README): head dim 64 jagged 231 against 213 TFLOP/s; the kernel at 128 3.26 against 3.17 ms, at 256 8.18 against
  // 8.08 (tools/profile_hstu_backward.py --kernel-times).
  static constexpr bool kDrabFlagLate = kHeadDim == 64;

  // Query rows [m_begin, m_end) whose tiles can see keys [n0, n0 + kBlockN): causal rows look back only, except
  // context rows (which come first); a window without context or targets bounds both ends. m_begin is a multiple
  // of kBlockM. The SM80 kernel's rule (hstu/bwd_kernel.cuh). Host-callable for the self-check.
  __host__ __device__ __forceinline__ static void query_rows(const HstuFwdParams& p, const SequenceMask& mask, int n0,
                                                             int& m_begin, int& m_end) {
    m_begin = 0;
    m_end = mask.length;
    if (p.causal && mask.context == 0) m_begin = n0 / kBlockM * kBlockM;
    if (p.max_attn_len > 0 && mask.context == 0 && !mask.has_targets()) {
      const int reach = n0 + kBlockN + p.max_attn_len;
      m_end = reach < mask.length ? reach : mask.length;
      if (!p.causal) m_begin = (n0 - p.max_attn_len > 0 ? n0 - p.max_attn_len : 0) / kBlockM * kBlockM;
    }
  }

  // Every (i, j) of the tile is visible: rows inside the sequence (rows past its end are the next sequence's and
  // must not reach dK/dV), keys in the history, no window, (causal) every key at or before every query. Target rows
  // see every history key, so they may be in the tile. Such tiles skip the per-element mask.
  __host__ __device__ __forceinline__ static bool mask_free_tile(const HstuFwdParams& p, const SequenceMask& mask,
                                                                 int m0, int n0) {
    return m0 + kBlockM <= mask.length && p.max_attn_len == 0 && n0 + kBlockN <= mask.history &&
           (!p.causal || n0 + kBlockN - 1 <= m0);
  }

  // kDqInStage: the float offset, inside its quarter (SmemLayoutDqQuarter: 8 x 32-float swizzle atoms, rows first;
  // offset(r, c) = (r % 8) * 32 + ((c % 32) ^ ((r % 8) << 2)) + (r / 8) * 256 + (c / 32) * 2048), of the dQ element
  // (row0 + dr, col0 + dc), where (row0, col0) is the thread's first element (col0 relative to its warpgroup's
  // columns) and dc < 64 picks the Q-stage quarter, else the dO-stage one (then dc - 64). Cheaper than the general
  // formula because dr and dc are multiples of 8 and col0 < 8, so r % 8 is the thread's and (c % 32) ^ ... splits
  // into a per-thread XOR and a compile-time one; the host self-check compares it with the layout for every thread.
  __host__ __device__ __forceinline__ static int dq_quarter_offset(int row0, int col0, int dr, int dc) {
    const int s = row0 % 8;
    const int c = dc % 64;
    return s * 32 + ((row0 + dr) / 8) * 256 + ((col0 ^ (s << 2)) ^ (c % 32)) + (c / 32) * 2048;
  }

  // Producer (one thread): K and V of the CTA's key tile once, then Q and dO of every query tile. Rows past the
  // sequence end are the next sequence's (masked by the consumers) or past the tensor end (zero-filled by TMA).
  // kRabTma: with each Q tile, the bias tile of its query rows and the CTA's keys from plane rab_plane into the bias
  // stage of the same index (the Q stage's barrier); rows and keys past max_seq_len are zero-filled by TMA, those
  // past the sequence end are masked by the consumers.
  __device__ static void load(const BwdArgs<Traits>& args, SharedStorage& ss, Pipeline& pipeline_q,
                              Pipeline& pipeline_do, int seq_start, int head, int n_block, int m_begin, int m_end,
                              int rab_plane) {
    using namespace cute;
    const HstuBwdParams& p = args.p;
    Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename Traits::SmemLayoutQ{});
    Tensor sdO = make_tensor(make_smem_ptr(ss.dout.data()), typename Traits::SmemLayoutDo{});
    Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Traits::SmemLayoutK{});
    Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename Traits::SmemLayoutV{});
    const auto shape = make_shape(int32_t(p.total_rows), int32_t(kHeadDim), int32_t(p.heads));
    const auto origin = make_coord(seq_start, _0{});
    Tensor gQ = local_tile(domain_offset(origin, args.tma_q.get_tma_tensor(shape)(_, _, head)),
                           Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(_, _0{}));
    Tensor gdO = local_tile(domain_offset(origin, args.tma_do.get_tma_tensor(shape)(_, _, head)),
                            Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(_, _0{}));
    Tensor gK = local_tile(domain_offset(origin, args.tma_k.get_tma_tensor(shape)(_, _, head)),
                           Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(n_block, _0{}));
    Tensor gV = local_tile(domain_offset(origin, args.tma_v.get_tma_tensor(shape)(_, _, head)),
                           Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(n_block, _0{}));
    auto [tQgQ, tQsQ] = tma_partition(args.tma_q, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
    auto [tOgO, tOsO] =
        tma_partition(args.tma_do, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sdO), group_modes<0, 2>(gdO));
    auto [tKgK, tKsK] = tma_partition(args.tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
    auto [tVgV, tVsV] = tma_partition(args.tma_v, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));

    using BarrierType = cutlass::arch::ClusterTransactionBarrier::ValueType;
    ss.barrier_kv.arrive_and_expect_tx(2 * Traits::kTmaBytesKV);
    copy(args.tma_k.with(reinterpret_cast<BarrierType&>(ss.barrier_kv), 0), tKgK, tKsK);
    copy(args.tma_v.with(reinterpret_cast<BarrierType&>(ss.barrier_kv), 0), tVgV, tVsV);
    auto rab_tiles = [&]() {
      if constexpr (Traits::kRabTma) {
        Tensor sRab = make_tensor(make_smem_ptr(ss.rab.data()), typename Traits::SmemLayoutRab{});
        const int32_t n = p.max_seq_len;
        Tensor plane = args.tma_rab.get_tma_tensor(make_shape(n, n, int32_t(p.batch) * p.rab_heads))(_, _, rab_plane);
        Tensor gRab = local_tile(plane, Shape<Int<kBlockM>, Int<kBlockN>>{}, make_coord(_, n_block));  // (M, N, m)
        return tma_partition(args.tma_rab, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sRab), group_modes<0, 2>(gRab));
      } else {
        return 0;
      }
    }();
    PipelineState state = cutlass::make_producer_start_state<Pipeline>();
    for (int m_block = m_begin / kBlockM; m_block * kBlockM < m_end; ++m_block) {
      pipeline_q.producer_acquire(state);
      copy(args.tma_q.with(*pipeline_q.producer_get_barrier(state), 0), tQgQ(_, m_block), tQsQ(_, state.index()));
      if constexpr (Traits::kRabTma) {
        copy(args.tma_rab.with(*pipeline_q.producer_get_barrier(state), 0), get<0>(rab_tiles)(_, m_block),
             get<1>(rab_tiles)(_, state.index()));
      }
      pipeline_do.producer_acquire(state);
      copy(args.tma_do.with(*pipeline_do.producer_get_barrier(state), 0), tOgO(_, m_block), tOsO(_, state.index()));
      ++state;
    }
  }

  // kDqInStage: the named barrier (ids 1..4) on which consumer warpgroup w announces that its half of the dQ of the
  // tile in Q / dO stage `stage` is in that stage, and the dQ writer waits. One per (warpgroup, stage): a warpgroup
  // reaches the barrier of a stage again only after the writer has released the stage, i.e. after its sync there.
  __host__ __device__ __forceinline__ static constexpr int dq_stage_barrier(int warp_group, int stage) {
    return kDqBarrier + stage * Traits::kConsumerWarpGroups + warp_group;
  }

  // kDqInStage, the dQ writer (warp 1 of the producer warpgroup, all 32 lanes): for every query tile, in the
  // consumers' order, waits until each consumer warpgroup has staged its half of the tile's dQ in the tile's Q / dO
  // stage and issues its two TMA reduce-adds into dq_accum; once they have read the stage it releases the stage
  // (the +1 arrival of the pipelines' empty barriers, after the consumers' own), so the producer refills it only
  // then. The consumers never wait for a reduce-add or issue one. Rows past the sequence end add zeros (their dX is
  // masked) into the next sequence's rows, rows past the tensor end are clipped by TMA.
  __device__ static void reduce_dq(const BwdArgs<Traits>& args, SharedStorage& ss, Pipeline& pipeline_q,
                                   Pipeline& pipeline_do, int seq_start, int head, int m_begin, int m_end) {
    using namespace cute;
    static_assert(Traits::kDqInStage, "the dQ writer serves dQ staged in the Q / dO stages");
    const HstuBwdParams& p = args.p;
    using Quarter = typename Traits::SmemLayoutDqQuarter;
    constexpr int kTileElems = kBlockM * kHeadDim;
    constexpr int kQuarterElems = cute::cosize_v<Quarter>;
    const bool lane0 = threadIdx.x % 32 == 0;
    if (lane0) prefetch_tma_descriptor(args.tma_dq.get_tma_descriptor());
    Tensor mdQ = args.tma_dq.get_tma_tensor(make_shape(int32_t(p.total_rows), int32_t(kHeadDim), int32_t(p.heads)));
    auto tma_dq = args.tma_dq.get_slice(_0{});
    PipelineState state;  // the consumers' sequence of stages: stage 0, phase 0 first
    for (int m_block = m_begin / kBlockM; m_block * kBlockM < m_end; ++m_block) {
      Tensor gdQ = local_tile(domain_offset(make_coord(seq_start, _0{}), mdQ(_, _, head)),
                              Shape<Int<kBlockM>, _64>{}, make_coord(m_block, _));  // (M, 64, quarter)
      CUTE_UNROLL
      for (int w = 0; w < Traits::kConsumerWarpGroups; ++w) {
        cutlass::arch::NamedBarrier::sync(128 + 32, dq_stage_barrier(w, state.index()));
        if (lane0) {
          float* q_half = reinterpret_cast<float*>(ss.q.data() + state.index() * kTileElems) + w * kQuarterElems;
          float* do_half = reinterpret_cast<float*>(ss.dout.data() + state.index() * kTileElems) + w * kQuarterElems;
          copy(args.tma_dq, tma_dq.partition_S(make_tensor(make_smem_ptr(q_half), Quarter{})),
               tma_dq.partition_D(gdQ(_, _, 2 * w)));
          copy(args.tma_dq, tma_dq.partition_S(make_tensor(make_smem_ptr(do_half), Quarter{})),
               tma_dq.partition_D(gdQ(_, _, 2 * w + 1)));
        }
      }
      if (lane0) {
        tma_store_arrive();
        tma_store_wait<0>();  // both warpgroups' reduce-adds have read the stage
        pipeline_q.consumer_release(state);
        pipeline_do.consumer_release(state);
      }
      __syncwarp();
      ++state;
    }
  }

  // The tile's shared-memory views (Q, Q^T, dO, dO^T, K, K^T, V, dX, dX^T), for a storage reference the caller took
  // through detail::opaque in the query loop: hoisted out of the loop, the views' ~20 64-bit GMMA descriptors and
  // addresses stayed in registers next to dK / dV (ptxas spilled); rebuilt per tile they cost a few integer
  // instructions.
  __device__ __forceinline__ static auto smem_views(SharedStorage& s) {
    using namespace cute;
    return make_tuple(make_tensor(make_smem_ptr(s.q.data()), typename Traits::SmemLayoutQ{}),
                      make_tensor(make_smem_ptr(s.q.data()), typename Traits::SmemLayoutQt{}),
                      make_tensor(make_smem_ptr(s.dout.data()), typename Traits::SmemLayoutDo{}),
                      make_tensor(make_smem_ptr(s.dout.data()), typename Traits::SmemLayoutDot{}),
                      make_tensor(make_smem_ptr(s.k.data()), typename Traits::SmemLayoutK{}),
                      make_tensor(make_smem_ptr(s.k.data()), typename Traits::SmemLayoutKt{}),
                      make_tensor(make_smem_ptr(s.v.data()), typename Traits::SmemLayoutV{}),
                      make_tensor(make_smem_ptr(s.dx.data()), typename Traits::SmemLayoutP{}),
                      make_tensor(make_smem_ptr(s.dx.data()), typename Traits::SmemLayoutPt{}));
  }

  // Calls fn(full_tile, causal_fast_tile) with the compile-time kind of query tile m0: mask-free (no mask code), a
  // masked tile of a plain causal sequence (fast_mask = causal_fast<false>(p, mask, 0); causal_fast.h: every query
  // tile starts at a position >= 0 here) with the two-compare test, or the general mask.
  template <typename Fn>
  __device__ __forceinline__ static void with_tile_kind(const HstuFwdParams& p, const SequenceMask& mask, int m0,
                                                        int n0, bool fast_mask, Fn&& fn) {
    using True = cute::true_type;
    using False = cute::false_type;
    if (mask_free_tile(p, mask, m0, n0)) {
      fn(True{}, False{});
    } else if (fast_mask) {
      fn(False{}, True{});
    } else {
      fn(False{}, False{});
    }
  }

  // Runs tile(m0, full_tile, causal_fast_tile) over the CTA's query tiles [m_begin, m_end), each kind of tile
  // (with_tile_kind) a tile body of its own. Only the masked tile body is compiled twice.
  template <typename TileFn>
  __device__ __forceinline__ static void for_each_query_tile(const HstuFwdParams& p, const SequenceMask& mask, int n0,
                                                             int m_begin, int m_end, TileFn& tile) {
    const bool fast_mask = causal_fast<false>(p, mask, 0);
    for (int m0 = m_begin; m0 < m_end; m0 += kBlockM) {
      auto run = [&](auto full_tile, auto causal_fast_tile) __attribute__((always_inline)) {
        tile(m0, full_tile, causal_fast_tile);
      };
      with_tile_kind(p, mask, m0, n0, fast_mask, run);
    }
  }

  // kDqTma: tile m0's dQ (this thread's accumulator elements) into the shared-memory dQ tile; once every element is
  // there (both warpgroups), thread 0 issues its TMA reduce-add into dq_accum. Rows past the sequence end add zeros
  // (their dX is masked) into the next sequence's rows, rows past the tensor end are clipped by TMA. The caller
  // makes thread 0 wait for the reduce-add's read (tma_store_wait) before the tile is rewritten.
  template <typename ThrMmaDq, typename FragDq>
  __device__ __forceinline__ static void store_and_reduce_dq(const BwdArgs<Traits>& args, SharedStorage& ss,
                                                             ThrMmaDq const& thr_dq, FragDq const& tdQrdQ, int tidx,
                                                             int seq_start, int head, int m0) {
    using namespace cute;
    // Elements 2t, 2t + 1 are adjacent columns of one 16-byte chunk (an even one first): one float2 store.
    // Addresses from an opaque pointer taken here: computed ahead, next to the in-flight dK / dV, they spilled.
    Tensor sdQ = make_tensor(make_smem_ptr(detail::opaque(ss.dq.data())), typename Traits::SmemLayoutDq{});
    Tensor tdQsdQ = thr_dq.partition_C(sdQ);
    CUTE_UNROLL
    for (int t = 0; t < decltype(size(tdQrdQ))::value / 2; ++t) {
      *reinterpret_cast<float2*>(&tdQsdQ(2 * t)) = make_float2(tdQrdQ(2 * t), tdQrdQ(2 * t + 1));
    }
    cutlass::arch::fence_view_async_shared();
    cutlass::arch::NamedBarrier::sync(Traits::kConsumerThreads, kDqBarrier);
    if (tidx == 0) {
      const HstuBwdParams& p = args.p;
      Tensor sdQ_all = make_tensor(make_smem_ptr(ss.dq.data()), typename Traits::SmemLayoutDq{});
      Tensor mdQ = args.tma_dq.get_tma_tensor(make_shape(int32_t(p.total_rows), int32_t(kHeadDim), int32_t(p.heads)));
      Tensor gdQ = local_tile(domain_offset(make_coord(seq_start, _0{}), mdQ(_, _, head)),
                              Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m0 / kBlockM, _0{}));
      auto tma_dq = args.tma_dq.get_slice(_0{});
      copy(args.tma_dq, tma_dq.partition_S(sdQ_all), tma_dq.partition_D(gdQ));
      tma_store_arrive();
    }
  }

  // The drab writer (warp 2 of the producer warpgroup, all 32 lanes; bias kernels): for every query tile, in the
  // consumers' order, it meets them at the tile's dX barrier (kPdxBarrier, kPdxThreads = theirs + 32), which it
  // reaches only once the previous tile's dX has left its buffer (the buffer the consumers write next), then moves
  // the tile's dX (when a drab is wanted) into plane drab_plane. The CTA that owns these key columns of the plane
  // (every CTA of a per-head plane, the first of the heads sharing one: bwd_kernel.cuh) stores it with a plain TMA
  // store; the other heads of a shared plane reduce-add theirs once the owner has raised the tile's flag (flags: this
  // key tile's words of drab_sync, one per 64-row query tile), which the owner does once its store has landed: at
  // once, or with kDrabFlagLate one tile later (then the owner never waits for a store to land, and the others trail
  // it by about a tile). So drab needs no zeroing. Rows and keys past max_seq_len are clipped by TMA; the rest past
  // the sequence end are masked zeros.
  __device__ static void write_drab(const BwdArgs<Traits>& args, SharedStorage& ss, int drab_plane, bool owner,
                                    int* flags, int n0, int m_begin, int m_end) {
    using namespace cute;
    const HstuBwdParams& p = args.p;
    const bool lane0 = threadIdx.x % 32 == 0;
    if (lane0 && p.drab != nullptr) {
      prefetch_tma_descriptor(owner ? args.tma_drab_store.get_tma_descriptor() : args.tma_drab.get_tma_descriptor());
    }
    const int n = p.max_seq_len;
    Tensor sdX = make_tensor(make_smem_ptr(ss.dx.data()), typename Traits::SmemLayoutP{});
    Tensor mDrab = args.tma_drab.get_tma_tensor(make_shape(n, n, int32_t(p.batch) * p.rab_heads))(_, _, drab_plane);
    int buf = 0;
    for (int m0 = m_begin; m0 < m_end; m0 += kBlockM) {
      cutlass::arch::NamedBarrier::sync(kPdxThreads, kPdxBarrier);  // the tile's dX is in buffer `buf`
      if (lane0 && p.drab != nullptr) {
        Tensor gDrab = local_tile(mDrab, Shape<Int<kBlockM>, Int<kBlockN>>{}, make_coord(m0 / kBlockM, n0 / kBlockN));
        int* flag = flags == nullptr ? nullptr : flags + m0 / kBlockM;
        if (owner) {
          auto tma = args.tma_drab_store.get_slice(_0{});
          copy(args.tma_drab_store, tma.partition_S(sdX)(_, _, _, buf), tma.partition_D(gDrab));
          tma_store_arrive();
          if constexpr (kDrabFlagLate) {
            // The previous tile's flag, once its store is in global memory (all but this tile's store complete): it
            // has had a tile's time to land, so this rarely waits.
            if (flag != nullptr && m0 != m_begin) detail::release_flag_after_bulk_stores<1>(flag - 1);
          } else if (flag != nullptr) {
            detail::release_flag_after_bulk_stores<0>(flag);  // once this tile's store is in global memory
          }
          tma_store_wait<0>();  // read out of the buffer, which the consumers rewrite after the next barrier
        } else {
          detail::acquire_flag_before_bulk_ops(flag);  // the owner's tile before this reduce-add
          auto tma = args.tma_drab.get_slice(_0{});
          copy(args.tma_drab, tma.partition_S(sdX)(_, _, _, buf), tma.partition_D(gDrab));
          tma_store_arrive();
          tma_store_wait<0>();
        }
      }
      __syncwarp();
      buf ^= 1;
    }
    // kDrabFlagLate: the last tile's flag.
    if (kDrabFlagLate && lane0 && p.drab != nullptr && owner && flags != nullptr && m_begin < m_end) {
      detail::release_flag_after_bulk_stores<0>(flags + (m_end - 1) / kBlockM);
    }
  }

  // Zeroes rows [r0, r1) of the key columns [n0, n0 + kBlockN) of drab plane `plane` (rows that no dX tile covers),
  // 16 bytes per store by threads [lane, lanes) of the caller (lanes a multiple of kBlockN / 8).
  // Columns past max_seq_len up to the next multiple of 8 are row padding (drab_row_stride), sliced off by the caller.
  // Streaming stores: these zeros are output, not worth a place in L2.
  __device__ static void zero_drab_rows(const HstuBwdParams& p, int plane, int n0, int r0, int r1, int lane,
                                        int lanes) {
    constexpr int kChunks = kBlockN / 8;  // 16-byte chunks of a row's key tile
    const int chunk = lane % kChunks;
    if (chunk * 8 >= p.max_seq_len - n0 || r0 >= r1) return;
    // One pointer walks the rows (the producer warps run on few registers).
    const int64_t row_bytes = p.drab_row_stride * int64_t(sizeof(Element));
    char* plane_base = static_cast<char*>(p.drab) + int64_t(plane) * p.max_seq_len * row_bytes +
                       (n0 + chunk * 8) * int64_t(sizeof(Element));
    const char* end = plane_base + r1 * row_bytes;
    const int64_t step = (lanes / kChunks) * row_bytes;
    for (char* row = plane_base + (r0 + lane / kChunks) * row_bytes; row < end; row += step) {
      __stcs(reinterpret_cast<int4*>(row), make_int4(0, 0, 0, 0));
    }
  }

  // Zeroes columns [c0, max_seq_len) of rows [r0, r1) of drab plane `plane` (key strips no query tile reaches), row
  // by row with 16-byte streaming stores by threads [tid, threads) of the caller: each row's zeros are one contiguous
  // run. c0 is a multiple of 8; a row's last chunk may reach into its padding (drab_row_stride, sliced off).
  __device__ static void zero_drab_columns(const HstuBwdParams& p, int plane, int c0, int r0, int r1, int tid,
                                           int threads) {
    const int chunks = (p.max_seq_len - c0 + 7) / 8;  // 16-byte chunks of a row's zeros
    if (chunks <= 0 || r0 >= r1) return;
    Element* first = static_cast<Element*>(p.drab) + (int64_t(plane) * p.max_seq_len + r0) * p.drab_row_stride + c0;
    const int64_t total = int64_t(r1 - r0) * chunks;
    for (int64_t k = tid; k < total; k += threads) {
      const int64_t row = k / chunks;
      __stcs(reinterpret_cast<int4*>(first + row * p.drab_row_stride + (k - row * chunks) * 8), make_int4(0, 0, 0, 0));
    }
  }

  // Consumers (both warpgroups, tidx in [0, 256)): accumulate dV and dK of the CTA's keys over the query tiles of
  // [m_begin, m_end), and add each tile's dQ into p.dq_accum (rows from seq_start). K and V are in shared memory.
  template <bool kHasRab, typename FragDkv>
  __device__ __forceinline__ static void mma(const BwdArgs<Traits>& args, SharedStorage& ss, Pipeline& pipeline_q,
                                             Pipeline& pipeline_do, FragDkv& tdVrdV, FragDkv& tdKrdK, int tidx,
                                             const SequenceMask& mask, int seq_start, int head, int n0, int m_begin,
                                             int m_end, const Element_* rab) {
    if constexpr (Traits::kRsDkv) {
      static_assert(kHasRab == Traits::kRabTma, "the RS plan reads its bias from the TMA stages");
      mma_rs<kHasRab>(args, ss, pipeline_q, pipeline_do, tdVrdV, tdKrdK, tidx, mask, seq_start, head, n0, m_begin,
                      m_end);
    } else {
      mma_ss<kHasRab>(args, ss, pipeline_q, pipeline_do, tdVrdV, tdKrdK, tidx, mask, seq_start, head, n0, m_begin,
                      m_end, rab);
    }
  }

  // kRsDkv (no bias): per query tile
  //   S^T = K Q^T, dP^T = V dO^T (issued back to back; M = keys: each warpgroup its own 64 keys; with kEarlyS the
  //   previous tile has issued S^T already, behind its dK);
  //   once S^T lands: P^T = SiLU(z) * mask / N into registers (16-bit, the A operand of the next GMMA) and
  //   SiLU'(z) * mask * alpha / N in place of S^T; dV += P^T dO issued (RS) at once;
  //   once dP^T lands (dV may still run): dX^T = dP^T * SiLU'(...) into registers and, through transposing stmatrix,
  //   into the tile's dX buffer; both warpgroups sync (dQ needs every key); dQ = dX K (SS) and dK += dX^T Q (RS);
  //   dQ goes through shared memory and one TMA reduce-add while dK runs.
  // P never touches shared memory and no barrier stands between P and dV.
  // kHasRab: z = alpha (S^T + rab^T), the bias tile read from its TMA stage (the Q stage's index) by transposing
  // ldmatrix in the S^T accumulator's element order just before the pointwise pass; drab = dX leaves the tile's dX
  // buffer through the drab writer warp (write_drab), as in the SS plan.
  template <bool kHasRab, typename FragDkv>
  __device__ __forceinline__ static void mma_rs(const BwdArgs<Traits>& args, SharedStorage& ss, Pipeline& pipeline_q,
                                                Pipeline& pipeline_do, FragDkv& tdVrdV, FragDkv& tdKrdK, int tidx,
                                                const SequenceMask& mask, int seq_start, int head, int n0,
                                                int m_begin, int m_end) {
    using namespace cute;
    const HstuBwdParams& p = args.p;
    using M = Int<kBlockM>;
    using N = Int<kBlockN>;
    using D = Int<kHeadDim>;
    typename Traits::MmaSdPt mma_sdp;
    typename Traits::MmaDkv mma_dkv;
    typename Traits::MmaDq mma_dq;
    auto thr_sdp = mma_sdp.get_thread_slice(tidx);
    auto thr_dkv = mma_dkv.get_thread_slice(tidx);
    auto thr_dq = mma_dq.get_thread_slice(tidx);

    // S^T / dP^T accumulators and their (key, query) coordinates.
    Tensor tStS = partition_fragment_C(mma_sdp, Shape<N, M>{});
    Tensor tStdP = partition_fragment_C(mma_sdp, Shape<N, M>{});
    Tensor tStcS = thr_sdp.partition_C(make_identity_tensor(Shape<N, M>{}));
    // P^T and dX^T as the A operands of dV / dK: the accumulator's per-thread element order equals the A operand's
    // (column pairs, the +8 row, then 8-column groups; two of those make one 16-wide K step), so element i of S^T
    // becomes element i of P^T.
    Tensor tdVrP = make_tensor<Element>(partition_shape_A(mma_dkv, Shape<N, M>{}));
    Tensor tdKrdX = make_tensor<Element>(partition_shape_A(mma_dkv, Shape<N, M>{}));
    constexpr int kFrag = decltype(size(tStS))::value;
    static_assert(kFrag == decltype(size(tdVrP))::value, "S^T accumulator and P^T operand sizes differ");
    static_assert(kFrag % 2 == 0, "accumulator elements come in column pairs");
    uint32_t* p_words = reinterpret_cast<uint32_t*>(raw_pointer_cast(tdVrP.data()));
    uint32_t* dx_words = reinterpret_cast<uint32_t*>(raw_pointer_cast(tdKrdX.data()));
    // dX^T -> the (queries, keys) dX buffer: stmatrix .trans writes each 8x8 block transposed.
    auto smem_tiled_copy_dx = make_tiled_copy_C(Copy_Atom<SM90_U16x8_STSM_T, Element>{}, mma_sdp);
    auto smem_copy_dx = smem_tiled_copy_dx.get_thread_slice(tidx);
    Tensor tXrdX = smem_copy_dx.retile_S(make_tensor(tdKrdX.data(), make_fragment_like<Element>(tStS).layout()));
    Tensor tdQrdQ = partition_fragment_C(mma_dq, Shape<M, D>{});

    // P = SiLU(alpha x) / N and SiLU'(alpha x) * alpha / N (the dX factor) by detail::silu_and_grad_scaled.
    const float half_alpha = 0.5f * p.alpha;
    const float coef = half_alpha * p.inv_scaling_seqlen;
    const bool dq_thread = tidx == 0;  // issues each tile's dQ reduce-add
    if (dq_thread) prefetch_tma_descriptor(args.tma_dq.get_tma_descriptor());
    // kHasRab: the bias stage -> registers, transposed 8x8 blocks in the S^T accumulator's element order.
    auto smem_tiled_copy_rab = make_tiled_copy_C(Copy_Atom<SM75_U16x8_LDSM_T, Element>{}, mma_sdp);
    auto smem_copy_rab = smem_tiled_copy_rab.get_thread_slice(tidx);
    Tensor tSrRab = make_fragment_like<Element>(tStS);
    Tensor tXrRab = smem_copy_rab.retile_D(tSrRab);
    uint32_t* rab_words = reinterpret_cast<uint32_t*>(raw_pointer_cast(tSrRab.data()));
    // This thread's element 0 is its lowest key (row of S^T) and query (column); the others sit at compile-time
    // offsets from it.
    const int k_base = get<0>(tStcS(0));
    const int q_base = get<1>(tStcS(0));

    PipelineState state;  // consumers start at stage 0, phase 0
    PipelineState prev;   // the previous tile's stage: released once its dK GEMM has landed
    int buf = 0;
    // S^T = K Q^T (accumulated onto tStS, which the caller has cleared) and dP^T = V dO^T of the tile in stage
    // `state`. With Traits::kEarlyS each tile issues the next tile's S^T as soon as its own dQ has left, so it queues
    // behind the tile's dK on the tensor cores instead of waiting for it; dP^T follows when the next tile starts.
    constexpr bool kEarlyS = Traits::kEarlyS;
    auto issue_s = [&]() __attribute__((always_inline)) {
      auto [sQ, sQt, sdO, sdOt, sK, sKt, sV, sdX, sdXt] = smem_views(*detail::opaque(&ss));
      Tensor tStrK = thr_sdp.partition_fragment_A(sK);  // (MMA, keys, K)
      Tensor tStrQ = thr_sdp.partition_fragment_B(sQ);  // (MMA, queries, K, stage)
      pipeline_q.consumer_wait(state);
      warpgroup_gemm_ss<false>(mma_sdp, tStrK, tStrQ(_, _, _, state.index()), tStS);
    };
    auto issue_dp = [&]() __attribute__((always_inline)) {
      auto [sQ, sQt, sdO, sdOt, sK, sKt, sV, sdX, sdXt] = smem_views(*detail::opaque(&ss));
      Tensor tStrV = thr_sdp.partition_fragment_A(sV);
      Tensor tStrdO = thr_sdp.partition_fragment_B(sdO);
      clear(tStdP);  // fresh accumulators end the previous tile's live ranges (see mma_ss)
      pipeline_do.consumer_wait(state);
      warpgroup_gemm_ss<false>(mma_sdp, tStrV, tStrdO(_, _, _, state.index()), tStdP);
    };
    // The pointwise pass over S^T per kind of tile (compile-time flags; with_tile_kind). Only it branches: the GMMAs
    // in flight across the tile boundary (kEarlyS) must see one code path. With for_each_query_tile's three tile
    // bodies ptxas serialised every GMMA of the kernel for want of registers (C7512; 376 against 492 TFLOP/s).
    auto pointwise_s = [&](int m0, auto full_tile, auto causal_fast_tile) __attribute__((always_inline)) {
      [[maybe_unused]] const CausalThresholds thresholds = causal_thresholds(mask, m0 + q_base, n0 + k_base);
      CUTE_UNROLL
      for (int t = 0; t < kFrag / 2; ++t) {
        // Elements 2t, 2t + 1: one key, two adjacent queries.
        float b0 = 0.f, b1 = 0.f;
        if constexpr (kHasRab) unpack2<Element_>(rab_words[t], b0, b1);
        float f0, f1, d0, d1;
        detail::silu_and_grad_scaled<Element_>(tStS(2 * t) + b0, half_alpha, coef, f0, d0);
        detail::silu_and_grad_scaled<Element_>(tStS(2 * t + 1) + b1, half_alpha, coef, f1, d1);
        if (!bool(full_tile)) {  // compile-time flag: mask-free tiles carry no mask code
          bool v0, v1;
          if constexpr (decltype(causal_fast_tile)::value) {
            const int dq = get<1>(tStcS(2 * t)) - q_base;  // compile-time after folding
            const int dk = get<0>(tStcS(2 * t)) - k_base;
            v0 = causal_visible<false>(dq, dk, thresholds);
            v1 = causal_visible<false>(dq + 1, dk, thresholds);
          } else {
            const int i = m0 + get<1>(tStcS(2 * t));
            const int j = n0 + get<0>(tStcS(2 * t));
            v0 = mask(i, j);
            v1 = mask(i + 1, j);
          }
          if (!v0) f0 = d0 = 0.f;
          if (!v1) f1 = d1 = 0.f;
        }
        p_words[t] = detail::pack2<Element_>(f0, f1);
        tStS(2 * t) = d0;  // SiLU'(z) * mask * alpha / N, for dX once dP^T lands
        tStS(2 * t + 1) = d1;
      }
    };
    // The previous tile's dK has landed: its stage goes back to the producer, its dX^T registers may be rewritten.
    auto release_prev = [&]() __attribute__((always_inline)) {
      warpgroup_fence_operand(tdKrdK);
      warpgroup_fence_operand(tdKrdX);
      pipeline_q.consumer_release(prev);
      pipeline_do.consumer_release(prev);
    };
    const bool fast_mask = causal_fast<false>(p, mask, 0);
    // kEarlyS: in flight when a tile starts are the previous tile's dK and this tile's S^T (none for the first tile).
    // Otherwise nothing.
    auto tile = [&](int m0) __attribute__((always_inline)) {
      auto [sQ, sQt, sdO, sdOt, sK, sKt, sV, sdX, sdXt] = smem_views(*detail::opaque(&ss));
      Tensor tdVrdOt = thr_dkv.partition_fragment_B(sdOt);  // (MMA, dim, queries, stage)
      Tensor tdKrQt = thr_dkv.partition_fragment_B(sQt);
      Tensor tdQrdX = thr_dq.partition_fragment_A(sdX);     // (MMA, queries, keys, buffer)
      Tensor tdQrKt = thr_dq.partition_fragment_B(sKt);     // (MMA, dim, keys)
      Tensor tXsdX = smem_copy_dx.partition_D(sdXt);        // (CPY, CPY_M, CPY_N, buffer)
      if (!kEarlyS || m0 == m_begin) {
        clear(tStS);
        issue_s();
      }
      issue_dp();
      if constexpr (kHasRab) {  // the stage landed with Q (consumer_wait in issue_s); read while S^T runs
        Tensor sRabt = make_tensor(make_smem_ptr(detail::opaque(ss.rab.data())), typename Traits::SmemLayoutRabt{});
        copy(smem_tiled_copy_rab, smem_copy_rab.partition_S(sRabt)(_, _, _, state.index()), tXrRab);
      }
      warpgroup_wait<1>();  // [the previous tile's dK and] S^T have landed; dP^T may still run
      if (kEarlyS && m0 != m_begin) release_prev();
      warpgroup_fence_operand(tStS);
      auto run_pointwise = [&](auto full_tile, auto causal_fast_tile) __attribute__((always_inline)) {
        pointwise_s(m0, full_tile, causal_fast_tile);
      };
      with_tile_kind(p, mask, m0, n0, fast_mask, run_pointwise);
      warpgroup_gemm_issue<false, true>(mma_dkv, tdVrP, tdVrdOt(_, _, _, state.index()), tdVrdV);
      warpgroup_wait<1>();  // dP^T has landed; dV may still run
      warpgroup_fence_operand(tStdP);
      CUTE_UNROLL
      for (int t = 0; t < kFrag / 2; ++t) {
        dx_words[t] = detail::pack2<Element_>(tStdP(2 * t) * tStS(2 * t), tStdP(2 * t + 1) * tStS(2 * t + 1));
      }
      // kEarlyS: the next tile's S^T accumulates onto this: cleared here, before dK is issued (cleared next to its
      // GMMA, with dK in flight, ptxas serialised every GMMA of the kernel: C7515).
      if constexpr (kEarlyS) clear(tStS);
      copy(smem_tiled_copy_dx, tXrdX, tXsdX(_, _, _, buf));
      // Generic-proxy stores -> visible to the GMMA (async proxy); then every key of dX is in place. The previous
      // tile's dQ reduce-add has read the dQ tile before anyone passes this barrier (this tile rewrites it).
      cutlass::arch::fence_view_async_shared();
      if (dq_thread) tma_store_wait<0>();
      cutlass::arch::NamedBarrier::sync(kPdxThreads, kPdxBarrier);
      clear(tdQrdQ);
      warpgroup_gemm_ss<false>(mma_dq, tdQrdX(_, _, _, buf), tdQrKt, tdQrdQ);
      warpgroup_gemm_issue<false, true>(mma_dkv, tdKrdX, tdKrQt(_, _, _, state.index()), tdKrdK);
      warpgroup_wait<1>();  // dV and dQ have landed; dK may still run
      warpgroup_fence_operand(tdQrdQ);
      warpgroup_fence_operand(tdVrdV);
      warpgroup_fence_operand(tdVrP);  // rewritten only after the GMMA that read it
      store_and_reduce_dq(args, ss, thr_dq, tdQrdQ, tidx, seq_start, head, m0);
      prev = state;
      ++state;
      buf ^= 1;
      if (kEarlyS && m0 + kBlockM < m_end) {
        issue_s();  // the next tile's S^T, behind this tile's dK
      } else {
        warpgroup_wait<0>();
        release_prev();
      }
    };

    for (int m0 = m_begin; m0 < m_end; m0 += kBlockM) tile(m0);
    if (dq_thread) tma_store_wait<0>();  // the last reduce-add has read its tile before the CTA's smem goes away
  }

  // The all-SS plan (every instantiation without kRsDkv).
  template <bool kHasRab, typename FragDkv>
  __device__ __forceinline__ static void mma_ss(const BwdArgs<Traits>& args, SharedStorage& ss, Pipeline& pipeline_q,
                                                Pipeline& pipeline_do, FragDkv& tdVrdV, FragDkv& tdKrdK, int tidx,
                                                const SequenceMask& mask, int seq_start, int head, int n0,
                                                int m_begin, int m_end, const Element_* rab) {
    using namespace cute;
    const HstuBwdParams& p = args.p;
    using M = Int<kBlockM>;
    using N = Int<kBlockN>;
    using D = Int<kHeadDim>;
    typename Traits::MmaSdP mma_sdp;
    typename Traits::MmaDkv mma_dkv;
    typename Traits::MmaDq mma_dq;
    auto thr_sdp = mma_sdp.get_thread_slice(tidx);
    auto thr_dkv = mma_dkv.get_thread_slice(tidx);
    auto thr_dq = mma_dq.get_thread_slice(tidx);

    // S / dP accumulators, their (query, key) coordinates and their places in the P / dX buffers.
    Tensor tSrS = partition_fragment_C(mma_sdp, Shape<M, N>{});
    Tensor tSrdP = partition_fragment_C(mma_sdp, Shape<M, N>{});
    Tensor tScS = thr_sdp.partition_C(make_identity_tensor(Shape<M, N>{}));
    // P and dX leave through stmatrix (four 8x8 16-bit tiles per instruction, one address per thread each): far
    // fewer shared-memory addresses to keep than per-pair stores, which pushed ptxas into spills.
    auto smem_tiled_copy_p = make_tiled_copy_C(Copy_Atom<SM90_U32x4_STSM_N, Element>{}, mma_sdp);
    auto smem_copy_p = smem_tiled_copy_p.get_thread_slice(tidx);
    Tensor tSrP = make_fragment_like<Element>(tSrS);  // 16-bit staging of P and dX
    Tensor tSrdX = make_fragment_like<Element>(tSrS);
    Tensor tPrP = smem_copy_p.retile_S(tSrP);
    Tensor tPrdX = smem_copy_p.retile_S(tSrdX);
    uint32_t* p_words = reinterpret_cast<uint32_t*>(raw_pointer_cast(tSrP.data()));
    uint32_t* dx_words = reinterpret_cast<uint32_t*>(raw_pointer_cast(tSrdX.data()));
    Tensor tdQrdQ = partition_fragment_C(mma_dq, Shape<M, D>{});
    Tensor tdQcdQ = thr_dq.partition_C(make_identity_tensor(Shape<M, D>{}));
    constexpr int kFrag = decltype(size(tSrS))::value;
    static_assert(kFrag % 2 == 0, "accumulator elements come in column pairs");

    // P = SiLU(alpha x) / N and SiLU'(alpha x) * alpha / N (the dX factor) by detail::silu_and_grad_scaled.
    const float half_alpha = 0.5f * p.alpha;
    const float coef = half_alpha * p.inv_scaling_seqlen;
    const bool rab_pairs = (p.max_seq_len % 2) == 0;  // 32-bit bias loads need even rows
    // With kDqTma (not in stage), thread 0 issues each tile's dQ reduce-add (after the tile's second barrier);
    // kDqInStage leaves the reduce-adds to the dQ writer warp (reduce_dq), and drab is the drab writer's (write_drab).
    const bool dq_leader = !Traits::kDqInStage && tidx == 0;
    const bool tma_thread = Traits::kDqTma && dq_leader;
    if (Traits::kDqTma && dq_leader) prefetch_tma_descriptor(args.tma_dq.get_tma_descriptor());
    float* dq_base = p.dq_accum + (int64_t(seq_start) * p.heads + head) * kHeadDim;
    const int64_t dq_row = int64_t(p.heads) * kHeadDim;

    // Bias of one tile into registers, issued one tile ahead, right after the previous tile's dQ / dV / dK GEMMs, so
    // the loads fly behind those and this tile's S / dP GEMMs. Not before the P / dX barrier: the proxy fence there
    // (MEMBAR.ALL.CTA in the SASS) apparently made the warps wait for the loads in flight, every tile (H200 A/B at
    // head dim 256, B=32, T=4096: frozen bias 336-339 -> 345-349 TFLOP/s with the loads moved here, 358-359 with the
    // one-pointer form below). At the tile's start the pointwise pass waited for them (14% of warp samples).
    // This thread's S element 0 is its lowest row and column; the others sit at compile-time offsets from it.
    const int r_base = get<0>(tScS(0));
    const int c_base = get<1>(tScS(0));
    uint32_t rab_bits[kHasRab ? kFrag / 2 : 1];
    auto load_rab = [&](int m0) __attribute__((always_inline)) {
      const bool inside = m0 + kBlockM <= mask.length && n0 + kBlockN <= mask.length;  // no bounds checks needed
      if (inside && rab_pairs) {
        // One pointer, the loads at compile-time offsets from it (a row offset times max_seq_len, a column offset):
        // fewer instructions next to the GEMMs than an address and a bounds test per element.
        const Element_* base = rab + int64_t(m0 + r_base) * p.max_seq_len + (n0 + c_base);
        CUTE_UNROLL
        for (int t = 0; t < kFrag / 2; ++t) {
          const int dr = get<0>(tScS(2 * t)) - r_base;
          const int dc = get<1>(tScS(2 * t)) - c_base;
          rab_bits[t] = __ldg(reinterpret_cast<const unsigned int*>(base + int64_t(dr) * p.max_seq_len + dc));
        }
        return;
      }
      CUTE_UNROLL
      for (int t = 0; t < kFrag / 2; ++t) {
        const int i = m0 + get<0>(tScS(2 * t));
        const int j = n0 + get<1>(tScS(2 * t));
        const Element_* src = rab + int64_t(i) * p.max_seq_len + j;
        const bool in = inside || (i < mask.length && j < mask.length);
        if (rab_pairs) {
          rab_bits[t] = in ? __ldg(reinterpret_cast<const unsigned int*>(src)) : 0u;
        } else {
          const unsigned short* s16 = reinterpret_cast<const unsigned short*>(src);
          const uint32_t lo16 = in ? __ldg(s16) : 0u;
          const uint32_t hi16 = in && j + 1 < mask.length ? __ldg(s16 + 1) : 0u;
          rab_bits[t] = lo16 | (hi16 << 16);
        }
      }
    };

    PipelineState state;  // consumers start at stage 0, phase 0
    int buf = 0;
    // causal_fast_tile (compile-time; masked tiles of plain causal sequences only): the two-compare test of
    // causal_fast.h instead of the general mask.
    auto tile = [&](int m0, auto full_tile, auto causal_fast_tile) __attribute__((always_inline)) {
      SharedStorage& s = *detail::opaque(&ss);
      auto [sQ, sQt, sdO, sdOt, sK, sKt, sV, sdX, sdXt] = smem_views(s);
      Tensor sP = make_tensor(make_smem_ptr(s.p.data()), typename Traits::SmemLayoutP{});
      Tensor sPt = make_tensor(make_smem_ptr(s.p.data()), typename Traits::SmemLayoutPt{});
      Tensor tSrQ = thr_sdp.partition_fragment_A(sQ);       // (MMA, M, K, stage)
      Tensor tSrK = thr_sdp.partition_fragment_B(sK);       // (MMA, N, K)
      Tensor tdPrdO = thr_sdp.partition_fragment_A(sdO);    // (MMA, M, K, stage)
      Tensor tdPrV = thr_sdp.partition_fragment_B(sV);      // (MMA, N, K)
      Tensor tdVrPt = thr_dkv.partition_fragment_A(sPt);    // (MMA, keys, queries, buffer)
      Tensor tdVrdOt = thr_dkv.partition_fragment_B(sdOt);  // (MMA, dim, queries, stage)
      Tensor tdKrdXt = thr_dkv.partition_fragment_A(sdXt);
      Tensor tdKrQt = thr_dkv.partition_fragment_B(sQt);
      Tensor tdQrdX = thr_dq.partition_fragment_A(sdX);     // (MMA, queries, keys, buffer)
      Tensor tdQrKt = thr_dq.partition_fragment_B(sKt);     // (MMA, dim, keys)
      Tensor tPsP = smem_copy_p.partition_D(sP);            // (CPY, CPY_M, CPY_N, buffer)
      Tensor tPsdX = smem_copy_p.partition_D(sdX);
      // Fresh accumulators: cleared registers end the previous tile's live ranges (the GMMA asm reads its C
      // operand even when told to overwrite it, which would keep S, dP and dQ alive across the loop).
      clear(tSrS);
      clear(tSrdP);
      // Both stages before either GEMM: with the dO wait (a try_wait loop) between them, ptxas made dP's GMMAs
      // wait for S's to retire (a WARPGROUP.DEPBAR between the two, seen in the head-dim-256 SASS).
      pipeline_q.consumer_wait(state);
      pipeline_do.consumer_wait(state);
      warpgroup_gemm_ss<false>(mma_sdp, tSrQ(_, _, _, state.index()), tSrK, tSrS);
      warpgroup_gemm_ss<false>(mma_sdp, tdPrdO(_, _, _, state.index()), tdPrV, tSrdP);
      warpgroup_wait<0>();
      warpgroup_fence_operand(tSrS);
      warpgroup_fence_operand(tSrdP);
      // P = SiLU(z) * mask / N and dX = dP * SiLU'(z) * mask * alpha / N, element by element (S and dP die as P and
      // dX are produced, which keeps the peak register use low next to the dK / dV accumulators).
      [[maybe_unused]] const CausalThresholds thresholds = causal_thresholds(mask, m0 + r_base, n0 + c_base);
      CUTE_UNROLL
      for (int t = 0; t < kFrag / 2; ++t) {
        float b0 = 0.f, b1 = 0.f;
        if constexpr (kHasRab) unpack2<Element_>(rab_bits[t], b0, b1);
        float f0, f1, d0, d1;
        detail::silu_and_grad_scaled<Element_>(tSrS(2 * t) + b0, half_alpha, coef, f0, d0);
        detail::silu_and_grad_scaled<Element_>(tSrS(2 * t + 1) + b1, half_alpha, coef, f1, d1);
        float x0 = tSrdP(2 * t) * d0;
        float x1 = tSrdP(2 * t + 1) * d1;
        const int i = m0 + get<0>(tScS(2 * t));
        const int j = n0 + get<1>(tScS(2 * t));
        bool v0 = true, v1 = true;
        if (!bool(full_tile)) {  // compile-time flag: mask-free tiles carry no mask code
          if constexpr (decltype(causal_fast_tile)::value) {
            const int dr = get<0>(tScS(2 * t)) - r_base;  // compile-time after folding
            const int dc = get<1>(tScS(2 * t)) - c_base;
            v0 = causal_visible<false>(dr, dc, thresholds);
            v1 = causal_visible<false>(dr, dc + 1, thresholds);
          } else {
            v0 = mask(i, j);
            v1 = mask(i, j + 1);
          }
          if (!v0) f0 = x0 = 0.f;
          if (!v1) f1 = x1 = 0.f;
        }
        p_words[t] = detail::pack2<Element_>(f0, f1);
        dx_words[t] = detail::pack2<Element_>(x0, x1);
      }
      copy(smem_tiled_copy_p, tPrP, tPsP(_, _, _, buf));
      copy(smem_tiled_copy_p, tPrdX, tPsdX(_, _, _, buf));
      // Generic-proxy stores -> visible to the GMMA (async proxy); then every key of P / dX is in place.
      cutlass::arch::fence_view_async_shared();
      // The previous tile's reduce-adds (and the drab writer) have read its dX and dQ before anyone passes this
      // barrier (the next tile rewrites those buffers).
      if (tma_thread) tma_store_wait<0>();
      cutlass::arch::NamedBarrier::sync(kPdxThreads, kPdxBarrier);

      clear(tdQrdQ);
      if constexpr (Traits::kDqInStage) {
        // dV, dQ, dK: once dV and dQ have landed, the warpgroup's half of the dO stage is free for half of its dQ
        // while dK still runs; the Q half takes the rest after dK.
        warpgroup_gemm_ss<false>(mma_dkv, tdVrPt(_, _, _, buf), tdVrdOt(_, _, _, state.index()), tdVrdV);
        warpgroup_gemm_ss<false>(mma_dq, tdQrdX(_, _, _, buf), tdQrKt, tdQrdQ);
        warpgroup_gemm_ss<false>(mma_dkv, tdKrdXt(_, _, _, buf), tdKrQt(_, _, _, state.index()), tdKrdK);
      } else {
        warpgroup_gemm_ss<false>(mma_dq, tdQrdX(_, _, _, buf), tdQrKt, tdQrdQ);
        warpgroup_gemm_ss<false>(mma_dkv, tdVrPt(_, _, _, buf), tdVrdOt(_, _, _, state.index()), tdVrdV);
        warpgroup_gemm_ss<false>(mma_dkv, tdKrdXt(_, _, _, buf), tdKrQt(_, _, _, state.index()), tdKrdK);
      }
      if constexpr (kHasRab) {
        if (m0 + kBlockM < m_end) load_rab(m0 + kBlockM);  // the next tile's bias
      }
      if constexpr (Traits::kDqInStage) {
        warpgroup_wait<1>();  // dV and dQ have landed; dK may still run
        warpgroup_fence_operand(tdQrdQ);
        warpgroup_fence_operand(tdVrdV);
        // The warpgroup's dQ columns [128 w, 128 w + 128): the first 64 into its half of the Q stage, the rest into
        // its half of the dO stage. A thread's columns are its first column (< 128 w + 8) plus compile-time
        // multiples of 8, so which quarter an element goes to is known at compile time. 32-bit shared addresses
        // (st.shared): through generic pointers these were generic stores, slower to issue and to fence.
        using Quarter = typename Traits::SmemLayoutDqQuarter;
        constexpr int kTileBytes = kBlockM * kHeadDim * int(sizeof(Element));
        constexpr int kQuarterBytes = cute::cosize_v<Quarter> * int(sizeof(float));
        const int wg = detail::thread_index_x() / 128 - 1;  // warp_group, not kept live across the loop (it spilled)
        const uint32_t q_half = cute::cast_smem_ptr_to_uint(detail::opaque(ss.q.data())) +
                                state.index() * kTileBytes + wg * kQuarterBytes;
        const uint32_t do_half = cute::cast_smem_ptr_to_uint(detail::opaque(ss.dout.data())) +
                                 state.index() * kTileBytes + wg * kQuarterBytes;
        // Opaque here: the per-thread offsets derived from them were hoisted out of the loop and spilled.
        const int row0 = detail::opaque(int(get<0>(tdQcdQ(0))));
        const int col0 = detail::opaque(int(get<1>(tdQcdQ(0))) - wg * (kHeadDim / 2));
        auto store_quarter = [&](auto in_do_half) __attribute__((always_inline)) {
          CUTE_UNROLL
          for (int t = 0; t < decltype(size(tdQrdQ))::value / 2; ++t) {
            const int dr = get<0>(tdQcdQ(2 * t)) - get<0>(tdQcdQ(0));  // compile-time after folding
            const int dc = get<1>(tdQcdQ(2 * t)) - get<1>(tdQcdQ(0));
            if ((dc >= 64) == decltype(in_do_half)::value) {
              const uint32_t base = decltype(in_do_half)::value ? do_half : q_half;
              detail::st_shared_f32x2(base + 4 * dq_quarter_offset(row0, col0, dr, dc), tdQrdQ(2 * t),
                                      tdQrdQ(2 * t + 1));
            }
          }
        };
        store_quarter(cute::true_type{});
        warpgroup_wait<0>();  // dK has read this warpgroup's half of the Q stage
        store_quarter(cute::false_type{});
        // Visible to TMA (async proxy), then announced to the dQ writer without waiting for it.
        cutlass::arch::fence_view_async_shared();
        cutlass::arch::NamedBarrier::arrive(128 + 32, dq_stage_barrier(wg, state.index()));
      } else if constexpr (Traits::kDqTma) {
        warpgroup_wait<2>();  // dQ has landed; dV and dK may still run
        warpgroup_fence_operand(tdQrdQ);
        store_and_reduce_dq(args, ss, thr_dq, tdQrdQ, tidx, seq_start, head, m0);
      } else {
        warpgroup_wait<2>();
        warpgroup_fence_operand(tdQrdQ);
        // Rows past the sequence end hold zeros (their dX is masked) and belong to the next sequence: skipped.
        Tensor gdQ =
            make_tensor(make_gmem_ptr(dq_base + m0 * dq_row), make_layout(Shape<M, D>{}, make_stride(dq_row, _1{})));
        Tensor tdQgdQ = thr_dq.partition_C(gdQ);
        CUTE_UNROLL
        for (int t = 0; t < decltype(size(tdQrdQ))::value / 2; ++t) {
          if (m0 + get<0>(tdQcdQ(2 * t)) < mask.length) {
            atomicAdd(reinterpret_cast<float2*>(&tdQgdQ(2 * t)), make_float2(tdQrdQ(2 * t), tdQrdQ(2 * t + 1)));
          }
        }
      }
      warpgroup_wait<0>();
      warpgroup_fence_operand(tdVrdV);
      warpgroup_fence_operand(tdKrdK);
      // kDqInStage: the stage is refilled only after the dQ writer's release too (reduce_dq).
      pipeline_q.consumer_release(state);
      pipeline_do.consumer_release(state);
      ++state;
      buf ^= 1;
    };

    if constexpr (kHasRab) load_rab(m_begin);  // the first tile's bias (the caller has >= 1 tile)
    for_each_query_tile(p, mask, n0, m_begin, m_end, tile);
    if (tma_thread) tma_store_wait<0>();  // the last reduce-adds have read their tiles before the CTA's smem goes away
  }
};

}  // namespace sm90
}  // namespace gr_kernels
