// CUDA kernels of the fused log-prob ops, on raw pointers and a stream.
// Semantics are those of fastdpo/kernels/reference.py; the arithmetic is the
// shared csrc/include/fastdpo/math.h.
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
  int64_t B, T, V;
  int64_t sxb, sxt, srb, srt;
  int64_t ignore_index;
  Transform tf;
  // Last, so the fields above keep their offsets (the kernels without kl compile as before).
  float* kl;       // KL(reference || policy) per row, nullptr without kl
  float* ref_lse;  // reference log-sum-exp per row (for the KL backward), nullptr without kl
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
};

// The backward with the KL term: its own kernel parameters, so that the plain
// backward's kernels (BwdArgs alone) compile exactly as without the KL term.
struct BwdKLArgs {
  BwdArgs base;
  const float* grad_kl;  // [B * T]
  const void* r;         // reference logits, read only on rows where grad_kl != 0
  const float* ref_lse;  // [B * T]
  int64_t srb, srt;
};

enum class DType { kFloat, kBFloat16, kHalf };

cudaError_t launch_logprobs_fwd(const FwdArgs& a, DType dtype, bool stats, bool kl, cudaStream_t stream);
cudaError_t launch_logprobs_bwd(const BwdArgs& a, DType dtype, cudaStream_t stream);
cudaError_t launch_logprobs_bwd_kl(const BwdKLArgs& a, DType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastdpo
