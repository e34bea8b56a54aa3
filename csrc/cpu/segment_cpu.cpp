// Native CPU segment sum for packed (padding-free) batches: out[k] = sum(values[offsets[k] : offsets[k+1]]).
//
// Each segment is summed serially, in token order, in double precision and rounded once to the output
// type, so the result does not depend on the thread count or scheduling (bitwise deterministic).
// Segments are spread over threads with at::parallel_for; no atomics.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace fastdpo {
namespace {

at::Tensor segment_sum_cpu(const at::Tensor& values, const at::Tensor& offsets) {
  TORCH_CHECK(values.dim() == 1, "fastdpo: segment_sum expects values [M], got shape ", values.sizes());
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 1 && offsets.scalar_type() == at::kLong,
              "fastdpo: segment_sum expects int64 offsets [S + 1], got ", offsets.scalar_type(), " ",
              offsets.sizes());
  const auto st = values.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf || st == at::kDouble,
              "fastdpo: segment_sum values must be float32, bfloat16, float16 or float64, got ", st);
  const auto v = values.contiguous();
  const auto off = offsets.contiguous();
  const int64_t S = off.size(0) - 1;
  const int64_t M = v.size(0);
  const int64_t* o = off.data_ptr<int64_t>();
  // Bounds: every segment must lie inside values (the Python layer validates the packing with a clearer message).
  TORCH_CHECK(o[0] >= 0 && o[S] <= M, "fastdpo: segment_sum offsets must lie in [0, ", M, "], got ", o[0], " .. ",
              o[S]);
  for (int64_t k = 0; k < S; ++k) {
    TORCH_CHECK(o[k] <= o[k + 1], "fastdpo: segment_sum offsets must be non-decreasing, got offsets[", k, "] = ",
                o[k], " > offsets[", k + 1, "] = ", o[k + 1]);
  }
  const auto acc = st == at::kDouble ? at::kDouble : at::kFloat;
  auto out = at::empty({S}, v.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "fastdpo_segment_sum", [&] {
    const scalar_t* x = v.data_ptr<scalar_t>();
    if (acc == at::kDouble) {
      double* y = out.data_ptr<double>();
      at::parallel_for(0, S, 16, [&](int64_t b, int64_t e) {
        for (int64_t k = b; k < e; ++k) {
          double s = 0.0;
          for (int64_t i = o[k]; i < o[k + 1]; ++i) s += static_cast<double>(x[i]);
          y[k] = s;
        }
      });
    } else {
      float* y = out.data_ptr<float>();
      at::parallel_for(0, S, 16, [&](int64_t b, int64_t e) {
        for (int64_t k = b; k < e; ++k) {
          double s = 0.0;
          for (int64_t i = o[k]; i < o[k + 1]; ++i) s += static_cast<double>(x[i]);
          y[k] = static_cast<float>(s);
        }
      });
    }
  });
  return out;
}

}  // namespace
}  // namespace fastdpo

TORCH_LIBRARY_IMPL(fastdpo, CPU, m) {
  m.impl("segment_sum", &fastdpo::segment_sum_cpu);
}
