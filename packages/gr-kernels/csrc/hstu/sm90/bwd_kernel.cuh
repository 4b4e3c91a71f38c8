// Hopper (sm90a) HSTU attention backward. With x = Q K^T + rab, z = alpha x, P = SiLU(z) * mask / N, O = P V:
//   dV = P^T dO,  dP = dO V^T,  dX = dP * mask / N * SiLU'(z) * alpha,  dQ = dX K,  dK = dX^T Q,  drab = dX.
// Same semantics and parameters (HstuBwdParams) as the SM80-MMA kernel of hstu/bwd_kernel.cuh; no delta q (the
// dispatch sends q_offsets calls to the SM80 kernel).
//
// Warp-specialised: warpgroup 0 loads (TMA: K, V once, Q and dO tiles through mbarrier pipelines), warpgroups 1-2
// compute (WGMMA) and write. Pieces: kernel_traits_bwd.h (tiles, layouts, types), mainloop_bwd.cuh (loads, GEMMs,
// SiLU and its derivative, masks, rab/drab, dQ accumulation), epilogue_bwd.cuh (dK, dV rows). dq_accum is an fp32
// buffer the caller zeroed (the key tiles add into it). drab is 16-bit (q's dtype) and needs no zeroing: each
// (query tile, key tile) of dX leaves shared memory through the drab writer warp (mainloop_bwd.cuh, write_drab) as
// one TMA store by the CTA that owns the plane's key columns (per-head planes: every CTA; a plane shared by the
// heads: the first of their CTAs to start) and as one TMA reduce-add by each other head of a shared plane once the
// owner's tile has landed (a 16-bit sum over those heads, like the 16-bit bias itself); the rows no tile covers get
// zeros from the producer warpgroup's spare warps (shared among the heads of a shared plane), and the key strips past
// a sequence's end zero their columns row by row (each row's zeros one run), with all threads of those CTAs.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "hstu/mask.h"
#include "hstu/params.h"
#include "hstu/sm90/epilogue_bwd.cuh"
#include "hstu/sm90/kernel_traits_bwd.h"
#include "hstu/sm90/mainloop_bwd.cuh"
#include "hstu/utils.cuh"

namespace gr_kernels {
namespace sm90 {

template <typename Element_, typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1) hstu_bwd_sm90_kernel(const __grid_constant__ BwdArgs<Traits> args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr bool kHasRab = Traits::kRab;
  using Mainloop = BwdMainloop<Element_, Traits>;
  using Epilogue = BwdEpilogue<Element_, Traits>;
  using Pipeline = typename Traits::Pipeline;
  const HstuBwdParams& p = args.p;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  auto& ss = *reinterpret_cast<typename Traits::SharedStorage*>(smem_raw);

  // Lowest key tiles first: under a causal mask they see the most query tiles, so they should not be the tail.
  const int n_block = blockIdx.x;
  const int head = blockIdx.y;
  const int b = blockIdx.z;
  const int seq_start = p.seq_offsets[b];
  const int length = p.seq_offsets[b + 1] - seq_start;
  const int n0 = n_block * Traits::kBlockN;
  // With a drab, the rows [r0, r1) of the plane's key columns [n0, n0 + kBlockN) that no dX tile covers get zeros
  // from this CTA's threads [lane, lanes): all of them with a per-head plane; with a plane the heads share, each head's
  // CTA its 1 / heads of the rows (no CTA writes them otherwise, so they need no order).
  auto zero_drab_share = [&](int r0, int r1, int lane, int lanes) {
    if (p.rab_heads == 1 && p.heads > 1) {
      const int share = (r1 - r0 + p.heads - 1) / p.heads;
      r0 += head * share;
      r1 = r0 + share < r1 ? r0 + share : r1;
    }
    Mainloop::zero_drab_rows(p, detail::rab_plane(p, b, head), n0, r0, r1, lane, lanes);
  };
  if (n0 >= length) {  // the whole CTA leaves before any barrier exists; no dX tile reaches these key columns
    if (kHasRab && p.drab != nullptr) {
      // The key strips past the sequence's end zero the plane's columns [first * kBlockN, max_seq_len) together, a
      // share of the rows each (with a plane shared by the heads, every head's CTAs of those strips): whole row
      // runs, not 2 * kBlockN-byte pieces one row apart.
      const int first = (length + Traits::kBlockN - 1) / Traits::kBlockN;
      const int per_strip = p.rab_heads == 1 && p.heads > 1 ? p.heads : 1;
      const int ctas = (int(gridDim.x) - first) * per_strip;
      const int rank = (n_block - first) * per_strip + (per_strip > 1 ? head : 0);
      const int rows = (p.max_seq_len + ctas - 1) / ctas;
      const int r0 = rank * rows;
      Mainloop::zero_drab_columns(p, detail::rab_plane(p, b, head), first * Traits::kBlockN, r0,
                                  r0 + rows < p.max_seq_len ? r0 + rows : p.max_seq_len, threadIdx.x,
                                  Traits::kThreads);
    }
    return;
  }

  const SequenceMask mask = SequenceMask::of_sequence(p, b, length);
  int m_begin, m_end;
  Mainloop::query_rows(p, mask, n0, m_begin, m_end);
  const bool any_tile = m_begin < m_end;

  const int warp_group = __shfl_sync(0xffffffff, int(threadIdx.x) / 128, 0);
  if (threadIdx.x == 0) {
    ss.barrier_kv.init(1);
    if (kHasRab && p.drab_sync != nullptr) {
      // A drab plane shared by the heads: the first of their CTAs to get here for these key columns owns them (it
      // stores its dX tiles, the others add theirs after its stores), so a CTA only ever waits for one that is
      // already running (the hardware's launch order is no promise).
      ss.drab_role = atomicAdd(p.drab_sync + int64_t(b) * drab_sync_blocks(p.max_seq_len) + n_block, 1);
    }
  }
  typename Pipeline::Params pipe_params;
  pipe_params.transaction_bytes = Traits::kTmaBytesQ;
  pipe_params.role = warp_group == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pipe_params.is_leader = threadIdx.x == 0;
  // kDqInStage: one arrival more on the empty barriers, the dQ writer's once the stage's dQ has been read.
  pipe_params.num_consumers = Traits::kConsumerThreads + (Traits::kDqInStage ? 1 : 0);
  Pipeline pipeline_do(ss.pipeline_do, pipe_params, cute::Shape<cute::_1, cute::_1, cute::_1>{});
  pipe_params.transaction_bytes += Traits::kTmaBytesRab;  // kRabTma: the bias tile rides with the Q tile
  Pipeline pipeline_q(ss.pipeline_q, pipe_params, cute::Shape<cute::_1, cute::_1, cute::_1>{});
  __syncthreads();  // barriers initialised and visible to every warpgroup
  // With a drab, whether this CTA stores its dX tiles into its plane's key columns [n0, n0 + kBlockN) (the others
  // add theirs after its stores): every CTA of a per-head plane, the first of the heads sharing one to start.
  const bool drab_owner =
      kHasRab && p.drab != nullptr && (p.drab_sync == nullptr ? p.rab_heads != 1 || head == 0 : ss.drab_role == 0);

  if (warp_group == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    if (threadIdx.x == 0 && any_tile) {  // no query tile: nothing is loaded, so no copy outlives the CTA
      cute::prefetch_tma_descriptor(args.tma_q.get_tma_descriptor());
      cute::prefetch_tma_descriptor(args.tma_do.get_tma_descriptor());
      cute::prefetch_tma_descriptor(args.tma_k.get_tma_descriptor());
      cute::prefetch_tma_descriptor(args.tma_v.get_tma_descriptor());
      if constexpr (Traits::kRabTma) cute::prefetch_tma_descriptor(args.tma_rab.get_tma_descriptor());
      const int rab_plane = kHasRab ? detail::rab_plane(p, b, head) : 0;
      Mainloop::load(args, ss, pipeline_q, pipeline_do, seq_start, head, n_block, m_begin, m_end, rab_plane);
    }
    if constexpr (Traits::kDqInStage) {
      if (threadIdx.x / 32 == 1 && any_tile) {  // warp 1: the dQ writer
        Mainloop::reduce_dq(args, ss, pipeline_q, pipeline_do, seq_start, head, m_begin, m_end);
      }
    }
    if constexpr (kHasRab) {
      const int warp = threadIdx.x / 32;
      if (warp == 2 && any_tile) {  // the drab writer (with a frozen bias it only meets the consumers' barriers)
        static_assert(Traits::kBlockM == 64 && Traits::kBlockN % 64 == 0,
                      "drab_sync holds one flag per 64 x 64 block of a plane (hstu_bwd_drab_sync_words)");
        int* flags = nullptr;  // this key tile's flags: one word per 64-row query tile (hstu_bwd_drab_sync_words)
        if (p.drab_sync != nullptr) {
          const int64_t blocks = drab_sync_blocks(p.max_seq_len);
          flags = p.drab_sync + p.batch * blocks + (b * blocks + n_block) * blocks;
        }
        Mainloop::write_drab(args, ss, detail::rab_plane(p, b, head), drab_owner, flags, n0, m_begin, m_end);
      }
      // The rows of these key columns that no dX tile covers get zeros from warp 3 (and warp 1 unless it writes dQ).
      constexpr int kZeroLanes = Traits::kDqInStage ? 32 : 64;
      if (p.drab != nullptr && (warp == 3 || (!Traits::kDqInStage && warp == 1))) {
        const int lane = threadIdx.x % 32 + (warp == 3 ? 0 : 32);
        if (any_tile) {
          const int covered = m_begin + (m_end - m_begin + Traits::kBlockM - 1) / Traits::kBlockM * Traits::kBlockM;
          zero_drab_share(0, m_begin, lane, kZeroLanes);
          zero_drab_share(covered < p.max_seq_len ? covered : p.max_seq_len, p.max_seq_len, lane, kZeroLanes);
        } else {
          zero_drab_share(0, p.max_seq_len, lane, kZeroLanes);
        }
      }
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
    const int tidx = int(threadIdx.x) - 128;
    typename Traits::MmaDkv mma_dkv;
    auto tdVrdV = cute::partition_fragment_C(mma_dkv, cute::Shape<cute::Int<Traits::kBlockN>, cute::Int<Traits::kHeadDim>>{});
    auto tdKrdK = cute::partition_fragment_C(mma_dkv, cute::Shape<cute::Int<Traits::kBlockN>, cute::Int<Traits::kHeadDim>>{});
    cute::clear(tdVrdV);
    cute::clear(tdKrdK);
    if (any_tile) {
      const Element_* rab = nullptr;
      if constexpr (kHasRab) rab = static_cast<const Element_*>(p.rab) + detail::rab_plane_offset(p, b, head);
      ss.barrier_kv.wait(0);
      Mainloop::template mma<kHasRab>(args, ss, pipeline_q, pipeline_do, tdVrdV, tdKrdK, tidx, mask, seq_start, head,
                                       n0, m_begin, m_end, rab);
    }
    Epilogue::store(p, tdKrdK, tdVrdV, tidx, seq_start, head, n0, length);
  }
#else
  __trap();  // built without sm90a device code: the host dispatch never launches this
#endif
}

// Host side: builds the TMA descriptors and launches one (dtype, head dim, bias or not) instantiation.
template <typename Element_, int kHeadDim, bool kRab>
const char* launch_hstu_bwd_sm90(const HstuBwdParams& p, cudaStream_t stream) {
  using namespace cute;
  using Traits = BwdTraits<Element_, kHeadDim, kRab>;
  using Element = typename Traits::Element;
  auto gmem = [&](const void* ptr, int64_t row_stride, int64_t head_stride) {
    return make_tensor(make_gmem_ptr(static_cast<const Element*>(ptr)),
                       make_layout(make_shape(int32_t(p.total_rows), int32_t(kHeadDim), int32_t(p.heads)),
                                   make_stride(row_stride, _1{}, head_stride)));
  };
  const auto tile_q = Shape<Int<Traits::kBlockM>, Int<kHeadDim>>{};
  const auto tile_kv = Shape<Int<Traits::kBlockN>, Int<kHeadDim>>{};
  const auto smem_q = take<0, 2>(typename Traits::SmemLayoutQ{});
  BwdArgs<Traits> args{
      p,
      make_tma_copy(SM90_TMA_LOAD{}, gmem(p.q, p.q_row_stride, p.q_head_stride), smem_q, tile_q, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem(p.dout, p.do_row_stride, p.do_head_stride), smem_q, tile_q, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem(p.k, p.k_row_stride, p.k_head_stride), typename Traits::SmemLayoutK{},
                    tile_kv, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem(p.v, p.v_row_stride, p.v_head_stride), typename Traits::SmemLayoutV{},
                    tile_kv, _1{}),
      {},  // tma_drab: set below when drab is written
      {},  // tma_drab_store: likewise
      {},  // tma_dq: set below with kDqTma
      {},  // tma_rab: set below with kRabTma
  };
  if constexpr (Traits::kDqTma) {
    // dq_accum: contiguous fp32 [total, heads, dim] as (row, dim, head).
    auto g_dq = make_tensor(make_gmem_ptr(p.dq_accum),
                            make_layout(make_shape(int32_t(p.total_rows), int32_t(kHeadDim), int32_t(p.heads)),
                                        make_stride(int64_t(p.heads) * kHeadDim, _1{}, int64_t(kHeadDim))));
    args.tma_dq = make_tma_copy(SM90_TMA_REDUCE_ADD{}, g_dq, typename Traits::SmemLayoutDqTma{},
                                Shape<Int<Traits::kBlockM>, Int<Traits::kDqTmaCols>>{}, _1{});
  }
  if constexpr (Traits::kRabTma) {
    // [max_seq_len, max_seq_len] planes, one per (sequence, rab head), key-contiguous; rows and keys past
    // max_seq_len are zero-filled by TMA.
    if (reinterpret_cast<std::uintptr_t>(p.rab) % 16 != 0 || p.max_seq_len % 8 != 0) {
      return "the Hopper backward loads the bias through TMA: it needs a 16-byte aligned base and max_seq_len a "
             "multiple of 8 (hstu_bwd_runs_sm90 sends other calls to the SM80 kernel)";
    }
    const int64_t n = p.max_seq_len;
    auto g_rab = make_tensor(make_gmem_ptr(static_cast<const Element*>(p.rab)),
                             make_layout(make_shape(int32_t(n), int32_t(n), int32_t(p.batch) * p.rab_heads),
                                         make_stride(n, _1{}, n * n)));
    args.tma_rab = make_tma_copy(SM90_TMA_LOAD{}, g_rab, take<0, 2>(typename Traits::SmemLayoutRab{}),
                                 Shape<Int<Traits::kBlockM>, Int<Traits::kBlockN>>{}, _1{});
  }
  if (kRab && p.drab != nullptr) {
    // [batch * rab_heads] planes of [max_seq_len rows, drab_row_stride]; TMA clips the tiles at max_seq_len.
    const int64_t n = p.max_seq_len;
    auto g_drab = make_tensor(make_gmem_ptr(static_cast<Element*>(p.drab)),
                              make_layout(make_shape(int32_t(n), int32_t(n), int32_t(p.batch) * p.rab_heads),
                                          make_stride(p.drab_row_stride, _1{}, n * p.drab_row_stride)));
    args.tma_drab = make_tma_copy(SM90_TMA_REDUCE_ADD{}, g_drab, take<0, 2>(typename Traits::SmemLayoutP{}),
                                  Shape<Int<Traits::kBlockM>, Int<Traits::kBlockN>>{}, _1{});
    args.tma_drab_store = make_tma_copy(SM90_TMA_STORE{}, g_drab, take<0, 2>(typename Traits::SmemLayoutP{}),
                                        Shape<Int<Traits::kBlockM>, Int<Traits::kBlockN>>{}, _1{});
  }
  const dim3 grid((p.max_seq_len + Traits::kBlockN - 1) / Traits::kBlockN, p.heads, p.batch);
  return launch_kernel(hstu_bwd_sm90_kernel<Element_, Traits>, grid, Traits::kThreads, Traits::kSmemBytes, args,
                       stream);
}

// Checks the call, then launches the instantiation with or without a bias. Delta q is not supported here (the caller
// routes it to the SM80 kernel).
template <typename Element_, int kHeadDim>
const char* run_hstu_bwd_sm90(const HstuBwdParams& p, cudaStream_t stream) {
  if (p.q_offsets != nullptr) return "the Hopper backward has no delta q (q_offsets)";
  if (p.rab != nullptr && p.drab_accum != nullptr) {
    return "the Hopper backward writes drab as 16-bit tiles (drab), not into the fp32 drab_accum";
  }
  if (p.drab != nullptr && (reinterpret_cast<std::uintptr_t>(p.drab) % 16 != 0 || p.drab_row_stride % 8 != 0 ||
                            p.drab_row_stride < p.max_seq_len)) {
    return "the Hopper backward's drab needs a 16-byte aligned base and a row stride >= max_seq_len that is a "
           "multiple of 8 elements";
  }
  if (p.drab != nullptr && p.rab_heads != 1 && p.rab_heads != p.heads) {
    return "the Hopper backward's drab planes are one per sequence (rab_heads 1) or per head (rab_heads == heads)";
  }
  if (p.drab != nullptr && p.rab_heads == 1 && p.heads > 1 && p.drab_sync == nullptr) {
    return "the Hopper backward needs drab_sync (hstu_bwd_drab_sync_words zeroed words) when the heads share a drab "
           "plane";
  }
  if (p.batch == 0) return "";
  if (p.total_rows == 0) {  // no CTA runs, yet drab (not zeroed by the caller) must come back zero
    if (p.drab == nullptr) return "";
    const size_t bytes = size_t(p.batch) * p.rab_heads * p.max_seq_len * p.drab_row_stride * sizeof(Element_);
    return cudaMemsetAsync(p.drab, 0, bytes, stream) == cudaSuccess ? "" : "cudaMemsetAsync of drab failed";
  }
  return p.rab != nullptr ? launch_hstu_bwd_sm90<Element_, kHeadDim, true>(p, stream)
                          : launch_hstu_bwd_sm90<Element_, kHeadDim, false>(p, stream);
}

}  // namespace sm90
}  // namespace gr_kernels
