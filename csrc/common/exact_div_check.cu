// The branch-free divisions of exact_div.cuh against the library's div.rn / rcp.rn, for every fp32
// input in a range of bit patterns (tests/test_decode_cuda.py runs it over their whole domains).
#include "exact_div.cuh"
#include "launch.h"

namespace sage_cuda {
namespace {

// x / 6 (normal quotients), x / 7, x / 127, x / 448 as (x * 2^-6) / 7 (where x * 2^-6 is exact: every
// 16-bit value), rcp_rn (x <= 2^126 and +inf), rcp_rn_normal (2^-126 <= x <= 2^126)
constexpr int kChecks = 6;

__global__ void exact_div_check_kernel(uint32_t lo, uint32_t hi, unsigned long long* counts, unsigned int* first) {
  unsigned long long bad[kChecks] = {};
  for (uint64_t bits = uint64_t(lo) + blockIdx.x * blockDim.x + threadIdx.x; bits <= hi;
       bits += uint64_t(gridDim.x) * blockDim.x) {
    const float x = __uint_as_float(uint32_t(bits));
    bool differs[kChecks];
    const float q6 = __fdiv_rn(x, 6.f), x64 = x * 0x1p-6f;
    differs[0] = q6 >= 0x1p-126f && __float_as_uint(div_rn(x, 6.f, 1.f / 6.f)) != __float_as_uint(q6);
    differs[1] = __float_as_uint(div_rn(x, 7.f, 1.f / 7.f)) != __float_as_uint(__fdiv_rn(x, 7.f));
    differs[2] = __float_as_uint(div_rn(x, 127.f, 1.f / 127.f)) != __float_as_uint(__fdiv_rn(x, 127.f));
    differs[3] = x64 * 64.f == x && __float_as_uint(div_rn(x64, 7.f, 1.f / 7.f)) != __float_as_uint(__fdiv_rn(x, 448.f));
    const float r = __frcp_rn(x);
    differs[4] = x > 0.f && x <= 0x1p126f && __float_as_uint(rcp_rn(x)) != __float_as_uint(r);
    differs[5] = x >= 0x1p-126f && x <= 0x1p126f && __float_as_uint(rcp_rn_normal(x)) != __float_as_uint(r);
    if (x == __builtin_huge_valf()) differs[4] = rcp_rn(x) != 0.f;
#pragma unroll
    for (int i = 0; i < kChecks; ++i) {
      if (differs[i]) {
        ++bad[i];
        atomicMin(first + i, uint32_t(bits));
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kChecks; ++i)
    if (bad[i]) atomicAdd(counts + i, bad[i]);
}

}  // namespace

void exact_div_mismatches(uint32_t lo_bits, uint32_t hi_bits, uint64_t (&counts)[kChecks], uint32_t (&first)[kChecks],
                          cudaStream_t stream) {
  run_mismatch_check(
      [&](unsigned long long* c, unsigned int* f) { exact_div_check_kernel<<<1024, 256, 0, stream>>>(lo_bits, hi_bits, c, f); },
      "exact_div check", counts, first, stream);
}

}  // namespace sage_cuda
