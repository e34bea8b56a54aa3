// Native CPU tile loop of the fused-linear path (fastdpo/ops/linear.py, recompute strategy).
//
// linear_fwd: for each tile of the valid token rows, logits = scale * (h W^T + b)
// go into one reusable buffer (ATen GEMM: oneDNN/MKL) and are folded there by
// the fused forward kernel (fastdpo::logprobs_fwd); results are scattered into
// caller-allocated outputs. linear_bwd: each tile is projected again, the fused
// backward kernel overwrites it with d loss / d logits, and the two gradient
// GEMMs accumulate into caller-allocated (fp32) gradients. No Python per tile.
//
// Reduced-precision CPU GEMMs are fast only in the "A @ B^T" layout with both
// operands contiguous, so the hidden-gradient GEMM is arranged that way for bf16/fp16.
// The weight gradient accumulates in fp32 with fp32 products (add_weight_grad).

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

namespace fastdpo {
namespace {

using FwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t, double, double, bool, bool);
using BwdSig = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double,
                    double, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                    const std::optional<at::Tensor>&);

// The fused kernels are called through the dispatcher (the same ops Python calls).
const c10::TypedOperatorHandle<FwdSig>& fwd_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastdpo::logprobs_fwd", "").typed<FwdSig>();
  return op;
}

const c10::TypedOperatorHandle<BwdSig>& bwd_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastdpo::logprobs_bwd_", "").typed<BwdSig>();
  return op;
}

void check_common(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& labels, const at::Tensor& idx, int64_t rows) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "fastdpo: linear ops expect hidden [M, H] and weight [V, H], got ", hidden.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), "fastdpo: hidden and weight must share a dtype, got ",
              hidden.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == weight.size(0) &&
                                    bias->scalar_type() == weight.scalar_type()),
              "fastdpo: bias must be a [V] tensor of the weight's dtype");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == hidden.size(0) && labels.scalar_type() == at::kLong,
              "fastdpo: labels must be int64 [M] with M = hidden.size(0)");
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong, "fastdpo: idx must be an int64 vector");
  TORCH_CHECK(rows > 0, "fastdpo: rows per tile must be positive, got ", rows);
  TORCH_CHECK(weight.size(0) > 0, "fastdpo: weight has an empty vocabulary dimension");
}

// out = scale * (h @ W^T + b), written into the tile buffer.
void project(at::Tensor& out, const at::Tensor& h, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
             double scale) {
  if (bias.has_value()) {
    at::addmm_out(out, bias->expand_as(out), h, weight.t(), scale, scale);
  } else {
    at::addmm_out(out, out, h, weight.t(), 0.0, scale);  // beta = 0: out's old contents are ignored
  }
}

// acc [V, H] += scale * x^T h for a gradient tile x [r, V] and its hidden rows h [r, H], with the
// products and sums in acc's dtype (fp32) for bf16/fp16 tiles too, so a tile's partial gradient is
// never rounded to the tile's dtype: a block's operands are upcast, each block within `budget` bytes.
void add_weight_grad(const at::Tensor& acc, const at::Tensor& x, const at::Tensor& h, double scale, int64_t budget) {
  if (x.scalar_type() == acc.scalar_type()) {
    acc.addmm_(x.t(), h, 1.0, scale);
    return;
  }
  const int64_t r = x.size(0), V = x.size(1), H = h.size(1), width = acc.element_size();
  const int64_t rb = std::max<int64_t>(1, budget / (width * H));
  for (int64_t i = 0; i < r; i += rb) {
    const int64_t n = std::min(rb, r - i);
    const at::Tensor hf = h.narrow(0, i, n).to(acc.scalar_type());
    const int64_t vb = std::max<int64_t>(1, budget / (width * n));
    for (int64_t v = 0; v < V; v += vb) {
      const int64_t w = std::min(vb, V - v);
      acc.narrow(0, v, w).addmm_(x.narrow(0, i, n).narrow(1, v, w).to(acc.scalar_type()).t(), hf, 1.0, scale);
    }
  }
}

void linear_fwd_cpu(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const at::Tensor& labels, const at::Tensor& idx, int64_t ignore_index, double temperature,
                    double softcap, double scale, int64_t rows, const at::Tensor& logp,
                    const std::optional<at::Tensor>& lse, const std::optional<at::Tensor>& stats) {
  check_common(hidden, weight, bias, labels, idx, rows);
  const int64_t n = idx.size(0);
  if (n == 0) return;
  const bool want_stats = stats.has_value() && stats->numel() > 0;
  at::Tensor buf = at::empty({std::min(rows, n), weight.size(0)}, hidden.options());
  for (int64_t i = 0; i < n; i += rows) {
    const int64_t j = std::min(n, i + rows);
    const at::Tensor sel = idx.slice(0, i, j);
    at::Tensor x = buf.narrow(0, 0, j - i);
    project(x, hidden.index_select(0, sel), weight, bias, scale);
    auto [lp, ls, unused, st, unused_kl, unused_ref_lse] =
        fwd_op().call(x.unsqueeze(0), labels.index_select(0, sel).unsqueeze(0), std::nullopt, ignore_index,
                      temperature, softcap, want_stats, false);
    logp.index_copy_(0, sel, lp.squeeze(0));
    if (lse.has_value()) lse->index_copy_(0, sel, ls.squeeze(0));
    if (want_stats) stats->index_copy_(0, sel, st.squeeze(0));
  }
}

void linear_bwd_cpu(const at::Tensor& grad_logp, const at::Tensor& hidden, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias, const at::Tensor& labels, const at::Tensor& idx,
                    const at::Tensor& lse, int64_t ignore_index, double temperature, double softcap, double scale,
                    int64_t rows, const std::optional<at::Tensor>& grad_hidden,
                    const std::optional<at::Tensor>& grad_weight, const std::optional<at::Tensor>& grad_bias) {
  check_common(hidden, weight, bias, labels, idx, rows);
  const int64_t n = idx.size(0);
  if (n == 0) return;
  const bool nt = hidden.scalar_type() == at::kBFloat16 || hidden.scalar_type() == at::kHalf;
  const at::Tensor wt = (nt && grad_hidden.has_value()) ? weight.t().contiguous() : at::Tensor();
  at::Tensor buf = at::empty({std::min(rows, n), weight.size(0)}, hidden.options());
  for (int64_t i = 0; i < n; i += rows) {
    const int64_t j = std::min(n, i + rows);
    const at::Tensor sel = idx.slice(0, i, j);
    const at::Tensor h = hidden.index_select(0, sel);
    at::Tensor x = buf.narrow(0, 0, j - i);
    project(x, h, weight, bias, scale);
    bwd_op().call(grad_logp.index_select(0, sel).unsqueeze(0).contiguous(), x.unsqueeze(0),
                  labels.index_select(0, sel).unsqueeze(0), lse.index_select(0, sel).unsqueeze(0), ignore_index,
                  temperature, softcap, std::nullopt, std::nullopt, std::nullopt);
    if (grad_hidden.has_value()) {
      at::Tensor gh = nt ? at::mm(x, wt.t()) : at::mm(x, weight);
      if (scale != 1.0) gh.mul_(scale);
      grad_hidden->index_copy_(0, sel, gh.to(grad_hidden->scalar_type()));  // autocast: fp32 rows
    }
    if (grad_weight.has_value()) add_weight_grad(*grad_weight, x, h, scale, rows * x.size(1) * x.element_size());
    if (grad_bias.has_value()) grad_bias->add_(x.sum(0, false, grad_bias->scalar_type()), scale);
  }
}

}  // namespace
}  // namespace fastdpo

TORCH_LIBRARY_IMPL(fastdpo, CPU, m) {
  m.impl("linear_fwd_", &fastdpo::linear_fwd_cpu);
  m.impl("linear_bwd_", &fastdpo::linear_bwd_cpu);
}
