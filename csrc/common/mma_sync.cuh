// Warp-level building blocks (sm_80+): cp.async copies, ldmatrix, mma.sync, and the exact
// conversions the quantizers need. Thin wrappers over PTX, one instruction each.
#pragma once
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/hopper.cuh"

namespace sage_cuda {

// ---- cp.async: global -> shared (dst: a shared-space address) without registers, L2 fetching
// 256-byte sectors (streams of whole rows). The decode kernel's copies before it moved to TMA; kept
// for experiments/copy_floor, which times that pattern against TMA ----
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ---- ldmatrix: four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i ----
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
}

// ---- mma.sync: D = A B + D. Fragments as in the PTX ISA (group g = lane / 4, t = lane % 4) ----
// INT8 m16n8k32: A rows {g, g+8} x k {4t..4t+3, 16+4t..}; B k {4t.., 16+4t..} x n g; D rows {g, g+8} x n {2t, 2t+1}
__device__ __forceinline__ void mma_s8_16832(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// FP16 m16n8k16 with an fp32 accumulator
__device__ __forceinline__ void mma_f16_16816_f32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// BF16 m16n8k16 with an fp32 accumulator
__device__ __forceinline__ void mma_bf16_16816_f32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// FP16 m16n8k16 with an fp16 accumulator (SageAttention's FP16-accumulated P V): d = {row g, row g+8}
__device__ __forceinline__ void mma_f16_16816_f16(uint32_t (&d)[2], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f16.f16.f16.f16 {%0, %1}, {%2, %3, %4, %5}, {%6, %7}, {%0, %1};\n"
      : "+r"(d[0]), "+r"(d[1])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---- exact conversions ----
// round to nearest even, as an integer in [-2^22, 2^22): adding 1.5 * 2^23 leaves round(x) in the
// low mantissa bits (the add rounds to nearest even); __fadd_rn keeps it from fusing with a multiply
__device__ __forceinline__ int round_even(float x) { return __float_as_int(__fadd_rn(x, 12582912.f)) - 0x4B400000; }
// The same rounding, as raw bits: the low byte is round(x) as an int8 (the magic's low byte is 0)
__device__ __forceinline__ uint32_t round_even_bits(float x) { return __float_as_uint(__fadd_rn(x, 12582912.f)); }
// the low bytes of four words -> one word, r0 in the lowest byte (three byte permutes)
__device__ __forceinline__ uint32_t pack_low_bytes(uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
  return __byte_perm(__byte_perm(r0, r1, 0x0040), __byte_perm(r2, r3, 0x0040), 0x5410);
}
// (x0, x1) rounded to FP8 E4M3 (nearest even, saturating) and back, as an fp16 pair (exact)
__device__ __forceinline__ uint32_t e4m3_round_trip_f16x2(float x0, float x1) {
  uint16_t e;
  uint32_t h;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(e) : "f"(x1), "f"(x0));
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;\n" : "=r"(h) : "h"(e));
  return h;
}
__device__ __forceinline__ uint32_t f16x2_rn(float x0, float x1) {
  __half2 h = __floats2half2_rn(x0, x1);
  return *reinterpret_cast<uint32_t*>(&h);
}

// 16-bit inputs (fp16 or bf16) to fp32
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename In>
__device__ __forceinline__ float2 pair_to_float2(uint32_t u);
template <>
__device__ __forceinline__ float2 pair_to_float2<__half>(uint32_t u) {
  return __half22float2(*reinterpret_cast<__half2*>(&u));
}
template <>
__device__ __forceinline__ float2 pair_to_float2<__nv_bfloat16>(uint32_t u) {
  return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&u));
}

}  // namespace sage_cuda
