// CudaTable: the GPU twin of CpuTable (same hashing, buckets, probe order, scores, eviction and initializers).
//
// Layout per slot, all in HBM: key (int64), score (uint64) and an 8-bit digest of the key's hash. The 128 digests
// of a bucket are one 128-byte line: a group of 8 threads reads it with one 16-byte load per thread, so a probe
// costs one line plus the key of each digest match (about 1/256 false matches per slot). Digest 0xFF marks a
// never-used slot and 0xFE an erased one (a key's digest is folded below 0xFE), so free slots are found from the
// line too. Value rows ([embedding | optimizer state], value_dim floats) live in HBM for the first `hbm_slots`
// slots and in mapped pinned host memory (read and written through UVA by the kernels) for the rest: the hybrid
// tier. hbm_slots is whole buckets, chosen from the HBM budget.
//
// Concurrency: every mutating per-key operation (find_or_insert, insert_or_assign, accumulate, erase) takes a
// per-bucket spin lock (an int per bucket, atomicCAS by one thread of the group); reads inside the lock bypass L1.
// Duplicate keys in one batch therefore insert once (one duplicate reports INSERTED, the others FOUND; which one
// is not specified) and accumulate adds every duplicate. find takes no lock (it only bumps scores, atomically).
//
// Every method is asynchronous on the given CUDA stream except those returning a count (they synchronise it). All
// pointers are device (or UVA) addresses. The header needs no CUDA headers, so the binding compiles with g++.
#pragma once

#include <cstdint>
#include <vector>

#include "table/optimizer.h"
#include "table/types.h"

namespace gr_dynemb {

struct CudaTableOptions : TableShape {
  int64_t hbm_budget_bytes = -1;  // bytes of value rows kept in HBM; < 0: all of them
  int device = 0;
};

class CudaTable {
 public:
  explicit CudaTable(const CudaTableOptions& options);
  ~CudaTable();
  CudaTable(const CudaTable&) = delete;
  CudaTable& operator=(const CudaTable&) = delete;

  int64_t size(uintptr_t stream);
  int64_t capacity() const { return capacity_; }
  int64_t hbm_slots() const { return hbm_slots_; }
  double load_factor(uintptr_t stream) { return capacity_ ? double(size(stream)) / double(capacity_) : 0.0; }
  void set_step(uint64_t step) { step_ = step; }
  void set_epoch(uint32_t epoch) { epoch_ = epoch; }
  int64_t evicted_count(uintptr_t stream);
  int64_t rejected_count(uintptr_t stream);
  // Reserved keys offered to inserting operations since the last call (they were rejected, not stored); resets.
  int64_t take_reserved_count(uintptr_t stream);

  // scores_out: [n] or null: each present key's score after the touch, 0 for absent keys (as CpuTable::find).
  void find(const int64_t* keys, int64_t n, float* values, bool* found, bool update_score, uintptr_t stream,
            uint64_t* scores_out = nullptr);
  // find in two halves, for tables with a host tier: locate writes each key's slot (-1 if absent) and touches as find
  // does; after the caller sorts the slots ascending (order: their keys' positions), gather_rows copies the rows in
  // slot order, so host rows are read in address order (values: [n, value_dim], absent keys' rows zero).
  void locate(const int64_t* keys, int64_t n, int64_t* slots, bool* found, bool update_score, uintptr_t stream,
              uint64_t* scores_out = nullptr);
  void gather_rows(const int64_t* sorted_slots, const int64_t* order, int64_t n, float* values, uintptr_t stream);
  void find_or_insert(const int64_t* keys, int64_t n, float* values, int8_t* status, const uint64_t* scores,
                      uintptr_t stream);
  // find_or_insert that writes only each row's embedding (embeddings: [n, dim]); the training lookup's path.
  void find_or_insert_embeddings(const int64_t* keys, int64_t n, float* embeddings, int8_t* status,
                                 const uint64_t* scores, uintptr_t stream);
  void insert_or_assign(const int64_t* keys, int64_t n, const float* values, int8_t* status, const uint64_t* scores,
                        uintptr_t stream);
  // insert_or_assign that reports the keys it evicted, with their rows and scores (see CpuTable).
  void insert_or_assign_evicting(const int64_t* keys, int64_t n, const float* values, int8_t* status,
                                 const uint64_t* scores, int64_t* evicted_keys, float* evicted_values,
                                 uint64_t* evicted_scores, uintptr_t stream);
  // A group of tables (same device and dim) in one kernel launch: table k's keys are keys[bounds[k], bounds[k + 1])
  // (see kMaxGroupTables), with the semantics of a find_or_insert_embeddings / apply_optimizer per table (the
  // optimizer steps[k] for table k). Reserved keys are rejected and counted by the table they are offered to.
  static void find_or_insert_embeddings_group(const std::vector<CudaTable*>& tables,
                                              const std::vector<int64_t>& bounds, const int64_t* keys,
                                              float* embeddings, int8_t* status, uintptr_t stream);
  static void apply_optimizer_group(const std::vector<CudaTable*>& tables, const std::vector<int64_t>& bounds,
                                    const std::vector<OptimizerStep>& steps, const int64_t* keys,
                                    const float* grads, bool* found, bool distinct, uintptr_t stream);
  void assign(const int64_t* keys, int64_t n, const float* values, bool* found, uintptr_t stream);
  void accumulate(const int64_t* keys, int64_t n, const float* delta, bool* found, uintptr_t stream);
  // One fused optimizer step on present keys' rows (see CpuTable::apply_optimizer; distinct: no bucket locks).
  void apply_optimizer(const int64_t* keys, int64_t n, const float* grads, const OptimizerStep& step, bool* found,
                       bool distinct, uintptr_t stream);
  int64_t erase(const int64_t* keys, int64_t n, uintptr_t stream);
  int64_t erase_if_score_below(uint64_t threshold, uintptr_t stream);
  int64_t count_if_score_at_least(uint64_t threshold, uintptr_t stream);
  // Rows in slot order, like CpuTable; returns how many were written (at most max_n).
  int64_t export_if_score_at_least(uint64_t threshold, int64_t* keys, float* values, uint64_t* scores, int64_t max_n,
                                   uintptr_t stream);
  void reserve(int64_t capacity, uintptr_t stream);
  void clear(uintptr_t stream);
  void initial_rows(const int64_t* keys, int64_t n, float* rows, uintptr_t stream) const;

  // The device-side state the kernels read (plain pointers and sizes; defined in cuda_table.cu).
  struct View;

 private:
  View view() const;
  void allocate(int64_t capacity);  // fresh empty arrays (old ones are the caller's to free)
  void release();
  void rehash(int64_t new_capacity, uintptr_t stream);
  void grow_for(int64_t incoming, uintptr_t stream);
  // find_or_insert writing the first out_cols columns of each row to out ([n, out_cols]).
  void upsert_rows(const int64_t* keys, int64_t n, float* out, int out_cols, int8_t* status, const uint64_t* scores,
                   uintptr_t stream);
  int64_t read_counter(int index, uintptr_t stream);
  // Checks a group (bounds, one device, one dim) and returns its launch parameters' device.
  static int check_group(const std::vector<CudaTable*>& tables, const std::vector<int64_t>& bounds);

  CudaTableOptions options_;
  int64_t capacity_ = 0;
  int64_t num_buckets_ = 0;
  int64_t hbm_slots_ = 0;
  int64_t* keys_ = nullptr;
  uint64_t* scores_ = nullptr;
  uint8_t* digests_ = nullptr;
  int* locks_ = nullptr;
  float* dev_values_ = nullptr;
  float* host_values_ = nullptr;  // cudaHostAlloc'd (mapped); its device address is host_values_dev_
  float* host_values_dev_ = nullptr;
  int64_t* counters_ = nullptr;  // [size, evicted, rejected, scratch, reserved]
  int64_t size_bound_ = 0;       // host-side upper bound of size(): growth checks sync only when it could matter
  uint64_t step_ = 0;
  uint32_t epoch_ = 0;
};

}  // namespace gr_dynemb
