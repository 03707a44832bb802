// CPU kernels of the fused AdamW ops (lomo_kernels.ops.adamw_update): adamw_linear_update,
// adamw_embedding_update, adamw_dense_update.
//
// Linear: the weight gradient G = dyᵀx in row blocks through the block GEMMs of common.h (fp32 ATen
// GEMM, or MKL's 16-bit GEMM with fp32 accumulation) into one reused block buffer; each block's
// epilogue reads the matching spans of W, m and v, applies adam_element of lomo_math.h and writes all
// three. No weight-sized gradient exists. The epilogue runs 16 lanes at a time with AVX-512F (fp32/bf16
// weights and moments) using the same IEEE operations as the scalar code (fused multiply-adds where
// the scalar code has fma_rn), so both paths give the same bits.
#include <torch/library.h>

#include "common.h"

namespace lomo {
namespace {

// ---- AVX-512 epilogue -----------------------------------------------------------------------------

#ifdef LOMO_HAVE_AVX512_PATH
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

// 16 values of T (float or bf16 bits) as fp32; `bits` receives the raw 16-bit lanes for bf16.
template <class T>
LOMO_AVX512 inline __m512 v_load(const T* p, __m512i* bits) {
  if constexpr (std::is_same_v<T, float>) {
    (void)bits;
    return _mm512_loadu_ps(p);
  } else {
    *bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return v_bf16_to_f32(*bits);
  }
}

// The value rounded into T's format: fp32 bits as is, bf16 (nearest or counter-based stochastic) in
// the low halves of the lanes.
template <class T>
LOMO_AVX512 inline __m512i v_round(__m512 value, bool stochastic, uint64_t flat, __m512i seed_hash) {
  if constexpr (std::is_same_v<T, float>) {
    (void)stochastic, (void)flat, (void)seed_hash;
    return _mm512_castps_si512(value);
  } else {
    return stochastic ? v_bf16_stochastic(value, v_uniform24(flat, seed_hash)) : v_bf16_nearest(value);
  }
}

template <class T>
LOMO_AVX512 inline __mmask16 v_stored_finite(__m512i out) {
  if constexpr (std::is_same_v<T, float>) {
    return v_is_finite(_mm512_castsi512_ps(out));
  } else {
    return v_bf16_finite(out);
  }
}

// Writes the lanes in `ok` of `out` (T's bits) to p; the other lanes keep their bits in memory.
template <class T>
LOMO_AVX512 inline void v_store(T* p, __m512i out, __m512i old_bits, __mmask16 ok) {
  if constexpr (std::is_same_v<T, float>) {
    (void)old_bits;
    _mm512_mask_storeu_ps(p, ok, _mm512_castsi512_ps(out));
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(old_bits, ok, out)));
  }
}

// adam_element over [0, count) with the gradient g (fp32, or nullptr: a zero gradient); returns the
// number of guarded elements. W, S in {float, bf16}.
template <class W, class S>
LOMO_AVX512 int64_t adam_span_avx512(W* w, S* m, S* v, const float* g, int64_t count, int64_t flat0,
                                     const AdamRule& r) {
  const __m512 inv = _mm512_set1_ps(r.inv_loss_scale), bound = _mm512_set1_ps(r.clip_value);
  const __m512 neg_bound = _mm512_set1_ps(-r.clip_value), coef = _mm512_set1_ps(r.coef);
  const bool small = abs_f(r.lerp_weight) < 0.5f;
  const __m512 lerp_coef = _mm512_set1_ps(small ? r.lerp_weight : sub_rn(r.lerp_weight, 1.0f));
  const __m512 beta2 = _mm512_set1_ps(r.beta2), one_minus_beta2 = _mm512_set1_ps(r.one_minus_beta2);
  const __m512 denom_div = _mm512_set1_ps(r.denom_div), eps = _mm512_set1_ps(r.eps);
  const __m512 decay = _mm512_set1_ps(r.decay), neg_step = _mm512_set1_ps(r.neg_step);
  const bool divide = r.denom_div != 1.0f;
  const __m512i seed_w = v_u32(r.seed_hash_w), seed_m = v_u32(r.seed_hash_m), seed_v = v_u32(r.seed_hash_v);
  int64_t i = 0, bad = 0;
  for (; i + 16 <= count; i += 16) {
    __m512 gv = _mm512_setzero_ps();
    if (g != nullptr) {
      const __m512 u0 = _mm512_mul_ps(_mm512_loadu_ps(g + i), inv);
      // clamp_nan: lower = u < -bound ? -bound : u; bound < lower ? bound : lower (NaN fails both)
      const __m512 lower = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(u0, neg_bound, _CMP_LT_OQ), u0, neg_bound);
      gv = _mm512_mul_ps(_mm512_mask_blend_ps(_mm512_cmp_ps_mask(bound, lower, _CMP_LT_OQ), lower, bound), coef);
    }
    __m512i w_bits = _mm512_setzero_si512(), m_bits = _mm512_setzero_si512(), v_bits = _mm512_setzero_si512();
    const __m512 wv = v_load(w + i, &w_bits), mv = v_load(m + i, &m_bits), vv = v_load(v + i, &v_bits);
    const __m512 diff = _mm512_sub_ps(gv, mv);
    const __m512 m1 = _mm512_fmadd_ps(lerp_coef, diff, small ? mv : gv);
    const __m512 v1 = _mm512_fmadd_ps(_mm512_mul_ps(one_minus_beta2, gv), gv, _mm512_mul_ps(vv, beta2));
    __m512 denom = _mm512_sqrt_ps(v1);
    if (divide) denom = _mm512_div_ps(denom, denom_div);
    denom = _mm512_add_ps(denom, eps);
    const __m512 w1 = _mm512_add_ps(_mm512_mul_ps(wv, decay), _mm512_div_ps(_mm512_mul_ps(neg_step, m1), denom));
    const uint64_t flat = static_cast<uint64_t>(flat0 + i);
    const __m512i w_out = v_round<W>(w1, r.stochastic, flat, seed_w);
    const __m512i m_out = v_round<S>(m1, r.state_stochastic, flat, seed_m);
    const __m512i v_out = v_round<S>(v1, r.state_stochastic, flat, seed_v);
    const __mmask16 ok = v_stored_finite<W>(w_out) & v_stored_finite<S>(m_out) & v_stored_finite<S>(v_out);
    v_store(w + i, w_out, w_bits, ok);
    v_store(m + i, m_out, m_bits, ok);
    v_store(v + i, v_out, v_bits, ok);
    bad += v_bad_count(ok);
  }
  for (; i < count; ++i) {
    bad += adam_element(w + i, m + i, v + i, g == nullptr ? 0.0f : g[i], static_cast<uint64_t>(flat0 + i), r);
  }
  return bad;
}

#pragma GCC diagnostic pop
#endif  // LOMO_HAVE_AVX512_PATH

// adam_element over [0, count) on the calling thread; g of dtype G or nullptr (a zero gradient).
template <class W, class S, class G>
int64_t adam_span_serial(W* w, S* m, S* v, const G* g, int64_t count, int64_t flat0, const AdamRule& r) {
#ifdef LOMO_HAVE_AVX512_PATH
  if constexpr (!std::is_same_v<W, fp16> && std::is_same_v<G, float>) {
    if (simd_enabled()) return adam_span_avx512(w, m, v, g, count, flat0, r);
  }
#endif
  int64_t bad = 0;
  for (int64_t i = 0; i < count; ++i) {
    const float gi = g == nullptr ? 0.0f : to_float(g[i]);
    bad += adam_element(w + i, m + i, v + i, gi, static_cast<uint64_t>(flat0 + i), r);
  }
  return bad;
}

// The same over [0, count) in parallel chunks of kChunk elements.
template <class W, class S, class G>
int64_t adam_span(W* w, S* m, S* v, const G* g, int64_t count, int64_t flat0, const AdamRule& r) {
  const int64_t chunks = (count + kChunk - 1) / kChunk;
  int64_t bad = 0;
#pragma omp parallel for schedule(static) reduction(+ : bad) if (count > kParallelGrain)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t begin = c * kChunk, n = std::min(kChunk, count - begin);
    bad += adam_span_serial(w + begin, m + begin, v + begin, g == nullptr ? g : g + begin, n, flat0 + begin, r);
  }
  return bad;
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
        bad_rows[static_cast<size_t>(k)] = adam_span_serial(w + off, m + off, v + off, g, dim, off, rule);
      });
    });
#pragma omp parallel for schedule(static) reduction(+ : bad) if (vocab * dim > kParallelGrain)
    for (int64_t row = 0; row < vocab; ++row) {
      if (row_is_touched(groups, row)) continue;
      const int64_t off = row * dim;
      bad += adam_span_serial(w + off, m + off, v + off, static_cast<const float*>(nullptr), dim, off, rule);
    }
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
    visit_dtype(dtype_of(grad), [&](auto g_elem) {
      using G = decltype(g_elem);
      const G* g = typed<const G>(grad);
      const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) reduction(+ : bad) if (n > kParallelGrain)
      for (int64_t c = 0; c < chunks; ++c) {
        float buffer[kChunk];
        const int64_t begin = c * kChunk, count = std::min(kChunk, n - begin);
        for (int64_t i = 0; i < count; ++i) buffer[i] = to_float(g[begin + i]);
        bad += adam_span_serial(w + begin, m + begin, v + begin, static_cast<const float*>(buffer), count, begin, rule);
      }
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
