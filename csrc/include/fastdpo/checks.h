// Boundary checks shared by the CPU and CUDA bindings of the fastdpo ops.
// Every input that could make a kernel read or write out of bounds is checked
// here, with a message that says what was wrong and what was expected.
#pragma once

#include <ATen/ATen.h>

namespace fastdpo {

inline void check_logits(const at::Tensor& logits, const char* name) {
  TORCH_CHECK(logits.dim() == 3, "fastdpo: ", name, " must be 3-D [B, T, V] at the op boundary, got shape ",
              logits.sizes());
  TORCH_CHECK(logits.size(2) >= 1, "fastdpo: ", name, " has an empty vocabulary dimension (V = 0)");
  TORCH_CHECK(logits.size(2) == 1 || logits.stride(2) == 1, "fastdpo: ", name,
              " must be contiguous along the vocabulary (last) dimension, got strides ", logits.strides());
  const auto st = logits.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf || st == at::kDouble, "fastdpo: ", name,
              " must be float32, bfloat16, float16 or float64, got ", st);
}

inline void check_fwd(const at::Tensor& logits, const at::Tensor& labels, const c10::optional<at::Tensor>& ref_logits,
                      double temperature, double softcap, bool kl = false) {
  TORCH_CHECK(!kl || ref_logits.has_value(), "fastdpo: kl=True (the per-token KL to the reference) needs ref_logits");
  check_logits(logits, "logits");
  TORCH_CHECK(labels.scalar_type() == at::kLong, "fastdpo: labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == logits.size(0) && labels.size(1) == logits.size(1),
              "fastdpo: labels must have shape [B, T] = ", logits.sizes().slice(0, 2), ", got ", labels.sizes());
  TORCH_CHECK(labels.device() == logits.device(), "fastdpo: labels are on ", labels.device(), " but logits are on ",
              logits.device());
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), "fastdpo: temperature must be a finite number > 0, got ",
              temperature);
  TORCH_CHECK(softcap >= 0 && std::isfinite(softcap), "fastdpo: softcap must be >= 0 (0 = none), got ", softcap);
  if (ref_logits.has_value()) {
    const auto& r = *ref_logits;
    check_logits(r, "ref_logits");
    TORCH_CHECK(r.sizes() == logits.sizes(), "fastdpo: ref_logits must have the shape of logits ", logits.sizes(),
                ", got ", r.sizes());
    TORCH_CHECK(r.device() == logits.device(), "fastdpo: ref_logits are on ", r.device(), " but logits are on ",
                logits.device());
    TORCH_CHECK(r.scalar_type() == logits.scalar_type(), "fastdpo: ref_logits must have the dtype of logits (",
                logits.scalar_type(), "), got ", r.scalar_type());
  }
}

inline void check_bwd(const at::Tensor& grad_logp, const at::Tensor& logits, const at::Tensor& labels,
                      const at::Tensor& lse, double temperature, double softcap) {
  check_fwd(logits, labels, c10::nullopt, temperature, softcap);
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const auto* t : {&grad_logp, &lse}) {
    TORCH_CHECK(t->sizes() == labels.sizes(), "fastdpo: backward inputs grad_logp and lse must have shape ",
                labels.sizes(), ", got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == acc, "fastdpo: backward inputs grad_logp and lse must be ", acc, ", got ",
                t->scalar_type());
    TORCH_CHECK(t->device() == logits.device(), "fastdpo: backward inputs must be on ", logits.device());
  }
}

// The KL term of the backward: grad_kl and ref_lse [B, T] in the accumulation type, and
// ref_logits shaped like logits; all three or none.
inline void check_bwd_kl(const at::Tensor& logits, const at::Tensor& labels, const c10::optional<at::Tensor>& grad_kl,
                         const c10::optional<at::Tensor>& ref_logits, const c10::optional<at::Tensor>& ref_lse) {
  if (!grad_kl.has_value()) return;
  TORCH_CHECK(ref_logits.has_value() && ref_lse.has_value(),
              "fastdpo: a backward with grad_kl needs ref_logits and ref_lse (from the forward with kl=True)");
  check_fwd(logits, labels, ref_logits, 1.0, 0.0);  // ref_logits: shape, dtype, device, strides
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const auto* t : {&*grad_kl, &*ref_lse}) {
    TORCH_CHECK(t->sizes() == labels.sizes() && t->scalar_type() == acc && t->device() == logits.device(),
                "fastdpo: backward inputs grad_kl and ref_lse must be ", acc, " tensors of shape ", labels.sizes(),
                " on ", logits.device(), ", got ", t->scalar_type(), " ", t->sizes(), " on ", t->device());
  }
}

}  // namespace fastdpo
