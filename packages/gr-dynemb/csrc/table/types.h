// Shared definitions of the dynamic embedding table: reserved keys, eviction policies, initializers, statuses.
#pragma once

#include <cstdint>
#include <limits>

namespace gr_dynemb {

// Two int64 values mark slot states and can never be keys; every other int64 can.
constexpr int64_t kEmptyKey = std::numeric_limits<int64_t>::min();         // slot never used
constexpr int64_t kErasedKey = std::numeric_limits<int64_t>::min() + 1;    // slot freed by erase (reusable)

constexpr int kBucketSize = 128;  // slots per bucket: a key lives in exactly one bucket (no cross-bucket probing)

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

}  // namespace gr_dynemb
