// CUDA kernels of the fused log-prob ops (see logprobs_cuda.cuh).
//
// Forward. A block reduces one token row, or one of `splits` slices of it when the batch is
// too small to fill the GPU (the last slice's block merges the slices' states in slice order).
// Policy and reference rows are read in the same loop. Each thread streams 128-bit vectors,
// two per iteration (16 bf16/fp16 or 8 fp32 values), and keeps, per row, an online
// log-sum-exp in log2 units: t = z log2(e), ML = max t, S = sum 2^(t - ML). Per iteration
// it finds the chunk's max (bf16/fp16: packed, on the raw values, which the monotone
// transform maps to the max of z), rescales its state once (one MUFU.EX2) and then
// exponentiates every element once against its running max: one MUFU.EX2 per element.
// Statistics (entropy, sum p^2, mean z, first-argmax test) ride in the same loop with no
// further exps and only when asked for. The argmax test needs no index bookkeeping: the
// label is the first argmax iff z_y equals the row max and the max over the entries before
// it is smaller; threads keep the max over whole vectors before the label, and the few
// entries of the label's own vector are read at the end. The KL to the reference is
// accumulated from the same reads (math.h, kl_value). NaN inputs are detected from the
// running maxima (NaN-propagating) and sums. States merge across a warp with shuffles and
// across warps in a fixed order, so results are bitwise reproducible run to run.
// Rows whose start is not 16-byte aligned (odd V) peel up to 7 leading entries and 7
// trailing ones and stream the rest in vectors; only rows whose policy and reference (or
// logits and gradient) start at different alignments fall back to scalar loads.
//
// Soft cap. bf16/fp16 take one of at most 2^15 magnitudes, so the forward looks z = c tanh(x
// / c) / T up in a table in shared memory, built once per block (persistent blocks): no MUFU op
// for the soft cap and the accuracy of tanhf. fp32 (and fp16 with c > 56, whose table would
// not fit) use math.h's soft cap, one MUFU.EX2 and one MUFU.RCP. The backward uses the same
// formula (and for the reference row of the KL term an FMA-only reciprocal, math.h rcp_1_2,
// to leave the special-function unit headroom).
//
// Backward: a block writes one row (or slice) of -g p dz/dx (+ the KL term) with 128-bit
// loads and stores; the label's entry g (1 - p_y) dz/dx is written afterwards by one thread
// (it read x_y first, so the in-place backward is safe), which keeps the loop free of
// per-element label tests.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "logprobs_cuda.cuh"

namespace fastdpo {
namespace cuda {
namespace {

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;
constexpr float kNaN = __builtin_nanf("");
constexpr int kUnroll = 2;            // 128-bit vectors per row per iteration
constexpr int kFwdThreads = 256;
constexpr int kTableThreads = 384;    // table kernels: 2 blocks per SM fit the shared memory
constexpr int kBwdThreads = 256;
constexpr int kTableMax = 24576;      // soft-cap table entries (96 KiB)
constexpr int kMaxSplits = 256;

enum Cap : int { kNoCap = 0, kCapMath = 1, kCapTable = 2 };
enum Mode : int { kPolicy = 0, kWithRef = 1, kWithKL = 2 };

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// max that returns NaN if either input is NaN (fmaxf returns the other one).
__device__ __forceinline__ float max_nan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

__device__ __forceinline__ float sign_of(float mag, uint32_t sign_bits) {
  return __uint_as_float(__float_as_uint(mag) | (sign_bits & 0x80000000u));
}

// ------------------------------------------------------------------------------- element types

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  static constexpr int kVec = 4;
  static constexpr bool kPacked = false;
  __device__ static float value(const float* row, int i) { return row[i]; }
  __device__ static void unpack(const uint4& v, float* o) {
    o[0] = __uint_as_float(v.x);
    o[1] = __uint_as_float(v.y);
    o[2] = __uint_as_float(v.z);
    o[3] = __uint_as_float(v.w);
  }
};

template <>
struct Elem<__nv_bfloat16> {
  static constexpr int kVec = 8;
  static constexpr bool kPacked = true;
  __device__ static float lo(uint32_t u) { return __uint_as_float(u << 16); }
  __device__ static float hi(uint32_t u) { return __uint_as_float(u & 0xffff0000u); }
  __device__ static float bits_to_float(uint32_t b) { return __uint_as_float(b << 16); }
  __device__ static uint32_t bits_of(const __nv_bfloat16* row, int i) { return __bfloat16_as_ushort(row[i]); }
  __device__ static float value(const __nv_bfloat16* row, int i) { return bits_to_float(bits_of(row, i)); }
  // NaN-propagating max of two packed pairs.
  __device__ static uint32_t max2(uint32_t a, uint32_t b) {
    const __nv_bfloat162 r = __hmax2_nan(*reinterpret_cast<const __nv_bfloat162*>(&a),
                                         *reinterpret_cast<const __nv_bfloat162*>(&b));
    return *reinterpret_cast<const uint32_t*>(&r);
  }
  __device__ static uint32_t pack2(float a, float b) {
    const __nv_bfloat162 r = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&r);
  }
};

template <>
struct Elem<__half> {
  static constexpr int kVec = 8;
  static constexpr bool kPacked = true;
  __device__ static float lo(uint32_t u) { return __half2float(__ushort_as_half(static_cast<unsigned short>(u))); }
  __device__ static float hi(uint32_t u) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(u >> 16)));
  }
  __device__ static float bits_to_float(uint32_t b) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
  }
  __device__ static uint32_t bits_of(const __half* row, int i) { return __half_as_ushort(row[i]); }
  __device__ static float value(const __half* row, int i) { return bits_to_float(bits_of(row, i)); }
  __device__ static uint32_t max2(uint32_t a, uint32_t b) {
    const __half2 r = __hmax2_nan(*reinterpret_cast<const __half2*>(&a), *reinterpret_cast<const __half2*>(&b));
    return *reinterpret_cast<const uint32_t*>(&r);
  }
  __device__ static uint32_t pack2(float a, float b) {
    const __half2 r = __floats2half2_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&r);
  }
};

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

__device__ __forceinline__ uint4 load_stream(const void* p) { return __ldcs(reinterpret_cast<const uint4*>(p)); }
__device__ __forceinline__ void store_stream(void* p, const uint4& v) { __stcs(reinterpret_cast<uint4*>(p), v); }

// ------------------------------------------------------------------------------- soft cap

// The per-launch constants of the transform, in the units the loops use.
struct Consts {
  float c1;       // log2(e) / T: t = x * c1 without soft cap
  float inv_t;    // 1 / T
  float cap_k;    // c / T
  float cap_kl;   // c / T * log2(e): t = tanh(x / c) * cap_kl
  float cap_e;    // -2 log2(e) / c: exp(-2|x|/c) = ex2(|x| * cap_e)
  int tab_hi;     // table: entries 0..tab_hi (magnitudes at or above tab_hi map to tab[tab_hi])
};

// Computed on the host and passed as a kernel parameter, so that the loops read them from the
// constant bank as instruction operands instead of holding them in registers.
__host__ __device__ __forceinline__ Consts make_consts(const Transform& tf, int tab_hi) {
  Consts k;
  k.inv_t = tf.inv_temperature;
  k.c1 = kLog2e * tf.inv_temperature;
  k.cap_k = tf.softcap * tf.inv_temperature;
  k.cap_kl = k.cap_k * kLog2e;
  k.cap_e = -2.f * kLog2e * tf.inv_softcap;
  k.tab_hi = tab_hi;
  return k;
}

// tanh(|x| / c) and e = exp(-2|x|/c), r = 1 / (1 + e) (for the derivative 4 e r^2).
template <bool kFmaRcp>
__device__ __forceinline__ float cap_tanh(float x, const Consts& k, float& e, float& r) {
  e = ex2(fabsf(x) * k.cap_e);
  r = kFmaRcp ? rcp_1_2(1.f + e) : fast_rcp(1.f + e);
  return fmaf(-e, r, r);
}

// z of one element under the soft cap (math, no table).
__device__ __forceinline__ float cap_z(float x, const Consts& k) {
  float e, r;
  return sign_of(cap_tanh<false>(x, k, e, r), __float_as_uint(x)) * k.cap_k;
}

// Table lookups. The table lives in shared memory at the 32-bit shared address `tab`; `w`
// holds a bf16/fp16 pattern in its high 16 bits: the magnitude, clamped to the last entry,
// indexes the table (byte offset = magnitude * 4) and the sign bit is copied over.
__device__ __forceinline__ float tab_z_high(uint32_t tab, uint32_t w, const Consts& k) {
  const uint32_t m = min(w & 0x7fff0000u, static_cast<uint32_t>(k.tab_hi) << 16);
  float za;
  asm volatile("ld.shared.f32 %0, [%1];" : "=f"(za) : "r"(tab + (m >> 14)));  // volatile: stays after the table build's barrier
  return sign_of(za, w);
}

// `bits`: a pattern in the low 16 bits.
__device__ __forceinline__ float tab_z(uint32_t tab, uint32_t bits, const Consts& k) {
  return tab_z_high(tab, bits << 16, k);
}

template <typename T>
__device__ void build_table(float* tab, const Transform& tf, int hi) {
  for (int i = threadIdx.x; i <= hi; i += blockDim.x) {
    const float x = Elem<T>::bits_to_float(static_cast<uint32_t>(i));
    tab[i] = (tf.softcap * tanhf(__fdiv_rn(x, tf.softcap))) * tf.inv_temperature;
  }
  __syncthreads();
}

// z (cap) or x (no cap) of one element: the "value" the loops accumulate.
template <int kCap, typename T>
__device__ __forceinline__ float elem_value(const T* row, int i, uint32_t tab, const Consts& k) {
  if constexpr (kCap == kCapTable) {
    return tab_z(tab, Elem<T>::bits_of(row, i), k);
  } else {
    const float x = Elem<T>::value(row, i);
    return kCap == kCapMath ? cap_z(x, k) : x;
  }
}

// The transform applied to a value of the domain the maxima are tracked in (raw x for
// bf16/fp16, also under the soft cap; z for fp32 under the soft cap), for the argmax test.
template <int kCap, typename T>
__device__ __forceinline__ float max_domain_to_z(float v, uint32_t tab, const Consts& k) {
  if constexpr (Elem<T>::kPacked && kCap == kCapTable) {
    uint32_t bits;
    if constexpr (std::is_same<T, __nv_bfloat16>::value) bits = __bfloat16_as_ushort(__float2bfloat16_rn(v));
    else bits = __half_as_ushort(__float2half_rn(v));
    return tab_z(tab, bits, k);
  } else if constexpr (Elem<T>::kPacked && kCap == kCapMath) {
    return cap_z(v, k);
  } else {
    return v;
  }
}

// ------------------------------------------------------------------------------- row states

// One row's online log-sum-exp in log2 units (t = z log2 e): ML = max t (>= -FLT_MAX, so that
// an empty or all-masked state rescales by 0 instead of NaN), S = sum 2^(t - ML), and for
// statistics SZ = sum 2^(t - ML) (t - ML), S2 = sum 2^(2 (t - ML)), ZS = sum of values.
// MX / PB: max value and max over whole vectors before the label (argmax test), in the max
// domain, NaN-propagating for bf16/fp16 (the NaN detector there).
// A: sum 2^(t' - ML') (v' - v) over the reference row, for the KL.
struct RowState {
  float ML, S, SZ, S2, ZS, MX, PB;
};
struct RefState {
  float ML, S, A, MX;
};

__device__ __forceinline__ RowState row_identity() { return {-FLT_MAX, 0.f, 0.f, 0.f, 0.f, -INFINITY, -INFINITY}; }
__device__ __forceinline__ RefState ref_identity() { return {-FLT_MAX, 0.f, 0.f, -INFINITY}; }

// Rebase a state to a new maximum ML >= st.ML: one MUFU.EX2.
template <bool kStats>
__device__ __forceinline__ void rebase(RowState& st, float ML) {
  const float delta = st.ML - ML;
  const float f = ex2(delta);
  if (kStats) {
    st.SZ = f * fmaf(st.S, delta, st.SZ);
    st.S2 *= f * f;
  }
  st.S *= f;
  st.ML = ML;
}

__device__ __forceinline__ void rebase(RefState& st, float ML) {
  const float f = ex2(st.ML - ML);
  st.S *= f;
  st.A *= f;
  st.ML = ML;
}

// Merge b into a (fixed order at every call site).
template <bool kStats>
__device__ __forceinline__ void merge(RowState& a, const RowState& b) {
  const float ML = fmaxf(a.ML, b.ML);
  const float da = a.ML - ML, db = b.ML - ML;
  const float fa = ex2(da), fb = ex2(db);
  if (kStats) {
    a.SZ = fa * fmaf(a.S, da, a.SZ) + fb * fmaf(b.S, db, b.SZ);
    a.S2 = a.S2 * fa * fa + b.S2 * fb * fb;
    a.ZS += b.ZS;
    a.PB = max_nan(a.PB, b.PB);
  }
  a.S = a.S * fa + b.S * fb;
  a.MX = max_nan(a.MX, b.MX);
  a.ML = ML;
}

__device__ __forceinline__ void merge(RefState& a, const RefState& b) {
  const float ML = fmaxf(a.ML, b.ML);
  const float fa = ex2(a.ML - ML), fb = ex2(b.ML - ML);
  a.S = a.S * fa + b.S * fb;
  a.A = a.A * fa + b.A * fb;
  a.MX = max_nan(a.MX, b.MX);
  a.ML = ML;
}

// Accumulate n values (already rebased to the chunk's max): scale maps a value to t.
template <bool kStats, bool kClampD, int n>
__device__ __forceinline__ void accumulate(RowState& st, const float* v, float scale) {
#pragma unroll
  for (int k = 0; k < n; ++k) {
    const float d = fmaf(v[k], scale, -st.ML);
    const float e = ex2(d);
    st.S += e;
    if (kStats) {
      st.SZ = fmaf(e, kClampD ? fmaxf(d, -FLT_MAX) : d, st.SZ);  // 0 * -inf of a masked entry counts 0
      st.S2 = fmaf(e, e, st.S2);
      st.ZS += v[k];
    }
  }
}

template <int n>
__device__ __forceinline__ void accumulate_kl(RefState& st, const float* vr, const float* vp, float scale) {
#pragma unroll
  for (int k = 0; k < n; ++k) {
    const float e = ex2(fmaf(vr[k], scale, -st.ML));
    st.S += e;
    st.A = fmaf(e, kl_diff(vr[k], vp[k]), st.A);
  }
}

template <int n>
__device__ __forceinline__ void accumulate_ref(RefState& st, const float* vr, float scale) {
#pragma unroll
  for (int k = 0; k < n; ++k) st.S += ex2(fmaf(vr[k], scale, -st.ML));
}

// ------------------------------------------------------------------------------- row geometry

// Entries [0, head) and [head + nvec * kVec, V) are read one by one, vectors [0, nvec) in
// between; rows that cannot be vectorised (vec == false) are read entry by entry.
struct Geo {
  int head, nvec, tail0;
  bool vec;
};

template <typename T>
__device__ __forceinline__ Geo row_geometry(const void* x, const void* r, const void* out, int V) {
  constexpr int N = Elem<T>::kVec;
  const uintptr_t ax = reinterpret_cast<uintptr_t>(x) % 16;
  Geo g;
  g.vec = ax % sizeof(T) == 0 && (r == nullptr || reinterpret_cast<uintptr_t>(r) % 16 == ax) &&
          (out == nullptr || reinterpret_cast<uintptr_t>(out) % 16 == ax);
  g.head = g.vec ? min(int((16 - ax) % 16 / sizeof(T)), V) : 0;
  g.nvec = g.vec ? (V - g.head) / N : 0;
  g.tail0 = g.head + g.nvec * N;
  return g;
}

// The slice of a row that split s of S covers: vectors [vb, ve) (vector mode), entries
// [eb, ee) (entry mode); the head entries belong to split 0 and the tail ones to split S-1.
struct Slice {
  int vb, ve, eb, ee;
  bool first, last;
};

__device__ __forceinline__ Slice row_slice(const Geo& g, int V, int s, int S) {
  Slice sl;
  sl.vb = int(int64_t(g.nvec) * s / S);
  sl.ve = int(int64_t(g.nvec) * (s + 1) / S);
  sl.eb = int(int64_t(V) * s / S);
  sl.ee = int(int64_t(V) * (s + 1) / S);
  sl.first = s == 0;
  sl.last = s == S - 1;
  return sl;
}

// ------------------------------------------------------------------------------- forward

// Block size and the blocks per SM the register budget is set for (__launch_bounds__): 64
// registers for one row, 85 for two (policy and reference states and vectors side by side) and
// for the soft-cap table kernels (two blocks of 384 threads fit the table and the registers).
template <int kCap, int kMode>
struct FwdShape {
  static constexpr bool kTwoRows = kMode != kPolicy;
  static constexpr int kThreads = kCap == kCapTable ? kTableThreads : kFwdThreads;
  static constexpr int kMinBlocks = kCap == kCapTable ? 2 : (kTwoRows ? 3 : 4);
};

// Per-thread state of one row (or slice) in the forward.
template <bool kStats, int kCap, int kMode, typename T>
struct Fold {
  static constexpr int N = Elem<T>::kVec;
  static constexpr bool kRef = kMode != kPolicy;
  RowState p;
  RefState r;
  // bf16/fp16: running maxima as packed pairs (NaN-propagating), converted at the end.
  uint32_t mxp, pbp, rmxp;
  float scale;  // value -> t
  uint32_t tab;  // shared address of the soft-cap table
  Consts k;
  int y;

  __device__ void init(const Consts& kk, uint32_t tb, int label) {
    p = row_identity();
    r = ref_identity();
    mxp = pbp = rmxp = 0xff80ff80u;  // -inf pairs (bf16; for fp16 -inf is 0xfc00, below: set per type)
    if constexpr (std::is_same<T, __half>::value) mxp = pbp = rmxp = 0xfc00fc00u;
    k = kk;
    tab = tb;
    y = label;
    scale = kCap == kNoCap ? k.c1 : kLog2e;
  }

  // Values of one 128-bit vector: x (no cap) or z (soft cap).
  __device__ __forceinline__ void values(const uint4& raw, float* v) const {
    if constexpr (!Elem<T>::kPacked) {
      Elem<T>::unpack(raw, v);
      if (kCap == kCapMath) {
#pragma unroll
        for (int j = 0; j < 4; ++j) v[j] = cap_z(v[j], k);
      }
    } else {
      const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if constexpr (kCap == kCapTable) {
          v[2 * j] = tab_z_high(tab, w[j] << 16, k);
          v[2 * j + 1] = tab_z_high(tab, w[j], k);
        } else {
          v[2 * j] = Elem<T>::lo(w[j]);
          v[2 * j + 1] = Elem<T>::hi(w[j]);
          if (kCap == kCapMath) {
            v[2 * j] = cap_z(v[2 * j], k);
            v[2 * j + 1] = cap_z(v[2 * j + 1], k);
          }
        }
      }
    }
  }

  // Packed max of a bf16/fp16 vector (raw values).
  __device__ __forceinline__ static uint32_t vmax(const uint4& v) {
    return Elem<T>::max2(Elem<T>::max2(v.x, v.y), Elem<T>::max2(v.z, v.w));
  }

  // The t of a packed max pair's larger half (NaN ignored: NaN is caught through mxp).
  __device__ __forceinline__ float pair_max_t(uint32_t pair) const {
    const float a = Elem<T>::lo(pair), b = Elem<T>::hi(pair);
    if constexpr (kCap == kCapTable) {
      return tab_z_high(tab, a >= b ? pair << 16 : pair, k) * kLog2e;
    } else if constexpr (kCap == kCapMath) {
      return cap_z(fmaxf(a, b), k) * kLog2e;
    } else {
      return fmaxf(fmaxf(a, b) * k.c1, -FLT_MAX);
    }
  }

  // U vectors of the policy row (and of the reference row) whose first entries are at row
  // indices e0[u]; all U are full vectors.
  template <int U>
  __device__ __forceinline__ void chunk(const uint4* xv, const uint4* rv, const int* e0) {
    float v[U * N];
    float vr[kRef ? U * N : 1];
#pragma unroll
    for (int u = 0; u < U; ++u) values(xv[u], v + u * N);
    if constexpr (kRef) {
#pragma unroll
      for (int u = 0; u < U; ++u) values(rv[u], vr + u * N);
    }
    float cmL, rcmL = 0.f;
    if constexpr (Elem<T>::kPacked) {
      uint32_t vm[U], cp;
#pragma unroll
      for (int u = 0; u < U; ++u) vm[u] = vmax(xv[u]);
      cp = vm[0];
#pragma unroll
      for (int u = 1; u < U; ++u) cp = Elem<T>::max2(cp, vm[u]);
      mxp = Elem<T>::max2(mxp, cp);
      if (kStats) {
#pragma unroll
        for (int u = 0; u < U; ++u)
          if (e0[u] + N <= y) pbp = Elem<T>::max2(pbp, vm[u]);
      }
      cmL = pair_max_t(cp);
      if constexpr (kRef) {
        uint32_t rp = vmax(rv[0]);
#pragma unroll
        for (int u = 1; u < U; ++u) rp = Elem<T>::max2(rp, vmax(rv[u]));
        rmxp = Elem<T>::max2(rmxp, rp);
        rcmL = pair_max_t(rp);
      }
    } else {
      float vm[U];
#pragma unroll
      for (int u = 0; u < U; ++u) vm[u] = fmaxf(fmaxf(v[u * N], v[u * N + 1]), fmaxf(v[u * N + 2], v[u * N + 3]));
      float cm = vm[0];
#pragma unroll
      for (int u = 1; u < U; ++u) cm = fmaxf(cm, vm[u]);
      p.MX = fmaxf(p.MX, cm);
      if (kStats) {
#pragma unroll
        for (int u = 0; u < U; ++u)
          if (e0[u] + N <= y) p.PB = fmaxf(p.PB, vm[u]);
      }
      cmL = fmaxf(cm * scale, -FLT_MAX);
      if constexpr (kRef) {
        float rm = vr[0];
#pragma unroll
        for (int j = 1; j < U * N; ++j) rm = fmaxf(rm, vr[j]);
        rcmL = fmaxf(rm * scale, -FLT_MAX);
      }
    }
    rebase<kStats>(p, fmaxf(p.ML, cmL));
    accumulate<kStats, kCap == kNoCap, U * N>(p, v, scale);
    if constexpr (kRef) {
      rebase(r, fmaxf(r.ML, rcmL));
      if (kMode == kWithKL) accumulate_kl<U * N>(r, vr, v, scale);
      else accumulate_ref<U * N>(r, vr, scale);
    }
  }

  // One entry at row index i (head, tail, or rows that are not vectorised).
  __device__ __forceinline__ void entry(const T* x, const T* rr, int i) {
    float v = elem_value<kCap>(x, i, tab, k);
    if constexpr (Elem<T>::kPacked) {  // maxima of the raw values, as packed pairs
      const uint32_t b = Elem<T>::bits_of(x, i);
      mxp = Elem<T>::max2(mxp, b | (b << 16));
      if (kStats && i < y) pbp = Elem<T>::max2(pbp, b | (b << 16));
    } else {
      p.MX = fmaxf(p.MX, v);
      if (kStats && i < y) p.PB = fmaxf(p.PB, v);
    }
    rebase<kStats>(p, fmaxf(p.ML, fmaxf(v * scale, -FLT_MAX)));
    accumulate<kStats, kCap == kNoCap, 1>(p, &v, scale);
    if constexpr (kRef) {
      float w = elem_value<kCap>(rr, i, tab, k);
      if constexpr (Elem<T>::kPacked) {
        const uint32_t b = Elem<T>::bits_of(rr, i);
        rmxp = Elem<T>::max2(rmxp, b | (b << 16));
      }
      rebase(r, fmaxf(r.ML, fmaxf(w * scale, -FLT_MAX)));
      if (kMode == kWithKL) accumulate_kl<1>(r, &w, &v, scale);
      else accumulate_ref<1>(r, &w, scale);
    }
  }

  // The packed maxima as floats (NaN if any value was NaN).
  __device__ __forceinline__ void finish() {
    if constexpr (Elem<T>::kPacked) {
      p.MX = max_nan(Elem<T>::lo(mxp), Elem<T>::hi(mxp));
      p.PB = max_nan(Elem<T>::lo(pbp), Elem<T>::hi(pbp));
      r.MX = max_nan(Elem<T>::lo(rmxp), Elem<T>::hi(rmxp));
    } else {
      // fp32: NaN reaches S through its exp; mark the maxima so the checks below see it
      if (p.S != p.S) p.MX = kNaN;
      if (r.S != r.S) r.MX = kNaN;
    }
  }
};

// Fold this thread's share of one slice of a row.
template <bool kStats, int kCap, int kMode, typename T, int kThreads>
__device__ __forceinline__ void fold_slice(Fold<kStats, kCap, kMode, T>& f, const T* x, const T* rr, const Geo& g,
                                           const Slice& sl, int V) {
  constexpr int N = Elem<T>::kVec;
  constexpr bool kRef = kMode != kPolicy;
  const int tid = threadIdx.x;
  if (!g.vec) {
    for (int i = sl.eb + tid; i < sl.ee; i += kThreads) f.entry(x, rr, i);
    f.finish();
    return;
  }
  if (sl.first && tid < g.head) f.entry(x, rr, tid);
  int v = sl.vb + tid;
  const uint4* px = reinterpret_cast<const uint4*>(x + g.head) + v;
  const uint4* pr = kRef ? reinterpret_cast<const uint4*>(rr + g.head) + v : nullptr;
  for (; v + (kUnroll - 1) * kThreads < sl.ve; v += kUnroll * kThreads) {
    uint4 xv[kUnroll], rv[kRef ? kUnroll : 1];
    int e0[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      xv[u] = load_stream(px + u * kThreads);
      if (kRef) rv[u] = load_stream(pr + u * kThreads);
      e0[u] = g.head + (v + u * kThreads) * N;
    }
    px += kUnroll * kThreads;
    if (kRef) pr += kUnroll * kThreads;
    f.template chunk<kUnroll>(xv, rv, e0);
  }
#pragma unroll 1
  for (; v < sl.ve; v += kThreads) {  // at most kUnroll - 1 vectors left
    uint4 xv[1], rv[1];
    const int e0[1] = {g.head + v * N};
    xv[0] = load_stream(px);
    if (kRef) rv[0] = load_stream(pr);
    px += kThreads;
    if (kRef) pr += kThreads;
    f.template chunk<1>(xv, rv, e0);
  }
  if (sl.last && tid < V - g.tail0) f.entry(x, rr, g.tail0 + tid);
  f.finish();
}

// What one block hands over for its row (or slice), and what a split row stores per slice.
struct Partial {
  RowState p;
  RefState r;
};
static_assert(sizeof(Partial) <= kWorkFloats * sizeof(float), "partial state exceeds its workspace slot");

template <bool kStats, bool kRef>
__device__ __forceinline__ void merge_partial(Partial& a, const Partial& b) {
  merge<kStats>(a.p, b.p);
  if (kRef) merge(a.r, b.r);
}

template <bool kStats, bool kRef>
__device__ __forceinline__ Partial shfl_down(const Partial& s, int offset) {
  Partial o;
  const float* in = reinterpret_cast<const float*>(&s);
  float* out = reinterpret_cast<float*>(&o);
  constexpr int kFloats = sizeof(Partial) / sizeof(float);
#pragma unroll
  for (int j = 0; j < kFloats; ++j) {
    const bool used = j < 2 || j == 5 || (kStats && j < 7) || (kRef && j >= 7);
    out[j] = used ? __shfl_down_sync(0xffffffffu, in[j], offset) : in[j];
  }
  return o;
}

// Block-wide merge in a fixed order (lanes by a shuffle tree, then warps in order);
// the result is valid in thread 0.
template <bool kStats, bool kRef, int kThreads>
__device__ __forceinline__ Partial block_reduce(Partial s, Partial* smem) {
  constexpr int kWarps = kThreads / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) merge_partial<kStats, kRef>(s, shfl_down<kStats, kRef>(s, offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) smem[warp] = s;
  __syncthreads();
  Partial out = smem[0];
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) merge_partial<kStats, kRef>(out, smem[w]);
  }
  __syncthreads();  // smem is reused by the next row
  return out;
}

// Outputs of one row from its merged state (one thread).
template <bool kStats, int kCap, int kMode, typename T>
__device__ void finalize(const FwdArgs& a, int64_t row, int64_t label, int y, Partial st, const T* x, const T* rr,
                         const Geo& g, uint32_t tab, const Consts& k) {
  constexpr bool kRef = kMode != kPolicy;
  const int V = int(a.V);
  const float scale = kCap == kNoCap ? k.c1 : kLog2e;
  const RowState& p = st.p;
  const bool bad = y != label || p.S != p.S || p.MX != p.MX;
  const float ls = log2f(p.S);
  const float vy = elem_value<kCap>(x, y, tab, k);
  a.lse[row] = bad ? kNaN : kLn2 * (p.ML + ls);
  a.logp[row] = bad ? kNaN : kLn2 * (fmaf(vy, scale, -p.ML) - ls);
  if (kStats) {
    // The label's own vector: its entries before the label join the prefix max.
    float pb = p.PB;
    if (g.vec && y >= g.head && y < g.tail0) {
      for (int i = g.head + (y - g.head) / Elem<T>::kVec * Elem<T>::kVec; i < y; ++i) {
        pb = max_nan(pb, Elem<T>::kPacked ? Elem<T>::value(x, i) : elem_value<kCap>(x, i, tab, k));
      }
    }
    const float my = Elem<T>::kPacked ? Elem<T>::value(x, y) : vy;  // the label in the max domain
    const float zy = max_domain_to_z<kCap, T>(my, tab, k);
    const bool hit = zy == max_domain_to_z<kCap, T>(p.MX, tab, k) && max_domain_to_z<kCap, T>(pb, tab, k) < zy;
    float* o = a.stats + row * kNumStats;
    o[kStatEntropy] = bad ? kNaN : kLn2 * (ls - p.SZ / p.S);
    o[kStatArgmaxHit] = bad ? kNaN : (hit ? 1.f : 0.f);
    o[kStatMeanLogit] = bad ? kNaN : (kCap == kNoCap ? p.ZS * k.inv_t : p.ZS) / float(V);
    o[kStatLogSumP2] = bad ? kNaN : kLn2 * (log2f(p.S2) - 2.f * ls);
  }
  if constexpr (kRef) {
    const RefState& r = st.r;
    const bool rbad = bad || r.S != r.S || r.MX != r.MX;
    const float lsr = log2f(r.S);
    const float wy = elem_value<kCap>(rr, y, tab, k);
    a.ref_logp[row] = rbad ? kNaN : kLn2 * (fmaf(wy, scale, -r.ML) - lsr);
    if (kMode == kWithKL) {
      a.ref_lse[row] = rbad ? kNaN : kLn2 * (r.ML + lsr);
      const float u = kCap == kNoCap ? k.inv_t : 1.f;  // value differences -> z differences
      a.kl[row] = rbad ? kNaN : kl_value(r.A * u, r.S, kLn2 * (p.ML - r.ML), kLn2 * ls, 0.f, kLn2 * lsr);
    }
  }
}

template <bool kStats, int kCap, int kMode, typename T>
__global__ void __launch_bounds__(FwdShape<kCap, kMode>::kThreads, FwdShape<kCap, kMode>::kMinBlocks)
    logprobs_fwd_kernel(FwdArgs a, Consts k) {
  constexpr int kThreads = FwdShape<kCap, kMode>::kThreads;
  constexpr bool kRef = kMode != kPolicy;
  extern __shared__ float table[];
  __shared__ Partial smem[kThreads / 32];
  __shared__ int last_block;
  if constexpr (kCap == kCapTable) build_table<T>(table, a.tf, k.tab_hi);
  const uint32_t tab = static_cast<uint32_t>(__cvta_generic_to_shared(table));
  const int V = int(a.V);
  const int S = a.splits;
  const int64_t items = a.B * a.T * S;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t row = item / S;
    const int split = int(item % S);
    const int64_t label = a.labels[row];
    if (label == a.ignore_index) continue;  // outputs were zero-initialised
    const int y = int(label < 0 ? 0 : (label >= a.V ? a.V - 1 : label));  // range is checked by the caller
    const int64_t b = row / a.T, t = row % a.T;
    const T* x = static_cast<const T*>(a.x) + b * a.sxb + t * a.sxt;
    const T* rr = kRef ? static_cast<const T*>(a.r) + b * a.srb + t * a.srt : nullptr;
    const Geo g = row_geometry<T>(x, rr, nullptr, V);
    Fold<kStats, kCap, kMode, T> f;
    f.init(k, tab, y);
    fold_slice<kStats, kCap, kMode, T, kThreads>(f, x, rr, g, row_slice(g, V, split, S), V);
    Partial st = block_reduce<kStats, kRef, kThreads>(Partial{f.p, f.r}, smem);
    if (S == 1) {
      if (threadIdx.x == 0) finalize<kStats, kCap, kMode, T>(a, row, label, y, st, x, rr, g, tab, k);
      continue;
    }
    // Split row: store this slice's state; the last slice to arrive merges all in order.
    if (threadIdx.x == 0) {
      float* w = a.work + (row * S + split) * kWorkFloats;
      const float* s = reinterpret_cast<const float*>(&st);
      for (int j = 0; j < int(sizeof(Partial) / sizeof(float)); ++j) w[j] = s[j];
      __threadfence();
      last_block = atomicAdd(a.counters + row, 1) == S - 1;
    }
    __syncthreads();
    if (last_block && threadIdx.x == 0) {
      __threadfence();
      Partial m;
      for (int s = 0; s < S; ++s) {
        Partial q;
        float* qf = reinterpret_cast<float*>(&q);
        const float* w = a.work + (row * S + s) * kWorkFloats;
        for (int j = 0; j < int(sizeof(Partial) / sizeof(float)); ++j) qf[j] = __ldcg(w + j);
        if (s == 0) m = q;
        else merge_partial<kStats, kRef>(m, q);
      }
      finalize<kStats, kCap, kMode, T>(a, row, label, y, m, x, rr, g, tab, k);
    }
    __syncthreads();  // last_block is reused by the next row
  }
}

// ------------------------------------------------------------------------------- backward

__host__ __device__ __forceinline__ const BwdArgs& bwd_base(const BwdArgs& p) { return p; }
__host__ __device__ __forceinline__ const BwdArgs& bwd_base(const BwdKLArgs& p) { return p.base; }
__device__ __forceinline__ float pa_ref_lse(const BwdArgs&, int64_t) { return 0.f; }
__device__ __forceinline__ float pa_ref_lse(const BwdKLArgs& p, int64_t row) { return p.ref_lse[row]; }

template <typename T>
__device__ __forceinline__ uint4 pack_vec(const float* v) {
  uint4 o;
  if constexpr (Elem<T>::kPacked) {
    o.x = Elem<T>::pack2(v[0], v[1]);
    o.y = Elem<T>::pack2(v[2], v[3]);
    o.z = Elem<T>::pack2(v[4], v[5]);
    o.w = Elem<T>::pack2(v[6], v[7]);
  } else {
    o.x = __float_as_uint(v[0]);
    o.y = __float_as_uint(v[1]);
    o.z = __float_as_uint(v[2]);
    o.w = __float_as_uint(v[3]);
  }
  return o;
}

template <typename T>
__device__ __forceinline__ void unpack_vec(const uint4& raw, float* v) {
  if constexpr (Elem<T>::kPacked) {
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      v[2 * j] = Elem<T>::lo(w[j]);
      v[2 * j + 1] = Elem<T>::hi(w[j]);
    }
  } else {
    Elem<T>::unpack(raw, v);
  }
}

// Per-row constants of the gradient's non-label entries: grad_v = cp p_v [+ cq q_v] (x ds_v/dx).
struct BwdRow {
  float lseL, rlseL;  // log-sum-exps in t units
  float cp, cq;       // -(g - gk) / T and -gk / T (no soft cap); x 4 with it (ds = 4 e r^2)
};

// Gradient of one non-label entry from x (and the reference value xr).
template <int kCap, bool kKL>
__device__ __forceinline__ float grad_entry(float x, float xr, const BwdRow& w, const Consts& k) {
  if constexpr (kCap == kNoCap) {
    const float p = ex2(fmaf(x, k.c1, -w.lseL));
    if (!kKL) return w.cp * p;
    const float q = ex2(fmaf(xr, k.c1, -w.rlseL));
    return fmaf(w.cp, p, w.cq * q);
  } else {
    float e, r;
    const float th = cap_tanh<false>(x, k, e, r);
    const float p = ex2(fmaf(sign_of(th, __float_as_uint(x)), k.cap_kl, -w.lseL));
    const float ds4 = e * r * r;  // ds/dx / 4
    if (!kKL) return (w.cp * p) * ds4;
    float er, rr;
    const float thr = cap_tanh<true>(xr, k, er, rr);
    const float q = ex2(fmaf(sign_of(thr, __float_as_uint(xr)), k.cap_kl, -w.rlseL));
    return fmaf(w.cp, p, w.cq * q) * ds4;
  }
}

// The vector part of one slice of a gradient row.
template <int kCap, bool kKLRow, bool kVecStore, typename T>
__device__ __forceinline__ void bwd_vectors(const T* x, const T* xr, T* out, const Geo& geo, const Slice& sl,
                                            const BwdRow& w, const Consts& k) {
  constexpr int N = Elem<T>::kVec;
  const int first = sl.vb + threadIdx.x;
  const uint4* px = reinterpret_cast<const uint4*>(x + geo.head) + first;
  const uint4* pr = kKLRow ? reinterpret_cast<const uint4*>(xr + geo.head) + first : nullptr;
  uint4* po = reinterpret_cast<uint4*>(out + geo.head) + first;  // used only with kVecStore
  T* pe = out + geo.head + int64_t(first) * N;
  const int n = sl.ve - first;  // vectors from this thread's first one to the slice end
  for (int v = 0; v < n; v += kBwdThreads) {
    float xv[N], rv[N], o[N];
    unpack_vec<T>(load_stream(px + v), xv);
    if (kKLRow) unpack_vec<T>(load_stream(pr + v), rv);
#pragma unroll
    for (int j = 0; j < N; ++j) o[j] = grad_entry<kCap, kKLRow>(xv[j], kKLRow ? rv[j] : 0.f, w, k);
    if constexpr (kVecStore) {
      store_stream(po + v, pack_vec<T>(o));
    } else {
#pragma unroll
      for (int j = 0; j < N; ++j) pe[int64_t(v) * N + j] = from_float<T>(o[j]);
    }
  }
}

template <int kCap, bool kKL, typename T, typename Args>
__global__ void __launch_bounds__(kBwdThreads, 4) logprobs_bwd_kernel(Args pa, Consts k) {
  static_assert(kKL == std::is_same<Args, BwdKLArgs>::value, "KL backward takes BwdKLArgs");
  constexpr int N = Elem<T>::kVec;
  __shared__ float label_x[2];
  const BwdArgs& a = bwd_base(pa);
  const int S = a.splits;
  const int64_t row = blockIdx.x / S;
  const int split = int(blockIdx.x % S);
  const int V = int(a.V);
  const int64_t b = row / a.T, t = row % a.T;
  const T* x = static_cast<const T*>(a.x) + b * a.sxb + t * a.sxt;
  T* out = static_cast<T*>(a.out) + b * a.sob + t * a.sot;
  const int64_t label = a.labels[row];
  const float g = a.grad[row];
  float gk = 0.f;
  const T* xr = nullptr;
  if constexpr (kKL) {
    gk = pa.grad_kl[row];
    if (gk != 0.f && label != a.ignore_index) xr = static_cast<const T*>(pa.r) + b * pa.srb + t * pa.srt;
  }
  const bool kl_row = kKL && xr != nullptr;
  const bool zero = label == a.ignore_index || (g == 0.f && !kl_row);
  // Zero rows are laid out by the gradient row, the others by the logits (and reference) row.
  const Geo geo = zero ? row_geometry<T>(out, nullptr, nullptr, V) : row_geometry<T>(x, kl_row ? xr : nullptr, nullptr, V);
  const Slice sl = row_slice(geo, V, split, S);
  const int tid = threadIdx.x;
  if (zero) {
    const uint4 z0 = make_uint4(0u, 0u, 0u, 0u);
    if (geo.vec) {
      if (sl.first && tid < geo.head) out[tid] = from_float<T>(0.f);
      for (int v = sl.vb + tid; v < sl.ve; v += kBwdThreads) store_stream(out + geo.head + int64_t(v) * N, z0);
      if (sl.last && tid < V - geo.tail0) out[geo.tail0 + tid] = from_float<T>(0.f);
    } else {
      for (int i = sl.eb + tid; i < sl.ee; i += kBwdThreads) out[i] = from_float<T>(0.f);
    }
    return;
  }
  BwdRow w;
  w.lseL = a.lse[row] * kLog2e;
  w.rlseL = 0.f;
  const float cap4 = kCap == kNoCap ? 1.f : 4.f;
  w.cp = -(g - gk) * k.inv_t * cap4;
  w.cq = -gk * k.inv_t * cap4;
  if constexpr (kKL) {
    if (kl_row) w.rlseL = pa.ref_lse[row] * kLog2e;
  }
  // The block whose slice holds the label writes its entry at the end; it reads x_y first.
  const bool valid = label >= 0 && label < a.V;
  const int y = valid ? int(label) : -1;
  bool owns = false;
  if (valid) {
    if (!geo.vec) owns = y >= sl.eb && y < sl.ee;
    else if (y < geo.head) owns = sl.first;
    else if (y >= geo.tail0) owns = sl.last;
    else owns = (y - geo.head) / N >= sl.vb && (y - geo.head) / N < sl.ve;
  }
  if (owns) {
    if (tid == 0) {
      label_x[0] = Elem<T>::value(x, y);
      label_x[1] = kl_row ? Elem<T>::value(xr, y) : 0.f;
    }
    __syncthreads();  // x_y is read before any thread overwrites it (in place)
  }
  if (geo.vec) {
    if (sl.first && tid < geo.head) {
      const float xv = Elem<T>::value(x, tid), rv = kl_row ? Elem<T>::value(xr, tid) : 0.f;
      out[tid] = from_float<T>(kl_row ? grad_entry<kCap, true>(xv, rv, w, k) : grad_entry<kCap, false>(xv, 0.f, w, k));
    }
    // Gradient rows are written with 128-bit stores where they start at the logits' alignment
    // (always in place); else (a strided view with odd V) entry by entry.
    const bool vstore = reinterpret_cast<uintptr_t>(out) % 16 == reinterpret_cast<uintptr_t>(x) % 16;
    if (kl_row) {
      if (vstore) bwd_vectors<kCap, true, true, T>(x, xr, out, geo, sl, w, k);
      else bwd_vectors<kCap, true, false, T>(x, xr, out, geo, sl, w, k);
    } else {
      if (vstore) bwd_vectors<kCap, false, true, T>(x, xr, out, geo, sl, w, k);
      else bwd_vectors<kCap, false, false, T>(x, xr, out, geo, sl, w, k);
    }
    if (sl.last && tid < V - geo.tail0) {
      const int i = geo.tail0 + tid;
      const float xv = Elem<T>::value(x, i), rv = kl_row ? Elem<T>::value(xr, i) : 0.f;
      out[i] = from_float<T>(kl_row ? grad_entry<kCap, true>(xv, rv, w, k) : grad_entry<kCap, false>(xv, 0.f, w, k));
    }
  } else {
    for (int i = sl.eb + tid; i < sl.ee; i += kBwdThreads) {
      const float xv = Elem<T>::value(x, i), rv = kl_row ? Elem<T>::value(xr, i) : 0.f;
      out[i] = from_float<T>(kl_row ? grad_entry<kCap, true>(xv, rv, w, k) : grad_entry<kCap, false>(xv, 0.f, w, k));
    }
  }
  if (owns) {
    __syncthreads();  // the loop's write of the label entry lands first
    if (tid == 0) {
      constexpr bool kC = kCap != kNoCap;
      const float gy = kl_row ? logprob_kl_grad_t<kC>(g, gk, label_x[0], label_x[1], a.lse[row], pa_ref_lse(pa, row),
                                                      1.f, a.tf)
                              : logprob_grad_t<kC>(g, label_x[0], a.lse[row], 1.f, a.tf);
      out[y] = from_float<T>(gy);
    }
  }
}


// ------------------------------------------------------------------------------- launch

// Host: float value of a bf16/fp16 magnitude pattern.
float half_bits_value(uint32_t b, bool bf16) {
  if (bf16) {
    const uint32_t u = b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
  }
  const int e = int(b >> 10) & 0x1f, m = int(b & 0x3ff);
  if (e == 0x1f) return INFINITY;
  return e == 0 ? ldexpf(float(m), -24) : ldexpf(float(m | 0x400), e - 25);
}

// Last table entry for soft cap c: the first magnitude at or above 9.1 c, where tanh(x / c)
// rounds to 1 in float, so every larger magnitude (up to inf) shares its entry.
int table_hi(float softcap, bool bf16) {
  const float lim = 9.1f * softcap;
  uint32_t lo = 0, hi = bf16 ? 0x7f80u : 0x7c00u;  // inf
  if (!(half_bits_value(hi, bf16) >= lim)) return int(hi);
  while (lo < hi) {  // smallest pattern whose value is >= lim (values grow with the pattern)
    const uint32_t mid = (lo + hi) / 2;
    if (half_bits_value(mid, bf16) >= lim) hi = mid;
    else lo = mid + 1;
  }
  return int(lo);
}

using FwdFn = void (*)(FwdArgs, Consts);

struct FwdLaunch {
  FwdFn fn;
  int threads;
  int smem;
  int tab_hi;
  bool persistent;  // table kernels: one block per resident slot, each builds the table once
};

template <bool kStats, int kMode, typename T>
FwdLaunch fwd_pick_cap(const FwdArgs& a) {
  if (!(a.tf.softcap > 0.f)) return {&logprobs_fwd_kernel<kStats, kNoCap, kMode, T>, kFwdThreads, 0, 0, false};
  if constexpr (Elem<T>::kPacked) {
    const int hi = table_hi(a.tf.softcap, std::is_same<T, __nv_bfloat16>::value);
    if (hi < kTableMax) {
      return {&logprobs_fwd_kernel<kStats, kCapTable, kMode, T>, FwdShape<kCapTable, kMode>::kThreads,
              int((hi + 1) * sizeof(float)), hi, true};
    }
  }
  return {&logprobs_fwd_kernel<kStats, kCapMath, kMode, T>, kFwdThreads, 0, 0, false};
}

template <typename T>
FwdLaunch fwd_pick_typed(const FwdArgs& a, bool stats, bool kl) {
  const int mode = kl ? kWithKL : (a.r != nullptr ? kWithRef : kPolicy);
  if (stats) {
    if (mode == kWithKL) return fwd_pick_cap<true, kWithKL, T>(a);
    if (mode == kWithRef) return fwd_pick_cap<true, kWithRef, T>(a);
    return fwd_pick_cap<true, kPolicy, T>(a);
  }
  if (mode == kWithKL) return fwd_pick_cap<false, kWithKL, T>(a);
  if (mode == kWithRef) return fwd_pick_cap<false, kWithRef, T>(a);
  return fwd_pick_cap<false, kPolicy, T>(a);
}

FwdLaunch fwd_pick(const FwdArgs& a, DType dtype, bool stats, bool kl) {
  switch (dtype) {
    case DType::kFloat: return fwd_pick_typed<float>(a, stats, kl);
    case DType::kBFloat16: return fwd_pick_typed<__nv_bfloat16>(a, stats, kl);
    case DType::kHalf: return fwd_pick_typed<__half>(a, stats, kl);
  }
  return {nullptr, 0, 0, 0, false};
}

int vec_of(DType dtype) { return dtype == DType::kFloat ? 4 : 8; }

// Resident blocks per SM of a kernel (at least 1); sets the dynamic shared memory limit first.
template <typename Fn>
int blocks_per_sm(Fn fn, int threads, int smem) {
  if (smem > 48 * 1024) cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, fn, threads, smem) != cudaSuccess) n = 1;
  return n > 0 ? n : 1;
}

// Blocks per row: 1 when the rows alone give >= 2 waves of blocks; else enough slices for
// 2 waves, each at least one vector per thread, at most kMaxSplits.
int splits_for(int64_t rows, int64_t V, int per_sm, int sm_count, int threads, int vec) {
  const int64_t target = 2 * int64_t(per_sm) * sm_count;
  if (rows <= 0 || rows >= target) return 1;
  const int64_t by_v = V / (int64_t(threads) * vec);
  const int64_t want = (target + rows - 1) / rows;
  const int64_t s = want < by_v ? want : by_v;
  return int(s < 1 ? 1 : (s > kMaxSplits ? kMaxSplits : s));
}

int device_sm_count() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
    return 1;
  return n > 0 ? n : 1;
}

using BwdFn = void (*)(BwdArgs, Consts);
using BwdKLFn = void (*)(BwdKLArgs, Consts);

template <typename T>
BwdFn bwd_pick_typed(const BwdArgs& a) {
  return a.tf.softcap > 0.f ? &logprobs_bwd_kernel<kCapMath, false, T, BwdArgs>
                            : &logprobs_bwd_kernel<kNoCap, false, T, BwdArgs>;
}

template <typename T>
BwdKLFn bwd_kl_pick_typed(const BwdKLArgs& a) {
  return a.base.tf.softcap > 0.f ? &logprobs_bwd_kernel<kCapMath, true, T, BwdKLArgs>
                                 : &logprobs_bwd_kernel<kNoCap, true, T, BwdKLArgs>;
}

BwdFn bwd_pick(const BwdArgs& a, DType dtype) {
  switch (dtype) {
    case DType::kFloat: return bwd_pick_typed<float>(a);
    case DType::kBFloat16: return bwd_pick_typed<__nv_bfloat16>(a);
    case DType::kHalf: return bwd_pick_typed<__half>(a);
  }
  return nullptr;
}

BwdKLFn bwd_kl_pick(const BwdKLArgs& a, DType dtype) {
  switch (dtype) {
    case DType::kFloat: return bwd_kl_pick_typed<float>(a);
    case DType::kBFloat16: return bwd_kl_pick_typed<__nv_bfloat16>(a);
    case DType::kHalf: return bwd_kl_pick_typed<__half>(a);
  }
  return nullptr;
}

}  // namespace

int plan_logprobs_fwd(const FwdArgs& a, DType dtype, bool stats, bool kl, int sm_count) {
  const FwdLaunch L = fwd_pick(a, dtype, stats, kl);
  if (L.fn == nullptr) return 1;
  return splits_for(a.B * a.T, a.V, blocks_per_sm(L.fn, L.threads, L.smem), sm_count, L.threads, vec_of(dtype));
}

int plan_logprobs_bwd(const BwdArgs& a, DType dtype, bool kl, int sm_count) {
  int per_sm = 1;
  if (kl) {
    BwdKLArgs k{};
    k.base = a;
    const BwdKLFn fn = bwd_kl_pick(k, dtype);
    if (fn != nullptr) per_sm = blocks_per_sm(fn, kBwdThreads, 0);
  } else {
    const BwdFn fn = bwd_pick(a, dtype);
    if (fn != nullptr) per_sm = blocks_per_sm(fn, kBwdThreads, 0);
  }
  return splits_for(a.B * a.T, a.V, per_sm, sm_count, kBwdThreads, vec_of(dtype));
}

cudaError_t launch_logprobs_fwd(const FwdArgs& a, DType dtype, bool stats, bool kl, cudaStream_t stream) {
  const int64_t rows = a.B * a.T;
  if (rows == 0) return cudaSuccess;
  if ((stats && a.stats == nullptr) || (kl && (a.r == nullptr || a.kl == nullptr || a.ref_lse == nullptr)) ||
      a.splits < 1 || (a.splits > 1 && (a.work == nullptr || a.counters == nullptr)) || a.V >= (int64_t(1) << 31))
    return cudaErrorInvalidValue;
  const FwdLaunch L = fwd_pick(a, dtype, stats, kl);
  if (L.fn == nullptr) return cudaErrorInvalidValue;
  const int64_t items = rows * a.splits;
  int64_t grid = items;
  if (L.persistent) {
    const int64_t slots = int64_t(blocks_per_sm(L.fn, L.threads, L.smem)) * device_sm_count();
    grid = items < slots ? items : slots;
  } else if (L.smem > 48 * 1024) {
    cudaFuncSetAttribute(L.fn, cudaFuncAttributeMaxDynamicSharedMemorySize, L.smem);
  }
  if (grid > 0x7fffffff) grid = 0x7fffffff;  // blocks stride over the rest
  L.fn<<<static_cast<unsigned>(grid), L.threads, L.smem, stream>>>(a, make_consts(a.tf, L.tab_hi));
  return cudaGetLastError();
}

cudaError_t launch_logprobs_bwd(const BwdArgs& a, DType dtype, cudaStream_t stream) {
  const int64_t rows = a.B * a.T;
  if (rows == 0) return cudaSuccess;
  if (a.splits < 1 || rows * a.splits > 0x7fffffff || a.V >= (int64_t(1) << 31)) return cudaErrorInvalidValue;
  const BwdFn fn = bwd_pick(a, dtype);
  if (fn == nullptr) return cudaErrorInvalidValue;
  fn<<<static_cast<unsigned>(rows * a.splits), kBwdThreads, 0, stream>>>(a, make_consts(a.tf, 0));
  return cudaGetLastError();
}

cudaError_t launch_logprobs_bwd_kl(const BwdKLArgs& a, DType dtype, cudaStream_t stream) {
  const int64_t rows = a.base.B * a.base.T;
  if (rows == 0) return cudaSuccess;
  if (a.grad_kl == nullptr || a.r == nullptr || a.ref_lse == nullptr || a.base.splits < 1 ||
      rows * a.base.splits > 0x7fffffff || a.base.V >= (int64_t(1) << 31))
    return cudaErrorInvalidValue;
  const BwdKLFn fn = bwd_kl_pick(a, dtype);
  if (fn == nullptr) return cudaErrorInvalidValue;
  fn<<<static_cast<unsigned>(rows * a.base.splits), kBwdThreads, 0, stream>>>(a, make_consts(a.base.tf, 0));
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastdpo
