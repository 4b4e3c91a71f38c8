// Host-side self-check of the layout facts the Hopper forward kernel relies on (runs without a GPU, so CPU CI
// covers it): P reuses the S accumulator's per-thread element order as the A operand of P V; the transposed V view
// is the same bytes as V; each consumer warpgroup's S rows are its own 64; 8-element chunks of the Q/O tile stay
// contiguous and 16-byte aligned under the swizzle (the epilogue's 16-byte reads), and its accumulator pairs are
// adjacent 32-bit words there (its packed stores).
#include <cute/tensor.hpp>

#include <cstdint>
#include <cstdio>

#include "hstu/sm90/kernel_traits.h"

namespace gr_kernels {
namespace sm90 {

namespace {

char g_report[256];

template <typename ElementT, int kHeadDim>
bool check_layouts() {
  using namespace cute;
  using T = FwdTraits<ElementT, kHeadDim>;
  using Element = typename T::Element;
  constexpr int M = T::kBlockM, N = T::kBlockN;
  auto fail = [](const char* what, int a, int b) {
    std::snprintf(g_report, sizeof(g_report), "head dim %d, block %dx%d: %s (%d, %d)", kHeadDim, M, N, what, a, b);
    return false;
  };
  typename T::MmaQK mma_qk;
  typename T::MmaPV mma_pv;
  const auto tile_mn = Shape<Int<M>, Int<N>>{};
  const auto shape_p = partition_shape_A(mma_pv, tile_mn);
  for (int t = 0; t < T::kConsumerThreads; ++t) {
    Tensor cS = mma_qk.get_thread_slice(t).partition_C(make_identity_tensor(tile_mn));
    Tensor cP = mma_pv.get_thread_slice(t).partition_A(make_identity_tensor(tile_mn));
    if (int(size(cS)) != int(size(cP)) || int(size(shape_p)) != int(size(cP))) return fail("S/P sizes", t, 0);
    for (int i = 0; i < int(size(cS)); ++i) {
      const auto s = cS(i);
      const auto q = cP(idx2crd(i, shape_p));
      if (get<0>(s) != get<0>(q) || get<1>(s) != get<1>(q)) return fail("P element != S element", t, i);
      if (get<0>(s) / 64 != t / 128) return fail("S row outside the warpgroup's 64", t, i);
    }
  }
  const auto sV = typename T::SmemLayoutV{};
  const auto sVt = typename T::SmemLayoutVt{};
  for (int s = 0; s < T::kStages; ++s)
    for (int n = 0; n < N; ++n)
      for (int d = 0; d < kHeadDim; ++d)
        if (sV(n, d, s) != sVt(d, n, s)) return fail("V^T view differs from V", n, d);
  Element* base = reinterpret_cast<Element*>(std::uintptr_t(1) << 20);
  Tensor sO = make_tensor(make_smem_ptr(base), typename T::SmemLayoutO{});
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < kHeadDim; c += 8) {
      Element* chunk = &sO(r, c);
      if (reinterpret_cast<std::uintptr_t>(chunk) % 16 != 0) return fail("O chunk misaligned", r, c);
      for (int e = 1; e < 8; ++e)
        if (&sO(r, c + e) != chunk + e) return fail("O chunk not contiguous", r, c);
    }
  // The epilogue stores O accumulator pairs (2t, 2t + 1) as one 32-bit word: adjacent and 4-byte aligned in smem.
  for (int t = 0; t < T::kConsumerThreads; ++t) {
    Tensor tOsO = mma_pv.get_thread_slice(t).partition_C(sO);
    for (int i = 0; i < int(size(tOsO)); i += 2) {
      if (reinterpret_cast<std::uintptr_t>(&tOsO(i)) % 4 != 0) return fail("O pair misaligned", t, i);
      if (&tOsO(i + 1) != &tOsO(i) + 1) return fail("O pair not adjacent", t, i);
    }
  }
  return true;
}

}  // namespace

const char* fwd_layout_check() {
  g_report[0] = '\0';
  const bool ok = check_layouts<__nv_bfloat16, 64>() && check_layouts<__nv_bfloat16, 128>() &&
                  check_layouts<__nv_bfloat16, 256>() && check_layouts<__half, 64>() &&
                  check_layouts<__half, 128>() && check_layouts<__half, 256>();
  return ok ? "" : g_report;
}

}  // namespace sm90
}  // namespace gr_kernels
