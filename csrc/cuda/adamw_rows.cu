// adamw_embedding_update and adamw_dense_update on CUDA (lomo_kernels.ops.adamw_update), per element
// adam_element of lomo_math.h. Embedding: one block per touched row (its dy rows summed in token order,
// as on CPU, so the result does not depend on scheduling), then the untouched rows with a zero gradient
// (AdamW moves every row). Dense: a grid-stride loop over a parameter and its already-built gradient.
#include "common.cuh"

namespace lomo {
namespace cuda {
namespace {

// (minimum 4 blocks per SM: with the default bounds ptxas spilled 8 bytes here on sm_90)
template <class W, class S, class D>
__global__ void __launch_bounds__(kReduceThreads, 4)
    adamw_embedding_rows_kernel(W* __restrict__ w, S* __restrict__ m, S* __restrict__ v, const D* __restrict__ dy,
                                int64_t dim, RowGroups groups, AdamRule rule, unsigned long long* nonfinite) {
  unsigned bad = 0;
  for (int64_t k = blockIdx.x; k < groups.count; k += gridDim.x) {
    const int64_t row = groups.rows[k];
    if (row == groups.padding_idx) continue;  // the padding row takes no gradient: the untouched kernel's
    for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
      const int64_t flat = row * dim + c;
      // (the sum in a variable of its own: inlined into the call, ptxas spilled 8 bytes on sm_80)
      const float g = group_column_sum(dy, dim, groups, k, c);
      bad += adam_element(w + flat, m + flat, v + flat, g, static_cast<uint64_t>(flat), rule);
    }
  }
  add_count(bad, nonfinite);
}

// Rows the batch does not touch (the padding row among them): the rule with a zero gradient.
template <class W, class S>
__global__ void __launch_bounds__(kReduceThreads)
    adamw_embedding_untouched_kernel(W* __restrict__ w, S* __restrict__ m, S* __restrict__ v, int64_t vocab,
                                     int64_t dim, RowGroups groups, AdamRule rule, unsigned long long* nonfinite) {
  unsigned bad = 0;
  for (int64_t row = blockIdx.x; row < vocab; row += gridDim.x) {
    if (row_is_touched(groups, row)) continue;
    for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
      const int64_t flat = row * dim + c;
      bad += adam_element(w + flat, m + flat, v + flat, 0.0f, static_cast<uint64_t>(flat), rule);
    }
  }
  add_count(bad, nonfinite);
}

template <class W, class S, class G>
__global__ void __launch_bounds__(kReduceThreads)
    adamw_dense_kernel(W* __restrict__ p, S* __restrict__ m, S* __restrict__ v, const G* __restrict__ g, int64_t count,
                       AdamRule rule, unsigned long long* nonfinite) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  unsigned bad = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    bad += adam_element(p + i, m + i, v + i, to_float(g[i]), static_cast<uint64_t>(i), rule);
  }
  add_count(bad, nonfinite);
}

}  // namespace

void adamw_embedding_update(const Launch& launch, void* w, DType w_dtype, void* m, void* v, DType s_dtype,
                            int64_t vocab, int64_t dim, const void* dy, DType dy_dtype, const RowGroups& groups,
                            const AdamRule& rule, unsigned long long* nonfinite) {
  if (dim == 0 || vocab == 0) return;
  DeviceScope scope(launch.device);
  const cudaStream_t stream = stream_of(launch);
  visit_adam(w_dtype, s_dtype, [&](auto w_elem, auto s_elem) {
    using W = decltype(w_elem);
    using S = decltype(s_elem);
    if (groups.count > 0) {
      visit_dtype(dy_dtype, [&](auto d_elem) {
        using D = decltype(d_elem);
        adamw_embedding_rows_kernel<W, S, D><<<grid_for(groups.count, 1), kReduceThreads, 0, stream>>>(
            static_cast<W*>(w), static_cast<S*>(m), static_cast<S*>(v), static_cast<const D*>(dy), dim, groups, rule,
            nonfinite);
      });
    }
    adamw_embedding_untouched_kernel<W, S><<<grid_for(vocab, 1), kReduceThreads, 0, stream>>>(
        static_cast<W*>(w), static_cast<S*>(m), static_cast<S*>(v), vocab, dim, groups, rule, nonfinite);
  });
  check(cudaGetLastError(), "adamw_embedding_update launch");
}

void adamw_dense_update(const Launch& launch, void* p, DType p_dtype, void* m, void* v, DType s_dtype, const void* g,
                        DType g_dtype, int64_t count, const AdamRule& rule, unsigned long long* nonfinite) {
  if (count == 0) return;
  DeviceScope scope(launch.device);
  visit_adam(p_dtype, s_dtype, [&](auto p_elem, auto s_elem) {
    using P = decltype(p_elem);
    using S = decltype(s_elem);
    visit_dtype(g_dtype, [&](auto g_elem) {
      using G = decltype(g_elem);
      adamw_dense_kernel<P, S, G><<<grid_for(count, kReduceThreads), kReduceThreads, 0, stream_of(launch)>>>(
          static_cast<P*>(p), static_cast<S*>(m), static_cast<S*>(v), static_cast<const G*>(g), count, rule,
          nonfinite);
    });
  });
  check(cudaGetLastError(), "adamw_dense_update launch");
}

}  // namespace cuda
}  // namespace lomo
