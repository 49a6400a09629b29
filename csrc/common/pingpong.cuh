// What the Hopper attention kernels (sage2_sm90, sage3_sm90) share around their wgmma: quad
// reductions over the accumulator's row layout, the output conversion, and the named barriers with
// which consumer warpgroups take turns on the tensor cores.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace sage_cuda {

// The 4 lanes of a quad (lane / 4 equal) hold one accumulator row between them.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  return x + __shfl_xor_sync(0xffffffff, x, 2);
}

template <typename OutT>
__device__ __forceinline__ OutT to_out(float x);
template <>
__device__ __forceinline__ __half to_out<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 to_out<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Named barriers 1, 2, 3 (0 is __syncthreads): the consumer warpgroups take turns on the
// tensor cores (FlashAttention-3's ping-pong), so that one's softmax runs under the other's MMAs.
__device__ __forceinline__ void turn_wait(int consumer) {  // (bar.sync on mine: me + the one before me)
  asm volatile("bar.sync %0, 256;\n" ::"r"(1 + consumer) : "memory");
}
__device__ __forceinline__ void turn_pass(int consumer, int consumers) {  // to the next one, in a ring
  asm volatile("bar.arrive %0, 256;\n" ::"r"(1 + (consumer + 1) % consumers) : "memory");
}

}  // namespace sage_cuda
