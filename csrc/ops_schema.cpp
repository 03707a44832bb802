// Schemas of the compiled ops (namespace lomo_kernels_C). Each takes the scalars of
// lomo_kernels.ops._common.UpdateRule and the CUDA stream as an integer (0 on CPU): the torch we build
// against may lack CUDA, so the CUDA kernels cannot ask torch for the current stream themselves.
// The adamw_* ops take the scalars of lomo_kernels.ops.adamw_update.AdamRule instead.
// Kernels: cpu/*.cpp (CPU dispatch key) and ops_cuda.cpp (CUDA dispatch key, CUDA builds only).
#include <torch/library.h>

TORCH_LIBRARY(lomo_kernels_C, m) {
  m.def(
      "linear_update(Tensor(a!) weight, Tensor x, Tensor grad_out, float decay, float step, float inv_loss_scale, "
      "float clip_value, bool stochastic, int seed, Tensor(b!)? nonfinite, int stream) -> ()");
  m.def("linear_grad_sqnorm(Tensor(a!) stats, Tensor x, Tensor grad_out, float inv_loss_scale, int stream) -> ()");
  m.def(
      "embedding_update(Tensor(a!) weight, Tensor indices, Tensor grad_out, int padding_idx, float decay, float step, "
      "float inv_loss_scale, float clip_value, bool stochastic, int seed, Tensor(b!)? nonfinite, int stream) -> ()");
  m.def(
      "embedding_grad_sqnorm(Tensor(a!) stats, Tensor indices, Tensor grad_out, int padding_idx, "
      "float inv_loss_scale, int stream) -> ()");
  m.def(
      "dense_update(Tensor(a!) param, Tensor grad, float decay, float step, float inv_loss_scale, float clip_value, "
      "bool stochastic, int seed, Tensor(b!)? nonfinite, int stream) -> ()");
  m.def("dense_grad_sqnorm(Tensor(a!) stats, Tensor grad, float inv_loss_scale, int stream) -> ()");
  // AdamW (lomo_kernels.ops.adamw_update): weight, exp_avg and exp_avg_sq updated in place.
  m.def(
      "adamw_linear_update(Tensor(a!) weight, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor x, Tensor grad_out, "
      "float decay, float step, float beta1, float beta2, float denom_div, float eps, float inv_loss_scale, "
      "float clip_value, float coef, bool stochastic, bool state_stochastic, int seed, Tensor(d!)? nonfinite, "
      "int stream) -> ()");
  m.def(
      "adamw_embedding_update(Tensor(a!) weight, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor indices, "
      "Tensor grad_out, int padding_idx, float decay, float step, float beta1, float beta2, float denom_div, "
      "float eps, float inv_loss_scale, float clip_value, float coef, bool stochastic, bool state_stochastic, "
      "int seed, Tensor(d!)? nonfinite, int stream) -> ()");
  m.def(
      "adamw_dense_update(Tensor(a!) param, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor grad, float decay, "
      "float step, float beta1, float beta2, float denom_div, float eps, float inv_loss_scale, float clip_value, "
      "float coef, bool stochastic, bool state_stochastic, int seed, Tensor(d!)? nonfinite, int stream) -> ()");
}
