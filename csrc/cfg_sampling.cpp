// pairuni op library: the schema of every op (TORCH_LIBRARY) and the CPU kernels.
// The Python module `pairuni_kernels._C` exists only so that `import` loads this library.
//
// cfg_sample on CPU: rows run in parallel (at::parallel_for); inside a row, plain loops
// over float buffers that GCC vectorises (an AVX2 clone is chosen at load time when the
// CPU has it). The random stream and the noise come from cfg_sampling_common.h, so the
// CPU kernel, the CUDA kernel and the torch reference draw the same tokens.
#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "cfg_sampling_common.h"
#include "cfg_sampling_op.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define PAIRUNI_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PAIRUNI_CLONES
#endif

namespace pairuni {
namespace cfg {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp(x) for -87 <= x <= 0 (x = z - max), ~2 ulp, no libm call so that loops vectorise; the
// caller zeroes x < -87 (a separate loop: a clamp here would stop GCC's if-conversion).
// Only normalisers and top-p masses use it, never the noise, so it need not match torch bit for bit.
inline float exp_nonpositive(float x) {
  const float log2e = 1.44269504088896341f;
  const float t = x * log2e;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest integer (1.5 * 2^23)
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * bits_float(static_cast<uint32_t>(bits));
}

constexpr float kExpFloor = -87.0f;  // exp(-87) ~ 1.6e-38: below it a term counts as 0

inline float exp_or_zero(float x) { return x < kExpFloor ? 0.0f : exp_nonpositive(x); }

// Random words of tokens [0, 4*groups) of one (seed, step); groups < 2^32 (V < 2^34).
PAIRUNI_CLONES void philox_row_bits(uint64_t seed, uint64_t step, uint32_t groups, uint32_t* out) {
  const uint32_t s0 = static_cast<uint32_t>(step), s1 = static_cast<uint32_t>(step >> 32);
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma omp simd
  for (uint32_t g = 0; g < groups; ++g) {
    const Philox4 r = philox4x32_10(g, 0u, s0, s1, k0, k1);
    out[4 * g + 0] = r.x[0];
    out[4 * g + 1] = r.x[1];
    out[4 * g + 2] = r.x[2];
    out[4 * g + 3] = r.x[3];
  }
}

// out[i] = fill where z[i] < tau (a separate loop: GCC will not if-convert the noise).
PAIRUNI_CLONES void mask_below(const float* z, float tau, int64_t n, float fill, float* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = z[i] >= tau ? out[i] : fill;
}

// key[i] = z[i] + gumbel(bits[i]) where z[i] >= tau, else -inf.
PAIRUNI_CLONES void perturbed_keys(const float* z, const uint32_t* bits, float tau, int64_t n,
                                   float* key) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) key[i] = z[i] + gumbel_from_bits(bits[i]);
  if (tau > kNegInf) mask_below(z, tau, n, kNegInf, key);
}

PAIRUNI_CLONES float max_of(const float* x, int64_t n) {
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// sum over z[i] >= tau of exp(z[i] - m): terms in fp32 (vectorised), the sum in double.
PAIRUNI_CLONES double sum_exp(const float* z, float m, float tau, int64_t n, float* scratch) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) scratch[i] = exp_nonpositive(z[i] - m);
  const float lowest = std::max(tau, m + kExpFloor);
  mask_below(z, lowest, n, 0.0f, scratch);
  double acc[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += static_cast<double>(scratch[i + j]);
  for (; i < n; ++i) acc[0] += static_cast<double>(scratch[i]);
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

inline int64_t first_index_of(const float* x, int64_t n, float value) {
  for (int64_t i = 0; i < n; ++i)
    if (x[i] == value) return i;
  return 0;
}

template <typename scalar_t>
void guided_row(const scalar_t* cond, const scalar_t* uncond, float guidance, float temperature,
                int64_t n, float* z) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i)
    z[i] = guided_logit(static_cast<float>(cond[i]), static_cast<float>(uncond[i]), guidance,
                        temperature);
}

// log softmax(cond / temperature)[token], over every token (no top-k / top-p): the
// conditional branch's log-prob, in the pass that drew the token (the row is still in cache).
template <typename scalar_t>
float cond_logprob(const scalar_t* cond, float temperature, int64_t n, int64_t token, float* scaled,
                   float* scratch) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) scaled[i] = static_cast<float>(cond[i]) / temperature;
  const float m = max_of(scaled, n);
  const double total = sum_exp(scaled, m, kNegInf, n, scratch);
  return static_cast<float>(static_cast<double>(scaled[token] - m) - std::log(total));
}

// Top-p threshold: the smallest z value t (among those >= tau) such that the mass of
// strictly larger kept values is < top_p * total; ties in z are kept or dropped together.
// Sorts only the largest candidates, growing the candidate count until the answer is inside.
float top_p_threshold(const float* z, int64_t n, float m, float tau, double top_p, float* work,
                      std::vector<float>& scratch) {
  const double total = sum_exp(z, m, tau, n, work);
  const double target = top_p * total;
  scratch.clear();
  for (int64_t i = 0; i < n; ++i)
    if (z[i] >= tau) scratch.push_back(z[i]);
  const int64_t kept = static_cast<int64_t>(scratch.size());
  int64_t want = std::min<int64_t>(kept, 64);
  while (true) {
    std::nth_element(scratch.begin(), scratch.begin() + (want - 1), scratch.end(),
                     std::greater<float>());
    std::sort(scratch.begin(), scratch.begin() + want, std::greater<float>());
    double above = 0.0;
    float last_kept = scratch[0];
    int64_t i = 0;
    while (i < want) {
      const float v = scratch[i];
      if (!(above < target)) return last_kept;
      last_kept = v;
      while (i < want && scratch[i] == v) above += exp_or_zero(scratch[i++] - m);
    }
    if (want == kept) return last_kept;
    want = std::min<int64_t>(kept, want * 4);
  }
}

template <typename scalar_t>
void cfg_sample_cpu_impl(const at::Tensor& logits, const at::Tensor& seeds, const int64_t* steps,
                         int64_t steps_stride, int64_t step, double guidance_scale,
                         double temperature, int64_t top_k, double top_p, bool interleaved,
                         int64_t batch, int64_t vocab, at::Tensor& tokens, at::Tensor& logprobs,
                         at::Tensor& cond_logprobs) {
  const scalar_t* base = logits.data_ptr<scalar_t>();
  const int64_t row_stride = logits.stride(0);
  const int64_t* seed_ptr = seeds.data_ptr<int64_t>();
  int64_t* token_ptr = tokens.data_ptr<int64_t>();
  float* logprob_ptr = logprobs.data_ptr<float>();
  float* cond_ptr = cond_logprobs.numel() > 0 ? cond_logprobs.data_ptr<float>() : nullptr;
  const float cond_temp = temperature > 0.0 ? static_cast<float>(temperature) : 1.0f;
  const float guidance = static_cast<float>(guidance_scale);
  const float temp = static_cast<float>(temperature);
  const int64_t k = effective_top_k(top_k, vocab);
  const int64_t groups = (vocab + 3) / 4;

  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> z(vocab), key(vocab), scratch;
    std::vector<uint32_t> bits(4 * groups);
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* cond = base + (interleaved ? 2 * b : b) * row_stride;
      const scalar_t* uncond = base + (interleaved ? 2 * b + 1 : batch + b) * row_stride;
      guided_row(cond, uncond, guidance, temp, vocab, z.data());
      const float m = max_of(z.data(), vocab);
      if (!(temp > 0.0f)) {  // greedy: a point mass on the first argmax
        token_ptr[b] = first_index_of(z.data(), vocab, m);
        logprob_ptr[b] = 0.0f;
        if (cond_ptr) cond_ptr[b] = cond_logprob(cond, cond_temp, vocab, token_ptr[b], key.data(), z.data());
        continue;
      }
      float tau = kNegInf;
      if (k > 0) {
        scratch.assign(z.begin(), z.end());
        std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(),
                         std::greater<float>());
        tau = scratch[k - 1];
      }
      if (top_p < 1.0) tau = top_p_threshold(z.data(), vocab, m, tau, top_p, key.data(), scratch);
      const uint64_t seed = static_cast<uint64_t>(seed_ptr[b]);
      const uint64_t row_step = static_cast<uint64_t>(steps ? steps[b * steps_stride] : step);
      philox_row_bits(seed, row_step, static_cast<uint32_t>(groups), bits.data());
      perturbed_keys(z.data(), bits.data(), tau, vocab, key.data());
      const float best = max_of(key.data(), vocab);
      const int64_t tok = first_index_of(key.data(), vocab, best);
      const double total = sum_exp(z.data(), m, tau, vocab, key.data());
      token_ptr[b] = tok;
      logprob_ptr[b] = static_cast<float>(static_cast<double>(z[tok] - m) - std::log(total));
      if (cond_ptr) cond_ptr[b] = cond_logprob(cond, cond_temp, vocab, tok, key.data(), z.data());
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cfg_sample_cpu(const at::Tensor& logits_in,
                                                  const at::Tensor& seeds_in,
                                                  const c10::optional<at::Tensor>& steps_in,
                                                  int64_t step, double guidance_scale,
                                                  double temperature, int64_t top_k, double top_p,
                                                  bool interleaved, bool with_cond) {
  const CfgSampleArgs args = check_cfg_sample_args(logits_in, seeds_in, steps_in, step,
                                                   guidance_scale, temperature, top_k, top_p);
  TORCH_CHECK(logits_in.device().is_cpu(), "cfg_sample (CPU kernel): logits must be on CPU");
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const at::Tensor seeds = seeds_in.contiguous();
  at::Tensor steps;
  if (steps_in.has_value()) steps = steps_in->contiguous();
  auto [tokens, logprobs, cond_logprobs] = allocate_cfg_sample_outputs(logits, args.batch, with_cond);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "cfg_sample_cpu",
                                  [&] {
                                    cfg_sample_cpu_impl<scalar_t>(
                                        logits, seeds,
                                        steps.defined() ? steps.data_ptr<int64_t>() : nullptr,
                                        args.steps_stride, step, guidance_scale, temperature,
                                        top_k, top_p, interleaved, args.batch, args.vocab, tokens,
                                        logprobs, cond_logprobs);
                                  });
  return {tokens, logprobs, cond_logprobs};
}

}  // namespace
}  // namespace cfg
}  // namespace pairuni

TORCH_LIBRARY(pairuni, m) {
  // Classifier-free-guidance sampling of one decode step (see docs/ARCHITECTURE.md):
  // z = (u + guidance_scale * (c - u)) / temperature, top-k, then top-p, one draw per row
  // keyed by (seeds[b], step, token). `steps` (int64, [] or [B], may live on the device)
  // overrides `step` so a captured CUDA graph can advance it in place. `with_cond`: the third
  // output is [B] log softmax(c / T)[token] of the conditional rows (T = 1 when greedy), else [0].
  m.def(
      "cfg_sample(Tensor logits, Tensor seeds, Tensor? steps, int step, float guidance_scale, "
      "float temperature, int top_k, float top_p, bool interleaved, bool with_cond=False) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pairuni, CPU, m) { m.impl("cfg_sample", &pairuni::cfg::cfg_sample_cpu); }

static struct PyModuleDef pairuni_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&pairuni_c_module); }
