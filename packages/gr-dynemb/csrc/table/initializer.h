// The seeded per-key initializer of new rows, identical bit for bit on the host (CPU table) and the GPU (CUDA table).
//
// Every draw is a pure function of (seed, key, element): the same key gets the same initial row whatever the batch
// order, thread count or device. Bit-identical results on both sides come from using only IEEE operations that are
// correctly rounded everywhere (+, *, /, sqrt, each rounded once: no FMA contraction; host sources are compiled with
// -ffp-contract=off) and our own polynomial log / sin / cos instead of the two sides' different math libraries.
// All in float: the CUDA table's find_or_insert draws rows for every new key, and double-precision library
// transcendentals made that kernel compute-bound.
#pragma once

#include <cstdint>

#include "table/exact_math.h"
#include "table/hash.h"
#include "table/types.h"

namespace gr_dynemb {
namespace init {

using exact::add;
using exact::bits_float;
using exact::div;
using exact::float_bits;
using exact::mul;
using exact::sqrt;
using exact::sub;

// 64 random bits for draw `index` of `key`.
GR_DYNEMB_HD inline uint64_t draw_bits(uint64_t seed, int64_t key, uint64_t index) {
  return mix64(seed ^ mix64(static_cast<uint64_t>(key) + 0x9e3779b97f4a7c15ULL * (index + 1)));
}

// A uniform in (0, 1) from 23 random bits: (k + 0.5) / 2^23 is exact in float.
GR_DYNEMB_HD inline float open_unit(uint32_t k23) { return mul(float(k23) + 0.5f, 1.0f / 8388608.0f); }

// ln(u) for u in (0, 1]: u = 2^e m with m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh(t), t = (m - 1) / (m + 1),
// |t| <= 0.172, by its series to t^9 (next term < 3e-9 relative).
GR_DYNEMB_HD inline float log_unit(float u) {
  const uint32_t bits = float_bits(u);
  int e = int((bits >> 23) & 0xffu) - 127;
  uint32_t mant = (bits & 0x7fffffu) | 0x3f800000u;  // m in [1, 2)
  if (mant > 0x3fb504f3u) {                          // m > sqrt(2): halve it
    mant -= 0x00800000u;
    e += 1;
  }
  const float m = bits_float(mant);
  const float t = div(sub(m, 1.f), add(m, 1.f));
  const float t2 = mul(t, t);
  float s = 1.f / 9.f;
  s = add(1.f / 7.f, mul(t2, s));
  s = add(1.f / 5.f, mul(t2, s));
  s = add(1.f / 3.f, mul(t2, s));
  s = add(1.f, mul(t2, s));
  const float ln_m = mul(mul(2.f, t), s);
  const float fe = float(e);
  // ln 2 split so that e * hi is exact (hi has 16 significant bits, |e| <= 24).
  return add(add(mul(fe, 0.693145751953125f), mul(fe, 1.428606765330187e-06f)), ln_m);
}

// sin and cos of a in [0, pi/4] by their Taylor polynomials (truncation error < 2e-9).
GR_DYNEMB_HD inline void sincos_octant(float a, float& s, float& c) {
  const float a2 = mul(a, a);
  float ps = -1.f / 39916800.f;  // sin: a - a^3/3! + ... + a^9/9! - a^11/11!
  ps = add(1.f / 362880.f, mul(a2, ps));
  ps = add(-1.f / 5040.f, mul(a2, ps));
  ps = add(1.f / 120.f, mul(a2, ps));
  ps = add(-1.f / 6.f, mul(a2, ps));
  s = add(a, mul(mul(a, a2), ps));
  float pc = 1.f / 3628800.f;  // cos: 1 - a^2/2! + ... - a^10/10!
  pc = add(-1.f / 40320.f, mul(a2, pc));
  pc = add(1.f / 720.f, mul(a2, pc));
  pc = add(-1.f / 24.f, mul(a2, pc));
  pc = add(0.5f, mul(a2, pc));
  c = sub(1.f, mul(a2, pc));
}

// sin and cos of 2 pi k / 2^23 (k < 2^23): the top 3 bits pick the octant, exact swaps and sign flips place it.
GR_DYNEMB_HD inline void sincos_turns(uint32_t k23, float& s, float& c) {
  constexpr float kRadPerUnit = 6.283185307179586f / 8388608.0f;  // 2 pi / 2^23
  const uint32_t octant = k23 >> 20;
  const uint32_t rest = k23 & 0xfffffu;
  float so, co;
  if (octant & 1u) {  // angle = (octant + 1) pi/4 - a': measure from the octant's far edge
    sincos_octant(mul(float(0x100000u - rest), kRadPerUnit), so, co);
    const float t = so;
    so = co;
    co = t;
  } else {
    sincos_octant(mul(float(rest), kRadPerUnit), so, co);
  }
  switch (octant >> 1) {  // rotate by quarter turns
    case 0: s = so, c = co; break;
    case 1: s = co, c = -so; break;
    case 2: s = -so, c = -co; break;
    default: s = -co, c = so; break;
  }
}

// Two independent standard normals (Box-Muller) from draw `index` of `key`.
GR_DYNEMB_HD inline void normal_pair(uint64_t seed, int64_t key, uint64_t index, float& z0, float& z1) {
  const uint64_t h = draw_bits(seed, key, index);
  const float r = sqrt(mul(-2.f, log_unit(open_unit(uint32_t(h >> 41)))));
  float s, c;
  sincos_turns(uint32_t(h >> 18) & 0x7fffffu, s, c);
  z0 = mul(r, c);
  z1 = mul(r, s);
}

// A standard normal redrawn until |z| <= 2 (at most 64 tries, then clamped): element `element`'s try `r`.
GR_DYNEMB_HD inline float truncated_redraw(uint64_t seed, int64_t key, uint64_t element, float z) {
  for (uint64_t r = 1; (z > 2.f || z < -2.f) && r < 64; ++r) {
    float spare;
    normal_pair(seed, key, (uint64_t(1) << 40) + element * 64 + r, z, spare);
  }
  return z > 2.f ? 2.f : (z < -2.f ? -2.f : z);
}

// Elements 2p and 2p + 1 of `key`'s initial embedding (the second is unused when 2p + 1 == dim).
GR_DYNEMB_HD inline void initial_pair(const Initializer& in, int64_t key, int p, float& x0, float& x1) {
  switch (in.kind) {
    case InitKind::kNormal:
    case InitKind::kTruncatedNormal: {
      float z0, z1;
      normal_pair(in.seed, key, uint64_t(p), z0, z1);
      if (in.kind == InitKind::kTruncatedNormal) {
        z0 = truncated_redraw(in.seed, key, uint64_t(2 * p), z0);
        z1 = truncated_redraw(in.seed, key, uint64_t(2 * p + 1), z1);
      }
      x0 = add(in.a, mul(in.b, z0));
      x1 = add(in.a, mul(in.b, z1));
      return;
    }
    case InitKind::kUniform: {
      const uint64_t h = draw_bits(in.seed, key, uint64_t(p));
      const float width = sub(in.b, in.a);
      x0 = add(in.a, mul(width, open_unit(uint32_t(h >> 41))));
      x1 = add(in.a, mul(width, open_unit(uint32_t(h >> 18) & 0x7fffffu)));
      return;
    }
    case InitKind::kConstant: x0 = x1 = in.a; return;
  }
  x0 = x1 = 0.f;
}

}  // namespace init
}  // namespace gr_dynemb
