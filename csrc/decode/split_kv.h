// Decode (few queries, long KV): the split-KV kernel of common/decode.py in CUDA. Host-side entry
// point on raw device pointers (the Python side, common/cuda_decode.py, owns the tensors).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace sage_cuda {

// PV kinds, as common.decode.PV_KINDS: fp16 P x fp16 V summed in fp16 per tile, the same summed in
// fp32, FP8 E4M3 P x FP8 E4M3 V (per channel per tile) summed in fp32.
enum DecodePv : int { kPvFp16Acc16 = 0, kPvFp16Acc32 = 1, kPvFp8E4m3 = 2 };

struct DecodeArgs {
  const void* q;  // [B, Hq, Nq, D] through strides (elements, last stride 1), fp16 or bf16
  const void* k;  // [B, Hkv, Nk, D]
  const void* v;  // [B, Hkv, Nk, D]
  int64_t q_stride_b, q_stride_h, q_stride_n;
  int64_t k_stride_b, k_stride_h, k_stride_n;
  int64_t v_stride_b, v_stride_h, v_stride_n;
  void* out;        // [B, Hq, Nq, D] through strides (elements, last stride 1), q's dtype
  int64_t out_stride_b, out_stride_h, out_stride_n;
  float* lse;         // [B, Hq, Nq] natural-log LSE, or null
  float* part_out;    // [splits, B * Hkv, 16, D]: each program's normalized output (scratch)
  float* part_lse;    // [splits, B * Hkv, 16]: log2-domain LSE (NaN: a row that saw a NaN/Inf)
  int32_t* counters;  // [2 B Hkv + 1], zero: per KV head programs done (with helpers: tiles done; the
                      // last one merges), then per KV head tiles claimed (dynamic; with helpers the bits
                      // from kClaimBits up count the helpers that joined), then (helpers) the programs
                      // and heads finished. The kernel leaves them all at zero
  int32_t* tile_link;  // [B * Hkv, ceil(Nk / 64)] (scratch): per tile, the tile its program took before it
  bool dynamic;        // tiles claimed dynamically (with splits > 1); false: the static split (bitwise reproducible)
  int batch, heads_kv, seqlen_q, seqlen_k, head_dim, group, rows_per_head, tiles_per_split, splits;
  // > 0 (with splits - 1 helper slots per KV head): one owner program per KV head, then this many
  // helper programs, each of which joins the KV head with the most tiles left (dynamic, one program
  // per KV head: the many-heads case, where the owners run in waves and the last wave's tail was
  // ~3% of the call; DECODE_NOTES.md, c13)
  int helpers;
  float qk_mult;      // sm_scale * log2(e)
  float log2_pscale;  // FP8 P's static scale, log2 (0 for fp16 P)
  int qmax;           // 127 (INT8) or 7 (INT4)
  bool k_per_token, smooth_k, causal, bf16;
  bool smooth_q;  // subtract each head's mean over its queries, add mean_q . (k - mean_k) back (needs k_per_token)
  int pv;  // DecodePv
  // attn_mask (common.masking), [B, Hq, Nq, Nk] through strides in elements (0 where broadcast):
  // mask_kind 0 none, 1 uint8 keep mask (nonzero: the key takes part), 2 fp32 bias in the log2 domain
  // (-inf: dropped). Read per score; a keep mask whose rows are alike (a padding mask) also decides
  // which tiles are copied at all (split_kv.cu)
  const void* mask;
  int mask_kind;
  int64_t mask_stride_b, mask_stride_h, mask_stride_q, mask_stride_k;
};

// Decode attention into `out` (and `lse`): one launch, every program of every KV head, the last
// program of each KV head to finish merging them. Launches on `stream`; throws std::invalid_argument naming
// the argument on unsupported input.
void decode_forward(const DecodeArgs& args, cudaStream_t stream);

}  // namespace sage_cuda
