// The mask of a causal sequence (with or without targets of group size 1), as a masked tile's per-element test of a
// few integer compares.
//
// A causal sequence without context rows or a window, whose targets (if any) form groups of one, shows key j to
// query i iff i < length, j <= i and (j < history or j == i): history rows see the keys at or before them, target rows
// (i >= history) the history and themselves. That covers the usual training case (no targets: history = length,
// where j <= i < length already implies j < history) and the delta-q scoring call of inference (candidates as
// targets). Its masked tiles (the diagonal ones, those holding target keys, and every tile of a query tile that runs
// past the sequence end) then skip the general mask (hstu/mask.h), whose branches per element dominated such tiles:
// thread element (r_base + dr, c_base + dc) of the tile whose first query position is m0 and first key n0 is visible
// iff causal_visible(dr, dc, t) with the per-tile thresholds t = causal_thresholds(mask, m0 + r_base, n0 + c_base).
// In the kernels' unrolled loops dr and dc are constants, so each test is a handful of integer compares.
// self_check.cu compares it with the mask for every consumer thread's elements.
#pragma once

#include <cuda_runtime.h>

#include "hstu/mask.h"
#include "hstu/params.h"

namespace gr_kernels {
namespace sm90 {

// m0: the tile's first query position (negative only for invalid delta q, whose rows see nothing: general mask).
__host__ __device__ __forceinline__ bool causal_fast(const HstuFwdParams& p, const SequenceMask& mask, int m0) {
  return p.causal && p.max_attn_len == 0 && mask.context == 0 && (!mask.has_targets() || mask.group_size == 1) &&
         m0 >= 0;
}

struct CausalThresholds {
  int diag;       // i - j at (dr, dc) = (0, 0)
  int rows_left;  // rows of the sequence at or after the thread's first row
  int hist_left;  // history keys at or after the thread's first key
};

// i0, j0: the query and key position of the thread's element (0, 0).
__host__ __device__ __forceinline__ CausalThresholds causal_thresholds(const SequenceMask& mask, int i0, int j0) {
  return CausalThresholds{i0 - j0, mask.length - i0, mask.history - j0};
}

__host__ __device__ __forceinline__ bool causal_visible(int dr, int dc, const CausalThresholds& t) {
  const int off = dc - dr;  // j - i + diag
  return dr < t.rows_left && (off == t.diag || (off < t.diag && dc < t.hist_left));
}

}  // namespace sm90
}  // namespace gr_kernels
