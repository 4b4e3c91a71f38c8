// The mask of a plain causal sequence, as a masked tile's per-element test that costs two compares.
//
// A sequence without targets, context rows or a window under a causal mask (the usual training case) shows key j to
// query i iff j <= i < length (j >= 0 always; then also j < length). Its masked tiles (the diagonal ones, and every
// tile of a query tile that runs past the sequence end) can then skip the general mask (hstu/mask.h), whose
// branches per element dominated such tiles: thread element (r_base + dr, c_base + dc) of the tile whose first query
// position is m0 and first key n0 is visible iff causal_visible(dr, dc, diag, rows_left) with the per-tile
// thresholds diag = (m0 + r_base) - (n0 + c_base) and rows_left = length - (m0 + r_base). In the kernels' unrolled
// loops dr and dc are constants, so each test is two integer compares. self_check.cu compares it with the mask for
// every consumer thread's elements.
#pragma once

#include <cuda_runtime.h>

#include "hstu/mask.h"
#include "hstu/params.h"

namespace gr_kernels {
namespace sm90 {

// m0: the tile's first query position (negative only for invalid delta q, whose rows see nothing: general mask).
__host__ __device__ __forceinline__ bool plain_causal(const HstuFwdParams& p, const SequenceMask& mask, int m0) {
  return p.causal && p.max_attn_len == 0 && mask.context == 0 && !mask.has_targets() && m0 >= 0;
}

__host__ __device__ __forceinline__ bool causal_visible(int dr, int dc, int diag, int rows_left) {
  return dr < rows_left && dc - dr <= diag;
}

}  // namespace sm90
}  // namespace gr_kernels
