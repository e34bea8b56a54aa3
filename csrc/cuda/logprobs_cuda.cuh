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
};

struct BwdArgs {
  const float* grad;  // [B * T]
  const void* x;
  const int64_t* labels;
  const float* lse;
  void* out;  // may be x (in place)
  int64_t B, T, V;
  int64_t sxb, sxt, sob, sot;
  int64_t ignore_index;
  Transform tf;
};

enum class DType { kFloat, kBFloat16, kHalf };

cudaError_t launch_logprobs_fwd(const FwdArgs& a, DType dtype, bool stats, cudaStream_t stream);
cudaError_t launch_logprobs_bwd(const BwdArgs& a, DType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastdpo
