// Schemas of the compiled ops (namespace lomo_kernels_C). Each takes the scalars of
// lomo_kernels.ops._common.UpdateRule and the CUDA stream as an integer (0 on CPU): the torch we build
// against may lack CUDA, so the CUDA kernels cannot ask torch for the current stream themselves.
// Kernels: ops_cpu.cpp (CPU dispatch key) and ops_cuda.cpp (CUDA dispatch key, CUDA builds only).
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
}
