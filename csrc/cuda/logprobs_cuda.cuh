// CUDA kernels of the fused log-prob ops, on raw pointers and a stream.
// Semantics are those of fastdpo/kernels/reference.py; the arithmetic shared with
// the CPU kernels is csrc/include/fastdpo/math.h.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "fastdpo/math.h"

namespace fastdpo {
namespace cuda {

// Strided [B, T, V] logits (unit stride along V) and per-row outputs.
struct FwdArgs {
  const void* x;
  const void* r;          // reference logits, or nullptr
  const int64_t* labels;  // [B * T], contiguous
  float* logp;
  float* lse;
  float* ref_logp;  // nullptr without reference
  float* stats;     // [B * T, kNumStats], nullptr without statistics
  float* kl;        // KL(reference || policy) per row, nullptr without kl
  float* ref_lse;   // reference log-sum-exp per row (for the KL backward), nullptr without kl
  int64_t B, T, V;
  int64_t sxb, sxt, srb, srt;
  int64_t ignore_index;
  Transform tf;
  // Splitting each row over the vocabulary (plan_logprobs_fwd): `splits` blocks per row write
  // partial states to `work` [B * T, splits, kWorkFloats]; the last of them (counted in
  // `counters` [B * T], zero-initialised) merges them in split order and writes the outputs.
  int splits;
  float* work;
  int* counters;
};

struct BwdArgs {
  const float* grad;  // [B * T]
  const void* x;
  const int64_t* labels;
  const float* lse;
  void* out;  // may be x (in place); overlaps the reference logits only as that very view
  int64_t B, T, V;
  int64_t sxb, sxt, sob, sot;
  int64_t ignore_index;
  Transform tf;
  int splits;  // blocks per row (plan_logprobs_bwd)
};

// The backward with the KL term: rows with grad_kl != 0 read the reference row too.
struct BwdKLArgs {
  BwdArgs base;
  const float* grad_kl;  // [B * T]
  const void* r;         // reference logits, read only on rows where grad_kl != 0
  const float* ref_lse;  // [B * T]
  int64_t srb, srt;
};

enum class DType { kFloat, kBFloat16, kHalf };

// Floats of one partial state in FwdArgs::work.
constexpr int kWorkFloats = 12;

// Blocks per row so that small batches still fill the GPU (>= 2 waves of blocks where the
// vocabulary allows it); 1 for large batches. `sm_count` is the device's multiprocessor count.
int plan_logprobs_fwd(const FwdArgs& a, DType dtype, bool stats, bool kl, int sm_count);
int plan_logprobs_bwd(const BwdArgs& a, DType dtype, bool kl, int sm_count);

cudaError_t launch_logprobs_fwd(const FwdArgs& a, DType dtype, bool stats, bool kl, cudaStream_t stream);
cudaError_t launch_logprobs_bwd(const BwdArgs& a, DType dtype, cudaStream_t stream);
cudaError_t launch_logprobs_bwd_kl(const BwdKLArgs& a, DType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastdpo
