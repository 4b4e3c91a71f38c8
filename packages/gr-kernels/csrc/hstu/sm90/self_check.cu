// Host-side self-check of the Hopper forward kernel (runs without a GPU, so CPU CI covers it).
//
// Tile schedule: for many sequence lengths and mask options, every visible (i, j) lies in a key tile the kernel
// visits, and every tile it treats as mask-free is entirely visible; both for full attention and for delta q, whose
// query rows sit at positions shifted by kv_len - q_len (including an invalid q_len > kv_len: its rows see nothing).
// Layouts: P reuses the S accumulator's per-thread element order as the A operand of P V; the transposed V view
// is the same bytes as V; each consumer warpgroup's S rows are its own 64; 8-element chunks of the Q/O tile stay
// contiguous and 16-byte aligned under the swizzle (the epilogue's 16-byte reads), and its accumulator pairs are
// adjacent 32-bit words there (its packed stores).
// Split KV: for every schedule case above and split counts 1..64, the splits' key-tile ranges are contiguous, cover
// the unsplit range exactly once and nothing outside it, and keep the fast loop's premise (walking a split's tiles
// downwards, once a tile is mask-free every lower one is); the split epilogue's accumulator pairs are adjacent
// columns of one row (its 8-byte fp32 stores).
// Causal masked tiles: both tests of causal_fast.h (plain causal; with single targets, the delta-q forward's) equal
// the mask for every consumer thread and S element of the forward and backward tiles on the sequences they cover,
// and are taken exactly for those.
// Tile order: the forward's 1-D grid covers every (query tile, sequence, head) once, highest query tile first per
// section of (sequence, head) pairs.
// TMA bias stages: the shared-memory element a consumer thread reads for S element i of a stage is the bias tile's
// (row(i), col(i)) of that stage, pairs (2t, 2t + 1) are one aligned 32-bit word, and each warp's 32 reads of one
// pair index touch 32 distinct banks (no conflicts).
#include <cute/tensor.hpp>

#include <cstdint>
#include <cstdio>
#include <vector>

#include "hstu/fwd_split.cuh"
#include "hstu/mask.h"
#include "hstu/sm90/kernel_traits.h"
#include "hstu/sm90/kernel_traits_bwd.h"
#include "hstu/sm90/mainloop_bwd.cuh"
#include "hstu/sm90/mainloop_fwd.cuh"
#include "hstu/sm90/causal_fast.h"

namespace gr_kernels {
namespace sm90 {

namespace {

char g_report[256];

template <typename ElementT, int kHeadDim>
bool check_rab_stages() {
  using namespace cute;
  using T = FwdTraits<ElementT, kHeadDim>;
  using Mainloop = FwdMainloop<ElementT, T>;
  using Element = typename T::Element;
  constexpr int M = T::kBlockM, N = T::kBlockN;
  auto fail = [](const char* what, int a, int b) {
    std::snprintf(g_report, sizeof(g_report), "head dim %d, block %dx%d: rab stages: %s (%d, %d)", kHeadDim, M, N, what,
                  a, b);
    return false;
  };
  static_assert(T::kSmemRabOffset % 1024 == 0 && T::kSmemRabOffset >= T::kSmemBytes, "rab stages misplaced");
  static_assert(T::kTmaBytesRab == M * N * sizeof(Element), "one TMA box fills one bias stage");
  // A 1024-byte aligned stand-in for the stages' base (the kernel's smem_raw + kSmemRabOffset).
  Element* base = reinterpret_cast<Element*>(std::uintptr_t(1) << 20);
  Tensor sRab = make_tensor(make_smem_ptr(base), typename T::SmemLayoutRab{});
  if (int(cosize(typename T::SmemLayoutRab{})) != M * N * T::kStages) return fail("stages not dense", 0, 0);
  typename T::MmaQK mma_qk;
  const auto tile_mn = Shape<Int<M>, Int<N>>{};
  constexpr int kMaxPairs = 64;
  for (int s = 0; s < T::kStages; ++s) {
    const std::uintptr_t stage = reinterpret_cast<std::uintptr_t>(base) + std::uintptr_t(s) * T::kTmaBytesRab;
    for (int warp = 0; warp < T::kConsumerThreads / 32; ++warp) {
      std::uintptr_t words[32][kMaxPairs];  // [lane][pair]: byte address of each 32-bit read
      int pairs = 0;
      for (int lane = 0; lane < 32; ++lane) {
        const int t = warp * 32 + lane;
        Tensor cS = mma_qk.get_thread_slice(t).partition_C(make_identity_tensor(tile_mn));
        pairs = int(size(cS)) / 2;
        if (pairs > kMaxPairs) return fail("fragment too large for the check", t, pairs);
        // What the mainloop reads for pair (2p, 2p + 1): must be the TMA tile's elements of that row and columns.
        const int r0 = get<0>(cS(0)), c0 = get<1>(cS(0));
        const uint32_t thread_base = Mainloop::rab_thread_base(r0, c0);
        for (int p = 0; p < pairs; ++p) {
          const int r = get<0>(cS(2 * p)), c = get<1>(cS(2 * p));
          if (get<0>(cS(2 * p + 1)) != r || get<1>(cS(2 * p + 1)) != c + 1) return fail("S pair not adjacent", t, p);
          const std::uintptr_t read = stage + Mainloop::rab_word_offset(thread_base, r - r0, c - c0);
          if (read != reinterpret_cast<std::uintptr_t>(&sRab(r, c, s))) return fail("S element reads other bias", t, p);
          if (read % 4 != 0 || reinterpret_cast<std::uintptr_t>(&sRab(r, c + 1, s)) != read + sizeof(Element)) {
            return fail("bias pair not one 32-bit word", t, p);
          }
          words[lane][p] = read;
        }
      }
      for (int p = 0; p < pairs; ++p) {
        for (int a = 0; a < 32; ++a)
          for (int b = a + 1; b < 32; ++b) {
            const bool same_bank = (words[a][p] / 4) % 32 == (words[b][p] / 4) % 32;
            if (same_bank && words[a][p] != words[b][p]) return fail("bank conflict between lanes", a, b);
          }
      }
    }
  }
  return true;
}

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
    Tensor tOcO = mma_pv.get_thread_slice(t).partition_C(make_identity_tensor(Shape<Int<M>, Int<kHeadDim>>{}));
    for (int i = 0; i < int(size(tOcO)); i += 2) {
      const auto a = tOcO(i);
      const auto b = tOcO(i + 1);
      if (get<1>(a) % 2 != 0 || get<0>(b) != get<0>(a) || get<1>(b) != get<1>(a) + 1) {
        return fail("split O pair not two adjacent columns of a row", t, i);
      }
    }
  }
  return check_rab_stages<ElementT, kHeadDim>();
}

// The splits of key tiles [lo, hi) into `splits` shares: contiguous, in order, each tile exactly once, none outside.
// `report` describes the case for the failure message.
bool check_split_cover(int lo, int hi, int splits, const char* report) {
  int next = lo;  // the first tile not yet covered
  for (int s = 0; s < splits; ++s) {
    int lo_s, hi_s;
    split_key_blocks(lo, hi, splits, s, lo_s, hi_s);
    if (lo_s >= hi_s) continue;  // an empty share
    if (lo_s != next || hi_s > hi) {
      std::snprintf(g_report, sizeof(g_report), "split %d/%d of key tiles [%d, %d) is [%d, %d), expected from %d (%s)",
                    s, splits, lo, hi, lo_s, hi_s, next, report);
      return false;
    }
    next = hi_s;
  }
  if (next != (hi > lo ? hi : lo)) {
    std::snprintf(g_report, sizeof(g_report), "splits of key tiles [%d, %d) into %d end at %d (%s)", lo, hi, splits,
                  next, report);
    return false;
  }
  return true;
}

// Arbitrary ranges (the SM80 kernel's too) and split counts, including more splits than tiles.
bool check_split_ranges() {
  for (int lo = 0; lo < 6; ++lo)
    for (int hi = 0; hi < 70; ++hi)
      for (int splits = 1; splits <= 80; ++splits)
        if (!check_split_cover(lo, hi, splits, "generic range")) return false;
  return true;
}

// The masked tiles of a causal_fast sequence (causal_visible against the per-thread thresholds silu_mask's
// causal_fast_tile (forward) and the backward's tile derive from each consumer thread's S elements) keep exactly
// the mask's visible elements, at any tile position, with and without targets: TiledMma is the S GEMM of the kernel
// (its C layout places the elements), M x N its tile.
template <typename TiledMma, int M, int N, int kThreads, bool kTargets>
bool check_causal_fast(const char* kernel) {
  using namespace cute;
  TiledMma mma;
  for (int length : {1, 2, 63, 64, 65, 128, 129, 200, 300, 1000})
    for (int targets : {0, 1, 2, 63, 130, 1000})
      for (int m0 : {0, 64, 128, 192, 256})
        for (int n0 : {0, 64, 128, 192, 256}) {
          HstuFwdParams p;
          SequenceMask mask;
          mask.length = length;
          mask.history = length - (targets < length ? targets : length);
          mask.context = 0;
          mask.max_attn_len = 0;
          mask.group_size = 1;
          mask.causal = true;
          if (targets > 0 && !kTargets) {
            if (causal_fast<false>(p, mask, m0)) {
              std::snprintf(g_report, sizeof(g_report), "%s: a sequence with targets is plain causal_fast", kernel);
              return false;
            }
            continue;
          }
          if (!causal_fast<kTargets>(p, mask, m0)) {
            std::snprintf(g_report, sizeof(g_report), "%s: a causal sequence (T=%d) is not causal_fast", kernel,
                          targets);
            return false;
          }
          for (int t = 0; t < kThreads; ++t) {
            Tensor cS = mma.get_thread_slice(t).partition_C(make_identity_tensor(Shape<Int<M>, Int<N>>{}));
            const int r_base = get<0>(cS(0)), c_base = get<1>(cS(0));
            const CausalThresholds thresholds = causal_thresholds(mask, m0 + r_base, n0 + c_base);
            for (int e = 0; e < int(size(cS)); e += 2) {
              const int dr = get<0>(cS(e)) - r_base, dc = get<1>(cS(e)) - c_base;
              if (dr < 0 || dc < 0 || get<0>(cS(e + 1)) != get<0>(cS(e)) || get<1>(cS(e + 1)) != get<1>(cS(e)) + 1) {
                std::snprintf(g_report, sizeof(g_report), "%s: S elements %d, %d of thread %d are not a pair after "
                              "element 0", kernel, e, e + 1, t);
                return false;
              }
              for (int k = 0; k < 2; ++k) {
                const int i = m0 + r_base + dr, j = n0 + c_base + dc + k;
                if (causal_visible<kTargets>(dr, dc + k, thresholds) != mask(i, j)) {
                  std::snprintf(g_report, sizeof(g_report), "%s: causal fast mask differs at (%d, %d) (thread %d, "
                                "L=%d, T=%d, tile at %d, %d)", kernel, i, j, t, length, targets, m0, n0);
                  return false;
                }
              }
            }
          }
        }
  return true;
}

template <int kHeadDim>
bool check_causal_fast_kernels() {
  using F = FwdTraits<__nv_bfloat16, kHeadDim>;
  using B = BwdTraits<__nv_bfloat16, kHeadDim, false>;
  using Br = BwdTraits<__nv_bfloat16, kHeadDim, true>;
  return check_causal_fast<typename F::MmaQK, F::kBlockM, F::kBlockN, F::kConsumerThreads, false>("forward") &&
         check_causal_fast<typename F::MmaQK, F::kBlockM, F::kBlockN, F::kConsumerThreads, true>("delta-q forward") &&
         check_causal_fast<typename B::MmaSdP, B::kBlockM, B::kBlockN, B::kConsumerThreads, false>("backward") &&
         check_causal_fast<typename Br::MmaSdP, Br::kBlockM, Br::kBlockN, Br::kConsumerThreads, false>("rab backward");
}

// The head-dim-256 backward's dQ staging in its Q / dO stage (kDqInStage): BwdMainloop::dq_quarter_offset places every
// element of every consumer thread's dQ fragment where SmemLayoutDqQuarter puts it, pairs in adjacent floats.
template <bool kRab>
bool check_dq_in_stage() {
  using namespace cute;
  using B = BwdTraits<__nv_bfloat16, 256, kRab>;
  if constexpr (B::kDqInStage) {
    using Mainloop = BwdMainloop<__nv_bfloat16, B>;
    typename B::MmaDq mma;
    // The placement cute gives a shared-memory tensor (its swizzle acts on byte addresses), from a 1024-byte aligned
    // stand-in base address that is never dereferenced.
    float* const base = reinterpret_cast<float*>(std::uintptr_t(1) << 20);
    Tensor quarter_tensor = make_tensor(make_smem_ptr(base), typename B::SmemLayoutDqQuarter{});
    auto quarter = [&](int r, int c) { return int(&quarter_tensor(r, c) - base); };
    for (int t = 0; t < B::kConsumerThreads; ++t) {
      Tensor c = mma.get_thread_slice(t).partition_C(make_identity_tensor(Shape<Int<B::kBlockM>, Int<256>>{}));
      const int wg = t / 128;
      const int row0 = get<0>(c(0)), col0 = get<1>(c(0)) - wg * 128;
      for (int e = 0; e < int(size(c)); e += 2) {
        const int r = get<0>(c(e)), col = get<1>(c(e)) - wg * 128;
        const int dr = r - row0, dc = col - col0;
        const bool pair = get<0>(c(e + 1)) == r && get<1>(c(e + 1)) == get<1>(c(e)) + 1;
        const int want = quarter(r, col % 64);
        const int got = Mainloop::dq_quarter_offset(row0, col0, dr, dc);
        if (!pair || col < 0 || col >= 128 || dr % 8 != 0 || dc % 8 != 0 || (dc < 64) != (col < 64) || got != want ||
            quarter(r, col % 64 + 1) != want + 1) {
          std::snprintf(g_report, sizeof(g_report), "dQ in stage: thread %d element %d at (%d, %d): offset %d, layout "
                        "%d (rab %d)", t, e, r, col, got, want, int(kRab));
          return false;
        }
      }
    }
  }
  return true;
}

// The forward's tile order (tile_order.h) maps the 1-D grid onto every (query tile, sequence, head) exactly once,
// highest query tile first within each section.
bool check_tile_order() {
  for (int m_blocks : {1, 2, 5, 32})
    for (int heads : {1, 3, 4})
      for (int batch : {1, 2, 7, 33})
        for (int section : {1, 2, 3, 5, 16, 1000}) {
          FwdTileOrder order;
          order.m_blocks = m_blocks;
          order.heads = heads;
          order.pairs = batch * heads;
          order.section = section < order.pairs ? section : order.pairs;
          const int ctas = m_blocks * order.pairs;
          std::vector<char> seen(size_t(ctas), 0);
          int prev_section = 0, prev_m = m_blocks;
          for (int id = 0; id < ctas; ++id) {
            int m, b, h;
            order.tile(id, m, b, h);
            const int pair = b * heads + h;
            const bool in_range = m >= 0 && m < m_blocks && b >= 0 && b < batch && h >= 0 && h < heads;
            if (!in_range || seen[size_t(pair) * m_blocks + m]) {
              std::snprintf(g_report, sizeof(g_report), "tile order: CTA %d -> (%d, %d, %d) out of range or repeated "
                            "(M=%d H=%d B=%d S=%d)", id, m, b, h, m_blocks, heads, batch, section);
              return false;
            }
            seen[size_t(pair) * m_blocks + m] = 1;
            const int sec = pair / order.section;
            if (sec < prev_section || (sec == prev_section && m > prev_m)) {
              std::snprintf(g_report, sizeof(g_report), "tile order: CTA %d takes query tile %d of section %d after "
                            "tile %d of section %d", id, m, sec, prev_m, prev_section);
              return false;
            }
            prev_section = sec;
            prev_m = m;
          }
        }
  return true;
}

template <int kHeadDim>
bool check_schedule() {
  using T = FwdTraits<__nv_bfloat16, kHeadDim>;
  using Mainloop = FwdMainloop<__nv_bfloat16, T>;
  constexpr int M = T::kBlockM, N = T::kBlockN;
  for (int length : {1, 2, 63, 64, 65, 127, 128, 129, 200, 300}) {
    for (int causal = 0; causal < 2; ++causal) {
      for (int window : {0, 1, 37, 130}) {
        for (int context : {0, 3, 130}) {
          for (int targets : {0, 1, 9}) {
            for (int group : {1, 3}) {
              HstuFwdParams p;
              p.causal = causal != 0;
              p.max_attn_len = window;
              p.contextual_seq_len = context;
              p.target_group_size = group;
              SequenceMask mask;
              mask.length = length;
              mask.history = length - (targets < length ? targets : length);
              mask.context = context < mask.history ? context : mask.history;
              mask.max_attn_len = window;
              mask.group_size = group;
              mask.causal = p.causal;
              // q_len == length: full attention (shift 0); shorter: delta q; longer: invalid delta q.
              for (int q_len : {length, 1, 37, length + 5}) {
                if (q_len == 37 && q_len >= length) continue;
                const int shift = length - q_len;
                for (int row0 = 0; row0 < q_len; row0 += M) {
                  const int m0 = shift + row0;  // position of the CTA's first query row, as the kernel passes it
                  int lo, hi;
                  Mainloop::key_blocks(p, mask, m0, lo, hi);
                  for (int i = m0; i < m0 + M && i < shift + q_len; ++i)
                    for (int j = 0; j < length; ++j)
                      if (mask(i, j) && (j / N < lo || j / N >= hi)) {
                        std::snprintf(g_report, sizeof(g_report),
                                      "head dim %d: visible (%d, %d) outside key tiles [%d, %d) (L=%d Q=%d causal=%d "
                                      "W=%d C=%d T=%d G=%d)",
                                      kHeadDim, i, j, lo, hi, length, q_len, causal, window, context, targets, group);
                        return false;
                      }
                  // The shortcut is taken exactly for the sequences it was checked on: causal, no window, no
                  // context, no targets (with kTargets: targets in groups of one).
                  const bool plain = causal && window == 0 && mask.context == 0 && m0 >= 0;
                  const bool covered = plain && (!mask.has_targets() || group == 1);
                  if (causal_fast<false>(p, mask, m0) != (plain && !mask.has_targets()) ||
                      causal_fast<true>(p, mask, m0) != covered) {
                    std::snprintf(g_report, sizeof(g_report), "causal_fast wrong (L=%d Q=%d m0=%d causal=%d W=%d "
                                  "C=%d T=%d G=%d)", length, q_len, m0, causal, window, context, targets, group);
                    return false;
                  }
                  for (int splits : {1, 2, 3, 7, 32, 64}) {
                    char what[160];
                    std::snprintf(what, sizeof(what), "head dim %d L=%d Q=%d m0=%d causal=%d W=%d C=%d T=%d G=%d",
                                  kHeadDim, length, q_len, m0, causal, window, context, targets, group);
                    if (!check_split_cover(lo, hi, splits, what)) return false;
                    for (int s = 0; s < splits; ++s) {
                      int lo_s, hi_s;
                      split_key_blocks(lo, hi, splits, s, lo_s, hi_s);
                      bool free_above = false;
                      for (int n = hi_s - 1; n >= lo_s; --n) {
                        const bool free_tile = Mainloop::mask_free_tile(p, mask, m0, n * N);
                        if (free_above && !free_tile) {
                          std::snprintf(g_report, sizeof(g_report),
                                        "split %d/%d: masked key tile %d below a mask-free one (%s)", s, splits, n,
                                        what);
                          return false;
                        }
                        free_above = free_tile;
                      }
                    }
                  }
                  for (int n = lo; n < hi; ++n) {
                    if (!Mainloop::mask_free_tile(p, mask, m0, n * N)) continue;
                    for (int i = m0; i < m0 + M && i < length; ++i)  // rows past the end are not stored
                      for (int j = n * N; j < (n + 1) * N; ++j)
                        if (!mask(i, j)) {
                          std::snprintf(g_report, sizeof(g_report),
                                        "head dim %d: mask-free tile (%d, %d) hides masked (%d, %d) (L=%d Q=%d "
                                        "causal=%d W=%d C=%d T=%d G=%d)",
                                        kHeadDim, m0, n * N, i, j, length, q_len, causal, window, context, targets,
                                        group);
                          return false;
                        }
                  }
                }
              }
            }
          }
        }
      }
    }
  }
  return true;
}

}  // namespace

const char* fwd_self_check() {
  g_report[0] = '\0';
  const bool ok = check_split_ranges() && check_tile_order() && check_causal_fast_kernels<64>() &&
                  check_causal_fast_kernels<128>() && check_causal_fast_kernels<256>() && check_schedule<64>() &&
                  check_schedule<128>() && check_schedule<256>() &&
                  check_layouts<__nv_bfloat16, 64>() && check_layouts<__nv_bfloat16, 128>() &&
                  check_layouts<__nv_bfloat16, 256>() && check_layouts<__half, 64>() &&
                  check_layouts<__half, 128>() && check_layouts<__half, 256>() && check_dq_in_stage<false>() &&
                  check_dq_in_stage<true>();
  return ok ? "" : g_report;
}

}  // namespace sm90
}  // namespace gr_kernels
