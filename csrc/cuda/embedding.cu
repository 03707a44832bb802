// embedding_update / embedding_grad_sqnorm: one block per touched row (grid-stride over the row
// groups of kernel_types.h), one thread per column. Each thread sums its column of the row's dy rows
// in token order, so the result does not depend on scheduling, then applies the rule of lomo_math.h.
#include "common.cuh"

namespace lomo {
namespace cuda {
namespace {

template <class W, class D>
__global__ void __launch_bounds__(kReduceThreads)
    embedding_rows_kernel(W* __restrict__ w, const D* __restrict__ dy, int64_t dim, RowGroups groups, Rule rule,
                          unsigned long long* nonfinite) {
  unsigned bad = 0;
  for (int64_t k = blockIdx.x; k < groups.count; k += gridDim.x) {
    const int64_t row = groups.rows[k];
    if (row == groups.padding_idx) continue;
    for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
      const int64_t flat = row * dim + c;
      bad += update_element(w + flat, group_column_sum(dy, dim, groups, k, c), static_cast<uint64_t>(flat), rule);
    }
  }
  add_count(bad, nonfinite);
}

// Weight decay of the rows the batch does not touch: the rule with a zero gradient.
template <class W>
__global__ void __launch_bounds__(kReduceThreads)
    embedding_decay_kernel(W* __restrict__ w, int64_t vocab, int64_t dim, RowGroups groups, Rule rule,
                           unsigned long long* nonfinite) {
  unsigned bad = 0;
  for (int64_t row = blockIdx.x; row < vocab; row += gridDim.x) {
    if (row_is_touched(groups, row)) continue;
    for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
      const int64_t flat = row * dim + c;
      bad += update_element(w + flat, 0.0f, static_cast<uint64_t>(flat), rule);
    }
  }
  add_count(bad, nonfinite);
}

template <class D>
__global__ void __launch_bounds__(kReduceThreads)
    embedding_grad_sqnorm_kernel(float* __restrict__ stats, const D* __restrict__ dy, int64_t dim, RowGroups groups,
                                 float inv_loss_scale) {
  float square = 0.0f, nonfinite = 0.0f;
  for (int64_t k = blockIdx.x; k < groups.count; k += gridDim.x) {
    if (groups.rows[k] == groups.padding_idx) continue;
    for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) {
      const NormTerm term = norm_term(group_column_sum(dy, dim, groups, k, c), inv_loss_scale);
      square += term.square;
      nonfinite += term.nonfinite ? 1.0f : 0.0f;
    }
  }
  block_add_to_stats(square, nonfinite, stats);
}

}  // namespace

void embedding_update(const Launch& launch, void* w, DType w_dtype, int64_t vocab, int64_t dim, const void* dy,
                      DType dy_dtype, const RowGroups& groups, bool decay_untouched, const Rule& rule,
                      unsigned long long* nonfinite) {
  if (dim == 0) return;
  DeviceScope scope(launch.device);
  visit_dtype(w_dtype, [&](auto w_elem) {
    using W = decltype(w_elem);
    if (groups.count > 0) {
      visit_dtype(dy_dtype, [&](auto d_elem) {
        using D = decltype(d_elem);
        embedding_rows_kernel<W, D><<<grid_for(groups.count, 1), kReduceThreads, 0, stream_of(launch)>>>(
            static_cast<W*>(w), static_cast<const D*>(dy), dim, groups, rule, nonfinite);
      });
    }
    if (decay_untouched && vocab > 0) {
      embedding_decay_kernel<W><<<grid_for(vocab, 1), kReduceThreads, 0, stream_of(launch)>>>(static_cast<W*>(w),
                                                                                               vocab, dim, groups, rule, nonfinite);
    }
  });
  check(cudaGetLastError(), "embedding_update launch");
}

void embedding_grad_sqnorm(const Launch& launch, float* stats, const void* dy, DType dy_dtype, int64_t dim,
                           const RowGroups& groups, float inv_loss_scale) {
  if (dim == 0 || groups.count == 0) return;
  DeviceScope scope(launch.device);
  visit_dtype(dy_dtype, [&](auto d_elem) {
    using D = decltype(d_elem);
    embedding_grad_sqnorm_kernel<D><<<grid_for(groups.count, 1), kReduceThreads, 0, stream_of(launch)>>>(
        stats, static_cast<const D*>(dy), dim, groups, inv_loss_scale);
  });
  check(cudaGetLastError(), "embedding_grad_sqnorm launch");
}

}  // namespace cuda
}  // namespace lomo
