// HSTU attention forward: O = (SiLU(alpha (Q K^T + rab)) * mask) V / N on jagged sequences.
//
// Structure (per CTA = BLOCK_M query rows of one sequence and head):
//   prologue  : Q tile -> shared memory (cp.async, zero-filled past the sequence end)
//   mainloop  : for each key tile: K, V -> shared; S = Q K^T (tensor cores); P = SiLU(alpha (S + rab)) * mask / N in
//               registers; O += P V with P fed straight from the S accumulators (their layout is the A operand's)
//   epilogue  : O (fp32 registers) -> bf16/fp16 rows of the jagged output
// Delta q (p.q_offsets): the CTA's rows are query rows of q's own jagged layout; masks, bias rows and key ranges use
// their positions (row + kv_len - q_len). Without q_offsets the shift is 0 and the rows are the sequence's own.
// Unlike softmax attention there is no running max or rescaling: each key tile's contribution is final.
// Split KV (kSplit, p.num_splits > 1; hstu/fwd_split.cuh): blockIdx.x also names a split; the CTA walks its split's
// contiguous share of the key tiles the unsplit CTA would visit and stores fp32 partials, which a reduce kernel sums.
// kSplit = false compiles to the unsplit kernel as it was.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "hstu/fwd_split.cuh"
#include "hstu/kernel_traits.h"
#include "hstu/mask.h"
#include "hstu/utils.cuh"
#include "hstu/params.h"

namespace gr_kernels {

template <typename Traits, bool kDeltaQ, bool kSplit>
__global__ void __launch_bounds__(Traits::kThreads) hstu_fwd_kernel(const HstuFwdParams p) {
  using Element = typename Traits::Element;
  using Mma = typename Traits::Mma;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kNTiles = kBlockN / 8;    // n8 tiles of S per warp
  constexpr int kDTiles = kHeadDim / 8;   // n8 tiles of O per warp

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element* sQ = reinterpret_cast<Element*>(smem_raw);
  Element* sK = sQ + Traits::kTileQElems;
  Element* sV = sK + Traits::kTileKVElems;

  const int m_block = kSplit ? int(blockIdx.x) / p.num_splits : int(blockIdx.x);  // x = tile * num_splits + split
  const int head = blockIdx.y;
  const int b = blockIdx.z;
  const int seq_start = p.seq_offsets[b];
  const int length = p.seq_offsets[b + 1] - seq_start;
  const QueryRows rows = QueryRows::of_sequence<kDeltaQ>(p, b, seq_start, length);
  const int m0 = m_block * kBlockM;  // first query row of this CTA
  if (m0 >= rows.length) return;
  const int pos0 = rows.shift + m0;  // its position in the sequence

  const SequenceMask mask = SequenceMask::of_sequence(p, b, length);

  // Key tiles that can hold a visible key: causal rows (targets included) see j <= i, except context rows.
  int n_end = length;
  if (p.causal && pos0 >= mask.context) n_end = min(length, pos0 + kBlockM);
  int n_start = 0;
  if (p.max_attn_len > 0 && mask.context == 0 && !mask.has_targets()) n_start = max(0, pos0 - p.max_attn_len) / kBlockN * kBlockN;
  if constexpr (kSplit) {
    // This split's contiguous share of the key tiles [n_start / kBlockN, ceil(n_end / kBlockN)); an empty share
    // leaves n_end <= n_start (no key tile) and stores zeros.
    int lo_s, hi_s;
    split_key_blocks(n_start / kBlockN, (n_end + kBlockN - 1) / kBlockN, p.num_splits,
                     int(blockIdx.x) % p.num_splits, lo_s, hi_s);
    n_start = lo_s * kBlockN;
    n_end = min(n_end, hi_s * kBlockN);
  }

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;  // accumulator row inside the 8-row half
  const int tq = lane % 4; // accumulator column pair

  const Element* q = static_cast<const Element*>(p.q) + int64_t(rows.start + m0) * p.q_row_stride +
                     int64_t(head) * p.q_head_stride;
  detail::load_tile<Traits, kBlockM>(sQ, q, p.q_row_stride, rows.length - m0);
  cute::cp_async_fence();

  float o_acc[kDTiles][4];
#pragma unroll
  for (int t = 0; t < kDTiles; ++t) o_acc[t][0] = o_acc[t][1] = o_acc[t][2] = o_acc[t][3] = 0.f;

  const Element* rab = nullptr;
  if (p.rab != nullptr) {
    rab = static_cast<const Element*>(p.rab) + detail::rab_plane_offset(p, b, head);
  }

  // ldmatrix lane roles (see kernel_traits.h): which row / 8-column chunk this lane addresses.
  const int ld_mat = lane / 8;
  const int ld_row = lane % 8;

  // Software pipeline with one K and one V buffer: the next K tile streams in while this tile's P V runs, the next
  // V tile while the next S = Q K^T runs (cp.async groups: Q+K0, V0, then K_next, V_next alternately).
  const Element* k_base = static_cast<const Element*>(p.k) + int64_t(seq_start) * p.k_row_stride +
                          int64_t(head) * p.k_head_stride;
  const Element* v_base = static_cast<const Element*>(p.v) + int64_t(seq_start) * p.v_row_stride +
                          int64_t(head) * p.v_head_stride;
  if (n_start < n_end) {
    detail::load_tile<Traits, kBlockN>(sK, k_base + int64_t(n_start) * p.k_row_stride, p.k_row_stride,
                                       length - n_start);
  }
  cute::cp_async_fence();
  if (n_start < n_end) {
    detail::load_tile<Traits, kBlockN>(sV, v_base + int64_t(n_start) * p.v_row_stride, p.v_row_stride,
                                       length - n_start);
  }
  cute::cp_async_fence();

  // Tiles whose every (i, j) is visible need no per-element mask: all rows and columns in the history, no window,
  // and (causal) every key at or before every query.
  // (pos0 < 0 only for invalid delta-q input, q_len > kv_len: those rows see nothing.)
  const bool rows_plain = pos0 >= 0 && pos0 + kBlockM <= mask.history && p.max_attn_len == 0;

  for (int n0 = n_start; n0 < n_end; n0 += kBlockN) {
    const bool has_next = n0 + kBlockN < n_end;
    const bool full_tile = rows_plain && n0 + kBlockN <= mask.history && (!p.causal || n0 + kBlockN - 1 <= pos0);
    cute::cp_async_wait<1>();  // Q and this K have landed (this V may still be in flight)
    __syncthreads();

    // S = Q K^T for this warp's 16 rows x kBlockN keys.
    float s[kNTiles][4];
#pragma unroll
    for (int t = 0; t < kNTiles; ++t) s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kHeadDim; kk += 16) {
      uint32_t a[4];
      const int a_row = warp * 16 + ld_row + (ld_mat & 1) * 8;
      const int a_col = kk + (ld_mat >> 1) * 8;
      cute::SM75_U32x4_LDSM_N::copy(*reinterpret_cast<const cute::uint128_t*>(sQ + Traits::swizzle(a_row, a_col)),
                                    a[0], a[1], a[2], a[3]);
#pragma unroll
      for (int j = 0; j < kNTiles / 2; ++j) {
        uint32_t bk[4];
        const int b_row = j * 16 + ld_row + (ld_mat >> 1) * 8;
        const int b_col = kk + (ld_mat & 1) * 8;
        cute::SM75_U32x4_LDSM_N::copy(*reinterpret_cast<const cute::uint128_t*>(sK + Traits::swizzle(b_row, b_col)),
                                      bk[0], bk[1], bk[2], bk[3]);
        Mma::fma(s[2 * j][0], s[2 * j][1], s[2 * j][2], s[2 * j][3], a[0], a[1], a[2], a[3], bk[0], bk[1],
                 s[2 * j][0], s[2 * j][1], s[2 * j][2], s[2 * j][3]);
        Mma::fma(s[2 * j + 1][0], s[2 * j + 1][1], s[2 * j + 1][2], s[2 * j + 1][3], a[0], a[1], a[2], a[3], bk[2],
                 bk[3], s[2 * j + 1][0], s[2 * j + 1][1], s[2 * j + 1][2], s[2 * j + 1][3]);
      }
    }

    __syncthreads();  // every warp is done with sK
    if (has_next) {
      detail::load_tile<Traits, kBlockN>(sK, k_base + int64_t(n0 + kBlockN) * p.k_row_stride, p.k_row_stride,
                                         length - n0 - kBlockN);
    }
    cute::cp_async_fence();

    // P = SiLU(alpha (S + rab)) * mask / N, packed as the A operand of P V.
    uint32_t pa[kNTiles / 2][4];
#pragma unroll
    for (int t = 0; t < kNTiles; ++t) {
      float pv[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = pos0 + warp * 16 + g + (e >> 1) * 8;
        const int j = n0 + t * 8 + tq * 2 + (e & 1);
        float x = s[t][e];
        const bool valid = full_tile || mask(i, j);
        if (rab != nullptr && valid) x += detail::to_float(rab[int64_t(i) * p.max_seq_len + j]);
        const float z = p.alpha * x;
        pv[e] = valid ? z * detail::sigmoid<Element>(z) * p.inv_scaling_seqlen : 0.f;
      }
      pa[t / 2][(t & 1) * 2 + 0] = detail::pack2<Element>(pv[0], pv[1]);
      pa[t / 2][(t & 1) * 2 + 1] = detail::pack2<Element>(pv[2], pv[3]);
    }

    cute::cp_async_wait<1>();  // this V has landed (the next K may still be in flight)
    __syncthreads();

    // O += P V: V tile read transposed (ldmatrix.trans) as the col-major B operand.
#pragma unroll
    for (int kc = 0; kc < kNTiles / 2; ++kc) {
#pragma unroll
      for (int dj = 0; dj < kDTiles / 2; ++dj) {
        uint32_t bv[4];
        const int v_row = kc * 16 + ld_row + (ld_mat & 1) * 8;
        const int v_col = dj * 16 + (ld_mat >> 1) * 8;
        cute::SM75_U16x8_LDSM_T::copy(*reinterpret_cast<const cute::uint128_t*>(sV + Traits::swizzle(v_row, v_col)),
                                      bv[0], bv[1], bv[2], bv[3]);
        float* o0 = o_acc[2 * dj];
        float* o1 = o_acc[2 * dj + 1];
        Mma::fma(o0[0], o0[1], o0[2], o0[3], pa[kc][0], pa[kc][1], pa[kc][2], pa[kc][3], bv[0], bv[1], o0[0], o0[1],
                 o0[2], o0[3]);
        Mma::fma(o1[0], o1[1], o1[2], o1[3], pa[kc][0], pa[kc][1], pa[kc][2], pa[kc][3], bv[2], bv[3], o1[0], o1[1],
                 o1[2], o1[3]);
      }
    }
    __syncthreads();  // every warp is done with sV
    if (has_next) {
      detail::load_tile<Traits, kBlockN>(sV, v_base + int64_t(n0 + kBlockN) * p.v_row_stride, p.v_row_stride,
                                         length - n0 - kBlockN);
    }
    cute::cp_async_fence();
  }

  // Invalid delta-q input (q_len > kv_len) can leave a CTA no key tile: retire its Q copy before the CTA exits.
  // (An empty split share does the same.)
  if constexpr (kDeltaQ || kSplit) cute::cp_async_wait<0>();

  if constexpr (kSplit) {
    // fp32 partials (P already carries 1/N) into plane `split` of the workspace, q's rows only.
    float* accum = p.split_accum + split_accum_offset(p, int(blockIdx.x) % p.num_splits, rows.start, head);
    const int64_t row_stride = int64_t(p.heads) * kHeadDim;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int i = m0 + warp * 16 + g + half * 8;
      if (i >= rows.length) continue;
#pragma unroll
      for (int t = 0; t < kDTiles; ++t) {
        *reinterpret_cast<float2*>(accum + int64_t(i) * row_stride + t * 8 + tq * 2) =
            make_float2(o_acc[t][half * 2], o_acc[t][half * 2 + 1]);
      }
    }
    return;
  }

  // Epilogue: rows past the sequence's queries belong to no output row.
  Element* out = static_cast<Element*>(p.out) + int64_t(rows.start) * p.o_row_stride + int64_t(head) * p.o_head_stride;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int i = m0 + warp * 16 + g + half * 8;
    if (i >= rows.length) continue;
#pragma unroll
    for (int t = 0; t < kDTiles; ++t) {
      *reinterpret_cast<uint32_t*>(out + int64_t(i) * p.o_row_stride + t * 8 + tq * 2) =
          detail::pack2<Element>(o_acc[t][half * 2], o_acc[t][half * 2 + 1]);
    }
  }
}

// Host side: launches hstu_fwd_kernel for one (dtype, head dim) instantiation.
template <typename Element, int kHeadDim>
const char* run_hstu_fwd(const HstuFwdParams& p, cudaStream_t stream) {
  using Traits = HstuFwdTraits<Element, kHeadDim, 64, 64>;
  const int m_blocks = (query_grid_rows(p) + Traits::kBlockM - 1) / Traits::kBlockM;
  // Split KV: the reduce that follows is the caller's (hstu_fwd in api.cu).
  if (p.num_splits > 1) {
    const dim3 grid(m_blocks * p.num_splits, p.heads, p.batch);
    auto kernel = p.q_offsets != nullptr ? hstu_fwd_kernel<Traits, true, true> : hstu_fwd_kernel<Traits, false, true>;
    return launch_kernel(kernel, grid, Traits::kThreads, Traits::kSmemBytes, p, stream);
  }
  const dim3 grid(m_blocks, p.heads, p.batch);
  if (p.q_offsets != nullptr) {
    return launch_kernel(hstu_fwd_kernel<Traits, true, false>, grid, Traits::kThreads, Traits::kSmemBytes, p, stream);
  }
  return launch_kernel(hstu_fwd_kernel<Traits, false, false>, grid, Traits::kThreads, Traits::kSmemBytes, p, stream);
}

}  // namespace gr_kernels
