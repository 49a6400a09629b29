// Correctly rounded x / c and 1 / x without branches.
//
// The library's __fdiv_rn and __frcp_rn test for a fast path and branch to a slow one on every
// call: in unrolled quantization code each call splits the schedule, and the scales they compute
// become serial latency chains (sage3's P quantization ran 2x slower for it). These forms take
// 2-3 FMAs and give the same bits where the kernels use them; tests check them against
// div.rn / rcp.rn on the GPU for every fp32 input in their domain:
//   div_rn(x, c, 1/c), x >= 0 finite or +inf: the product by fl(1/c) corrected by one FMA of its
//     remainder. Exact for every x with c = 7 (INT4's qmax) and c = 127 (INT8's); with c = 6 (FP4)
//     and c = 448 (E4M3) only where x / c is normal (a subnormal quotient may be one unit off).
//     E4M3's scale of a 16-bit value m, m / 448, is exact as div_rn(m * 2^-6, 7, 1/7).
//   div_rn_finite(x, c, 1/c): the same for finite x (one select fewer).
//   rcp_rn(x): 0 < x <= 2^126, or +inf (-> 0). One Newton step from rcp.approx, subnormal x
//     scaled by 2^64 first (rcp.approx flushes them).
//   rcp_rn_normal(x): 2^-126 <= x <= 2^126 only (one select and two multiplies fewer).
#pragma once

#include <cuda_runtime.h>

namespace sage_cuda {

__device__ __forceinline__ float div_rn_finite(float x, float c, float inv_c) {
  const float q = __fmul_rn(x, inv_c);
  return __fmaf_rn(__fmaf_rn(-q, c, x), inv_c, q);
}

__device__ __forceinline__ float div_rn(float x, float c, float inv_c) {
  const float r = div_rn_finite(x, c, inv_c);
  return x == __builtin_huge_valf() ? x : r;  // inf - inf in the remainder would make a NaN
}

__device__ __forceinline__ float rcp_rn_normal(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return __fmaf_rn(__fmaf_rn(-x, y, 1.f), y, y);
}

__device__ __forceinline__ float rcp_rn(float x) {
  const bool tiny = x < 0x1p-126f;
  const float y = rcp_rn_normal(tiny ? x * 0x1p64f : x);  // exact scalings
  return x == __builtin_huge_valf() ? 0.f : (tiny ? y * 0x1p64f : y);
}

}  // namespace sage_cuda
