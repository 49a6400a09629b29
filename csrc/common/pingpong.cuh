// What the Hopper attention kernels (sage2_sm90, sage3_sm90) share around their wgmma: the tiles a
// CTA visits, quad reductions over the accumulator's row layout, the output conversion, and the named
// barriers with which consumer warpgroups take turns on the tensor cores.
#pragma once
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace sage_cuda {

// The KV tiles of one work tile: BLOCK_M query rows of one query head. Work tiles are numbered
// row block fastest (tile = x + m_blocks * (batch * heads_q index)), so that CTAs running at once
// share a head's K and V in L2; causal runs each head's longest rows first (x counts from the last
// row block). Causal is bottom-right (row i sees keys j <= i + seqlen_k - seqlen_q). Tiles before
// n_unmasked need no mask for any row of the work tile.
struct CtaTiles {
  int m_block, bh, b, h, kv_bh, q_offset, n_tiles, n_unmasked;
};
template <int BLOCK_M, int BLOCK_N, bool CAUSAL>
__device__ __forceinline__ CtaTiles work_tile(int tile, int m_blocks, int heads_q, int heads_kv, int seqlen_q,
                                              int seqlen_k) {
  CtaTiles c;
  const int x = tile % m_blocks;
  c.m_block = CAUSAL ? m_blocks - 1 - x : x;
  c.bh = tile / m_blocks;
  c.b = c.bh / heads_q, c.h = c.bh % heads_q;
  c.kv_bh = c.b * heads_kv + c.h / (heads_q / heads_kv);
  c.q_offset = seqlen_k - seqlen_q;
  const int hi = CAUSAL ? min(seqlen_k, (c.m_block + 1) * BLOCK_M + c.q_offset) : seqlen_k;
  c.n_tiles = hi > 0 ? (hi + BLOCK_N - 1) / BLOCK_N : 0;
  const int full_end = CAUSAL ? min(seqlen_k, c.m_block * BLOCK_M + c.q_offset + 1) : seqlen_k;
  c.n_unmasked = max(full_end, 0) / BLOCK_N;
  return c;
}
// One CTA per work tile (grid: row blocks x batch * heads_q).
template <int BLOCK_M, int BLOCK_N, bool CAUSAL>
__device__ __forceinline__ CtaTiles cta_tiles(int heads_q, int heads_kv, int seqlen_q, int seqlen_k) {
  return work_tile<BLOCK_M, BLOCK_N, CAUSAL>(blockIdx.x + gridDim.x * blockIdx.y, gridDim.x, heads_q, heads_kv,
                                             seqlen_q, seqlen_k);
}

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
// two adjacent outputs, as one 32-bit word (x first)
template <typename OutT>
__device__ __forceinline__ uint32_t to_out2(float x, float y);
template <>
__device__ __forceinline__ uint32_t to_out2<__half>(float x, float y) {
  const __half2 h = __floats2half2_rn(x, y);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t to_out2<__nv_bfloat16>(float x, float y) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// All `threads` threads (a multiple of 32) that use named barrier `id` wait for each other.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Named barriers 1, 2, 3 (0 is __syncthreads): the consumer warpgroups take turns on the
// tensor cores (FlashAttention-3's ping-pong), so that one's softmax runs under the other's MMAs.
__device__ __forceinline__ void turn_wait(int consumer) {  // (bar.sync on mine: me + the one before me)
  asm volatile("bar.sync %0, 256;\n" ::"r"(1 + consumer) : "memory");
}
__device__ __forceinline__ void turn_pass(int consumer, int consumers) {  // to the next one, in a ring
  asm volatile("bar.arrive %0, 256;\n" ::"r"(1 + (consumer + 1) % consumers) : "memory");
}

}  // namespace sage_cuda
