// The mask of a causal sequence as a masked tile's per-element test of a few integer compares.
//
// A causal sequence without context rows or a window shows key j to query i iff i < length, j <= i and, when it
// has targets in groups of one, (j < history or j == i): history rows see the keys at or before them, target rows
// (i >= history) the history and themselves. Its masked tiles (the diagonal ones, those holding target keys, and
// every tile of a query tile that runs past the sequence end) then skip the general mask (hstu/mask.h), whose
// branches per element dominated such tiles: thread element (r_base + dr, c_base + dc) of the tile whose first query
// position is m0 and first key n0 is visible iff causal_visible<kTargets>(dr, dc, t) with the per-tile thresholds
// t = causal_thresholds(mask, m0 + r_base, n0 + c_base). In the kernels' unrolled loops dr and dc are constants.
//
// kTargets: whether sequences with targets take the shortcut too. Without (the training kernels: forward without
// delta q, backward), only plain causal sequences do and the test is two compares (dr < rows_left, dc - dr <= diag;
// j <= i < length implies j < length). With (the forward's delta-q kernels: candidates are targets, and their tiles
// against the newest keys were the general mask's slowest case), two more compares take the targets; the training
// kernels keep the shorter test, since their code is sensitive to size (instruction fetch at head dim 128).
// self_check.cu compares both tests with the mask for every consumer thread's elements.
#pragma once

#include <cuda_runtime.h>

#include "hstu/mask.h"
#include "hstu/params.h"

namespace gr_kernels {
namespace sm90 {

// m0: the tile's first query position (negative only for invalid delta q, whose rows see nothing: general mask).
template <bool kTargets>
__host__ __device__ __forceinline__ bool causal_fast(const HstuFwdParams& p, const SequenceMask& mask, int m0) {
  const bool targets_ok = !mask.has_targets() || (kTargets && mask.group_size == 1);
  return p.causal && p.max_attn_len == 0 && mask.context == 0 && targets_ok && m0 >= 0;
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

template <bool kTargets>
__host__ __device__ __forceinline__ bool causal_visible(int dr, int dc, const CausalThresholds& t) {
  const int off = dc - dr;  // compared with diag: j - i
  if constexpr (!kTargets) return dr < t.rows_left && off <= t.diag;
  return dr < t.rows_left && (off == t.diag || (off < t.diag && dc < t.hist_left));
}

}  // namespace sm90
}  // namespace gr_kernels
