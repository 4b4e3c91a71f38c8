// Random 256-byte row reads from mapped host memory, three ways of allocating it: cudaHostAlloc, transparent huge
// pages + cudaHostRegister, hugetlbfs 2 MiB pages + cudaHostRegister (1 and 4 GiB). The host-tier check behind
// docs/benchmarks/dynemb_hybrid.md: does the page size of the host memory change what the GPU reads from it?
//   nvcc -O2 -arch=sm_90 tools/host_memory_gather.cu -o /tmp/host_memory_gather
//   echo 2200 > /proc/sys/vm/nr_hugepages   # as root, for the hugetlbfs case
//   /tmp/host_memory_gather
#include <cstdio>
#include <cstring>
#include <sys/mman.h>
#include <cuda_runtime.h>
__global__ void gather(const float4* rows, long nrows, const long* idx, long n, float4* out) {
  long g = (blockIdx.x * (long)blockDim.x + threadIdx.x);
  long key = g / 16; int lane = g % 16;
  if (key >= n) return;
  out[key * 16 + lane] = rows[idx[key] * 16 + lane];
}
__global__ void make_idx(long* idx, long n, long nrows) {
  long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
  if (i < n) { unsigned long long x = i * 0x9e3779b97f4a7c15ULL; x ^= x >> 31; x *= 0xbf58476d1ce4e5b9ULL; x ^= x >> 29; idx[i] = x % nrows; }
}
double run(const char* name, float4* host, long nrows) {
  float4* dev; cudaHostGetDevicePointer((void**)&dev, host, 0);
  long n = 1 << 22; long* idx; float4* out;
  cudaMalloc(&idx, n * 8); cudaMalloc(&out, n * 256);
  make_idx<<<(n + 255) / 256, 256>>>(idx, n, nrows);
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  gather<<<(n * 16 + 255) / 256, 256>>>(dev, nrows, idx, n, out);
  cudaEventRecord(a);
  for (int r = 0; r < 3; ++r) gather<<<(n * 16 + 255) / 256, 256>>>(dev, nrows, idx, n, out);
  cudaEventRecord(b); cudaEventSynchronize(b);
  float ms; cudaEventElapsedTime(&ms, a, b);
  double gbs = 3.0 * n * 256 / (ms / 1e3) / 1e9;
  printf("%-28s %6.1f GiB host: %6.1f GB/s (%s)\n", name, nrows * 256.0 / (1 << 30), gbs, cudaGetErrorString(cudaGetLastError()));
  cudaFree(idx); cudaFree(out);
  return gbs;
}
int main() {
  for (long gib : {1L, 4L}) {
    long bytes = gib << 30, nrows = bytes / 256;
    float4* h; cudaHostAlloc((void**)&h, bytes, cudaHostAllocMapped | cudaHostAllocPortable); memset(h, 0, bytes);
    run("cudaHostAlloc", h, nrows); cudaFreeHost(h);
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    int adv = madvise(p, bytes, MADV_HUGEPAGE); memset(p, 0, bytes);
    cudaError_t e = cudaHostRegister(p, bytes, cudaHostRegisterMapped | cudaHostRegisterPortable);
    printf("THP madvise %d register %s\n", adv, cudaGetErrorString(e));
    if (e == cudaSuccess) { run("mmap+THP+register", (float4*)p, nrows); cudaHostUnregister(p); }
    munmap(p, bytes);
    p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
    if (p == MAP_FAILED) { printf("MAP_HUGETLB failed\n"); continue; }
    memset(p, 0, bytes);
    e = cudaHostRegister(p, bytes, cudaHostRegisterMapped | cudaHostRegisterPortable);
    printf("hugetlb register %s\n", cudaGetErrorString(e));
    if (e == cudaSuccess) { run("mmap+hugetlb+register", (float4*)p, nrows); cudaHostUnregister(p); }
    munmap(p, bytes);
  }
}
