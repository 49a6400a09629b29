// SageAttention3 (FP4 microscaling) forward on Hopper, the exact emulation: the host-side entry
// point (no torch types: raw device pointers, so that this file and the kernel compile with nvcc
// alone; the Python side, sage3/cuda.py, owns the tensors).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace sage_cuda {

struct Sage3ForwardArgs {
  // FP4 values (E2M1 code x block scale) dequantized exactly into fp16 or bf16 (sage3.kernel.
  // dequantize_rows), contiguous; all three have the dtype of the output:
  const void* q;        // [B, Hq, Nq, DP]   Q minus its 128-row block means (Q smoothing)
  const void* k;        // [B, Hkv, Nk, DP]  K minus its token mean (K smoothing)
  const void* vt;       // [B, Hkv, DP, NPAD] V transposed (NPAD: keys padded to 128 with zeros)
  const float* delta_s;  // [B, Hq, ceil(Nq/128), Nk] fp32 (Q smoothing's q_mean . K^T), or null
  void* out;             // [B, Hq, Nq, D] through strides (elements)
  int64_t out_stride_b, out_stride_h, out_stride_n;
  float* lse;            // [B, Hq, Nq] log2-domain LSE, or null
  float mult;            // sm_scale * log2(e)
  float log2_p_range;    // two-level P: log2(448 * 6), rows of P spread over (0, 2688]; direct: 0
  int batch, heads_q, heads_kv, seqlen_q, seqlen_k, npad, head_dim, padded_head_dim;
  bool causal, bf16, mxfp4;  // mxfp4: P in 32-key blocks with E8M0 scales (else NVFP4: 16, E4M3)
};

// Launches on `stream`; throws std::invalid_argument naming the argument on unsupported input.
void sage3_sm90_forward(const Sage3ForwardArgs& args, cudaStream_t stream);

// The NVFP4 scales of P (s where its E4M3 rounding s8 is > 0, s8, 1/s) from the kernel's branch-free
// arithmetic against div.rn / rcp.rn, for every fp32 block max in [lo_bits, hi_bits] (bit patterns):
// how many maxima differ in each, and the first that does (0xffffffff: none).
void sage3_p_scale_mismatches(uint32_t lo_bits, uint32_t hi_bits, uint64_t (&counts)[3], uint32_t (&first)[3],
                              cudaStream_t stream);

}  // namespace sage_cuda
