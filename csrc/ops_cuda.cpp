// CUDA dispatch of the compiled ops: unpacks tensors into raw pointers and calls the launchers of
// cuda/launch.h on the stream passed from Python. Built only when CUDA is. The torch we build
// against may be a CPU build, so nothing here may use torch's CUDA API; ATen ops on CUDA tensors
// (the sort that groups embedding tokens) are fine: they run through the installed torch.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "aten_glue.h"
#include "cuda/launch.h"

namespace lomo {
namespace {

cuda::Launch launch_for(const at::Tensor& t, int64_t stream) {
  TORCH_CHECK(t.is_cuda() && t.is_contiguous(), "lomo_kernels_C: expected a contiguous CUDA tensor");
  return cuda::Launch{t.get_device(), static_cast<uintptr_t>(stream)};
}

void check_same_device(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(b.device() == a.device() && b.is_contiguous(), "lomo_kernels_C: expected contiguous tensors on ",
              a.device(), ", got one on ", b.device());
}

// The counter's pointer for the kernels (null: no counting): an int64 tensor of one element, on `w`'s device.
unsigned long long* counter_ptr(const c10::optional<at::Tensor>& nonfinite, const at::Tensor& w) {
  if (!nonfinite.has_value() || !nonfinite->defined()) return nullptr;
  TORCH_CHECK(nonfinite->scalar_type() == at::kLong && nonfinite->numel() == 1 && nonfinite->device() == w.device(),
              "lomo_kernels_C: nonfinite must be an int64 tensor of one element on ", w.device());
  return reinterpret_cast<unsigned long long*>(nonfinite->data_ptr<int64_t>());
}

void check_stats(const at::Tensor& stats) {
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.numel() == 2,
              "lomo_kernels_C: stats must be a float32 tensor of 2 elements");
}

void check_linear(const at::Tensor& x, const at::Tensor& grad_out, int64_t out_features, int64_t in_features) {
  TORCH_CHECK(x.dim() == 2 && grad_out.dim() == 2 && x.size(0) == grad_out.size(0) && x.size(1) == in_features &&
                  grad_out.size(1) == out_features && x.scalar_type() == grad_out.scalar_type(),
              "lomo_kernels_C: expected x [T, ", in_features, "] and grad_out [T, ", out_features,
              "] of one dtype, got ", x.sizes(), " and ", grad_out.sizes());
}

void check_embedding(const at::Tensor& indices, const at::Tensor& grad_out) {
  TORCH_CHECK(indices.scalar_type() == at::kLong && indices.dim() == 1 && grad_out.dim() == 2 &&
                  grad_out.size(0) == indices.size(0),
              "lomo_kernels_C: expected int64 indices [T] and grad_out [T, dim], got ", indices.sizes(), " and ",
              grad_out.sizes());
}

void linear_update(const at::Tensor& weight, const at::Tensor& x, const at::Tensor& grad_out, double decay,
                   double step, double inv_loss_scale, double clip_value, bool stochastic, int64_t seed,
                   const c10::optional<at::Tensor>& nonfinite, int64_t stream) {
  const cuda::Launch launch = launch_for(weight, stream);
  check_same_device(weight, x);
  check_same_device(weight, grad_out);
  TORCH_CHECK(weight.dim() == 2, "lomo_kernels_C::linear_update: weight must be 2-D");
  check_linear(x, grad_out, weight.size(0), weight.size(1));
  cuda::linear_update(launch, weight.data_ptr(), dtype_of(weight), x.data_ptr(), grad_out.data_ptr(), dtype_of(x),
                      x.size(0), weight.size(0), weight.size(1),
                      make_rule(decay, step, inv_loss_scale, clip_value, stochastic, seed),
                      counter_ptr(nonfinite, weight));
}

void linear_grad_sqnorm(const at::Tensor& stats, const at::Tensor& x, const at::Tensor& grad_out,
                        double inv_loss_scale, int64_t stream) {
  const cuda::Launch launch = launch_for(stats, stream);
  check_stats(stats);
  check_same_device(stats, x);
  check_same_device(stats, grad_out);
  check_linear(x, grad_out, grad_out.size(1), x.size(1));
  cuda::linear_grad_sqnorm(launch, stats.data_ptr<float>(), x.data_ptr(), grad_out.data_ptr(), dtype_of(x),
                           x.size(0), grad_out.size(1), x.size(1), static_cast<float>(inv_loss_scale));
}

void embedding_update(const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& grad_out,
                      int64_t padding_idx, double decay, double step, double inv_loss_scale, double clip_value,
                      bool stochastic, int64_t seed, const c10::optional<at::Tensor>& nonfinite, int64_t stream) {
  const cuda::Launch launch = launch_for(weight, stream);
  check_same_device(weight, indices);
  check_same_device(weight, grad_out);
  check_embedding(indices, grad_out);
  TORCH_CHECK(weight.dim() == 2 && grad_out.size(1) == weight.size(1),
              "lomo_kernels_C::embedding_update: grad_out rows must match the weight's ", weight.size(1), " columns");
  // group_tensors is freed on return while the kernels may still read it; the caching allocator only
  // hands the memory to later work on the same (current) stream, which runs after them.
  const RowGroupTensors group_tensors = group_rows(indices);
  cuda::embedding_update(launch, weight.data_ptr(), dtype_of(weight), weight.size(0), weight.size(1),
                         grad_out.data_ptr(), dtype_of(grad_out), group_tensors.view(padding_idx), decay != 1.0,
                         make_rule(decay, step, inv_loss_scale, clip_value, stochastic, seed),
                         counter_ptr(nonfinite, weight));
}

void embedding_grad_sqnorm(const at::Tensor& stats, const at::Tensor& indices, const at::Tensor& grad_out,
                           int64_t padding_idx, double inv_loss_scale, int64_t stream) {
  const cuda::Launch launch = launch_for(stats, stream);
  check_stats(stats);
  check_same_device(stats, indices);
  check_same_device(stats, grad_out);
  check_embedding(indices, grad_out);
  const RowGroupTensors group_tensors = group_rows(indices);
  cuda::embedding_grad_sqnorm(launch, stats.data_ptr<float>(), grad_out.data_ptr(), dtype_of(grad_out),
                              grad_out.size(1), group_tensors.view(padding_idx), static_cast<float>(inv_loss_scale));
}

void dense_update(const at::Tensor& param, const at::Tensor& grad, double decay, double step, double inv_loss_scale,
                  double clip_value, bool stochastic, int64_t seed, const c10::optional<at::Tensor>& nonfinite,
                  int64_t stream) {
  const cuda::Launch launch = launch_for(param, stream);
  check_same_device(param, grad);
  TORCH_CHECK(grad.numel() == param.numel(), "lomo_kernels_C::dense_update: grad has ", grad.numel(),
              " elements, the parameter ", param.numel());
  cuda::dense_update(launch, param.data_ptr(), dtype_of(param), grad.data_ptr(), dtype_of(grad), param.numel(),
                     make_rule(decay, step, inv_loss_scale, clip_value, stochastic, seed),
                     counter_ptr(nonfinite, param));
}

void dense_grad_sqnorm(const at::Tensor& stats, const at::Tensor& grad, double inv_loss_scale, int64_t stream) {
  const cuda::Launch launch = launch_for(stats, stream);
  check_stats(stats);
  check_same_device(stats, grad);
  cuda::dense_grad_sqnorm(launch, stats.data_ptr<float>(), grad.data_ptr(), dtype_of(grad), grad.numel(),
                          static_cast<float>(inv_loss_scale));
}

// ---- AdamW ----------------------------------------------------------------------------------------

void check_moments(const at::Tensor& w, const at::Tensor& m, const at::Tensor& v) {
  for (const at::Tensor* s : {&m, &v}) {
    TORCH_CHECK(s->device() == w.device() && s->is_contiguous() && s->sizes() == w.sizes() &&
                    (s->scalar_type() == at::kFloat || s->scalar_type() == at::kBFloat16),
                "lomo_kernels_C: exp_avg and exp_avg_sq must be contiguous float32 or bfloat16 tensors of the weight's "
                "shape on ", w.device());
  }
  TORCH_CHECK(m.scalar_type() == v.scalar_type(), "lomo_kernels_C: exp_avg and exp_avg_sq must have one dtype");
}

#define LOMO_ADAM_SCALARS                                                                                      \
  double decay, double step, double beta1, double beta2, double denom_div, double eps, double inv_loss_scale, \
      double clip_value, double coef, bool stochastic, bool state_stochastic, int64_t seed
#define LOMO_ADAM_RULE                                                                                        \
  make_adam_rule(decay, step, beta1, beta2, denom_div, eps, inv_loss_scale, clip_value, coef, stochastic, \
                 state_stochastic, seed)

void adamw_linear_update(const at::Tensor& weight, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                         const at::Tensor& x, const at::Tensor& grad_out, LOMO_ADAM_SCALARS,
                         const c10::optional<at::Tensor>& nonfinite, int64_t stream) {
  const cuda::Launch launch = launch_for(weight, stream);
  check_same_device(weight, x);
  check_same_device(weight, grad_out);
  TORCH_CHECK(weight.dim() == 2, "lomo_kernels_C::adamw_linear_update: weight must be 2-D");
  check_moments(weight, exp_avg, exp_avg_sq);
  check_linear(x, grad_out, weight.size(0), weight.size(1));
  cuda::adamw_linear_update(launch, weight.data_ptr(), dtype_of(weight), exp_avg.data_ptr(), exp_avg_sq.data_ptr(),
                            dtype_of(exp_avg), x.data_ptr(), grad_out.data_ptr(), dtype_of(x), x.size(0),
                            weight.size(0), weight.size(1), LOMO_ADAM_RULE, counter_ptr(nonfinite, weight));
}

void adamw_embedding_update(const at::Tensor& weight, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                            const at::Tensor& indices, const at::Tensor& grad_out, int64_t padding_idx,
                            LOMO_ADAM_SCALARS, const c10::optional<at::Tensor>& nonfinite, int64_t stream) {
  const cuda::Launch launch = launch_for(weight, stream);
  check_same_device(weight, indices);
  check_same_device(weight, grad_out);
  check_embedding(indices, grad_out);
  TORCH_CHECK(weight.dim() == 2 && grad_out.size(1) == weight.size(1),
              "lomo_kernels_C::adamw_embedding_update: grad_out rows must match the weight's ", weight.size(1),
              " columns");
  check_moments(weight, exp_avg, exp_avg_sq);
  // freed on return while the kernels may still read it: safe on the current stream (see embedding_update)
  const RowGroupTensors group_tensors = group_rows(indices);
  cuda::adamw_embedding_update(launch, weight.data_ptr(), dtype_of(weight), exp_avg.data_ptr(), exp_avg_sq.data_ptr(),
                               dtype_of(exp_avg), weight.size(0), weight.size(1), grad_out.data_ptr(),
                               dtype_of(grad_out), group_tensors.view(padding_idx), LOMO_ADAM_RULE,
                               counter_ptr(nonfinite, weight));
}

void adamw_dense_update(const at::Tensor& param, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                        const at::Tensor& grad, LOMO_ADAM_SCALARS, const c10::optional<at::Tensor>& nonfinite,
                        int64_t stream) {
  const cuda::Launch launch = launch_for(param, stream);
  check_same_device(param, grad);
  TORCH_CHECK(grad.numel() == param.numel(), "lomo_kernels_C::adamw_dense_update: grad has ", grad.numel(),
              " elements, the parameter ", param.numel());
  check_moments(param, exp_avg, exp_avg_sq);
  cuda::adamw_dense_update(launch, param.data_ptr(), dtype_of(param), exp_avg.data_ptr(), exp_avg_sq.data_ptr(),
                           dtype_of(exp_avg), grad.data_ptr(), dtype_of(grad), param.numel(), LOMO_ADAM_RULE,
                           counter_ptr(nonfinite, param));
}

#undef LOMO_ADAM_SCALARS
#undef LOMO_ADAM_RULE

}  // namespace
}  // namespace lomo

TORCH_LIBRARY_IMPL(lomo_kernels_C, CUDA, m) {
  m.impl("adamw_linear_update", &lomo::adamw_linear_update);
  m.impl("adamw_embedding_update", &lomo::adamw_embedding_update);
  m.impl("adamw_dense_update", &lomo::adamw_dense_update);
  m.impl("linear_update", &lomo::linear_update);
  m.impl("linear_grad_sqnorm", &lomo::linear_grad_sqnorm);
  m.impl("embedding_update", &lomo::embedding_update);
  m.impl("embedding_grad_sqnorm", &lomo::embedding_grad_sqnorm);
  m.impl("dense_update", &lomo::dense_update);
  m.impl("dense_grad_sqnorm", &lomo::dense_grad_sqnorm);
}
