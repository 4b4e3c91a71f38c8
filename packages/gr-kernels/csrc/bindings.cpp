// Python binding of the native HSTU kernels. Tensors cross as raw device addresses and strides, the stream as its
// cudaStream_t handle: no torch C++ headers, so one build serves every torch version.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "hstu/params.h"

namespace py = pybind11;
using gr_kernels::HstuFwdParams;

namespace {

template <typename T>
T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// Arguments shared by forward and backward, in this order, after the kernel-specific pointers. The last three are
// delta q: q_offsets (0 = q shares seq_offsets), max_q_len and q's rows (both ignored without q_offsets).
void fill_common(HstuFwdParams& p, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, py::tuple q_strides,
                 py::tuple k_strides, py::tuple v_strides, std::uintptr_t seq_offsets, std::uintptr_t num_targets,
                 std::uintptr_t rab, int rab_heads, int batch, int heads, int head_dim, int max_seq_len, float alpha,
                 int scaling_seqlen, bool causal, int max_attn_len, int contextual_seq_len, int target_group_size,
                 int dtype, int64_t total_rows, std::uintptr_t q_offsets, int max_q_len, int64_t total_q_rows) {
  p.q = as_ptr<const void>(q);
  p.k = as_ptr<const void>(k);
  p.v = as_ptr<const void>(v);
  p.q_row_stride = q_strides[0].cast<int64_t>();
  p.q_head_stride = q_strides[1].cast<int64_t>();
  p.k_row_stride = k_strides[0].cast<int64_t>();
  p.k_head_stride = k_strides[1].cast<int64_t>();
  p.v_row_stride = v_strides[0].cast<int64_t>();
  p.v_head_stride = v_strides[1].cast<int64_t>();
  p.seq_offsets = as_ptr<const int32_t>(seq_offsets);
  p.num_targets = as_ptr<const int32_t>(num_targets);
  p.rab = as_ptr<const void>(rab);
  p.rab_heads = rab_heads;
  p.batch = batch;
  p.heads = heads;
  p.head_dim = head_dim;
  p.max_seq_len = max_seq_len;
  p.alpha = alpha;
  if (scaling_seqlen <= 0) throw std::invalid_argument("scaling_seqlen must be positive");
  p.inv_scaling_seqlen = 1.0f / static_cast<float>(scaling_seqlen);
  p.causal = causal;
  p.max_attn_len = max_attn_len;
  p.contextual_seq_len = contextual_seq_len;
  if (target_group_size <= 0) throw std::invalid_argument("target_group_size must be positive");
  p.target_group_size = target_group_size;
  if (dtype != 0 && dtype != 1) throw std::invalid_argument("dtype must be 0 (bfloat16) or 1 (float16)");
  p.dtype = static_cast<gr_kernels::DType>(dtype);
  if (total_rows < 0 || total_rows > INT32_MAX) throw std::invalid_argument("total_rows must be in [0, 2^31)");
  p.total_rows = total_rows;
  p.q_offsets = as_ptr<const int32_t>(q_offsets);
  if (p.q_offsets == nullptr) {
    p.max_q_len = 0;
    p.total_q_rows = total_rows;
  } else {
    if (max_q_len < 1) throw std::invalid_argument("delta q (q_offsets) needs max_q_len >= 1");
    if (total_q_rows < 0 || total_q_rows > INT32_MAX) throw std::invalid_argument("total_q_rows must be in [0, 2^31)");
    p.max_q_len = max_q_len;
    p.total_q_rows = total_q_rows;
  }
}

void check(const char* err, const char* what) {
  if (err != nullptr && err[0] != '\0') throw std::runtime_error(std::string(what) + ": " + err);
}

void hstu_fwd(std::uintptr_t out, py::tuple o_strides, std::uintptr_t stream, std::uintptr_t q, std::uintptr_t k,
              std::uintptr_t v, py::tuple q_strides, py::tuple k_strides, py::tuple v_strides,
              std::uintptr_t seq_offsets, std::uintptr_t num_targets, std::uintptr_t rab, int rab_heads, int batch,
              int heads, int head_dim, int max_seq_len, float alpha, int scaling_seqlen, bool causal,
              int max_attn_len, int contextual_seq_len, int target_group_size, int dtype, int64_t total_rows,
              std::uintptr_t q_offsets, int max_q_len, int64_t total_q_rows, std::uintptr_t split_accum,
              int num_splits) {
  HstuFwdParams p;
  fill_common(p, q, k, v, q_strides, k_strides, v_strides, seq_offsets, num_targets, rab, rab_heads, batch, heads,
              head_dim, max_seq_len, alpha, scaling_seqlen, causal, max_attn_len, contextual_seq_len,
              target_group_size, dtype, total_rows, q_offsets, max_q_len, total_q_rows);
  p.out = as_ptr<void>(out);
  p.o_row_stride = o_strides[0].cast<int64_t>();
  p.o_head_stride = o_strides[1].cast<int64_t>();
  // Split KV: num_splits CTAs share each query tile's key tiles, their fp32 partials in split_accum
  // [num_splits, total_q_rows, heads, head_dim]; 1 = no split (split_accum ignored).
  if (num_splits < 1) throw std::invalid_argument("num_splits must be >= 1");
  if (num_splits > 1 && split_accum == 0) throw std::invalid_argument("num_splits > 1 needs a split_accum workspace");
  p.num_splits = num_splits;
  p.split_accum = num_splits > 1 ? as_ptr<float>(split_accum) : nullptr;
  check(gr_kernels::hstu_fwd(p, as_ptr<void>(stream)), "hstu_fwd");
}

void hstu_bwd(std::uintptr_t dout, py::tuple do_strides, std::uintptr_t dq_accum, std::uintptr_t dk,
              std::uintptr_t dv, std::uintptr_t drab_accum, std::uintptr_t drab, int64_t drab_row_stride,
              std::uintptr_t drab_sync, std::uintptr_t stream, std::uintptr_t q, std::uintptr_t k,
              std::uintptr_t v, py::tuple q_strides, py::tuple k_strides, py::tuple v_strides,
              std::uintptr_t seq_offsets, std::uintptr_t num_targets, std::uintptr_t rab, int rab_heads, int batch,
              int heads, int head_dim, int max_seq_len, float alpha, int scaling_seqlen, bool causal,
              int max_attn_len, int contextual_seq_len, int target_group_size, int dtype, int64_t total_rows,
              std::uintptr_t q_offsets, int max_q_len, int64_t total_q_rows) {
  gr_kernels::HstuBwdParams p;
  fill_common(p, q, k, v, q_strides, k_strides, v_strides, seq_offsets, num_targets, rab, rab_heads, batch, heads,
              head_dim, max_seq_len, alpha, scaling_seqlen, causal, max_attn_len, contextual_seq_len,
              target_group_size, dtype, total_rows, q_offsets, max_q_len, total_q_rows);
  p.dout = as_ptr<const void>(dout);
  p.do_row_stride = do_strides[0].cast<int64_t>();
  p.do_head_stride = do_strides[1].cast<int64_t>();
  p.dq_accum = as_ptr<float>(dq_accum);
  p.dk = as_ptr<void>(dk);
  p.dv = as_ptr<void>(dv);
  p.drab_accum = as_ptr<float>(drab_accum);
  p.drab = as_ptr<void>(drab);
  p.drab_row_stride = drab_row_stride;
  p.drab_sync = as_ptr<int32_t>(drab_sync);
  check(gr_kernels::hstu_bwd(p, as_ptr<void>(stream)), "hstu_bwd");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "gr_kernels native HSTU attention kernels (CUDA)";
  m.def("hstu_fwd", &hstu_fwd,
        "HSTU attention forward on jagged q/k/v (raw device pointers); the last two arguments are the split-KV "
        "fp32 workspace [num_splits, total_q, heads, dim] (0 when num_splits == 1) and num_splits");
  m.def("hstu_bwd", &hstu_bwd,
        "HSTU attention backward: dq (fp32, accumulated), dk, dv, and drab either fp32-accumulated (drab_accum, the "
        "SM80-MMA kernel, zeroed by the caller) or 16-bit with its row stride (drab, the Hopper kernel, which writes "
        "all of it; with planes shared by the heads it takes drab_sync: hstu_bwd_drab_sync_words zeroed int32 words, "
        "else 0)");
  m.def("hstu_bwd_drab_sync_words", &gr_kernels::hstu_bwd_drab_sync_words, py::arg("batch"), py::arg("heads"),
        py::arg("rab_heads"), py::arg("max_seq_len"),
        "Zeroed int32 words the Hopper backward takes as drab_sync for a trainable bias of this shape (0: none)");
  m.def("hstu_bwd_runs_sm90", &gr_kernels::hstu_bwd_runs_sm90, py::arg("head_dim"), py::arg("delta_q"),
        py::arg("rab_tma_rows") = true,
        "Whether hstu_bwd takes the Hopper kernel for this head dim on the current device (then drab is 16-bit); "
        "rab_tma_rows: no bias, or one with 16-byte aligned rows");
  m.def("hstu_bwd_rab_via_tma", &gr_kernels::hstu_bwd_rab_via_tma, py::arg("head_dim"),
        "Whether the Hopper bias backward of this head dim loads the bias through TMA (rows of a multiple of 8 "
        "elements; other bias rows take the SM80 kernel)");
  m.def("compiled_archs", &gr_kernels::compiled_archs, "CUDA architectures this build holds code for");
  m.def(
      "sm90_fwd_self_check",
      []() -> py::object {
        const char* report = gr_kernels::sm90_fwd_self_check();
        if (report == nullptr) return py::none();
        return py::str(report);
      },
      "Host-side self-check of the Hopper kernels (forward tile schedule vs the mask, fragment and smem layouts, the "
      "backward's causal masks and dQ staging): '' if it passes, else what failed; None when the build has no sm90a "
      "kernels");
}
