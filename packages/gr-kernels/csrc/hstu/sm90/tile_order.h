// The order in which the Hopper forward's CTAs take their (query tile, head, sequence) tiles.
//
// The hardware hands out CTAs in blockIdx order, one per SM here (the kernel's shared memory allows no second).
// Under a causal mask query tile m carries m + 1 key tiles (2m + 2 at kBlockN = 64), whatever the sequence, so
// "highest query tile first across all sequences" is the longest-processing-time-first order, which leaves the
// light tiles for the tail; on jagged batches it also runs the long sequences' heavy tiles early instead of
// wherever their sequence sits in the batch. Taken over the whole grid that order would stream every sequence's
// K/V at once, far past L2, so the (sequence, head) pairs are cut into sections of `section` consecutive pairs whose
// K/V fit in a share of L2, and the order is applied per section:
//   linear CTA id -> section s = id / (section * m_blocks); inside it, query tile m_blocks - 1 - r / width and
//   pair s * section + r % width (r = the id's rank inside the section, width = pairs in this section).
// section = 1 is the previous order (per pair, highest query tile first). Tiles past a sequence's end (jagged) map
// to CTAs that leave at once, as before.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>

namespace gr_kernels {
namespace sm90 {

struct FwdTileOrder {
  int m_blocks = 1;  // query tiles per (sequence, head)
  int heads = 1;
  int pairs = 1;     // sequences * heads
  int section = 1;   // (sequence, head) pairs per section, in [1, pairs]

  // CTA `linear` (in [0, m_blocks * pairs)) -> its query tile, sequence and head. A bijection (self_check.cu).
  __host__ __device__ __forceinline__ void tile(int linear, int& m_block, int& b, int& head) const {
    const int per_section = section * m_blocks;
    const int s = linear / per_section;
    const int r = linear - s * per_section;
    const int first = s * section;
    const int width = pairs - first < section ? pairs - first : section;
    m_block = m_blocks - 1 - r / width;
    const int pair = first + r % width;
    b = pair / heads;
    head = pair - b * heads;
  }
};

// Host: pairs per section. GR_KERNELS_FWD_SECTION (read per call) forces a count (1 = the per-pair order); unset,
// as many pairs as fit their K and V (max_seq_len rows each) in half of the device's L2 (an attribute read, no sync).
inline int fwd_section_pairs(int pairs, int max_seq_len, int head_dim, int element_bytes) {
  if (pairs < 1) return 1;
  if (const char* v = std::getenv("GR_KERNELS_FWD_SECTION"); v != nullptr && v[0] != '\0') {
    const long forced = std::strtol(v, nullptr, 10);
    if (forced >= 1) return forced < pairs ? int(forced) : pairs;
  }
  int device = 0, l2 = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device) != cudaSuccess || l2 <= 0) {
    l2 = 50 << 20;  // an H100/H200's L2
  }
  const int64_t kv_bytes = int64_t(max_seq_len > 0 ? max_seq_len : 1) * head_dim * 2 * element_bytes;
  const int64_t fit = (int64_t(l2) / 2) / kv_bytes;
  return fit < 1 ? 1 : (fit > pairs ? pairs : int(fit));
}

}  // namespace sm90
}  // namespace gr_kernels
