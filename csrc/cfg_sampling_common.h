// The random stream and the noise of the CFG sampler, shared by the CPU kernel
// (cfg_sampling.cpp) and the CUDA templates (cfg_sampling.cuh). Torch-free.
//
// Definition (the reference `pairuni_kernels.reference.cfg_sample` implements the same
// arithmetic with torch ops, so all three draw the same token where floating point allows):
//
//   bits(seed, step, i)  = Philox4x32-10(counter = (i >> 2, i >> 34, step_lo, step_hi),
//                                        key = (seed_lo, seed_hi))[i & 3]
//   u                    = (2 * (bits >> 9) + 1) * 2^-24     in (0, 1), exact in fp32
//   gumbel               = -log(-log(u))                     in [-2.81, 16.64]
//   token                = argmax_{i in kept set} z_i + gumbel_i   (first index on ties)
//
// `log` is the polynomial below, evaluated with plain IEEE fp32 multiply/add/divide
// (never contracted into FMA), so that torch, C++ and CUDA compute bit-identical noise.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define PAIRUNI_HD __host__ __device__ __forceinline__
#else
#define PAIRUNI_HD inline
#endif

namespace pairuni {
namespace cfg {

// Philox4x32-10 constants (Salmon et al., SC'11; Random123).
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

// log(x) = e*ln2 + 2*atanh(s), s = (m-1)/(m+1), m in [sqrt(1/2), sqrt(2)); |s| <= 0.1716,
// so the series truncated after s^9 is exact to ~1e-9 relative.
constexpr float kLn2Hi = 0.693145751953125f;       // 0x3F317200: e*kLn2Hi is exact for |e| < 2^11
constexpr float kLn2Lo = 1.428606765330187e-06f;   // ln2 - kLn2Hi
constexpr float kInv3 = 0.3333333432674408f;
constexpr float kInv5 = 0.20000000298023224f;
constexpr float kInv7 = 0.1428571492433548f;
constexpr float kInv9 = 0.1111111119389534f;
constexpr uint32_t kSqrt2Bits = 0x3FB504F3u;        // bits of sqrt(2) in fp32

struct Philox4 {
  uint32_t x[4];
};

PAIRUNI_HD void mul_hi_lo(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  *lo = a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
#endif
}

PAIRUNI_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                 uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mul_hi_lo(kPhiloxM0, c0, &hi0, &lo0);
    mul_hi_lo(kPhiloxM1, c2, &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  Philox4 out;
  out.x[0] = c0;
  out.x[1] = c1;
  out.x[2] = c2;
  out.x[3] = c3;
  return out;
}

// The four random words for tokens [4*group, 4*group + 4) of one (seed, step).
PAIRUNI_HD Philox4 token_bits4(uint64_t seed, uint64_t step, uint64_t group) {
  return philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32),
                       static_cast<uint32_t>(step), static_cast<uint32_t>(step >> 32),
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// IEEE fp32 operations that the CUDA compiler may not contract or approximate
// (the build uses --use_fast_math); on the host plain operators (the CPU sources
// are compiled without FMA contraction).
#if defined(__CUDA_ARCH__)
#define PAIRUNI_FADD(a, b) __fadd_rn((a), (b))
#define PAIRUNI_FSUB(a, b) __fsub_rn((a), (b))
#define PAIRUNI_FMUL(a, b) __fmul_rn((a), (b))
#define PAIRUNI_FDIV(a, b) __fdiv_rn((a), (b))
#else
#define PAIRUNI_FADD(a, b) ((a) + (b))
#define PAIRUNI_FSUB(a, b) ((a) - (b))
#define PAIRUNI_FMUL(a, b) ((a) * (b))
#define PAIRUNI_FDIV(a, b) ((a) / (b))
#endif

PAIRUNI_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

PAIRUNI_HD float bits_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
#endif
}

// Natural log of a positive normal float (the only inputs the sampler produces).
PAIRUNI_HD float log_positive(float x) {
  const uint32_t b = float_bits(x);
  int32_t e = static_cast<int32_t>((b >> 23) & 0xFFu) - 127;
  uint32_t mb = (b & 0x007FFFFFu) | 0x3F800000u;  // m in [1, 2)
  const uint32_t above = mb > kSqrt2Bits ? 1u : 0u;  // m in (sqrt2, 2) -> m/2, e+1 (branch-free)
  mb -= above << 23;
  e += static_cast<int32_t>(above);
  const float m = bits_float(mb);
  const float s = PAIRUNI_FDIV(PAIRUNI_FSUB(m, 1.0f), PAIRUNI_FADD(m, 1.0f));
  const float s2 = PAIRUNI_FMUL(s, s);
  float t = kInv9;
  t = PAIRUNI_FADD(PAIRUNI_FMUL(t, s2), kInv7);
  t = PAIRUNI_FADD(PAIRUNI_FMUL(t, s2), kInv5);
  t = PAIRUNI_FADD(PAIRUNI_FMUL(t, s2), kInv3);
  t = PAIRUNI_FMUL(t, s2);
  const float two_s = PAIRUNI_FADD(s, s);
  const float log_m = PAIRUNI_FADD(two_s, PAIRUNI_FMUL(two_s, t));
  const float ef = static_cast<float>(e);
  return PAIRUNI_FADD(PAIRUNI_FADD(log_m, PAIRUNI_FMUL(ef, kLn2Lo)), PAIRUNI_FMUL(ef, kLn2Hi));
}

// Uniform in (0, 1) from the top 23 bits: odd multiples of 2^-24, all exact in fp32.
PAIRUNI_HD float uniform_open(uint32_t bits) {
  const int32_t odd = static_cast<int32_t>(((bits >> 9) << 1) | 1u);
  return PAIRUNI_FMUL(static_cast<float>(odd), 5.9604644775390625e-08f);  // 2^-24
}

// Standard Gumbel noise -log(-log(u)); adding it to logits and taking the argmax
// draws from the softmax (the Gumbel-max trick, equivalently an exponential race).
PAIRUNI_HD float gumbel_from_bits(uint32_t bits) {
  const float u = uniform_open(bits);
  return -log_positive(-log_positive(u));
}

// Order-preserving map float -> uint32 (larger float, larger key); used by pivot searches.
PAIRUNI_HD uint32_t ordered_key(float x) {
  const uint32_t b = float_bits(x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// The guided, tempered logit: z = (u + g * (c - u)) / T  (T > 0), or the guided logit
// itself when T == 0 (greedy). Each operation rounds once, in this order.
PAIRUNI_HD float guided_logit(float cond, float uncond, float guidance, float temperature) {
  const float guided = PAIRUNI_FADD(uncond, PAIRUNI_FMUL(guidance, PAIRUNI_FSUB(cond, uncond)));
  return temperature > 0.0f ? PAIRUNI_FDIV(guided, temperature) : guided;
}

}  // namespace cfg
}  // namespace pairuni
