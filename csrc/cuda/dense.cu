// dense_update / dense_grad_sqnorm: grid-stride elementwise loops over a flat parameter and its
// already-built gradient (norm weights, biases), applying the rule of lomo_math.h.
#include "common.cuh"

namespace lomo {
namespace cuda {
namespace {

template <class P, class G>
__global__ void __launch_bounds__(kReduceThreads)
    dense_update_kernel(P* __restrict__ p, const G* __restrict__ g, int64_t count, Rule rule,
                        unsigned long long* nonfinite) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    update_counted(p + i, to_float(g[i]), static_cast<uint64_t>(i), rule, nonfinite);
  }
}

template <class G>
__global__ void __launch_bounds__(kReduceThreads)
    dense_grad_sqnorm_kernel(float* __restrict__ stats, const G* __restrict__ g, int64_t count, float inv_loss_scale) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  float square = 0.0f, nonfinite = 0.0f;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    const NormTerm term = norm_term(to_float(g[i]), inv_loss_scale);
    square += term.square;
    nonfinite += term.nonfinite ? 1.0f : 0.0f;
  }
  block_add_to_stats(square, nonfinite, stats);
}

}  // namespace

void dense_update(const Launch& launch, void* p, DType p_dtype, const void* g, DType g_dtype, int64_t count,
                  const Rule& rule, unsigned long long* nonfinite) {
  if (count == 0) return;
  DeviceScope scope(launch.device);
  visit_dtype(p_dtype, [&](auto p_elem) {
    using P = decltype(p_elem);
    visit_dtype(g_dtype, [&](auto g_elem) {
      using G = decltype(g_elem);
      dense_update_kernel<P, G><<<grid_for(count, kReduceThreads), kReduceThreads, 0, stream_of(launch)>>>(
          static_cast<P*>(p), static_cast<const G*>(g), count, rule, nonfinite);
    });
  });
  check(cudaGetLastError(), "dense_update launch");
}

void dense_grad_sqnorm(const Launch& launch, float* stats, const void* g, DType g_dtype, int64_t count,
                       float inv_loss_scale) {
  if (count == 0) return;
  DeviceScope scope(launch.device);
  visit_dtype(g_dtype, [&](auto g_elem) {
    using G = decltype(g_elem);
    dense_grad_sqnorm_kernel<G><<<grid_for(count, kReduceThreads), kReduceThreads, 0, stream_of(launch)>>>(
        stats, static_cast<const G*>(g), count, inv_loss_scale);
  });
  check(cudaGetLastError(), "dense_grad_sqnorm launch");
}

}  // namespace cuda
}  // namespace lomo
