// SageAttention2's passes over K and V for the Hopper kernel, in one launch that reads K and V once
// each (kv_pass.cu). Host-side entry point on raw device pointers (sage2/cuda.py owns the tensors).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace sage_cuda {

struct KvPassArgs {
  // K and V as given: [B, H, N, D] through strides in elements (the last one 1, the others multiples
  // of 8), 16-byte aligned, fp16 or bf16 (both the same); D a multiple of 8, at most DP
  const void* k;
  const void* v;
  int64_t k_stride_b, k_stride_h, k_stride_n;
  int64_t v_stride_b, v_stride_h, v_stride_n;
  // outputs, contiguous, as common.int_qk / sage2.quant_v (wgmma key order) write them:
  int8_t* k_codes;    // [B, H, N, DP]: K minus its token mean, INT8 or INT4 codes
  float* k_scale;     // [B, H, N]: one per key (per block of 128 keys, or per thread: keys 8m + 2t, + 1 of each 128)
  float* k_mean;      // [B, H, D]: the token mean of K (fp32; a non-finite one is 0 with zero_nonfinite)
  uint8_t* v_codes;   // [B, H, DP, NPAD]: V^T's E4M3 bytes, keys permuted within each 32 (attention.cu)
  float* v_scale;     // [B, H, D]: max |V| over finite values / 448, per channel
  // scratch and zeroed counters:
  float* k_partial;   // [B * H, chunks, DP]: each chunk's column sums of K
  int32_t* counters;  // zeroed, [1 + 2 B H]: the ticket counter, then per head K's and V's chunks done
  int32_t* v_amax;    // zeroed, [B * H * D]: max |V| per channel, as fp32 bits (an integer atomic max)
  int32_t* first_bad; // [B * H] NO_BAD_KEY - the first key with a NaN/Inf in K or V (atomic max), or null
  int batch, heads, seqlen, npad, head_dim, padded_head_dim;
  int chunks;          // per head: ceil(seqlen / kv_pass_chunk_tokens(padded_head_dim))
  int qmax;            // 127 (INT8) or 7 (INT4)
  bool k_per_thread;   // K's scales per thread (keys 8m + 2t, 8m + 2t + 1 of each 128); false: per 128 keys
  bool zero_nonfinite; // NaN/Inf count as 0 (common.nonfinite); a key holding one gets zero K codes
  bool bf16;
};

// Tokens per chunk (32 KB of one head of K or V; each CTA holds two: its chunk and the next).
int kv_pass_chunk_tokens(int padded_head_dim);
// The most chunks per head that one launch takes on the current device: a CTA waits for the other
// chunks of its head, which running CTAs must hold; at most as many as CTAs fit (half of them: a
// margin for SMs that other work holds).
int kv_pass_max_chunks(int padded_head_dim);
// Launches on `stream`; throws std::invalid_argument naming the argument on unsupported input.
void sage2_kv_pass(const KvPassArgs& args, cudaStream_t stream);

}  // namespace sage_cuda
