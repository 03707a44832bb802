// CPU kernels of the compiled ops: the weight gradient in row blocks through ATen's GEMM into one
// reused buffer, then the per-element epilogue of lomo_math.h in OpenMP loops.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "aten_glue.h"

namespace lomo {
namespace {

// Rows of G per GEMM call: at most this many fp32 entries (1 MiB) at a time. Four times the torch
// reference's blocks: with 64-row blocks (W 1024x1024) the GEMM runs at under half its speed.
constexpr int64_t kBlockElements = int64_t{1} << 18;
// Below this many elements a loop is not worth waking the OpenMP team.
constexpr int64_t kParallelGrain = int64_t{1} << 14;

int64_t rows_per_block(int64_t cols) { return std::max<int64_t>(1, kBlockElements / std::max<int64_t>(cols, 1)); }

template <class T>
T* typed(const at::Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

// Calls fn(first_row, rows, g) for each row block of G = grad_outᵀ x (fp32, `rows` x in_features,
// row-major); one block buffer serves every block.
template <class Fn>
void for_each_gradient_block(const at::Tensor& x, const at::Tensor& grad_out, Fn&& fn) {
  const at::Tensor x32 = x.to(at::kFloat);
  const at::Tensor dy32 = grad_out.to(at::kFloat);
  const int64_t out_features = dy32.size(1), in_features = x32.size(1);
  const int64_t block_rows = std::min(rows_per_block(in_features), out_features);
  at::Tensor buffer = at::empty({block_rows, in_features}, x32.options());
  for (int64_t r0 = 0; r0 < out_features; r0 += block_rows) {
    const int64_t rows = std::min(block_rows, out_features - r0);
    at::Tensor g = buffer.narrow(0, 0, rows);
    at::mm_out(g, dy32.narrow(1, r0, rows).t(), x32);
    fn(r0, rows, g.data_ptr<float>());
  }
}

// w[i] <- rule(w[i], g[i]) for i < count; w[0] has flat index flat0 in the whole weight.
template <class W, class G>
void update_span(W* w, const G* g, int64_t count, int64_t flat0, const Rule& rule) {
#pragma omp parallel for schedule(static) if (count > kParallelGrain)
  for (int64_t i = 0; i < count; ++i) {
    update_element(w + i, to_float(g[i]), static_cast<uint64_t>(flat0 + i), rule);
  }
}

struct NormSums {
  double square = 0.0;
  int64_t nonfinite = 0;
};

template <class G>
NormSums norm_sums(const G* g, int64_t count, float inv_loss_scale) {
  double square = 0.0;
  int64_t nonfinite = 0;
#pragma omp parallel for schedule(static) reduction(+ : square, nonfinite) if (count > kParallelGrain)
  for (int64_t i = 0; i < count; ++i) {
    const NormTerm term = norm_term(to_float(g[i]), inv_loss_scale);
    square += term.square;
    nonfinite += term.nonfinite;
  }
  return NormSums{square, nonfinite};
}

void add_to_stats(const at::Tensor& stats, const NormSums& sums) {
  float* s = stats.data_ptr<float>();
  s[0] += static_cast<float>(sums.square);
  s[1] += static_cast<float>(sums.nonfinite);
}

void check_cpu_weight(const at::Tensor& w, const char* op) {
  TORCH_CHECK(w.device().is_cpu() && w.is_contiguous() && w.dim() >= 1, "lomo_kernels_C::", op,
              ": expected a contiguous CPU weight");
}

void check_stats(const at::Tensor& stats, const char* op) {
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.numel() == 2 && stats.is_contiguous(), "lomo_kernels_C::", op,
              ": stats must be a contiguous float32 tensor of 2 elements");
}

void check_activations(const at::Tensor& x, const at::Tensor& grad_out, int64_t out_features, int64_t in_features,
                       const char* op) {
  TORCH_CHECK(x.dim() == 2 && grad_out.dim() == 2 && x.size(0) == grad_out.size(0) && x.size(1) == in_features &&
                  grad_out.size(1) == out_features,
              "lomo_kernels_C::", op, ": expected x [T, ", in_features, "] and grad_out [T, ", out_features, "], got ",
              x.sizes(), " and ", grad_out.sizes());
}

void linear_update(const at::Tensor& weight, const at::Tensor& x, const at::Tensor& grad_out, double decay,
                   double step, double inv_loss_scale, double clip_value, bool stochastic, int64_t seed,
                   int64_t /*stream*/) {
  check_cpu_weight(weight, "linear_update");
  check_activations(x, grad_out, weight.size(0), weight.size(1), "linear_update");
  if (weight.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat && !stochastic && std::isinf(clip_value) &&
      x.size(0) > 0) {
    // Plain SGD on fp32 is one GEMM accumulating into W: BLAS applies beta/alpha in place.
    weight.addmm_(grad_out.t(), x, decay, -step * inv_loss_scale);
    return;
  }
  const Rule rule = make_rule(decay, step, inv_loss_scale, clip_value, stochastic, seed);
  const int64_t in_features = weight.size(1);
  visit_dtype(dtype_of(weight), [&](auto w_elem) {
    using W = decltype(w_elem);
    W* w = typed<W>(weight);
    for_each_gradient_block(x, grad_out, [&](int64_t r0, int64_t rows, const float* g) {
      update_span(w + r0 * in_features, g, rows * in_features, r0 * in_features, rule);
    });
  });
}

void linear_grad_sqnorm(const at::Tensor& stats, const at::Tensor& x, const at::Tensor& grad_out,
                        double inv_loss_scale, int64_t /*stream*/) {
  check_stats(stats, "linear_grad_sqnorm");
  check_activations(x, grad_out, grad_out.size(1), x.size(1), "linear_grad_sqnorm");
  NormSums total;
  for_each_gradient_block(x, grad_out, [&](int64_t, int64_t rows, const float* g) {
    const NormSums block = norm_sums(g, rows * x.size(1), static_cast<float>(inv_loss_scale));
    total.square += block.square;
    total.nonfinite += block.nonfinite;
  });
  add_to_stats(stats, total);
}

// Calls fn(k, row, g) for each group k of the batch (its row, padding row excluded), g the row's fp32
// gradient: its grad_out rows summed in token order. Groups run in parallel; g is a per-thread buffer.
template <class D, class Fn>
void for_each_row_gradient(const RowGroups& groups, const D* dy, int64_t dim, Fn&& fn) {
#pragma omp parallel if (groups.count * dim > kParallelGrain)
  {
    std::vector<float> g(static_cast<size_t>(dim));
#pragma omp for schedule(static)
    for (int64_t k = 0; k < groups.count; ++k) {
      const int64_t row = groups.rows[k];
      if (row == groups.padding_idx) continue;
      std::fill(g.begin(), g.end(), 0.0f);
      for (int64_t t = groups.starts[k]; t < groups.starts[k + 1]; ++t) {
        const D* src = dy + groups.order[t] * dim;
        for (int64_t c = 0; c < dim; ++c) g[c] += to_float(src[c]);
      }
      fn(k, row, g.data());
    }
  }
}

void check_embedding(const at::Tensor& indices, const at::Tensor& grad_out, int64_t dim, const char* op) {
  TORCH_CHECK(indices.scalar_type() == at::kLong && indices.dim() == 1 && grad_out.dim() == 2 &&
                  grad_out.size(0) == indices.size(0) && grad_out.size(1) == dim,
              "lomo_kernels_C::", op, ": expected int64 indices [T] and grad_out [T, ", dim, "], got ",
              indices.scalar_type(), " ", indices.sizes(), " and ", grad_out.sizes());
}

void embedding_update(const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& grad_out,
                      int64_t padding_idx, double decay, double step, double inv_loss_scale, double clip_value,
                      bool stochastic, int64_t seed, int64_t /*stream*/) {
  check_cpu_weight(weight, "embedding_update");
  const int64_t vocab = weight.size(0), dim = weight.size(1);
  check_embedding(indices, grad_out, dim, "embedding_update");
  const Rule rule = make_rule(decay, step, inv_loss_scale, clip_value, stochastic, seed);
  const RowGroupTensors group_tensors = group_rows(indices);
  const RowGroups groups = group_tensors.view(padding_idx);
  visit_dtype(dtype_of(weight), [&](auto w_elem) {
    using W = decltype(w_elem);
    W* w = typed<W>(weight);
    visit_dtype(dtype_of(grad_out), [&](auto d_elem) {
      using D = decltype(d_elem);
      for_each_row_gradient(groups, typed<const D>(grad_out), dim, [&](int64_t, int64_t row, const float* g) {
        for (int64_t c = 0; c < dim; ++c) update_element(w + row * dim + c, g[c], uint64_t(row * dim + c), rule);
      });
    });
    if (decay != 1.0) {
      // Weight decay acts on every row, touched or not (as torch.optim.SGD with a dense gradient).
#pragma omp parallel for schedule(static) if (vocab * dim > kParallelGrain)
      for (int64_t row = 0; row < vocab; ++row) {
        if (row_is_touched(groups, row)) continue;
        for (int64_t c = 0; c < dim; ++c) update_element(w + row * dim + c, 0.0f, uint64_t(row * dim + c), rule);
      }
    }
  });
}

void embedding_grad_sqnorm(const at::Tensor& stats, const at::Tensor& indices, const at::Tensor& grad_out,
                           int64_t padding_idx, double inv_loss_scale, int64_t /*stream*/) {
  check_stats(stats, "embedding_grad_sqnorm");
  TORCH_CHECK(grad_out.dim() == 2, "lomo_kernels_C::embedding_grad_sqnorm: grad_out must be 2-D");
  const int64_t dim = grad_out.size(1);
  check_embedding(indices, grad_out, dim, "embedding_grad_sqnorm");
  const RowGroupTensors group_tensors = group_rows(indices);
  const RowGroups groups = group_tensors.view(padding_idx);
  std::vector<NormSums> per_row(static_cast<size_t>(groups.count));
  visit_dtype(dtype_of(grad_out), [&](auto d_elem) {
    using D = decltype(d_elem);
    // Groups run in parallel: each writes its own slot.
    for_each_row_gradient(groups, typed<const D>(grad_out), dim, [&](int64_t k, int64_t, const float* g) {
      per_row[static_cast<size_t>(k)] = norm_sums(g, dim, static_cast<float>(inv_loss_scale));
    });
  });
  NormSums total;
  for (const NormSums& row : per_row) {
    total.square += row.square;
    total.nonfinite += row.nonfinite;
  }
  add_to_stats(stats, total);
}

void dense_update(const at::Tensor& param, const at::Tensor& grad, double decay, double step, double inv_loss_scale,
                  double clip_value, bool stochastic, int64_t seed, int64_t /*stream*/) {
  check_cpu_weight(param, "dense_update");
  TORCH_CHECK(grad.numel() == param.numel() && grad.is_contiguous(),
              "lomo_kernels_C::dense_update: grad must be contiguous with the parameter's ", param.numel(),
              " elements, got ", grad.sizes());
  const Rule rule = make_rule(decay, step, inv_loss_scale, clip_value, stochastic, seed);
  visit_dtype(dtype_of(param), [&](auto p_elem) {
    using P = decltype(p_elem);
    visit_dtype(dtype_of(grad), [&](auto g_elem) {
      using G = decltype(g_elem);
      update_span(typed<P>(param), typed<const G>(grad), param.numel(), 0, rule);
    });
  });
}

void dense_grad_sqnorm(const at::Tensor& stats, const at::Tensor& grad, double inv_loss_scale, int64_t /*stream*/) {
  check_stats(stats, "dense_grad_sqnorm");
  TORCH_CHECK(grad.is_contiguous(), "lomo_kernels_C::dense_grad_sqnorm: grad must be contiguous");
  visit_dtype(dtype_of(grad), [&](auto g_elem) {
    using G = decltype(g_elem);
    add_to_stats(stats, norm_sums(typed<const G>(grad), grad.numel(), static_cast<float>(inv_loss_scale)));
  });
}

}  // namespace
}  // namespace lomo

TORCH_LIBRARY_IMPL(lomo_kernels_C, CPU, m) {
  m.impl("linear_update", &lomo::linear_update);
  m.impl("linear_grad_sqnorm", &lomo::linear_grad_sqnorm);
  m.impl("embedding_update", &lomo::embedding_update);
  m.impl("embedding_grad_sqnorm", &lomo::embedding_grad_sqnorm);
  m.impl("dense_update", &lomo::dense_update);
  m.impl("dense_grad_sqnorm", &lomo::dense_grad_sqnorm);
}
