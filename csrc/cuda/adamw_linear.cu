// adamw_linear_update on CUDA (lomo_kernels.ops.adamw_update): the tiles of gemm_tiles.cuh (tensor cores
// for bf16/fp16 activations, SIMT fp32 otherwise) accumulate G = dyᵀx in registers; the epilogue loads
// the matching entries of W, m and v, applies adam_element of lomo_math.h (the math the CPU build runs
// and tests bit for bit against the torch reference: all three kept when any new value is not finite)
// and stores them. No weight-sized gradient exists.
//
// Tensor-core kernels exist for fp32 weights (master weights under bf16/fp16 autocast) with either
// 16-bit activation dtype, and for 16-bit weights with activations of the weight's own dtype; each
// instance inlines the AdamW epilogue 64 times (every accumulator), so the four combinations no model
// produces (bf16 weights with fp16 activations and the reverse) are not compiled and are refused.
#include <stdexcept>
#include <type_traits>

#include "gemm_tiles.cuh"

namespace lomo {
namespace cuda {
namespace {

template <class W, class S>
__global__ void __launch_bounds__(kThreads)
    adamw_fma_kernel(W* __restrict__ w, S* __restrict__ m, S* __restrict__ v, const float* __restrict__ x,
                     const float* __restrict__ dy, int64_t tokens, int64_t out_features, int64_t in_features,
                     AdamRule rule, unsigned long long* nonfinite) {
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTile, n0 = static_cast<int64_t>(blockIdx.x) * kTile;
  float acc[kPerThread][kPerThread] = {};
  fma_gradient_tile(dy, x, tokens, out_features, in_features, m0, n0, acc);
  const int tx = threadIdx.x % kThreadsSide, ty = threadIdx.x / kThreadsSide;
  unsigned bad = 0;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int64_t row = m0 + ty + kThreadsSide * i;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t col = n0 + tx + kThreadsSide * j;
      if (row < out_features && col < in_features) {
        const int64_t flat = row * in_features + col;
        bad += adam_element(w + flat, m + flat, v + flat, acc[i][j], static_cast<uint64_t>(flat), rule);
      }
    }
  }
  add_count(bad, nonfinite);
}

template <class W, class S, class A>
__global__ void __launch_bounds__(kTcThreads)
    adamw_tc_kernel(W* __restrict__ w, S* __restrict__ m, S* __restrict__ v, const A* __restrict__ x,
                    const A* __restrict__ dy, int64_t tokens, int64_t out_features, int64_t in_features, bool vector,
                    AdamRule rule, unsigned long long* nonfinite) {
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTcTile, n0 = static_cast<int64_t>(blockIdx.x) * kTcTile;
  float acc[kTcFragsM][kTcFragsN][4] = {};
  tc_gradient_tile(dy, x, tokens, out_features, in_features, m0, n0, vector, acc);
  unsigned bad = 0;
  tc_for_each_entry(acc, out_features, in_features, m0, n0, [&](int64_t row, int64_t col, float g) {
    const int64_t flat = row * in_features + col;
    bad += adam_element(w + flat, m + flat, v + flat, g, static_cast<uint64_t>(flat), rule);
  });
  add_count(bad, nonfinite);
}

}  // namespace

void adamw_linear_update(const Launch& launch, void* w, DType w_dtype, void* m, void* v, DType s_dtype, const void* x,
                         const void* dy, DType act_dtype, int64_t tokens, int64_t out_features, int64_t in_features,
                         const AdamRule& rule, unsigned long long* nonfinite) {
  if (out_features == 0 || in_features == 0) return;
  DeviceScope scope(launch.device);
  const cudaStream_t stream = stream_of(launch);
  visit_adam(w_dtype, s_dtype, [&](auto w_elem, auto s_elem) {
    using W = decltype(w_elem);
    using S = decltype(s_elem);
    if (act_dtype == DType::f32) {
      adamw_fma_kernel<W, S><<<tile_grid(out_features, in_features, kTile), kThreads, 0, stream>>>(
          static_cast<W*>(w), static_cast<S*>(m), static_cast<S*>(v), static_cast<const float*>(x),
          static_cast<const float*>(dy), tokens, out_features, in_features, rule, nonfinite);
      return;
    }
    const bool vector = vector_loads(x, dy, out_features, in_features);
    const dim3 grid = tile_grid(out_features, in_features, kTcTile);
    auto launch_tc = [&](auto a_elem) {
      using A = decltype(a_elem);
      allow_tc_shared(adamw_tc_kernel<W, S, A>);
      adamw_tc_kernel<W, S, A><<<grid, kTcThreads, kTcSharedBytes, stream>>>(
          static_cast<W*>(w), static_cast<S*>(m), static_cast<S*>(v), static_cast<const A*>(x),
          static_cast<const A*>(dy), tokens, out_features, in_features, vector, rule, nonfinite);
    };
    if constexpr (std::is_same_v<W, float>) {
      if (act_dtype == DType::bf16) {
        launch_tc(bf16{});
      } else {
        launch_tc(fp16{});
      }
    } else {
      if ((std::is_same_v<W, bf16> ? DType::bf16 : DType::f16) != act_dtype) {
        throw std::invalid_argument("lomo_kernels CUDA adamw_linear_update: 16-bit weights need activations of "
                                    "the weight's own dtype (bf16 with bf16, fp16 with fp16)");
      }
      launch_tc(W{});
    }
  });
  check(cudaGetLastError(), "adamw_linear_update launch");
}

}  // namespace cuda
}  // namespace lomo
