// Hopper (sm90a) HSTU attention forward: O = (SiLU(alpha (Q K^T + rab)) * mask) V / N on jagged sequences.
//
// Warp-specialised: warpgroup 0 loads (TMA into an mbarrier pipeline), warpgroups 1-2 compute (WGMMA) and store.
// Pieces: kernel_traits.h (tiles, layouts, types), mainloop_fwd.cuh (loads, GEMMs, SiLU, masks, rab),
// epilogue_fwd.cuh (1/N, output rows). The mask logic is the SM80 kernel's (hstu/mask.h).
// Split KV (kSplit, p.num_splits > 1; hstu/fwd_split.cuh): blockIdx.x also names a split; the CTA walks its split's
// contiguous share of the key tiles the unsplit CTA would visit and stores fp32 partials, which a reduce kernel sums.
// kSplit = false compiles to the unsplit kernel as it was.
// Tile order (tile_order.h): unsplit launches are a 1-D grid whose CTAs take the highest query tiles of a section
// of (sequence, head) pairs first (longest-first under a causal mask, K/V of a section inside L2).
// Bias (kRab, hstu/sm90/kernel_traits.h): none, per-thread global loads, or TMA tiles in shared memory next to each
// K stage; the host picks TMA when the bias rows are 16-byte aligned (rab_tma_possible) and the loads otherwise.
// Delta q (p.q_offsets): the CTA's rows are query rows of q's own jagged layout (TMA loads them from q's rows, the
// epilogue stores out's); key tiles, mask-free tiles, masks and bias rows use their positions (row + kv_len - q_len).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include <cute/tensor.hpp>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "hstu/fwd_split.cuh"
#include "hstu/mask.h"
#include "hstu/params.h"
#include "hstu/sm90/epilogue_fwd.cuh"
#include "hstu/sm90/kernel_traits.h"
#include "hstu/sm90/mainloop_fwd.cuh"
#include "hstu/utils.cuh"

namespace gr_kernels {
namespace sm90 {

template <typename Element_, typename Traits, RabSource kRab, bool kDeltaQ, bool kSplit>
__global__ void __launch_bounds__(Traits::kThreads, 1) hstu_fwd_sm90_kernel(const __grid_constant__ FwdArgs<Traits> args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Mainloop = FwdMainloop<Element_, Traits>;
  using Epilogue = FwdEpilogue<Element_, Traits>;
  using Pipeline = typename Traits::Pipeline;
  using PipelineState = typename Traits::PipelineState;
  using Element = typename Traits::Element;
  const HstuFwdParams& p = args.p;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  auto& ss = *reinterpret_cast<typename Traits::SharedStorage*>(smem_raw);
  // Bias stages (kSmem launches only: they allocate kSmemBytesRab).
  Element* smem_rab = reinterpret_cast<Element*>(smem_raw + Traits::kSmemRabOffset);

  // Highest query tiles first: under a causal mask they carry the most key tiles, so they should not be the tail.
  // Unsplit: a 1-D grid; args.order says which (query tile, sequence, head) each CTA takes (tile_order.h: highest
  // query tiles of a section of L2-sized (sequence, head) pairs first). With splits (small grids): blockIdx.x =
  // query tile (highest first) * num_splits + split, blockIdx.y = head, blockIdx.z = sequence.
  int m_block, head, b, split = 0;
  if constexpr (kSplit) {
    m_block = int(gridDim.x) / p.num_splits - 1 - int(blockIdx.x) / p.num_splits;
    split = int(blockIdx.x) % p.num_splits;
    head = blockIdx.y;
    b = blockIdx.z;
  } else {
    args.order.tile(int(blockIdx.x), m_block, b, head);
  }
  const int seq_start = p.seq_offsets[b];
  const int length = p.seq_offsets[b + 1] - seq_start;
  const QueryRows rows = QueryRows::of_sequence<kDeltaQ>(p, b, seq_start, length);
  const int m0 = m_block * Traits::kBlockM;  // first query row of this CTA
  if (m0 >= rows.length) return;  // the whole CTA leaves before any barrier exists
  const int pos0 = rows.shift + m0;  // its position in the sequence

  const SequenceMask mask = SequenceMask::of_sequence(p, b, length);
  int lo, hi;
  Mainloop::key_blocks(p, mask, pos0, lo, hi);
  if constexpr (kSplit) {
    // This split's contiguous share; an empty one still runs (Q load, no key tile) and stores zeros.
    int lo_s, hi_s;
    split_key_blocks(lo, hi, p.num_splits, split, lo_s, hi_s);
    lo = lo_s;
    hi = hi_s;
  }

  const int warp_group = __shfl_sync(0xffffffff, int(threadIdx.x) / 128, 0);
  if (threadIdx.x == 0) {
    ss.barrier_q.init(1);
  }
  typename Pipeline::Params pipe_params;
  pipe_params.transaction_bytes = Traits::kTmaBytesKV;
  pipe_params.role = warp_group == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pipe_params.is_leader = threadIdx.x == 0;
  pipe_params.num_consumers = Traits::kConsumerThreads;
  typename Pipeline::Params pipe_params_k = pipe_params;
  if constexpr (kRab == RabSource::kSmem) pipe_params_k.transaction_bytes += Traits::kTmaBytesRab;  // bias rides along
  Pipeline pipeline_k(ss.pipeline_k, pipe_params_k, cute::Shape<cute::_1, cute::_1, cute::_1>{});
  Pipeline pipeline_v(ss.pipeline_v, pipe_params, cute::Shape<cute::_1, cute::_1, cute::_1>{});
  __syncthreads();  // barriers initialised and visible to every warpgroup

  if (warp_group == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    if (threadIdx.x == 0) {
      cute::prefetch_tma_descriptor(args.tma_q.get_tma_descriptor());
      cute::prefetch_tma_descriptor(args.tma_k.get_tma_descriptor());
      cute::prefetch_tma_descriptor(args.tma_v.get_tma_descriptor());
      if constexpr (kRab == RabSource::kSmem) cute::prefetch_tma_descriptor(args.tma_rab.get_tma_descriptor());
      PipelineState state = cutlass::make_producer_start_state<Pipeline>();
      Mainloop::template load<kRab>(args, ss, smem_rab, pipeline_k, pipeline_v, state, seq_start, rows.start,
                                    kDeltaQ ? p.total_q_rows : p.total_rows, head, m_block, lo, hi, pos0,
                                    detail::rab_plane(p, b, head));
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
    const int tidx = int(threadIdx.x) - 128;
    typename Traits::MmaPV mma_pv;
    auto tOrO = cute::partition_fragment_C(mma_pv, cute::Shape<cute::Int<Traits::kBlockM>, cute::Int<Traits::kHeadDim>>{});
    cute::clear(tOrO);
    PipelineState state_k, state_v;  // consumers start at stage 0, phase 0
    const Element_* rab = p.rab == nullptr
                              ? nullptr
                              : static_cast<const Element_*>(p.rab) + detail::rab_plane_offset(p, b, head);
    Mainloop::template mma<kRab, kDeltaQ>(p, ss, pipeline_k, pipeline_v, state_k, state_v, tOrO, tidx, mask, pos0, lo,
                                          hi, rab, smem_rab, args.causal_fast);
    if constexpr (kSplit) {
      Epilogue::store_partial(p, tOrO, tidx, split, rows.start, head, m0, rows.length);
    } else {
      Epilogue::store(p, ss, tOrO, tidx, rows.start, head, m0, rows.length);
    }
  }
#else
  __trap();  // built without sm90a device code: the host dispatch never launches this
#endif
}

// Host side: the bias can go through TMA when its rows (max_seq_len elements) and its base are 16-byte aligned.
// GR_KERNELS_FWD_RAB_TMA=0 keeps the per-thread loads anyway (A/B benchmarks, tests of the fallback).
inline bool rab_tma_possible(const HstuFwdParams& p) {
  if (p.rab == nullptr || reinterpret_cast<std::uintptr_t>(p.rab) % 16 != 0 || p.max_seq_len % 8 != 0) return false;
  const char* v = std::getenv("GR_KERNELS_FWD_RAB_TMA");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

template <typename Element_, typename Traits, bool kSplit>
auto select_fwd_kernel(RabSource rab, bool delta_q) {
  switch (rab) {
    case RabSource::kSmem:
      return delta_q ? hstu_fwd_sm90_kernel<Element_, Traits, RabSource::kSmem, true, kSplit>
                     : hstu_fwd_sm90_kernel<Element_, Traits, RabSource::kSmem, false, kSplit>;
    case RabSource::kGlobal:
      return delta_q ? hstu_fwd_sm90_kernel<Element_, Traits, RabSource::kGlobal, true, kSplit>
                     : hstu_fwd_sm90_kernel<Element_, Traits, RabSource::kGlobal, false, kSplit>;
    default:
      return delta_q ? hstu_fwd_sm90_kernel<Element_, Traits, RabSource::kNone, true, kSplit>
                     : hstu_fwd_sm90_kernel<Element_, Traits, RabSource::kNone, false, kSplit>;
  }
}

// Host side: builds the TMA descriptors and launches one (dtype, head dim) instantiation.
template <typename Element_, int kHeadDim>
const char* run_hstu_fwd_sm90(const HstuFwdParams& p, cudaStream_t stream) {
  using namespace cute;
  using Traits = FwdTraits<Element_, kHeadDim>;
  using Element = typename Traits::Element;
  if (p.batch == 0 || p.total_rows == 0 || p.total_q_rows == 0) return "";
  auto gmem = [&](const void* ptr, int64_t rows, int64_t row_stride, int64_t head_stride) {
    return make_tensor(make_gmem_ptr(static_cast<const Element*>(ptr)),
                       make_layout(make_shape(int32_t(rows), int32_t(kHeadDim), int32_t(p.heads)),
                                   make_stride(row_stride, _1{}, head_stride)));
  };
  const auto tile_q = Shape<Int<Traits::kBlockM>, Int<kHeadDim>>{};
  const auto tile_kv = Shape<Int<Traits::kBlockN>, Int<kHeadDim>>{};
  FwdArgs<Traits> args{
      p,
      make_tma_copy(SM90_TMA_LOAD{}, gmem(p.q, p.total_q_rows, p.q_row_stride, p.q_head_stride), typename Traits::SmemLayoutQ{},
                    tile_q, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem(p.k, p.total_rows, p.k_row_stride, p.k_head_stride),
                    take<0, 2>(typename Traits::SmemLayoutK{}), tile_kv, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem(p.v, p.total_rows, p.v_row_stride, p.v_head_stride),
                    take<0, 2>(typename Traits::SmemLayoutV{}), tile_kv, _1{}),
      {},    // tma_rab: set below for TMA bias launches
      {},    // order: set below for unsplit launches
      true,  // causal_fast: set below from GR_KERNELS_FWD_CAUSAL_FAST
  };
  const RabSource rab = p.rab == nullptr       ? RabSource::kNone
                        : rab_tma_possible(p) ? RabSource::kSmem
                                              : RabSource::kGlobal;
  int smem = Traits::kSmemBytes;
  if (rab == RabSource::kSmem) {
    // [max_seq_len, max_seq_len] planes, one per (sequence, rab head), key-contiguous.
    const int64_t n = p.max_seq_len;
    auto g_rab = make_tensor(make_gmem_ptr(static_cast<const Element*>(p.rab)),
                             make_layout(make_shape(int32_t(n), int32_t(n), int32_t(p.batch) * p.rab_heads),
                                         make_stride(n, _1{}, n * n)));
    args.tma_rab = make_tma_copy(SM90_TMA_LOAD{}, g_rab, take<0, 2>(typename Traits::SmemLayoutRab{}),
                                 Shape<Int<Traits::kBlockM>, Int<Traits::kBlockN>>{}, _1{});
    smem = Traits::kSmemBytesRab;
  }
  const int m_blocks = (query_grid_rows(p) + Traits::kBlockM - 1) / Traits::kBlockM;
  // Twelve variants: bias source (none, global loads, TMA), full attention/delta q (the full-attention code stays
  // as before delta q), unsplit/split KV (the reduce that follows a split launch is the caller's, hstu_fwd in
  // api.cu).
  const bool delta_q = p.q_offsets != nullptr;
  // GR_KERNELS_FWD_CAUSAL_FAST=0 (read per call) sends causal_fast sequences' masked tiles through the general mask
  // (A/B benchmarks, bisecting).
  const char* fast = std::getenv("GR_KERNELS_FWD_CAUSAL_FAST");
  args.causal_fast = fast == nullptr || std::strcmp(fast, "0") != 0;
  if (p.num_splits > 1) {
    const dim3 grid(m_blocks * p.num_splits, p.heads, p.batch);
    return launch_kernel(select_fwd_kernel<Element_, Traits, true>(rab, delta_q), grid, Traits::kThreads, smem, args,
                         stream);
  }
  const int64_t ctas = int64_t(m_blocks) * p.batch * p.heads;
  if (ctas > int64_t(0x7fffffff)) return "forward grid too large: query tiles * heads * batch exceeds 2^31 - 1";
  const int pairs = p.batch * p.heads;
  args.order.m_blocks = m_blocks;
  args.order.heads = p.heads;
  args.order.pairs = pairs;
  args.order.section = fwd_section_pairs(pairs, p.max_seq_len, kHeadDim, int(sizeof(Element)));
  const dim3 grid(unsigned(m_blocks) * unsigned(pairs));
  return launch_kernel(select_fwd_kernel<Element_, Traits, false>(rab, delta_q), grid, Traits::kThreads, smem, args,
                       stream);
}

}  // namespace sm90
}  // namespace gr_kernels
