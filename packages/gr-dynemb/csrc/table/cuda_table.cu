#include "table/cuda_table.h"

#include <cooperative_groups.h>
#include <cub/device/device_scan.cuh>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "table/hash.h"
#include "table/initializer.h"

namespace cg = cooperative_groups;

namespace gr_dynemb {

namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("gr_dynemb CUDA table: ") + what + ": " +
                                                   cudaGetErrorString(err));
}

// Runs a method on the table's device and restores the caller's current device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }

 private:
  int previous_ = 0;
};

cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

constexpr int kGroup = 8;  // threads per key: each reads 16 of the bucket's 128 digests with one 16-byte load
constexpr int kBlock = 256;
constexpr int kKeysPerBlock = kBlock / kGroup;
constexpr uint8_t kEmptyDigest = 0xFF;
constexpr uint8_t kErasedDigest = 0xFE;

int64_t round_up_buckets(int64_t slots) {
  int64_t buckets = 1;
  while (buckets * kBucketSize < slots) buckets <<= 1;
  return buckets;
}

unsigned blocks_for(int64_t groups) { return static_cast<unsigned>((groups + kKeysPerBlock - 1) / kKeysPerBlock); }

}  // namespace

struct CudaTable::View {
  int64_t* keys;
  uint64_t* scores;
  uint8_t* digests;
  int* locks;
  float* dev_values;
  float* host_values;  // device address of the mapped host rows (slot - hbm_slots)
  int64_t hbm_slots;
  int64_t num_buckets;
  int dim;
  int vd;
  ScorePolicy policy;
  Initializer init;
  uint64_t step;
  uint32_t epoch;
  int64_t* counters;  // [size, evicted, rejected, scratch, reserved keys offered to inserting ops]
};

namespace {

using View = CudaTable::View;
using Tile = cg::thread_block_tile<kGroup>;

__device__ __forceinline__ bool is_reserved(int64_t key) { return key == kEmptyKey || key == kErasedKey; }

struct Probe {
  int64_t base;  // first slot of the bucket
  int64_t bucket;
  int start;
  uint8_t digest;
};

__device__ __forceinline__ Probe probe(const View& t, int64_t key) {
  const uint64_t h = mix64(static_cast<uint64_t>(key));
  const int64_t bucket = static_cast<int64_t>(h & static_cast<uint64_t>(t.num_buckets - 1));
  uint32_t d = static_cast<uint32_t>(h >> 56);
  if (d >= kErasedDigest) d -= 2;  // 0xFE / 0xFF are the free-slot marks
  return Probe{bucket * kBucketSize, bucket, static_cast<int>((h >> 32) & (kBucketSize - 1)), static_cast<uint8_t>(d)};
}

__device__ __forceinline__ float* row_of(const View& t, int64_t slot) {
  return slot < t.hbm_slots ? t.dev_values + slot * t.vd : t.host_values + (slot - t.hbm_slots) * t.vd;
}

// 128-bit masks of a bucket: digest matches and free (never-used or erased) slots; every lane gets all of it.
struct Masks {
  uint32_t match[4];
  uint32_t free[4];
};

// Read through L2: the callers hold the bucket lock and see what earlier holders wrote.
__device__ __forceinline__ Masks bucket_masks(const View& t, const Tile& g, const Probe& pr) {
  const uint4* line = reinterpret_cast<const uint4*>(t.digests + pr.base) + g.thread_rank();
  const uint4 v = __ldcg(line);
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
  uint32_t match = 0, free = 0;
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    const uint32_t b = (words[j >> 2] >> (8 * (j & 3))) & 0xffu;
    match |= uint32_t(b == pr.digest) << j;
    free |= uint32_t(b >= kErasedDigest) << j;
  }
  const uint32_t packed = match | (free << 16);
  Masks m{{0, 0, 0, 0}, {0, 0, 0, 0}};
#pragma unroll
  for (int lane = 0; lane < kGroup; ++lane) {
    const uint32_t p = g.shfl(packed, lane);
    const int shift = (lane & 1) * 16;
    m.match[lane >> 1] |= (p & 0xffffu) << shift;
    m.free[lane >> 1] |= (p >> 16) << shift;
  }
  return m;
}

// The first set bit at or after `start` in the bucket's cyclic probe order, or -1: the CPU table's linear probe.
__device__ __forceinline__ int first_from(const uint32_t mask[4], int start) {
  const int w0 = start >> 5, b0 = start & 31;
  const uint32_t head = mask[w0] & (~0u << b0);
  if (head) return w0 * 32 + __ffs(head) - 1;
#pragma unroll
  for (int k = 1; k < 4; ++k) {
    const int w = (w0 + k) & 3;
    if (mask[w]) return w * 32 + __ffs(mask[w]) - 1;
  }
  const uint32_t tail = b0 ? mask[w0] & ((1u << b0) - 1u) : 0u;
  return tail ? w0 * 32 + __ffs(tail) - 1 : -1;
}

// Slot (within the bucket) holding `key`, or -1, under the bucket lock (reads through L2). Keys are unique per
// bucket, so every digest match is checked.
__device__ __forceinline__ int locate(const View& t, const Masks& m, const Probe& pr, int64_t key) {
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    uint32_t bits = m.match[w];
    while (bits) {
      const int s = w * 32 + __ffs(bits) - 1;
      bits &= bits - 1;
      const int64_t k = __ldcg(t.keys + pr.base + s);
      if (k == key) return s;
    }
  }
  return -1;
}

// Slot (within the bucket) holding `key`, or -1, for operations that do not change digests (lookups, updates of
// present rows). Inserts take the first free slot from the probe start and a slot never returns to "never used"
// (erase leaves a tombstone), so a present key sits before the first never-used slot of its probe path. Digests are
// therefore read one 32-slot sector (32 bytes: one DRAM sector) at a time from the start, stopping at a never-used
// slot: at moderate load most lookups read one sector instead of the bucket's 128 bytes.
__device__ __forceinline__ int find_slot(const View& t, const Tile& g, const Probe& pr, int64_t key) {
  const int lane = g.thread_rank();  // kGroup (8) lanes x 4 digests = one sector
  const int first = pr.start >> 5, head = pr.start & 31;
  for (int k = 0; k <= 4; ++k) {  // the four sectors from the start's, then the start sector's head (wrap-around)
    const int sector = (first + k) & 3;
    const uint32_t word = __ldg(reinterpret_cast<const uint32_t*>(t.digests + pr.base + sector * 32) + lane);
    uint32_t match = 0, never_used = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t b = (word >> (8 * j)) & 0xffu;
      match |= uint32_t(b == pr.digest) << j;
      never_used |= uint32_t(b == kEmptyDigest) << j;
    }
    match <<= 4 * lane;
    never_used <<= 4 * lane;
#pragma unroll
    for (int off = 1; off < kGroup; off <<= 1) {
      match |= g.shfl_xor(match, off);
      never_used |= g.shfl_xor(never_used, off);
    }
    // Bits of this sector on the probe path (in probe order = ascending bits): from the start in the first sector,
    // all of the middle ones, below the start in the wrap-around.
    const uint32_t path = k == 0 ? ~0u << head : (k < 4 ? ~0u : (head ? (1u << head) - 1u : 0u));
    match &= path;
    never_used &= path;
    if (never_used) match &= (never_used & (0u - never_used)) - 1u;  // only slots before the first never-used one
    while (match) {
      const int s = sector * 32 + __ffs(match) - 1;
      match &= match - 1;
      if (t.keys[pr.base + s] == key) return s;
    }
    if (never_used) return -1;
  }
  return -1;
}

__device__ __forceinline__ uint64_t touched_score(const View& t, uint64_t old_score, bool is_new,
                                                  const uint64_t* custom, int64_t i) {
  if (custom != nullptr) return custom[i];
  switch (t.policy) {
    case ScorePolicy::kNone: return 0;
    case ScorePolicy::kLru: return t.step;
    case ScorePolicy::kLfu: return is_new ? 1 : old_score + 1;
    case ScorePolicy::kEpochLru: return (uint64_t(t.epoch) << 32) | (t.step & 0xffffffffULL);
    case ScorePolicy::kEpochLfu: {
      const uint64_t epoch_bits = uint64_t(t.epoch) << 32;
      if (is_new || (old_score & ~0xffffffffULL) != epoch_bits) return epoch_bits | 1;
      const uint64_t count = old_score & 0xffffffffULL;
      return epoch_bits | (count == 0xffffffffULL ? count : count + 1);
    }
    case ScorePolicy::kCustom: return old_score;  // touched without new scores (find): kept
  }
  return 0;
}

__device__ __forceinline__ void lock_bucket(const View& t, const Tile& g, int64_t bucket) {
  if (g.thread_rank() == 0) {
    while (atomicCAS(t.locks + bucket, 0, 1) != 0) __nanosleep(20);
    __threadfence();
  }
  g.sync();
}

__device__ __forceinline__ void unlock_bucket(const View& t, const Tile& g, int64_t bucket) {
  __threadfence();  // every lane's writes are visible before the next holder reads them
  g.sync();
  if (g.thread_rank() == 0) atomicExch(t.locks + bucket, 0);
}

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Copies one row with the group's lanes; kCoherent reads through L2 (rows other groups may have just written).
template <bool kCoherent>
__device__ __forceinline__ void copy_row(const Tile& g, float* dst, const float* src, int vd) {
  if ((vd & 3) == 0 && aligned16(dst) && aligned16(src)) {
    const float4* s4 = reinterpret_cast<const float4*>(src);
    float4* d4 = reinterpret_cast<float4*>(dst);
    for (int c = g.thread_rank(); c < vd / 4; c += kGroup) d4[c] = kCoherent ? __ldcg(s4 + c) : s4[c];
  } else {
    for (int c = g.thread_rank(); c < vd; c += kGroup) dst[c] = kCoherent ? __ldcg(src + c) : src[c];
  }
}

__device__ __forceinline__ void zero_row(const Tile& g, float* dst, int vd) {
  for (int c = g.thread_rank(); c < vd; c += kGroup) dst[c] = 0.f;
}

// The CPU table's initial_row, value for value (table/initializer.h): the first `cols` columns of a new row (the
// embedding, then zero optimizer state). Each value is drawn once and stored to `row` and, when given, the first
// `copy_cols` columns of `copy` (a new slot's row and the caller's output). Lanes take pairs of columns.
__device__ void initial_row(const View& t, const Tile& g, int64_t key, float* row, int cols, float* copy = nullptr,
                            int copy_cols = 0) {
  const int emb = cols < t.dim ? cols : t.dim;
  for (int p = g.thread_rank(); 2 * p < emb; p += kGroup) {
    float x0, x1;
    init::initial_pair(t.init, key, p, x0, x1);
    row[2 * p] = x0;
    if (copy && 2 * p < copy_cols) copy[2 * p] = x0;
    if (2 * p + 1 < emb) {
      row[2 * p + 1] = x1;
      if (copy && 2 * p + 1 < copy_cols) copy[2 * p + 1] = x1;
    }
  }
  for (int c = t.dim + g.thread_rank(); c < cols; c += kGroup) {
    row[c] = 0.f;
    if (copy && c < copy_cols) copy[c] = 0.f;
  }
}

// The lowest-score slot of a full bucket (lowest index among ties, as the CPU table scans), to every lane.
__device__ __forceinline__ void min_score_slot(const View& t, const Tile& g, int64_t base, uint64_t& score, int& slot) {
  const int first = g.thread_rank() * (kBucketSize / kGroup);
  score = ~0ULL;
  slot = first;
  for (int s = first; s < first + kBucketSize / kGroup; ++s) {
    const uint64_t v = __ldcg(t.scores + base + s);
    if (v < score) {
      score = v;
      slot = s;
    }
  }
#pragma unroll
  for (int off = kGroup / 2; off > 0; off /= 2) {
    const uint64_t os = g.shfl_down(score, off);
    const int oi = g.shfl_down(slot, off);
    if (os < score || (os == score && oi < slot)) {
      score = os;
      slot = oi;
    }
  }
  score = g.shfl(score, 0);
  slot = g.shfl(slot, 0);
}

// Per-block tallies (shared memory) go to the table's counters once per block: one global atomic per block.
// counts: [inserted -> size, evicted, rejected, reserved keys].
__device__ __forceinline__ void flush_tally(const View& t, unsigned long long* counts) {
  constexpr int kCounter[4] = {0, 1, 2, 4};
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int c = 0; c < 4; ++c)
      if (counts[c]) atomicAdd(reinterpret_cast<unsigned long long*>(t.counters + kCounter[c]), counts[c]);
  }
}

__device__ __forceinline__ int64_t group_index(const Tile& g) {
  return int64_t(blockIdx.x) * kKeysPerBlock + g.meta_group_rank();
}

// <= 32 registers: eight 256-thread blocks per SM; lookups are bound by memory latency, so occupancy pays.
// kScores: also write each key's score (after the touch; 0 if absent) to scores_out (a separate instantiation, so
// the plain lookup's code is unchanged).
// slots_out (non-null, with values null): each key's slot (-1 if absent) instead of its row: the hybrid find's first
// half (see CudaTable::locate).
template <bool kScores>
__global__ void __launch_bounds__(kBlock, 8) find_kernel(View t, const int64_t* keys, int64_t n, float* values, bool* found, bool touch,
                                                         uint64_t* scores_out, int64_t* slots_out) {
  const Tile g = cg::tiled_partition<kGroup>(cg::this_thread_block());
  const int64_t i = group_index(g);
  if (i >= n) return;
  const int64_t key = keys[i];
  int s = -1;
  Probe pr{};
  if (!is_reserved(key)) {
    pr = probe(t, key);
    s = find_slot(t, g, pr, key);
  }
  if (g.thread_rank() == 0) found[i] = s >= 0;
  if (slots_out && g.thread_rank() == 0) slots_out[i] = s >= 0 ? pr.base + s : -1;
  if (values) {
    if (s >= 0) {
      copy_row<false>(g, values + i * t.vd, row_of(t, pr.base + s), t.vd);
    } else {
      zero_row(g, values + i * t.vd, t.vd);
    }
  }
  if (touch && s >= 0 && g.thread_rank() == 0) {
    auto* addr = reinterpret_cast<unsigned long long*>(t.scores + pr.base + s);
    unsigned long long old = *addr;
    while (true) {
      const unsigned long long next = touched_score(t, old, false, nullptr, i);
      const unsigned long long prev = atomicCAS(addr, old, next);
      if (prev == old) {
        if (kScores) scores_out[i] = next;
        break;
      }
      old = prev;
    }
  } else if (kScores && g.thread_rank() == 0) {
    scores_out[i] = s >= 0 ? t.scores[pr.base + s] : 0;
  }
}

// The hybrid find's second half: rows of slots sorted ascending (absent keys' -1 first), written to their keys'
// positions (order). Walking the host tier in address order is what makes it fast: the GPU's translation of mapped
// host pages misses on nearly every random row once the tier is a few GiB, while sorted rows share pages.
__global__ void __launch_bounds__(kBlock, 8) gather_rows_kernel(View t, const int64_t* sorted_slots, const int64_t* order,
                                                                int64_t n, float* values) {
  const Tile g = cg::tiled_partition<kGroup>(cg::this_thread_block());
  const int64_t j = group_index(g);
  if (j >= n) return;
  const int64_t slot = sorted_slots[j];
  float* dst = values + order[j] * t.vd;
  if (slot >= 0) {
    copy_row<false>(g, dst, row_of(t, slot), t.vd);
  } else {
    zero_row(g, dst, t.vd);
  }
}

enum class Upsert { kFindOrInsert, kInsertOrAssign, kInsertEvicting };

// Where kInsertEvicting reports the slots it took from other keys: per key i, the evicted key (kEmptyKey if none)
// and, for evicting keys, that key's row and score.
struct Evicted {
  int64_t* keys;
  float* values;     // [n, vd] or null
  uint64_t* scores;  // [n] or null
};

// One key of an inserting operation, by the group's lanes: under the bucket lock, find it (touching its score) or
// place it (free slot, eviction or rejection); find_or_insert writes the first `out_cols` columns of its row to `out`
// (the whole row, value_dim, or only the embedding, dim), insert_or_assign copies `in` into its slot. Tallies go to
// `counts` ([inserted, evicted, rejected, reserved]).
template <Upsert kMode>
__device__ __forceinline__ void upsert_key(const View& t, const Tile& g, int64_t i, int64_t key, float* out,
                                           int out_cols, const float* in, int8_t* status, const uint64_t* scores,
                                           unsigned long long* counts, const Evicted& ev = Evicted{}) {
  constexpr bool kEvicting = kMode == Upsert::kInsertEvicting;
  if (is_reserved(key)) {  // never stored: rejected and counted, the Python layer raises
    if (kMode == Upsert::kFindOrInsert) initial_row(t, g, key, out, out_cols);
    if (g.thread_rank() == 0) {
      if (kEvicting) ev.keys[i] = kEmptyKey;
      status[i] = static_cast<int8_t>(InsertStatus::kRejected);
      atomicAdd(counts + 3, 1ULL);
    }
    return;
  }
  const Probe pr = probe(t, key);
  lock_bucket(t, g, pr.bucket);
  const Masks m = bucket_masks(t, g, pr);
  int s = locate(t, m, pr, key);
  InsertStatus st = InsertStatus::kFound;
  if (s >= 0) {
    if (g.thread_rank() == 0) {
      uint64_t* addr = t.scores + pr.base + s;
      *addr = touched_score(t, __ldcg(addr), false, scores, i);
    }
  } else {
    const uint64_t score = touched_score(t, 0, true, scores, i);
    s = first_from(m.free, pr.start);
    if (s >= 0) {
      st = InsertStatus::kInserted;
    } else if (t.policy != ScorePolicy::kNone) {
      uint64_t low;
      int victim;
      min_score_slot(t, g, pr.base, low, victim);
      if (score > low) {
        s = victim;
        st = InsertStatus::kEvicted;
        if (kEvicting) {  // hand out the victim (key, score, row) before the newcomer replaces it
          if (g.thread_rank() == 0) {
            ev.keys[i] = __ldcg(t.keys + pr.base + s);
            if (ev.scores) ev.scores[i] = low;
          }
          if (ev.values) copy_row<true>(g, ev.values + i * t.vd, row_of(t, pr.base + s), t.vd);
          g.sync();  // every lane has read the old row before any lane writes the new one below
        }
      } else {
        st = InsertStatus::kRejected;
      }
    } else {
      st = InsertStatus::kRejected;
    }
    if (s >= 0 && g.thread_rank() == 0) {
      t.keys[pr.base + s] = key;
      t.scores[pr.base + s] = score;
      t.digests[pr.base + s] = pr.digest;
    }
  }
  if (kMode == Upsert::kFindOrInsert) {
    if (st == InsertStatus::kFound) {
      copy_row<true>(g, out, row_of(t, pr.base + s), out_cols);
    } else if (s >= 0) {
      initial_row(t, g, key, row_of(t, pr.base + s), t.vd, out, out_cols);
    } else {
      initial_row(t, g, key, out, out_cols);  // rejected: the initializer's row, no slot
    }
  } else if (s >= 0) {
    copy_row<false>(g, row_of(t, pr.base + s), in, t.vd);
  }
  unlock_bucket(t, g, pr.bucket);
  if (g.thread_rank() == 0) {
    if (kEvicting && st != InsertStatus::kEvicted) ev.keys[i] = kEmptyKey;
    status[i] = static_cast<int8_t>(st);
    if (st == InsertStatus::kInserted) atomicAdd(counts + 0, 1ULL);
    if (st == InsertStatus::kEvicted) atomicAdd(counts + 1, 1ULL);
    if (st == InsertStatus::kRejected) atomicAdd(counts + 2, 1ULL);
  }
}

// <= 32 registers (eight blocks per SM, was six): the inserting ops wait on bucket locks and random rows, so
// occupancy pays more than the 16 bytes ptxas spills for one variant.
template <Upsert kMode>
__global__ void __launch_bounds__(kBlock, 8) upsert_kernel(View t, const int64_t* keys, int64_t n, float* out_values, int out_cols,
                              const float* in_values, int8_t* status, const uint64_t* scores, Evicted ev) {
  __shared__ unsigned long long counts[4];
  if (threadIdx.x < 4) counts[threadIdx.x] = 0;
  __syncthreads();
  const Tile g = cg::tiled_partition<kGroup>(cg::this_thread_block());
  const int64_t i = group_index(g);
  if (i < n) {
    upsert_key<kMode>(t, g, i, keys[i], kMode == Upsert::kFindOrInsert ? out_values + i * out_cols : nullptr,
                      out_cols, kMode != Upsert::kFindOrInsert ? in_values + i * t.vd : nullptr, status, scores,
                      counts, ev);
  }
  flush_tally(t, counts);
}

// A group of tables in one launch (the training lookup of a collection): table k's keys are
// keys[bounds[k], bounds[k + 1]). Passed by value as a __grid_constant__ parameter (read in place, never copied).
struct GroupArgs {
  int n;
  int64_t bounds[kMaxGroupTables + 1];
  View tables[kMaxGroupTables];
  OptimizerStep steps[kMaxGroupTables];
};
static_assert(sizeof(GroupArgs) <= 4000, "a kernel's parameters must fit in 4 KiB");

__device__ __forceinline__ int table_of(const GroupArgs& ga, int64_t i) {
  int k = 0;
  while (k + 1 < ga.n && i >= ga.bounds[k + 1]) ++k;
  return k;
}

// find_or_insert_embeddings of every table of the group: embeddings to out ([total, dim]).
__global__ void __launch_bounds__(kBlock, 8) group_find_or_insert_kernel(const __grid_constant__ GroupArgs ga,
                                                                         const int64_t* keys, float* out,
                                                                         int8_t* status) {
  __shared__ unsigned long long counts[kMaxGroupTables][4];
  for (int c = threadIdx.x; c < kMaxGroupTables * 4; c += blockDim.x) counts[c / 4][c % 4] = 0;
  __syncthreads();
  const Tile g = cg::tiled_partition<kGroup>(cg::this_thread_block());
  const int64_t i = group_index(g);
  if (i < ga.bounds[ga.n]) {
    const int k = table_of(ga, i);
    const View& t = ga.tables[k];
    upsert_key<Upsert::kFindOrInsert>(t, g, i, keys[i], out + i * t.dim, t.dim, nullptr, status, nullptr,
                                      counts[k]);
  }
  __syncthreads();
  for (int k = 0; k < ga.n; ++k) flush_tally(ga.tables[k], counts[k]);
}

// assign (overwrite present rows; no lock, like the CPU table) and accumulate (bucket lock: duplicates add up).
template <bool kAccumulate>
__global__ void update_kernel(View t, const int64_t* keys, int64_t n, const float* rows, bool* found) {
  const Tile g = cg::tiled_partition<kGroup>(cg::this_thread_block());
  const int64_t i = group_index(g);
  if (i >= n) return;
  const int64_t key = keys[i];
  if (is_reserved(key)) {
    if (found && g.thread_rank() == 0) found[i] = false;
    return;
  }
  const Probe pr = probe(t, key);
  if (kAccumulate) lock_bucket(t, g, pr.bucket);  // only duplicates of one key contend: digests do not change here
  const int s = find_slot(t, g, pr, key);
  if (s >= 0) {
    float* row = row_of(t, pr.base + s);
    const float* src = rows + i * t.vd;
    if (kAccumulate) {
      for (int c = g.thread_rank(); c < t.vd; c += kGroup) row[c] = __fadd_rn(__ldcg(row + c), src[c]);
    } else {
      copy_row<false>(g, row, src, t.vd);
    }
  }
  if (kAccumulate) unlock_bucket(t, g, pr.bucket);
  if (found && g.thread_rank() == 0) found[i] = s >= 0;
}

// The optimizer on one row with the group's lanes: [w | state] and the gradient in registers, each element as
// optimizer_element (so every element gets the CPU table's arithmetic). Lanes take 16-byte chunks of four columns
// when the layout allows (four times fewer, wider memory operations: this kernel is bound by memory latency), else
// single columns.
__device__ __forceinline__ void optimizer_row_lanes(const Tile& g, const OptimizerStep& o, float* row,
                                                    const float* grad, int dim, int vd, float row_s) {
  const bool has1 = state1_offset(o, dim, 0) >= 0, has2 = state2_offset(o, dim, 0) >= 0;
  if ((dim & 3) == 0 && (vd & 3) == 0 && aligned16(row) && aligned16(grad)) {
#pragma unroll 4
    for (int q = g.thread_rank(); q < dim / 4; q += kGroup) {
      const int d = 4 * q;
      float4 w = __ldcg(reinterpret_cast<const float4*>(row + d));
      float4 s1 = has1 ? __ldcg(reinterpret_cast<const float4*>(row + dim + d)) : float4{0.f, 0.f, 0.f, 0.f};
      float4 s2 = has2 ? __ldcg(reinterpret_cast<const float4*>(row + 2 * dim + d)) : float4{0.f, 0.f, 0.f, 0.f};
      const float4 gv = *reinterpret_cast<const float4*>(grad + d);
      optimizer_element(o, gv.x, w.x, s1.x, s2.x, row_s);
      optimizer_element(o, gv.y, w.y, s1.y, s2.y, row_s);
      optimizer_element(o, gv.z, w.z, s1.z, s2.z, row_s);
      optimizer_element(o, gv.w, w.w, s1.w, s2.w, row_s);
      *reinterpret_cast<float4*>(row + d) = w;
      if (has1) *reinterpret_cast<float4*>(row + dim + d) = s1;
      if (has2) *reinterpret_cast<float4*>(row + 2 * dim + d) = s2;
    }
    return;
  }
  for (int d = g.thread_rank(); d < dim; d += kGroup) {
    const int o1 = state1_offset(o, dim, d), o2 = state2_offset(o, dim, d);
    float w = __ldcg(row + d);
    float s1 = o1 >= 0 ? __ldcg(row + o1) : 0.f, s2 = o2 >= 0 ? __ldcg(row + o2) : 0.f;
    optimizer_element(o, grad[d], w, s1, s2, row_s);
    row[d] = w;
    if (o1 >= 0) row[o1] = s1;
    if (o2 >= 0) row[o2] = s2;
  }
}

// A group per key: the bucket lock (duplicates apply one after another; kLocked false: the caller guarantees
// distinct keys, so no two groups share a row and nothing else changes the table during the kernel), the slot,
// then the row update. Row-wise Adagrad first reduces sum(g^2) over the group.
template <bool kLocked>
__device__ __forceinline__ void optimize_key(const View& t, const Tile& g, int64_t i, int64_t key, const float* grad,
                                             const OptimizerStep& o, bool* found) {
  if (is_reserved(key)) {
    if (g.thread_rank() == 0) found[i] = false;
    return;
  }
  const Probe pr = probe(t, key);
  if (kLocked) lock_bucket(t, g, pr.bucket);
  const int s = find_slot(t, g, pr, key);
  if (s >= 0) {
    float* row = row_of(t, pr.base + s);
    float row_s = 0.f;
    if (o.kind == OptimizerKind::kRowwiseAdagrad) {
      static_assert(kGroup == kRowwiseLanes, "the CPU table reproduces this reduction order (optimizer.h)");
      float sum = 0.f;
      for (int d = g.thread_rank(); d < t.dim; d += kGroup) sum = exact::add(sum, exact::mul(grad[d], grad[d]));
#pragma unroll
      for (int off = 1; off < kGroup; off <<= 1) sum = exact::add(sum, g.shfl_xor(sum, off));
      row_s = exact::add(__ldcg(row + t.dim), exact::div(sum, float(t.dim)));
      g.sync();  // every lane has read the old accumulator before lane 0 replaces it
      if (g.thread_rank() == 0) row[t.dim] = row_s;
    }
    optimizer_row_lanes(g, o, row, grad, t.dim, t.vd, row_s);
  }
  if (kLocked) unlock_bucket(t, g, pr.bucket);
  if (g.thread_rank() == 0) found[i] = s >= 0;
}

template <bool kLocked>
__global__ void optimizer_kernel(View t, const int64_t* keys, int64_t n, const float* grads, OptimizerStep o,
                                 bool* found) {
  const Tile g = cg::tiled_partition<kGroup>(cg::this_thread_block());
  const int64_t i = group_index(g);
  if (i < n) optimize_key<kLocked>(t, g, i, keys[i], grads + i * t.dim, o, found);
}

// apply_optimizer of every table of the group, each with its own step (grads: [total, dim]).
template <bool kLocked>
__global__ void group_optimizer_kernel(const __grid_constant__ GroupArgs ga, const int64_t* keys, const float* grads,
                                       bool* found) {
  const Tile g = cg::tiled_partition<kGroup>(cg::this_thread_block());
  const int64_t i = group_index(g);
  if (i >= ga.bounds[ga.n]) return;
  const int k = table_of(ga, i);
  const View& t = ga.tables[k];
  optimize_key<kLocked>(t, g, i, keys[i], grads + i * t.dim, ga.steps[k], found);
}

__global__ void erase_kernel(View t, const int64_t* keys, int64_t n) {
  __shared__ unsigned long long counts[4];
  if (threadIdx.x < 4) counts[threadIdx.x] = 0;
  __syncthreads();
  const Tile g = cg::tiled_partition<kGroup>(cg::this_thread_block());
  const int64_t i = group_index(g);
  if (i < n && !is_reserved(keys[i])) {
    const int64_t key = keys[i];
    const Probe pr = probe(t, key);
    lock_bucket(t, g, pr.bucket);  // a duplicate in the batch must not erase (and count) the slot twice
    const Masks m = bucket_masks(t, g, pr);
    const int s = locate(t, m, pr, key);
    if (s >= 0 && g.thread_rank() == 0) {
      t.keys[pr.base + s] = kErasedKey;
      t.scores[pr.base + s] = 0;
      t.digests[pr.base + s] = kErasedDigest;
      atomicAdd(counts + 3, 1ULL);
    }
    unlock_bucket(t, g, pr.bucket);
  }
  __syncthreads();
  if (threadIdx.x == 0 && counts[3]) {
    atomicAdd(reinterpret_cast<unsigned long long*>(t.counters + 0), (unsigned long long)(-int64_t(counts[3])));
    atomicAdd(reinterpret_cast<unsigned long long*>(t.counters + 3), counts[3]);
  }
}

// One thread per slot: erase (kErase) or count the occupied slots with score below / at least the threshold.
template <bool kErase>
__global__ void scan_scores_kernel(View t, int64_t capacity, uint64_t threshold) {
  __shared__ unsigned long long count;
  if (threadIdx.x == 0) count = 0;
  __syncthreads();
  const int64_t s = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s < capacity && t.digests[s] < kErasedDigest) {
    const uint64_t score = t.scores[s];
    if (kErase && score < threshold) {
      t.keys[s] = kErasedKey;
      t.scores[s] = 0;
      t.digests[s] = kErasedDigest;
      atomicAdd(&count, 1ULL);
    } else if (!kErase && score >= threshold) {
      atomicAdd(&count, 1ULL);
    }
  }
  __syncthreads();
  if (threadIdx.x == 0 && count) {
    if (kErase) atomicAdd(reinterpret_cast<unsigned long long*>(t.counters + 0), (unsigned long long)(-int64_t(count)));
    atomicAdd(reinterpret_cast<unsigned long long*>(t.counters + 3), count);
  }
}

__device__ __forceinline__ bool exported(const View& t, int64_t s, uint64_t threshold) {
  return t.digests[s] < kErasedDigest && t.scores[s] >= threshold;
}

// Export in slot order: a warp per bucket counts (pass 1), an exclusive scan gives offsets, a warp per bucket writes
// (pass 2) with every lane copying the rows.
__global__ void bucket_count_kernel(View t, uint64_t threshold, int64_t* counts) {
  const int64_t bucket = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (bucket >= t.num_buckets) return;
  int total = 0;
  for (int r = 0; r < kBucketSize / 32; ++r) {
    total += __popc(__ballot_sync(0xffffffffu, exported(t, bucket * kBucketSize + r * 32 + lane, threshold)));
  }
  if (lane == 0) counts[bucket] = total;
}

__global__ void export_kernel(View t, uint64_t threshold, const int64_t* offsets, int64_t* keys, float* values,
                              uint64_t* scores, int64_t max_n) {
  const int64_t bucket = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (bucket >= t.num_buckets) return;
  int64_t pos = offsets[bucket];
  for (int r = 0; r < kBucketSize / 32; ++r) {
    const int64_t s = bucket * kBucketSize + r * 32 + lane;
    const bool take = exported(t, s, threshold);
    const uint32_t mask = __ballot_sync(0xffffffffu, take);
    const int64_t mine = pos + __popc(mask & ((1u << lane) - 1u));
    if (take && mine < max_n) {
      keys[mine] = t.keys[s];
      if (scores) scores[mine] = t.scores[s];
    }
    if (values) {
      for (uint32_t bits = mask; bits; bits &= bits - 1) {
        const int l = __ffs(bits) - 1;
        const int64_t out = pos + __popc(mask & ((1u << l) - 1u));
        if (out >= max_n) break;
        const float* src = row_of(t, bucket * kBucketSize + r * 32 + l);
        for (int c = lane; c < t.vd; c += 32) values[out * t.vd + c] = src[c];
      }
    }
    pos += __popc(mask);
  }
}

// Growth: a group per old slot re-inserts its key (score kept) into the new arrays and moves its row.
__global__ void rehash_kernel(View from, int64_t old_capacity, View to) {
  __shared__ unsigned long long counts[4];
  if (threadIdx.x < 4) counts[threadIdx.x] = 0;
  __syncthreads();
  const Tile g = cg::tiled_partition<kGroup>(cg::this_thread_block());
  const int64_t old_slot = group_index(g);
  if (old_slot < old_capacity && !is_reserved(from.keys[old_slot])) {
    const int64_t key = from.keys[old_slot];
    const Probe pr = probe(to, key);
    lock_bucket(to, g, pr.bucket);
    const Masks m = bucket_masks(to, g, pr);
    const int s = first_from(m.free, pr.start);  // doubling splits every bucket: there is always room
    if (s >= 0) {
      if (g.thread_rank() == 0) {
        to.keys[pr.base + s] = key;
        to.scores[pr.base + s] = from.scores[old_slot];
        to.digests[pr.base + s] = pr.digest;
        atomicAdd(counts + 0, 1ULL);
      }
      copy_row<false>(g, row_of(to, pr.base + s), row_of(from, old_slot), to.vd);
    }
    unlock_bucket(to, g, pr.bucket);
  }
  flush_tally(to, counts);
}

__global__ void fill_keys_kernel(int64_t* keys, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) keys[i] = kEmptyKey;
}

__global__ void initial_rows_kernel(View t, const int64_t* keys, int64_t n, float* rows) {
  const Tile g = cg::tiled_partition<kGroup>(cg::this_thread_block());
  const int64_t i = group_index(g);
  if (i < n) initial_row(t, g, keys[i], rows + i * t.vd, t.vd);
}

unsigned slot_blocks(int64_t slots) { return static_cast<unsigned>((slots + kBlock - 1) / kBlock); }

}  // namespace

// ---------------------------------------------------------------------------------------------------- host side

CudaTable::CudaTable(const CudaTableOptions& options) : options_(options) {
  options_.validate();
  DeviceGuard guard(options_.device);
  check(cudaMalloc(&counters_, 5 * sizeof(int64_t)), "cudaMalloc counters");
  check(cudaMemset(counters_, 0, 5 * sizeof(int64_t)), "cudaMemset counters");
  allocate(round_up_buckets(options_.capacity) * kBucketSize);
  check(cudaDeviceSynchronize(), "table initialisation");
}

CudaTable::~CudaTable() {
  try {
    DeviceGuard guard(options_.device);
    release();
    cudaFree(counters_);
  } catch (...) {  // a destructor must not throw; the driver frees everything at exit anyway
  }
}

CudaTable::View CudaTable::view() const {
  return View{keys_,          scores_,       digests_,         locks_, dev_values_, host_values_dev_,
              hbm_slots_,     num_buckets_,  options_.dim,     options_.value_dim,   options_.policy,
              options_.init,  step_,         epoch_,           counters_};
}

void CudaTable::allocate(int64_t capacity) {
  capacity_ = capacity;
  num_buckets_ = capacity / kBucketSize;
  const int64_t row_bytes = int64_t(options_.value_dim) * sizeof(float);
  hbm_slots_ = capacity;
  if (options_.hbm_budget_bytes >= 0)
    hbm_slots_ = std::min(capacity, options_.hbm_budget_bytes / row_bytes / kBucketSize * kBucketSize);
  keys_ = nullptr, scores_ = nullptr, digests_ = nullptr, locks_ = nullptr;
  dev_values_ = host_values_ = host_values_dev_ = nullptr;
  check(cudaMalloc(&keys_, capacity * sizeof(int64_t)), "cudaMalloc keys");
  check(cudaMalloc(&scores_, capacity * sizeof(uint64_t)), "cudaMalloc scores");
  check(cudaMalloc(&digests_, capacity), "cudaMalloc digests");
  check(cudaMalloc(&locks_, num_buckets_ * sizeof(int)), "cudaMalloc locks");
  if (hbm_slots_ > 0) check(cudaMalloc(&dev_values_, hbm_slots_ * row_bytes), "cudaMalloc values (HBM)");
  if (capacity > hbm_slots_) {
    check(cudaHostAlloc(reinterpret_cast<void**>(&host_values_), (capacity - hbm_slots_) * row_bytes,
                        cudaHostAllocMapped | cudaHostAllocPortable),
          "cudaHostAlloc values (host tier)");
    check(cudaHostGetDevicePointer(reinterpret_cast<void**>(&host_values_dev_), host_values_, 0),
          "cudaHostGetDevicePointer");
  }
  fill_keys_kernel<<<slot_blocks(capacity), kBlock>>>(keys_, capacity);
  check(cudaGetLastError(), "fill keys");
  check(cudaMemset(scores_, 0, capacity * sizeof(uint64_t)), "cudaMemset scores");
  check(cudaMemset(digests_, kEmptyDigest, capacity), "cudaMemset digests");
  check(cudaMemset(locks_, 0, num_buckets_ * sizeof(int)), "cudaMemset locks");
}

void CudaTable::release() {
  cudaFree(keys_);
  cudaFree(scores_);
  cudaFree(digests_);
  cudaFree(locks_);
  if (dev_values_) cudaFree(dev_values_);
  if (host_values_) cudaFreeHost(host_values_);
  keys_ = nullptr, scores_ = nullptr, digests_ = nullptr, locks_ = nullptr;
  dev_values_ = host_values_ = host_values_dev_ = nullptr;
}

int64_t CudaTable::read_counter(int index, uintptr_t stream) {
  DeviceGuard guard(options_.device);
  int64_t value = 0;
  check(cudaMemcpyAsync(&value, counters_ + index, sizeof(int64_t), cudaMemcpyDeviceToHost, as_stream(stream)),
        "read counter");
  check(cudaStreamSynchronize(as_stream(stream)), "stream synchronize");
  return value;
}

int64_t CudaTable::size(uintptr_t stream) { return read_counter(0, stream); }
int64_t CudaTable::take_reserved_count(uintptr_t stream) {
  const int64_t count = read_counter(4, stream);
  if (count) check(cudaMemsetAsync(counters_ + 4, 0, sizeof(int64_t), as_stream(stream)), "reset counter");
  return count;
}
int64_t CudaTable::evicted_count(uintptr_t stream) { return read_counter(1, stream); }
int64_t CudaTable::rejected_count(uintptr_t stream) { return read_counter(2, stream); }

// find and locate: rows (values) or slots, with or without the scores (the instantiation without keeps the plain
// lookup's code).
static void launch_find(const View& t, const int64_t* keys, int64_t n, float* values, int64_t* slots, bool* found,
                        bool update_score, uint64_t* scores_out, cudaStream_t stream) {
  if (scores_out) {
    find_kernel<true><<<blocks_for(n), kBlock, 0, stream>>>(t, keys, n, values, found, update_score, scores_out, slots);
  } else {
    find_kernel<false><<<blocks_for(n), kBlock, 0, stream>>>(t, keys, n, values, found, update_score, nullptr, slots);
  }
}

void CudaTable::find(const int64_t* keys, int64_t n, float* values, bool* found, bool update_score, uintptr_t stream,
                     uint64_t* scores_out) {
  if (n <= 0) return;
  DeviceGuard guard(options_.device);
  launch_find(view(), keys, n, values, nullptr, found, update_score, scores_out, as_stream(stream));
  check(cudaGetLastError(), "find");
}

void CudaTable::locate(const int64_t* keys, int64_t n, int64_t* slots, bool* found, bool update_score,
                       uintptr_t stream, uint64_t* scores_out) {
  if (n <= 0) return;
  DeviceGuard guard(options_.device);
  launch_find(view(), keys, n, nullptr, slots, found, update_score, scores_out, as_stream(stream));
  check(cudaGetLastError(), "locate");
}

void CudaTable::gather_rows(const int64_t* sorted_slots, const int64_t* order, int64_t n, float* values,
                            uintptr_t stream) {
  if (n <= 0) return;
  DeviceGuard guard(options_.device);
  gather_rows_kernel<<<blocks_for(n), kBlock, 0, as_stream(stream)>>>(view(), sorted_slots, order, n, values);
  check(cudaGetLastError(), "gather_rows");
}

void CudaTable::grow_for(int64_t incoming, uintptr_t stream) {
  const int64_t max_slots = round_up_buckets(options_.max_capacity) * kBucketSize;
  if (capacity_ >= max_slots) return;
  const double limit = options_.max_load_factor;
  if (double(size_bound_ + incoming) > limit * double(capacity_)) {
    size_bound_ = size(stream);  // the bound says growth may be due: look at the true size
    int64_t target = capacity_;
    while (double(size_bound_ + incoming) > limit * double(target) && target < options_.max_capacity) target *= 2;
    target = std::min(target, max_slots);
    if (target > capacity_) rehash(target, stream);
  }
  size_bound_ += incoming;
}

void CudaTable::find_or_insert(const int64_t* keys, int64_t n, float* values, int8_t* status, const uint64_t* scores,
                               uintptr_t stream) {
  upsert_rows(keys, n, values, options_.value_dim, status, scores, stream);
}

void CudaTable::find_or_insert_embeddings(const int64_t* keys, int64_t n, float* embeddings, int8_t* status,
                                          const uint64_t* scores, uintptr_t stream) {
  upsert_rows(keys, n, embeddings, options_.dim, status, scores, stream);
}

void CudaTable::upsert_rows(const int64_t* keys, int64_t n, float* out, int out_cols, int8_t* status,
                            const uint64_t* scores, uintptr_t stream) {
  if (n <= 0) return;
  DeviceGuard guard(options_.device);
  grow_for(n, stream);
  upsert_kernel<Upsert::kFindOrInsert>
      <<<blocks_for(n), kBlock, 0, as_stream(stream)>>>(view(), keys, n, out, out_cols, nullptr, status, scores,
                                                        Evicted{});
  check(cudaGetLastError(), "find_or_insert");
}

int CudaTable::check_group(const std::vector<CudaTable*>& tables, const std::vector<int64_t>& bounds) {
  check_group_bounds(tables.size(), bounds.data(), bounds.size());
  for (const CudaTable* t : tables) {
    if (t == nullptr) throw std::invalid_argument("a group's table is missing");
    if (t->options_.device != tables[0]->options_.device)
      throw std::invalid_argument("a group's tables must live on one device");
    if (t->options_.dim != tables[0]->options_.dim) throw std::invalid_argument("a group's tables must share dim");
  }
  return tables[0]->options_.device;
}

void CudaTable::find_or_insert_embeddings_group(const std::vector<CudaTable*>& tables,
                                                const std::vector<int64_t>& bounds, const int64_t* keys,
                                                float* embeddings, int8_t* status, uintptr_t stream) {
  DeviceGuard guard(check_group(tables, bounds));
  GroupArgs ga{};
  ga.n = static_cast<int>(tables.size());
  for (int k = 0; k < ga.n; ++k) {
    const int64_t n = bounds[k + 1] - bounds[k];
    if (n > 0) tables[k]->grow_for(n, stream);  // as find_or_insert_embeddings: growth first, then the views
    ga.tables[k] = tables[k]->view();
    ga.bounds[k] = bounds[k];
  }
  ga.bounds[ga.n] = bounds[ga.n];
  if (ga.bounds[ga.n] <= 0) return;
  group_find_or_insert_kernel<<<blocks_for(ga.bounds[ga.n]), kBlock, 0, as_stream(stream)>>>(ga, keys, embeddings,
                                                                                              status);
  check(cudaGetLastError(), "find_or_insert_embeddings_group");
}

void CudaTable::apply_optimizer_group(const std::vector<CudaTable*>& tables, const std::vector<int64_t>& bounds,
                                      const std::vector<OptimizerStep>& steps, const int64_t* keys,
                                      const float* grads, bool* found, bool distinct, uintptr_t stream) {
  DeviceGuard guard(check_group(tables, bounds));
  if (steps.size() != tables.size()) throw std::invalid_argument("a group needs one optimizer step per table");
  GroupArgs ga{};
  ga.n = static_cast<int>(tables.size());
  for (int k = 0; k < ga.n; ++k) {
    steps[k].check_fits(tables[k]->options_.dim, tables[k]->options_.value_dim);
    ga.tables[k] = tables[k]->view();
    ga.steps[k] = steps[k];
    ga.bounds[k] = bounds[k];
  }
  ga.bounds[ga.n] = bounds[ga.n];
  if (ga.bounds[ga.n] <= 0) return;
  const unsigned blocks = blocks_for(ga.bounds[ga.n]);
  if (distinct) {
    group_optimizer_kernel<false><<<blocks, kBlock, 0, as_stream(stream)>>>(ga, keys, grads, found);
  } else {
    group_optimizer_kernel<true><<<blocks, kBlock, 0, as_stream(stream)>>>(ga, keys, grads, found);
  }
  check(cudaGetLastError(), "apply_optimizer_group");
}

void CudaTable::insert_or_assign(const int64_t* keys, int64_t n, const float* values, int8_t* status,
                                 const uint64_t* scores, uintptr_t stream) {
  if (n <= 0) return;
  DeviceGuard guard(options_.device);
  grow_for(n, stream);
  upsert_kernel<Upsert::kInsertOrAssign>
      <<<blocks_for(n), kBlock, 0, as_stream(stream)>>>(view(), keys, n, nullptr, 0, values, status, scores,
                                                        Evicted{});
  check(cudaGetLastError(), "insert_or_assign");
}

void CudaTable::insert_or_assign_evicting(const int64_t* keys, int64_t n, const float* values, int8_t* status,
                                          const uint64_t* scores, int64_t* evicted_keys, float* evicted_values,
                                          uint64_t* evicted_scores, uintptr_t stream) {
  if (n <= 0) return;
  if (evicted_keys == nullptr) throw std::invalid_argument("insert_or_assign_evicting needs evicted_keys");
  DeviceGuard guard(options_.device);
  grow_for(n, stream);
  upsert_kernel<Upsert::kInsertEvicting><<<blocks_for(n), kBlock, 0, as_stream(stream)>>>(
      view(), keys, n, nullptr, 0, values, status, scores, Evicted{evicted_keys, evicted_values, evicted_scores});
  check(cudaGetLastError(), "insert_or_assign_evicting");
}

void CudaTable::assign(const int64_t* keys, int64_t n, const float* values, bool* found, uintptr_t stream) {
  if (n <= 0) return;
  DeviceGuard guard(options_.device);
  update_kernel<false><<<blocks_for(n), kBlock, 0, as_stream(stream)>>>(view(), keys, n, values, found);
  check(cudaGetLastError(), "assign");
}

void CudaTable::apply_optimizer(const int64_t* keys, int64_t n, const float* grads, const OptimizerStep& step,
                                bool* found, bool distinct, uintptr_t stream) {
  step.check_fits(options_.dim, options_.value_dim);
  if (n <= 0) return;
  DeviceGuard guard(options_.device);
  if (distinct) {
    optimizer_kernel<false><<<blocks_for(n), kBlock, 0, as_stream(stream)>>>(view(), keys, n, grads, step, found);
  } else {
    optimizer_kernel<true><<<blocks_for(n), kBlock, 0, as_stream(stream)>>>(view(), keys, n, grads, step, found);
  }
  check(cudaGetLastError(), "apply_optimizer");
}

void CudaTable::accumulate(const int64_t* keys, int64_t n, const float* delta, bool* found, uintptr_t stream) {
  if (n <= 0) return;
  DeviceGuard guard(options_.device);
  update_kernel<true><<<blocks_for(n), kBlock, 0, as_stream(stream)>>>(view(), keys, n, delta, found);
  check(cudaGetLastError(), "accumulate");
}

int64_t CudaTable::erase(const int64_t* keys, int64_t n, uintptr_t stream) {
  if (n <= 0) return 0;
  DeviceGuard guard(options_.device);
  check(cudaMemsetAsync(counters_ + 3, 0, sizeof(int64_t), as_stream(stream)), "reset counter");
  erase_kernel<<<blocks_for(n), kBlock, 0, as_stream(stream)>>>(view(), keys, n);
  check(cudaGetLastError(), "erase");
  return read_counter(3, stream);
}

int64_t CudaTable::erase_if_score_below(uint64_t threshold, uintptr_t stream) {
  DeviceGuard guard(options_.device);
  check(cudaMemsetAsync(counters_ + 3, 0, sizeof(int64_t), as_stream(stream)), "reset counter");
  scan_scores_kernel<true><<<slot_blocks(capacity_), kBlock, 0, as_stream(stream)>>>(view(), capacity_, threshold);
  check(cudaGetLastError(), "erase_if");
  return read_counter(3, stream);
}

int64_t CudaTable::count_if_score_at_least(uint64_t threshold, uintptr_t stream) {
  DeviceGuard guard(options_.device);
  check(cudaMemsetAsync(counters_ + 3, 0, sizeof(int64_t), as_stream(stream)), "reset counter");
  scan_scores_kernel<false><<<slot_blocks(capacity_), kBlock, 0, as_stream(stream)>>>(view(), capacity_, threshold);
  check(cudaGetLastError(), "count_if");
  return read_counter(3, stream);
}

int64_t CudaTable::export_if_score_at_least(uint64_t threshold, int64_t* keys, float* values, uint64_t* scores,
                                            int64_t max_n, uintptr_t stream) {
  DeviceGuard guard(options_.device);
  cudaStream_t s = as_stream(stream);
  int64_t* counts = nullptr;
  int64_t* offsets = nullptr;
  void* temp = nullptr;
  size_t temp_bytes = 0;
  const unsigned warp_blocks = static_cast<unsigned>((num_buckets_ * 32 + kBlock - 1) / kBlock);
  int64_t total = 0;
  try {
    check(cudaMallocAsync(&counts, (num_buckets_ + 1) * sizeof(int64_t), s), "cudaMallocAsync export counts");
    check(cudaMallocAsync(&offsets, (num_buckets_ + 1) * sizeof(int64_t), s), "cudaMallocAsync export offsets");
    check(cudaMemsetAsync(counts + num_buckets_, 0, sizeof(int64_t), s), "cudaMemsetAsync");
    bucket_count_kernel<<<warp_blocks, kBlock, 0, s>>>(view(), threshold, counts);
    check(cudaGetLastError(), "export count");
    check(cub::DeviceScan::ExclusiveSum(nullptr, temp_bytes, counts, offsets, num_buckets_ + 1, s), "scan size");
    check(cudaMallocAsync(&temp, temp_bytes, s), "cudaMallocAsync scan");
    check(cub::DeviceScan::ExclusiveSum(temp, temp_bytes, counts, offsets, num_buckets_ + 1, s), "scan");
    export_kernel<<<warp_blocks, kBlock, 0, s>>>(view(), threshold, offsets, keys, values, scores, max_n);
    check(cudaGetLastError(), "export");
    check(cudaMemcpyAsync(&total, offsets + num_buckets_, sizeof(int64_t), cudaMemcpyDeviceToHost, s), "total");
    check(cudaFreeAsync(temp, s), "free");
    check(cudaFreeAsync(offsets, s), "free");
    check(cudaFreeAsync(counts, s), "free");
    check(cudaStreamSynchronize(s), "export synchronize");
  } catch (...) {
    cudaStreamSynchronize(s);
    throw;
  }
  return std::min(total, max_n);
}

void CudaTable::rehash(int64_t new_capacity, uintptr_t stream) {
  cudaStream_t s = as_stream(stream);
  check(cudaStreamSynchronize(s), "synchronize before growth");
  const View old = view();
  const int64_t old_capacity = capacity_;
  float* old_host = host_values_;
  try {
    allocate(new_capacity);
  } catch (...) {
    // Keep the old table usable: restore its arrays (allocate() overwrote the members).
    keys_ = old.keys, scores_ = old.scores, digests_ = old.digests, locks_ = old.locks;
    dev_values_ = old.dev_values, host_values_ = old_host, host_values_dev_ = old.host_values;
    capacity_ = old_capacity, num_buckets_ = old.num_buckets, hbm_slots_ = old.hbm_slots;
    throw;
  }
  check(cudaMemset(counters_, 0, sizeof(int64_t)), "reset size");
  rehash_kernel<<<blocks_for(old_capacity), kBlock>>>(old, old_capacity, view());
  check(cudaGetLastError(), "rehash");
  check(cudaDeviceSynchronize(), "rehash synchronize");
  cudaFree(old.keys);
  cudaFree(old.scores);
  cudaFree(old.digests);
  cudaFree(old.locks);
  if (old.dev_values) cudaFree(old.dev_values);
  if (old_host) cudaFreeHost(old_host);
  size_bound_ = size(stream);
}

void CudaTable::reserve(int64_t capacity, uintptr_t stream) {
  DeviceGuard guard(options_.device);
  const int64_t target =
      std::min(round_up_buckets(capacity) * kBucketSize, round_up_buckets(options_.max_capacity) * kBucketSize);
  if (target > capacity_) rehash(target, stream);
}

void CudaTable::clear(uintptr_t stream) {
  DeviceGuard guard(options_.device);
  cudaStream_t s = as_stream(stream);
  fill_keys_kernel<<<slot_blocks(capacity_), kBlock, 0, s>>>(keys_, capacity_);
  check(cudaGetLastError(), "clear");
  check(cudaMemsetAsync(scores_, 0, capacity_ * sizeof(uint64_t), s), "clear scores");
  check(cudaMemsetAsync(digests_, kEmptyDigest, capacity_, s), "clear digests");
  check(cudaMemsetAsync(counters_, 0, sizeof(int64_t), s), "clear size");
  size_bound_ = 0;
}

void CudaTable::initial_rows(const int64_t* keys, int64_t n, float* rows, uintptr_t stream) const {
  if (n <= 0) return;
  DeviceGuard guard(options_.device);
  initial_rows_kernel<<<blocks_for(n), kBlock, 0, as_stream(stream)>>>(view(), keys, n, rows);
  check(cudaGetLastError(), "initial_rows");
}

}  // namespace gr_dynemb
