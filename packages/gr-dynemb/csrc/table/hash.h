// Key hashing and the counter-based random numbers of the initializers (order- and thread-independent).
#pragma once

#include <math.h>

#include <cstdint>

// The CUDA table draws the same initial rows on the device: these functions compile for both sides (C math names,
// which CUDA provides in double precision on the device).
#ifdef __CUDACC__
#define GR_DYNEMB_HD __host__ __device__
#else
#define GR_DYNEMB_HD
#endif

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

// A uniform double in (0, 1) from (seed, key, index): the same key always gets the same initial row.
GR_DYNEMB_HD inline double uniform01(uint64_t seed, int64_t key, uint64_t index) {
  uint64_t h = mix64(seed ^ mix64(static_cast<uint64_t>(key) + 0x9e3779b97f4a7c15ULL * (index + 1)));
  return (static_cast<double>(h >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

GR_DYNEMB_HD inline double standard_normal(uint64_t seed, int64_t key, uint64_t index) {
  // Box-Muller on two independent uniforms.
  const double u1 = uniform01(seed, key, 2 * index);
  const double u2 = uniform01(seed, key, 2 * index + 1);
  return ::sqrt(-2.0 * ::log(u1)) * ::cos(6.283185307179586 * u2);
}

GR_DYNEMB_HD inline void standard_normal_pair(uint64_t seed, int64_t key, uint64_t index, double& z0, double& z1) {
  const double u1 = uniform01(seed, key, 2 * index);
  const double u2 = uniform01(seed, key, 2 * index + 1);
  const double r = ::sqrt(-2.0 * ::log(u1));
  z0 = r * ::cos(6.283185307179586 * u2);
  z1 = r * ::sin(6.283185307179586 * u2);
}

}  // namespace gr_dynemb
