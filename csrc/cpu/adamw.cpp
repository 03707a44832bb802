// CPU kernels of the fused AdamW ops (lomo_kernels.ops.adamw_update): adamw_linear_update,
// adamw_embedding_update, adamw_dense_update.
//
// Linear: the weight gradient G = dyᵀx in row blocks through the block GEMMs of common.h (fp32 ATen
// GEMM, or MKL's 16-bit GEMM with fp32 accumulation) into one reused block buffer; each block's
// epilogue reads the matching spans of W, m and v, applies the AdamW rule of lomo_math.h and writes all
// three. No weight-sized gradient exists. The epilogue runs 16 (AVX-512F) or 8 (AVX2 + FMA) lanes at a
// time for fp32/bf16 weights and moments (simd_kernels.h) using the same IEEE operations as the scalar
// code (fused multiply-adds where the scalar code has fma_rn), so every path gives the same bits.
#include <torch/library.h>

#include <vector>

#include "common.h"

namespace lomo {
namespace {

// The AdamW step over [0, count <= kRootPiece) on the calling thread; g of dtype G or nullptr (a zero
// gradient). First the new v of every element, then at::sqrt of them (√v as torch.optim.AdamW's own sqrt
// gives it on this CPU: MKL's vector sqrt, not correctly rounded for ~20% of inputs), then the update.
constexpr int64_t kRootPiece = 16384;  // the new v, their roots and the packed ones (3 x 64 KiB) stay in L2

// root[i] = at::sqrt(v1[i]) for i < count, with `packed` as scratch. MKL's vector sqrt is ~7x slower on
// zeros than on other values (an embedding's never-touched rows have v = 0), and every correct sqrt
// maps ±0 to itself: so only the nonzero entries go through at::sqrt, packed together; the same bits.
void take_roots(const float* v1, float* root, float* packed, int64_t count) {
  int64_t nonzero = 0;
  for (int64_t i = 0; i < count; ++i) nonzero += v1[i] != 0.0f;
  if (nonzero == count) {
    at::Tensor root_t = at::from_blob(root, {count}, at::kFloat);
    at::sqrt_out(root_t, at::from_blob(const_cast<float*>(v1), {count}, at::kFloat));
    return;
  }
  if (nonzero == 0) {
    std::memcpy(root, v1, static_cast<size_t>(count) * sizeof(float));
    return;
  }
  int64_t k = 0;
  for (int64_t i = 0; i < count; ++i) {  // branch-free compaction: a zero is written, then overwritten
    packed[k] = v1[i];
    k += v1[i] != 0.0f;
  }
  at::Tensor packed_t = at::from_blob(packed, {nonzero}, at::kFloat);
  at::sqrt_out(packed_t, packed_t);
  k = 0;
  for (int64_t i = 0; i < count; ++i) {
    const bool zero = v1[i] == 0.0f;
    root[i] = zero ? v1[i] : packed[k];
    k += !zero;
  }
}

template <class W, class S, class G>
int64_t adam_piece(W* w, S* m, S* v, const G* g, int64_t count, int64_t flat0, const AdamRule& r) {
  thread_local std::vector<float> buffer(3 * kRootPiece);
  float* v1 = buffer.data();
  float* root = v1 + kRootPiece;
  bool vector = false;
  if constexpr (!std::is_same_v<W, fp16> && std::is_same_v<G, float>) {
    vector = vectorized([&](auto k) { k.adam_second_moments(v, g, count, r, v1); });
  }
  if (!vector) {
    for (int64_t i = 0; i < count; ++i) {
      v1[i] = adam_second_moment(to_float(v[i]), adam_gradient(g == nullptr ? 0.0f : to_float(g[i]), r), r);
    }
  }
  take_roots(v1, root, root + kRootPiece, count);
  int64_t bad = 0;
  if (vector) {
    vectorized([&](auto k) { bad = k.adam_span(w, m, v, g, root, count, flat0, r); });
    return bad;
  }
  for (int64_t i = 0; i < count; ++i) {
    const float gi = adam_gradient(g == nullptr ? 0.0f : to_float(g[i]), r);
    bad += adam_store(w + i, m + i, v + i, gi, v1[i], root[i], static_cast<uint64_t>(flat0 + i), r);
  }
  return bad;
}

// The same over [0, count), piece after piece on the calling thread.
template <class W, class S, class G>
int64_t adam_serial(W* w, S* m, S* v, const G* g, int64_t count, int64_t flat0, const AdamRule& r) {
  int64_t bad = 0;
  for (int64_t begin = 0; begin < count; begin += kRootPiece) {
    const int64_t n = std::min(kRootPiece, count - begin);
    bad += adam_piece(w + begin, m + begin, v + begin, g == nullptr ? g : g + begin, n, flat0 + begin, r);
  }
  return bad;
}

// The same in parallel pieces.
template <class W, class S, class G>
int64_t adam_span(W* w, S* m, S* v, const G* g, int64_t count, int64_t flat0, const AdamRule& r) {
  const int64_t pieces = (count + kRootPiece - 1) / kRootPiece;
  return parallel_sum(pieces, pieces > 1, [&](int64_t c) {
    const int64_t begin = c * kRootPiece, n = std::min(kRootPiece, count - begin);
    return adam_piece(w + begin, m + begin, v + begin, g == nullptr ? g : g + begin, n, flat0 + begin, r);
  });
}

// Calls fn(w, m, v) with the typed data pointers of the weight (fp32/bf16/fp16) and the moments (fp32/bf16).
template <class Fn>
void visit_adam(const at::Tensor& weight, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, Fn&& fn) {
  visit_dtype(dtype_of(weight), [&](auto w_elem) {
    using W = decltype(w_elem);
    if (exp_avg.scalar_type() == at::kFloat) {
      fn(typed<W>(weight), typed<float>(exp_avg), typed<float>(exp_avg_sq));
    } else {
      fn(typed<W>(weight), typed<bf16>(exp_avg), typed<bf16>(exp_avg_sq));
    }
  });
}

// The moments: contiguous CPU tensors of the weight's shape, one dtype (fp32 or bf16), not aliasing.
void check_moments(const at::Tensor& weight, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, const char* op) {
  for (const at::Tensor* s : {&exp_avg, &exp_avg_sq}) {
    TORCH_CHECK(s->device().is_cpu() && s->is_contiguous() && s->sizes() == weight.sizes() &&
                    (s->scalar_type() == at::kFloat || s->scalar_type() == at::kBFloat16),
                "lomo_kernels_C::", op, ": exp_avg and exp_avg_sq must be contiguous float32 or bfloat16 CPU tensors ",
                "of the weight's shape ", weight.sizes(), ", got ", s->scalar_type(), " ", s->sizes());
  }
  TORCH_CHECK(exp_avg.scalar_type() == exp_avg_sq.scalar_type(), "lomo_kernels_C::", op,
              ": exp_avg and exp_avg_sq must have one dtype");
}

#define LOMO_ADAM_SCALARS                                                                                      \
  double decay, double step, double beta1, double beta2, double denom_div, double eps, double inv_loss_scale, \
      double clip_value, double coef, bool stochastic, bool state_stochastic, int64_t seed
#define LOMO_ADAM_RULE                                                                                        \
  make_adam_rule(decay, step, beta1, beta2, denom_div, eps, inv_loss_scale, clip_value, coef, stochastic, \
                 state_stochastic, seed)

void adamw_linear_update(const at::Tensor& weight, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                         const at::Tensor& x, const at::Tensor& grad_out, LOMO_ADAM_SCALARS,
                         const c10::optional<at::Tensor>& nonfinite, int64_t /*stream*/) {
  check_cpu_weight(weight, "adamw_linear_update");
  TORCH_CHECK(weight.dim() == 2, "lomo_kernels_C::adamw_linear_update: weight must be 2-D");
  check_moments(weight, exp_avg, exp_avg_sq, "adamw_linear_update");
  check_activations(x, grad_out, weight.size(0), weight.size(1), "adamw_linear_update");
  check_counter(nonfinite, "adamw_linear_update");
  const AdamRule rule = LOMO_ADAM_RULE;
  const int64_t in_f = weight.size(1);
  int64_t bad = 0;
  if (weight.numel() == 0) return;
  visit_adam(weight, exp_avg, exp_avg_sq, [&](auto* w, auto* m, auto* v) {
    for_each_gradient_block(x, grad_out, [&](int64_t r0, int64_t rows, const float* g) {
      const int64_t off = r0 * in_f;
      bad += adam_span(w + off, m + off, v + off, g, rows * in_f, off, rule);
    });
  });
  add_to_counter(nonfinite, bad);
}

// The dense AdamW rule on an embedding whose gradient is zero outside the rows the batch touches:
// touched rows take their summed dy rows (token order, group_rows), every other row a zero gradient
// (its m and v decay and it still moves by m̂/(√v̂+ε), as torch's AdamW with a dense gradient).
void adamw_embedding_update(const at::Tensor& weight, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                            const at::Tensor& indices, const at::Tensor& grad_out, int64_t padding_idx,
                            LOMO_ADAM_SCALARS, const c10::optional<at::Tensor>& nonfinite, int64_t /*stream*/) {
  check_cpu_weight(weight, "adamw_embedding_update");
  TORCH_CHECK(weight.dim() == 2, "lomo_kernels_C::adamw_embedding_update: weight must be 2-D");
  check_moments(weight, exp_avg, exp_avg_sq, "adamw_embedding_update");
  const int64_t vocab = weight.size(0), dim = weight.size(1);
  check_embedding(indices, grad_out, dim, "adamw_embedding_update");
  check_counter(nonfinite, "adamw_embedding_update");
  const AdamRule rule = LOMO_ADAM_RULE;
  const RowGroupTensors group_tensors = group_rows(indices);
  const RowGroups groups = group_tensors.view(padding_idx);
  // per group (groups run in parallel, each writes its own slot), summed in order after
  std::vector<int64_t> bad_rows(static_cast<size_t>(groups.count), 0);
  int64_t bad = 0;
  visit_adam(weight, exp_avg, exp_avg_sq, [&](auto* w, auto* m, auto* v) {
    visit_dtype(dtype_of(grad_out), [&](auto d_elem) {
      using D = decltype(d_elem);
      for_each_row_gradient(groups, typed<const D>(grad_out), dim, [&](int64_t k, int64_t row, const float* g) {
        const int64_t off = row * dim;
        bad_rows[static_cast<size_t>(k)] = adam_serial(w + off, m + off, v + off, g, dim, off, rule);
      });
    });
    // untouched rows in runs (one sqrt call per run's piece, not per row), row blocks in parallel
    const int64_t block = std::max<int64_t>(1, kRootPiece / std::max<int64_t>(dim, 1));
    const int64_t blocks = (vocab + block - 1) / block;
    bad = parallel_sum(blocks, vocab * dim > kParallelGrain, [&](int64_t b) {
      const int64_t b0 = b * block, b1 = std::min(vocab, b0 + block);
      int64_t block_bad = 0;
      for (int64_t row = b0; row < b1;) {
        if (row_is_touched(groups, row)) {
          ++row;
          continue;
        }
        int64_t end = row + 1;
        while (end < b1 && !row_is_touched(groups, end)) ++end;
        const int64_t off = row * dim;
        block_bad +=
            adam_serial(w + off, m + off, v + off, static_cast<const float*>(nullptr), (end - row) * dim, off, rule);
        row = end;
      }
      return block_bad;
    });
  });
  for (int64_t n : bad_rows) bad += n;
  add_to_counter(nonfinite, bad);
}

void adamw_dense_update(const at::Tensor& param, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                        const at::Tensor& grad, LOMO_ADAM_SCALARS, const c10::optional<at::Tensor>& nonfinite,
                        int64_t /*stream*/) {
  check_cpu_weight(param, "adamw_dense_update");
  check_moments(param, exp_avg, exp_avg_sq, "adamw_dense_update");
  TORCH_CHECK(grad.numel() == param.numel() && grad.is_contiguous() && grad.device().is_cpu(),
              "lomo_kernels_C::adamw_dense_update: grad must be a contiguous CPU tensor with the parameter's ",
              param.numel(), " elements, got ", grad.sizes());
  check_counter(nonfinite, "adamw_dense_update");
  const AdamRule rule = LOMO_ADAM_RULE;
  int64_t bad = 0;
  visit_adam(param, exp_avg, exp_avg_sq, [&](auto* w, auto* m, auto* v) {
    const int64_t n = param.numel();
    if (grad.scalar_type() == at::kFloat) {
      bad = adam_span(w, m, v, typed<const float>(grad), n, 0, rule);
      return;
    }
    // 16-bit gradients: converted in chunks of kChunk entries (exact), so the vector epilogue applies
    static_assert(kChunk <= kRootPiece, "a chunk is one adam_piece");
    visit_dtype(dtype_of(grad), [&](auto g_elem) {
      using G = decltype(g_elem);
      const G* g = typed<const G>(grad);
      const int64_t chunks = (n + kChunk - 1) / kChunk;
      bad = parallel_sum(chunks, n > kParallelGrain, [&](int64_t c) {
        float buffer[kChunk];
        const int64_t begin = c * kChunk, count = std::min(kChunk, n - begin);
        for (int64_t i = 0; i < count; ++i) buffer[i] = to_float(g[begin + i]);
        return adam_piece(w + begin, m + begin, v + begin, static_cast<const float*>(buffer), count, begin, rule);
      });
    });
  });
  add_to_counter(nonfinite, bad);
}

#undef LOMO_ADAM_SCALARS
#undef LOMO_ADAM_RULE

}  // namespace
}  // namespace lomo

TORCH_LIBRARY_IMPL(lomo_kernels_C, CPU, m) {
  m.impl("adamw_linear_update", &lomo::adamw_linear_update);
  m.impl("adamw_embedding_update", &lomo::adamw_embedding_update);
  m.impl("adamw_dense_update", &lomo::adamw_dense_update);
}
