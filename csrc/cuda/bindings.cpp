// Thin binding: registers the CUDA kernels as the CUDA implementation of the
// fastdpo:: ops (the schemas live in fastdpo/ops/schema.py), on torch's
// current stream, with a device guard and the shared boundary checks.
// Label ranges are checked by the Python layer (here that would need a host
// synchronisation); the kernels clamp the index they read and return NaN for
// an out-of-range label instead of reading out of bounds.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "fastdpo/checks.h"
#include "logprobs_cuda.cuh"

namespace fastdpo {
namespace {

cuda::DType to_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kHalf: return cuda::DType::kHalf;
    default: TORCH_CHECK(false, "fastdpo: the cuda backend takes float32, bfloat16 or float16 logits, got ", t.scalar_type());
  }
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fastdpo: launching the ", what, " kernel failed: ", cudaGetErrorString(err));
}

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

void check_vocab(int64_t V) {
  TORCH_CHECK(V < (int64_t(1) << 31), "fastdpo: the cuda backend takes vocabularies below 2^31 entries, got ", V);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> logprobs_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& labels, const c10::optional<at::Tensor>& ref_logits,
    int64_t ignore_index, double temperature, double softcap, bool stats, bool kl) {
  check_fwd(logits, labels, ref_logits, temperature, softcap, kl);
  const auto dtype = to_dtype(logits);
  TORCH_CHECK(!ref_logits.has_value() || ref_logits->scalar_type() == logits.scalar_type(),
              "fastdpo: ref_logits must have the dtype of logits (", logits.scalar_type(), ")");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2);
  check_vocab(V);
  auto opts = logits.options().dtype(at::kFloat);
  at::Tensor logp = at::zeros({B, T}, opts), lse = at::zeros({B, T}, opts);
  at::Tensor ref = ref_logits.has_value() ? at::zeros({B, T}, opts) : at::empty({0}, opts);
  at::Tensor st = stats ? at::zeros({B, T, kNumStats}, opts) : at::empty({0}, opts);
  at::Tensor kl_out = kl ? at::zeros({B, T}, opts) : at::empty({0}, opts);
  at::Tensor ref_lse = kl ? at::zeros({B, T}, opts) : at::empty({0}, opts);
  const at::Tensor lab = labels.contiguous();
  cuda::FwdArgs a{};
  a.x = logits.const_data_ptr();
  a.r = ref_logits.has_value() ? ref_logits->const_data_ptr() : nullptr;
  a.labels = lab.const_data_ptr<int64_t>();
  a.logp = logp.mutable_data_ptr<float>();
  a.lse = lse.mutable_data_ptr<float>();
  a.ref_logp = ref_logits.has_value() ? ref.mutable_data_ptr<float>() : nullptr;
  a.stats = stats ? st.mutable_data_ptr<float>() : nullptr;
  a.kl = kl ? kl_out.mutable_data_ptr<float>() : nullptr;
  a.ref_lse = kl ? ref_lse.mutable_data_ptr<float>() : nullptr;
  a.B = B;
  a.T = T;
  a.V = V;
  a.sxb = logits.stride(0);
  a.sxt = logits.stride(1);
  a.srb = ref_logits.has_value() ? ref_logits->stride(0) : 0;
  a.srt = ref_logits.has_value() ? ref_logits->stride(1) : 0;
  a.ignore_index = ignore_index;
  a.tf = make_transform(float(temperature), float(softcap));
  // Small batches split each row over the vocabulary: per-slice states and arrival counters.
  a.splits = cuda::plan_logprobs_fwd(a, dtype, stats, kl, sm_count());
  at::Tensor work, counters;
  if (a.splits > 1) {
    work = at::empty({B * T * a.splits * cuda::kWorkFloats}, opts);
    counters = at::zeros({B * T}, logits.options().dtype(at::kInt));
    a.work = work.mutable_data_ptr<float>();
    a.counters = counters.mutable_data_ptr<int>();
  }
  check_cuda(cuda::launch_logprobs_fwd(a, dtype, stats, kl, at::cuda::getCurrentCUDAStream()), "forward");
  return {logp, lse, ref, st, kl_out, ref_lse};
}

void bwd_into(const at::Tensor& grad_logp, const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
              int64_t ignore_index, double temperature, double softcap, const c10::optional<at::Tensor>& grad_kl,
              const c10::optional<at::Tensor>& ref_logits, const c10::optional<at::Tensor>& ref_lse,
              const at::Tensor& out) {
  check_bwd(grad_logp, logits, labels, lse, temperature, softcap);
  check_bwd_kl(logits, labels, grad_kl, ref_logits, ref_lse);
  const bool kl = grad_kl.has_value();
  // The kernel reads the reference row while it writes out (logits, in place): they may share
  // memory only as the very same view, where each element is read before it is overwritten.
  TORCH_CHECK(!kl || !ref_logits->is_alias_of(out) ||
                  (ref_logits->const_data_ptr() == out.const_data_ptr() && ref_logits->strides() == out.strides()),
              "fastdpo: ref_logits must not overlap the logits that an in-place backward overwrites");
  const auto dtype = to_dtype(logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor g = grad_logp.contiguous(), l = lse.contiguous(), lab = labels.contiguous();
  const at::Tensor gk = kl ? grad_kl->contiguous() : at::Tensor();
  const at::Tensor rl = kl ? ref_lse->contiguous() : at::Tensor();
  cuda::BwdArgs a{};
  a.grad = g.const_data_ptr<float>();
  a.x = logits.const_data_ptr();
  a.labels = lab.const_data_ptr<int64_t>();
  a.lse = l.const_data_ptr<float>();
  a.out = out.mutable_data_ptr();
  a.B = logits.size(0);
  a.T = logits.size(1);
  a.V = logits.size(2);
  a.sxb = logits.stride(0);
  a.sxt = logits.stride(1);
  a.sob = out.stride(0);
  a.sot = out.stride(1);
  a.ignore_index = ignore_index;
  a.tf = make_transform(float(temperature), float(softcap));
  check_vocab(a.V);
  a.splits = cuda::plan_logprobs_bwd(a, dtype, kl, sm_count());
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (!kl) {
    check_cuda(cuda::launch_logprobs_bwd(a, dtype, stream), "backward");
    return;
  }
  cuda::BwdKLArgs k{};
  k.base = a;
  k.grad_kl = gk.const_data_ptr<float>();
  k.r = ref_logits->const_data_ptr();
  k.ref_lse = rl.const_data_ptr<float>();
  k.srb = ref_logits->stride(0);
  k.srt = ref_logits->stride(1);
  check_cuda(cuda::launch_logprobs_bwd_kl(k, dtype, stream), "backward (with the KL term)");
}

at::Tensor logprobs_bwd_cuda(const at::Tensor& grad_logp, const at::Tensor& logits, const at::Tensor& labels,
                             const at::Tensor& lse, int64_t ignore_index, double temperature, double softcap,
                             const c10::optional<at::Tensor>& grad_kl, const c10::optional<at::Tensor>& ref_logits,
                             const c10::optional<at::Tensor>& ref_lse) {
  at::Tensor out = at::empty(logits.sizes(), logits.options());
  bwd_into(grad_logp, logits, labels, lse, ignore_index, temperature, softcap, grad_kl, ref_logits, ref_lse, out);
  return out;
}

void logprobs_bwd_inplace_cuda(const at::Tensor& grad_logp, const at::Tensor& logits, const at::Tensor& labels,
                               const at::Tensor& lse, int64_t ignore_index, double temperature, double softcap,
                               const c10::optional<at::Tensor>& grad_kl, const c10::optional<at::Tensor>& ref_logits,
                               const c10::optional<at::Tensor>& ref_lse) {
  bwd_into(grad_logp, logits, labels, lse, ignore_index, temperature, softcap, grad_kl, ref_logits, ref_lse, logits);
}

}  // namespace
}  // namespace fastdpo

TORCH_LIBRARY_IMPL(fastdpo, CUDA, m) {
  m.impl("logprobs_fwd", &fastdpo::logprobs_fwd_cuda);
  m.impl("logprobs_bwd", &fastdpo::logprobs_bwd_cuda);
  m.impl("logprobs_bwd_", &fastdpo::logprobs_bwd_inplace_cuda);
}
