// Plain types shared by the ATen glue and the .cu files (which must not see ATen): the three float
// dtypes and a switch turning one into a C++ element type, the fp32 update rule, the grouping of
// embedding tokens by row, and the per-element norm term.
#pragma once

#include <stdexcept>
#include <string>

#include "lomo_math.h"

namespace lomo {

enum class DType : int { f32 = 0, bf16 = 1, f16 = 2 };

// Calls fn(element) with a value of float, lomo::bf16 or lomo::fp16 matching `dtype`.
template <class Fn>
decltype(auto) visit_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::f32:
      return fn(float{});
    case DType::bf16:
      return fn(bf16{});
    case DType::f16:
      return fn(fp16{});
  }
  throw std::invalid_argument("lomo_kernels: unsupported dtype code " + std::to_string(static_cast<int>(dtype)));
}

// The fp32 Rule the kernels consume, from the float64 scalars of UpdateRule.
inline Rule make_rule(double decay, double step, double inv_loss_scale, double clip_value, bool stochastic,
                      int64_t seed) {
  return Rule{static_cast<float>(decay),          static_cast<float>(step),
              static_cast<float>(inv_loss_scale), static_cast<float>(clip_value),
              stochastic,                         mix32(static_cast<uint32_t>(seed))};
}

// The fp32 AdamRule the kernels consume, from the float64 scalars of adamw_update.AdamRule. The moments'
// rounding seeds are derived from `seed` as AdamRule.seed_m / seed_v do (mix32(seed ^ constant)).
inline AdamRule make_adam_rule(double decay, double step, double beta1, double beta2, double denom_div, double eps,
                               double inv_loss_scale, double clip_value, double coef, bool stochastic,
                               bool state_stochastic, int64_t seed) {
  const uint32_t s = static_cast<uint32_t>(seed);
  return AdamRule{static_cast<float>(decay),       static_cast<float>(-step),
                  static_cast<float>(1.0 - beta1), static_cast<float>(beta2),
                  static_cast<float>(1.0 - beta2), static_cast<float>(denom_div),
                  static_cast<float>(eps),         static_cast<float>(inv_loss_scale),
                  static_cast<float>(clip_value),  static_cast<float>(coef),
                  stochastic,                      state_stochastic,
                  mix32(s),                        mix32(mix32(s ^ 0x6D6D6D6Du)),
                  mix32(mix32(s ^ 0x76767676u))};
}

// Tokens of an embedding batch grouped by row (from a stable sort of the indices): group k updates
// row rows[k] with the sum, in token order, of grad_out rows order[starts[k]] .. order[starts[k+1]-1].
// rows is sorted ascending and unique. The padding row takes no gradient and counts as untouched.
struct RowGroups {
  const int64_t* rows;
  const int64_t* order;
  const int64_t* starts;
  int64_t count;
  int64_t padding_idx;  // -1 for none
};

// Whether `row` receives a gradient (binary search in the sorted group rows).
LOMO_HD bool row_is_touched(const RowGroups& groups, int64_t row) {
  if (row == groups.padding_idx) return false;
  int64_t lo = 0, hi = groups.count;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (groups.rows[mid] < row) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo < groups.count && groups.rows[lo] == row;
}

// The norm pass's terms for one gradient entry: u*u and !isfinite(u), u = g*inv_loss_scale (unclipped).
struct NormTerm {
  float square;
  bool nonfinite;
};

LOMO_HD NormTerm norm_term(float g, float inv_loss_scale) {
  const float u = mul_rn(g, inv_loss_scale);
  return NormTerm{mul_rn(u, u), !is_finite(u)};
}

}  // namespace lomo
