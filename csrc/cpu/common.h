// The CPU kernels' shared machinery (csrc/cpu/*.cpp): block sizes, the AVX-512 building blocks of the
// per-element epilogues, the block GEMMs G = dyᵀx from the activations' own dtype, and the checks and
// counters every op uses. Header-only (inline): each op's file includes it.
#pragma once

#include <ATen/ATen.h>

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

#include "../aten_glue.h"

namespace lomo {

// Rows of G per GEMM call: at most this many fp32 entries (1 MiB) at a time. Four times the torch
// reference's blocks: with 64-row blocks (W 1024x1024) the GEMM runs at under half its speed.
constexpr int64_t kBlockElements = int64_t{1} << 18;
// Below this many elements a loop is not worth waking the OpenMP team.
constexpr int64_t kParallelGrain = int64_t{1} << 14;
// Elements per task of the parallel epilogue loops.
constexpr int64_t kChunk = int64_t{1} << 12;

inline int64_t rows_per_block(int64_t cols) { return std::max<int64_t>(1, kBlockElements / std::max<int64_t>(cols, 1)); }

template <class T>
T* typed(const at::Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

inline bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, value) == 0;
}

// ---- AVX-512 epilogues ----------------------------------------------------------------------------
//
// The same per-element math as lomo_math.h, 16 lanes at a time: every operation is the IEEE single
// operation the scalar code does (mul, sub, div, compares, integer bit manipulation), so the results
// are bit-identical to the scalar path (and hence to the torch reference). Compiled for AVX-512F
// through a function attribute and used only when the CPU has it (and LOMO_CPU_SIMD is not "0").

inline bool simd_enabled() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool cpu_has = __builtin_cpu_supports("avx512f");
  return cpu_has && !env_is("LOMO_CPU_SIMD", "0");
#else
  return false;
#endif
}

#if defined(__x86_64__) && defined(__GNUC__)
#define LOMO_HAVE_AVX512_PATH 1
// GCC 12 reports the _mm512_undefined_* temporaries inside its own unmasked intrinsics as
// uninitialized once they are inlined; they are not.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#define LOMO_AVX512 __attribute__((target("avx512f")))

LOMO_AVX512 inline __m512i v_u32(uint32_t v) { return _mm512_set1_epi32(static_cast<int>(v)); }

// 16 bf16 values held in the low half of 32-bit lanes -> fp32 (upper lane bits ignored).
LOMO_AVX512 inline __m512 v_bf16_to_f32(__m512i bits) { return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16)); }

LOMO_AVX512 inline __m512 v_abs(__m512 v) {
  return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), v_u32(0x7fffffffu)));
}

LOMO_AVX512 inline __mmask16 v_is_finite(__m512 v) {
  const __m512i e = _mm512_and_si512(_mm512_castps_si512(v), v_u32(0x7f800000u));
  return _mm512_cmpneq_epi32_mask(e, v_u32(0x7f800000u));
}

// The rule's scalars broadcast once per span (held in registers: the stores to w may alias the Rule).
struct VRule {
  __m512 inv_loss_scale, bound, neg_bound, decay, step;
  __m512i seed_hash;
  bool stochastic;
};

LOMO_AVX512 inline VRule v_rule(const Rule& rule) {
  return VRule{_mm512_set1_ps(rule.inv_loss_scale), _mm512_set1_ps(rule.clip_value), _mm512_set1_ps(-rule.clip_value),
               _mm512_set1_ps(rule.decay),          _mm512_set1_ps(rule.step),       v_u32(rule.seed_hash),
               rule.stochastic};
}

// updated_value(): clamp_nan(g*inv_loss_scale, ±clip) then w*decay - step*u, each rounded on its own.
LOMO_AVX512 inline __m512 v_updated_value(__m512 w, __m512 g, const VRule& rule) {
  const __m512 u0 = _mm512_mul_ps(g, rule.inv_loss_scale);
  // lower = u < -bound ? -bound : u;  u = bound < lower ? bound : lower  (NaN fails both tests)
  const __m512 lower = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(u0, rule.neg_bound, _CMP_LT_OQ), u0, rule.neg_bound);
  const __m512 u = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(rule.bound, lower, _CMP_LT_OQ), lower, rule.bound);
  return _mm512_sub_ps(_mm512_mul_ps(w, rule.decay), _mm512_mul_ps(rule.step, u));
}

// bf16_nearest(), the result in the low half of each 32-bit lane.
LOMO_AVX512 inline __m512i v_bf16_nearest(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, v_u32(0x7fffffffu)), v_u32(0x7f800000u));
  const __m512i bias = _mm512_add_epi32(v_u32(0x7fffu), _mm512_and_si512(_mm512_srli_epi32(u, 16), v_u32(1u)));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  return _mm512_mask_mov_epi32(rounded, nan, v_u32(0x7fc0u));
}

LOMO_AVX512 inline __m512i v_mix32(__m512i x) {
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, v_u32(0x7feb352du));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
  x = _mm512_mullo_epi32(x, v_u32(0x846ca68bu));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}

// The 24-bit integers r >> 8 behind uniform_from_index() (uniform = (r >> 8) * 2**-24) for flat
// indices first, first+1, ..., first+15 (mod 2**32).
LOMO_AVX512 inline __m512i v_uniform24(uint64_t first, __m512i seed_hash) {
  const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i index = _mm512_add_epi32(v_u32(static_cast<uint32_t>(first)), lanes);
  return _mm512_srli_epi32(v_mix32(_mm512_xor_si512(index, seed_hash)), 8);
}

// round_stochastic<bf16>() without its division. For finite v that is not a bf16 value, the
// neighbours are lo = v truncated to bf16 (its upper 16 bits) and hi = lo + 1 (one step up in
// magnitude), and (|v| - lo)/(hi - lo) is exactly (low 16 bits of v) * 2**-16 (both differences are
// exact, and the spacing is a power of two); so `uniform < p` is the integer test
// (r >> 8) < (low16 << 8) on the 24-bit uniform r >> 8. A representable v has low16 == 0 (never up).
// Non-finite v, and v whose upper neighbour would be infinite (lo = 0x7f7f), take the nearest
// rounding, as the scalar code does.
LOMO_AVX512 inline __m512i v_bf16_stochastic(__m512 v, __m512i uniform24) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i magnitude = _mm512_and_si512(bits, v_u32(0x7fffffffu));
  const __m512i trunc = _mm512_srli_epi32(bits, 16);
  const __mmask16 up = _mm512_cmplt_epu32_mask(uniform24, _mm512_slli_epi32(_mm512_and_si512(bits, v_u32(0xffffu)), 8));
  const __m512i rounded = _mm512_mask_add_epi32(trunc, up, trunc, v_u32(1u));
  const __mmask16 keep_near = static_cast<__mmask16>(~v_is_finite(v)) |
                              _mm512_cmpeq_epi32_mask(_mm512_srli_epi32(magnitude, 16), v_u32(0x7f7fu));
  return _mm512_mask_mov_epi32(rounded, keep_near, v_bf16_nearest(v));
}

LOMO_AVX512 inline int v_bad_count(__mmask16 ok) {
  return __builtin_popcount(static_cast<unsigned>(static_cast<__mmask16>(~ok)));
}

// bf16 results (low halves of 32-bit lanes) that are finite: exponent bits not all ones.
LOMO_AVX512 inline __mmask16 v_bf16_finite(__m512i out) {
  return _mm512_cmpneq_epi32_mask(_mm512_and_si512(out, v_u32(0x7f80u)), v_u32(0x7f80u));
}

#pragma GCC diagnostic pop
#endif  // x86-64

// ---- block GEMMs from the activations' own dtype ------------------------------------------------
//
// fp32 activations: ATen's GEMM on views. bf16/fp16 activations: MKL's cblas_gemm_bf16bf16f32 /
// cblas_gemm_f16f16f32 (16-bit operands, fp32 accumulation and output; the MKL inside torch's x86
// builds exports them) when present and self-tested; otherwise ("convert") each block converts the
// token chunks it needs to fp32 scratch and runs an fp32 GEMM. Neither path makes an fp32 copy of
// the whole activations. LOMO_CPU_LOWP_GEMM=mkl|convert forces one (for tests and benchmarks).

}  // namespace lomo

extern "C" {
// MKL's CBLAS (row-major 101, no-transpose 111, transpose 112; LP64 ints), weak: absent -> nullptr.
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha, const uint16_t* a,
                            int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
void cblas_gemm_f16f16f32(int layout, int transa, int transb, int m, int n, int k, float alpha, const uint16_t* a,
                          int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
}

namespace lomo {

using LowpGemmFn = void (*)(int, int, int, int, int, int, float, const uint16_t*, int, const uint16_t*, int, float,
                            float*, int);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

// Checks a 16-bit GEMM on a small exactly representable product: a wrong calling convention or
// integer width gives a wrong answer (or none) here rather than wrong updates later.
inline bool lowp_gemm_works(LowpGemmFn fn, bool is_bf16) {
  if (fn == nullptr) return false;
  constexpr int T = 5, M = 3, N = 4;
  uint16_t a[T * M], b[T * N];
  float va[T * M], vb[T * N], c[M * N], want[M * N];
  for (int i = 0; i < T * M; ++i) va[i] = static_cast<float>((i * 7) % 5) - 2.0f;
  for (int i = 0; i < T * N; ++i) vb[i] = static_cast<float>((i * 3) % 7) - 3.0f;
  for (int i = 0; i < T * M; ++i) a[i] = is_bf16 ? bf16_nearest(va[i]).bits : fp16_nearest(va[i]).bits;
  for (int i = 0; i < T * N; ++i) b[i] = is_bf16 ? bf16_nearest(vb[i]).bits : fp16_nearest(vb[i]).bits;
  for (int m = 0; m < M; ++m) {
    for (int n = 0; n < N; ++n) {
      float s = 0.0f;
      for (int t = 0; t < T; ++t) s += va[t * M + m] * vb[t * N + n];
      want[m * N + n] = s;
      c[m * N + n] = -1.0f;
    }
  }
  // c = aᵀ b with a [T, M] (lda M), b [T, N] (ldb N): the shape of a weight-gradient block.
  fn(kRowMajor, kTrans, kNoTrans, M, N, T, 1.0f, a, M, b, N, 0.0f, c, N);
  return std::equal(c, c + M * N, want);
}

inline LowpGemmFn mkl_gemm(DType dtype) {
  static const LowpGemmFn bf16_fn =
      lowp_gemm_works(cblas_gemm_bf16bf16f32, true) ? LowpGemmFn{cblas_gemm_bf16bf16f32} : nullptr;
  static const LowpGemmFn f16_fn =
      lowp_gemm_works(cblas_gemm_f16f16f32, false) ? LowpGemmFn{cblas_gemm_f16f16f32} : nullptr;
  return dtype == DType::bf16 ? bf16_fn : dtype == DType::f16 ? f16_fn : nullptr;
}

inline bool fits_int(int64_t v) { return v <= std::numeric_limits<int>::max(); }

// The GEMM for 16-bit operands of `dtype`, or nullptr for the convert path.
inline LowpGemmFn lowp_gemm_for(DType dtype, std::initializer_list<int64_t> dims) {
  if (dtype == DType::f32 || env_is("LOMO_CPU_LOWP_GEMM", "convert")) return nullptr;
  const LowpGemmFn fn = mkl_gemm(dtype);
  TORCH_CHECK(fn != nullptr || !env_is("LOMO_CPU_LOWP_GEMM", "mkl"),
              "lomo_kernels: LOMO_CPU_LOWP_GEMM=mkl but this torch's MKL has no working 16-bit GEMM");
  for (int64_t d : dims) {
    if (!fits_int(d)) return nullptr;
  }
  return fn;
}

inline const uint16_t* bits_of(const at::Tensor& t) { return static_cast<const uint16_t*>(t.data_ptr()); }

// G = grad_outᵀ x in row blocks: compute(r0, rows, g) writes rows r0.. of G (fp32, `rows` x in,
// row-major) into g. x [T, in] and grad_out [T, out] are contiguous and of one dtype.
class GradientBlocks {
 public:
  GradientBlocks(const at::Tensor& x, const at::Tensor& grad_out)
      : x_(x), dy_(grad_out), tokens_(x.size(0)), in_(x.size(1)), out_(grad_out.size(1)), dtype_(dtype_of(x)) {
    TORCH_CHECK(x.scalar_type() == grad_out.scalar_type(), "lomo_kernels: x and grad_out must have one dtype");
    gemm_ = lowp_gemm_for(dtype_, {tokens_, in_, out_});
    if (dtype_ != DType::f32 && gemm_ == nullptr) {
      // convert path: token chunks of both operands in fp32 scratch, at most one block together
      chunk_tokens_ = std::max<int64_t>(1, kBlockElements / std::max<int64_t>(in_ + block_rows(), 1));
      x_chunk_ = at::empty({std::min(chunk_tokens_, tokens_), in_}, x.options().dtype(at::kFloat));
      dy_chunk_ = at::empty({std::min(chunk_tokens_, tokens_), block_rows()}, x.options().dtype(at::kFloat));
    }
  }

  int64_t block_rows() const { return std::min(rows_per_block(in_), std::max<int64_t>(out_, 1)); }
  int64_t out_features() const { return out_; }
  int64_t in_features() const { return in_; }

  void compute(int64_t r0, int64_t rows, at::Tensor g) {
    float* c = g.data_ptr<float>();
    if (tokens_ == 0) {
      std::fill(c, c + rows * in_, 0.0f);
    } else if (dtype_ == DType::f32) {
      at::mm_out(g, dy_.narrow(1, r0, rows).t(), x_);
    } else if (gemm_ != nullptr) {
      gemm_(kRowMajor, kTrans, kNoTrans, static_cast<int>(rows), static_cast<int>(in_), static_cast<int>(tokens_),
            1.0f, bits_of(dy_) + r0, static_cast<int>(out_), bits_of(x_), static_cast<int>(in_), 0.0f, c,
            static_cast<int>(in_));
    } else {
      for (int64_t t0 = 0; t0 < tokens_; t0 += chunk_tokens_) {
        const int64_t n = std::min(chunk_tokens_, tokens_ - t0);
        at::Tensor xc = x_chunk_.narrow(0, 0, n), dyc = dy_chunk_.narrow(0, 0, n).narrow(1, 0, rows);
        xc.copy_(x_.narrow(0, t0, n));
        dyc.copy_(dy_.narrow(0, t0, n).narrow(1, r0, rows));
        if (t0 == 0) {
          at::mm_out(g, dyc.t(), xc);
        } else {
          g.addmm_(dyc.t(), xc);
        }
      }
    }
  }

 private:
  at::Tensor x_, dy_;
  int64_t tokens_, in_, out_;
  DType dtype_;
  LowpGemmFn gemm_ = nullptr;
  int64_t chunk_tokens_ = 0;
  at::Tensor x_chunk_, dy_chunk_;
};

// Calls fn(first_row, rows, g) for each row block of G = grad_outᵀ x (fp32, `rows` x in_features,
// row-major); one block buffer serves every block.
template <class Fn>
inline void for_each_gradient_block(const at::Tensor& x, const at::Tensor& grad_out, Fn&& fn) {
  GradientBlocks blocks(x, grad_out);
  const int64_t out_features = blocks.out_features(), in_features = blocks.in_features();
  const int64_t block_rows = blocks.block_rows();
  at::Tensor buffer = at::empty({block_rows, in_features}, x.options().dtype(at::kFloat));
  for (int64_t r0 = 0; r0 < out_features; r0 += block_rows) {
    const int64_t rows = std::min(block_rows, out_features - r0);
    at::Tensor g = buffer.narrow(0, 0, rows);
    blocks.compute(r0, rows, g);
    fn(r0, rows, g.data_ptr<float>());
  }
}

// counter[0] += count (an int64 tensor of one element, or undefined: no counting).
inline void add_to_counter(const c10::optional<at::Tensor>& counter, int64_t count) {
  if (counter.has_value() && counter->defined() && count != 0) counter->data_ptr<int64_t>()[0] += count;
}

inline void check_counter(const c10::optional<at::Tensor>& counter, const char* op) {
  if (!counter.has_value() || !counter->defined()) return;
  TORCH_CHECK(counter->scalar_type() == at::kLong && counter->numel() == 1 && counter->device().is_cpu(),
              "lomo_kernels_C::", op, ": nonfinite must be an int64 CPU tensor of one element");
}

inline void check_cpu_weight(const at::Tensor& w, const char* op) {
  TORCH_CHECK(w.device().is_cpu() && w.is_contiguous() && w.dim() >= 1, "lomo_kernels_C::", op,
              ": expected a contiguous CPU weight");
}

inline void check_activations(const at::Tensor& x, const at::Tensor& grad_out, int64_t out_features,
                              int64_t in_features, const char* op) {
  TORCH_CHECK(x.dim() == 2 && grad_out.dim() == 2 && x.size(0) == grad_out.size(0) && x.size(1) == in_features &&
                  grad_out.size(1) == out_features,
              "lomo_kernels_C::", op, ": expected x [T, ", in_features, "] and grad_out [T, ", out_features, "], got ",
              x.sizes(), " and ", grad_out.sizes());
}

// Calls fn(k, row, g) for each group k of the batch (its row, padding row excluded), g the row's fp32
// gradient: its grad_out rows summed in token order (the groups come from a stable sort, group_rows),
// so the sums do not depend on the thread count. Groups run in parallel; g is a per-thread buffer.
template <class D, class Fn>
inline void for_each_row_gradient(const RowGroups& groups, const D* dy, int64_t dim, Fn&& fn) {
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

inline void check_embedding(const at::Tensor& indices, const at::Tensor& grad_out, int64_t dim, const char* op) {
  TORCH_CHECK(indices.scalar_type() == at::kLong && indices.dim() == 1 && grad_out.dim() == 2 &&
                  grad_out.size(0) == indices.size(0) && grad_out.size(1) == dim,
              "lomo_kernels_C::", op, ": expected int64 indices [T] and grad_out [T, ", dim, "], got ",
              indices.scalar_type(), " ", indices.sizes(), " and ", grad_out.sizes());
}

}  // namespace lomo
