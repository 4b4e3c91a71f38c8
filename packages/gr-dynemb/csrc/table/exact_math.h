// Float arithmetic that rounds exactly once per operation on the host and on the GPU, so that code built from it
// (the initializer, the fused optimizers) gives bit-identical results in the CPU and CUDA tables: +, -, *, / and
// sqrt are correctly rounded on both sides, and neither side may fuse a multiply-add (device code calls the _rn
// intrinsics, which are never contracted; host sources are compiled with -ffp-contract=off).
#pragma once

#include <cstdint>
#include <cstring>

#include "table/device_compat.h"

namespace gr_dynemb {
namespace exact {


GR_DYNEMB_HD inline float mul(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
GR_DYNEMB_HD inline float add(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
GR_DYNEMB_HD inline float sub(float a, float b) { return add(a, -b); }
GR_DYNEMB_HD inline float div(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
GR_DYNEMB_HD inline float sqrt(float a) {
#ifdef __CUDA_ARCH__
  return __fsqrt_rn(a);
#else
  return __builtin_sqrtf(a);
#endif
}

GR_DYNEMB_HD inline uint32_t float_bits(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  return u;
}
GR_DYNEMB_HD inline float bits_float(uint32_t u) {
  float x;
  memcpy(&x, &u, sizeof x);
  return x;
}

}  // namespace exact
}  // namespace gr_dynemb
