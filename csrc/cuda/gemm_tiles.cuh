// The weight-gradient GEMM tiles shared by the linear kernels (linear.cu) and the AdamW kernels
// (adamw.cu): G = dyᵀx accumulated tile by tile in registers, never stored.
//
// bf16 / fp16 activations: tensor cores (tc_*). A block of 8 warps owns a 128x128 tile of G (rows m of
// W, columns n of W), each warp 64x32 of it as 4x4 m16n8 MMA tiles (64 fp32 accumulators per thread).
// The K loop runs over tokens 32 at a time through a 3-stage shared-memory ring filled by cp.async
// (16-byte chunks, zero-filled past the edges), so the loads of step k+2 overlap the MMAs of step k.
// Both operands are MN-major (rows of dy and x), which ldmatrix.trans turns into the MMA's fragments.
// Shapes whose rows are not 16-byte aligned (out or in not a multiple of 8) take the same path with
// plain bounds-checked loads into shared memory instead of cp.async.
//
// fp32 activations: the SIMT tile (fma_*) in full fp32 (no tf32), as the torch reference. A block of
// 16x16 threads owns a 64x64 tile, each thread 4x4 entries at m = ty + 16i, n = tx + 16j. The K loop
// runs over tokens in steps of 16 through shared memory.
#pragma once

#include <string>

#include "common.cuh"
#include "mma.cuh"

namespace lomo {
namespace cuda {

// ---- fp32 activations: SIMT FMA GEMM ---------------------------------------------------------------

constexpr int kTile = 64;         // rows and columns of G per block
constexpr int kTileK = 16;        // tokens per shared-memory step
constexpr int kThreadsSide = 16;  // threads per block side
constexpr int kPerThread = kTile / kThreadsSide;
constexpr int kThreads = kThreadsSide * kThreadsSide;
constexpr int kLoadsPerThread = kTileK * kTile / kThreads;

// Accumulates this thread's 4x4 entries of G = dyᵀx for the tile at (m0, n0) over all tokens.
__device__ __forceinline__ void fma_gradient_tile(const float* __restrict__ dy, const float* __restrict__ x,
                                                  int64_t tokens, int64_t out_features, int64_t in_features,
                                                  int64_t m0, int64_t n0, float (&acc)[kPerThread][kPerThread]) {
  __shared__ float dy_tile[kTileK][kTile];
  __shared__ float x_tile[kTileK][kTile];
  const int tx = threadIdx.x % kThreadsSide, ty = threadIdx.x / kThreadsSide;
  for (int64_t k0 = 0; k0 < tokens; k0 += kTileK) {
#pragma unroll
    for (int l = 0; l < kLoadsPerThread; ++l) {
      const int e = threadIdx.x + l * kThreads;
      const int k = e / kTile, c = e % kTile;
      const int64_t t = k0 + k, m = m0 + c, n = n0 + c;
      dy_tile[k][c] = (t < tokens && m < out_features) ? dy[t * out_features + m] : 0.0f;
      x_tile[k][c] = (t < tokens && n < in_features) ? x[t * in_features + n] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kTileK; ++k) {
      float a[kPerThread], b[kPerThread];
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        a[i] = dy_tile[k][ty + kThreadsSide * i];
        b[i] = x_tile[k][tx + kThreadsSide * i];
      }
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
#pragma unroll
        for (int j = 0; j < kPerThread; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }
    __syncthreads();
  }
}

// ---- bf16 / fp16 activations: tensor cores -------------------------------------------------------

constexpr int kTcTile = 128;                                 // rows and columns of G per block
constexpr int kTcK = 32;                                     // tokens per pipeline stage
constexpr int kTcStages = 3;                                 // shared-memory ring depth
constexpr int kTcWarpsM = 2, kTcWarpsN = 4;                  // warp grid over the block tile
constexpr int kTcThreads = 32 * kTcWarpsM * kTcWarpsN;       // 256
constexpr int kTcWarpM = kTcTile / kTcWarpsM;                // 64 rows per warp
constexpr int kTcWarpN = kTcTile / kTcWarpsN;                // 32 columns per warp
constexpr int kTcFragsM = kTcWarpM / 16, kTcFragsN = kTcWarpN / 8;  // 4 x 4 MMA tiles per warp
constexpr int kTcPitch = kTcTile + 8;  // elements per shared row: 272 B, so ldmatrix's 8 rows hit distinct banks
constexpr int kTcStageElems = kTcK * kTcPitch;               // one operand's stage
constexpr int kTcChunks = kTcK * kTcTile / 8;                // 16-byte chunks per operand and stage
constexpr size_t kTcSharedBytes = 2u * kTcStages * kTcStageElems * 2u;  // 52 KiB: dynamic shared memory
static_assert(kTcChunks % kTcThreads == 0, "every thread copies the same number of chunks");

// One operand's stage: tokens t0 .. t0+kTcK of rows [t][c0 .. c0+kTcTile) of src [tokens, cols] into
// dst[k][c] (pitch kTcPitch); zeros past the edges. `vector`: cols % 8 == 0 and src 16-byte aligned, so
// each 16-byte chunk is wholly inside or wholly outside and cp.async can copy it.
template <class A>
__device__ __forceinline__ void tc_load_operand(A* __restrict__ dst, const A* __restrict__ src, int64_t tokens,
                                                int64_t cols, int64_t t0, int64_t c0, bool vector) {
#pragma unroll
  for (int l = 0; l < kTcChunks / kTcThreads; ++l) {
    const int chunk = threadIdx.x + l * kTcThreads;
    const int k = chunk / (kTcTile / 8), c = (chunk % (kTcTile / 8)) * 8;
    const int64_t t = t0 + k, col = c0 + c;
    A* out = dst + k * kTcPitch + c;
    if (vector) {
      const bool inside = t < tokens && col < cols;
      mma::cp_async_16(mma::shared_address(out), inside ? src + t * cols + col : src, inside ? 16 : 0);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) out[e] = (t < tokens && col + e < cols) ? src[t * cols + col + e] : A{0};
    }
  }
}

// This thread's accumulators of G = dyᵀx for the block tile at (m0, n0): acc[i][j] is the m16n8 tile
// (warp row offset + 16i, warp column offset + 8j), in the C fragment layout of mma.cuh.
template <class A>
__device__ __forceinline__ void tc_gradient_tile(const A* __restrict__ dy, const A* __restrict__ x, int64_t tokens,
                                                 int64_t out_features, int64_t in_features, int64_t m0, int64_t n0,
                                                 bool vector, float (&acc)[kTcFragsM][kTcFragsN][4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // mma.sync on bf16 / cp.async need sm_80; the build targets sm_80 and newer
#else
  extern __shared__ __align__(16) unsigned char tc_shared[];
  A* dy_ring = reinterpret_cast<A*>(tc_shared);
  A* x_ring = dy_ring + kTcStages * kTcStageElems;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_m = (warp / kTcWarpsN) * kTcWarpM, warp_n = (warp % kTcWarpsN) * kTcWarpN;
  const int64_t steps = (tokens + kTcK - 1) / kTcK;

  auto load_stage = [&](int64_t step) {
    const int slot = static_cast<int>(step % kTcStages);
    tc_load_operand(dy_ring + slot * kTcStageElems, dy, tokens, out_features, step * kTcK, m0, vector);
    tc_load_operand(x_ring + slot * kTcStageElems, x, tokens, in_features, step * kTcK, n0, vector);
  };
#pragma unroll
  for (int s = 0; s < kTcStages - 1; ++s) {
    if (s < steps) load_stage(s);
    mma::cp_async_commit();  // empty groups too: the wait below counts groups
  }
  // ldmatrix addressing: lane l gives row l % 8 of matrix l / 8.
  const int row = lane % 8, quad = lane / 8;
  for (int64_t step = 0; step < steps; ++step) {
    mma::cp_async_wait<kTcStages - 2>();  // this step's stage has landed (for this thread's copies) ...
    __syncthreads();                      // ... and everyone's; the slot refilled next was read last step
    if (step + kTcStages - 1 < steps) load_stage(step + kTcStages - 1);
    mma::cp_async_commit();
    const int slot = static_cast<int>(step % kTcStages);
    const A* a_stage = dy_ring + slot * kTcStageElems;
    const A* b_stage = x_ring + slot * kTcStageElems;
#pragma unroll
    for (int kk = 0; kk < kTcK; kk += 16) {
      uint32_t a[kTcFragsM][4], b[kTcFragsN][2];
#pragma unroll
      for (int i = 0; i < kTcFragsM; ++i) {
        // a0..a3 = stored blocks (k 0-7, m 0-7), (k 0-7, m 8-15), (k 8-15, m 0-7), (k 8-15, m 8-15)
        const A* p = a_stage + (kk + (quad / 2) * 8 + row) * kTcPitch + warp_m + 16 * i + (quad % 2) * 8;
        mma::ldmatrix_x4_trans(a[i], mma::shared_address(p));
      }
#pragma unroll
      for (int j = 0; j < kTcFragsN; j += 2) {
        // b0, b1 of tile j, then of tile j + 1 = stored blocks (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), ...
        uint32_t r[4];
        const A* p = b_stage + (kk + (quad % 2) * 8 + row) * kTcPitch + warp_n + 8 * j + (quad / 2) * 8;
        mma::ldmatrix_x4_trans(r, mma::shared_address(p));
        b[j][0] = r[0];
        b[j][1] = r[1];
        b[j + 1][0] = r[2];
        b[j + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < kTcFragsM; ++i) {
#pragma unroll
        for (int j = 0; j < kTcFragsN; ++j) mma::Mma<A>::run(acc[i][j], a[i], b[j]);
      }
    }
  }
  mma::cp_async_wait<0>();
#endif
}

// Calls fn(m, n, g) for each of this thread's accumulators inside W [out_features, in_features].
template <class Fn>
__device__ __forceinline__ void tc_for_each_entry(const float (&acc)[kTcFragsM][kTcFragsN][4], int64_t out_features,
                                                  int64_t in_features, int64_t m0, int64_t n0, Fn&& fn) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row0 = m0 + (warp / kTcWarpsN) * kTcWarpM + lane / 4;
  const int64_t col0 = n0 + (warp % kTcWarpsN) * kTcWarpN + 2 * (lane % 4);
#pragma unroll
  for (int i = 0; i < kTcFragsM; ++i) {
#pragma unroll
    for (int j = 0; j < kTcFragsN; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t m = row0 + 16 * i + 8 * (e / 2), n = col0 + 8 * j + (e % 2);
        if (m < out_features && n < in_features) fn(m, n, acc[i][j][e]);
      }
    }
  }
}

// ---- launch helpers ------------------------------------------------------------------------------

// The grid of tile x tile blocks over W; throws if W has more rows than gridDim.y can index.
inline dim3 tile_grid(int64_t out_features, int64_t in_features, int tile) {
  const int64_t row_tiles = (out_features + tile - 1) / tile, col_tiles = (in_features + tile - 1) / tile;
  if (row_tiles > 65535) {
    throw std::invalid_argument("lomo_kernels CUDA linear: out_features " + std::to_string(out_features) +
                                " exceeds the supported " + std::to_string(65535LL * tile));
  }
  return dim3(static_cast<unsigned>(col_tiles), static_cast<unsigned>(row_tiles));
}

// Whether the tensor-core kernels may use 16-byte cp.async on rows of dy [T, out] and x [T, in].
inline bool vector_loads(const void* x, const void* dy, int64_t out_features, int64_t in_features) {
  return out_features % 8 == 0 && in_features % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(dy) % 16 == 0;
}

// Allows `kernel` its dynamic shared memory (over the 48 KiB default) on the current device.
template <class Kernel>
void allow_tc_shared(Kernel kernel) {
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(kTcSharedBytes)),
        "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
}

}  // namespace cuda
}  // namespace lomo
