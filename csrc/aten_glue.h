// What the CPU kernels and the CUDA glue share on the ATen side: dtype mapping and the grouping of
// embedding tokens by row.
#pragma once

#include <ATen/ATen.h>

#include "kernel_types.h"

namespace lomo {

inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::f32;
    case at::kBFloat16:
      return DType::bf16;
    case at::kHalf:
      return DType::f16;
    default:
      TORCH_CHECK(false, "lomo_kernels: expected a float32, bfloat16 or float16 tensor, got ", t.scalar_type());
  }
}

// Tensors behind a RowGroups view; they must outlive the kernels that read the view.
struct RowGroupTensors {
  at::Tensor rows, order, starts;

  RowGroups view(int64_t padding_idx) const {
    return RowGroups{rows.data_ptr<int64_t>(), order.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), rows.numel(),
                     padding_idx};
  }
};

// Groups the tokens of `indices` (1-D int64) by row. A stable sort keeps each row's tokens in token
// order, so duplicates are summed in the order the torch reference's index_add_ sums them.
inline RowGroupTensors group_rows(const at::Tensor& indices) {
  const auto sorted = at::sort(indices, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const auto unique = at::unique_consecutive(std::get<0>(sorted), /*return_inverse=*/false, /*return_counts=*/true);
  const at::Tensor& rows = std::get<0>(unique);
  at::Tensor starts = at::zeros({rows.numel() + 1}, indices.options());
  starts.narrow(0, 1, rows.numel()).copy_(at::cumsum(std::get<2>(unique), 0));
  return RowGroupTensors{rows.contiguous(), std::get<1>(sorted).contiguous(), starts};
}

}  // namespace lomo
