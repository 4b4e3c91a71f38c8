// GR_DYNEMB_HD: functions that compile for the host and, under nvcc, for the device too (the CPU and CUDA tables
// share hashing, initializer and optimizer code).
#pragma once

#ifdef __CUDACC__
#define GR_DYNEMB_HD __host__ __device__
#else
#define GR_DYNEMB_HD
#endif
