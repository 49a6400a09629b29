// SageAttention2 forward on Hopper: the host-side entry point (no torch types: raw device pointers,
// so that this file and the kernel compile with nvcc alone; the Python side owns the tensors).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace sage_cuda {

struct Sage2ForwardArgs {
  // quantized inputs (common.int_qk / sage2.quant_v with key_order="wgmma"), contiguous:
  const void* q_codes;   // int8 [B, Hq, Nq, DP]   (sm_scale * log2(e) folded into q_scale)
  const void* k_codes;   // int8 [B, Hkv, Nk, DP]  (K minus its token mean)
  const void* v_codes;   // fp8 e4m3 [B, Hkv, DP, NPAD], keys permuted within each 32 (see attention.cu)
  const float* q_scale;  // [B, Hq, Nq]: one per query row
  const float* k_scale;  // [B, Hkv, Nk]: per key; the kernel reads key 2t of each 128-key tile for lane t
  const float* v_scale;  // [B, Hkv, D]: per channel
  void* out;             // [B, Hq, Nq, D] through strides (elements); fp16 or bf16
  int64_t out_stride_b, out_stride_h, out_stride_n;
  float* lse;                  // [B, Hq, Nq] log2-domain LSE, or null
  const uint8_t* q_bad;        // [B, Hq, Nq] NaN/Inf query rows, or null (common.nonfinite)
  const int32_t* first_bad;    // [B * Hkv] NO_BAD_KEY - first key with a NaN/Inf, or null
  int batch, heads_q, heads_kv, seqlen_q, seqlen_k, npad, head_dim, padded_head_dim;
  bool causal, out_bf16;
};

// Launches on `stream`; throws std::runtime_error naming the argument on unsupported input.
void sage2_sm90_forward(const Sage2ForwardArgs& args, cudaStream_t stream);

}  // namespace sage_cuda
