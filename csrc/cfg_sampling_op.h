// Shared by the CPU (cfg_sampling.cpp) and CUDA (cfg_sampling_cuda.cu) implementations of
// `pairuni::cfg_sample`: the argument checks and the output allocation. Uses torch.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <tuple>

namespace pairuni {
namespace cfg {

struct CfgSampleArgs {
  int64_t batch;         // B conditional rows
  int64_t vocab;         // V
  int64_t steps_stride;  // 0: one step for every row, 1: steps[b]
};

// The Python front raises ValueError with the same conditions; these guard direct
// `torch.ops.pairuni.cfg_sample` callers.
inline CfgSampleArgs check_cfg_sample_args(const at::Tensor& logits, const at::Tensor& seeds,
                                           const c10::optional<at::Tensor>& steps, int64_t step,
                                           double guidance_scale, double temperature,
                                           int64_t top_k, double top_p) {
  TORCH_CHECK(logits.dim() == 2, "cfg_sample: logits must be [2B, V], got ", logits.sizes());
  TORCH_CHECK(logits.size(0) % 2 == 0 && logits.size(0) > 0,
              "cfg_sample: logits.size(0) must be even and positive (2B), got ", logits.size(0));
  TORCH_CHECK(logits.size(1) > 0, "cfg_sample: logits must have V > 0 columns");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16 ||
                  logits.scalar_type() == at::kHalf,
              "cfg_sample: logits must be float32, bfloat16 or float16, got ", logits.scalar_type());
  const int64_t batch = logits.size(0) / 2;
  TORCH_CHECK(seeds.dim() == 1 && seeds.size(0) == batch && seeds.scalar_type() == at::kLong,
              "cfg_sample: seeds must be int64 [B] = [", batch, "], got ", seeds.scalar_type(), " ",
              seeds.sizes());
  TORCH_CHECK(seeds.device() == logits.device(), "cfg_sample: seeds must be on ", logits.device());
  int64_t steps_stride = 0;
  if (steps.has_value()) {
    const at::Tensor& s = *steps;
    TORCH_CHECK(s.scalar_type() == at::kLong && s.device() == logits.device(),
                "cfg_sample: steps must be an int64 tensor on ", logits.device());
    TORCH_CHECK(s.numel() == 1 || (s.dim() == 1 && s.size(0) == batch),
                "cfg_sample: steps must have one element or shape [B] = [", batch, "], got ",
                s.sizes());
    steps_stride = s.numel() == 1 ? 0 : 1;
  } else {
    TORCH_CHECK(step >= 0, "cfg_sample: step must be >= 0, got ", step);
  }
  TORCH_CHECK(std::isfinite(guidance_scale), "cfg_sample: guidance_scale must be finite");
  TORCH_CHECK(std::isfinite(temperature) && temperature >= 0.0,
              "cfg_sample: temperature must be >= 0, got ", temperature);
  TORCH_CHECK(top_k >= 0, "cfg_sample: top_k must be >= 0, got ", top_k);
  TORCH_CHECK(top_p > 0.0 && top_p <= 1.0, "cfg_sample: top_p must be in (0, 1], got ", top_p);
  return {batch, logits.size(1), steps_stride};
}

// tokens [B] int64, logprobs [B] float32, cond_logprobs [B] float32 ([0] without `with_cond`).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> allocate_cfg_sample_outputs(const at::Tensor& logits,
                                                                                  int64_t batch,
                                                                                  bool with_cond) {
  return {at::empty({batch}, logits.options().dtype(at::kLong)),
          at::empty({batch}, logits.options().dtype(at::kFloat)),
          at::empty({with_cond ? batch : 0}, logits.options().dtype(at::kFloat))};
}

// top_k >= V keeps everything: the same as no top-k.
inline int64_t effective_top_k(int64_t top_k, int64_t vocab) { return top_k >= vocab ? 0 : top_k; }

}  // namespace cfg
}  // namespace pairuni
