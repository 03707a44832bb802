// Host entry points of the CUDA kernels: raw device pointers, sizes and the stream, no ATen and no
// CUDA header (ops_cuda.cpp, compiled by the host compiler against ATen, calls these). Each launches
// asynchronously on `stream` and throws std::runtime_error if the launch fails.
#pragma once

#include <stdint.h>

#include "../kernel_types.h"

namespace lomo {
namespace cuda {

struct Launch {
  int device;        // CUDA device index the tensors live on
  uintptr_t stream;  // cudaStream_t as an integer (torch.cuda.Stream.cuda_stream)
};

// W[out, in] <- rule(W, dyᵀx) with x[tokens, in], dy[tokens, out] of act_dtype.
void linear_update(const Launch& launch, void* w, DType w_dtype, const void* x, const void* dy, DType act_dtype,
                   int64_t tokens, int64_t out_features, int64_t in_features, const Rule& rule,
                   unsigned long long* nonfinite);

// stats[0] += Σ u², stats[1] += #(!isfinite(u)), u = (dyᵀx) * inv_loss_scale.
void linear_grad_sqnorm(const Launch& launch, float* stats, const void* x, const void* dy, DType act_dtype,
                        int64_t tokens, int64_t out_features, int64_t in_features, float inv_loss_scale);

// Rows of W[vocab, dim] in `groups` take their summed dy rows; with decay_untouched the other rows decay.
void embedding_update(const Launch& launch, void* w, DType w_dtype, int64_t vocab, int64_t dim, const void* dy,
                      DType dy_dtype, const RowGroups& groups, bool decay_untouched, const Rule& rule,
                      unsigned long long* nonfinite);

void embedding_grad_sqnorm(const Launch& launch, float* stats, const void* dy, DType dy_dtype, int64_t dim,
                           const RowGroups& groups, float inv_loss_scale);

void dense_update(const Launch& launch, void* p, DType p_dtype, const void* g, DType g_dtype, int64_t count,
                  const Rule& rule, unsigned long long* nonfinite);
// (the update launchers: `nonfinite`, when not null, gets +1 per element the non-finite guard kept)

void dense_grad_sqnorm(const Launch& launch, float* stats, const void* g, DType g_dtype, int64_t count,
                       float inv_loss_scale);

// driver.cu: the CUDA version the installed driver supports (1000*major + 10*minor; 0 without a
// driver) and the one of the runtime these kernels were built with (CUDART_VERSION, linked statically).
int driver_version();
int runtime_version();

// AdamW (adamw.cu): W and its moments m, v (s_dtype fp32 or bf16) updated in place by adam_element.
void adamw_linear_update(const Launch& launch, void* w, DType w_dtype, void* m, void* v, DType s_dtype, const void* x,
                         const void* dy, DType act_dtype, int64_t tokens, int64_t out_features, int64_t in_features,
                         const AdamRule& rule, unsigned long long* nonfinite);

// Touched rows of W[vocab, dim] take their summed dy rows, every other row a zero gradient.
void adamw_embedding_update(const Launch& launch, void* w, DType w_dtype, void* m, void* v, DType s_dtype,
                            int64_t vocab, int64_t dim, const void* dy, DType dy_dtype, const RowGroups& groups,
                            const AdamRule& rule, unsigned long long* nonfinite);

void adamw_dense_update(const Launch& launch, void* p, DType p_dtype, void* m, void* v, DType s_dtype, const void* g,
                        DType g_dtype, int64_t count, const AdamRule& rule, unsigned long long* nonfinite);

}  // namespace cuda
}  // namespace lomo
