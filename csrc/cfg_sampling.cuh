// Classifier-free-guidance sampling of one decode step: torch-free CUDA templates.
//
//   z = (u + g * (c - u)) / T, top-k, then top-p, one Gumbel-max draw per row, and the
//   log-probability of the drawn token under the final distribution (see docs/ARCHITECTURE.md);
//   optionally the conditional branch's log softmax(c / T)[token] (T = 1 when greedy), whose
//   online max / sum ride along in the same pass over the row.
//
// One kernel per call, no host synchronisation, no allocation: capturable in a CUDA graph.
// Two kernels, chosen on the host from the arguments only:
//   * CfgSampleSplitKernel (no top-k / top-p, or greedy): grid (B, chunks). Small batches
//     split the vocabulary across blocks so the whole GPU works. Every block reduces its
//     chunk to a partial (online softmax max/sum, best perturbed key); the last block of a
//     row to arrive (atomic ticket) merges the partials in chunk order, deterministically.
//   * CfgSampleFilteredKernel (top-k and/or top-p): one block per row. Thresholds are found
//     by pivot search (bisection over the order-preserving 32-bit image of z: 32 counting
//     passes for top-k, 32 mass passes for top-p), never by sorting; ties at a threshold
//     are kept together. Passes re-read the row, which stays in L2.
//
// The noise is `gumbel_from_bits` of a Philox4x32-10 stream keyed by (seed, step, token)
// (cfg_sampling_common.h), evaluated with round-to-nearest intrinsics, so it is bit-equal
// to the CPU kernel's and the torch reference's.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cfg_sampling_common.h"

namespace pairuni {
namespace cfg {

struct CfgSampleParams {
  const void* logits;       // [2B, V], unit stride along V, `row_stride` elements between rows
  int64_t row_stride;
  const int64_t* seeds;     // [B]
  const int64_t* steps;     // nullptr: every row uses `step`; else steps[b * steps_stride]
  int64_t steps_stride;     // 0 or 1
  uint64_t step;
  int64_t batch;            // B
  int64_t vocab;            // V
  float guidance;
  float temperature;        // 0: greedy
  int64_t top_k;            // 0: off (k >= V must be passed as 0)
  float top_p;              // 1: off
  bool interleaved;         // rows [c0, u0, c1, u1, ...] instead of [c0..c_{B-1}, u0..u_{B-1}]
  int64_t* tokens;          // [B] out
  float* logprobs;          // [B] out
  float* cond_logprobs;     // [B] out, or nullptr: no conditional log-prob
  void* partials;           // split kernel with chunks > 1: CfgSamplePartialBytes(B, chunks) bytes
  unsigned int* arrivals;   // split kernel with chunks > 1: [B] zeros before the launch (reset by the kernel)
  int chunks;               // split kernel: blocks per row (from CfgSampleChunks)
};

// Reduction state of a set of tokens: online-softmax (max, sum of exp(z - max)) and the
// argmax of the perturbed key, the first index on ties.
struct CfgPartial {
  float max;
  float sum;
  float cond_max;  // online softmax of the conditional row c / T (when cond_logprobs is wanted)
  float cond_sum;
  float best_key;
  float best_z;
  float best_cond;  // c / T at best_index
  int64_t best_index;
};
static_assert(sizeof(CfgPartial) == 40, "CfgPartial layout changed: check CfgSamplePartialBytes users");

constexpr int kSplitThreads = 128;
constexpr int kFilteredThreads = 512;
constexpr int kTokensPerThread = 4;  // one Philox call gives the words of 4 consecutive tokens

inline bool CfgSampleIsFiltered(const CfgSampleParams& p) {
  return p.temperature > 0.0f && (p.top_k > 0 || p.top_p < 1.0f);
}

// Blocks per row for the split kernel: about two waves of blocks over the GPU, each block
// with at least one 4-token group per thread.
inline int CfgSampleChunks(int64_t batch, int64_t vocab, int num_sms) {
  const int64_t max_chunks = (vocab + kSplitThreads * kTokensPerThread - 1) / (kSplitThreads * kTokensPerThread);
  const int64_t wanted = (2 * static_cast<int64_t>(num_sms) + batch - 1) / batch;
  int64_t chunks = wanted < max_chunks ? wanted : max_chunks;
  if (chunks > 1024) chunks = 1024;
  return static_cast<int>(chunks < 1 ? 1 : chunks);
}

inline size_t CfgSamplePartialBytes(int64_t batch, int chunks) {
  return static_cast<size_t>(batch) * static_cast<size_t>(chunks) * sizeof(CfgPartial);
}

namespace detail {

constexpr float kInf = __builtin_huge_valf();

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ void partial_init(CfgPartial& s) {
  s.max = -kInf;
  s.sum = 0.0f;
  s.cond_max = -kInf;
  s.cond_sum = 0.0f;
  s.best_key = -kInf;
  s.best_z = -kInf;
  s.best_cond = -kInf;
  s.best_index = INT64_MAX;
}

__device__ __forceinline__ void online_add(float& max, float& sum, float x) {
  if (x > max) {
    sum = (max == -kInf ? 0.0f : sum * __expf(max - x)) + 1.0f;
    max = x;
  } else {
    sum += __expf(x - max);
  }
}

__device__ __forceinline__ void online_merge(float& max, float& sum, float other_max, float other_sum) {
  const float m = max > other_max ? max : other_max;
  if (m == -kInf) return;
  const float sa = max == -kInf ? 0.0f : sum * __expf(max - m);
  const float sb = other_max == -kInf ? 0.0f : other_sum * __expf(other_max - m);
  sum = sa + sb;
  max = m;
}

__device__ __forceinline__ void partial_add(CfgPartial& s, float z, float key, float cond, int64_t index,
                                            bool with_sum) {
  if (with_sum) online_add(s.max, s.sum, z);
  if (key > s.best_key || (key == s.best_key && index < s.best_index)) {
    s.best_key = key;
    s.best_z = z;
    s.best_cond = cond;
    s.best_index = index;
  }
}

__device__ __forceinline__ void partial_merge(CfgPartial& a, const CfgPartial& b) {
  online_merge(a.max, a.sum, b.max, b.sum);
  online_merge(a.cond_max, a.cond_sum, b.cond_max, b.cond_sum);
  if (b.best_key > a.best_key || (b.best_key == a.best_key && b.best_index < a.best_index)) {
    a.best_key = b.best_key;
    a.best_z = b.best_z;
    a.best_cond = b.best_cond;
    a.best_index = b.best_index;
  }
}

__device__ __forceinline__ CfgPartial partial_shfl_xor(const CfgPartial& s, int lane_mask) {
  CfgPartial o;
  o.max = __shfl_xor_sync(0xFFFFFFFFu, s.max, lane_mask);
  o.sum = __shfl_xor_sync(0xFFFFFFFFu, s.sum, lane_mask);
  o.cond_max = __shfl_xor_sync(0xFFFFFFFFu, s.cond_max, lane_mask);
  o.cond_sum = __shfl_xor_sync(0xFFFFFFFFu, s.cond_sum, lane_mask);
  o.best_cond = __shfl_xor_sync(0xFFFFFFFFu, s.best_cond, lane_mask);
  o.best_key = __shfl_xor_sync(0xFFFFFFFFu, s.best_key, lane_mask);
  o.best_z = __shfl_xor_sync(0xFFFFFFFFu, s.best_z, lane_mask);
  o.best_index = __shfl_xor_sync(0xFFFFFFFFu, static_cast<long long>(s.best_index), lane_mask);
  return o;
}

// Block-wide merge; the result is valid in thread 0. Deterministic order.
template <int kThreads>
__device__ __forceinline__ CfgPartial block_merge(CfgPartial s) {
  __shared__ CfgPartial warp_state[kThreads / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) partial_merge(s, partial_shfl_xor(s, offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_state[warp] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kThreads / 32; ++w) partial_merge(s, warp_state[w]);
  }
  return s;
}

// Block-wide sum / max / count, result broadcast to every thread. Deterministic order.
template <int kThreads, typename V, typename Op>
__device__ __forceinline__ V block_all_reduce(V v, Op op, V* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xFFFFFFFFu, v, offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  V total = scratch[0];
  for (int w = 1; w < kThreads / 32; ++w) total = op(total, scratch[w]);
  return total;
}

struct SumOp {
  template <typename V>
  __device__ __forceinline__ V operator()(V a, V b) const { return a + b; }
};
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a > b ? a : b; }
};

struct RowView {
  int64_t cond_row;
  int64_t uncond_row;
  uint64_t seed;
  uint64_t step;
};

__device__ __forceinline__ RowView row_view(const CfgSampleParams& p, int64_t b) {
  RowView r;
  r.cond_row = p.interleaved ? 2 * b : b;
  r.uncond_row = p.interleaved ? 2 * b + 1 : p.batch + b;
  r.seed = static_cast<uint64_t>(p.seeds[b]);
  r.step = p.steps != nullptr ? static_cast<uint64_t>(p.steps[b * p.steps_stride]) : p.step;
  return r;
}

// z: guided, tempered logits of the group's tokens (-inf past V); c: the conditional logits
// over the scoring temperature (T, or 1 when greedy), computed only when `with_cond`.
template <typename T>
__device__ __forceinline__ void load_group(const CfgSampleParams& p, const RowView& r, int64_t group,
                                           float (&z)[kTokensPerThread], float (&c)[kTokensPerThread],
                                           int& count, bool with_cond) {
  const T* logits = static_cast<const T*>(p.logits);
  const T* cond = logits + r.cond_row * p.row_stride;
  const T* uncond = logits + r.uncond_row * p.row_stride;
  const int64_t first = group * kTokensPerThread;
  const int64_t left = p.vocab - first;
  count = left < kTokensPerThread ? static_cast<int>(left) : kTokensPerThread;
#pragma unroll
  for (int j = 0; j < kTokensPerThread; ++j) {
    const float cj = j < count ? to_float(__ldg(cond + first + j)) : 0.0f;
    z[j] = j < count ? guided_logit(cj, to_float(__ldg(uncond + first + j)), p.guidance, p.temperature) : -kInf;
    c[j] = with_cond && j < count ? PAIRUNI_FDIV(cj, p.temperature > 0.0f ? p.temperature : 1.0f) : -kInf;
  }
}

template <typename T>
__device__ __forceinline__ void load_group(const CfgSampleParams& p, const RowView& r, int64_t group,
                                           float (&z)[kTokensPerThread], int& count) {
  float c[kTokensPerThread];
  load_group<T>(p, r, group, z, c, count, false);
}

__device__ __forceinline__ void write_result(const CfgSampleParams& p, int64_t b, const CfgPartial& s) {
  p.tokens[b] = s.best_index;
  p.logprobs[b] = p.temperature > 0.0f ? (s.best_z - s.max) - __logf(s.sum) : 0.0f;
  if (p.cond_logprobs != nullptr) p.cond_logprobs[b] = (s.best_cond - s.cond_max) - __logf(s.cond_sum);
}

}  // namespace detail

// grid (B, chunks), kSplitThreads threads. No top-k / top-p (or greedy).
template <typename T>
__global__ void __launch_bounds__(kSplitThreads) CfgSampleSplitKernel(const CfgSampleParams p) {
  using namespace detail;
  const int64_t b = blockIdx.x;
  const int chunk = blockIdx.y;
  const RowView r = row_view(p, b);
  const bool sampled = p.temperature > 0.0f;
  const bool with_cond = p.cond_logprobs != nullptr;
  const int64_t groups = (p.vocab + kTokensPerThread - 1) / kTokensPerThread;
  const int64_t per_chunk = (groups + p.chunks - 1) / p.chunks;
  const int64_t g_begin = chunk * per_chunk;
  const int64_t g_end = g_begin + per_chunk < groups ? g_begin + per_chunk : groups;

  CfgPartial s;
  partial_init(s);
  for (int64_t g = g_begin + threadIdx.x; g < g_end; g += kSplitThreads) {
    float z[kTokensPerThread], c[kTokensPerThread];
    int count;
    load_group<T>(p, r, g, z, c, count, with_cond);
    Philox4 words;
    if (sampled) words = token_bits4(r.seed, r.step, static_cast<uint64_t>(g));
#pragma unroll
    for (int j = 0; j < kTokensPerThread; ++j) {
      if (j < count) {
        const float key = sampled ? PAIRUNI_FADD(z[j], gumbel_from_bits(words.x[j])) : z[j];
        partial_add(s, z[j], key, c[j], g * kTokensPerThread + j, sampled);
        if (with_cond) online_add(s.cond_max, s.cond_sum, c[j]);
      }
    }
  }
  s = block_merge<kSplitThreads>(s);
  if (threadIdx.x != 0) return;
  if (p.chunks == 1) {
    write_result(p, b, s);
    return;
  }
  CfgPartial* partials = static_cast<CfgPartial*>(p.partials) + b * p.chunks;
  partials[chunk] = s;
  __threadfence();  // publish the partial before taking a ticket
  const unsigned int ticket = atomicAdd(p.arrivals + b, 1u);
  if (ticket != static_cast<unsigned int>(p.chunks - 1)) return;
  __threadfence();  // the last block sees every other block's partial
  const volatile CfgPartial* all = partials;
  CfgPartial total;
  partial_init(total);
  for (int c = 0; c < p.chunks; ++c) {  // chunk order: the same result whoever arrives last
    CfgPartial q;
    q.max = all[c].max;
    q.sum = all[c].sum;
    q.cond_max = all[c].cond_max;
    q.cond_sum = all[c].cond_sum;
    q.best_cond = all[c].best_cond;
    q.best_key = all[c].best_key;
    q.best_z = all[c].best_z;
    q.best_index = all[c].best_index;
    partial_merge(total, q);
  }
  write_result(p, b, total);
  p.arrivals[b] = 0u;  // ready for the next launch (and for CUDA-graph replays)
}

// grid (B), kFilteredThreads threads. Top-k and/or top-p with temperature > 0.
template <typename T>
__global__ void __launch_bounds__(kFilteredThreads) CfgSampleFilteredKernel(const CfgSampleParams p) {
  using namespace detail;
  __shared__ float fscratch[kFilteredThreads / 32];
  __shared__ unsigned int uscratch[kFilteredThreads / 32];
  const int64_t b = blockIdx.x;
  const RowView r = row_view(p, b);
  const int64_t groups = (p.vocab + kTokensPerThread - 1) / kTokensPerThread;

  // Row maximum of z.
  float m = -kInf;
  for (int64_t g = threadIdx.x; g < groups; g += kFilteredThreads) {
    float z[kTokensPerThread];
    int count;
    load_group<T>(p, r, g, z, count);
#pragma unroll
    for (int j = 0; j < kTokensPerThread; ++j) m = z[j] > m ? z[j] : m;
  }
  m = block_all_reduce<kFilteredThreads>(m, MaxOp(), fscratch);

  // Top-k: the largest 32-bit key t with #{ordered_key(z) >= t} >= k is the k-th largest key.
  uint32_t tau = 0u;
  if (p.top_k > 0) {
    uint64_t lo = 0u, hi = 0x100000000ull;  // count(>= lo) >= k, count(>= hi) < k
    while (hi - lo > 1) {
      const uint64_t mid = (lo + hi) / 2;
      unsigned int cnt = 0;
      for (int64_t g = threadIdx.x; g < groups; g += kFilteredThreads) {
        float z[kTokensPerThread];
        int count;
        load_group<T>(p, r, g, z, count);
#pragma unroll
        for (int j = 0; j < kTokensPerThread; ++j) cnt += (j < count && ordered_key(z[j]) >= mid) ? 1u : 0u;
      }
      cnt = block_all_reduce<kFilteredThreads>(cnt, SumOp(), uscratch);
      if (static_cast<int64_t>(cnt) >= p.top_k) lo = mid; else hi = mid;
    }
    tau = static_cast<uint32_t>(lo);
  }

  // Top-p: the smallest key t >= tau whose strictly-larger kept mass is < top_p * total.
  if (p.top_p < 1.0f) {
    float total = 0.0f;
    for (int64_t g = threadIdx.x; g < groups; g += kFilteredThreads) {
      float z[kTokensPerThread];
      int count;
      load_group<T>(p, r, g, z, count);
#pragma unroll
      for (int j = 0; j < kTokensPerThread; ++j)
        total += (j < count && ordered_key(z[j]) >= tau) ? __expf(z[j] - m) : 0.0f;
    }
    total = block_all_reduce<kFilteredThreads>(total, SumOp(), fscratch);
    const float target = p.top_p * total;
    int64_t lo = static_cast<int64_t>(tau) - 1;  // mass above lo = total: not < target
    int64_t hi = 0xFFFFFFFFll;                   // mass above hi = 0 < target
    while (hi - lo > 1) {
      const int64_t mid = lo + (hi - lo) / 2;
      float above = 0.0f;
      for (int64_t g = threadIdx.x; g < groups; g += kFilteredThreads) {
        float z[kTokensPerThread];
        int count;
        load_group<T>(p, r, g, z, count);
#pragma unroll
        for (int j = 0; j < kTokensPerThread; ++j) {
          const uint32_t key = ordered_key(z[j]);
          above += (j < count && key >= tau && static_cast<int64_t>(key) > mid) ? __expf(z[j] - m) : 0.0f;
        }
      }
      above = block_all_reduce<kFilteredThreads>(above, SumOp(), fscratch);
      if (above < target) hi = mid; else lo = mid;
    }
    tau = static_cast<uint32_t>(hi);
  }

  // The draw over {ordered_key(z) >= tau}; the conditional softmax runs over every token.
  const bool with_cond = p.cond_logprobs != nullptr;
  CfgPartial s;
  partial_init(s);
  for (int64_t g = threadIdx.x; g < groups; g += kFilteredThreads) {
    float z[kTokensPerThread], c[kTokensPerThread];
    int count;
    load_group<T>(p, r, g, z, c, count, with_cond);
    const Philox4 words = token_bits4(r.seed, r.step, static_cast<uint64_t>(g));
#pragma unroll
    for (int j = 0; j < kTokensPerThread; ++j) {
      if (j < count && ordered_key(z[j]) >= tau)
        partial_add(s, z[j], PAIRUNI_FADD(z[j], gumbel_from_bits(words.x[j])), c[j], g * kTokensPerThread + j,
                    true);
      if (with_cond && j < count) online_add(s.cond_max, s.cond_sum, c[j]);
    }
  }
  s = block_merge<kFilteredThreads>(s);
  if (threadIdx.x == 0) write_result(p, b, s);
}

// Launches the kernel for `p` on `stream`. For the split kernel with p.chunks > 1 the
// caller provides `partials` and zeroed `arrivals`. Returns the launch error, if any.
template <typename T>
cudaError_t CfgSample(const CfgSampleParams& p, cudaStream_t stream) {
  if (p.batch == 0) return cudaSuccess;
  if (CfgSampleIsFiltered(p)) {
    CfgSampleFilteredKernel<T><<<dim3(static_cast<unsigned int>(p.batch)), kFilteredThreads, 0, stream>>>(p);
  } else {
    if (p.chunks < 1 || (p.chunks > 1 && (p.partials == nullptr || p.arrivals == nullptr))) return cudaErrorInvalidValue;
    CfgSampleSplitKernel<T>
        <<<dim3(static_cast<unsigned int>(p.batch), static_cast<unsigned int>(p.chunks)), kSplitThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace cfg
}  // namespace pairuni
