// Compile-check of the torch-free CUDA templates with plain nvcc (`make cuda-check`):
// instantiates every kernel and launcher for the three logit dtypes, and checks on the
// host that the shared random stream still produces the Random123 known answers.
#include "cfg_sampling.cuh"

namespace pairuni {
namespace cfg {

template cudaError_t CfgSample<float>(const CfgSampleParams&, cudaStream_t);
template cudaError_t CfgSample<__half>(const CfgSampleParams&, cudaStream_t);
template cudaError_t CfgSample<__nv_bfloat16>(const CfgSampleParams&, cudaStream_t);

template __global__ void CfgSampleSplitKernel<float>(const CfgSampleParams);
template __global__ void CfgSampleSplitKernel<__half>(const CfgSampleParams);
template __global__ void CfgSampleSplitKernel<__nv_bfloat16>(const CfgSampleParams);
template __global__ void CfgSampleFilteredKernel<float>(const CfgSampleParams);
template __global__ void CfgSampleFilteredKernel<__half>(const CfgSampleParams);
template __global__ void CfgSampleFilteredKernel<__nv_bfloat16>(const CfgSampleParams);

}  // namespace cfg
}  // namespace pairuni

// Random123 kat_vectors, philox4x32 10 (zero counter and key).
static_assert(sizeof(pairuni::cfg::CfgPartial) == 40, "CfgPartial layout changed: update CfgSamplePartialBytes users");

int pairuni_header_check_kat() {
  const pairuni::cfg::Philox4 r = pairuni::cfg::philox4x32_10(0u, 0u, 0u, 0u, 0u, 0u);
  return (r.x[0] == 0x6627e8d5u && r.x[1] == 0xe169c58du && r.x[2] == 0xbc57ac4cu && r.x[3] == 0x9b00dbd8u) ? 0 : 1;
}
