// The quantization arithmetic of the Triton passes (common/triton_quant.py), value for value, for the
// CUDA kernels that quantize themselves: the in-kernel Q of csrc/sage2_sm90/attention.cu and the
// one-read K/V pass of csrc/sage2_sm90/kv_pass.cu. Same inputs, same bits (tests compare them).
#pragma once
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace sage_cuda {

// two packed 16-bit values (the low one first) as fp32
template <typename InT>
__device__ __forceinline__ float2 to_float2(uint32_t word);
template <>
__device__ __forceinline__ float2 to_float2<__half>(uint32_t word) {
  return __half22float2(*reinterpret_cast<const __half2*>(&word));
}
template <>
__device__ __forceinline__ float2 to_float2<__nv_bfloat16>(uint32_t word) {
  return make_float2(__uint_as_float(word << 16), __uint_as_float(word & 0xffff0000u));
}

// x / scale correctly rounded, as common.triton_quant.div_by_scale: the product by inv = RN(1 / scale)
// and two FMA corrections of its remainder (exact wherever the quotient is above 2^-41, i.e. for
// every nonzero INT8/INT4/E4M3 code). x and scale come already multiplied by the pass's factor (2^64
// for a scale below 2^-60). The quotient takes x's sign, so x = -0 gives -0 (FP8 keeps the sign of
// a zero; for x != 0 the sign is the quotient's already).
__device__ __forceinline__ float div_by_scale(float x, float scale, float inv) {
  float q = x * inv;
  q = fmaf(fmaf(-q, scale, x), inv, q);
  q = fmaf(fmaf(-q, scale, x), inv, q);
  return copysignf(q, x);
}

// round(x / scale) half away from zero, clamped to [-qmax, qmax], as the Triton pass computes it:
// the quotient above, then +-0.5 and truncation; the code's byte (two's complement)
__device__ __forceinline__ uint32_t int_code(float x, float scale, float inv, float qmax) {
  float q = x * inv;
  q = fmaf(fmaf(-q, scale, x), inv, q);
  q = fmaf(fmaf(-q, scale, x), inv, q);
  q = __fadd_rn(q, copysignf(0.5f, q));  // (-0 gives -0.5 where the pass gives +0.5: code 0 either way)
  return uint32_t(__float2int_rz(fminf(fmaxf(q, -qmax), qmax))) & 0xffu;
}

// int_code without the clamp, where |x / scale| cannot round past qmax + 1/2: scale = RN(max / qmax)
// over finite values and normal (a subnormal scale has too few bits: callers take int_code for
// scales below 2^-60), so the quotient is at most qmax (1 + 2^-23)
__device__ __forceinline__ uint32_t int_code_unclamped(float x, float scale, float inv) {
  float q = x * inv;
  q = fmaf(fmaf(-q, scale, x), inv, q);
  q = fmaf(fmaf(-q, scale, x), inv, q);
  q = __fadd_rn(q, copysignf(0.5f, q));
  return uint32_t(__float2int_rz(q)) & 0xffu;
}

// The pass's divisor for a scale: 1 where the scale is 0, times 2^64 below 2^-60 (so that 1 / scale
// does not overflow; x is multiplied by the same factor, both exactly)
struct Divisor {
  float factor, scale, inv;
  __device__ __forceinline__ explicit Divisor(float s) {
    s = s == 0.f ? 1.f : s;
    factor = s < 8.673617379884035e-19f ? 1.8446744073709552e19f : 1.f;
    scale = s * factor;
    inv = __frcp_rn(scale);
  }
};

}  // namespace sage_cuda
