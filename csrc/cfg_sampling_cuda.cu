// CUDA implementation of `pairuni::cfg_sample` (schema in cfg_sampling.cpp): argument
// checks, the current stream, dtype dispatch; the kernels are in cfg_sampling.cuh.
// No host synchronisation: safe inside CUDA-graph capture.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <atomic>

#include "cfg_sampling.cuh"
#include "cfg_sampling_op.h"

namespace pairuni {
namespace cfg {
namespace {

// Streaming multiprocessors of a device, queried once (a host attribute: no stream work,
// legal during graph capture).
int multiprocessor_count(c10::DeviceIndex device) {
  static std::array<std::atomic<int>, 64> cache{};
  const int slot = static_cast<int>(device) & 63;
  int n = cache[slot].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, static_cast<int>(device)));
    cache[slot].store(n, std::memory_order_relaxed);
  }
  return n;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cfg_sample_cuda(const at::Tensor& logits_in,
                                                               const at::Tensor& seeds_in,
                                                               const c10::optional<at::Tensor>& steps_in,
                                                               int64_t step, double guidance_scale,
                                                               double temperature, int64_t top_k, double top_p,
                                                               bool interleaved, bool with_cond) {
  const CfgSampleArgs args = check_cfg_sample_args(logits_in, seeds_in, steps_in, step, guidance_scale,
                                                   temperature, top_k, top_p);
  TORCH_CHECK(logits_in.is_cuda(), "cfg_sample (CUDA kernel): logits must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const at::Tensor seeds = seeds_in.contiguous();
  at::Tensor steps;
  if (steps_in.has_value()) steps = steps_in->contiguous();
  auto [tokens, logprobs, cond_logprobs] = allocate_cfg_sample_outputs(logits, args.batch, with_cond);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.device().index()).stream();

  CfgSampleParams p{};
  p.logits = logits.data_ptr();
  p.row_stride = logits.stride(0);
  p.seeds = seeds.data_ptr<int64_t>();
  p.steps = steps.defined() ? steps.data_ptr<int64_t>() : nullptr;
  p.steps_stride = args.steps_stride;
  p.step = static_cast<uint64_t>(step);
  p.batch = args.batch;
  p.vocab = args.vocab;
  p.guidance = static_cast<float>(guidance_scale);
  p.temperature = static_cast<float>(temperature);
  p.top_k = effective_top_k(top_k, args.vocab);
  p.top_p = static_cast<float>(top_p);
  p.interleaved = interleaved;
  p.tokens = tokens.data_ptr<int64_t>();
  p.logprobs = logprobs.data_ptr<float>();
  p.cond_logprobs = with_cond ? cond_logprobs.data_ptr<float>() : nullptr;
  p.chunks = 1;

  at::Tensor partials, arrivals;  // live until the kernel is queued; the caching allocator keeps them stream-ordered
  if (!CfgSampleIsFiltered(p)) {
    const int num_sms = multiprocessor_count(logits.device().index());
    p.chunks = CfgSampleChunks(args.batch, args.vocab, num_sms);
    if (p.chunks > 1) {
      partials = at::empty({static_cast<int64_t>(CfgSamplePartialBytes(args.batch, p.chunks))},
                           logits.options().dtype(at::kByte));
      arrivals = at::empty({args.batch}, logits.options().dtype(at::kInt));
      C10_CUDA_CHECK(cudaMemsetAsync(arrivals.data_ptr(), 0, sizeof(unsigned int) * args.batch, stream));
      p.partials = partials.data_ptr();
      p.arrivals = reinterpret_cast<unsigned int*>(arrivals.data_ptr<int32_t>());
    }
  }

  cudaError_t err = cudaSuccess;
  switch (logits.scalar_type()) {
    case at::kFloat:
      err = CfgSample<float>(p, stream);
      break;
    case at::kHalf:
      err = CfgSample<__half>(p, stream);
      break;
    case at::kBFloat16:
      err = CfgSample<__nv_bfloat16>(p, stream);
      break;
    default:
      TORCH_CHECK(false, "cfg_sample: unsupported logits dtype ", logits.scalar_type());
  }
  C10_CUDA_CHECK(err);
  return {tokens, logprobs, cond_logprobs};
}

}  // namespace
}  // namespace cfg
}  // namespace pairuni

TORCH_LIBRARY_IMPL(pairuni, CUDA, m) { m.impl("cfg_sample", &pairuni::cfg::cfg_sample_cuda); }
