// Per-element math of every fused update, shared by the CPU (g++) and CUDA (nvcc) kernels.
//
// This is lomo_kernels/ops/_common.py written once in C++: the update rule, nearest-even rounding to
// bf16/fp16, the counter-based stochastic rounding and the norm terms. The CPU build is tested to be
// bit-identical to the torch reference, so the GPU runs math that is tested on every CI run.
//
// Bit-exactness needs every float operation rounded on its own (no fused multiply-add): device code
// uses the explicit __fmul_rn/__fsub_rn/__fdiv_rn intrinsics, host code is compiled with
// -ffp-contract=off. bf16/fp16 values are raw uint16 bits here, so no CUDA or torch header is needed.
#pragma once

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define LOMO_HD __host__ __device__ __forceinline__
#else
#define LOMO_HD inline
#endif

namespace lomo {

// ---- float bits and IEEE single operations, each rounded to nearest-even ------------------------

LOMO_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
#endif
}

LOMO_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
#endif
}

LOMO_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

LOMO_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

LOMO_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

LOMO_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// a*b + c rounded once (torch's CPU lerp and addcmul kernels use fused multiply-adds).
LOMO_HD float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return __builtin_fmaf(a, b, c);
#endif
}

LOMO_HD float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return __builtin_sqrtf(a);
#endif
}

// Bit tests rather than std::isnan/isfinite: identical on host and device, immune to -ffast-math.
LOMO_HD bool is_nan(float f) { return (float_bits(f) & 0x7fffffffu) > 0x7f800000u; }
LOMO_HD bool is_finite(float f) { return (float_bits(f) & 0x7f800000u) != 0x7f800000u; }
LOMO_HD float abs_f(float f) { return bits_float(float_bits(f) & 0x7fffffffu); }

// ---- the counter-based uniform -------------------------------------------------------------------

// Wellons' "lowbias32" integer hash.
LOMO_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// Uniform in [0, 1) for the element at flat index `flat_index` of a weight; `seed_hash` is mix32(seed),
// computed once per call. The 24-bit value times 2**-24 is exact in fp32.
LOMO_HD float uniform_from_index(uint64_t flat_index, uint32_t seed_hash) {
  const uint32_t r = mix32(static_cast<uint32_t>(flat_index) ^ seed_hash);
  return static_cast<float>(r >> 8) * 5.9604644775390625e-08f;  // 2**-24
}

// ---- 16-bit float formats, as raw bits ------------------------------------------------------------

struct bf16 {
  uint16_t bits;
};
struct fp16 {
  uint16_t bits;
};

LOMO_HD float to_float(float v) { return v; }
LOMO_HD float to_float(bf16 v) { return bits_float(static_cast<uint32_t>(v.bits) << 16); }

LOMO_HD float to_float(fp16 v) {
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  const uint32_t exponent = (v.bits >> 10) & 0x1fu;
  const uint32_t mantissa = v.bits & 0x3ffu;
  if (exponent == 0x1fu) return bits_float(sign | 0x7f800000u | (mantissa << 13));  // inf / nan
  if (exponent != 0) return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  // zero or subnormal: mantissa * 2**-24, exact in fp32
  const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-08f;
  return bits_float(sign | float_bits(magnitude));
}

// Round-to-nearest-even float -> bf16. NaN becomes the canonical 0x7fc0 (as c10::BFloat16).
LOMO_HD bf16 bf16_nearest(float f) {
  const uint32_t u = float_bits(f);
  if (is_nan(f)) return bf16{0x7fc0u};
  const uint32_t rounding_bias = 0x7fffu + ((u >> 16) & 1u);
  return bf16{static_cast<uint16_t>((u + rounding_bias) >> 16)};
}

// Round-to-nearest-even float -> fp16 (overflow to inf, gradual underflow). NaN becomes a quiet NaN
// that keeps the sign (as c10::Half).
LOMO_HD fp16 fp16_nearest(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t mag = u & 0x7fffffffu;
  if (mag > 0x7f800000u) return fp16{static_cast<uint16_t>(sign | 0x7e00u)};
  if (mag >= 0x477ff000u) return fp16{static_cast<uint16_t>(sign | 0x7c00u)};  // >= 65520 rounds to inf
  uint32_t kept, dropped, half;
  if (mag >= 0x38800000u) {  // normal fp16: rebias the exponent, drop 13 mantissa bits
    const uint32_t rebiased = mag - 0x38000000u;
    kept = rebiased >> 13;
    dropped = rebiased & 0x1fffu;
    half = 0x1000u;
  } else {
    if (mag < 0x33000000u) return fp16{sign};  // below half the smallest subnormal (2**-25)
    // subnormal fp16: value = significand * 2**(e-150); in units of 2**-24 that is significand >> (126-e)
    const uint32_t shift = 126u - (mag >> 23);
    const uint32_t significand = (mag & 0x7fffffu) | 0x800000u;
    kept = significand >> shift;
    dropped = significand & ((1u << shift) - 1u);
    half = 1u << (shift - 1u);
  }
  if (dropped > half || (dropped == half && (kept & 1u))) ++kept;  // a carry moves into the exponent
  return fp16{static_cast<uint16_t>(sign | kept)};
}

LOMO_HD bf16 round_nearest(float v, bf16) { return bf16_nearest(v); }
LOMO_HD fp16 round_nearest(float v, fp16) { return fp16_nearest(v); }

// Counter-based stochastic rounding of fp32 `v` into the 16-bit format T (bf16 or fp16), exactly as
// round_stochastic in _common.py: between the neighbours lo <= |v| < hi, round up with probability
// (|v| - lo) / (hi - lo). Representable and non-finite values, and values whose upper neighbour
// would be infinite, take the nearest rounding.
template <class T>
LOMO_HD T round_stochastic(float v, float uniform) {
  const T near = round_nearest(v, T{});
  const float mag = abs_f(v);
  const float near_mag = abs_f(to_float(near));
  if (near_mag == mag || !is_finite(v)) return near;
  // In sign-magnitude formats bits - 1 / bits + 1 step the magnitude down / up.
  const T lo{static_cast<uint16_t>(near_mag > mag ? near.bits - 1u : near.bits)};
  const T hi{static_cast<uint16_t>(lo.bits + 1u)};
  const float lo_mag = abs_f(to_float(lo));
  const float hi_mag = abs_f(to_float(hi));
  if (!is_finite(hi_mag)) return near;
  const float p = div_rn(sub_rn(mag, lo_mag), sub_rn(hi_mag, lo_mag));
  return uniform < p ? hi : lo;
}

// ---- the update rule ------------------------------------------------------------------------------

// The fp32 scalars of one update (UpdateRule in _common.py, each double rounded to float once, as
// torch does for a Python scalar). clip_value is +inf when there is no value clipping.
struct Rule {
  float decay;
  float step;
  float inv_loss_scale;
  float clip_value;
  bool stochastic;
  uint32_t seed_hash;  // mix32(seed)
};

// torch.clamp semantics: NaN passes through.
LOMO_HD float clamp_nan(float u, float bound) {
  if (is_nan(u)) return u;
  const float lower = u < -bound ? -bound : u;
  return bound < lower ? bound : lower;
}

// w_new = w*decay - step*clamp(g*inv_loss_scale, ±clip_value), every product rounded to fp32.
LOMO_HD float updated_value(float w, float g, const Rule& rule) {
  const float u = clamp_nan(mul_rn(g, rule.inv_loss_scale), rule.clip_value);
  return sub_rn(mul_rn(w, rule.decay), mul_rn(rule.step, u));
}

LOMO_HD float store_rounded(float v, uint64_t, const Rule&, float) { return v; }

template <class T>
LOMO_HD T store_rounded(float v, uint64_t flat_index, const Rule& rule, T) {
  return rule.stochastic ? round_stochastic<T>(v, uniform_from_index(flat_index, rule.seed_hash))
                         : round_nearest(v, T{});
}

// Whether a stored value (fp32, or bf16/fp16 bits) is finite.
LOMO_HD bool stored_finite(float v) { return is_finite(v); }
LOMO_HD bool stored_finite(bf16 v) { return (v.bits & 0x7f80u) != 0x7f80u; }
LOMO_HD bool stored_finite(fp16 v) { return (v.bits & 0x7c00u) != 0x7c00u; }

// Update one weight element in place from its fp32 gradient entry `g`; `flat_index` is the
// element's flat index in the whole weight (it seeds stochastic rounding).
// The non-finite guard: when the new value, rounded into the weight's dtype, is not finite, the
// element keeps its old bits and the function returns true (the caller counts it); else false.
template <class T>
LOMO_HD bool update_element(T* w, float g, uint64_t flat_index, const Rule& rule) {
  const T old = *w;
  const T v = store_rounded(updated_value(to_float(old), g, rule), flat_index, rule, T{});
  const bool ok = stored_finite(v);
  *w = ok ? v : old;
  return !ok;
}

// ---- the AdamW rule (lomo_kernels.ops.adamw_update) ----------------------------------------------

// The fp32 scalars of one AdamW step (AdamRule in adamw_update.py, each double rounded to float once,
// as torch does for a Python scalar). lerp_weight = float(1 - beta1), as torch's lerp receives it.
struct AdamRule {
  float decay, neg_step, lerp_weight, beta2, one_minus_beta2, denom_div, eps, inv_loss_scale, clip_value, coef;
  bool stochastic, state_stochastic;
  uint32_t seed_hash_w, seed_hash_m, seed_hash_v;  // mix32 of the weight's, m's and v's rounding seeds
};

// New fp32 values of one element, in the torch reference's order of operations (reference_adamw.py,
// whose torch CPU kernels were checked to round this way: lerp and addcmul as one fused multiply-add,
// addcdiv as (value*m)/denom added to w):
//   g = coef · clamp(g_raw · inv_loss_scale, ±clip)
//   m = lerp(m, g, w1) = w1 < 0.5 ? fma(w1, g-m, m) : fma(w1-1, g-m, g)
//   v = fma((1-β2)·g, g, v·β2)
//   w = w·decay + (-step·m) / (√v / denom_div + eps)
// √v is torch's sqrt on the device: IEEE (correctly rounded) on CUDA, as here; the CPU build computes
// v first (adam_second_moment), takes at::sqrt of a span of them (on CPU that is MKL's vector sqrt,
// not correctly rounded for ~20% of inputs) and passes each root in.
struct AdamValues {
  float w, m;
};

LOMO_HD float adam_gradient(float g_raw, const AdamRule& r) {
  return mul_rn(clamp_nan(mul_rn(g_raw, r.inv_loss_scale), r.clip_value), r.coef);
}

LOMO_HD float adam_second_moment(float v, float g, const AdamRule& r) {
  return fma_rn(mul_rn(r.one_minus_beta2, g), g, mul_rn(v, r.beta2));
}

// The new w and m of one element from its transformed gradient g (adam_gradient) and `root` = √(its new
// v, adam_second_moment) as the caller's torch computes it.
LOMO_HD AdamValues adam_values(float w, float m, float g, float root, const AdamRule& r) {
  const float diff = sub_rn(g, m);
  const bool small = abs_f(r.lerp_weight) < 0.5f;
  const float m1 = small ? fma_rn(r.lerp_weight, diff, m) : fma_rn(sub_rn(r.lerp_weight, 1.0f), diff, g);
  float denom = root;
  if (r.denom_div != 1.0f) denom = div_rn(denom, r.denom_div);
  denom = add_rn(denom, r.eps);
  const float w1 = add_rn(mul_rn(w, r.decay), div_rn(mul_rn(r.neg_step, m1), denom));
  return AdamValues{w1, m1};
}

// v rounded into a moment's or weight's dtype (fp32: as is) with the given seed's stochastic rounding.
LOMO_HD float rounded_as(float v, uint64_t, bool, uint32_t, float) { return v; }

template <class T>
LOMO_HD T rounded_as(float v, uint64_t flat_index, bool stochastic, uint32_t seed_hash, T) {
  return stochastic ? round_stochastic<T>(v, uniform_from_index(flat_index, seed_hash)) : round_nearest(v, T{});
}

// One AdamW element in place from its transformed gradient g, new v1 and root = √v1: weight W
// (fp32/bf16/fp16), moments S (fp32/bf16).
// The non-finite guard: when the new w, m or v, rounded into its dtype, is not finite, all three keep
// their old bits and the function returns true (the caller counts the element); else false.
template <class W, class S>
LOMO_HD bool adam_store(W* w, S* m, S* v, float g, float v1, float root, uint64_t flat_index, const AdamRule& r) {
  const AdamValues nv = adam_values(to_float(*w), to_float(*m), g, root, r);
  const W w_out = rounded_as(nv.w, flat_index, r.stochastic, r.seed_hash_w, W{});
  const S m_out = rounded_as(nv.m, flat_index, r.state_stochastic, r.seed_hash_m, S{});
  const S v_out = rounded_as(v1, flat_index, r.state_stochastic, r.seed_hash_v, S{});
  if (!(stored_finite(w_out) && stored_finite(m_out) && stored_finite(v_out))) return true;
  *w = w_out;
  *m = m_out;
  *v = v_out;
  return false;
}

// One AdamW element from the raw fp32 gradient entry g_raw, with `root` = √(the new v) as torch computes
// it (the CPU kernels: MKL's sqrt, taken over a span of new v beforehand).
template <class W, class S>
LOMO_HD bool adam_element(W* w, S* m, S* v, float g_raw, float root, uint64_t flat_index, const AdamRule& r) {
  const float g = adam_gradient(g_raw, r);
  return adam_store(w, m, v, g, adam_second_moment(to_float(*v), g, r), root, flat_index, r);
}

// The same with the IEEE square root (the CUDA kernels: torch's own sqrt on the GPU).
template <class W, class S>
LOMO_HD bool adam_element(W* w, S* m, S* v, float g_raw, uint64_t flat_index, const AdamRule& r) {
  const float g = adam_gradient(g_raw, r);
  const float v1 = adam_second_moment(to_float(*v), g, r);
  return adam_store(w, m, v, g, v1, sqrt_rn(v1), flat_index, r);
}

}  // namespace lomo
