// The vector epilogues and reductions of the CPU kernels, written once in GCC's vector extensions.
// No include guard: common.h includes this file once per ISA, each time inside `#pragma GCC target`
// and a namespace that defines N (fp32 lanes in one register) and the operations the extensions lack
// or lower poorly: fma_v and widen_v (N/2 floats to doubles). So every function here is
// compiled for its ISA from the start; a generic template merely inlined into a target function
// would be optimized for the baseline ISA first, which turns AVX-512 mask logic into per-lane code.
//
// Each operation is the IEEE single operation lomo_math.h does, in its order (a fused multiply-add
// exactly where it has fma_rn, the same compares and integer bit
// manipulation), so the epilogues give the scalar path's bits at every width. Sums in double are
// associated as 16 partial sums whatever the width (Sums16), so AVX2 and AVX-512 give the same bits;
// the scalar loop sums in element order instead.

typedef float f32 __attribute__((vector_size(4 * N)));
typedef uint32_t u32 __attribute__((vector_size(4 * N)));
typedef int32_t i32 __attribute__((vector_size(4 * N)));  // lane masks: -1 (true) or 0
typedef uint16_t u16 __attribute__((vector_size(2 * N)));
// Half width, for sums: N/2 floats widen to one register of doubles.
typedef float f32h __attribute__((vector_size(2 * N)));
typedef int32_t i32h __attribute__((vector_size(2 * N)));
typedef double f64h __attribute__((vector_size(4 * N)));

template <class V>
inline V load(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <class V>
inline void store(void* p, V v) {
  std::memcpy(p, &v, sizeof v);
}

// Every lane x; built once per call, outside the loops.
template <class V, class T>
inline V splat(T x) {
  V v = {};
  for (int k = 0; k < static_cast<int>(sizeof v / sizeof x); ++k) v[k] = x;
  return v;
}

template <class V>
inline int64_t lane_sum(V v) {
  int64_t s = 0;
  for (int k = 0; k < static_cast<int>(sizeof v / sizeof v[0]); ++k) s += v[k];
  return s;
}

// !is_finite(): exponent bits all ones (F: f32 or f32h). Masks are -1 where true, so `count -= mask`
// counts the lanes.
template <class F>
inline auto nonfinite_v(F v) {
  typedef uint32_t U __attribute__((vector_size(sizeof(F))));
  return ((U)v & 0x7f800000u) == 0x7f800000u;
}

// clamp_nan(u, bound): NaN fails both tests and passes through.
template <class F>
inline F clamp_v(F u, float bound) {
  const F lower = u < -bound ? -bound : u;
  return bound < lower ? bound : lower;
}

// ---- storage formats: fp32 or bf16 values as the bits of their format in 32-bit lanes ---------------

template <class T>
inline u32 load_bits(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return load<u32>(p);
  } else {
    return __builtin_convertvector(load<u16>(p), u32);
  }
}

template <class T>
inline f32 bits_to_f32(u32 bits) {
  if constexpr (std::is_same_v<T, float>) {
    return (f32)bits;
  } else {
    return (f32)(bits << 16);
  }
}

// bits hold values of T's format (bf16: below 2**16).
template <class T>
inline void store_bits(T* p, u32 bits) {
  if constexpr (std::is_same_v<T, float>) {
    store(p, bits);
  } else {
    store(p, __builtin_convertvector(bits, u16));
  }
}

// !stored_finite()
template <class T>
inline i32 bits_nonfinite(u32 bits) {
  if constexpr (std::is_same_v<T, float>) {
    return nonfinite_v((f32)bits);
  } else {
    return (bits & 0x7f80u) == 0x7f80u;
  }
}

// bf16_nearest(). The magnitudes are below 2**31, so the signed compare is the unsigned one.
inline u32 bf16_nearest_v(f32 v) {
  const u32 u = (u32)v;
  const i32 nan = (i32)(u & 0x7fffffffu) > 0x7f800000;
  const u32 rounded = (u + (0x7fffu + ((u >> 16) & 1u))) >> 16;
  return nan ? 0x7fc0u : rounded;
}

inline u32 mix32_v(u32 x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  return x ^ (x >> 16);
}

// The 24-bit integers r >> 8 behind uniform_from_index() (uniform = (r >> 8) * 2**-24) of the flat
// indices first + lanes (mod 2**32), lanes = 0, 1, ..., N-1.
inline u32 uniform24_v(uint64_t first, u32 lanes, uint32_t seed_hash) {
  return mix32_v((static_cast<uint32_t>(first) + lanes) ^ seed_hash) >> 8;
}

// round_stochastic<bf16>() without its division. For finite v that is not a bf16 value, the
// neighbours are lo = v truncated to bf16 (its upper 16 bits) and hi = lo + 1 (one step up in
// magnitude), and (|v| - lo)/(hi - lo) is exactly (low 16 bits of v) * 2**-16 (both differences are
// exact, and the spacing is a power of two); so `uniform < p` is the integer test
// (r >> 8) < (low16 << 8) on the 24-bit uniform r >> 8 (both below 2**24: a signed compare will do).
// A representable v has low16 == 0 (never up). Non-finite v, and v whose upper neighbour would be
// infinite (lo = 0x7f7f), take the nearest rounding, as the scalar code does.
inline u32 bf16_stochastic_v(f32 v, u32 uniform24) {
  const u32 bits = (u32)v;
  const u32 trunc = bits >> 16;
  const i32 up = (i32)uniform24 < (i32)((bits & 0xffffu) << 8);
  const u32 rounded = up ? trunc + 1u : trunc;
  const i32 nearest = nonfinite_v(v) | (((bits & 0x7fffffffu) >> 16) == 0x7f7fu);
  return nearest ? bf16_nearest_v(v) : rounded;
}

// v rounded into T's format (store_rounded / rounded_as); for bf16 with the stochastic rounding of
// `seed_hash` at the flat indices first + lanes.
template <class T>
inline u32 round_bits(f32 v, bool stochastic, uint64_t first, u32 lanes, uint32_t seed_hash) {
  if constexpr (std::is_same_v<T, float>) {
    return (u32)v;
  } else {
    return stochastic ? bf16_stochastic_v(v, uniform24_v(first, lanes, seed_hash)) : bf16_nearest_v(v);
  }
}

inline u32 lane_indices() {
  u32 lanes = {};
  for (int k = 0; k < N; ++k) lanes[k] = static_cast<uint32_t>(k);
  return lanes;
}

// Sums in double over groups of 16 elements: 16 partial sums, lane k taking the elements ≡ k (mod 16),
// folded as ((s0+s8) + (s1+s9)) + ((s2+s10) + (s3+s11)) + ... . 32/N registers of N/2 doubles hold
// them, so the sums are the same at every width.
struct Sums16 {
  static constexpr int kParts = 32 / N;
  f64h part[kParts] = {};

  void add(int k, f32h x) { part[k] += widen_v(x); }

  double total() const {
    double s[16];
    std::memcpy(s, part, sizeof s);
    double t[8];
    for (int k = 0; k < 8; ++k) t[k] = s[k] + s[k + 8];
    return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
  }
};

struct Kernels {
  // update_element over [0, count): w[i] <- rule(w[i], g[i]), W float or bf16, with its non-finite
  // guard (a lane whose rounded result is not finite keeps its old bits). Returns the guarded lanes.
  template <class W>
  static int64_t update_span(W* w, const float* g, int64_t count, int64_t flat0, const Rule& scalar_rule) {
    // A copy held in registers: the rule's fields would be reloaded after every store to w otherwise
    // (it may alias the Rule).
    const Rule rule = scalar_rule;
    const u32 lanes = lane_indices();
    i32 guarded = {};
    int64_t i = 0;
    for (; i + N <= count; i += N) {
      const u32 old = load_bits(w + i);
      const f32 u = clamp_v(load<f32>(g + i) * rule.inv_loss_scale, rule.clip_value);
      const f32 v = bits_to_f32<W>(old) * rule.decay - rule.step * u;
      const u32 out = round_bits<W>(v, rule.stochastic, static_cast<uint64_t>(flat0 + i), lanes, rule.seed_hash);
      const i32 keep = bits_nonfinite<W>(out);
      store_bits(w + i, keep ? old : out);
      guarded -= keep;
    }
    int64_t bad = lane_sum(guarded);
    for (; i < count; ++i) bad += update_element(w + i, g[i], static_cast<uint64_t>(flat0 + i), scalar_rule);
    return bad;
  }

  // adam_gradient and adam_second_moment of lomo_math.h, N lanes.
  static f32 adam_gradient_v(const float* g, int64_t i, const AdamRule& r) {
    const f32 g_raw = g == nullptr ? f32{} : load<f32>(g + i);
    return clamp_v(g_raw * r.inv_loss_scale, r.clip_value) * r.coef;
  }

  template <class S>
  static f32 adam_second_moment_v(u32 v_old, f32 gv, const AdamRule& r) {
    return fma_v(r.one_minus_beta2 * gv, gv, bits_to_f32<S>(v_old) * r.beta2);
  }

  // out[i] = the new v of element i (adam_second_moment), for the caller to take torch's sqrt of.
  template <class S>
  static void adam_second_moments(const S* v, const float* g, int64_t count, const AdamRule& rule, float* out) {
    const AdamRule r = rule;
    int64_t i = 0;
    for (; i + N <= count; i += N) store(out + i, adam_second_moment_v<S>(load_bits(v + i), adam_gradient_v(g, i, r), r));
    for (; i < count; ++i) out[i] = adam_second_moment(to_float(v[i]), adam_gradient(g == nullptr ? 0.0f : g[i], r), r);
  }

  // adam_element over [0, count) with the gradient g (fp32, or nullptr: a zero gradient) and root[i] =
  // √(the new v) as torch computes it; returns the number of guarded elements. W, S in {float, bf16}.
  template <class W, class S>
  static int64_t adam_span(W* w, S* m, S* v, const float* g, const float* root, int64_t count, int64_t flat0,
                           const AdamRule& rule) {
    const AdamRule r = rule;  // held in registers (as in update_span)
    const bool small = abs_f(r.lerp_weight) < 0.5f;
    const f32 lerp_coef = splat<f32>(small ? r.lerp_weight : sub_rn(r.lerp_weight, 1.0f));
    const bool divide = r.denom_div != 1.0f;
    const u32 lanes = lane_indices();
    i32 guarded = {};
    int64_t i = 0;
    for (; i + N <= count; i += N) {
      const f32 gv = adam_gradient_v(g, i, r);
      const u32 w_old = load_bits(w + i), m_old = load_bits(m + i), v_old = load_bits(v + i);
      const f32 mv = bits_to_f32<S>(m_old);
      const f32 m1 = fma_v(lerp_coef, gv - mv, small ? mv : gv);
      const f32 v1 = adam_second_moment_v<S>(v_old, gv, r);
      f32 denom = load<f32>(root + i);
      if (divide) denom = denom / r.denom_div;
      denom = denom + r.eps;
      const f32 w1 = bits_to_f32<W>(w_old) * r.decay + (r.neg_step * m1) / denom;
      const uint64_t flat = static_cast<uint64_t>(flat0 + i);
      const u32 w_out = round_bits<W>(w1, r.stochastic, flat, lanes, r.seed_hash_w);
      const u32 m_out = round_bits<S>(m1, r.state_stochastic, flat, lanes, r.seed_hash_m);
      const u32 v_out = round_bits<S>(v1, r.state_stochastic, flat, lanes, r.seed_hash_v);
      const i32 keep = bits_nonfinite<W>(w_out) | bits_nonfinite<S>(m_out) | bits_nonfinite<S>(v_out);
      store_bits(w + i, keep ? w_old : w_out);
      store_bits(m + i, keep ? m_old : m_out);
      store_bits(v + i, keep ? v_old : v_out);
      guarded -= keep;
    }
    int64_t bad = lane_sum(guarded);
    for (; i < count; ++i) {
      bad += adam_element(w + i, m + i, v + i, g == nullptr ? 0.0f : g[i], root[i],
                          static_cast<uint64_t>(flat0 + i), rule);
    }
    return bad;
  }

  // g_j <- (clamp_nan(g_j*inv, ±bound) * rscale) * col_scale_j for one row.
  static void scale_row(float* g, int64_t n, float inv, float bound, float rscale, const float* col_scale) {
    int64_t j = 0;
    for (; j + N <= n; j += N) {
      store(g + j, clamp_v(load<f32>(g + j) * inv, bound) * rscale * load<f32>(col_scale + j));
    }
    for (; j < n; ++j) g[j] = mul_rn(mul_rn(clamp_nan(mul_rn(g[j], inv), bound), rscale), col_scale[j]);
  }

  // Σ norm_term(g[i], inv) over [0, count).
  static NormSums norm_sums(const float* g, int64_t count, float inv) {
    Sums16 square;
    i32h nonfinite = {};
    int64_t i = 0;
    for (; i + 16 <= count; i += 16) {
#pragma GCC unroll 4
      for (int k = 0; k < Sums16::kParts; ++k) {
        const f32h u = load<f32h>(g + i + k * (N / 2)) * inv;
        square.add(k, u * u);
        nonfinite -= nonfinite_v(u);
      }
    }
    NormSums sums{square.total(), lane_sum(nonfinite)};
    for (; i < count; ++i) {
      const NormTerm term = norm_term(g[i], inv);
      sums.square += term.square;
      sums.nonfinite += term.nonfinite;
    }
    return sums;
  }

  // Σ_s<n a[s]*b[s], products rounded to fp32, summed in double.
  static double dot(const float* a, const float* b, int64_t n) {
    Sums16 sum;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
#pragma GCC unroll 4
      for (int k = 0; k < Sums16::kParts; ++k) {
        const int64_t at = i + k * (N / 2);
        sum.add(k, load<f32h>(a + at) * load<f32h>(b + at));
      }
    }
    double s = sum.total();
    for (; i < n; ++i) s += static_cast<double>(a[i] * b[i]);
    return s;
  }

  // One row of AdaLomo's sums pass: returns Σ_j u², adds u_j² to cols[j] (double), and the norm terms
  // of u0 = g*inv (before clipping) to *square / *bad; u = clamp_nan(u0, ±bound).
  static double sq_sums_row(const float* g, int64_t n, float inv, float bound, double* cols, double* square,
                            int64_t* bad) {
    Sums16 row, sq;
    i32h nonfinite = {};
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
#pragma GCC unroll 4
      for (int k = 0; k < Sums16::kParts; ++k) {
        const int64_t at = j + k * (N / 2);
        const f32h u0 = load<f32h>(g + at) * inv;
        sq.add(k, u0 * u0);
        nonfinite -= nonfinite_v(u0);
        const f32h u = clamp_v(u0, bound);
        const f64h su = widen_v(u * u);
        row.part[k] += su;
        store(cols + at, load<f64h>(cols + at) + su);
      }
    }
    double row_sum = row.total(), sq_sum = sq.total();
    int64_t count = lane_sum(nonfinite);
    for (; j < n; ++j) {
      const float u0 = mul_rn(g[j], inv);
      sq_sum += static_cast<double>(mul_rn(u0, u0));
      count += !is_finite(u0);
      const float u = clamp_nan(u0, bound);
      const float su = mul_rn(u, u);
      row_sum += su;
      cols[j] += su;
    }
    *square += sq_sum;
    *bad += count;
    return row_sum;
  }
};
