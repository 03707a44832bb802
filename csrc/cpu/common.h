// The CPU kernels' shared machinery (csrc/cpu/*.cpp): block sizes, the vector epilogues' dispatch
// (simd_kernels.h holds them), the block GEMMs G = dyᵀx from the activations' own dtype, and the
// checks and counters every op uses. Header-only (inline): each op's file includes it.
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

// The sum over c in [0, n) of body(c): by the OpenMP team when `parallel`, else on the calling thread
// outside any OpenMP construct. Not `#pragma omp parallel for if (parallel)`: ATen called inside such an
// inactive team (the AdamW kernels' at::sqrt, MKL) waits on the pool's spinning threads, ~2 ms a call
// with 2 threads right after a GEMM.
template <class Body>
int64_t parallel_sum(int64_t n, bool parallel, Body&& body) {
  int64_t total = 0;
  if (!parallel) {
    for (int64_t c = 0; c < n; ++c) total += body(c);
    return total;
  }
#pragma omp parallel for schedule(static) reduction(+ : total)
  for (int64_t c = 0; c < n; ++c) total += body(c);
  return total;
}

// body(c) for c in [0, n), the same way (no result).
template <class Body>
void parallel_for(int64_t n, bool parallel, Body&& body) {
  if (!parallel) {
    for (int64_t c = 0; c < n; ++c) body(c);
    return;
  }
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < n; ++c) body(c);
}

inline int64_t rows_per_block(int64_t cols) { return std::max<int64_t>(1, kBlockElements / std::max<int64_t>(cols, 1)); }

template <class T>
T* typed(const at::Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

inline bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, value) == 0;
}

struct NormSums {
  double square = 0.0;
  int64_t nonfinite = 0;
};

// ---- vector epilogues -----------------------------------------------------------------------------
//
// The per-element math of lomo_math.h 16 (AVX-512F) or 8 (AVX2 + FMA) lanes at a time, bit-identical
// to the scalar loop (simd_kernels.h says how). The widest ISA the CPU has runs; LOMO_CPU_SIMD=0
// forces the scalar loop and LOMO_CPU_SIMD=avx2 caps at AVX2 (so an AVX-512 machine tests that path).
// Read on every call: tests switch it at run time. GCC only: clang has no `#pragma GCC target` (it
// takes the scalar path).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LOMO_HAVE_SIMD 1
#endif

enum class Simd { scalar, avx2, avx512 };

inline Simd simd_level() {
#ifdef LOMO_HAVE_SIMD
  static const Simd cpu = __builtin_cpu_supports("avx512f")                                 ? Simd::avx512
                          : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? Simd::avx2
                                                                                            : Simd::scalar;
  if (env_is("LOMO_CPU_SIMD", "0")) return Simd::scalar;
  if (env_is("LOMO_CPU_SIMD", "avx2")) return std::min(cpu, Simd::avx2);
  return cpu;
#else
  return Simd::scalar;
#endif
}

#ifdef LOMO_HAVE_SIMD
// A vector operation GCC cannot map onto the ISA's registers shows in the build log.
#pragma GCC diagnostic push
#pragma GCC diagnostic warning "-Wvector-operation-performance"

#pragma GCC push_options
#pragma GCC target("avx512f")
namespace avx512 {
constexpr int N = 16;
inline __m512 fma_v(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }
// A zero-masked form: the unmasked one's undefined-register temporaries trip -Wmaybe-uninitialized.
inline __m512d widen_v(__m256 a) { return _mm512_maskz_cvtps_pd(0xff, a); }
#include "simd_kernels.h"
}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
constexpr int N = 8;
inline __m256 fma_v(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
inline __m256d widen_v(__m128 a) { return _mm256_cvtps_pd(a); }
#include "simd_kernels.h"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC diagnostic pop
#endif  // LOMO_HAVE_SIMD

// Calls fn(kernels) with the Kernels of simd_level()'s ISA and returns true; false, calling nothing,
// on the scalar path.
template <class Fn>
inline bool vectorized(Fn&& fn) {
#ifdef LOMO_HAVE_SIMD
  switch (simd_level()) {
    case Simd::avx512:
      fn(avx512::Kernels{});
      return true;
    case Simd::avx2:
      fn(avx2::Kernels{});
      return true;
    case Simd::scalar:
      break;
  }
#endif
  (void)fn;
  return false;
}

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
  parallel_for(groups.count, groups.count * dim > kParallelGrain, [&](int64_t k) {
    const int64_t row = groups.rows[k];
    if (row == groups.padding_idx) return;
    thread_local std::vector<float> g;
    g.assign(static_cast<size_t>(dim), 0.0f);
    for (int64_t t = groups.starts[k]; t < groups.starts[k + 1]; ++t) {
      const D* src = dy + groups.order[t] * dim;
      for (int64_t c = 0; c < dim; ++c) g[c] += to_float(src[c]);
    }
    fn(k, row, g.data());
  });
}

inline void check_embedding(const at::Tensor& indices, const at::Tensor& grad_out, int64_t dim, const char* op) {
  TORCH_CHECK(indices.scalar_type() == at::kLong && indices.dim() == 1 && grad_out.dim() == 2 &&
                  grad_out.size(0) == indices.size(0) && grad_out.size(1) == dim,
              "lomo_kernels_C::", op, ": expected int64 indices [T] and grad_out [T, ", dim, "], got ",
              indices.scalar_type(), " ", indices.sizes(), " and ", grad_out.sizes());
}

}  // namespace lomo
