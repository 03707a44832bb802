// linear_update / linear_grad_sqnorm: a tiled GEMM G = dyᵀx whose tile never leaves registers (the
// tiles of gemm_tiles.cuh). The update kernels apply the rule of lomo_math.h to the matching tile of W in
// their epilogue; the norm kernels reduce the tile's norm terms into the stats buffer. No weight-sized
// gradient exists.
#include "gemm_tiles.cuh"

namespace lomo {
namespace cuda {
namespace {

template <class W>
__global__ void __launch_bounds__(kThreads)
    fma_update_kernel(W* __restrict__ w, const float* __restrict__ x, const float* __restrict__ dy, int64_t tokens,
                      int64_t out_features, int64_t in_features, Rule rule, unsigned long long* nonfinite) {
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTile, n0 = static_cast<int64_t>(blockIdx.x) * kTile;
  float acc[kPerThread][kPerThread] = {};
  fma_gradient_tile(dy, x, tokens, out_features, in_features, m0, n0, acc);
  const int tx = threadIdx.x % kThreadsSide, ty = threadIdx.x / kThreadsSide;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int64_t m = m0 + ty + kThreadsSide * i;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t n = n0 + tx + kThreadsSide * j;
      if (m < out_features && n < in_features) {
        const int64_t flat = m * in_features + n;
        update_counted(w + flat, acc[i][j], static_cast<uint64_t>(flat), rule, nonfinite);
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    fma_grad_sqnorm_kernel(float* __restrict__ stats, const float* __restrict__ x, const float* __restrict__ dy,
                           int64_t tokens, int64_t out_features, int64_t in_features, float inv_loss_scale) {
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTile, n0 = static_cast<int64_t>(blockIdx.x) * kTile;
  float acc[kPerThread][kPerThread] = {};
  fma_gradient_tile(dy, x, tokens, out_features, in_features, m0, n0, acc);
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


template <class W, class A>
__global__ void __launch_bounds__(kTcThreads)
    tc_update_kernel(W* __restrict__ w, const A* __restrict__ x, const A* __restrict__ dy, int64_t tokens,
                     int64_t out_features, int64_t in_features, bool vector, Rule rule,
                     unsigned long long* nonfinite) {
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTcTile, n0 = static_cast<int64_t>(blockIdx.x) * kTcTile;
  float acc[kTcFragsM][kTcFragsN][4] = {};
  tc_gradient_tile(dy, x, tokens, out_features, in_features, m0, n0, vector, acc);
  tc_for_each_entry(acc, out_features, in_features, m0, n0, [&](int64_t m, int64_t n, float g) {
    const int64_t flat = m * in_features + n;
    update_counted(w + flat, g, static_cast<uint64_t>(flat), rule, nonfinite);
  });
}

template <class A>
__global__ void __launch_bounds__(kTcThreads)
    tc_grad_sqnorm_kernel(float* __restrict__ stats, const A* __restrict__ x, const A* __restrict__ dy,
                          int64_t tokens, int64_t out_features, int64_t in_features, bool vector,
                          float inv_loss_scale) {
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTcTile, n0 = static_cast<int64_t>(blockIdx.x) * kTcTile;
  float acc[kTcFragsM][kTcFragsN][4] = {};
  tc_gradient_tile(dy, x, tokens, out_features, in_features, m0, n0, vector, acc);
  float square = 0.0f, nonfinite = 0.0f;
  tc_for_each_entry(acc, out_features, in_features, m0, n0, [&](int64_t, int64_t, float g) {
    const NormTerm term = norm_term(g, inv_loss_scale);
    square += term.square;
    nonfinite += term.nonfinite ? 1.0f : 0.0f;
  });
  block_add_to_stats(square, nonfinite, stats);
}


}  // namespace

void linear_update(const Launch& launch, void* w, DType w_dtype, const void* x, const void* dy, DType act_dtype,
                   int64_t tokens, int64_t out_features, int64_t in_features, const Rule& rule,
                   unsigned long long* nonfinite) {
  if (out_features == 0 || in_features == 0) return;
  DeviceScope scope(launch.device);
  const cudaStream_t stream = stream_of(launch);
  visit_dtype(w_dtype, [&](auto w_elem) {
    using W = decltype(w_elem);
    if (act_dtype == DType::f32) {
      fma_update_kernel<W><<<tile_grid(out_features, in_features, kTile), kThreads, 0, stream>>>(
          static_cast<W*>(w), static_cast<const float*>(x), static_cast<const float*>(dy), tokens, out_features,
          in_features, rule, nonfinite);
      return;
    }
    const bool vector = vector_loads(x, dy, out_features, in_features);
    const dim3 grid = tile_grid(out_features, in_features, kTcTile);
    auto launch_tc = [&](auto a_elem) {
      using A = decltype(a_elem);
      allow_tc_shared(tc_update_kernel<W, A>);
      tc_update_kernel<W, A><<<grid, kTcThreads, kTcSharedBytes, stream>>>(
          static_cast<W*>(w), static_cast<const A*>(x), static_cast<const A*>(dy), tokens, out_features, in_features,
          vector, rule, nonfinite);
    };
    if (act_dtype == DType::bf16) {
      launch_tc(bf16{});
    } else {
      launch_tc(fp16{});
    }
  });
  check(cudaGetLastError(), "linear_update launch");
}

void linear_grad_sqnorm(const Launch& launch, float* stats, const void* x, const void* dy, DType act_dtype,
                        int64_t tokens, int64_t out_features, int64_t in_features, float inv_loss_scale) {
  if (out_features == 0 || in_features == 0) return;
  DeviceScope scope(launch.device);
  const cudaStream_t stream = stream_of(launch);
  if (act_dtype == DType::f32) {
    fma_grad_sqnorm_kernel<<<tile_grid(out_features, in_features, kTile), kThreads, 0, stream>>>(
        stats, static_cast<const float*>(x), static_cast<const float*>(dy), tokens, out_features, in_features,
        inv_loss_scale);
  } else {
    const bool vector = vector_loads(x, dy, out_features, in_features);
    const dim3 grid = tile_grid(out_features, in_features, kTcTile);
    auto launch_tc = [&](auto a_elem) {
      using A = decltype(a_elem);
      allow_tc_shared(tc_grad_sqnorm_kernel<A>);
      tc_grad_sqnorm_kernel<A><<<grid, kTcThreads, kTcSharedBytes, stream>>>(
          stats, static_cast<const A*>(x), static_cast<const A*>(dy), tokens, out_features, in_features, vector,
          inv_loss_scale);
    };
    if (act_dtype == DType::bf16) {
      launch_tc(bf16{});
    } else {
      launch_tc(fp16{});
    }
  }
  check(cudaGetLastError(), "linear_grad_sqnorm launch");
}

}  // namespace cuda
}  // namespace lomo
