// Shared arithmetic of the fused log-prob kernels.
//
// Every backend compiled from csrc/ (the vectorised CPU kernels and the CUDA
// kernels) includes this header, so the math the CPU tests exercise is the
// math compiled for the GPU. Functions are branch-free where possible so the
// CPU compiler can vectorise the loops that call them.
//
// Notation (per vocabulary entry v of one token row):
//   x_v              input logit
//   s(x) = c*tanh(x/c)   Gemma-style soft cap (identity when c == 0)
//   z_v = s(x_v) / T     what the log-softmax sees (T = temperature)
//   lse = log sum_v exp(z_v)
//   logp(y) = z_y - lse
//   d logp(y) / d x_v = (1[v == y] - p_v) * dz_v/dx_v,
//   dz/dx = (1 - tanh^2(x/c)) / T     (1/T without soft cap)
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTDPO_HD __host__ __device__ __forceinline__
#else
#define FASTDPO_HD inline __attribute__((always_inline))
#endif

namespace fastdpo {

// Columns of the per-token statistics tensor [..., kNumStats].
enum StatIndex : int {
  kStatEntropy = 0,    // -sum_v p_v log p_v
  kStatArgmaxHit = 1,  // 1.0 if the label is the (first) argmax of z, else 0.0
  kStatMeanLogit = 2,  // mean_v z_v: the soft-capped, temperature-scaled logits
  kStatLogSumP2 = 3,   // log sum_v p_v^2 (WPO weighting)
  kNumStats = 4,
};

// Bits of the `stats` request mask; the same bit positions as StatIndex.
enum StatBit : int {
  kWantEntropy = 1 << kStatEntropy,
  kWantArgmax = 1 << kStatArgmaxHit,
  kWantMeanLogit = 1 << kStatMeanLogit,
  kWantLogSumP2 = 1 << kStatLogSumP2,
};

// Parameters of the logit transform; softcap == 0 means "no soft cap".
struct Transform {
  float inv_temperature;
  float softcap;
  float inv_softcap;
};

FASTDPO_HD Transform make_transform(float temperature, float softcap) {
  Transform t;
  t.inv_temperature = 1.0f / temperature;
  t.softcap = softcap;
  t.inv_softcap = softcap > 0.0f ? 1.0f / softcap : 0.0f;
  return t;
}

// exp for the arguments these kernels feed it: z - max and z - lse, so
// x <= ~0, -inf (masked vocabulary) and NaN (propagated). Float uses a
// branch-free Cody-Waite reduction + degree-6 polynomial (about 2 ulp) that the
// CPU compiler vectorises; the GPU one MUFU.EX2 (ex2.approx.ftz: relative error
// below 2^-22, results under 2^-126 flush to 0, which these sums never miss);
// double uses std::exp.
FASTDPO_HD float exp_nonpos(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.44269504088896341f));
  return y;
#else
  float t = x * 1.44269504088896341f;   // x * log2(e)
  t = t < -126.0f ? -126.0f : t;          // NaN stays NaN (comparison is false)
  t = t > 126.0f ? 126.0f : t;
  const float k = __builtin_rintf(t);
  const float r = (x - k * 0.693145751953125f) - k * 1.428606765330187045e-06f;
  float p = 1.3888888888888889e-3f;     // 1/720
  p = p * r + 8.3333333333333333e-3f;   // 1/120
  p = p * r + 4.1666666666666667e-2f;   // 1/24
  p = p * r + 1.6666666666666667e-1f;   // 1/6
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  union { int32_t i; float f; } scale;
  scale.i = (static_cast<int32_t>(k) + 127) << 23;
  const float y = p * scale.f;
  return x < -87.33654f ? 0.0f : y;       // underflow, and exactly 0 for -inf
#endif
}

FASTDPO_HD double exp_nonpos(double x) { return ::exp(x); }

// 1 / d. The GPU uses one MUFU.RCP (rcp.approx.ftz: about 1 ulp), enough where d is in
// [1, 2] as in the soft cap below; the CPU divides.
FASTDPO_HD float fast_rcp(float d) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(d));
  return y;
#else
  return 1.0f / d;
#endif
}

FASTDPO_HD double fast_rcp(double d) { return 1.0 / d; }

// 1 / d for d in [1, 2] on the FMA units only: the minimax quadratic for 1/d on [1, 2]
// (relative error 1/99) and two Newton steps r += r (1 - d r), which square the error:
// 1e-8 in exact arithmetic, below 1e-7 (1.5 ulp) in float. Used where the kernel would
// otherwise need more special-function-unit ops than it has time for.
FASTDPO_HD float rcp_1_2(float d) {
  float r = (0.32323232f * d - 1.45454545f) * d + 2.12121212f;
  r = r + r * (1.0f - d * r);
  return r + r * (1.0f - d * r);
}

// Soft cap and its derivative from one exp:
//   e = exp(-2|x|/c), tanh(|x|/c) = (1 - e) / (1 + e),
//   s = c * tanh(x/c), ds/dx = 1 - tanh^2 = 4e / (1 + e)^2 (no cancellation).
// Without soft cap: s = x, ds/dx = 1. kCap is a compile-time switch so that
// vectorised loops contain no branch; softcap_fwd picks it at run time.
// (tanh.approx.f32, one MUFU op on sm_75+, is not used: its relative error is 2^-10.99,
// so |dz| <= (c/T) 2^-10.99 |tanh| ~ 3.5e-3 at c = 5, T = 0.7, against the tests' 2e-5
// (times 1 + |logp|) on the forward outputs. This form costs one MUFU.EX2 and one
// MUFU.RCP on the GPU with the float accuracy of the CPU's exp and division.)
template <bool kCap, typename acc_t>
FASTDPO_HD void softcap_fwd_t(acc_t x, const Transform& t, acc_t& s, acc_t& ds) {
  if (kCap) {
    const acc_t a = x < acc_t(0) ? -x : x;
    const acc_t e = exp_nonpos(acc_t(-2) * a * acc_t(t.inv_softcap));
    const acc_t inv = fast_rcp(acc_t(1) + e);
    const acc_t th = (acc_t(1) - e) * inv;
    s = acc_t(t.softcap) * (x < acc_t(0) ? -th : th);
    ds = acc_t(4) * e * inv * inv;
  } else {
    s = x;
    ds = acc_t(1);
  }
}

template <typename acc_t>
FASTDPO_HD void softcap_fwd(acc_t x, const Transform& t, acc_t& s, acc_t& ds) {
  if (t.softcap > 0.0f) {
    softcap_fwd_t<true>(x, t, s, ds);
  } else {
    softcap_fwd_t<false>(x, t, s, ds);
  }
}

// z = s(x) / T, the value the log-softmax sees.
template <bool kCap, typename acc_t>
FASTDPO_HD acc_t transform_logit_t(acc_t x, const Transform& t) {
  acc_t s, ds;
  softcap_fwd_t<kCap>(x, t, s, ds);
  return s * acc_t(t.inv_temperature);
}

template <typename acc_t>
FASTDPO_HD acc_t transform_logit(acc_t x, const Transform& t) {
  return t.softcap > 0.0f ? transform_logit_t<true>(x, t) : transform_logit_t<false>(x, t);
}

// Online log-sum-exp state over a set of z values:
//   m  = max z,  s = sum exp(z - m),
//   sz = sum exp(z - m) * (z - m)   -> entropy     = log(s) - sz / s
//   s2 = sum exp(2 (z - m))         -> log sum p^2 = log(s2) - 2 log(s)
// (sz is kept relative to m so entropy stays accurate for logits ~1e4.)
template <typename acc_t>
struct OnlineLSE {
  acc_t m;
  acc_t s;
  acc_t sz;
  acc_t s2;
};

template <typename acc_t>
FASTDPO_HD OnlineLSE<acc_t> lse_identity() {
  OnlineLSE<acc_t> r;
  r.m = -INFINITY;
  r.s = acc_t(0);
  r.sz = acc_t(0);
  r.s2 = acc_t(0);
  return r;
}

// Merge two partial states (associative; used across chunks, threads, warps).
// An empty state (m == -inf, e.g. an all-masked chunk) is the identity, so no
// inf - inf appears; NaN in either state propagates. kShiftSz: `sz` is relative to m
// (the entropy's sum e (z - m)) and shifts when m moves; false for a sum that only rescales
// (the KL's a: kl_merge).
template <typename acc_t, bool kShiftSz = true>
FASTDPO_HD OnlineLSE<acc_t> lse_merge(const OnlineLSE<acc_t>& a, const OnlineLSE<acc_t>& b) {
  if (a.m == -INFINITY) return b;
  if (b.m == -INFINITY) return a;
  OnlineLSE<acc_t> r;
  r.m = a.m > b.m ? a.m : b.m;
  if (a.m != a.m || b.m != b.m) r.m = a.m + b.m;  // NaN
  const acc_t da = a.m - r.m, db = b.m - r.m;  // <= 0
  const acc_t fa = exp_nonpos(da), fb = exp_nonpos(db);
  r.s = a.s * fa + b.s * fb;
  r.sz = kShiftSz ? fa * (a.sz + a.s * da) + fb * (b.sz + b.s * db) : fa * a.sz + fb * b.sz;
  r.s2 = a.s2 * fa * fa + b.s2 * fb * fb;
  return r;
}

template <typename acc_t>
FASTDPO_HD acc_t lse_value(const OnlineLSE<acc_t>& st) {
  return st.m + ::log(st.s);
}

template <typename acc_t>
FASTDPO_HD acc_t lse_entropy(const OnlineLSE<acc_t>& st) {
  return ::log(st.s) - st.sz / st.s;
}

template <typename acc_t>
FASTDPO_HD acc_t lse_log_sum_p2(const OnlineLSE<acc_t>& st) {
  return ::log(st.s2) - acc_t(2) * ::log(st.s);
}

// The KL in one read of both rows. Over the reference row keep s' = sum_v exp(z'_v - m') and
//   a = sum_v exp(z'_v - m') (z'_v - z_v),
// which rescale alike when m' moves (z'_v - z_v does not depend on either maximum: kl_merge).
// Then E_q[z' - z] = a / s' and
//   KL(q || p) = E_q[z' - z] - (lse' - lse) = a / s' + (m - m') + (log s - log s'),
// with m, log s the policy row's max and log-sum: no large logit enters a difference, so
// logits ~1e4 and a KL ~1e-3 keep their accuracy. kl_diff clamps the difference at -max so
// that a masked reference entry (z' = -inf, weight 0) adds 0 instead of 0 * -inf; a masked
// policy entry under reference mass gives +inf, as it should.
template <typename acc_t>
FASTDPO_HD acc_t kl_diff(acc_t zr, acc_t z) {
  const acc_t d = zr - z;
  const acc_t lo = -3.402823466e38;
  return d > lo ? d : lo;  // NaN (both -inf) -> lo as well: its weight is 0
}

template <typename acc_t>
FASTDPO_HD acc_t kl_value(acc_t a, acc_t s_r, acc_t m, acc_t log_s, acc_t m_r, acc_t log_s_r) {
  return a / s_r + (m - m_r) + (log_s - log_s_r);
}

// Merge of two KL states over the reference row: OnlineLSE whose `sz` holds `a`.
template <typename acc_t>
FASTDPO_HD OnlineLSE<acc_t> kl_merge(const OnlineLSE<acc_t>& a, const OnlineLSE<acc_t>& b) {
  return lse_merge<acc_t, false>(a, b);
}

// d logp(y) / d x_v = g * (1[v == y] - exp(z_v - lse)) * ds/dx_v / T.
template <bool kCap, typename acc_t>
FASTDPO_HD acc_t logprob_grad_t(acc_t g, acc_t x, acc_t lse, acc_t onehot, const Transform& t) {
  acc_t s, ds;
  softcap_fwd_t<kCap>(x, t, s, ds);
  const acc_t z = s * acc_t(t.inv_temperature);
  const acc_t p = exp_nonpos(z - lse);
  return g * (onehot - p) * ds * acc_t(t.inv_temperature);
}

// With the KL term: d [g logp(y) + gk KL(q || p)] / d x_v
//   = (g 1[v == y] - (g - gk) p_v - gk q_v) * ds/dx_v / T,  q_v = exp(z'_v - ref_lse).
template <bool kCap, typename acc_t>
FASTDPO_HD acc_t logprob_kl_grad_t(acc_t g, acc_t gk, acc_t x, acc_t xr, acc_t lse, acc_t ref_lse, acc_t onehot,
                                   const Transform& t) {
  acc_t s, ds;
  softcap_fwd_t<kCap>(x, t, s, ds);
  const acc_t z = s * acc_t(t.inv_temperature);
  const acc_t p = exp_nonpos(z - lse);
  const acc_t q = exp_nonpos(transform_logit_t<kCap>(xr, t) - ref_lse);
  return (g * onehot - (g - gk) * p - gk * q) * ds * acc_t(t.inv_temperature);
}

template <typename acc_t>
FASTDPO_HD acc_t logprob_grad(acc_t g, acc_t x, acc_t lse, bool is_label, const Transform& t) {
  const acc_t onehot = is_label ? acc_t(1) : acc_t(0);
  return t.softcap > 0.0f ? logprob_grad_t<true>(g, x, lse, onehot, t) : logprob_grad_t<false>(g, x, lse, onehot, t);
}

}  // namespace fastdpo
