// Which key a query may attend to: the device-side twin of gr_kernels/masks.py (see its docstring for the rules).
#pragma once

#include <cuda_runtime.h>

#include "hstu/params.h"

namespace gr_kernels {

struct SequenceMask {
  int length;         // L: tokens of this sequence
  int history;        // Hh = L - targets
  int context;        // C = min(contextual_seq_len, Hh)
  int max_attn_len;   // W, 0 = unlimited
  int group_size;     // G
  bool causal;

  // The mask of sequence b (of `length` tokens) under the launch's options; num_targets is clamped to [0, length].
  __device__ __forceinline__ static SequenceMask of_sequence(const HstuFwdParams& p, int b, int length) {
    const int targets = p.num_targets == nullptr ? 0 : min(max(p.num_targets[b], 0), length);
    SequenceMask m;
    m.length = length;
    m.history = length - targets;
    m.context = min(p.contextual_seq_len, m.history);
    m.max_attn_len = p.max_attn_len;
    m.group_size = p.target_group_size;
    m.causal = p.causal;
    return m;
  }

  __host__ __device__ __forceinline__ bool has_targets() const { return history < length; }

  // i is a query position (delta q: kv_len - q_len + row, negative for invalid q_len > kv_len: sees nothing, like
  // masks.py); one unsigned compare per index rejects both ends.
  __host__ __device__ __forceinline__ bool operator()(int i, int j) const {
    if (unsigned(i) >= unsigned(length) || j >= length) return false;
    const bool tgt_i = i >= history, tgt_j = j >= history;
    if (tgt_j) {
      // Targets see targets of their own group at or before themselves only: j in [start of i's group, i], which
      // is j == i for groups of 1 (the default). No division per key: one per element slowed every target-mask
      // call (H200, a delta-q scoring call of 257 rows against 4353 keys: 50.9 us with it, 40.1 us without).
      if (!tgt_i || j > i) return false;
      return group_size == 1 ? j == i : j >= history + (i - history) / group_size * group_size;
    }
    if (j < context) return true;
    if (tgt_i) return max_attn_len == 0 || history - j <= max_attn_len;
    if (i < context) return true;
    const bool near = causal ? j <= i : true;
    return near && (max_attn_len == 0 || (i - j <= max_attn_len && j - i <= max_attn_len));
  }
};

// The query rows of sequence b: where they start in q/out/dout/dq, how many there are, and the position of row 0
// inside the sequence. Kernels are instantiated with and without delta q (kDeltaQ = p.q_offsets != null): without,
// the rows are the sequence's own (shift 0) and the full-attention code is what it was before delta q existed.
struct QueryRows {
  int start;
  int length;
  int shift;

  template <bool kDeltaQ>
  __host__ __device__ __forceinline__ static QueryRows of_sequence(const HstuFwdParams& p, int b, int seq_start,
                                                                   int length) {
    if constexpr (!kDeltaQ) return QueryRows{seq_start, length, 0};
    const int start = p.q_offsets[b];
    const int rows = p.q_offsets[b + 1] - start;
    return QueryRows{start, rows, length - rows};
  }
};

// Rows of the query grid dimension: max_q_len with delta q, else max_seq_len.
__host__ __device__ __forceinline__ int query_grid_rows(const HstuFwdParams& p) {
  return p.q_offsets == nullptr ? p.max_seq_len : p.max_q_len;
}

}  // namespace gr_kernels
