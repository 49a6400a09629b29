// Decode (few queries, long KV): the split-KV kernel of common/decode.py in CUDA. Host-side entry
// point on raw device pointers (the Python side, common/cuda_decode.py, owns the tensors).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace sage_cuda {

// PV kinds, as common.decode.PV_KINDS: fp16 P x fp16 V summed in fp16 per tile, the same summed in
// fp32, FP8 E4M3 P x FP8 E4M3 V (per channel per tile) summed in fp32.
enum DecodePv : int { kPvFp16Acc16 = 0, kPvFp16Acc32 = 1, kPvFp8E4m3 = 2 };

struct DecodeSplitArgs {
  const void* q;  // [B, Hq, Nq, D] through strides (elements, last stride 1), fp16 or bf16
  const void* k;  // [B, Hkv, Nk, D]
  const void* v;  // [B, Hkv, Nk, D]
  int64_t q_stride_b, q_stride_h, q_stride_n;
  int64_t k_stride_b, k_stride_h, k_stride_n;
  int64_t v_stride_b, v_stride_h, v_stride_n;
  float* part_out;  // [splits, B * Hkv, 16, D]: each split's normalized output
  float* part_lse;  // [splits, B * Hkv, 16]: log2-domain LSE (NaN: a query row with NaN/Inf)
  int32_t* flags;   // [splits * B * Hkv]: 1 where the fast sweep saw a non-finite value
  int batch, heads_kv, seqlen_q, seqlen_k, head_dim, group, rows_per_head, tiles_per_split, splits;
  float qk_mult;      // sm_scale * log2(e)
  float log2_pscale;  // FP8 P's static scale, log2 (0 for fp16 P)
  int qmax;           // 127 (INT8) or 7 (INT4)
  bool k_per_token, smooth_k, causal, bf16;
  int pv;  // DecodePv
};

// Launches on `stream`; throws std::runtime_error naming the argument on unsupported input.
void decode_split_forward(const DecodeSplitArgs& args, cudaStream_t stream);

}  // namespace sage_cuda
