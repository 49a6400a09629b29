// SageAttention2 forward on Hopper: the host-side entry point (no torch types: raw device pointers,
// so that this file and the kernel compile with nvcc alone; the Python side owns the tensors).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace sage_cuda {

struct Sage2ForwardArgs {
  // Q as given (fp16/bf16, the dtype of out), quantized by the kernel: [B, Hq, Nq, q_channels]
  // through strides in elements (the last one 1; the others multiples of 8, or of any value where
  // that dimension has size 1); q_channels <= DP, the rest of each row read as zeros
  const void* q;
  int64_t q_stride_b, q_stride_h, q_stride_n;
  int q_channels;
  float q_mult;               // sm_scale * log2(e)
  int q_max;                  // 127 (INT8 codes) or 7 (INT4)
  int q_group_pairs;          // pairs of query rows {16s + g, 16s + g + 8} per scale: 1, 8 or 32
  // or, where q_codes is not null, Q quantized by the pass (q is then not read):
  const void* q_codes;        // int8 [B, Hq, Nq, DP], contiguous (sm_scale * log2(e) folded into q_scale)
  const float* q_scale;       // [B, Hq, Nq]: one per query row
  const uint8_t* q_bad;       // [B, Hq, Nq] NaN/Inf query rows, or null (common.nonfinite)
  // quantized K, V (common.int_qk / sage2.quant_v with key_order="wgmma"), contiguous:
  const void* k_codes;   // int8 [B, Hkv, Nk, DP]  (K minus its token mean)
  const void* v_codes;   // fp8 e4m3 [B, Hkv, DP, NPAD], keys permuted within each 32 (see attention.cu)
  const float* k_scale;  // [B, Hkv, Nk]: per key; the kernel reads key 2t of each 128-key tile for lane t
  const float* v_scale;  // [B, Hkv, D]: per channel
  void* out;             // [B, Hq, Nq, D] through strides (elements); fp16 or bf16
  int64_t out_stride_b, out_stride_h, out_stride_n;
  float* lse;                  // [B, Hq, Nq] log2-domain LSE, or null
  const int32_t* first_bad;    // [B * Hkv] NO_BAD_KEY - first key with a NaN/Inf, or null (common.nonfinite)
  int* tile_counter;           // one int32, zero (and zero again after the kernel): CTAs claim work tiles
                               // on it as they finish theirs, one CTA per SM; or null (causal: a CTA per tile)
  int batch, heads_q, heads_kv, seqlen_q, seqlen_k, npad, head_dim, padded_head_dim;
  bool causal, out_bf16;
};

// Launches on `stream`; throws std::runtime_error naming the argument on unsupported input.
void sage2_sm90_forward(const Sage2ForwardArgs& args, cudaStream_t stream);

}  // namespace sage_cuda
