#pragma once
#include "emu.h"
namespace cub { struct DeviceScan {
  template <class T> static cudaError_t ExclusiveSum(void* temp, size_t& bytes, const T* in, T* out, int64_t n, cudaStream_t) {
    if (!temp) { bytes = 8; return 0; }
    T acc = 0; for (int64_t i = 0; i < n; ++i) { T v = in[i]; out[i] = acc; acc += v; } return 0; }
}; }
