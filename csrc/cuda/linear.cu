// linear_update / linear_grad_sqnorm: a tiled GEMM G = dyᵀx whose tile never leaves registers. The
// update kernel applies the rule of lomo_math.h to the matching tile of W in its epilogue; the norm
// kernel reduces the tile's norm terms into the stats buffer. No weight-sized gradient exists.
//
// Tiling: a block of 16x16 threads owns a 64x64 tile of G (rows m of W, columns n of W), each thread
// 4x4 entries at m = ty + 16i, n = tx + 16j, so a warp's accesses to W are 16 consecutive columns.
// The K loop runs over tokens in steps of 16: both operands are rows of dy / x, contiguous along m /
// n, so the shared-memory loads are coalesced; they are converted to fp32 on the way in.
#include "common.cuh"

namespace lomo {
namespace cuda {
namespace {

constexpr int kTile = 64;         // rows and columns of G per block
constexpr int kTileK = 16;        // tokens per shared-memory step
constexpr int kThreadsSide = 16;  // threads per block side
constexpr int kPerThread = kTile / kThreadsSide;
constexpr int kThreads = kThreadsSide * kThreadsSide;
constexpr int kLoadsPerThread = kTileK * kTile / kThreads;

// Accumulates this thread's 4x4 entries of G = dyᵀx for the tile at (m0, n0) over all tokens.
template <class A>
__device__ __forceinline__ void gradient_tile(const A* __restrict__ dy, const A* __restrict__ x, int64_t tokens,
                                              int64_t out_features, int64_t in_features, int64_t m0, int64_t n0,
                                              float (&acc)[kPerThread][kPerThread]) {
  __shared__ float dy_tile[kTileK][kTile];
  __shared__ float x_tile[kTileK][kTile];
  const int tx = threadIdx.x % kThreadsSide, ty = threadIdx.x / kThreadsSide;
  for (int64_t k0 = 0; k0 < tokens; k0 += kTileK) {
#pragma unroll
    for (int l = 0; l < kLoadsPerThread; ++l) {
      const int e = threadIdx.x + l * kThreads;
      const int k = e / kTile, c = e % kTile;
      const int64_t t = k0 + k, m = m0 + c, n = n0 + c;
      dy_tile[k][c] = (t < tokens && m < out_features) ? to_float(dy[t * out_features + m]) : 0.0f;
      x_tile[k][c] = (t < tokens && n < in_features) ? to_float(x[t * in_features + n]) : 0.0f;
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

template <class W, class A>
__global__ void __launch_bounds__(kThreads)
    linear_update_kernel(W* __restrict__ w, const A* __restrict__ x, const A* __restrict__ dy, int64_t tokens,
                         int64_t out_features, int64_t in_features, Rule rule) {
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTile, n0 = static_cast<int64_t>(blockIdx.x) * kTile;
  float acc[kPerThread][kPerThread] = {};
  gradient_tile(dy, x, tokens, out_features, in_features, m0, n0, acc);
  const int tx = threadIdx.x % kThreadsSide, ty = threadIdx.x / kThreadsSide;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int64_t m = m0 + ty + kThreadsSide * i;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t n = n0 + tx + kThreadsSide * j;
      if (m < out_features && n < in_features) {
        const int64_t flat = m * in_features + n;
        update_element(w + flat, acc[i][j], static_cast<uint64_t>(flat), rule);
      }
    }
  }
}

template <class A>
__global__ void __launch_bounds__(kThreads)
    linear_grad_sqnorm_kernel(float* __restrict__ stats, const A* __restrict__ x, const A* __restrict__ dy,
                              int64_t tokens, int64_t out_features, int64_t in_features, float inv_loss_scale) {
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTile, n0 = static_cast<int64_t>(blockIdx.x) * kTile;
  float acc[kPerThread][kPerThread] = {};
  gradient_tile(dy, x, tokens, out_features, in_features, m0, n0, acc);
  const int tx = threadIdx.x % kThreadsSide, ty = threadIdx.x / kThreadsSide;
  float square = 0.0f, nonfinite = 0.0f;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      if (m0 + ty + kThreadsSide * i < out_features && n0 + tx + kThreadsSide * j < in_features) {
        const NormTerm term = norm_term(acc[i][j], inv_loss_scale);
        square += term.square;
        nonfinite += term.nonfinite ? 1.0f : 0.0f;
      }
    }
  }
  block_add_to_stats(square, nonfinite, stats);
}

// The grid of 64x64 tiles over W; throws if W has more rows than gridDim.y can index.
dim3 tile_grid(int64_t out_features, int64_t in_features) {
  const int64_t row_tiles = (out_features + kTile - 1) / kTile, col_tiles = (in_features + kTile - 1) / kTile;
  if (row_tiles > 65535) {
    throw std::invalid_argument("lomo_kernels CUDA linear: out_features " + std::to_string(out_features) +
                                " exceeds the supported " + std::to_string(65535 * kTile));
  }
  return dim3(static_cast<unsigned>(col_tiles), static_cast<unsigned>(row_tiles));
}

}  // namespace

void linear_update(const Launch& launch, void* w, DType w_dtype, const void* x, const void* dy, DType act_dtype,
                   int64_t tokens, int64_t out_features, int64_t in_features, const Rule& rule) {
  if (out_features == 0 || in_features == 0) return;
  const dim3 grid = tile_grid(out_features, in_features);
  DeviceScope scope(launch.device);
  visit_dtype(w_dtype, [&](auto w_elem) {
    using W = decltype(w_elem);
    visit_dtype(act_dtype, [&](auto a_elem) {
      using A = decltype(a_elem);
      linear_update_kernel<W, A><<<grid, kThreads, 0, stream_of(launch)>>>(
          static_cast<W*>(w), static_cast<const A*>(x), static_cast<const A*>(dy), tokens, out_features, in_features,
          rule);
    });
  });
  check(cudaGetLastError(), "linear_update launch");
}

void linear_grad_sqnorm(const Launch& launch, float* stats, const void* x, const void* dy, DType act_dtype,
                        int64_t tokens, int64_t out_features, int64_t in_features, float inv_loss_scale) {
  if (out_features == 0 || in_features == 0) return;
  const dim3 grid = tile_grid(out_features, in_features);
  DeviceScope scope(launch.device);
  visit_dtype(act_dtype, [&](auto a_elem) {
    using A = decltype(a_elem);
    linear_grad_sqnorm_kernel<A><<<grid, kThreads, 0, stream_of(launch)>>>(
        stats, static_cast<const A*>(x), static_cast<const A*>(dy), tokens, out_features, in_features,
        inv_loss_scale);
  });
  check(cudaGetLastError(), "linear_grad_sqnorm launch");
}

}  // namespace cuda
}  // namespace lomo
