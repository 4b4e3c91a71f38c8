// Host emulation of the CUDA features cuda_table.cu uses (see run.sh): every CUDA thread is a std::thread, blocks run
// one after another, tiles/warps/blocks synchronise through std::barrier. For logic checks only, not GPU behaviour.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __shared__ static

struct dim3 { unsigned x = 1, y = 1, z = 1; dim3() = default; dim3(unsigned a) : x(a) {} };
struct uint4 { unsigned x, y, z, w; };
struct float4 { float x, y, z, w; };

namespace emu {
struct BlockCtx {
  int threads;
  std::unique_ptr<std::barrier<>> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;   // 32 lanes
  std::vector<std::unique_ptr<std::barrier<>>> tiles8;  // 8 lanes
  std::vector<uint64_t> warp_buf, tile_buf;
};
inline thread_local BlockCtx* ctx = nullptr;
}  // namespace emu

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

inline void __syncthreads() { emu::ctx->block->arrive_and_wait(); }
template <class T> T __ldcg(const T* p) { std::atomic_thread_fence(std::memory_order_seq_cst); return *(volatile const T*)p; }
inline uint4 __ldcg(const uint4* p) { std::atomic_thread_fence(std::memory_order_seq_cst); uint4 v; std::memcpy(&v, (const void*)p, 16); return v; }
inline float4 __ldcg(const float4* p) { std::atomic_thread_fence(std::memory_order_seq_cst); float4 v; std::memcpy(&v, (const void*)p, 16); return v; }
template <class T> T __ldg(const T* p) { return *p; }
inline int __ffs(unsigned x) { return __builtin_ffs(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline void __nanosleep(unsigned) { std::this_thread::yield(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline int atomicCAS(int* p, int cmp, int val) { __atomic_compare_exchange_n(p, &cmp, val, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); return cmp; }
inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long cmp, unsigned long long val) {
  __atomic_compare_exchange_n(p, &cmp, val, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); return cmp; }
inline int atomicExch(int* p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned __ballot_sync(unsigned, bool pred) {
  auto* c = emu::ctx; const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
  c->warp_buf[threadIdx.x] = pred; c->warps[w]->arrive_and_wait();
  unsigned m = 0; for (int l = 0; l < 32; ++l) m |= unsigned(c->warp_buf[w * 32 + l] != 0) << l;
  c->warps[w]->arrive_and_wait(); (void)lane; return m;
}

namespace cooperative_groups {
struct thread_block {};
inline thread_block this_thread_block() { return {}; }
template <int N> struct thread_block_tile {
  static_assert(N == 8, "emulated tiles are 8 wide");
  unsigned thread_rank() const { return threadIdx.x % N; }
  unsigned meta_group_rank() const { return threadIdx.x / N; }
  void sync() const { emu::ctx->tiles8[threadIdx.x / N]->arrive_and_wait(); }
  template <class T> T shfl(T v, int src) const {
    auto* c = emu::ctx; uint64_t bits = 0; std::memcpy(&bits, &v, sizeof(T));
    c->tile_buf[threadIdx.x] = bits; sync();
    uint64_t got = c->tile_buf[(threadIdx.x / N) * N + src]; sync();
    T r; std::memcpy(&r, &got, sizeof(T)); return r;
  }
  template <class T> T shfl_xor(T v, int mask) const { return shfl(v, int(thread_rank()) ^ mask); }
  template <class T> T shfl_down(T v, int off) const {
    const int src = int(thread_rank()) + off;
    T r = shfl(v, src < N ? src : int(thread_rank()));
    return r;
  }
};
template <int N> thread_block_tile<N> tiled_partition(thread_block) { return {}; }
}  // namespace cooperative_groups

// ------------------------------------------------------------------ runtime
typedef int cudaError_t;
typedef void* cudaStream_t;
constexpr int cudaSuccess = 0, cudaMemcpyDeviceToHost = 2, cudaHostAllocMapped = 2, cudaHostAllocPortable = 1;
inline const char* cudaGetErrorString(cudaError_t) { return "emu error"; }
inline cudaError_t cudaGetLastError() { return 0; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return 0; }
inline cudaError_t cudaSetDevice(int) { return 0; }
template <class T> cudaError_t cudaMalloc(T** p, size_t n) { *p = (T*)std::malloc(n ? n : 1); std::memset((void*)*p, 0xAB, n); return 0; }
template <class T> cudaError_t cudaMallocAsync(T** p, size_t n, cudaStream_t) { return cudaMalloc(p, n); }
inline cudaError_t cudaFree(void* p) { std::free(p); return 0; }
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t) { std::free(p); return 0; }
inline cudaError_t cudaFreeHost(void* p) { std::free(p); return 0; }
inline cudaError_t cudaHostAlloc(void** p, size_t n, unsigned) { *p = std::malloc(n); std::memset(*p, 0xCD, n); return 0; }
inline cudaError_t cudaHostGetDevicePointer(void** d, void* h, unsigned) { *d = h; return 0; }
inline cudaError_t cudaMemset(void* p, int v, size_t n) { std::memset(p, v, n); return 0; }
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) { std::memset(p, v, n); return 0; }
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, int, cudaStream_t) { std::memcpy(d, s, n); return 0; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return 0; }
inline cudaError_t cudaDeviceSynchronize() { return 0; }

namespace emu {
struct Cfg { unsigned grid, block; };
inline Cfg cfg(unsigned g, unsigned b, size_t = 0, cudaStream_t = nullptr) { return {g, b}; }
template <class F> auto launch(F* fn, Cfg c) {
  // One std::thread per CUDA thread of a block, reused for every block of the grid (blocks run one at a time, so
  // `static` stands in for __shared__).
  return [fn, c](auto... args) {
    if (c.grid == 0) return;
    BlockCtx bc; bc.threads = c.block;
    bc.block = std::make_unique<std::barrier<>>(c.block);
    for (unsigned w = 0; w < c.block / 32; ++w) bc.warps.push_back(std::make_unique<std::barrier<>>(32));
    for (unsigned w = 0; w < c.block / 8; ++w) bc.tiles8.push_back(std::make_unique<std::barrier<>>(8));
    bc.warp_buf.assign(c.block, 0); bc.tile_buf.assign(c.block, 0);
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < c.block; ++t) ts.emplace_back([&, t] {
      emu::ctx = &bc; threadIdx = dim3(t); blockDim = dim3(c.block); gridDim = dim3(c.grid);
      for (unsigned b = 0; b < c.grid; ++b) {
        blockIdx = dim3(b);
        fn(args...);
        bc.block->arrive_and_wait();  // the block is done before the next one starts
      }
    });
    for (auto& th : ts) th.join();
  };
}
}  // namespace emu
