// Key hashing and the counter-based random numbers of the initializers (order- and thread-independent).
#pragma once

#include <cmath>
#include <cstdint>

namespace gr_dynemb {

// MurmurHash3's 64-bit finaliser: a bijection with full avalanche, so sequential ids spread over buckets.
inline uint64_t mix64(uint64_t x) {
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

// A uniform double in (0, 1) from (seed, key, index): the same key always gets the same initial row.
inline double uniform01(uint64_t seed, int64_t key, uint64_t index) {
  uint64_t h = mix64(seed ^ mix64(static_cast<uint64_t>(key) + 0x9e3779b97f4a7c15ULL * (index + 1)));
  return (static_cast<double>(h >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

inline double standard_normal(uint64_t seed, int64_t key, uint64_t index) {
  // Box-Muller on two independent uniforms.
  const double u1 = uniform01(seed, key, 2 * index);
  const double u2 = uniform01(seed, key, 2 * index + 1);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

inline void standard_normal_pair(uint64_t seed, int64_t key, uint64_t index, double& z0, double& z1) {
  const double u1 = uniform01(seed, key, 2 * index);
  const double u2 = uniform01(seed, key, 2 * index + 1);
  const double r = std::sqrt(-2.0 * std::log(u1));
  z0 = r * std::cos(6.283185307179586 * u2);
  z1 = r * std::sin(6.283185307179586 * u2);
}

}  // namespace gr_dynemb
