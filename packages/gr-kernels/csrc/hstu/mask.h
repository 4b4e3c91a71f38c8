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

  __host__ __device__ __forceinline__ bool operator()(int i, int j) const {
    if (i >= length || j >= length) return false;
    const bool tgt_i = i >= history, tgt_j = j >= history;
    if (tgt_j) {
      // Targets see targets of their own group at or before themselves only.
      return tgt_i && (i - history) / group_size == (j - history) / group_size && j <= i;
    }
    if (j < context) return true;
    if (tgt_i) return max_attn_len == 0 || history - j <= max_attn_len;
    if (i < context) return true;
    const bool near = causal ? j <= i : true;
    return near && (max_attn_len == 0 || (i - j <= max_attn_len && j - i <= max_attn_len));
  }
};

}  // namespace gr_kernels
