// Plain-data arguments of one HSTU attention launch. Filled on the host from Python (raw device pointers and
// strides), so the native module never needs torch's C++ headers.
#pragma once

#include <cstdint>

namespace gr_kernels {

enum class DType : int { kBFloat16 = 0, kFloat16 = 1 };

struct HstuFwdParams {
  // Jagged [total, heads, dim] tensors; the last dim is contiguous, rows 16-byte aligned.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  int64_t q_row_stride = 0, q_head_stride = 0;
  int64_t k_row_stride = 0, k_head_stride = 0;
  int64_t v_row_stride = 0, v_head_stride = 0;
  int64_t o_row_stride = 0, o_head_stride = 0;

  const int32_t* seq_offsets = nullptr;  // [batch + 1]
  // Delta q: q (and out, dout, dq) are jagged by their own offsets [batch + 1], query r of sequence b sitting at
  // position kv_len_b - q_len_b + r; null = every position is a query and q shares seq_offsets (the full path).
  const int32_t* q_offsets = nullptr;
  int max_q_len = 0;         // with q_offsets: the query tiles of the grid cover [0, max_q_len)
  int64_t total_q_rows = 0;  // q.shape[0] (== total_rows without q_offsets): the extent of the Q TMA loads
  const int32_t* num_targets = nullptr;  // [batch] or null

  // Optional relative attention bias, contiguous [batch, rab_heads, max_seq_len, max_seq_len], same dtype as q.
  const void* rab = nullptr;
  int rab_heads = 0;

  int64_t total_rows = 0;  // k.shape[0] (v has the same rows): the extent the K/V TMA loads are bounded by
  int batch = 0;
  int heads = 0;
  int head_dim = 0;
  int max_seq_len = 0;
  float alpha = 1.0f;
  float inv_scaling_seqlen = 1.0f;  // 1 / N of O = (SiLU(alpha (QK^T + rab)) * mask) V / N
  bool causal = true;
  int max_attn_len = 0;
  int contextual_seq_len = 0;
  int target_group_size = 1;
  DType dtype = DType::kBFloat16;

  // Split KV (forward only, hstu/fwd_split.cuh): with num_splits > 1 the key tiles of every (query tile, head,
  // sequence) are divided among num_splits CTAs, each writing its fp32 share of O / N to split_accum, contiguous
  // [num_splits, total_q_rows, heads, head_dim] (allocated by the caller), and a reduce kernel sums the shares into
  // out. 1 (the default) = no split: each CTA walks all its key tiles and writes out itself.
  int num_splits = 1;
  float* split_accum = nullptr;
};

// Backward: the forward's arguments plus the output gradient and the gradient buffers. dq is an fp32 accumulator
// (zero-initialised by the caller) that several CTAs add into; dk and dv are written once, in q's dtype. drab (with
// rab) depends on the kernel (hstu_bwd_runs_sm90): the SM80-MMA kernel adds into the fp32 drab_accum, which the
// caller zeroes; the Hopper kernel writes every element of the 16-bit drab itself (no zeroing: each plane's owner
// CTAs store their dX tiles and zeros, the heads sharing the plane add theirs after them, ordered through
// drab_sync). The caller leaves the buffer the kernel does not take null.
struct HstuBwdParams : HstuFwdParams {
  const void* dout = nullptr;  // [total_q, heads, dim], same strides rule as q
  int64_t do_row_stride = 0, do_head_stride = 0;
  float* dq_accum = nullptr;   // [total_q, heads, dim] contiguous fp32
  void* dk = nullptr;          // [total, heads, dim] contiguous (keys no query sees get zero)
  void* dv = nullptr;          // [total, heads, dim] contiguous
  float* drab_accum = nullptr; // [batch, rab_heads, max_seq_len, max_seq_len] fp32 (SM80 kernel), or null
  // [batch, rab_heads, max_seq_len, drab_row_stride] in q's dtype (Hopper kernel), or null. TMA wants 16-byte rows:
  // drab_row_stride >= max_seq_len is a multiple of 8 (the caller pads and slices off the extra columns).
  void* drab = nullptr;
  int64_t drab_row_stride = 0;
  // Hopper kernel, drab planes shared by several heads (rab_heads == 1 < heads): hstu_bwd_drab_sync_words zeroed
  // 32-bit words (per sequence an owner counter per key tile and a flag per dX tile of its plane); null otherwise.
  int32_t* drab_sync = nullptr;
};

// Whether hstu_bwd serves a call of this head dim (delta q or not) on the current device with the Hopper kernel, so
// that drab (not drab_accum) is the buffer to give it; hstu_bwd makes the same choice (given 16-byte aligned q, k, v
// and dout rows, else it fails on a 16-bit drab).
// rab_tma_rows: the call has no bias, or one with 16-byte aligned rows (base and max_seq_len * 2 bytes); the Hopper
// bias kernels of head dims 64 and 128 load it through TMA and leave other calls to the SM80 kernel.
bool hstu_bwd_runs_sm90(int head_dim, bool delta_q, bool rab_tma_rows = true);
// Whether this build's Hopper bias backward of this head dim loads the bias through TMA (sm90/bwd_config.h).
bool hstu_bwd_rab_via_tma(int head_dim);
// The zeroed words the Hopper backward needs as drab_sync for a call with a trainable bias of this shape (0: none,
// the call's drab planes are not shared by several heads).
int64_t hstu_bwd_drab_sync_words(int batch, int heads, int rab_heads, int max_seq_len);

const char* hstu_bwd(const HstuBwdParams& params, void* stream);

// Launches the forward kernel on `stream` (a cudaStream_t). Returns an empty string on success, else the reason.
const char* hstu_fwd(const HstuFwdParams& params, void* stream);

// Architectures this build holds device code for, e.g. "90a".
const char* compiled_archs();

// Host-side self-check of the Hopper forward kernel (tile schedule vs the mask, fragment and smem layouts): "" when
// it passes, else what failed; null when the build has no sm90a kernels.
const char* sm90_fwd_self_check();

}  // namespace gr_kernels
