// CpuTable: a collision-free int64 -> float-row hash table in host memory, with scores and eviction.
//
// Layout: capacity = num_buckets * 128 slots (num_buckets a power of two). A key hashes to one bucket and a start
// slot; it is probed linearly inside that bucket only, so a bucket is the unit of eviction. A slot is key and score
// side by side (16 bytes: one cache line serves the probe and the score update); the value row, in a separate
// array, is [embedding (dim) | optimizer state (value_dim - dim)].
// Lookups stop at the first never-used slot; erase leaves a reusable tombstone. Operations split their keys over
// threads; inserting operations take a per-bucket spin lock, so duplicate keys in one batch are inserted once.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "table/optimizer.h"
#include "table/types.h"

namespace gr_dynemb {

struct TableOptions : TableShape {
  int num_threads = 0;  // 0: hardware concurrency
};

class CpuTable {
 public:
  explicit CpuTable(const TableOptions& options);

  int64_t size() const { return size_.load(); }
  int64_t capacity() const { return static_cast<int64_t>(slots_.size()); }
  double load_factor() const { return capacity() ? double(size()) / double(capacity()) : 0.0; }
  int dim() const { return options_.dim; }
  int value_dim() const { return options_.value_dim; }
  const TableOptions& options() const { return options_; }

  // Scores read these: LRU uses the step, epoch policies the epoch.
  void set_step(uint64_t step) { step_ = step; }
  void set_epoch(uint32_t epoch) { epoch_ = epoch; }
  uint64_t step() const { return step_; }
  uint32_t epoch() const { return epoch_; }
  int64_t evicted_count() const { return evicted_.load(); }
  int64_t rejected_count() const { return rejected_.load(); }
  // Reserved keys offered to inserting operations since the last call (they were rejected, not stored); resets.
  int64_t take_reserved_count() { return reserved_.exchange(0); }

  // values: [n, value_dim] or null; found: [n]. Touches scores when update_score. scores_out: [n] or null: each
  // present key's score (after the touch), 0 for absent keys.
  void find(const int64_t* keys, int64_t n, float* values, bool* found, bool update_score,
            uint64_t* scores_out = nullptr);
  // values: [n, value_dim] out (present row, or the initializer's row for new/rejected keys); status: [n].
  // scores: [n] given -> used as the keys' scores whatever the policy (kCustom needs them); null -> the policy's.
  void find_or_insert(const int64_t* keys, int64_t n, float* values, int8_t* status, const uint64_t* scores);
  // find_or_insert that writes only each row's embedding (embeddings: [n, dim]); the training lookup's path.
  void find_or_insert_embeddings(const int64_t* keys, int64_t n, float* embeddings, int8_t* status,
                                 const uint64_t* scores);
  // values: [n, value_dim] in; status: [n].
  void insert_or_assign(const int64_t* keys, int64_t n, const float* values, int8_t* status, const uint64_t* scores);
  // insert_or_assign that reports what it displaced (a cache's write-back needs the evicted rows): for key i,
  // evicted_keys[i] is the key that its insert evicted (status EVICTED) and kEmptyKey otherwise; for evicting keys
  // evicted_values[i] ([n, value_dim]) and evicted_scores[i] get that key's row and score (other positions are
  // left as they were; either array may be null).
  void insert_or_assign_evicting(const int64_t* keys, int64_t n, const float* values, int8_t* status,
                                 const uint64_t* scores, int64_t* evicted_keys, float* evicted_values,
                                 uint64_t* evicted_scores);
  // Overwrites rows of present keys only (scores untouched); found: [n] or null.
  void assign(const int64_t* keys, int64_t n, const float* values, bool* found);
  // Adds delta rows ([n, value_dim]) to present keys' rows; found: [n] or null. (Gradient updates on unique keys.)
  void accumulate(const int64_t* keys, int64_t n, const float* delta, bool* found);
  // One fused optimizer step on the rows of present keys with gradients `grads` [n, dim] (keys absent or reserved
  // are skipped and reported not found). Duplicate keys are applied one after another under the bucket lock;
  // distinct: the caller guarantees distinct keys, and no bucket lock is taken (duplicates would race).
  void apply_optimizer(const int64_t* keys, int64_t n, const float* grads, const OptimizerStep& step, bool* found,
                       bool distinct = false);
  // A group of tables (same dim): table k's keys are keys[bounds[k], bounds[k + 1]) (see kMaxGroupTables); the same
  // as a find_or_insert_embeddings / apply_optimizer (optimizer steps[k]) per table, in table order.
  static void find_or_insert_embeddings_group(const std::vector<CpuTable*>& tables,
                                              const std::vector<int64_t>& bounds, const int64_t* keys,
                                              float* embeddings, int8_t* status);
  static void apply_optimizer_group(const std::vector<CpuTable*>& tables, const std::vector<int64_t>& bounds,
                                    const std::vector<OptimizerStep>& steps, const int64_t* keys,
                                    const float* grads, bool* found, bool distinct);
  int64_t erase(const int64_t* keys, int64_t n);
  int64_t erase_if_score_below(uint64_t threshold);
  int64_t count_if_score_at_least(uint64_t threshold) const;
  // Writes up to max_n (key, row, score) triples with score >= threshold; returns how many.
  int64_t export_if_score_at_least(uint64_t threshold, int64_t* keys, float* values, uint64_t* scores,
                                   int64_t max_n) const;
  // Grows to hold at least `capacity` slots (never shrinks, never past max_capacity).
  void reserve(int64_t capacity);
  void clear();
  // The initializer's row for `key` (embedding part; optimizer state zero).
  void initial_row(int64_t key, float* row) const;
  // Its first `cols` columns (cols <= value_dim).
  void initial_columns(int64_t key, float* row, int cols) const;

 private:
  // Per-thread counts of one chunk, added to the shared atomics once (not once per key: that line would bounce
  // between cores on every insert).
  struct Tally {
    int64_t inserted = 0, evicted = 0, rejected = 0, reserved = 0;
    void add(InsertStatus st);
    void flush(CpuTable& table);
  };
  struct Probe {
    int64_t bucket;
    int start;
  };
  struct Slot {
    int64_t key;
    uint64_t score;
  };
  Probe probe(int64_t key) const;
  // Slot of `key` in its bucket, or -1; free_slot (optional) gets the first free slot on its probe path, or -1.
  int64_t locate(int64_t key, const Probe& pr, int64_t* free_slot = nullptr) const;
  uint64_t touched_score(uint64_t old_score, bool is_new, const uint64_t* custom, int64_t i) const;
  // Places absent `key` (bucket lock held) in free_slot, or evicts when it is -1; returns the slot or -1 (rejected).
  // victim (optional) gets the evicted slot's old key and score when the status is kEvicted.
  int64_t place(int64_t key, const Probe& pr, uint64_t score, InsertStatus& status, int64_t free_slot,
                Slot* victim = nullptr);
  void prefetch(const int64_t* keys, int64_t i, int64_t end) const;
  void lock(int64_t bucket);
  void unlock(int64_t bucket);
  void grow_for(int64_t incoming);
  // The loop of the inserting operations: per key, under its bucket lock, find it (touching its score) or place it,
  // then body(i, key, slot, status, victim) (slot -1: rejected; victim: the evicted key and score when status is
  // kEvicted, whose row is still in the slot); statuses to `status`, counts to the table.
  template <typename Body>
  void upsert_batch(const int64_t* keys, int64_t n, int8_t* status, const uint64_t* scores, Body&& body);
  // find_or_insert writing the first out_cols columns of each row to out ([n, out_cols]).
  void upsert_rows(const int64_t* keys, int64_t n, float* out, int out_cols, int8_t* status, const uint64_t* scores);
  void rehash(int64_t new_capacity);
  static void check_group(const std::vector<CpuTable*>& tables, const std::vector<int64_t>& bounds);
  template <typename Fn>
  void parallel_for(int64_t n, Fn&& fn) const;

  TableOptions options_;
  int64_t num_buckets_ = 0;
  std::vector<Slot> slots_;
  std::vector<float> values_;
  std::unique_ptr<std::atomic<uint8_t>[]> locks_;
  std::atomic<int64_t> size_{0};
  std::atomic<int64_t> evicted_{0};
  std::atomic<int64_t> rejected_{0};
  std::atomic<int64_t> reserved_{0};
  uint64_t step_ = 0;
  uint32_t epoch_ = 0;
};

}  // namespace gr_dynemb
