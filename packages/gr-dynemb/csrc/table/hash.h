// Key hashing (bucket choice, digests, shard owners, the initializers' counter-based random bits).
#pragma once

#include <cstdint>

#include "table/device_compat.h"  // the CUDA table hashes the same way on the device

namespace gr_dynemb {

// MurmurHash3's 64-bit finaliser: a bijection with full avalanche, so sequential ids spread over buckets.
GR_DYNEMB_HD inline uint64_t mix64(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return x;
}

// The rank that owns `key` among `world_size` shards. Salted so that it is independent of the bucket index (the low
// bits of mix64(key)): every rank's table still spreads its keys over all of its buckets.
inline int64_t owner_rank(int64_t key, int64_t world_size) {
  const uint64_t h = mix64(static_cast<uint64_t>(key) ^ 0x5bd1e9955bd1e995ULL);
  return static_cast<int64_t>((h >> 32) % static_cast<uint64_t>(world_size));
}

}  // namespace gr_dynemb
