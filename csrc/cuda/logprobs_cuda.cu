// CUDA kernels of the fused log-prob ops (see logprobs_cuda.cuh).
//
// Forward: one block per token row. Each thread folds 128-bit vectors of the
// row into an online log-sum-exp state (plus, for statistics, the entropy and
// sum-p^2 sums, the sum of z and the first argmax) with the shared lse_merge;
// states are merged across a warp with shuffles and across warps in a fixed
// order, so results are bitwise reproducible run to run. The reference row is
// reduced by the same block right after; with kl, that pass also re-reads the
// policy row (L2-hot) to fold KL(q || p) into the reference state once the
// policy lse is known. Backward: one block per row writes
// g (onehot - softmax(z)) dz/dx, optionally over the logits themselves, plus
// gk (softmax(z) - softmax(z')) dz/dx on rows with a KL gradient gk != 0.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "logprobs_cuda.cuh"

namespace fastdpo {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}

// Elements per 128-bit vector.
template <typename T>
struct VecWidth {
  static constexpr int value = 16 / sizeof(T);
};

template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float* out) {
  constexpr int N = VecWidth<T>::value;
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = to_float(v[k]);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float* in) {
  constexpr int N = VecWidth<T>::value;
  uint4 raw;
  T* v = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int k = 0; k < N; ++k) v[k] = from_float<T>(in[k]);
  *reinterpret_cast<uint4*>(p) = raw;
}

struct State {
  OnlineLSE<float> st;
  float zsum;
  float best;
  int64_t best_idx;
  int nan;
};

__device__ __forceinline__ State state_identity() {
  State s;
  s.st = lse_identity<float>();
  s.zsum = 0.f;
  s.best = -INFINITY;
  s.best_idx = 0;
  s.nan = 0;
  return s;
}

// Merge b into a; a covers lower indices than b for the argmax tie rule.
template <bool kStats>
__device__ __forceinline__ State merge(const State& a, const State& b) {
  State r;
  r.st = lse_merge(a.st, b.st);
  r.nan = a.nan | b.nan;
  if (kStats) {
    r.zsum = a.zsum + b.zsum;
    const bool take_b = b.best > a.best || (b.best == a.best && b.best_idx < a.best_idx);
    r.best = take_b ? b.best : a.best;
    r.best_idx = take_b ? b.best_idx : a.best_idx;
  } else {
    r.zsum = 0.f;
    r.best = -INFINITY;
    r.best_idx = 0;
  }
  return r;
}

// Fold n transformed values z[0..n) whose first vocabulary index is base.
template <bool kStats, int N>
__device__ __forceinline__ void fold(State& ts, const float* z, int n, int64_t base) {
  float m = -INFINITY;
  int first = -1;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    if (k < n) {
      ts.nan |= (z[k] != z[k]);
      if (z[k] > m) {
        m = z[k];
        first = k;
      }
    }
  }
  if (kStats) {
#pragma unroll
    for (int k = 0; k < N; ++k)
      if (k < n) ts.zsum += z[k];
    if (first >= 0 && m > ts.best) {
      ts.best = m;
      ts.best_idx = base + first;
    }
  }
  if (m == -INFINITY) return;  // all masked (or NaN): nothing for the log-sum-exp
  OnlineLSE<float> c = lse_identity<float>();
  c.m = m;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    if (k < n) {
      const float d = z[k] - m;
      const float e = exp_nonpos(d);
      c.s += e;
      if (kStats) {
        c.sz += e > 0.f ? e * d : 0.f;
        c.s2 += e * e;
      }
    }
  }
  ts.st = lse_merge(ts.st, c);
}

// Fold n reference values zr[0..n) into a KL state (math.h, kl_term): an online
// log-sum-exp over zr whose sz accumulates exp(zr - m) ((zr - m) - logp), with
// logp = (z - m_p) - log_s_p from the policy's transformed values z at the same
// indices and its row max m_p and log s_p (not a rounded lse: large logits stay exact).
template <int N>
__device__ __forceinline__ void fold_kl(State& ts, const float* zr, const float* z, int n, float m_p,
                                        float log_s_p) {
  float m = -INFINITY;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    if (k < n) {
      ts.nan |= (zr[k] != zr[k]);
      if (zr[k] > m) m = zr[k];
    }
  }
  if (m == -INFINITY) return;  // all masked (or NaN): q is 0 here
  OnlineLSE<float> c = lse_identity<float>();
  c.m = m;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    if (k < n) {
      const float d = zr[k] - m;
      const float e = exp_nonpos(d);
      c.s += e;
      c.sz += kl_term(e, d, z[k], m_p, log_s_p);
    }
  }
  ts.st = lse_merge(ts.st, c);
}

template <bool kStats>
__device__ __forceinline__ State shfl_down(const State& s, int offset) {
  State o;
  o.st.m = __shfl_down_sync(0xffffffffu, s.st.m, offset);
  o.st.s = __shfl_down_sync(0xffffffffu, s.st.s, offset);
  o.st.sz = __shfl_down_sync(0xffffffffu, s.st.sz, offset);
  o.st.s2 = __shfl_down_sync(0xffffffffu, s.st.s2, offset);
  o.nan = __shfl_down_sync(0xffffffffu, s.nan, offset);
  o.zsum = __shfl_down_sync(0xffffffffu, s.zsum, offset);
  o.best = __shfl_down_sync(0xffffffffu, s.best, offset);
  o.best_idx = __shfl_down_sync(0xffffffffu, static_cast<long long>(s.best_idx), offset);
  return o;
}

// Block-wide reduction in a fixed order; the result is valid in thread 0.
template <bool kStats>
__device__ State block_reduce(State s, State* smem) {
  for (int offset = 16; offset > 0; offset >>= 1) s = merge<kStats>(s, shfl_down<kStats>(s, offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) smem[warp] = s;
  __syncthreads();
  State r = smem[0];
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) r = merge<kStats>(r, smem[w]);
  }
  __syncthreads();  // smem is reused by the next reduction
  return r;
}

// Each thread folds its strided share of one row; lower threads own lower
// indices within each sweep, and sweeps are folded in index order.
template <bool kStats, bool kCap, typename T>
__device__ State reduce_row(const T* row, int64_t V, const Transform& tf, State* smem) {
  constexpr int N = VecWidth<T>::value;
  State ts = state_identity();
  float z[N];
  const bool aligned = (reinterpret_cast<uintptr_t>(row) % 16) == 0;
  const int64_t v_vec = aligned ? (V / N) * N : 0;
  for (int64_t i = int64_t(threadIdx.x) * N; i < v_vec; i += int64_t(kThreads) * N) {
    load_vec(row + i, z);
#pragma unroll
    for (int k = 0; k < N; ++k) z[k] = transform_logit_t<kCap>(z[k], tf);
    fold<kStats, N>(ts, z, N, i);
  }
  for (int64_t i = v_vec + threadIdx.x; i < V; i += kThreads) {
    z[0] = transform_logit_t<kCap>(to_float(row[i]), tf);
    fold<kStats, 1>(ts, z, 1, i);
  }
  return block_reduce<kStats>(ts, smem);
}

// The reference row r folded into a KL state against the policy row x (same
// partition of indices as reduce_row, so the reduction order is fixed too).
template <bool kCap, typename T>
__device__ State reduce_row_kl(const T* r, const T* x, int64_t V, float m_p, float log_s_p, const Transform& tf,
                               State* smem) {
  constexpr int N = VecWidth<T>::value;
  State ts = state_identity();
  float zr[N], z[N];
  const bool aligned = (reinterpret_cast<uintptr_t>(r) % 16) == 0 && (reinterpret_cast<uintptr_t>(x) % 16) == 0;
  const int64_t v_vec = aligned ? (V / N) * N : 0;
  for (int64_t i = int64_t(threadIdx.x) * N; i < v_vec; i += int64_t(kThreads) * N) {
    load_vec(r + i, zr);
    load_vec(x + i, z);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      zr[k] = transform_logit_t<kCap>(zr[k], tf);
      z[k] = transform_logit_t<kCap>(z[k], tf);
    }
    fold_kl<N>(ts, zr, z, N, m_p, log_s_p);
  }
  for (int64_t i = v_vec + threadIdx.x; i < V; i += kThreads) {
    zr[0] = transform_logit_t<kCap>(to_float(r[i]), tf);
    z[0] = transform_logit_t<kCap>(to_float(x[i]), tf);
    fold_kl<1>(ts, zr, z, 1, m_p, log_s_p);
  }
  return block_reduce<false>(ts, smem);
}

template <bool kStats, bool kCap, bool kKL, typename T>
__global__ void __launch_bounds__(kThreads) logprobs_fwd_kernel(FwdArgs a) {
  __shared__ State smem[kWarps];
  __shared__ float row_m, row_log_s;  // the policy's lse = m + log s, for every thread of the KL pass
  const int64_t row = blockIdx.x;
  const int64_t label = a.labels[row];
  if (label == a.ignore_index) return;  // outputs were zero-initialised
  const int64_t b = row / a.T, t = row % a.T;
  const int64_t y = label < 0 ? 0 : (label >= a.V ? a.V - 1 : label);  // range is checked by the caller
  const T* x = static_cast<const T*>(a.x) + b * a.sxb + t * a.sxt;
  const State s = reduce_row<kStats, kCap>(x, a.V, a.tf, smem);
  if (threadIdx.x == 0) {
    const float nan = __int_as_float(0x7fc00000);
    const bool bad = s.nan != 0 || y != label;
    const float lse = bad ? nan : lse_value(s.st);
    a.lse[row] = lse;
    if (kKL) {
      row_m = bad ? nan : s.st.m;
      row_log_s = bad ? nan : ::log(s.st.s);
    }
    a.logp[row] = transform_logit_t<kCap>(to_float(x[y]), a.tf) - lse;
    if (kStats) {
      float* st = a.stats + row * kNumStats;
      st[kStatEntropy] = bad ? nan : lse_entropy(s.st);
      st[kStatArgmaxHit] = bad ? nan : (s.best_idx == label ? 1.f : 0.f);
      st[kStatMeanLogit] = bad ? nan : s.zsum / float(a.V);
      st[kStatLogSumP2] = bad ? nan : lse_log_sum_p2(s.st);
    }
  }
  if (a.r != nullptr) {
    const T* r = static_cast<const T*>(a.r) + b * a.srb + t * a.srt;
    if (kKL) {
      __syncthreads();  // row_m, row_log_s
      const State rs = reduce_row_kl<kCap>(r, x, a.V, row_m, row_log_s, a.tf, smem);
      if (threadIdx.x == 0) {
        const float nan = __int_as_float(0x7fc00000);
        // A NaN policy row (or bad label) already made row_m NaN; say so explicitly.
        const bool bad = rs.nan != 0 || y != label || row_m != row_m;
        const float ref_lse = lse_value(rs.st);
        a.ref_logp[row] = bad ? nan : transform_logit_t<kCap>(to_float(r[y]), a.tf) - ref_lse;
        a.ref_lse[row] = bad ? nan : ref_lse;
        a.kl[row] = bad ? nan : lse_kl(rs.st);
      }
    } else {
      const State rs = reduce_row<false, kCap>(r, a.V, a.tf, smem);
      if (threadIdx.x == 0) {
        const float nan = __int_as_float(0x7fc00000);
        a.ref_logp[row] = (rs.nan != 0 || y != label)
                              ? nan
                              : transform_logit_t<kCap>(to_float(r[y]), a.tf) - lse_value(rs.st);
      }
    }
  }
}

// One row of the gradient with the KL term, for rows with gk != 0: reads the
// reference row r alongside x. out may be x (never r): each element is read
// before the same thread overwrites it.
template <bool kCap, typename T>
__device__ __forceinline__ void bwd_row_kl(const T* x, const T* r, T* out, int64_t V, int64_t label, float g, float gk,
                                        float lse, float ref_lse, const Transform& tf) {
  constexpr int N = VecWidth<T>::value;
  float v[N], w[N];
  const bool aligned = (reinterpret_cast<uintptr_t>(x) % 16) == 0 && (reinterpret_cast<uintptr_t>(out) % 16) == 0 &&
                       (reinterpret_cast<uintptr_t>(r) % 16) == 0;
  const int64_t v_vec = aligned ? (V / N) * N : 0;
  for (int64_t i = int64_t(threadIdx.x) * N; i < v_vec; i += int64_t(kThreads) * N) {
    load_vec(x + i, v);
    load_vec(r + i, w);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      v[k] = logprob_kl_grad_t<kCap>(g, gk, v[k], w[k], lse, ref_lse, (i + k == label) ? 1.f : 0.f, tf);
    }
    store_vec(out + i, v);
  }
  for (int64_t i = v_vec + threadIdx.x; i < V; i += kThreads) {
    const float gx =
        logprob_kl_grad_t<kCap>(g, gk, to_float(x[i]), to_float(r[i]), lse, ref_lse, i == label ? 1.f : 0.f, tf);
    out[i] = from_float<T>(gx);
  }
}

__host__ __device__ __forceinline__ const BwdArgs& bwd_base(const BwdArgs& p) { return p; }
__host__ __device__ __forceinline__ const BwdArgs& bwd_base(const BwdKLArgs& p) { return p.base; }

// Args is BwdArgs (the plain backward) or BwdKLArgs (with the KL term). Rows
// without a KL gradient take the plain path and never read the reference row.
template <bool kCap, typename T, typename Args>
__global__ void __launch_bounds__(kThreads) logprobs_bwd_kernel(Args p) {
  constexpr bool kKL = std::is_same<Args, BwdKLArgs>::value;
  constexpr int N = VecWidth<T>::value;
  const BwdArgs& a = bwd_base(p);
  const int64_t row = blockIdx.x;
  const int64_t b = row / a.T, t = row % a.T;
  const T* x = static_cast<const T*>(a.x) + b * a.sxb + t * a.sxt;
  T* out = static_cast<T*>(a.out) + b * a.sob + t * a.sot;
  const int64_t label = a.labels[row];
  const float g = a.grad[row];
  if constexpr (kKL) {
    const float gk = p.grad_kl[row];
    if (gk != 0.f && label != a.ignore_index) {
      const T* r = static_cast<const T*>(p.r) + b * p.srb + t * p.srt;
      bwd_row_kl<kCap>(x, r, out, a.V, label, g, gk, a.lse[row], p.ref_lse[row], a.tf);
      return;
    }
  }
  const bool zero = label == a.ignore_index || g == 0.f;
  const float lse = zero ? 0.f : a.lse[row];
  float v[N];
  const bool aligned = (reinterpret_cast<uintptr_t>(x) % 16) == 0 && (reinterpret_cast<uintptr_t>(out) % 16) == 0;
  const int64_t v_vec = aligned ? (a.V / N) * N : 0;
  for (int64_t i = int64_t(threadIdx.x) * N; i < v_vec; i += int64_t(kThreads) * N) {
    load_vec(x + i, v);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      v[k] = zero ? 0.f : logprob_grad_t<kCap>(g, v[k], lse, (i + k == label) ? 1.f : 0.f, a.tf);
    }
    store_vec(out + i, v);
  }
  for (int64_t i = v_vec + threadIdx.x; i < a.V; i += kThreads) {
    const float gx = zero ? 0.f : logprob_grad_t<kCap>(g, to_float(x[i]), lse, i == label ? 1.f : 0.f, a.tf);
    out[i] = from_float<T>(gx);
  }
}

template <bool kStats, bool kKL, typename T>
void fwd_cap(const FwdArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.B * a.T));
  if (a.tf.softcap > 0.f) logprobs_fwd_kernel<kStats, true, kKL, T><<<grid, kThreads, 0, stream>>>(a);
  else logprobs_fwd_kernel<kStats, false, kKL, T><<<grid, kThreads, 0, stream>>>(a);
}

template <typename T>
cudaError_t fwd_typed(const FwdArgs& a, bool stats, bool kl, cudaStream_t stream) {
  if (stats) {
    if (kl) fwd_cap<true, true, T>(a, stream);
    else fwd_cap<true, false, T>(a, stream);
  } else {
    if (kl) fwd_cap<false, true, T>(a, stream);
    else fwd_cap<false, false, T>(a, stream);
  }
  return cudaGetLastError();
}

template <typename T, typename Args>
cudaError_t bwd_typed(const Args& p, cudaStream_t stream) {
  const BwdArgs& a = bwd_base(p);
  const dim3 grid(static_cast<unsigned>(a.B * a.T));
  if (a.tf.softcap > 0.f) logprobs_bwd_kernel<true, T><<<grid, kThreads, 0, stream>>>(p);
  else logprobs_bwd_kernel<false, T><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename Args>
cudaError_t bwd_dispatch(const Args& p, DType dtype, cudaStream_t stream) {
  if (bwd_base(p).B * bwd_base(p).T == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat: return bwd_typed<float>(p, stream);
    case DType::kBFloat16: return bwd_typed<__nv_bfloat16>(p, stream);
    case DType::kHalf: return bwd_typed<__half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_logprobs_fwd(const FwdArgs& a, DType dtype, bool stats, bool kl, cudaStream_t stream) {
  if (a.B * a.T == 0) return cudaSuccess;
  if ((stats && a.stats == nullptr) || (kl && (a.r == nullptr || a.kl == nullptr || a.ref_lse == nullptr)))
    return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat: return fwd_typed<float>(a, stats, kl, stream);
    case DType::kBFloat16: return fwd_typed<__nv_bfloat16>(a, stats, kl, stream);
    case DType::kHalf: return fwd_typed<__half>(a, stats, kl, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_logprobs_bwd(const BwdArgs& a, DType dtype, cudaStream_t stream) {
  return bwd_dispatch(a, dtype, stream);
}

cudaError_t launch_logprobs_bwd_kl(const BwdKLArgs& a, DType dtype, cudaStream_t stream) {
  if (a.grad_kl == nullptr || a.r == nullptr || a.ref_lse == nullptr) return cudaErrorInvalidValue;
  return bwd_dispatch(a, dtype, stream);
}

}  // namespace cuda
}  // namespace fastdpo
