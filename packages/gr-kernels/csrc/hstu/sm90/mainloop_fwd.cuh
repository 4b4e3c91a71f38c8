// Mainloop of the Hopper HSTU forward kernel: the producer's TMA loads and the consumers' GMMA + pointwise work.
//
// Per key tile (walked from the last visible one down, so the diagonal tiles that need per-element masks come
// first and the mask-free interior tiles follow):
//   producer : K tile (+ its rab tile with RabSource::kSmem) -> stage (pipeline_k), V tile -> stage (pipeline_v)
//   consumer : S = Q K^T (SS GMMA); P = SiLU(alpha (S + rab)) * mask in registers; O += P V (RS GMMA).
// The bias comes from shared memory (kSmem: each thread reads its S elements' bias, then releases the K stage) or,
// when rab rows are not 16-byte aligned (host decision, fwd_kernel.cuh), from per-thread global loads (kGlobal).
// There is no running max or rescaling: each key tile's contribution to O is final.
#pragma once

#include <cute/tensor.hpp>

#include "hstu/mask.h"
#include "hstu/params.h"
#include "hstu/sm90/kernel_traits.h"
#include "hstu/sm90/causal_fast.h"
#include "hstu/utils.cuh"

namespace gr_kernels {
namespace sm90 {

// One warpgroup-wide GEMM: C (+)= A B over all K steps of the tile, issued asynchronously as one commit group.
// kRegA: A is a register fragment (RS GMMA) rather than shared-memory descriptors (SS). The caller waits
// (warpgroup_wait<N>) and fences C (and a register A) before it reads C or rewrites A.
template <bool kZeroInit, bool kRegA, typename TiledMma, typename TensorA, typename TensorB, typename TensorC>
__device__ __forceinline__ void warpgroup_gemm_issue(TiledMma& mma, TensorA& tA, TensorB const& tB, TensorC& tC) {
  using namespace cute;
  if constexpr (kRegA) warpgroup_fence_operand(tA);
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

// Two 16-bit values packed in one 32-bit word (low half first) -> floats.
template <typename Element>
__device__ __forceinline__ void unpack2(uint32_t bits, float& lo, float& hi);
template <>
__device__ __forceinline__ void unpack2<__nv_bfloat16>(uint32_t bits, float& lo, float& hi) {
  lo = __uint_as_float(bits << 16);
  hi = __uint_as_float(bits & 0xffff0000u);
}
template <>
__device__ __forceinline__ void unpack2<__half>(uint32_t bits, float& lo, float& hi) {
  const __half2 h = *reinterpret_cast<const __half2*>(&bits);
  lo = __low2float(h);
  hi = __high2float(h);
}

template <typename Element_, typename Traits>
struct FwdMainloop {
  using Element = typename Traits::Element;
  static constexpr int kBlockM = Traits::kBlockM;
  static constexpr int kBlockN = Traits::kBlockN;
  static constexpr int kHeadDim = Traits::kHeadDim;
  using SharedStorage = typename Traits::SharedStorage;
  using Pipeline = typename Traits::Pipeline;
  using PipelineState = typename Traits::PipelineState;

  // Key tiles [lo, hi) that can hold a key visible to some query of positions [m0, m0 + kBlockM): causal rows
  // (targets included) see j <= i except context rows, which see the whole history; a local window bounds j from
  // below. m0 is a position, not necessarily a multiple of kBlockM (delta q shifts the rows by kv_len - q_len).
  // Host-callable so that the self-check (self_check.cu) can test it against the mask.
  __host__ __device__ __forceinline__ static void key_blocks(const HstuFwdParams& p, const SequenceMask& mask, int m0,
                                                             int& lo, int& hi) {
    int n_end = mask.length;
    if (p.causal && m0 >= mask.context) n_end = m0 + kBlockM < mask.length ? m0 + kBlockM : mask.length;
    int n_start = 0;
    if (p.max_attn_len > 0 && mask.context == 0 && !mask.has_targets()) {
      n_start = m0 - p.max_attn_len > 0 ? m0 - p.max_attn_len : 0;
    }
    lo = n_start / kBlockN;
    hi = (n_end + kBlockN - 1) / kBlockN;
  }

  // Whether every (i, j) of the tile (rows m0.., keys n0..) with i inside the sequence is visible, so it needs no
  // per-element mask: every key in the history, no window, and (causal) every key at or before every query. Rows
  // past the sequence end may be in the tile: a row of P only feeds its own row of O, which the epilogue does not
  // store, so the last, partial query tile of a sequence (a delta-q call's few rows past a multiple of 128) takes
  // the mask-free loop too. Target rows see every history key, so a delta-q tile of candidates against the cached
  // history skips the mask on all but the key tiles that hold targets. (m0 < 0 only for invalid delta-q input,
  // q_len > kv_len, whose rows see nothing.)
  __host__ __device__ __forceinline__ static bool mask_free_tile(const HstuFwdParams& p, const SequenceMask& mask,
                                                                 int m0, int n0) {
    return m0 >= 0 && m0 < mask.length && p.max_attn_len == 0 && n0 + kBlockN <= mask.history &&
           (!p.causal || n0 + kBlockN - 1 <= m0);
  }

  // Global coordinates of the jagged tensors as TMA sees them: (row, dim, head); q has its own rows with delta q.
  __device__ __forceinline__ static auto gmem_shape(const HstuFwdParams& p, int64_t rows) {
    return cute::make_shape(int32_t(rows), int32_t(kHeadDim), int32_t(p.heads));
  }

  // kSmem: where a consumer thread's S elements sit in a bias stage. SmemLayoutRab's 128-byte swizzle written out:
  // element (r, c) is at byte (c / 64) * kBlockM * 128 + r * 128 + ((c % 64 / 8) ^ (r % 8)) * 16 + (c % 8) * 2. The
  // thread's element 2t is (r0 + dr, c0 + dc) with c0 < 8 and dr, dc multiples of 8 (GMMA accumulator layout), so
  // with base = rab_thread_base(r0, c0) everything but one XOR per 8-key chunk folds into load immediates.
  // self_check.cu compares every offset with the cute layout (and checks the reads are bank-conflict free).
  __host__ __device__ __forceinline__ static uint32_t rab_thread_base(int r0, int c0) {
    return uint32_t(r0 * 128 + c0 * 2) | (uint32_t(r0 % 8) << 4);
  }
  __host__ __device__ __forceinline__ static uint32_t rab_word_offset(uint32_t base, int dr, int dc) {
    return (base ^ (uint32_t(dc % 64 / 8) << 4)) + uint32_t(dr * 128 + dc / 64 * kBlockM * 128);
  }

  // kSmem: the producer's (source, destination) TMA views of the bias tiles, indexed (_, key tile) and (_, stage).
  // Rows are query positions from pos0 (< 0 only for invalid delta q, whose rows see nothing); rows and keys past
  // max_seq_len are zero-filled by TMA, those past the sequence end are masked by the consumers. Other sources: none.
  template <RabSource kRab>
  __device__ __forceinline__ static auto rab_tma_tiles(const FwdArgs<Traits>& args, Element* smem_rab, int pos0,
                                                       int rab_plane) {
    using namespace cute;
    if constexpr (kRab == RabSource::kSmem) {
      Tensor sRab = make_tensor(make_smem_ptr(smem_rab), typename Traits::SmemLayoutRab{});
      const int32_t n = args.p.max_seq_len;
      const auto shape = make_shape(n, n, int32_t(args.p.batch) * args.p.rab_heads);
      Tensor plane = args.tma_rab.get_tma_tensor(shape)(_, _, rab_plane);
      Tensor gRab = local_tile(domain_offset(make_coord(pos0, _0{}), plane), Shape<Int<kBlockM>, Int<kBlockN>>{},
                               make_coord(_0{}, _));
      return tma_partition(args.tma_rab, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sRab), group_modes<0, 2>(gRab));
    } else {
      return 0;
    }
  }

  // Producer (one thread): Q once (query rows from q_start of q's q_rows), then K and V of every key tile (rows
  // from seq_start), highest tile first. kSmem: with each K tile, the bias tile of query positions [pos0, pos0 +
  // kBlockM) and the tile's keys from plane rab_plane into the rab stage of the same index (same barrier).
  template <RabSource kRab>
  __device__ static void load(const FwdArgs<Traits>& args, SharedStorage& ss, Element* smem_rab, Pipeline& pipeline_k,
                              Pipeline& pipeline_v, PipelineState& state, int seq_start, int q_start, int64_t q_rows,
                              int head, int m_block, int lo, int hi, int pos0, int rab_plane) {
    using namespace cute;
    Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename Traits::SmemLayoutQ{});
    Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Traits::SmemLayoutK{});
    Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), typename Traits::SmemLayoutV{});
    const auto shape = gmem_shape(args.p, args.p.total_rows);
    const auto shape_q = gmem_shape(args.p, q_rows);
    // Rows are addressed from the sequence start; rows past its end are the next sequence's (masked by the
    // consumers) or past the tensor end (zero-filled by TMA).
    const auto seq_origin = make_coord(seq_start, _0{});
    const auto q_origin = make_coord(q_start, _0{});
    Tensor gQ = local_tile(domain_offset(q_origin, args.tma_q.get_tma_tensor(shape_q)(_, _, head)),
                           Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m_block, _0{}));
    Tensor gK = local_tile(domain_offset(seq_origin, args.tma_k.get_tma_tensor(shape)(_, _, head)),
                           Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, _0{}));
    Tensor gV = local_tile(domain_offset(seq_origin, args.tma_v.get_tma_tensor(shape)(_, _, head)),
                           Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, _0{}));
    auto [tQgQ, tQsQ] = tma_partition(args.tma_q, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
    auto [tKgK, tKsK] = tma_partition(args.tma_k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
    auto [tVgV, tVsV] = tma_partition(args.tma_v, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));

    ss.barrier_q.arrive_and_expect_tx(Traits::kTmaBytesQ);
    copy(args.tma_q.with(reinterpret_cast<cutlass::arch::ClusterTransactionBarrier::ValueType&>(ss.barrier_q), 0),
         tQgQ, tQsQ);
    auto rab_tiles = rab_tma_tiles<kRab>(args, smem_rab, pos0, rab_plane);
    for (int n_block = hi - 1; n_block >= lo; --n_block) {
      pipeline_k.producer_acquire(state);
      copy(args.tma_k.with(*pipeline_k.producer_get_barrier(state), 0), tKgK(_, n_block), tKsK(_, state.index()));
      if constexpr (kRab == RabSource::kSmem) {  // same barrier: the K stage completes with its bias
        copy(args.tma_rab.with(*pipeline_k.producer_get_barrier(state), 0), get<0>(rab_tiles)(_, n_block),
             get<1>(rab_tiles)(_, state.index()));
      }
      pipeline_v.producer_acquire(state);
      copy(args.tma_v.with(*pipeline_v.producer_get_barrier(state), 0), tVgV(_, n_block), tVsV(_, state.index()));
      ++state;
    }
  }

  // Consumers (both warpgroups, tidx in [0, 256)): accumulate O = sum over key tiles of P V into tOrO. m0 is the
  // position of the tile's first query row (its row with delta q's shift added).
  //
  // Intra-warpgroup overlap: with P of tile t in registers, the GEMMs S(t+1) = Q K(t+1)^T and O += P(t) V(t) are
  // issued back to back; SiLU + mask of S(t+1) (special-function and ALU work) then runs while O += P(t) V(t) is
  // still on the tensor cores, and P is overwritten only after that GEMM has retired.
  // kRab: the kernel is compiled per bias source, so each variant's loop stays small. rab: the (sequence, head)
  // bias plane in global memory (kGlobal); smem_rab: the bias stages (kSmem).
  // kTargetsFast: masked tiles of causal sequences with single targets take the few-compare test too (causal_fast.h;
  // the delta-q kernels).
  template <RabSource kRab, bool kTargetsFast, typename FragO>
  __device__ __forceinline__ static void mma(const HstuFwdParams& p, SharedStorage& ss, Pipeline& pipeline_k,
                                             Pipeline& pipeline_v, PipelineState& state_k, PipelineState& state_v,
                                             FragO& tOrO, int tidx, const SequenceMask& mask, int m0, int lo, int hi,
                                             const Element_* rab, const Element* smem_rab, bool causal_fast_allowed) {
    using namespace cute;
    // With the bias in shared memory, the K stage (which carries it) is released only after SiLU has read it.
    constexpr bool kRabInStage = kRab == RabSource::kSmem;
    typename Traits::MmaQK mma_qk;
    typename Traits::MmaPV mma_pv;
    auto thr_qk = mma_qk.get_thread_slice(tidx);
    auto thr_pv = mma_pv.get_thread_slice(tidx);
    Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), typename Traits::SmemLayoutQ{});
    Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), typename Traits::SmemLayoutK{});
    Tensor sVt = make_tensor(make_smem_ptr(ss.v.data()), typename Traits::SmemLayoutVt{});
    Tensor tSrQ = thr_qk.partition_fragment_A(sQ);   // GMMA descriptors
    Tensor tSrK = thr_qk.partition_fragment_B(sK);   // (MMA, N, K, stage)
    Tensor tOrV = thr_pv.partition_fragment_B(sVt);  // (MMA, D, N, stage)
    // (row, col) inside the tile of every S accumulator element this thread holds.
    Tensor tScS = thr_qk.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
    Tensor tSrS = partition_fragment_C(mma_qk, Shape<Int<kBlockM>, Int<kBlockN>>{});
    // This thread's element 0 is its lowest row and column; every other element sits at a compile-time offset.
    const int r_base = get<0>(tScS(0));
    const int c_base = get<1>(tScS(0));
    // kSmem: this thread's base for rab_word_offset.
    const uint32_t rab_base = rab_thread_base(r_base, c_base);
    const bool fast_mask = causal_fast_allowed && causal_fast<kTargetsFast>(p, mask, m0);
    // P as the register A operand of P V; its per-thread element order equals the S accumulator's (both walk
    // column pairs, then the +8 row, then 8-column groups), so element i of S becomes element i of P.
    Tensor tOrP = make_tensor<Element>(partition_shape_A(mma_pv, Shape<Int<kBlockM>, Int<kBlockN>>{}));
    constexpr int kFrag = decltype(size(tSrS))::value;
    static_assert(kFrag == decltype(size(tOrP))::value, "S accumulator and P operand sizes differ");
    static_assert(kFrag % 2 == 0, "accumulator elements come in column pairs");

    const float half_alpha = 0.5f * p.alpha;  // detail::silu_scaled
    const bool rab_pairs = (p.max_seq_len % 2) == 0;  // 32-bit bias loads need even rows (columns are even)
    using True = cute::true_type;
    using False = cute::false_type;

    // Bias of one tile straight into registers (issued before the tile's S GEMM, so the loads fly meanwhile).
    uint32_t rab_bits[kFrag / 2];
    auto load_rab = [&](int n0, bool full_tile) __attribute__((always_inline)) {  // kGlobal
      CUTE_UNROLL
      for (int t = 0; t < kFrag / 2; ++t) {
        const int i = m0 + get<0>(tScS(2 * t));
        const int j = n0 + get<1>(tScS(2 * t));
        const Element_* src = rab + int64_t(i) * p.max_seq_len + j;
        // (a mask-free tile's rows may run past the sequence, and past the bias plane)
        const bool in = unsigned(i) < unsigned(mask.length) && (full_tile || j < mask.length);
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
    // S <- SiLU(alpha (S + rab)) * mask, in place; the 1/N scale is applied once to O in the epilogue. Without the
    // bias or with it in shared memory, mask-free tiles compile to their own short loop (compile-time flags): a loop
    // body that carried every variant overflowed the instruction cache (ncu: 40% of the stall cycles were
    // instruction fetch at head dim 128).
    // stage: the K stage of this tile (kSmem reads its bias there; each pair is one 32-bit shared load).
    // causal_fast_tile (compile-time; only for causal_fast sequences): the masked tile's test is causal_visible
    // (causal_fast.h).
    auto silu_mask = [&](int n0, int stage, auto full_tile, auto causal_fast_tile) __attribute__((always_inline)) {
      [[maybe_unused]] const unsigned char* rab_stage =
          reinterpret_cast<const unsigned char*>(smem_rab) + stage * Traits::kTmaBytesRab;
      [[maybe_unused]] const CausalThresholds thresholds = causal_thresholds(mask, m0 + r_base, n0 + c_base);
      CUTE_UNROLL
      for (int t = 0; t < kFrag / 2; ++t) {
        float b0 = 0.f, b1 = 0.f;
        if constexpr (kRab == RabSource::kGlobal) unpack2<Element_>(rab_bits[t], b0, b1);
        if constexpr (kRab == RabSource::kSmem) {
          const int dr = get<0>(tScS(2 * t)) - get<0>(tScS(0));  // compile-time after folding
          const int dc = get<1>(tScS(2 * t)) - get<1>(tScS(0));
          unpack2<Element_>(*reinterpret_cast<const uint32_t*>(rab_stage + rab_word_offset(rab_base, dr, dc)), b0, b1);
        }
        float p0 = detail::silu_scaled<Element_>(tSrS(2 * t) + b0, half_alpha);
        float p1 = detail::silu_scaled<Element_>(tSrS(2 * t + 1) + b1, half_alpha);
        if (!bool(full_tile)) {  // a compile-time flag folds away; a runtime one branches per tile
          if constexpr (decltype(causal_fast_tile)::value) {
            const int dr = get<0>(tScS(2 * t)) - r_base;  // compile-time after folding
            const int dc = get<1>(tScS(2 * t)) - c_base;
            if (!causal_visible<kTargetsFast>(dr, dc, thresholds)) p0 = 0.f;
            if (!causal_visible<kTargetsFast>(dr, dc + 1, thresholds)) p1 = 0.f;
          } else {
            const int i = m0 + get<0>(tScS(2 * t));
            const int j = n0 + get<1>(tScS(2 * t));
            if (!mask(i, j)) p0 = 0.f;
            if (!mask(i, j + 1)) p1 = 0.f;
          }
        }
        tSrS(2 * t) = p0;
        tSrS(2 * t + 1) = p1;
      }
    };
    // fp32 pairs -> one packed cvt each (elements 2t, 2t + 1 of P share a 32-bit register).
    uint32_t* p_words = reinterpret_cast<uint32_t*>(raw_pointer_cast(tOrP.data()));
    auto to_p = [&]() __attribute__((always_inline)) {
      CUTE_UNROLL
      for (int t = 0; t < kFrag / 2; ++t) p_words[t] = detail::pack2<Element_>(tSrS(2 * t), tSrS(2 * t + 1));
    };

    ss.barrier_q.wait(0);
    if (hi <= lo) return;

    // First (highest) tile: S, then P; its P V is issued together with the next tile's S.
    auto first_tile = [&](auto full_tile, auto causal_fast_tile) __attribute__((always_inline)) {
      const int n0 = (hi - 1) * kBlockN;
      if constexpr (kRab == RabSource::kGlobal) load_rab(n0, bool(full_tile));
      pipeline_k.consumer_wait(state_k);
      warpgroup_gemm_issue<true, false>(mma_qk, tSrQ, tSrK(_, _, _, state_k.index()), tSrS);
      warpgroup_wait<0>();
      warpgroup_fence_operand(tSrS);
      const int stage = state_k.index();
      if constexpr (!kRabInStage) {
        pipeline_k.consumer_release(state_k);
        ++state_k;
      }
      silu_mask(n0, stage, full_tile, causal_fast_tile);
      if constexpr (kRabInStage) {
        pipeline_k.consumer_release(state_k);
        ++state_k;
      }
      to_p();
    };
    // Every later tile: S of this tile and P V of the previous one back to back.
    auto next_tile = [&](int n_block, auto full_tile, auto causal_fast_tile) __attribute__((always_inline)) {
      const int n0 = n_block * kBlockN;
      if constexpr (kRab == RabSource::kGlobal) load_rab(n0, bool(full_tile));
      pipeline_k.consumer_wait(state_k);
      warpgroup_gemm_issue<true, false>(mma_qk, tSrQ, tSrK(_, _, _, state_k.index()), tSrS);
      pipeline_v.consumer_wait(state_v);
      warpgroup_gemm_issue<false, true>(mma_pv, tOrP, tOrV(_, _, _, state_v.index()), tOrO);
      warpgroup_wait<1>();  // S of this tile has landed; P V of the previous tile may still run
      warpgroup_fence_operand(tSrS);
      const int stage = state_k.index();
      if constexpr (!kRabInStage) {
        pipeline_k.consumer_release(state_k);
        ++state_k;
      }
      silu_mask(n0, stage, full_tile, causal_fast_tile);
      if constexpr (kRabInStage) {
        pipeline_k.consumer_release(state_k);
        ++state_k;
      }
      warpgroup_wait<0>();  // the previous P V has retired: its V stage and P registers are free
      warpgroup_fence_operand(tOrO);
      warpgroup_fence_operand(tOrP);
      pipeline_v.consumer_release(state_v);
      ++state_v;
      to_p();
    };
    if constexpr (kRab == RabSource::kGlobal) {
      // Bias in registers: one loop, a runtime flag per tile (two specialised copies of this path made ptxas move
      // the S/P fragments to the stack).
      first_tile(mask_free_tile(p, mask, m0, (hi - 1) * kBlockN), False{});
      for (int n_block = hi - 2; n_block >= lo; --n_block) {
        next_tile(n_block, mask_free_tile(p, mask, m0, n_block * kBlockN), False{});
      }
    } else {
      // No bias, or the bias read from shared memory inside silu_mask (no registers held across the S GEMM).
      // Tiles are walked downwards and mask_free_tile is monotone in n0 (a lower key tile of a mask-free tile is
      // mask-free too), so the masked tiles come first and one loop per kind covers them. Masked tiles of a causal
      // sequence (causal_fast.h) take the few-compare mask; only they are compiled twice.
      if (mask_free_tile(p, mask, m0, (hi - 1) * kBlockN)) {
        first_tile(True{}, False{});
      } else if (fast_mask) {
        first_tile(False{}, True{});
      } else {
        first_tile(False{}, False{});
      }
      int n_block = hi - 2;
      if (fast_mask) {
        for (; n_block >= lo && !mask_free_tile(p, mask, m0, n_block * kBlockN); --n_block) {
          next_tile(n_block, False{}, True{});
        }
      } else {
        for (; n_block >= lo && !mask_free_tile(p, mask, m0, n_block * kBlockN); --n_block) {
          next_tile(n_block, False{}, False{});
        }
      }
      for (; n_block >= lo; --n_block) next_tile(n_block, True{}, False{});
    }
    pipeline_v.consumer_wait(state_v);
    warpgroup_gemm_issue<false, true>(mma_pv, tOrP, tOrV(_, _, _, state_v.index()), tOrO);
    warpgroup_wait<0>();
    warpgroup_fence_operand(tOrO);
    warpgroup_fence_operand(tOrP);
    pipeline_v.consumer_release(state_v);
    ++state_v;
  }
};

}  // namespace sm90
}  // namespace gr_kernels
