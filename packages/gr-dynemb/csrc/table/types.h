// Shared definitions of the dynamic embedding table: reserved keys, eviction policies, initializers, statuses.
#pragma once

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

namespace gr_dynemb {

// Two int64 values mark slot states and can never be keys; every other int64 can.
constexpr int64_t kEmptyKey = std::numeric_limits<int64_t>::min();         // slot never used
constexpr int64_t kErasedKey = std::numeric_limits<int64_t>::min() + 1;    // slot freed by erase (reusable)

constexpr int kBucketSize = 128;  // slots per bucket: a key lives in exactly one bucket (no cross-bucket probing)

// Tables one grouped call (find_or_insert_embeddings_group, apply_optimizer_group) takes at most; a group's table k
// owns keys [bounds[k], bounds[k + 1]) of the call.
constexpr int kMaxGroupTables = 16;

// Throws std::invalid_argument unless bounds fit a group of num_tables tables: 1..kMaxGroupTables tables,
// num_tables + 1 nondecreasing bounds from 0.
inline void check_group_bounds(size_t num_tables, const int64_t* bounds, size_t num_bounds) {
  if (num_tables < 1 || num_tables > size_t(kMaxGroupTables))
    throw std::invalid_argument("a group holds 1 to " + std::to_string(kMaxGroupTables) + " tables, got " +
                                std::to_string(num_tables));
  if (num_bounds != num_tables + 1) throw std::invalid_argument("a group needs one more bound than tables");
  if (bounds[0] != 0) throw std::invalid_argument("a group's bounds start at 0");
  for (size_t k = 0; k < num_tables; ++k)
    if (bounds[k + 1] < bounds[k]) throw std::invalid_argument("a group's bounds must be nondecreasing");
}

// How a slot's score is computed when a key is inserted or touched.
enum class ScorePolicy : int {
  kNone = 0,       // no eviction: a full bucket rejects new keys (reported as an error by the Python layer)
  kLru = 1,        // score = step of the last touch
  kLfu = 2,        // score = number of touches
  kEpochLru = 3,   // score = epoch << 32 | (step & 0xffffffff)
  kEpochLfu = 4,   // score = epoch << 32 | min(touches in this epoch, 2^32 - 1)
  kCustom = 5,     // score supplied by the caller for every key
};

enum class InitKind : int { kNormal = 0, kTruncatedNormal = 1, kUniform = 2, kConstant = 3 };

struct Initializer {
  InitKind kind = InitKind::kNormal;
  float a = 0.f;  // normal/truncated: mean; uniform: low; constant: value
  float b = 1.f;  // normal/truncated: std;  uniform: high
  uint64_t seed = 0;
};

// Per-key outcome of an inserting operation.
enum class InsertStatus : int8_t {
  kFound = 0,     // key was present
  kInserted = 1,  // new slot (free or erased)
  kEvicted = 2,   // new slot taken from a lower-score key, which was evicted
  kRejected = 3,  // bucket full and every slot scores >= the new key: no slot (value = initializer)
};

// What every table implementation is configured with; each adds its own fields (threads, device, HBM budget).
struct TableShape {
  int64_t capacity = 1 << 16;      // initial slots (rounded up to a power-of-two number of buckets)
  int64_t max_capacity = 1 << 24;  // growth stops here; then a full bucket evicts (or rejects)
  int dim = 16;
  int value_dim = 16;              // >= dim: dim embedding columns, then optimizer state (zero-initialised)
  ScorePolicy policy = ScorePolicy::kLru;
  Initializer init;
  double max_load_factor = 0.75;   // grow (double) before an insert would pass this

  // Throws std::invalid_argument naming the first bad field.
  void validate() const {
    if (dim <= 0) throw std::invalid_argument("dim must be positive");
    if (value_dim < dim) throw std::invalid_argument("value_dim must be >= dim");
    if (capacity <= 0) throw std::invalid_argument("capacity must be positive");
    if (max_capacity < capacity) throw std::invalid_argument("max_capacity must be >= capacity");
    if (!(max_load_factor > 0.0 && max_load_factor <= 1.0))
      throw std::invalid_argument("max_load_factor must be in (0, 1]");
    if (init.kind == InitKind::kUniform && !(init.a < init.b))
      throw std::invalid_argument("uniform initializer needs low < high");
    if ((init.kind == InitKind::kNormal || init.kind == InitKind::kTruncatedNormal) && !(init.b > 0.f))
      throw std::invalid_argument("normal initializers need std > 0");
  }

  // The shape from the Python layer's integer codes (policy, initializer kind), checked.
  static TableShape from_codes(int64_t capacity, int64_t max_capacity, int dim, int value_dim, int policy,
                               int init_kind, float init_a, float init_b, uint64_t seed, double max_load_factor) {
    if (policy < 0 || policy > 5) throw std::invalid_argument("unknown score policy");
    if (init_kind < 0 || init_kind > 3) throw std::invalid_argument("unknown initializer");
    TableShape s;
    s.capacity = capacity;
    s.max_capacity = max_capacity;
    s.dim = dim;
    s.value_dim = value_dim;
    s.policy = static_cast<ScorePolicy>(policy);
    s.init = Initializer{static_cast<InitKind>(init_kind), init_a, init_b, seed};
    s.max_load_factor = max_load_factor;
    s.validate();
    return s;
  }
};

}  // namespace gr_dynemb
