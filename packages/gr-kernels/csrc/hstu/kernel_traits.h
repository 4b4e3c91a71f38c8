// Tile shapes and shared-memory layout of the HSTU forward kernel.
//
// One CTA computes BLOCK_M query rows of one (sequence, head); each of its warps owns 16 rows and runs the
// m16n8k16 tensor-core MMA (CuTe's SM80 atoms, which sm90 executes natively). Tiles live in shared memory as
// rows of 16-byte chunks with an XOR swizzle (chunk ^ row % 8), so ldmatrix reads 8 rows without bank conflicts.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cute/arch/copy_sm75.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cute/arch/mma_sm80.hpp>

namespace gr_kernels {

template <typename Element>
struct MmaAtom;

template <>
struct MmaAtom<__nv_bfloat16> {
  using Op = cute::SM80_16x8x16_F32BF16BF16F32_TN;
};

template <>
struct MmaAtom<__half> {
  using Op = cute::SM80_16x8x16_F32F16F16F32_TN;
};

template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_>
struct HstuFwdTraits {
  using Element = Element_;
  using Mma = typename MmaAtom<Element>::Op;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kWarps = kBlockM / 16;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kChunksPerRow = kHeadDim / 8;  // 16-byte chunks of 8 elements
  static_assert(kHeadDim % 64 == 0, "head dim must be a multiple of 64 (swizzle spans 8 chunks)");
  static_assert(kBlockN % 16 == 0, "key tile must be a multiple of 16");

  static constexpr int kTileQElems = kBlockM * kHeadDim;
  static constexpr int kTileKVElems = kBlockN * kHeadDim;
  static constexpr int kSmemBytes = (kTileQElems + 2 * kTileKVElems) * int(sizeof(Element));

  // Element offset of (row, col) inside a swizzled tile; col is a multiple of 8 for chunk addresses.
  __device__ __forceinline__ static int swizzle(int row, int col) {
    return row * kHeadDim + (((col >> 3) ^ (row & 7)) << 3) + (col & 7);
  }
};

// Backward: one CTA owns kBlockN keys (16 per warp) of one (sequence, head) and walks the query tiles of kBlockM
// rows that can see them, accumulating dK and dV in registers; dQ partials go to an fp32 buffer with atomics.
template <typename Element_, int kHeadDim_>
struct HstuBwdTraits {
  using Element = Element_;
  using Mma = typename MmaAtom<Element>::Op;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockN = 64;  // keys per CTA
  static constexpr int kBlockM = 32;  // queries per step
  static constexpr int kWarps = kBlockN / 16;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kChunksPerRow = kHeadDim / 8;
  static_assert(kHeadDim % 64 == 0, "head dim must be a multiple of 64 (swizzle spans 8 chunks)");
  static constexpr int kDxStride = kBlockM + 8;  // padded rows of the dX^T tile: conflict-free ldmatrix
  static constexpr int kSmemElems = 2 * kBlockN * kHeadDim + 2 * kBlockM * kHeadDim + kBlockN * kDxStride;
  static constexpr int kSmemBytes = kSmemElems * int(sizeof(Element));

  __device__ __forceinline__ static int swizzle(int row, int col) {
    return row * kHeadDim + (((col >> 3) ^ (row & 7)) << 3) + (col & 7);
  }
};

}  // namespace gr_kernels
