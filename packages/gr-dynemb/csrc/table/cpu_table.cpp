#include "table/cpu_table.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>

#include "table/hash.h"
#include "table/initializer.h"

namespace gr_dynemb {

namespace {

int64_t round_up_buckets(int64_t slots) {
  int64_t buckets = 1;
  while (buckets * kBucketSize < slots) buckets <<= 1;
  return buckets;
}

bool is_reserved(int64_t key) { return key == kEmptyKey || key == kErasedKey; }

constexpr int64_t kSerialBelow = 4096;  // smaller batches run on the calling thread
constexpr int64_t kPrefetchAhead = 8;   // keys whose slots are prefetched ahead of the one being processed

}  // namespace

CpuTable::CpuTable(const TableOptions& options) : options_(options) {
  options_.validate();
  if (options_.num_threads <= 0) options_.num_threads = std::max(1u, std::thread::hardware_concurrency());
  rehash(round_up_buckets(options_.capacity) * kBucketSize);
}

template <typename Fn>
void CpuTable::parallel_for(int64_t n, Fn&& fn) const {
  const int threads = static_cast<int>(std::min<int64_t>(options_.num_threads, (n + kSerialBelow - 1) / kSerialBelow));
  if (threads <= 1) {
    fn(int64_t(0), n);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(threads);
  const int64_t chunk = (n + threads - 1) / threads;
  for (int t = 0; t < threads; ++t) {
    const int64_t begin = t * chunk, end = std::min(n, begin + chunk);
    if (begin < end) pool.emplace_back([&fn, begin, end] { fn(begin, end); });
  }
  for (auto& th : pool) th.join();
}

CpuTable::Probe CpuTable::probe(int64_t key) const {
  const uint64_t h = mix64(static_cast<uint64_t>(key));
  return Probe{static_cast<int64_t>(h & static_cast<uint64_t>(num_buckets_ - 1)),
               static_cast<int>((h >> 32) & (kBucketSize - 1))};
}

void CpuTable::prefetch(const int64_t* keys, int64_t i, int64_t end) const {
  // Random buckets of a large table miss every cache level: start loading a later key's slot lines now, so the
  // misses of several keys overlap.
  if (i + kPrefetchAhead >= end) return;
  const int64_t key = keys[i + kPrefetchAhead];
  const Probe pr = probe(key);
  const int64_t slot = pr.bucket * kBucketSize + pr.start;
  __builtin_prefetch(&slots_[slot]);
  // The whole row (a 64-float row is four cache lines): the copy in or out of it then does not wait line by line.
  const char* row = reinterpret_cast<const char*>(&values_[slot * options_.value_dim]);
  const int64_t bytes = int64_t(sizeof(float)) * options_.value_dim;
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(row + off, 1);
}

int64_t CpuTable::locate(int64_t key, const Probe& pr, int64_t* free_slot) const {
  const int64_t base = pr.bucket * kBucketSize;
  if (free_slot) *free_slot = -1;
  for (int i = 0; i < kBucketSize; ++i) {
    const int64_t slot = base + ((pr.start + i) & (kBucketSize - 1));
    const int64_t k = slots_[slot].key;
    if (k == kEmptyKey) {  // inserts fill the first free slot on the probe path: key is absent
      if (free_slot && *free_slot < 0) *free_slot = slot;
      return -1;
    }
    if (free_slot && k == kErasedKey && *free_slot < 0) *free_slot = slot;
    if (k == key) return slot;
  }
  return -1;
}

uint64_t CpuTable::touched_score(uint64_t old_score, bool is_new, const uint64_t* custom, int64_t i) const {
  if (custom != nullptr) return custom[i];  // caller-supplied (kCustom, or restoring a checkpoint)
  switch (options_.policy) {
    case ScorePolicy::kNone: return 0;
    case ScorePolicy::kLru: return step_;
    case ScorePolicy::kLfu: return is_new ? 1 : old_score + 1;
    case ScorePolicy::kEpochLru: return (uint64_t(epoch_) << 32) | (step_ & 0xffffffffULL);
    case ScorePolicy::kEpochLfu: {
      const uint64_t epoch_bits = uint64_t(epoch_) << 32;
      if (is_new || (old_score & ~0xffffffffULL) != epoch_bits) return epoch_bits | 1;
      const uint64_t count = old_score & 0xffffffffULL;
      return epoch_bits | (count == 0xffffffffULL ? count : count + 1);
    }
    case ScorePolicy::kCustom: return old_score;  // touched without new scores (find): kept
  }
  return 0;
}

void CpuTable::lock(int64_t bucket) {
  auto& l = locks_[bucket];
  uint8_t expected = 0;
  while (!l.compare_exchange_weak(expected, 1, std::memory_order_acquire)) {
    expected = 0;
    std::this_thread::yield();
  }
}

void CpuTable::unlock(int64_t bucket) { locks_[bucket].store(0, std::memory_order_release); }

int64_t CpuTable::place(int64_t key, const Probe& pr, uint64_t score, InsertStatus& status, int64_t free_slot,
                        Slot* victim_out) {
  const int64_t base = pr.bucket * kBucketSize;
  // free_slot: the first free slot on the probe path, found by the caller's locate(); -1 means the bucket is full.
  if (free_slot >= 0) {
    slots_[free_slot].key = key;
    slots_[free_slot].score = score;
    status = InsertStatus::kInserted;  // the caller adds its inserts to size_ once per chunk (no shared atomics)
    return free_slot;
  }
  // Bucket full: the lowest score goes if the newcomer scores higher.
  if (options_.policy != ScorePolicy::kNone) {
    int64_t victim = base;
    for (int64_t s = base + 1; s < base + kBucketSize; ++s) {
      if (slots_[s].score < slots_[victim].score) victim = s;
    }
    if (score > slots_[victim].score) {
      if (victim_out) *victim_out = slots_[victim];
      slots_[victim].key = key;
      slots_[victim].score = score;
      status = InsertStatus::kEvicted;
      return victim;
    }
  }
  status = InsertStatus::kRejected;
  return -1;
}

void CpuTable::initial_row(int64_t key, float* row) const { initial_columns(key, row, options_.value_dim); }

void CpuTable::initial_columns(int64_t key, float* row, int cols) const {
  const int emb = std::min(cols, options_.dim);
  for (int p = 0; 2 * p < emb; ++p) {
    float x0, x1;
    init::initial_pair(options_.init, key, p, x0, x1);
    row[2 * p] = x0;
    if (2 * p + 1 < emb) row[2 * p + 1] = x1;
  }
  if (cols > options_.dim) std::fill(row + options_.dim, row + cols, 0.f);
}

void CpuTable::find(const int64_t* keys, int64_t n, float* values, bool* found, bool update_score,
                    uint64_t* scores_out) {
  const int vd = options_.value_dim;
  parallel_for(n, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      prefetch(keys, i, end);
      const int64_t key = keys[i];
      const Probe pr = probe(key);
      const int64_t slot = is_reserved(key) ? -1 : locate(key, pr);
      found[i] = slot >= 0;
      if (slot < 0) {
        if (values) std::fill(values + i * vd, values + (i + 1) * vd, 0.f);
        if (scores_out) scores_out[i] = 0;
        continue;
      }
      if (values) std::memcpy(values + i * vd, &values_[slot * vd], sizeof(float) * vd);
      if (update_score) {
        lock(pr.bucket);
        slots_[slot].score = touched_score(slots_[slot].score, false, nullptr, i);
        if (scores_out) scores_out[i] = slots_[slot].score;
        unlock(pr.bucket);
      } else if (scores_out) {
        scores_out[i] = slots_[slot].score;
      }
    }
  });
}

void CpuTable::grow_for(int64_t incoming) {
  const double limit = options_.max_load_factor;
  int64_t target = capacity();
  while (double(size() + incoming) > limit * double(target) && target < options_.max_capacity) target *= 2;
  target = std::min(target, round_up_buckets(options_.max_capacity) * kBucketSize);
  if (target > capacity()) rehash(target);
}

void CpuTable::Tally::add(InsertStatus st) {
  inserted += st == InsertStatus::kInserted;
  evicted += st == InsertStatus::kEvicted;
  rejected += st == InsertStatus::kRejected;
}

void CpuTable::Tally::flush(CpuTable& table) {
  table.size_.fetch_add(inserted);
  table.evicted_.fetch_add(evicted);
  table.rejected_.fetch_add(rejected);
  if (reserved) table.reserved_.fetch_add(reserved);
}

template <typename Body>
void CpuTable::upsert_batch(const int64_t* keys, int64_t n, int8_t* status, const uint64_t* scores, Body&& body) {
  grow_for(n);
  parallel_for(n, [&](int64_t begin, int64_t end) {
    Tally tally;
    for (int64_t i = begin; i < end; ++i) {
      prefetch(keys, i, end);
      const int64_t key = keys[i];
      Slot victim{kEmptyKey, 0};
      if (is_reserved(key)) {  // never stored: rejected and counted, the Python layer raises
        body(i, key, int64_t(-1), InsertStatus::kRejected, victim);
        status[i] = static_cast<int8_t>(InsertStatus::kRejected);
        ++tally.reserved;
        continue;
      }
      const Probe pr = probe(key);
      lock(pr.bucket);
      int64_t free_slot;
      int64_t slot = locate(key, pr, &free_slot);
      InsertStatus st = InsertStatus::kFound;
      if (slot >= 0) {
        slots_[slot].score = touched_score(slots_[slot].score, false, scores, i);
      } else {
        slot = place(key, pr, touched_score(0, true, scores, i), st, free_slot, &victim);
      }
      body(i, key, slot, st, victim);
      unlock(pr.bucket);
      status[i] = static_cast<int8_t>(st);
      tally.add(st);
    }
    tally.flush(*this);
  });
}

void CpuTable::find_or_insert(const int64_t* keys, int64_t n, float* values, int8_t* status, const uint64_t* scores) {
  upsert_rows(keys, n, values, options_.value_dim, status, scores);
}

void CpuTable::find_or_insert_embeddings(const int64_t* keys, int64_t n, float* embeddings, int8_t* status,
                                         const uint64_t* scores) {
  upsert_rows(keys, n, embeddings, options_.dim, status, scores);
}

void CpuTable::upsert_rows(const int64_t* keys, int64_t n, float* out, int out_cols, int8_t* status,
                           const uint64_t* scores) {
  const int vd = options_.value_dim;
  upsert_batch(keys, n, status, scores, [&](int64_t i, int64_t key, int64_t slot, InsertStatus st, const Slot&) {
    float* o = out + i * out_cols;
    if (slot < 0) {  // rejected: the initializer's row, no slot
      initial_columns(key, o, out_cols);
      return;
    }
    if (st != InsertStatus::kFound) initial_row(key, &values_[slot * vd]);
    std::memcpy(o, &values_[slot * vd], sizeof(float) * out_cols);
  });
}

void CpuTable::insert_or_assign(const int64_t* keys, int64_t n, const float* values, int8_t* status,
                                const uint64_t* scores) {
  const int vd = options_.value_dim;
  upsert_batch(keys, n, status, scores, [&](int64_t i, int64_t, int64_t slot, InsertStatus, const Slot&) {
    if (slot >= 0) std::memcpy(&values_[slot * vd], values + i * vd, sizeof(float) * vd);
  });
}

void CpuTable::insert_or_assign_evicting(const int64_t* keys, int64_t n, const float* values, int8_t* status,
                                         const uint64_t* scores, int64_t* evicted_keys, float* evicted_values,
                                         uint64_t* evicted_scores) {
  if (n > 0 && evicted_keys == nullptr) throw std::invalid_argument("insert_or_assign_evicting needs evicted_keys");
  const int vd = options_.value_dim;
  upsert_batch(keys, n, status, scores, [&](int64_t i, int64_t, int64_t slot, InsertStatus st, const Slot& victim) {
    const bool evicted = st == InsertStatus::kEvicted;
    evicted_keys[i] = evicted ? victim.key : kEmptyKey;
    if (evicted) {  // the victim's row is still in the slot: hand it out before the newcomer's row replaces it
      if (evicted_values) std::memcpy(evicted_values + i * vd, &values_[slot * vd], sizeof(float) * vd);
      if (evicted_scores) evicted_scores[i] = victim.score;
    }
    if (slot >= 0) std::memcpy(&values_[slot * vd], values + i * vd, sizeof(float) * vd);
  });
}

void CpuTable::assign(const int64_t* keys, int64_t n, const float* values, bool* found) {
  const int vd = options_.value_dim;
  parallel_for(n, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t slot = is_reserved(keys[i]) ? -1 : locate(keys[i], probe(keys[i]));
      if (found) found[i] = slot >= 0;
      if (slot >= 0) std::memcpy(&values_[slot * vd], values + i * vd, sizeof(float) * vd);
    }
  });
}

void CpuTable::accumulate(const int64_t* keys, int64_t n, const float* delta, bool* found) {
  const int vd = options_.value_dim;
  parallel_for(n, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Probe pr = probe(keys[i]);
      const int64_t slot = is_reserved(keys[i]) ? -1 : locate(keys[i], pr);
      if (found) found[i] = slot >= 0;
      if (slot < 0) continue;
      lock(pr.bucket);  // duplicate keys in one call add up
      float* row = &values_[slot * vd];
      const float* d = delta + i * vd;
      for (int c = 0; c < vd; ++c) row[c] += d[c];
      unlock(pr.bucket);
    }
  });
}

void CpuTable::apply_optimizer(const int64_t* keys, int64_t n, const float* grads, const OptimizerStep& step,
                               bool* found, bool distinct) {
  const int dim = options_.dim, vd = options_.value_dim;
  step.check_fits(dim, vd);
  parallel_for(n, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (is_reserved(keys[i])) {
        found[i] = false;
        continue;
      }
      const Probe pr = probe(keys[i]);
      if (!distinct) lock(pr.bucket);
      const int64_t slot = locate(keys[i], pr);
      found[i] = slot >= 0;
      if (slot >= 0) optimizer_row(step, &values_[slot * vd], grads + i * dim, dim);
      if (!distinct) unlock(pr.bucket);
    }
  });
}

void CpuTable::check_group(const std::vector<CpuTable*>& tables, const std::vector<int64_t>& bounds) {
  check_group_bounds(tables.size(), bounds.data(), bounds.size());
  for (const CpuTable* t : tables) {
    if (t == nullptr) throw std::invalid_argument("a group's table is missing");
    if (t->options_.dim != tables[0]->options_.dim) throw std::invalid_argument("a group's tables must share dim");
  }
}

void CpuTable::find_or_insert_embeddings_group(const std::vector<CpuTable*>& tables,
                                               const std::vector<int64_t>& bounds, const int64_t* keys,
                                               float* embeddings, int8_t* status) {
  check_group(tables, bounds);
  const int dim = tables[0]->options_.dim;
  for (size_t k = 0; k < tables.size(); ++k) {
    const int64_t b = bounds[k], n = bounds[k + 1] - bounds[k];
    if (n > 0) tables[k]->find_or_insert_embeddings(keys + b, n, embeddings + b * dim, status + b, nullptr);
  }
}

void CpuTable::apply_optimizer_group(const std::vector<CpuTable*>& tables, const std::vector<int64_t>& bounds,
                                     const std::vector<OptimizerStep>& steps, const int64_t* keys,
                                     const float* grads, bool* found, bool distinct) {
  check_group(tables, bounds);
  if (steps.size() != tables.size()) throw std::invalid_argument("a group needs one optimizer step per table");
  for (size_t k = 0; k < tables.size(); ++k) steps[k].check_fits(tables[k]->options_.dim, tables[k]->options_.value_dim);
  const int dim = tables[0]->options_.dim;
  for (size_t k = 0; k < tables.size(); ++k) {
    const int64_t b = bounds[k], n = bounds[k + 1] - bounds[k];
    tables[k]->apply_optimizer(keys + b, n, grads + b * dim, steps[k], found + b, distinct);
  }
}

int64_t CpuTable::erase(const int64_t* keys, int64_t n) {
  int64_t erased = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (is_reserved(keys[i])) continue;
    const int64_t slot = locate(keys[i], probe(keys[i]));
    if (slot < 0) continue;
    slots_[slot].key = kErasedKey;
    slots_[slot].score = 0;
    ++erased;
  }
  size_.fetch_sub(erased);
  return erased;
}

int64_t CpuTable::erase_if_score_below(uint64_t threshold) {
  int64_t erased = 0;
  for (int64_t s = 0; s < capacity(); ++s) {
    if (!is_reserved(slots_[s].key) && slots_[s].score < threshold) {
      slots_[s].key = kErasedKey;
      slots_[s].score = 0;
      ++erased;
    }
  }
  size_.fetch_sub(erased);
  return erased;
}

int64_t CpuTable::count_if_score_at_least(uint64_t threshold) const {
  int64_t count = 0;
  for (int64_t s = 0; s < capacity(); ++s) count += !is_reserved(slots_[s].key) && slots_[s].score >= threshold;
  return count;
}

int64_t CpuTable::export_if_score_at_least(uint64_t threshold, int64_t* keys, float* values, uint64_t* scores,
                                           int64_t max_n) const {
  const int vd = options_.value_dim;
  int64_t out = 0;
  for (int64_t s = 0; s < capacity() && out < max_n; ++s) {
    if (is_reserved(slots_[s].key) || slots_[s].score < threshold) continue;
    keys[out] = slots_[s].key;
    if (values) std::memcpy(values + out * vd, &values_[s * vd], sizeof(float) * vd);
    if (scores) scores[out] = slots_[s].score;
    ++out;
  }
  return out;
}

void CpuTable::reserve(int64_t capacity) {
  const int64_t target = std::min(round_up_buckets(capacity) * kBucketSize, round_up_buckets(options_.max_capacity) * kBucketSize);
  if (target > this->capacity()) rehash(target);
}

void CpuTable::clear() {
  std::fill(slots_.begin(), slots_.end(), Slot{kEmptyKey, 0});
  size_ = 0;
}

void CpuTable::rehash(int64_t new_capacity) {
  std::vector<Slot> old_slots = std::move(slots_);
  std::vector<float> old_values = std::move(values_);
  const int vd = options_.value_dim;
  num_buckets_ = new_capacity / kBucketSize;
  slots_.assign(new_capacity, Slot{kEmptyKey, 0});
  values_.assign(static_cast<size_t>(new_capacity) * vd, 0.f);
  locks_.reset(new std::atomic<uint8_t>[num_buckets_]);
  for (int64_t b = 0; b < num_buckets_; ++b) locks_[b].store(0);
  size_ = 0;
  for (size_t s = 0; s < old_slots.size(); ++s) {
    const int64_t key = old_slots[s].key;
    if (is_reserved(key)) continue;
    const Probe pr = probe(key);
    InsertStatus st;
    int64_t free_slot;
    locate(key, pr, &free_slot);
    // Growth doubles the buckets, so every old bucket splits into two with room to spare; a key that still finds
    // its bucket full (only possible when shrinking, which never happens) would be dropped and counted.
    const int64_t slot = place(key, pr, old_slots[s].score, st, free_slot);
    if (slot >= 0) std::memcpy(&values_[slot * vd], &old_values[s * vd], sizeof(float) * vd);
    if (st == InsertStatus::kInserted) size_.fetch_add(1, std::memory_order_relaxed);
  }
}

}  // namespace gr_dynemb
