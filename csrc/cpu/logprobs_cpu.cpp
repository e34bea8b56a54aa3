// Native CPU implementation of the fused log-prob ops.
//
// Forward: one read pass over each row of logits. The row is walked in chunks
// that stay in L1: the chunk is converted to the accumulation type and
// transformed (soft cap, temperature) once, then reduced to (max, sum-exp and,
// on request, the statistics' sums), and merged into the running state with
// the shared online log-sum-exp merge. Reference logits, when given, are
// folded in the same parallel loop.
// Backward: one read + one write pass per row, optionally in place.
//
// Parallel over rows. Each row is reduced by one thread in a fixed order, so
// results are bitwise identical across runs and thread counts. Rows whose
// label is ignore_index are skipped entirely (their outputs are 0), and the
// remaining rows are balanced across threads.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdlib>
#include <mutex>
#include <string>
#include <type_traits>
#include <limits>
#include <vector>

#include "fastdpo/checks.h"
#include "fastdpo/math.h"

namespace fastdpo {
namespace {

// Elements per chunk: the transformed chunk (4 KiB in fp32) stays in L1.
constexpr int64_t kChunk = 1024;

template <typename acc_t>
struct RowResult {
  acc_t lse;
  acc_t m;      // lse = m + log_s, kept apart for the KL (math.h: kl_value)
  acc_t log_s;
  acc_t z_label;
  acc_t stats[kNumStats];
};

// ---- chunk conversion between the storage type and the accumulation type.
// Written as plain loops over bit patterns so the compiler vectorises them
// (c10's scalar conversions carry branches that block vectorisation).

template <typename scalar_t, typename acc_t>
inline void load_chunk(const scalar_t* __restrict__ src, acc_t* __restrict__ dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]);
}

inline void load_chunk(const c10::BFloat16* __restrict__ src, float* __restrict__ dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = uint32_t(s[i]) << 16;
}

template <typename scalar_t, typename acc_t>
inline void store_chunk(const acc_t* __restrict__ src, scalar_t* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

// float -> bfloat16 with round-to-nearest-even; NaN stays NaN.
inline void store_chunk(const float* __restrict__ src, c10::BFloat16* dst, int64_t n) {
  const uint32_t* s = reinterpret_cast<const uint32_t*>(src);
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = s[i];
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    d[i] = uint16_t(is_nan ? 0x7FC0u : rounded);
  }
}

#if defined(__F16C__)
inline void load_chunk(const c10::Half* __restrict__ src, float* __restrict__ dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
  for (; i < n; ++i) dst[i] = _cvtsh_ss(s[i]);
}

inline void store_chunk(const float* __restrict__ src, c10::Half* dst, int64_t n) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) d[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}
#endif

// Reduce one row. `label` is in [0, V). With kStats, also the entropy, the
// argmax hit, the mean transformed logit z and log sum p^2.
template <bool kStats, bool kCap, typename scalar_t, typename acc_t>
RowResult<acc_t> reduce_row(const scalar_t* __restrict__ x, int64_t V, int64_t label, const Transform& tf) {
  alignas(64) acc_t buf[kChunk];
  OnlineLSE<acc_t> st = lse_identity<acc_t>();
  const acc_t z_label = transform_logit_t<kCap>(static_cast<acc_t>(x[label]), tf);
  const acc_t inv_t = acc_t(tf.inv_temperature);
  int nan_seen = 0;
  double sum_capped = 0;  // mean logit: chunk sums in acc_t, row sum in double
  // First argmax of z: updated only when a chunk's max beats the best so far
  // (a scalar scan of that chunk), so the hot loops carry no index bookkeeping.
  acc_t best = -INFINITY;
  int64_t best_idx = 0;

  // fp32/fp64 rows are read in place; narrower types are widened into buf first.
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int n = int(std::min(kChunk, V - c0));
    const acc_t* src = buf;
    if constexpr (kDirect) {
      src = x + c0;
    } else {
      load_chunk(x + c0, buf, n);
    }
    acc_t m = -INFINITY;
    acc_t csum = 0;
#pragma omp simd reduction(max : m) reduction(| : nan_seen) reduction(+ : csum)
    for (int i = 0; i < n; ++i) {
      const acc_t xv = src[i];
      acc_t s, ds;
      softcap_fwd_t<kCap>(xv, tf, s, ds);
      const acc_t z = s * inv_t;
      buf[i] = z;
      nan_seen |= (xv != xv);
      m = z > m ? z : m;
      if (kStats) csum += z;
    }
    if (kStats) {
      sum_capped += csum;
      if (m > best || (c0 == 0 && m == best)) {
        best = m;
        for (int i = 0; i < n; ++i) {
          if (buf[i] == m) {
            best_idx = c0 + i;
            break;
          }
        }
      }
    }
    if (m == -INFINITY) continue;  // all masked: contributes nothing to the log-sum-exp
    acc_t cs = 0, csz = 0, cs2 = 0;
    if (kStats) {
#pragma omp simd reduction(+ : cs, csz, cs2)
      for (int i = 0; i < n; ++i) {
        const acc_t d = buf[i] - m;
        const acc_t e = exp_nonpos(d);
        cs += e;
        csz += e > acc_t(0) ? e * d : acc_t(0);  // 0 * -inf for masked entries counts as 0
        cs2 += e * e;
      }
    } else {
#pragma omp simd reduction(+ : cs)
      for (int i = 0; i < n; ++i) cs += exp_nonpos(buf[i] - m);
    }
    OnlineLSE<acc_t> chunk{m, cs, csz, cs2};
    st = lse_merge(st, chunk);
  }

  RowResult<acc_t> r;
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  r.lse = nan_seen ? nan : lse_value(st);
  r.m = st.m;
  r.log_s = nan_seen ? nan : acc_t(::log(st.s));
  r.z_label = z_label;
  if (kStats) {
    r.stats[kStatEntropy] = nan_seen ? nan : lse_entropy(st);
    r.stats[kStatArgmaxHit] = nan_seen ? nan : acc_t(best_idx == label);
    r.stats[kStatMeanLogit] = nan_seen ? nan : acc_t(sum_capped / double(V));
    r.stats[kStatLogSumP2] = nan_seen ? nan : lse_log_sum_p2(st);
  }
  return r;
}

// Chunk of z = transform(x) in the accumulation type.
template <bool kCap, typename scalar_t, typename acc_t>
inline void load_transformed(const scalar_t* __restrict__ x, acc_t* __restrict__ buf, int n, const Transform& tf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
#pragma omp simd
    for (int i = 0; i < n; ++i) buf[i] = transform_logit_t<kCap>(x[i], tf);
  } else {
    load_chunk(x, buf, n);
#pragma omp simd
    for (int i = 0; i < n; ++i) buf[i] = transform_logit_t<kCap>(buf[i], tf);
  }
}

template <typename acc_t>
struct RefKLResult {
  acc_t lse;
  acc_t z_label;
  acc_t kl;
};

// The reference row folded together with the per-token KL(q || p) (math.h: kl_diff,
// kl_merge, kl_value). The policy row is read again (it was just reduced, so it is
// cache-hot) for z_v; its max m_p and log s_p are already known, so one online state over
// z' suffices.
template <bool kCap, typename scalar_t, typename acc_t>
RefKLResult<acc_t> reduce_ref_kl(const scalar_t* __restrict__ xr, const scalar_t* __restrict__ xp, int64_t V,
                                 int64_t label, acc_t m_p, acc_t log_s_p, const Transform& tf) {
  alignas(64) acc_t zr[kChunk];
  alignas(64) acc_t zp[kChunk];
  OnlineLSE<acc_t> st = lse_identity<acc_t>();
  int nan_seen = 0;
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int n = int(std::min(kChunk, V - c0));
    load_transformed<kCap>(xr + c0, zr, n, tf);
    load_transformed<kCap>(xp + c0, zp, n, tf);
    acc_t m = -INFINITY;
#pragma omp simd reduction(max : m) reduction(| : nan_seen)
    for (int i = 0; i < n; ++i) {
      nan_seen |= (zr[i] != zr[i]);
      m = zr[i] > m ? zr[i] : m;
    }
    if (m == -INFINITY) continue;
    acc_t cs = 0, ca = 0;
#pragma omp simd reduction(+ : cs, ca)
    for (int i = 0; i < n; ++i) {
      const acc_t d = zr[i] - m;
      const acc_t e = exp_nonpos(d);
      cs += e;
      ca += e * kl_diff(zr[i], zp[i]);
    }
    OnlineLSE<acc_t> chunk{m, cs, ca, acc_t(0)};
    st = kl_merge(st, chunk);
  }
  RefKLResult<acc_t> r;
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  r.lse = nan_seen ? nan : lse_value(st);
  r.z_label = transform_logit_t<kCap>(static_cast<acc_t>(xr[label]), tf);
  r.kl = nan_seen ? nan : kl_value(st.sz, st.s, m_p, log_s_p, st.m, acc_t(::log(st.s)));
  return r;
}

// Runtime flags -> template instantiation.
template <typename scalar_t, typename acc_t>
RowResult<acc_t> reduce_row_any(const scalar_t* x, int64_t V, int64_t label, const Transform& tf, bool stats) {
  const bool cap = tf.softcap > 0.0f;
  if (stats) return cap ? reduce_row<true, true, scalar_t, acc_t>(x, V, label, tf) : reduce_row<true, false, scalar_t, acc_t>(x, V, label, tf);
  return cap ? reduce_row<false, true, scalar_t, acc_t>(x, V, label, tf) : reduce_row<false, false, scalar_t, acc_t>(x, V, label, tf);
}

// Indices of rows whose label is not ignore_index; throws on labels out of range.
std::vector<int64_t> active_rows(const at::Tensor& labels, int64_t V, int64_t ignore_index) {
  const at::Tensor lab = labels.contiguous();
  const int64_t* y = lab.data_ptr<int64_t>();
  const int64_t n = lab.numel();
  std::vector<int64_t> rows;
  rows.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    if (y[i] == ignore_index) continue;
    TORCH_CHECK(y[i] >= 0 && y[i] < V, "fastdpo: label ", y[i], " at flat position ", i,
                " is out of range: labels must be in [0, ", V, ") or equal ignore_index (", ignore_index, ")");
    rows.push_back(i);
  }
  return rows;
}

inline int64_t row_offset(const at::Tensor& t, int64_t r, int64_t T) {
  return (r / T) * t.stride(0) + (r % T) * t.stride(1);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& labels, const c10::optional<at::Tensor>& ref_logits,
    int64_t ignore_index, double temperature, double softcap, bool stats, bool kl) {
  check_fwd(logits, labels, ref_logits, temperature, softcap, kl);
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2);
  const auto acc_type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto opts = logits.options().dtype(acc_type);
  at::Tensor logp = at::zeros({B, T}, opts);
  at::Tensor lse = at::zeros({B, T}, opts);
  at::Tensor ref_logp = ref_logits.has_value() ? at::zeros({B, T}, opts) : at::empty({0}, opts);
  at::Tensor st = stats ? at::zeros({B, T, kNumStats}, opts) : at::empty({0}, opts);
  at::Tensor kl_out = kl ? at::zeros({B, T}, opts) : at::empty({0}, opts);
  at::Tensor ref_lse = kl ? at::zeros({B, T}, opts) : at::empty({0}, opts);
  if (B * T == 0) return {logp, lse, ref_logp, st, kl_out, ref_lse};

  const std::vector<int64_t> rows = active_rows(labels, V, ignore_index);
  const at::Tensor lab = labels.contiguous();
  const Transform tf = make_transform(float(temperature), float(softcap));
  const bool has_ref = ref_logits.has_value();
  const at::Tensor ref = has_ref ? *ref_logits : logits;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "fastdpo_logprobs_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = logits.const_data_ptr<scalar_t>();
    const scalar_t* rp = ref.const_data_ptr<scalar_t>();
    const int64_t* y = lab.const_data_ptr<int64_t>();
    acc_t* logp_p = logp.mutable_data_ptr<acc_t>();
    acc_t* lse_p = lse.mutable_data_ptr<acc_t>();
    acc_t* ref_p = has_ref ? ref_logp.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* st_p = stats ? st.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* kl_p = kl ? kl_out.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* ref_lse_p = kl ? ref_lse.mutable_data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, int64_t(rows.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t r = rows[k];
        const auto res = reduce_row_any<scalar_t, acc_t>(xp + row_offset(logits, r, T), V, y[r], tf, stats);
        lse_p[r] = res.lse;
        logp_p[r] = res.z_label - res.lse;
        if (stats) {
          for (int j = 0; j < kNumStats; ++j) st_p[r * kNumStats + j] = res.stats[j];
        }
        if (kl) {
          const scalar_t* rrow = rp + row_offset(ref, r, T);
          const scalar_t* xrow = xp + row_offset(logits, r, T);
          const auto rk = tf.softcap > 0.0f ? reduce_ref_kl<true>(rrow, xrow, V, y[r], res.m, res.log_s, tf)
                                            : reduce_ref_kl<false>(rrow, xrow, V, y[r], res.m, res.log_s, tf);
          ref_p[r] = rk.z_label - rk.lse;
          ref_lse_p[r] = rk.lse;
          kl_p[r] = rk.kl;
        } else if (has_ref) {
          const auto rr = reduce_row_any<scalar_t, acc_t>(rp + row_offset(ref, r, T), V, y[r], tf, false);
          ref_p[r] = rr.z_label - rr.lse;
        }
      }
    });
  });
  return {logp, lse, ref_logp, st, kl_out, ref_lse};
}

// One row of the gradient, chunk by chunk through an L1 buffer; `out` may
// alias `x` (see logprobs_bwd_into).
template <bool kCap, typename scalar_t, typename acc_t>
void grad_row(const scalar_t* x, scalar_t* out, int64_t V, int64_t label, acc_t g, acc_t lse, const Transform& tf) {
  alignas(64) acc_t buf[kChunk];
  const acc_t g_label = logprob_grad_t<kCap>(g, static_cast<acc_t>(x[label]), lse, acc_t(1), tf);
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int n = int(std::min(kChunk, V - c0));
    load_chunk(x + c0, buf, n);
#pragma omp simd
    for (int i = 0; i < n; ++i) buf[i] = logprob_grad_t<kCap>(g, buf[i], lse, acc_t(0), tf);
    if (label >= c0 && label < c0 + n) buf[label - c0] = g_label;
    store_chunk(buf, out + c0, n);
  }
}

// The same with the KL term (math.h: logprob_kl_grad_t); `xr` is the reference row.
template <bool kCap, typename scalar_t, typename acc_t>
void grad_row_kl(const scalar_t* x, const scalar_t* xr, scalar_t* out, int64_t V, int64_t label, acc_t g, acc_t gk,
                 acc_t lse, acc_t ref_lse, const Transform& tf) {
  alignas(64) acc_t buf[kChunk];
  alignas(64) acc_t bufr[kChunk];
  const acc_t g_label = logprob_kl_grad_t<kCap>(g, gk, static_cast<acc_t>(x[label]), static_cast<acc_t>(xr[label]),
                                                lse, ref_lse, acc_t(1), tf);
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int n = int(std::min(kChunk, V - c0));
    load_chunk(x + c0, buf, n);
    load_chunk(xr + c0, bufr, n);
#pragma omp simd
    for (int i = 0; i < n; ++i) buf[i] = logprob_kl_grad_t<kCap>(g, gk, buf[i], bufr[i], lse, ref_lse, acc_t(0), tf);
    if (label >= c0 && label < c0 + n) buf[label - c0] = g_label;
    store_chunk(buf, out + c0, n);
  }
}

// grad_x[r, :] = g_r * (onehot(y_r) - softmax(z_r)) * dz/dx (+ the KL term's gk_r * (p - q) * dz/dx
// with grad_kl), written into `out` (which may be `logits` itself: each element is read before it
// is written, and the label's entry is computed before the row is overwritten).
void logprobs_bwd_into(const at::Tensor& grad_logp, const at::Tensor& logits, const at::Tensor& labels,
                       const at::Tensor& lse, int64_t ignore_index, double temperature, double softcap,
                       const c10::optional<at::Tensor>& grad_kl, const c10::optional<at::Tensor>& ref_logits,
                       const c10::optional<at::Tensor>& ref_lse, const at::Tensor& out) {
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2);
  if (B * T == 0) return;
  const at::Tensor lab = labels.contiguous();
  // Labels were validated in forward; check again here since the op is public.
  (void)active_rows(lab, V, ignore_index);
  const at::Tensor g = grad_logp.contiguous();
  const at::Tensor l = lse.contiguous();
  const Transform tf = make_transform(float(temperature), float(softcap));
  const bool has_kl = grad_kl.has_value();
  const at::Tensor gkl = has_kl ? grad_kl->contiguous() : at::Tensor();
  const at::Tensor rl = has_kl ? ref_lse->contiguous() : at::Tensor();
  const at::Tensor ref = has_kl ? *ref_logits : logits;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "fastdpo_logprobs_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = logits.const_data_ptr<scalar_t>();
    const scalar_t* rp = ref.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t* y = lab.const_data_ptr<int64_t>();
    const acc_t* gp = g.const_data_ptr<acc_t>();
    const acc_t* lp = l.const_data_ptr<acc_t>();
    const acc_t* gkp = has_kl ? gkl.const_data_ptr<acc_t>() : nullptr;
    const acc_t* rlp = has_kl ? rl.const_data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, B * T, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* xr = xp + row_offset(logits, r, T);
        scalar_t* orow = op + row_offset(out, r, T);
        const acc_t gr = gp[r];
        const acc_t gk = has_kl ? gkp[r] : acc_t(0);
        if (y[r] == ignore_index || (gr == acc_t(0) && gk == acc_t(0))) {
          std::fill(orow, orow + V, scalar_t(0));
          continue;
        }
        if (gk != acc_t(0)) {  // only rows with a KL gradient read the reference row
          const scalar_t* rrow = rp + row_offset(ref, r, T);
          if (tf.softcap > 0.0f) {
            grad_row_kl<true>(xr, rrow, orow, V, y[r], gr, gk, lp[r], rlp[r], tf);
          } else {
            grad_row_kl<false>(xr, rrow, orow, V, y[r], gr, gk, lp[r], rlp[r], tf);
          }
        } else if (tf.softcap > 0.0f) {
          grad_row<true>(xr, orow, V, y[r], gr, lp[r], tf);
        } else {
          grad_row<false>(xr, orow, V, y[r], gr, lp[r], tf);
        }
      }
    });
  });
}

// Gradient buffers of a training loop have the same size every step. A fresh
// multi-hundred-MB buffer costs one page fault per 4 KiB on first touch, which
// on small machines takes as long as the gradient itself; so the most recently
// released buffer (>= 16 MiB) is kept mapped and handed to the next backward
// of a fitting size. At most one buffer is held. FASTDPO_CPU_GRAD_POOL=0
// disables this.
class GradBufferPool {
 public:
  static GradBufferPool& get() {
    static GradBufferPool pool;
    return pool;
  }

  at::Tensor empty(const at::Tensor& like) {
    const size_t bytes = size_t(like.numel()) * like.element_size();
    if (!enabled_ || bytes < (size_t(16) << 20)) return at::empty(like.sizes(), like.options());
    void* ptr = nullptr;
    size_t cap = bytes;
    {
      std::lock_guard<std::mutex> g(mu_);
      if (held_ != nullptr && held_bytes_ >= bytes && held_bytes_ <= 2 * bytes) {
        ptr = held_;
        cap = held_bytes_;
        held_ = nullptr;
        held_bytes_ = 0;
      }
    }
    if (ptr == nullptr) {
      ptr = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
      TORCH_CHECK(ptr != nullptr, "fastdpo: out of memory allocating a ", bytes, "-byte gradient buffer");
    }
    return at::from_blob(ptr, like.sizes(), [cap](void* p) { GradBufferPool::get().release(p, cap); },
                         like.options());
  }

 private:
  GradBufferPool() {
    const char* env = std::getenv("FASTDPO_CPU_GRAD_POOL");
    enabled_ = env == nullptr || std::string(env) != "0";
  }

  void release(void* p, size_t bytes) {
    void* drop = p;
    {
      std::lock_guard<std::mutex> g(mu_);
      if (held_ == nullptr || bytes >= held_bytes_) {
        std::swap(drop, held_);  // keep the larger buffer, free the other (or nothing)
        held_bytes_ = bytes;
      }
    }
    std::free(drop);
  }

  std::mutex mu_;
  void* held_ = nullptr;
  size_t held_bytes_ = 0;
  bool enabled_ = true;
};

at::Tensor logprobs_bwd_cpu(const at::Tensor& grad_logp, const at::Tensor& logits, const at::Tensor& labels,
                            const at::Tensor& lse, int64_t ignore_index, double temperature, double softcap,
                            const c10::optional<at::Tensor>& grad_kl, const c10::optional<at::Tensor>& ref_logits,
                            const c10::optional<at::Tensor>& ref_lse) {
  check_bwd(grad_logp, logits, labels, lse, temperature, softcap);
  check_bwd_kl(logits, labels, grad_kl, ref_logits, ref_lse);
  at::Tensor out = GradBufferPool::get().empty(logits);
  logprobs_bwd_into(grad_logp, logits, labels, lse, ignore_index, temperature, softcap, grad_kl, ref_logits, ref_lse,
                    out);
  return out;
}

void logprobs_bwd_inplace_cpu(const at::Tensor& grad_logp, const at::Tensor& logits, const at::Tensor& labels,
                              const at::Tensor& lse, int64_t ignore_index, double temperature, double softcap,
                              const c10::optional<at::Tensor>& grad_kl, const c10::optional<at::Tensor>& ref_logits,
                              const c10::optional<at::Tensor>& ref_lse) {
  check_bwd(grad_logp, logits, labels, lse, temperature, softcap);
  check_bwd_kl(logits, labels, grad_kl, ref_logits, ref_lse);
  TORCH_CHECK(!logits.is_inference() || c10::InferenceMode::is_enabled(),
              "fastdpo: in-place backward needs writable logits");
  TORCH_CHECK(!ref_logits.has_value() || !ref_logits->is_same(logits),
              "fastdpo: in-place backward cannot overwrite logits that are also the ref_logits");
  logprobs_bwd_into(grad_logp, logits, labels, lse, ignore_index, temperature, softcap, grad_kl, ref_logits, ref_lse,
                    logits);
}

}  // namespace
}  // namespace fastdpo

TORCH_LIBRARY_IMPL(fastdpo, CPU, m) {
  m.impl("logprobs_fwd", &fastdpo::logprobs_fwd_cpu);
  m.impl("logprobs_bwd", &fastdpo::logprobs_bwd_cpu);
  m.impl("logprobs_bwd_", &fastdpo::logprobs_bwd_inplace_cpu);
}
