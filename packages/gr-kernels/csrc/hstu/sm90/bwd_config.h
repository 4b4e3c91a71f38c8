// Compile-time switches of the Hopper backward's plans, shared by its traits (kernel_traits_bwd.h) and the host
// dispatch (api.cu), which must know whether a bias kernel loads the bias through TMA.
#pragma once

// RS dK / dV on 128-key tiles (kernel_traits_bwd.h, BwdTile): S^T and dP^T with the keys as M, so P^T and dX^T stay
// in registers as the A operands of dV and dK. -D GR_HSTU_BWD_RS_DKV=0: the all-SS plan everywhere.
#ifndef GR_HSTU_BWD_RS_DKV
#define GR_HSTU_BWD_RS_DKV 1
#endif
// The bias kernel of head dim 64 on the RS plan too, the bias through TMA (rows of a multiple of 8 elements only; the
// host sends other calls to the SM80 kernel). -D GR_HSTU_BWD_RS_RAB=0: the SS plan with per-thread bias loads. (At
// head dim 128 the RS bias kernel measured no faster than the 64-key SS one: kernel_traits_bwd.h.)
#ifndef GR_HSTU_BWD_RS_RAB
#define GR_HSTU_BWD_RS_RAB 1
#endif

// -D GR_HSTU_BWD_HDIM128_RS_RAB=1: the bias kernel of head dim 128 on the RS plan as well (128-key tiles, the bias
// through TMA, kEarlyS and the one-body tile loop of the bias-free kernel). Measured no faster than the 64-key SS
// tiles before kEarlyS and the one-body loop existed (kernel_traits_bwd.h); off until measured with them.
#ifndef GR_HSTU_BWD_HDIM128_RS_RAB
#define GR_HSTU_BWD_HDIM128_RS_RAB 0
#endif

namespace gr_kernels {
namespace sm90 {

// Whether the Hopper backward with a bias at this head dim loads the bias through TMA (then its rows must be 16-byte
// aligned: base and max_seq_len * 2 bytes).
constexpr bool bwd_rab_via_tma(int head_dim) {
  return (head_dim == 64 || (head_dim == 128 && GR_HSTU_BWD_HDIM128_RS_RAB != 0)) && GR_HSTU_BWD_RS_DKV != 0 &&
         GR_HSTU_BWD_RS_RAB != 0;
}

}  // namespace sm90
}  // namespace gr_kernels
