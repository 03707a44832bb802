// CPU kernels of the SGD-rule ops (linear/embedding/dense update and norm passes, AdaLomo's passes):
// the weight gradient in row blocks through the block GEMMs of common.h into one reused buffer, then
// the per-element epilogue of lomo_math.h in OpenMP loops. AdamW's kernels are in adamw.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common.h"

namespace lomo {
namespace {

double dot_f32(const float* a, const float* b, int64_t n) {
  double s = 0.0;
  if (vectorized([&](auto k) { s = k.dot(a, b, n); })) return s;
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(a[i] * b[i]);
  return s;
}

// w[i] <- rule(w[i], g[i]) for i < count; w[0] has flat index flat0 in the whole weight. Returns how
// many elements the non-finite guard kept (update_element).
template <class W, class G>
int64_t update_span(W* w, const G* g, int64_t count, int64_t flat0, const Rule& rule) {
  const int64_t chunks = (count + kChunk - 1) / kChunk;
  int64_t bad = 0;
#pragma omp parallel for schedule(static) reduction(+ : bad) if (count > kParallelGrain)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t begin = c * kChunk, n = std::min(kChunk, count - begin);
    if constexpr (std::is_same_v<G, float> && !std::is_same_v<W, fp16>) {
      if (vectorized([&](auto k) { bad += k.update_span(w + begin, g + begin, n, flat0 + begin, rule); })) continue;
    }
    for (int64_t i = begin; i < begin + n; ++i) {
      bad += update_element(w + i, to_float(g[i]), static_cast<uint64_t>(flat0 + i), rule);
    }
  }
  return bad;
}

template <class G>
NormSums norm_sums(const G* g, int64_t count, float inv_loss_scale) {
  const int64_t chunks = (count + kChunk - 1) / kChunk;
  double square = 0.0;
  int64_t nonfinite = 0;
#pragma omp parallel for schedule(static) reduction(+ : square, nonfinite) if (count > kParallelGrain)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t begin = c * kChunk, n = std::min(kChunk, count - begin);
    if constexpr (std::is_same_v<G, float>) {
      NormSums sums;
      if (vectorized([&](auto k) { sums = k.norm_sums(g + begin, n, inv_loss_scale); })) {
        square += sums.square;
        nonfinite += sums.nonfinite;
        continue;
      }
    }
    for (int64_t i = begin; i < begin + n; ++i) {
      const NormTerm term = norm_term(to_float(g[i]), inv_loss_scale);
      square += term.square;
      nonfinite += term.nonfinite;
    }
  }
  return NormSums{square, nonfinite};
}

void add_to_stats(const at::Tensor& stats, const NormSums& sums) {
  float* s = stats.data_ptr<float>();
  s[0] += static_cast<float>(sums.square);
  s[1] += static_cast<float>(sums.nonfinite);
}


void check_stats(const at::Tensor& stats, const char* op) {
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.numel() == 2 && stats.is_contiguous(), "lomo_kernels_C::", op,
              ": stats must be a contiguous float32 tensor of 2 elements");
}


void linear_update(const at::Tensor& weight, const at::Tensor& x, const at::Tensor& grad_out, double decay,
                   double step, double inv_loss_scale, double clip_value, bool stochastic, int64_t seed,
                   const c10::optional<at::Tensor>& nonfinite, int64_t /*stream*/) {
  check_cpu_weight(weight, "linear_update");
  check_activations(x, grad_out, weight.size(0), weight.size(1), "linear_update");
  check_counter(nonfinite, "linear_update");
  const bool counting = nonfinite.has_value() && nonfinite->defined();
  if (!counting && weight.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat && !stochastic &&
      std::isinf(clip_value) && x.size(0) > 0) {
    // Plain SGD on fp32 is one GEMM accumulating into W: BLAS applies beta/alpha in place. Unguarded:
    // only without a counter (the caller's norm phase found the gradient finite).
    weight.addmm_(grad_out.t(), x, decay, -step * inv_loss_scale);
    return;
  }
  const Rule rule = make_rule(decay, step, inv_loss_scale, clip_value, stochastic, seed);
  const int64_t in_features = weight.size(1);
  int64_t bad = 0;
  visit_dtype(dtype_of(weight), [&](auto w_elem) {
    using W = decltype(w_elem);
    W* w = typed<W>(weight);
    for_each_gradient_block(x, grad_out, [&](int64_t r0, int64_t rows, const float* g) {
      bad += update_span(w + r0 * in_features, g, rows * in_features, r0 * in_features, rule);
    });
  });
  add_to_counter(nonfinite, bad);
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

// Row blocks of the token Gram matrix A Aᵀ (A [T, k] contiguous, one of the activations), fp32:
// compute(r0, rows, cols, out) writes (A Aᵀ)[r0:r0+rows, 0:cols] into out ([rows, cols], contiguous).
// 16-bit operands go through the 16-bit GEMM; without one, A is converted to fp32 once (the ghost
// method is chosen only for token counts where A is smaller than the weight).
class GramBlocks {
 public:
  explicit GramBlocks(const at::Tensor& a) : a_(a), tokens_(a.size(0)), k_(a.size(1)), dtype_(dtype_of(a)) {
    gemm_ = lowp_gemm_for(dtype_, {tokens_, k_});
    if (dtype_ != DType::f32 && gemm_ == nullptr) a_ = a.to(at::kFloat);
  }

  void compute(int64_t r0, int64_t rows, int64_t cols, at::Tensor out) const {
    if (k_ == 0) {
      out.zero_();
    } else if (gemm_ != nullptr) {
      gemm_(kRowMajor, kNoTrans, kTrans, static_cast<int>(rows), static_cast<int>(cols), static_cast<int>(k_), 1.0f,
            bits_of(a_) + r0 * k_, static_cast<int>(k_), bits_of(a_), static_cast<int>(k_), 0.0f,
            out.data_ptr<float>(), static_cast<int>(cols));
    } else {
      at::mm_out(out, a_.narrow(0, r0, rows), a_.narrow(0, 0, cols).t());
    }
  }

 private:
  at::Tensor a_;
  int64_t tokens_, k_;
  DType dtype_;
  LowpGemmFn gemm_ = nullptr;
};

// ‖dyᵀx‖² = ⟨x xᵀ, dy dyᵀ⟩ (the ghost norm), from the lower triangle of both symmetric T x T Gram
// matrices only (half the multiply-adds of the full products), in blocks of token rows. A non-finite
// entry makes the sum non-finite: it is counted once (as the torch reference's ghost pass).
void linear_grad_sqnorm_ghost(const at::Tensor& stats, const at::Tensor& x, const at::Tensor& grad_out,
                              double inv_loss_scale, int64_t /*stream*/) {
  check_stats(stats, "linear_grad_sqnorm_ghost");
  check_activations(x, grad_out, grad_out.size(1), x.size(1), "linear_grad_sqnorm_ghost");
  TORCH_CHECK(x.is_contiguous() && grad_out.is_contiguous() && x.scalar_type() == grad_out.scalar_type(),
              "lomo_kernels_C::linear_grad_sqnorm_ghost: x and grad_out must be contiguous, of one dtype");
  const int64_t tokens = x.size(0);
  if (tokens == 0) return;
  const GramBlocks gx(x), gdy(grad_out);
  const int64_t block = std::max<int64_t>(1, std::min(tokens, kBlockElements / tokens));
  at::Tensor px = at::empty({block * tokens}, x.options().dtype(at::kFloat));
  at::Tensor pdy = at::empty({block * tokens}, x.options().dtype(at::kFloat));
  double total = 0.0;
  for (int64_t t0 = 0; t0 < tokens; t0 += block) {
    const int64_t rows = std::min(block, tokens - t0), cols = t0 + rows;
    at::Tensor a = px.narrow(0, 0, rows * cols).view({rows, cols});
    at::Tensor b = pdy.narrow(0, 0, rows * cols).view({rows, cols});
    gx.compute(t0, rows, cols, a);
    gdy.compute(t0, rows, cols, b);
    const float* pa = a.data_ptr<float>();
    const float* pb = b.data_ptr<float>();
    double sum = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : sum) if (rows * cols > kParallelGrain)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t t = t0 + r;  // entries s < t count twice (the upper triangle), s == t once
      const float* ra = pa + r * cols;
      const float* rb = pb + r * cols;
      sum += 2.0 * dot_f32(ra, rb, t) + static_cast<double>(ra[t] * rb[t]);
    }
    total += sum;
  }
  total *= inv_loss_scale * inv_loss_scale;
  add_to_stats(stats, NormSums{total, std::isfinite(total) ? 0 : 1});
}

// ---- AdaLomo's passes over G (compiled for the cpu backend) --------------------------------------
//
// u_ij = clamp(G_ij * inv_loss_scale, ±clip_value), G from the same block GEMMs as linear_update.

void check_vector(const at::Tensor& v, int64_t size, const char* label, const char* op) {
  TORCH_CHECK(v.scalar_type() == at::kFloat && v.dim() == 1 && v.size(0) == size && v.is_contiguous(),
              "lomo_kernels_C::", op, ": ", label, " must be a contiguous float32 vector of ", size, " elements");
}

// row_sums[r] += Σ_j u², col_sums[j] += Σ_r u²; stats += [Σ_ij (G_ij*inv)², its non-finite count]
// (the norm pass's terms, before value clipping), all from one pass over G.
void adalomo_sq_sums(const at::Tensor& row_sums, const at::Tensor& col_sums, const at::Tensor& stats,
                     const at::Tensor& x, const at::Tensor& grad_out, double inv_loss_scale, double clip_value,
                     int64_t /*stream*/) {
  const int64_t out_f = grad_out.size(1), in_f = x.size(1);
  check_activations(x, grad_out, out_f, in_f, "adalomo_sq_sums");
  check_vector(row_sums, out_f, "row_sums", "adalomo_sq_sums");
  check_vector(col_sums, in_f, "col_sums", "adalomo_sq_sums");
  check_stats(stats, "adalomo_sq_sums");
  const float inv = static_cast<float>(inv_loss_scale), bound = static_cast<float>(clip_value);
  std::vector<double> cols(static_cast<size_t>(in_f), 0.0);
  float* rs = row_sums.data_ptr<float>();
  NormSums norm;
  for_each_gradient_block(x, grad_out, [&](int64_t r0, int64_t rows, const float* g) {
    for (int64_t r = 0; r < rows; ++r) {
      const float* gr = g + r * in_f;
      double row = 0.0, square = 0.0;
      int64_t bad = 0;
      const bool simd = vectorized([&](auto k) {
        row = k.sq_sums_row(gr, in_f, inv, bound, cols.data(), &norm.square, &norm.nonfinite);
      });
      if (simd) {
        rs[r0 + r] += static_cast<float>(row);
        continue;
      }
      for (int64_t j = 0; j < in_f; ++j) {
        const float u0 = mul_rn(gr[j], inv);
        const float sq0 = mul_rn(u0, u0);
        square += sq0;
        bad += !is_finite(u0);
        const float u = clamp_nan(u0, bound);
        const float sq = mul_rn(u, u);
        row += sq;
        cols[static_cast<size_t>(j)] += sq;
      }
      rs[r0 + r] += static_cast<float>(row);
      norm.square += square;
      norm.nonfinite += bad;
    }
  });
  float* cs = col_sums.data_ptr<float>();
  for (int64_t j = 0; j < in_f; ++j) cs[j] += static_cast<float>(cols[static_cast<size_t>(j)]);
  add_to_stats(stats, norm);
}

// u_ij <- (u_ij * row_scale_i) * col_scale_j in place on a block (rows r0.. of G), u clamped first.
void scale_block(float* g, int64_t r0, int64_t rows, int64_t in_f, const float* row_scale, const float* col_scale,
                 float inv, float bound) {
#pragma omp parallel for schedule(static) if (rows * in_f > kParallelGrain)
  for (int64_t r = 0; r < rows; ++r) {
    float* gr = g + r * in_f;
    const float rscale = row_scale[r0 + r];
    if (vectorized([&](auto k) { k.scale_row(gr, in_f, inv, bound, rscale, col_scale); })) continue;
    for (int64_t j = 0; j < in_f; ++j) {
      gr[j] = mul_rn(mul_rn(clamp_nan(mul_rn(gr[j], inv), bound), rscale), col_scale[j]);
    }
  }
}

void adalomo_scaled_sqnorm(const at::Tensor& stats, const at::Tensor& x, const at::Tensor& grad_out,
                           const at::Tensor& row_scale, const at::Tensor& col_scale, double inv_loss_scale,
                           double clip_value, int64_t /*stream*/) {
  const int64_t out_f = grad_out.size(1), in_f = x.size(1);
  check_activations(x, grad_out, out_f, in_f, "adalomo_scaled_sqnorm");
  check_vector(row_scale, out_f, "row_scale", "adalomo_scaled_sqnorm");
  check_vector(col_scale, in_f, "col_scale", "adalomo_scaled_sqnorm");
  check_stats(stats, "adalomo_scaled_sqnorm");
  NormSums total;
  for_each_gradient_block(x, grad_out, [&](int64_t r0, int64_t rows, const float* g) {
    float* block = const_cast<float*>(g);
    scale_block(block, r0, rows, in_f, row_scale.data_ptr<float>(), col_scale.data_ptr<float>(),
                static_cast<float>(inv_loss_scale), static_cast<float>(clip_value));
    const NormSums sums = norm_sums(block, rows * in_f, 1.0f);
    total.square += sums.square;
    total.nonfinite += sums.nonfinite;
  });
  add_to_stats(stats, total);
}

// W <- decay·W - step · (clamp(G*inv, ±clip)·r_i)·c_j, rounded as every update (the scaled u goes
// through update_element with inv_loss_scale 1 and no clipping, as the torch reference does).
void adalomo_linear_update(const at::Tensor& weight, const at::Tensor& x, const at::Tensor& grad_out,
                           const at::Tensor& row_scale, const at::Tensor& col_scale, double decay, double step,
                           double inv_loss_scale, double clip_value, bool stochastic, int64_t seed,
                           const c10::optional<at::Tensor>& nonfinite, int64_t /*stream*/) {
  check_cpu_weight(weight, "adalomo_linear_update");
  check_counter(nonfinite, "adalomo_linear_update");
  int64_t bad = 0;
  const int64_t out_f = weight.size(0), in_f = weight.size(1);
  check_activations(x, grad_out, out_f, in_f, "adalomo_linear_update");
  check_vector(row_scale, out_f, "row_scale", "adalomo_linear_update");
  check_vector(col_scale, in_f, "col_scale", "adalomo_linear_update");
  const Rule rule = make_rule(decay, step, 1.0, std::numeric_limits<double>::infinity(), stochastic, seed);
  visit_dtype(dtype_of(weight), [&](auto w_elem) {
    using W = decltype(w_elem);
    W* w = typed<W>(weight);
    for_each_gradient_block(x, grad_out, [&](int64_t r0, int64_t rows, const float* g) {
      float* block = const_cast<float*>(g);
      scale_block(block, r0, rows, in_f, row_scale.data_ptr<float>(), col_scale.data_ptr<float>(),
                  static_cast<float>(inv_loss_scale), static_cast<float>(clip_value));
      bad += update_span(w + r0 * in_f, block, rows * in_f, r0 * in_f, rule);
    });
  });
  add_to_counter(nonfinite, bad);
}

void embedding_update(const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& grad_out,
                      int64_t padding_idx, double decay, double step, double inv_loss_scale, double clip_value,
                      bool stochastic, int64_t seed, const c10::optional<at::Tensor>& nonfinite,
                      int64_t /*stream*/) {
  check_cpu_weight(weight, "embedding_update");
  check_counter(nonfinite, "embedding_update");
  const int64_t vocab = weight.size(0), dim = weight.size(1);
  check_embedding(indices, grad_out, dim, "embedding_update");
  const Rule rule = make_rule(decay, step, inv_loss_scale, clip_value, stochastic, seed);
  const RowGroupTensors group_tensors = group_rows(indices);
  const RowGroups groups = group_tensors.view(padding_idx);
  // per group (rows run in parallel, each writes its own slot), summed in order after
  std::vector<int64_t> bad_rows(static_cast<size_t>(groups.count), 0);
  int64_t bad = 0;
  visit_dtype(dtype_of(weight), [&](auto w_elem) {
    using W = decltype(w_elem);
    W* w = typed<W>(weight);
    visit_dtype(dtype_of(grad_out), [&](auto d_elem) {
      using D = decltype(d_elem);
      for_each_row_gradient(groups, typed<const D>(grad_out), dim, [&](int64_t k, int64_t row, const float* g) {
        int64_t n = 0;
        for (int64_t c = 0; c < dim; ++c) n += update_element(w + row * dim + c, g[c], uint64_t(row * dim + c), rule);
        bad_rows[static_cast<size_t>(k)] = n;
      });
    });
    if (decay != 1.0) {
      // Weight decay acts on every row, touched or not (as torch.optim.SGD with a dense gradient).
#pragma omp parallel for schedule(static) reduction(+ : bad) if (vocab * dim > kParallelGrain)
      for (int64_t row = 0; row < vocab; ++row) {
        if (row_is_touched(groups, row)) continue;
        for (int64_t c = 0; c < dim; ++c) bad += update_element(w + row * dim + c, 0.0f, uint64_t(row * dim + c), rule);
      }
    }
  });
  for (int64_t n : bad_rows) bad += n;
  add_to_counter(nonfinite, bad);
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
                  double clip_value, bool stochastic, int64_t seed, const c10::optional<at::Tensor>& nonfinite,
                  int64_t /*stream*/) {
  check_cpu_weight(param, "dense_update");
  check_counter(nonfinite, "dense_update");
  int64_t bad = 0;
  TORCH_CHECK(grad.numel() == param.numel() && grad.is_contiguous(),
              "lomo_kernels_C::dense_update: grad must be contiguous with the parameter's ", param.numel(),
              " elements, got ", grad.sizes());
  const Rule rule = make_rule(decay, step, inv_loss_scale, clip_value, stochastic, seed);
  visit_dtype(dtype_of(param), [&](auto p_elem) {
    using P = decltype(p_elem);
    visit_dtype(dtype_of(grad), [&](auto g_elem) {
      using G = decltype(g_elem);
      bad = update_span(typed<P>(param), typed<const G>(grad), param.numel(), 0, rule);
    });
  });
  add_to_counter(nonfinite, bad);
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

// Ops only the CPU backend has (the shared schemas are in ops_schema.cpp).
TORCH_LIBRARY_FRAGMENT(lomo_kernels_C, m) {
  m.def(
      "linear_grad_sqnorm_ghost(Tensor(a!) stats, Tensor x, Tensor grad_out, float inv_loss_scale, int stream) -> "
      "()");
  m.def(
      "adalomo_sq_sums(Tensor(a!) row_sums, Tensor(b!) col_sums, Tensor(c!) stats, Tensor x, Tensor grad_out, "
      "float inv_loss_scale, float clip_value, int stream) -> ()");
  m.def(
      "adalomo_scaled_sqnorm(Tensor(a!) stats, Tensor x, Tensor grad_out, Tensor row_scale, Tensor col_scale, "
      "float inv_loss_scale, float clip_value, int stream) -> ()");
  m.def(
      "adalomo_linear_update(Tensor(a!) weight, Tensor x, Tensor grad_out, Tensor row_scale, Tensor col_scale, "
      "float decay, float step, float inv_loss_scale, float clip_value, bool stochastic, int seed, Tensor(b!)? nonfinite, "
      "int stream) -> ()");
}

TORCH_LIBRARY_IMPL(lomo_kernels_C, CPU, m) {
  m.impl("linear_update", &lomo::linear_update);
  m.impl("linear_grad_sqnorm", &lomo::linear_grad_sqnorm);
  m.impl("linear_grad_sqnorm_ghost", &lomo::linear_grad_sqnorm_ghost);
  m.impl("adalomo_sq_sums", &lomo::adalomo_sq_sums);
  m.impl("adalomo_scaled_sqnorm", &lomo::adalomo_scaled_sqnorm);
  m.impl("adalomo_linear_update", &lomo::adalomo_linear_update);
  m.impl("embedding_update", &lomo::embedding_update);
  m.impl("embedding_grad_sqnorm", &lomo::embedding_grad_sqnorm);
  m.impl("dense_update", &lomo::dense_update);
  m.impl("dense_grad_sqnorm", &lomo::dense_grad_sqnorm);
}
