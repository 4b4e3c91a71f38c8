// Compile-time switches of the Hopper backward's plans, shared by its traits (kernel_traits_bwd.h) and the host
// dispatch (api.cu), which must know whether a bias kernel loads the bias through TMA and how many drab_sync words
// the kernel reads.
#pragma once

// RS dK / dV on 128-key tiles (kernel_traits_bwd.h, BwdTile): S^T and dP^T with the keys as M, so P^T and dX^T stay
// in registers as the A operands of dV and dK. -D GR_HSTU_BWD_RS_DKV=0: the all-SS plan everywhere.
#ifndef GR_HSTU_BWD_RS_DKV
#define GR_HSTU_BWD_RS_DKV 1
#endif
// The bias kernels of head dims 64 and 128 on the RS plan too, the bias through TMA (rows of a multiple of 8 elements
// only; the host sends other calls to the SM80 kernel). -D GR_HSTU_BWD_RS_RAB=0: the SS plan with per-thread bias loads
// at both.
#ifndef GR_HSTU_BWD_RS_RAB
#define GR_HSTU_BWD_RS_RAB 1
#endif
// Head dim 128 alone: 128-key tiles, the bias through TMA, kEarlyS and the one-body tile loop of the bias-free kernel.
// H200 A/B, B=32, T=4096, causal, two alternating runs: 244 / 244 -> 359 / 359 TFLOP/s uniform, 221 / 222 -> 306 / 305
// jagged against the 64-key SS tiles (-D GR_HSTU_BWD_HDIM128_RS_RAB=0 builds those; before kEarlyS and the one-body
// loop existed this plan measured no faster than them: 250 against 248 uniform, 213 against 223 jagged).
#ifndef GR_HSTU_BWD_HDIM128_RS_RAB
#define GR_HSTU_BWD_HDIM128_RS_RAB 1
#endif

#include <cstdint>

namespace gr_kernels {
namespace sm90 {

// drab_sync (hstu_bwd_drab_sync_words in api.cu, read by bwd_kernel.cuh): per sequence, one owner counter per 64
// keys, then per sequence and 64 keys one flag per 64 query rows. Blocks of 64: the query tiles' rows and a divisor
// of every key tile (static_assert in bwd_kernel.cuh).
__host__ __device__ __forceinline__ int64_t drab_sync_blocks(int max_seq_len) {
  return (int64_t(max_seq_len) + 63) / 64;
}

// Whether the Hopper backward with a bias at this head dim loads the bias through TMA (then its rows must be 16-byte
// aligned: base and max_seq_len * 2 bytes).
constexpr bool bwd_rab_via_tma(int head_dim) {
  return (head_dim == 64 || (head_dim == 128 && GR_HSTU_BWD_HDIM128_RS_RAB != 0)) && GR_HSTU_BWD_RS_DKV != 0 &&
         GR_HSTU_BWD_RS_RAB != 0;
}

}  // namespace sm90
}  // namespace gr_kernels
