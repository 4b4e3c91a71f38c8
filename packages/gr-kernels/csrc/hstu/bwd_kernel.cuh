// HSTU attention backward. With x = Q K^T + rab, z = alpha x, P = SiLU(z) * mask / N and O = P V:
//   dV = P^T dO,   dP = dO V^T,   dX = dP * mask / N * SiLU'(z) * alpha,
//   dQ = dX K,     dK = dX^T Q,   drab = dX (summed over heads when rab is shared).
//
// One CTA owns kBlockN keys of one (sequence, head), 16 per warp, and walks the query tiles that can see them:
//   S^T = K Q^T and dP^T = V dO^T on tensor cores -> P^T, dX^T in registers (drab added to an fp32 buffer)
//   dV += P^T dO and dK += dX^T Q with the accumulator layout reused as the A operand (no shared-memory trip)
//   dX^T -> shared memory; dQ partial = dX K, added into an fp32 buffer (several key tiles contribute to a row)
// dK and dV are written once at the end in the input dtype.
// Delta q (p.q_offsets): the query tiles walk q's own rows (q, dout, dq jagged by q_offsets) and masks and bias rows
// use their positions (row + kv_len - q_len); every key still gets its dK/dV row (zero when no query sees it).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "hstu/kernel_traits.h"
#include "hstu/mask.h"
#include "hstu/params.h"
#include "hstu/utils.cuh"

namespace gr_kernels {

template <typename Traits, bool kDeltaQ>
__global__ void __launch_bounds__(Traits::kThreads) hstu_bwd_kernel(const HstuBwdParams p) {
  using Element = typename Traits::Element;
  using Mma = typename Traits::Mma;
  using LdsmN = cute::SM75_U32x4_LDSM_N;
  using LdsmT = cute::SM75_U16x8_LDSM_T;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kQTiles = kBlockM / 8;   // n8 tiles of S^T along the queries
  constexpr int kDTiles = kHeadDim / 8;  // n8 tiles of dK / dV along the head dim
  constexpr int kDx = Traits::kDxStride;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element* sK = reinterpret_cast<Element*>(smem_raw);
  Element* sV = sK + kBlockN * kHeadDim;
  Element* sQ = sV + kBlockN * kHeadDim;
  Element* sdO = sQ + kBlockM * kHeadDim;
  Element* sdXt = sdO + kBlockM * kHeadDim;  // [kBlockN keys][kDx] (queries, padded)

  const int n_block = blockIdx.x;
  const int head = blockIdx.y;
  const int b = blockIdx.z;
  const int seq_start = p.seq_offsets[b];
  const int length = p.seq_offsets[b + 1] - seq_start;
  const int n0 = n_block * kBlockN;
  if (n0 >= length) return;

  const SequenceMask mask = SequenceMask::of_sequence(p, b, length);
  const QueryRows rows = QueryRows::of_sequence<kDeltaQ>(p, b, seq_start, length);

  // Query tiles (in query rows; position = row + shift) that can see these keys: causal rows only look back,
  // except context rows (which come first).
  int m_start = 0, m_end = rows.length;
  if (p.causal && mask.context == 0) m_start = max(0, n0 - rows.shift) / kBlockM * kBlockM;
  if (p.max_attn_len > 0 && mask.context == 0 && !mask.has_targets()) {
    m_end = min(rows.length, n0 + kBlockN + p.max_attn_len - rows.shift);
    if (!p.causal) m_start = max(0, n0 - p.max_attn_len - rows.shift) / kBlockM * kBlockM;
  }

  const int64_t head_off_k = int64_t(head) * p.k_head_stride;
  const int64_t head_off_v = int64_t(head) * p.v_head_stride;
  detail::load_tile<Traits, kBlockN>(
      sK, static_cast<const Element*>(p.k) + int64_t(seq_start + n0) * p.k_row_stride + head_off_k, p.k_row_stride,
      length - n0);
  detail::load_tile<Traits, kBlockN>(
      sV, static_cast<const Element*>(p.v) + int64_t(seq_start + n0) * p.v_row_stride + head_off_v, p.v_row_stride,
      length - n0);
  cute::cp_async_fence();

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4;
  const int tq = lane % 4;
  const int ld_mat = lane / 8;
  const int ld_row = lane % 8;

  float dv_acc[kDTiles][4];
  float dk_acc[kDTiles][4];
#pragma unroll
  for (int t = 0; t < kDTiles; ++t) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dv_acc[t][e] = dk_acc[t][e] = 0.f;
  }

  const Element* rab = nullptr;
  float* drab = nullptr;
  if (p.rab != nullptr) {
    const int64_t plane = detail::rab_plane_offset(p, b, head);
    rab = static_cast<const Element*>(p.rab) + plane;
    if (p.drab_accum != nullptr) drab = p.drab_accum + plane;
  }
  const float dx_scale = p.alpha * p.inv_scaling_seqlen;

  for (int m0 = m_start; m0 < m_end; m0 += kBlockM) {
    detail::load_tile<Traits, kBlockM>(
        sQ, static_cast<const Element*>(p.q) + int64_t(rows.start + m0) * p.q_row_stride + int64_t(head) * p.q_head_stride,
        p.q_row_stride, rows.length - m0);
    detail::load_tile<Traits, kBlockM>(
        sdO,
        static_cast<const Element*>(p.dout) + int64_t(rows.start + m0) * p.do_row_stride +
            int64_t(head) * p.do_head_stride,
        p.do_row_stride, rows.length - m0);
    cute::cp_async_fence();
    cute::cp_async_wait<0>();
    __syncthreads();

    // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys x kBlockM queries.
    float st[kQTiles][4], dpt[kQTiles][4];
#pragma unroll
    for (int t = 0; t < kQTiles; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) st[t][e] = dpt[t][e] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < kHeadDim; kk += 16) {
      uint32_t ak[4], av[4];
      const int a_row = warp * 16 + ld_row + (ld_mat & 1) * 8;
      const int a_col = kk + (ld_mat >> 1) * 8;
      LdsmN::copy(*reinterpret_cast<const cute::uint128_t*>(sK + Traits::swizzle(a_row, a_col)), ak[0], ak[1], ak[2],
                  ak[3]);
      LdsmN::copy(*reinterpret_cast<const cute::uint128_t*>(sV + Traits::swizzle(a_row, a_col)), av[0], av[1], av[2],
                  av[3]);
#pragma unroll
      for (int jq = 0; jq < kQTiles / 2; ++jq) {
        uint32_t bq[4], bo[4];
        const int b_row = jq * 16 + ld_row + (ld_mat >> 1) * 8;
        const int b_col = kk + (ld_mat & 1) * 8;
        LdsmN::copy(*reinterpret_cast<const cute::uint128_t*>(sQ + Traits::swizzle(b_row, b_col)), bq[0], bq[1],
                    bq[2], bq[3]);
        LdsmN::copy(*reinterpret_cast<const cute::uint128_t*>(sdO + Traits::swizzle(b_row, b_col)), bo[0], bo[1],
                    bo[2], bo[3]);
        float* s0 = st[2 * jq];
        float* s1 = st[2 * jq + 1];
        float* d0 = dpt[2 * jq];
        float* d1 = dpt[2 * jq + 1];
        Mma::fma(s0[0], s0[1], s0[2], s0[3], ak[0], ak[1], ak[2], ak[3], bq[0], bq[1], s0[0], s0[1], s0[2], s0[3]);
        Mma::fma(s1[0], s1[1], s1[2], s1[3], ak[0], ak[1], ak[2], ak[3], bq[2], bq[3], s1[0], s1[1], s1[2], s1[3]);
        Mma::fma(d0[0], d0[1], d0[2], d0[3], av[0], av[1], av[2], av[3], bo[0], bo[1], d0[0], d0[1], d0[2], d0[3]);
        Mma::fma(d1[0], d1[1], d1[2], d1[3], av[0], av[1], av[2], av[3], bo[2], bo[3], d1[0], d1[1], d1[2], d1[3]);
      }
    }

    // P^T and dX^T per element; element (t, e) is key j = n0 + warp*16 + g (+8), query row m0 + t*8 + 2 tq (+1) at
    // position i = that row + shift.
    uint32_t pa[kQTiles / 2][4], xa[kQTiles / 2][4];
#pragma unroll
    for (int t = 0; t < kQTiles; ++t) {
      float pv[4], xv[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = n0 + warp * 16 + g + (e >> 1) * 8;
        const int i = rows.shift + m0 + t * 8 + tq * 2 + (e & 1);
        const bool valid = mask(i, j);
        float x = st[t][e];
        const int64_t rab_idx = int64_t(i) * p.max_seq_len + j;
        if (rab != nullptr && valid) x += detail::to_float(rab[rab_idx]);
        float f, df;
        detail::silu_and_grad<Element>(p.alpha * x, f, df);
        pv[e] = valid ? f * p.inv_scaling_seqlen : 0.f;
        xv[e] = valid ? dpt[t][e] * df * dx_scale : 0.f;
        if (drab != nullptr && valid) atomicAdd(drab + rab_idx, xv[e]);
      }
      pa[t / 2][(t & 1) * 2 + 0] = detail::pack2<Element>(pv[0], pv[1]);
      pa[t / 2][(t & 1) * 2 + 1] = detail::pack2<Element>(pv[2], pv[3]);
      xa[t / 2][(t & 1) * 2 + 0] = detail::pack2<Element>(xv[0], xv[1]);
      xa[t / 2][(t & 1) * 2 + 1] = detail::pack2<Element>(xv[2], xv[3]);
      *reinterpret_cast<uint32_t*>(sdXt + (warp * 16 + g) * kDx + t * 8 + tq * 2) = xa[t / 2][(t & 1) * 2 + 0];
      *reinterpret_cast<uint32_t*>(sdXt + (warp * 16 + g + 8) * kDx + t * 8 + tq * 2) = xa[t / 2][(t & 1) * 2 + 1];
    }

    // dV += P^T dO, dK += dX^T Q (contraction over the tile's queries; dO, Q read transposed).
#pragma unroll
    for (int kc = 0; kc < kQTiles / 2; ++kc) {
#pragma unroll
      for (int dj = 0; dj < kDTiles / 2; ++dj) {
        uint32_t bo[4], bq[4];
        const int r = kc * 16 + ld_row + (ld_mat & 1) * 8;
        const int c = dj * 16 + (ld_mat >> 1) * 8;
        LdsmT::copy(*reinterpret_cast<const cute::uint128_t*>(sdO + Traits::swizzle(r, c)), bo[0], bo[1], bo[2],
                    bo[3]);
        LdsmT::copy(*reinterpret_cast<const cute::uint128_t*>(sQ + Traits::swizzle(r, c)), bq[0], bq[1], bq[2],
                    bq[3]);
        float* v0 = dv_acc[2 * dj];
        float* v1 = dv_acc[2 * dj + 1];
        float* k0 = dk_acc[2 * dj];
        float* k1 = dk_acc[2 * dj + 1];
        const uint32_t* a = pa[kc];
        const uint32_t* x = xa[kc];
        Mma::fma(v0[0], v0[1], v0[2], v0[3], a[0], a[1], a[2], a[3], bo[0], bo[1], v0[0], v0[1], v0[2], v0[3]);
        Mma::fma(v1[0], v1[1], v1[2], v1[3], a[0], a[1], a[2], a[3], bo[2], bo[3], v1[0], v1[1], v1[2], v1[3]);
        Mma::fma(k0[0], k0[1], k0[2], k0[3], x[0], x[1], x[2], x[3], bq[0], bq[1], k0[0], k0[1], k0[2], k0[3]);
        Mma::fma(k1[0], k1[1], k1[2], k1[3], x[0], x[1], x[2], x[3], bq[2], bq[3], k1[0], k1[1], k1[2], k1[3]);
      }
    }
    __syncthreads();  // the whole dX^T tile is in shared memory

    // dQ partial = dX K for kBlockM queries: warp w takes rows (w % 2) * 16 and half of the head dim.
    {
      static_assert(kBlockM == 32 && Traits::kWarps == 4, "dQ split assumes 2 row groups x 2 column halves");
      constexpr int kHalfTiles = kDTiles / 2;
      const int qr0 = (warp & 1) * 16;
      const int dc0 = (warp >> 1) * (kHeadDim / 2);
      float dq[kHalfTiles][4];
#pragma unroll
      for (int t = 0; t < kHalfTiles; ++t) dq[t][0] = dq[t][1] = dq[t][2] = dq[t][3] = 0.f;
#pragma unroll
      for (int kj = 0; kj < kBlockN; kj += 16) {
        uint32_t a[4];
        const int a_row = kj + ld_row + (ld_mat >> 1) * 8;  // key (stored row)
        const int a_col = qr0 + (ld_mat & 1) * 8;           // query (stored column)
        LdsmT::copy(*reinterpret_cast<const cute::uint128_t*>(sdXt + a_row * kDx + a_col), a[0], a[1], a[2], a[3]);
#pragma unroll
        for (int dj = 0; dj < kHalfTiles / 2; ++dj) {
          uint32_t bk[4];
          const int r = kj + ld_row + (ld_mat & 1) * 8;
          const int c = dc0 + dj * 16 + (ld_mat >> 1) * 8;
          LdsmT::copy(*reinterpret_cast<const cute::uint128_t*>(sK + Traits::swizzle(r, c)), bk[0], bk[1], bk[2],
                      bk[3]);
          float* q0 = dq[2 * dj];
          float* q1 = dq[2 * dj + 1];
          Mma::fma(q0[0], q0[1], q0[2], q0[3], a[0], a[1], a[2], a[3], bk[0], bk[1], q0[0], q0[1], q0[2], q0[3]);
          Mma::fma(q1[0], q1[1], q1[2], q1[3], a[0], a[1], a[2], a[3], bk[2], bk[3], q1[0], q1[1], q1[2], q1[3]);
        }
      }
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int i = m0 + qr0 + g + half * 8;  // query row
        if (i >= rows.length) continue;
        float* dst = p.dq_accum + (int64_t(rows.start + i) * p.heads + head) * kHeadDim + dc0 + tq * 2;
#pragma unroll
        for (int t = 0; t < kHalfTiles; ++t) {
          atomicAdd(dst + t * 8, dq[t][half * 2]);
          atomicAdd(dst + t * 8 + 1, dq[t][half * 2 + 1]);
        }
      }
    }
    __syncthreads();  // the next query tile overwrites sQ, sdO and sdX^T
  }
  // Delta q can leave a key tile no query tile: retire its K/V copies before the CTA exits.
  if constexpr (kDeltaQ) cute::cp_async_wait<0>();

  // Epilogue: dK and dV rows of this CTA's keys, contiguous [total, heads, dim] in the input dtype.
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int j = n0 + warp * 16 + g + half * 8;
    if (j >= length) continue;
    const int64_t row = (int64_t(seq_start + j) * p.heads + head) * kHeadDim + tq * 2;
#pragma unroll
    for (int t = 0; t < kDTiles; ++t) {
      *reinterpret_cast<uint32_t*>(static_cast<Element*>(p.dk) + row + t * 8) =
          detail::pack2<Element>(dk_acc[t][half * 2], dk_acc[t][half * 2 + 1]);
      *reinterpret_cast<uint32_t*>(static_cast<Element*>(p.dv) + row + t * 8) =
          detail::pack2<Element>(dv_acc[t][half * 2], dv_acc[t][half * 2 + 1]);
    }
  }
}

template <typename Element, int kHeadDim>
const char* run_hstu_bwd(const HstuBwdParams& p, cudaStream_t stream) {
  using Traits = HstuBwdTraits<Element, kHeadDim>;
  const dim3 grid((p.max_seq_len + Traits::kBlockN - 1) / Traits::kBlockN, p.heads, p.batch);
  if (p.q_offsets != nullptr) {
    return launch_kernel(hstu_bwd_kernel<Traits, true>, grid, Traits::kThreads, Traits::kSmemBytes, p, stream);
  }
  return launch_kernel(hstu_bwd_kernel<Traits, false>, grid, Traits::kThreads, Traits::kSmemBytes, p, stream);
}

}  // namespace gr_kernels
