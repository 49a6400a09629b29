// SageAttention2 forward for Hopper (sm_90a): INT8 Q K^T on wgmma (IGMMA), FP8 P V on wgmma
// (QGMMA) with two-level accumulation, TMA loads, one producer and two or three consumer warpgroups.
//
// One work tile = 128 (head dim 128) or 192 (64) query rows of one (batch, query head) = two or three
// consumer warpgroups of 64 rows (each is one of sage2's 64-row Q blocks, 16 rows per warp).
// Warpgroup 0 only issues TMA copies: each work tile's Q (as given, fp16/bf16, or the pass's codes),
// and the K and V^T codes into a ring of shared-memory stages; it gives its registers to the consumers.
//
// Q is quantized here where that pays (Q_FUSED; sage2.cuda.q_in_kernel: head dim 128, non-causal,
// or causal from 8k queries), not by a pass of its own (which reads Q and writes its codes: 0.33 ms
// of a 22 ms call at N=16k, csrc/NOTES.md, v12): at the start of each work tile every consumer turns
// its 64 rows of Q (scaled by sm_scale*log2(e)) into INT8 codes in shared memory and its scales into
// registers, with the arithmetic of the Triton pass (common.triton_quant, quantize_int_kernel), so
// that the codes are the same, bit for bit. Elsewhere the kernel takes the pass's codes: short causal
// work tiles expose the quantization at every start, and at head dim 64 the third consumer's turn
// waits on it (both measured slower). K and V come from their own pass (kv_pass.cu, or the Triton
// passes): K's token mean and V's channel maxima need a whole read of K and V before any code.
//
// Per 128-key tile j, in each consumer warpgroup (scores in the log2 domain, sm_scale*log2(e)
// folded into Q before it is quantized):
//   S_int = Q_hat K_hat_j^T                        int32, wgmma s8 (k32 steps over the head dim)
//   s     = S_int * (dq * dk)                      per-thread quantization: every value a thread
//                                                  holds shares one Q scale and one K scale
//   m'    = max(m, rowmax s);  p = exp2(s - m' + log2(448))       p in (0, 448]: E4M3's range
//   [O|r] = fp8(p) . [V_hat_j | 1]                 the tile's product in a fresh accumulator
//                                                  (two-level: the FP8 MMA's ~13-bit accumulator
//                                                  only ever sums one tile); r = rowsum fp8(p)
//   O     = exp2(m - m') O + O_j,  l = exp2(m - m') l + r        in fp32
//   out   = O * dv / l
//
// l sums the quantized P, not the fp32 p the paper sums (and sage2's Triton kernel): the MMA does it
// for 6% more PV work instead of 64 adds per thread and tile, and O / l is then a weighted mean of
// V's rows with the weights fp8(p) (up to the MMA accumulator's truncation, which O and l share),
// which measured as accurate as the paper's or more (sage2.emulation's ARITHMETIC = "cuda_sm90"
// models this kernel's softmax arithmetic; csrc/NOTES.md, v11).
//
// P goes to the PV wgmma straight from registers. The S accumulator gives lane t (t = lane % 4)
// columns {2t, 2t+1, 2t+8, 2t+9, 2t+16, 2t+17, 2t+24, 2t+25} of each 32 keys, while the A operand
// of a k32 step wants slots {4t..4t+3, 4t+16..4t+19}. Rather than shuffle P between threads, the
// V pass stores each 32-key group of V^T in the same permuted order (slot s holds key
// 16*(s/16) + 2*((s%16)/4) + 8*((s%4)/2) + s%2; sage2.quant_v, wgmma_key_order=True): the sum over
// keys does not care about their order.
#include <algorithm>
#include <cfloat>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <type_traits>
#ifdef SAGE2_TRACE
#include <cstdio>
#include <vector>
#endif

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include "../common/hopper.cuh"
#include "../common/launch.h"
#include "../common/pingpong.cuh"
#include "../common/quant_codes.cuh"
#include "../common/tensor_map.h"
#include "../common/wgmma.cuh"
#include "attention.h"

namespace sage_cuda {
namespace {

constexpr int WG_ROWS = 64;   // query rows per consumer warpgroup = sage2's Q block
constexpr int BLOCK_N = 128;  // keys per tile = sage2's K block (per-thread K scales, two-level flush)
constexpr int STAGES = 3;

// The softmax denominator l comes from the PV MMA: each V^T stage has 8 rows of ones after V^T, so
// the last 8 columns of P V are the row sums of fp8(P) (64 fp32 adds per thread and tile fewer;
// csrc/NOTES.md, v11). l then sums the same quantized P that O does.
constexpr int ONES_ROWS = 8;  // rows of ones after V^T in each stage

// Consumer warpgroups per CTA: two at head dim 128; three at 64, where the softmax (the same work
// per tile at either head dim) dominates more and a third warpgroup's scores hide more of its
// latency. Registers: the producer keeps 24, the consumers share the rest of the 64K. OVERLAP
// (intra-warpgroup: S_j's softmax under P_{j-1} V_{j-1}) needs the PV accumulator, S and P live at
// once: at 160 registers (head dim 64) it spilled and was slower (csrc/NOTES.md, v9).
template <int DP>
struct Config {
  static constexpr int CONSUMERS = DP == 64 ? 3 : 2;
  static constexpr bool OVERLAP = CONSUMERS == 2;
  static constexpr int BLOCK_M = WG_ROWS * CONSUMERS;  // query rows per work tile
  static constexpr int THREADS = 128 * (CONSUMERS + 1);
  static constexpr int CONSUMER_REGS = CONSUMERS == 3 ? 160 : 240;  // 128 x 24 + 128 x C x regs <= 64K
  static constexpr int PV_REGS = (DP + ONES_ROWS) / 2;  // PV accumulator per thread (+ the row sums)
};
constexpr float LOG2_P_SCALE = 8.807354922057604f;  // log2(448), E4M3's largest value
constexpr int32_t NO_BAD_KEY = 0x7fffffff;          // common.nonfinite.NO_BAD_KEY

// The epilogue's inputs come with Q (Shared::v_scale_of, first_bad_of), not by a round trip after
// the work tile's last P V. This file is compiled with ptxas --register-usage-level=2
// (common/build.py, SOURCE_FLAGS): at the default level the non-causal kernels lost 3% with these
// inputs (their spills grew), at level 2 they gained 2-4% (csrc/NOTES.md, v13.6).
template <int DP, bool Q_FUSED>
struct Shared {
  // Q's codes (Q_FUSED: each consumer writes and reads its own rows; else by TMA); two: the next work
  // tile's load during this one
  alignas(1024) int8_t q[2][Config<DP>::BLOCK_M * DP];
  alignas(1024) int8_t k[STAGES][BLOCK_N * DP];
  alignas(1024) uint8_t vt[STAGES][(DP + ONES_ROWS) * BLOCK_N];  // V^T from TMA, then ONES_ROWS rows of 1.0
  // Q_FUSED: Q as loaded (fp16/bf16), DP / 64 boxes of BLOCK_M rows x 128 bytes, 128-byte swizzled
  alignas(Q_FUSED ? 1024 : 16) uint8_t q_in[Q_FUSED ? 2 * Config<DP>::BLOCK_M * DP * 2 : 16];
  float q_block_max[Config<DP>::CONSUMERS][4];  // per warp, for Q scales over a whole warpgroup (per block)
  // with each Q buffer, what its work tile's epilogue reads: V's scales (by the copy engine, where
  // KernelParams::v_scale_copy) and the head's first NaN/Inf key (common.nonfinite: NO_BAD_KEY - key)
  alignas(16) float v_scale_of[2][DP];
  int first_bad_of[2];
  int tile_of[2];  // the work tile whose Q is in q[b] (q_in[b]), or -1: none is left (see the producer)
  uint64_t q_full[2], q_empty[2];
  uint64_t k_full[STAGES], k_empty[STAGES], v_full[STAGES], v_empty[STAGES];
};

struct KernelParams {
  const float* q_scale;       // not Q_FUSED: per query row
  const uint8_t* q_bad;       // not Q_FUSED: NaN/Inf query rows, or null (common.nonfinite)
  float q_mult;               // sm_scale * log2(e)
  int q_max;                  // 127 (INT8) or 7 (INT4)
  int q_group_pairs;          // Q_FUSED: row pairs per Q scale: 1 per thread, 8 per warp, 32 per block
  const float* k_scale;
  const float* v_scale;
  void* out;
  int64_t out_sb, out_sh, out_sn;
  int out_pairs;              // out's columns 2t, 2t + 1 stored as one word
  int v_scale_copy;           // V's scales reach shared memory with Q (rows of a multiple of 16 bytes)
  int* tile_counter;          // work tiles claimed beyond the first gridDim.x (zero before and after), or
                              // null: CTA i runs tiles i, i + gridDim.x, ...
  float* lse;
  const int32_t* first_bad;
  int heads_q, heads_kv, seqlen_q, seqlen_k, head_dim;
  int m_blocks, n_work;  // row blocks per head; work tiles = m_blocks * batch * heads_q
#ifdef SAGE2_TRACE
  long long* trace;  // [work tile of CTA 0][consumer][TRACE_WORDS]
#endif
};

// The K and V stages form one ring over all the KV tiles a CTA visits, work tile after work tile:
// `slot` counts them (stage slot % STAGES, parity (slot / STAGES) & 1), kept below 2 * STAGES + the
// work tile's KV tiles (reduced modulo 2 * STAGES between work tiles) so that it cannot overflow.

// S_j = Q K_j^T (int32): issue the k32 steps over the head dim; the caller waits.
template <int DP, bool QF>
__device__ __forceinline__ void issue_qk(Shared<DP, QF>& sm, int slot, uint64_t desc_q, int (&s_int)[64]) {
  const int stage = slot % STAGES;
  mbar_wait(&sm.k_full[stage], (slot / STAGES) & 1);
  const uint64_t desc_k = smem_desc_kmajor(sm.k[stage], DP);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < DP / 32; ++kk) wgmma_s8_m64n128k32(s_int, desc_q + 2 * kk, desc_k + 2 * kk, kk);
  wgmma_commit();
}

// Issue P_j V_j into a fresh accumulator (two-level: the FP8 MMA's ~13-bit accumulator only ever
// sums one tile); the caller waits, then adds it to O in fp32 (finish_pv).
template <int DP, bool QF>
__device__ __forceinline__ void issue_pv(Shared<DP, QF>& sm, int slot, const uint32_t (&pa)[4][4],
                                         float (&o_tile)[Config<DP>::PV_REGS]) {
  const int stage = slot % STAGES;
  mbar_wait(&sm.v_full[stage], (slot / STAGES) & 1);
  const uint64_t desc_v = smem_desc_kmajor(sm.vt[stage], BLOCK_N);
  wgmma_fence();
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    if constexpr (DP == 128) {
      wgmma_e4m3_m64n136k32_rs(o_tile, pa[c], desc_v + 2 * c, c);
    } else {
      wgmma_e4m3_m64n72k32_rs(o_tile, pa[c], desc_v + 2 * c, c);
    }
  }
  wgmma_commit();
}

// After the wait: V_j's stage goes back to the producer, O = alpha * O + P_j V_j and
// l = alpha * l + rowsum fp8(P_j) (the ones columns: 2t and 2t+1 of the last 8, rows g and g + 8).
template <int DP, bool QF>
__device__ __forceinline__ void finish_pv(Shared<DP, QF>& sm, int slot, const float (&alpha)[2],
                                          float (&o_tile)[Config<DP>::PV_REGS], float (&o)[DP / 2], float (&l)[2],
                                          int lane) {
  fence_registers(o_tile);
  if (lane == 0) mbar_arrive(&sm.v_empty[slot % STAGES]);
#pragma unroll
  for (int i = 0; i < DP / 2; ++i) o[i] = o[i] * alpha[(i / 2) % 2] + o_tile[i];
#pragma unroll
  for (int r = 0; r < 2; ++r) l[r] = l[r] * alpha[r] + o_tile[DP / 2 + 2 * r];
}

// The online softmax of tile j on S_int: updates m, returns P_j (fp32, in (0, 448]) and the factor
// alpha that O and l must be scaled by (l is summed by the PV MMA, finish_pv). ks: the lane's K
// scale of the tile (loaded a tile ahead). MASKED: keys past the end and (causal) keys after the
// diagonal get -inf.
template <bool CAUSAL, bool MASKED>
__device__ __forceinline__ void softmax_tile(const int (&s_int)[64], int j, float (&m)[2], const float (&qs)[2],
                                             const int (&row)[2], float ks, int seqlen_k,
                                             int q_offset, int t, float (&p)[64], float (&alpha)[2]) {
  const int start_n = j * BLOCK_N;
  const float sc[2] = {qs[0] * ks, qs[1] * ks};

  // int32 -> fp32 without I2F, which shares the quarter-rate pipe with ex2: |S| <= 128*127*127 <
  // 2^22, so the bits of MAGIC_BITS + S are the float MAGIC + S (MAGIC = 1.5 * 2^23), exactly (an
  // integer add, full rate).
  constexpr int MAGIC_BITS = 0x4B400000;
  constexpr float MAGIC = 12582912.f;
  // The row max in 4 independent chains per row (8 steps each, not 32): a serial chain of
  // dependent max instructions stalls the warp for their latency (ncu: "wait" stalls).
  constexpr int CHAINS = 4;
  auto chain = [](int i) { return i % 2 + 2 * ((i / 4) % 2); };
  float tile_max[2];
  if (MASKED) {
    float part[2][CHAINS];
#pragma unroll
    for (int c = 0; c < CHAINS; ++c) part[0][c] = part[1][c] = -INFINITY;
#pragma unroll
    for (int i = 0; i < 64; ++i) {
      const int r = (i / 2) % 2;
      const int col = start_n + 8 * (i / 4) + 2 * t + (i % 2);
      if (col < seqlen_k && (!CAUSAL || col <= row[r] + q_offset))
        part[r][chain(i)] = fmaxf(part[r][chain(i)], (__int_as_float(s_int[i] + MAGIC_BITS) - MAGIC) * sc[r]);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) tile_max[r] = fmaxf(fmaxf(part[r][0], part[r][1]), fmaxf(part[r][2], part[r][3]));
  } else {  // scales are >= 0: the max of the integers, scaled once
    int part[2][CHAINS];
#pragma unroll
    for (int c = 0; c < CHAINS; ++c) part[0][c] = part[1][c] = INT_MIN;
#pragma unroll
    for (int i = 0; i < 64; ++i) part[(i / 2) % 2][chain(i)] = max(part[(i / 2) % 2][chain(i)], s_int[i]);
#pragma unroll
    for (int r = 0; r < 2; ++r) tile_max[r] = float(max(max(part[r][0], part[r][1]), max(part[r][2], part[r][3]))) * sc[r];
  }
  float shift[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float m_new = fmaxf(m[r], quad_max(tile_max[r]));
    const float m_use = m_new == -INFINITY ? 0.f : m_new;  // no visible key yet: p = 0
    alpha[r] = fast_exp2(m[r] - m_use);
    shift[r] = m_use - LOG2_P_SCALE;
    m[r] = m_new;
  }
  // the exponent argument S * sc - shift as one FMA on MAGIC + S: (MAGIC + S) * sc - (MAGIC * sc +
  // shift), the constant rounded once: an error of at most 2^-24 |MAGIC * sc + shift| (under one
  // unit of S_int times sc while |shift| < MAGIC * sc), far under S's quantization error (a float
  // subtract of MAGIC first costs one more instruction per score)
  const float bias[2] = {-fmaf(MAGIC, sc[0], shift[0]), -fmaf(MAGIC, sc[1], shift[1])};
#pragma unroll
  for (int i = 0; i < 64; ++i) {
    const int r = (i / 2) % 2;
    p[i] = fast_exp2(fmaf(__int_as_float(s_int[i] + MAGIC_BITS), sc[r], bias[r]));
    if (MASKED) {
      const int col = start_n + 8 * (i / 4) + 2 * t + (i % 2);
      if (!(col < seqlen_k && (!CAUSAL || col <= row[r] + q_offset))) p[i] = 0.f;
    }
  }
}

// P_j as the A operand of the PV wgmma's four k32 steps (see the key order above).
__device__ __forceinline__ void pack_p(const float (&p)[64], uint32_t (&pa)[4][4]) {
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const int b = 16 * c;
    pa[c][0] = pack_e4m3x4(p[b + 0], p[b + 1], p[b + 4], p[b + 5]);
    pa[c][1] = pack_e4m3x4(p[b + 2], p[b + 3], p[b + 6], p[b + 7]);
    pa[c][2] = pack_e4m3x4(p[b + 8], p[b + 9], p[b + 12], p[b + 13]);
    pa[c][3] = pack_e4m3x4(p[b + 10], p[b + 11], p[b + 14], p[b + 15]);
  }
}

// What the softmax of every tile needs from the thread's position.
struct Softmax {  // (values, not references: a referenced local array would live in local memory)
  float qs[2];
  int row[2];
  const float* ks_row;
  int seqlen_k, q_offset, t;
  // lane t's keys of tile j all share one K scale: the per-thread group {8m + 2t, 8m + 2t + 1}
  __device__ __forceinline__ float k_scale(int j) const {
    const int k_first = j * BLOCK_N + 2 * t;
    return k_first < seqlen_k ? ks_row[k_first] : 0.f;
  }
};

// After S_j's wgmma completed: K_j's stage goes back to the producer, then the softmax.
template <bool CAUSAL, bool MASKED, int DP, bool QF>
__device__ __forceinline__ void softmax_after_qk(Shared<DP, QF>& sm, int (&s_int)[64], int j, int slot, float ks,
                                                 float (&m)[2], const Softmax& a, int lane,
                                                 float (&p)[64], float (&alpha)[2]) {
  fence_registers(s_int);
  if (lane == 0) mbar_arrive(&sm.k_empty[slot % STAGES]);
  softmax_tile<CAUSAL, MASKED>(s_int, j, m, a.qs, a.row, ks, a.seqlen_k, a.q_offset, a.t, p, alpha);
}

// ---- Q's quantization (each consumer warpgroup, its own rows, at the start of a work tile) ----

// The 16-byte chunk c (8 channels) of row r of the loaded Q tile (128-byte swizzled boxes of 64
// channels), by its shared-memory address (a generic load here cost a generic-to-shared check each).
template <int DP>
__device__ __forceinline__ uint4 q_in_chunk(uint32_t q_in, int r, int c) {
  const uint32_t addr = q_in + (c / 8) * Config<DP>::BLOCK_M * 128 + r * 128 + (((c % 8) ^ (r % 8)) << 4);
  uint4 w;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(w.x), "=r"(w.y), "=r"(w.z), "=r"(w.w) : "r"(addr));
  return w;
}

// Where byte `col` of row r of Q's codes goes: the layout wgmma reads (rows of DP bytes, 128-byte
// swizzle at DP = 128, 64-byte at 64: the 16-byte unit's bits XOR the row's bits 0-2 or 1-2).
template <int DP>
__device__ __forceinline__ uint32_t q_code_offset(int r, int col) {
  const int a = r * DP + col;
  return uint32_t(a ^ (((a >> 7) & (DP == 128 ? 7 : 3)) << 4));
}

// max |h| over the 8 fp16/bf16 values of a chunk, pairwise and NaN-propagating (the max of |x * mult|
// is max |h| times mult: rounding is monotonic)
template <typename InT>
struct Pair;
template <>
struct Pair<__half> {
  using T = __half2;
  static __device__ __forceinline__ float max_of(T m) { return __half2float(__hmax_nan(__low2half(m), __high2half(m))); }
};
template <>
struct Pair<__nv_bfloat16> {
  using T = __nv_bfloat162;
  static __device__ __forceinline__ float max_of(T m) {
    return __bfloat162float(__hmax_nan(__low2bfloat16(m), __high2bfloat16(m)));
  }
};
template <typename InT, typename P = typename Pair<InT>::T>
__device__ __forceinline__ P chunk_absmax(const uint4& w) {
  const P* h = reinterpret_cast<const P*>(&w);
  return __hmax2_nan(__hmax2_nan(__habs2(h[0]), __habs2(h[1])), __hmax2_nan(__habs2(h[2]), __habs2(h[3])));
}
// Quantizes this thread's share of the warpgroup's 64 rows of Q: rows {16 warp + g, + 8} (the lane's
// rows of the S accumulator, which share one scale at the per-thread granularity), channel chunks
// t, t + 4, ... Writes the codes to `codes` (wgmma's layout) and returns the rows' scale in qs (the
// scale of the lane's group) and whether each row holds a NaN/Inf (its codes are 0; its output rows
// are NaN: the epilogue). The Triton pass's arithmetic (quantize_int_kernel), value by value: x =
// float(q) * mult; scale = RN(absmax / qmax) over the group; code = trunc(clamp(RN(x / scale) +- 0.5)).
template <int DP, typename InT>
__device__ __forceinline__ void quantize_q_rows(uint32_t q_in, uint32_t codes, float (&block_max)[4], int wg_row0,
                                                int warp, int lane, float q_mult, float qmax, int group_pairs,
                                                float (&qs)[2], bool (&bad)[2]) {
  constexpr int CHUNKS = DP / 8 / 4;  // per row and thread
  const int g = lane / 4, t = lane % 4;
  const int r0 = wg_row0 + warp * 16 + g;
  uint4 w[2][CHUNKS];
  float amax[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    w[i][0] = q_in_chunk<DP>(q_in, r0 + 8 * i, t);
    auto h_max = chunk_absmax<InT>(w[i][0]);
#pragma unroll
    for (int c = 1; c < CHUNKS; ++c) {
      w[i][c] = q_in_chunk<DP>(q_in, r0 + 8 * i, t + 4 * c);
      h_max = __hmax2_nan(h_max, chunk_absmax<InT>(w[i][c]));
    }
    amax[i] = Pair<InT>::max_of(h_max) * q_mult;
    amax[i] = amax[i] == amax[i] ? amax[i] : INFINITY;  // NaN counts as +inf
#pragma unroll
    for (int lanes = 1; lanes < 4; lanes *= 2) amax[i] = fmaxf(amax[i], __shfl_xor_sync(0xffffffff, amax[i], lanes));
    bad[i] = amax[i] == INFINITY;
  }
  float group_max = fmaxf(bad[0] ? 0.f : amax[0], bad[1] ? 0.f : amax[1]);
  if (group_pairs >= 8)  // per warp: the warp's 16 rows
    for (int lanes = 4; lanes < 32; lanes *= 2)
      group_max = fmaxf(group_max, __shfl_xor_sync(0xffffffff, group_max, lanes));
  if (group_pairs == 32) {  // per block: the warpgroup's 64 rows
    if (lane == 0) block_max[warp] = group_max;
    named_barrier_sync(8 + wg_row0 / WG_ROWS, 128);
    group_max = fmaxf(fmaxf(block_max[0], block_max[1]), fmaxf(block_max[2], block_max[3]));
  }
  const float scale = __fdiv_rn(group_max, qmax);
  // a scale below 2^-60 is scaled by 2^64 with x (both exact), so that 1 / scale does not overflow
  const float factor = scale < 8.673617379884035e-19f ? 1.8446744073709552e19f : 1.f;
  const float divisor = (scale == 0.f ? 1.f : scale) * factor, inv = __frcp_rn(divisor);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const uint32_t words[4] = {w[i][c].x, w[i][c].y, w[i][c].z, w[i][c].w};
      uint32_t packed[2];
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        uint32_t bytes[4];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float2 h = to_float2<InT>(words[2 * k + e]);
          // (h * mult) * factor: the pass's x * mult, then scaled exactly
          bytes[2 * e] = int_code(bad[i] ? 0.f : h.x * q_mult * factor, divisor, inv, qmax);
          bytes[2 * e + 1] = int_code(bad[i] ? 0.f : h.y * q_mult * factor, divisor, inv, qmax);
        }
        packed[k] = bytes[0] | (bytes[1] << 8) | (bytes[2] << 16) | (bytes[3] << 24);
      }
      const uint32_t addr = codes + q_code_offset<DP>(r0 + 8 * i, 8 * (t + 4 * c));
      asm volatile("st.shared.v2.u32 [%0], {%1, %2};\n" ::"r"(addr), "r"(packed[0]), "r"(packed[1]) : "memory");
    }
  }
  qs[0] = qs[1] = scale;
}

// SAGE2_TRACE (a profiling build, experiments/sage2_tile_cost.py --trace): consumer warp 0's lane 0 of
// CTA 0 records clock64() at each phase of every work tile into KernelParams::trace, which launch()
// prints once the kernel is done, to see where a work tile's time beyond its KV tiles goes
// (csrc/NOTES.md, v13.3). Plain stores, no printf in the kernel: a call there serializes the wgmma
// (ptxas C7510) and so the timing. Off: no code.
#ifdef SAGE2_TRACE
#define TRACE_MARK(i) \
  if (blockIdx.x == 0 && tid == 0) trace[i] = clock64();
constexpr int TRACE_WORDS = 8;  // per work tile and consumer: the 7 marks' differences and the KV tiles
#else
#define TRACE_MARK(i)
#endif

// A shared word read by lane 0 alone and given to the warp: the value is then known to be
// warp-uniform, so that what derives from it (the ring's slots and barriers) stays on the uniform
// datapath (and one read, not 32, has to be released before the producer writes the word again).
__device__ __forceinline__ int lane0_read(const int& word, int lane) {
  return __shfl_sync(0xffffffff, lane == 0 ? word : 0, 0);
}

// Persistent: a CTA runs work tile blockIdx.x, then the next one it claims on p.tile_counter (causal:
// one CTA per SM, each claiming as it goes, so that the work tiles' unequal lengths balance out), or
// without a counter tiles blockIdx.x + gridDim.x, ... (non-causal: tiles of equal work; launch() sizes
// the grid, see grid_ctas). Across work tiles the producer keeps the K/V ring full and loads the next
// work tile's Q into the other Q buffer, and each consumer passes the tensor-core turn on as soon as
// its last P V is issued: the other consumer starts the next work tile while this one writes its
// output. (A fresh CTA per work tile exposes its Q and first K loads, its unoverlapped first S and
// last P V and its output stores: 1-3% of the kernel at 2k-8k keys, measured; csrc/NOTES.md, v10.)
template <int DP, bool CAUSAL, bool Q_FUSED, typename OutT>
__global__ void __launch_bounds__(Config<DP>::THREADS, 1)
    sage2_fwd_kernel(const __grid_constant__ CUtensorMap map_q, const __grid_constant__ CUtensorMap map_k,
                     const __grid_constant__ CUtensorMap map_v, const KernelParams p) {
  extern __shared__ uint8_t smem_raw[];
  constexpr int BLOCK_M = Config<DP>::BLOCK_M, CONSUMERS = Config<DP>::CONSUMERS;
  using Smem = Shared<DP, Q_FUSED>;
  Smem& sm = *reinterpret_cast<Smem*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  auto tile_at = [&](int tile) {
    return work_tile<BLOCK_M, BLOCK_N, CAUSAL>(tile, p.m_blocks, p.heads_q, p.heads_kv, p.seqlen_q, p.seqlen_k);
  };

  // broadcast from lane 0 so that the compiler knows it is warp-uniform: wgmma in a branch it
  // thinks divergent gets serialized (ptxas C7518)
  const int warpgroup = __shfl_sync(0xffffffff, int(threadIdx.x) / 128, 0);

  if (threadIdx.x == 0) {
    for (int b = 0; b < 2; ++b) {
      mbar_init(&sm.q_full[b], 1);
      mbar_init(&sm.q_empty[b], 128 * CONSUMERS);  // every consumer thread arrives (the epilogue)
    }
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(&sm.k_full[s], 1);
      mbar_init(&sm.v_full[s], 1);
      mbar_init(&sm.k_empty[s], 4 * CONSUMERS);
      mbar_init(&sm.v_empty[s], 4 * CONSUMERS);
    }
    fence_barrier_init();
  }
  if constexpr (ONES_ROWS > 0) {  // 1.0 in E4M3 is 0x38; every byte alike, so the swizzle does not matter
    constexpr int WORDS = ONES_ROWS * BLOCK_N / 4;
    for (int i = threadIdx.x; i < STAGES * WORDS; i += blockDim.x)
      reinterpret_cast<uint32_t*>(sm.vt[i / WORDS] + DP * BLOCK_N)[i % WORDS] = 0x38383838u;
    fence_proxy_async_shared();  // written here, read by wgmma (the async proxy)
  }
#ifndef SAGE2_NO_PDL
  // launched after the K/V pass (launch_after): the setup above ran while the pass finished; what
  // follows reads its codes, scales and tile counter
  griddep_wait();
#endif
  __syncthreads();

  if (warpgroup == 0) {  // producer
    regs_dec<24>();
    if (threadIdx.x == 0) {
      prefetch_tensor_map(&map_q);
      prefetch_tensor_map(&map_k);
      prefetch_tensor_map(&map_v);
      int slot = 0;
      // The consumers learn each work tile from sm.tile_of, written before its Q buffer's arrival (the
      // arrive releases it, their wait acquires it); -1, with an arrival of no bytes, ends their loop.
      for (int tile = blockIdx.x, done = 0;; ++done) {
        const int qb = done % 2;
        mbar_wait(&sm.q_empty[qb], ((done / 2) & 1) ^ 1);
        if (tile >= p.n_work) {
          sm.tile_of[qb] = -1;
          mbar_arrive(&sm.q_full[qb]);
          break;
        }
        sm.tile_of[qb] = tile;
        const CtaTiles cta = tile_at(tile);
        // the epilogue's inputs ride with Q (written or copied before the buffer's arrival, which
        // releases them): the epilogue then reads them from shared memory, not by a round trip
        // after the tile's last P V (csrc/NOTES.md, v13.4)
        uint32_t v_bytes = 0;  // (in the Q load's count; declared first: the SASS measured, v13.6)
        sm.first_bad_of[qb] = p.first_bad != nullptr ? NO_BAD_KEY - p.first_bad[cta.kv_bh] : NO_BAD_KEY;
        v_bytes = p.v_scale_copy ? uint32_t(p.head_dim) * 4 : 0;
        if constexpr (Q_FUSED) {
          mbar_arrive_expect_tx(&sm.q_full[qb], BLOCK_M * DP * 2 + v_bytes);
          for (int box = 0; box < DP / 64; ++box)
            tma_load_4d(sm.q_in + qb * BLOCK_M * DP * 2 + box * BLOCK_M * 128, &map_q, &sm.q_full[qb], box * 128,
                        cta.m_block * BLOCK_M, cta.h, cta.b);
        } else {
          mbar_arrive_expect_tx(&sm.q_full[qb], BLOCK_M * DP + v_bytes);
          tma_load_3d(sm.q[qb], &map_q, &sm.q_full[qb], 0, cta.m_block * BLOCK_M, cta.bh);
        }
        if (v_bytes > 0)
          bulk_load(sm.v_scale_of[qb], p.v_scale + int64_t(cta.kv_bh) * p.head_dim, v_bytes, &sm.q_full[qb]);
        // the next work tile, claimed now: the atomic's round trip hides behind this one's K/V loads.
        // The claims hand out 0, 1, ..., n_work - 1 (gridDim.x <= n_work): each CTA's last claim is the
        // first that is too large, so the claim of n_work - 1 is the last of the launch, and its CTA
        // puts the counter back to zero for the next.
        int next = tile + int(gridDim.x);
        if (p.tile_counter != nullptr) {
          const int claim = atomicAdd(p.tile_counter, 1);
          if (claim == p.n_work - 1) atomicExch(p.tile_counter, 0);
          next = int(gridDim.x) + claim;
        }
        for (int j = 0; j < cta.n_tiles; ++j, ++slot) {
          const int stage = slot % STAGES;
          const uint32_t phase = (slot / STAGES) & 1;
          mbar_wait(&sm.k_empty[stage], phase ^ 1);
          mbar_arrive_expect_tx(&sm.k_full[stage], BLOCK_N * DP);
          tma_load_3d(sm.k[stage], &map_k, &sm.k_full[stage], 0, j * BLOCK_N, cta.kv_bh);
          mbar_wait(&sm.v_empty[stage], phase ^ 1);
          mbar_arrive_expect_tx(&sm.v_full[stage], DP * BLOCK_N);
          tma_load_3d(sm.vt[stage], &map_v, &sm.v_full[stage], j * BLOCK_N, 0, cta.kv_bh);
        }
        slot %= 2 * STAGES;
        tile = next;
      }
    }
    return;
  }

  regs_inc<Config<DP>::CONSUMER_REGS>();
  const int consumer = warpgroup - 1;
  const int tid = threadIdx.x % 128, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const bool last = consumer == CONSUMERS - 1;
  // The consumers take turns in a ring (consumer 0 first); each passes the turn once per section,
  // the last consumer once up front and not after its very last section, so that the passes and
  // waits on each named barrier balance. (gridDim.x <= n_work: every CTA has a work tile.)
  if (last) turn_pass(consumer, CONSUMERS);
  int slot0 = 0;  // the ring slot of the work tile's first KV tile
#ifdef SAGE2_TRACE
  long long trace_end = clock64();  // the last work tile's end
#endif
  for (int done = 0;; ++done) {
    const int qb = done % 2;
    mbar_wait(&sm.q_full[qb], (done / 2) & 1);
    const int tile = lane0_read(sm.tile_of[qb], lane);
    if (tile < 0) break;
#ifdef SAGE2_TRACE
    long long trace[7] = {0, 0, 0, 0, 0, 0, 0};
#endif
    TRACE_MARK(0)
    const CtaTiles cta = tile_at(tile);
    const int m_block = cta.m_block, bh = cta.bh, b = cta.b, h = cta.h, kv_bh = cta.kv_bh;
    const int q_offset = cta.q_offset, n_tiles = cta.n_tiles, n_unmasked = cta.n_unmasked;
    // whether another work tile follows (the last consumer's final turn pass): the next Q buffer's
    // tile, which the producer wrote long before (it loads the next Q once this tile's K/V loads are out)
    auto another_follows = [&]() {
      if (!last) return true;
      mbar_wait(&sm.q_full[qb ^ 1], ((done + 1) / 2) & 1);
      return lane0_read(sm.tile_of[qb ^ 1], lane) >= 0;
    };

    const int row0 = m_block * BLOCK_M + consumer * WG_ROWS + warp * 16 + g;
    const int row[2] = {row0, row0 + 8};
    // this warpgroup's rows of Q -> codes in sm.q, scales in qs (rows past the end are zeros: scale 0)
    float qs[2];
    bool q_row_bad[2] = {false, false};  // (not Q_FUSED: read in the epilogue)
    if constexpr (Q_FUSED) {
      quantize_q_rows<DP, OutT>(smem_addr(sm.q_in + qb * BLOCK_M * DP * 2), smem_addr(sm.q[qb]),
                                sm.q_block_max[consumer], consumer * WG_ROWS, warp, lane, p.q_mult, float(p.q_max),
                                p.q_group_pairs, qs, q_row_bad);
      // (the buffer goes back to the producer after the epilogue, which reads V's scales beside it)
      fence_proxy_async_shared();                   // the codes are read by wgmma (the async proxy)
      named_barrier_sync(8 + consumer, 128);        // all of the warpgroup's codes are written
    } else {
#pragma unroll
      for (int r = 0; r < 2; ++r)
        qs[r] = row[r] < p.seqlen_q ? p.q_scale[int64_t(bh) * p.seqlen_q + row[r]] : 0.f;
    }
    const float* ks_row = p.k_scale + int64_t(kv_bh) * p.seqlen_k;
    TRACE_MARK(1)

    float o[DP / 2];
#pragma unroll
    for (int i = 0; i < DP / 2; ++i) o[i] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

    const uint64_t desc_q = smem_desc_kmajor(sm.q[qb] + consumer * WG_ROWS * DP, DP);
    // Section j (one turn on the tensor cores): issue S_j = Q K_j^T and P_{j-1} V_{j-1}, pass the
    // turn. Then, while both run (and the other warpgroup takes its turn), the softmax of S_j; then
    // P_{j-1} V_{j-1} joins O and P_j is packed for the next section (FlashAttention-3's ping-pong and
    // intra-warpgroup overlap; without OVERLAP, only ping-pong). The first and last sections are
    // peeled off, so that ptxas sees straight-line wgmma code in the loop (else it serializes them: C7514).
    uint32_t pa[4][4];
    float alpha_prev[2];
    const Softmax sm_args{{qs[0], qs[1]}, {row[0], row[1]}, ks_row, p.seqlen_k, q_offset, t};
    // one steady-state section; the unmasked and masked tiles run in separate loops, each straight-line
    auto section = [&](int j, float& ks, auto masked) {
      int s_int[64];
      float o_tile[Config<DP>::PV_REGS];
      const int slot = slot0 + j;
      if constexpr (!Config<DP>::OVERLAP) {  // fewer live registers: P_{j-1} V_{j-1} done before S_j is issued
        turn_wait(consumer);
        issue_pv(sm, slot - 1, pa, o_tile);
        wgmma_wait<0>();
        finish_pv(sm, slot - 1, alpha_prev, o_tile, o, l, lane);
        issue_qk(sm, slot, desc_q, s_int);
        turn_pass(consumer, CONSUMERS);
        const float ks_next = sm_args.k_scale(j + 1);
        wgmma_wait<0>();
        float p_tile[64];
        softmax_after_qk<CAUSAL, decltype(masked)::value>(sm, s_int, j, slot, ks, m, sm_args, lane, p_tile,
                                                          alpha_prev);
        pack_p(p_tile, pa);
        ks = ks_next;
        return;
      }
      turn_wait(consumer);
      issue_qk(sm, slot, desc_q, s_int);
      issue_pv(sm, slot - 1, pa, o_tile);
      turn_pass(consumer, CONSUMERS);
      const float ks_next = sm_args.k_scale(j + 1);  // in flight during the wait and the softmax
      wgmma_wait<1>();  // S_j is ready; P_{j-1} V_{j-1} may still run
      float p_tile[64], alpha[2];
      softmax_after_qk<CAUSAL, decltype(masked)::value>(sm, s_int, j, slot, ks, m, sm_args, lane, p_tile, alpha);
      wgmma_wait<0>();
      finish_pv(sm, slot - 1, alpha_prev, o_tile, o, l, lane);
      pack_p(p_tile, pa);
      alpha_prev[0] = alpha[0];
      alpha_prev[1] = alpha[1];
      ks = ks_next;
    };
    if (n_tiles > 0) {
      float ks = sm_args.k_scale(0);
      {
        int s_int[64];
        float p_tile[64];
        turn_wait(consumer);
        issue_qk(sm, slot0, desc_q, s_int);
        turn_pass(consumer, CONSUMERS);
        const float ks_next = sm_args.k_scale(1);
        wgmma_wait<0>();
        if (n_unmasked > 0) {
          softmax_after_qk<CAUSAL, false>(sm, s_int, 0, slot0, ks, m, sm_args, lane, p_tile, alpha_prev);
        } else {
          softmax_after_qk<CAUSAL, true>(sm, s_int, 0, slot0, ks, m, sm_args, lane, p_tile, alpha_prev);
        }
        pack_p(p_tile, pa);
        ks = ks_next;
      }
      TRACE_MARK(2)
      const int unmasked_end = min(n_unmasked, n_tiles);
      for (int j = 1; j < unmasked_end; ++j) section(j, ks, std::false_type{});
      for (int j = max(1, unmasked_end); j < n_tiles; ++j) section(j, ks, std::true_type{});
      float o_tile[Config<DP>::PV_REGS];
      TRACE_MARK(3)
      turn_wait(consumer);
      TRACE_MARK(4)
      issue_pv(sm, slot0 + n_tiles - 1, pa, o_tile);
      if (another_follows()) turn_pass(consumer, CONSUMERS);
      wgmma_wait<0>();
      finish_pv(sm, slot0 + n_tiles - 1, alpha_prev, o_tile, o, l, lane);
      TRACE_MARK(5)
    } else {
      turn_wait(consumer);
      if (another_follows()) turn_pass(consumer, CONSUMERS);
    }
    slot0 = (slot0 + n_tiles) % (2 * STAGES);

    // epilogue: out = O / l * dv (in that order: O ~ l |V's codes| and l reaches 448 * Nk, so O * dv
    // overflowed for |V| ~ 1e32); SDPA's NaN rows (common.nonfinite); the log2-domain LSE
    const int first_bad = lane0_read(sm.first_bad_of[qb], lane);
    if constexpr (!Q_FUSED) {
      if (p.q_bad != nullptr) {
#pragma unroll
        for (int r = 0; r < 2; ++r)
          q_row_bad[r] = row[r] < p.seqlen_q && p.q_bad[int64_t(bh) * p.seqlen_q + row[r]] != 0;
      }
    }
    // V's scales of the lane's columns {8 nt + 2t, + 1}, all loaded before the first store: read
    // between the stores, they came one round trip after another (a load may not move above a store
    // that could alias it), ~3 us of each work tile (csrc/NOTES.md, v13.3)
    float v_scale[DP / 4];
    if (p.v_scale_copy) {  // from shared memory (they came with Q)
#pragma unroll
      for (int nt = 0; nt < DP / 8; ++nt) {
        const int col = 8 * nt + 2 * t;
        v_scale[2 * nt] = col < p.head_dim ? sm.v_scale_of[qb][col] : 0.f;
        v_scale[2 * nt + 1] = col + 1 < p.head_dim ? sm.v_scale_of[qb][col + 1] : 0.f;
      }
    } else {
      const float* vs = p.v_scale + int64_t(kv_bh) * p.head_dim;
#pragma unroll
      for (int nt = 0; nt < DP / 8; ++nt) {
        const int col = 8 * nt + 2 * t;
        v_scale[2 * nt] = col < p.head_dim ? __ldg(vs + col) : 0.f;
        v_scale[2 * nt + 1] = col + 1 < p.head_dim ? __ldg(vs + col + 1) : 0.f;
      }
    }
    OutT* out = reinterpret_cast<OutT*>(p.out) + b * p.out_sb + h * p.out_sh;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float l_row = l[r];  // (the MMA's row sum covers all of the row's keys: no quad sum)
      if (row[r] >= p.seqlen_q) continue;
      const bool bad = q_row_bad[r] || (first_bad < p.seqlen_k && (!CAUSAL || first_bad <= row[r] + q_offset));
      const float inv_l = bad ? NAN : 1.f / (l_row == 0.f ? 1.f : l_row);
      OutT* out_row = out + int64_t(row[r]) * p.out_sn;
      if (p.out_pairs) {  // columns 2t, 2t + 1 of each 8: one 32-bit store
#pragma unroll
        for (int nt = 0; nt < DP / 8; ++nt) {
          const int col = 8 * nt + 2 * t;
          if (col < p.head_dim)
            *reinterpret_cast<uint32_t*>(out_row + col) = to_out2<OutT>(o[4 * nt + 2 * r] * inv_l * v_scale[2 * nt],
                                                                        o[4 * nt + 2 * r + 1] * inv_l * v_scale[2 * nt + 1]);
        }
      } else {
#pragma unroll
        for (int nt = 0; nt < DP / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int col = 8 * nt + 2 * t + e;
            if (col < p.head_dim) out_row[col] = to_out<OutT>(o[4 * nt + 2 * r + e] * inv_l * v_scale[2 * nt + e]);
          }
        }
      }
      if (p.lse != nullptr && t == 0)
        p.lse[int64_t(bh) * p.seqlen_q + row[r]] = bad ? NAN : m[r] + log2f(l_row) - LOG2_P_SCALE;
    }
    TRACE_MARK(6)
#ifdef SAGE2_TRACE
    if (blockIdx.x == 0 && tid == 0) {
      long long* w = p.trace + (int64_t(done) * CONSUMERS + consumer) * TRACE_WORDS;
      w[0] = trace[0] - trace_end;
      for (int i = 1; i < 7; ++i) w[i] = trace[i] - trace[i - 1];
      w[7] = n_tiles;
      trace_end = clock64();
    }
#endif
    // the Q buffer (and the epilogue's inputs beside it) back to the producer: the work tile after
    // next loads into it. Every lane read V's scales there and an arrival releases only its own
    // thread's reads, so every thread arrives (racecheck found the WAR hazard with the next bulk
    // copy when lane 0 alone did, a __syncwarp before it included: it compiles to a NOP).
    mbar_arrive(&sm.q_empty[qb]);
  }
}

// ---- host ----

// A 3-D byte tensor [d2][d1][d0] (d0 contiguous) read in boxes of box0 x box1 x 1, swizzled so that
// each box0-byte row lands as wgmma's K-major layout wants it.
CUtensorMap byte_tensor_map(const void* base, uint64_t d0, uint64_t d1, uint64_t d2, uint32_t box0, uint32_t box1,
                            const char* what) {
  return sage_cuda::byte_tensor_map<3>(base, {d0, d1, d2}, {d0, d0 * d1}, {box0, box1, 1}, std::string("sage2 cuda: ") + what);
}

// How many CTAs to launch. One per SM (a CTA takes the SM's registers), each looping over work tiles:
// of equal work (non-causal), or claimed on a counter as CTAs finish theirs (with a tile counter).
// Causal without a counter: one per work tile, for the hardware to hand out as SMs free up; a
// static round robin over causal work tiles (rows of unequal length) left SMs idle at the end: head
// dim 64 at 4k has 22 row blocks and 132 = 6 * 22 SMs, so every CTA got the same row block every
// time, and causal 4k fell from 376 to 243 TOPS (csrc/NOTES.md, v10).
// SAGE2_SM90_GRID=tiles launches one CTA per work tile (the pre-persistent grid, for A/B timing);
// SAGE2_SM90_GRID=<n> at most n (tests run many work tiles per CTA on small inputs so).
int64_t grid_ctas(int64_t n_work, bool causal, bool claims) {
  const char* env = std::getenv("SAGE2_SM90_GRID");
  if (env != nullptr && *env != '\0') {
    const std::string v(env);
    if (v == "tiles") return n_work;
    char* end = nullptr;
    const long long n = std::strtoll(env, &end, 10);
    if (*end != '\0' || n <= 0)
      throw std::invalid_argument("sage2 cuda: SAGE2_SM90_GRID must be 'tiles' or a positive CTA count, got '" + v + "'");
    return std::min<int64_t>(n_work, n);
  }
  if (causal && !claims) return n_work;
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return sms > 0 ? std::min<int64_t>(n_work, sms) : n_work;
}

template <int DP, bool CAUSAL, bool Q_FUSED, typename OutT>
void launch(const Sage2ForwardArgs& a, cudaStream_t stream) {
  // Q as bytes [B][Hq][Nq][2 q_channels] (any strides that are multiples of 16 bytes; a dimension of
  // size 1 may carry any), read in boxes of BLOCK_M rows x 128 bytes (64 channels)
  auto stride_bytes = [](int size, int64_t stride, uint64_t packed) {
    return cuuint64_t(size == 1 ? packed : uint64_t(stride) * 2);
  };
  const uint64_t q_row = 2 * uint64_t(a.q_channels), q_head = q_row * a.seqlen_q, q_batch = q_head * a.heads_q;
  const CUtensorMap map_q =
      Q_FUSED ? sage_cuda::byte_tensor_map<4>(
                    a.q, {cuuint64_t(q_row), cuuint64_t(a.seqlen_q), cuuint64_t(a.heads_q), cuuint64_t(a.batch)},
                    {stride_bytes(a.seqlen_q, a.q_stride_n, q_row), stride_bytes(a.heads_q, a.q_stride_h, q_head),
                     stride_bytes(a.batch, a.q_stride_b, q_batch)},
                    {128, Config<DP>::BLOCK_M, 1, 1}, "sage2 cuda: q")
              : byte_tensor_map(a.q_codes, DP, a.seqlen_q, uint64_t(a.batch) * a.heads_q, DP, Config<DP>::BLOCK_M,
                                "q_codes");
  const CUtensorMap map_k =
      byte_tensor_map(a.k_codes, DP, a.seqlen_k, uint64_t(a.batch) * a.heads_kv, DP, BLOCK_N, "k_codes");
  const CUtensorMap map_v =
      byte_tensor_map(a.v_codes, a.npad, DP, uint64_t(a.batch) * a.heads_kv, BLOCK_N, DP, "v_codes");
  const int m_blocks = (a.seqlen_q + Config<DP>::BLOCK_M - 1) / Config<DP>::BLOCK_M;
  const int64_t n_work = int64_t(m_blocks) * a.batch * a.heads_q;
  // (the kernel steps its work tile index by the grid size in int)
  if (n_work > INT_MAX / 2) throw std::invalid_argument("sage2 cuda: too many query blocks (batch * heads * row blocks)");
  if (Q_FUSED && (a.q_channels < 1 || a.q_channels > DP))
    throw std::invalid_argument("sage2 cuda: q has " + std::to_string(a.q_channels) + " channels, more than " +
                                std::to_string(DP));
  if (!(a.q_max == 127 || a.q_max == 7) || !(a.q_group_pairs == 1 || a.q_group_pairs == 8 || a.q_group_pairs == 32))
    throw std::invalid_argument("sage2 cuda: q_max must be 127 or 7 and q_group_pairs 1, 8 or 32");
  if (n_work == 0) return;
  // out's two adjacent columns as one word: 4-byte aligned rows (every stride of a dimension longer
  // than 1 even), an even head dim
  auto even = [](int size, int64_t stride) { return size == 1 || stride % 2 == 0; };
  const bool out_pairs = reinterpret_cast<uintptr_t>(a.out) % 4 == 0 && a.head_dim % 2 == 0 &&
                         even(a.batch, a.out_stride_b) && even(a.heads_q, a.out_stride_h) &&
                         even(a.seqlen_q, a.out_stride_n);
  KernelParams p{};
  p.q_scale = a.q_scale, p.q_bad = a.q_bad, p.q_mult = a.q_mult, p.q_max = a.q_max, p.q_group_pairs = a.q_group_pairs;
  p.k_scale = a.k_scale, p.v_scale = a.v_scale, p.out = a.out;
  p.out_sb = a.out_stride_b, p.out_sh = a.out_stride_h, p.out_sn = a.out_stride_n, p.out_pairs = int(out_pairs);
  // V's scales by the copy engine: each KV head's row 16-byte aligned and a multiple of 16 bytes
  p.v_scale_copy = int(reinterpret_cast<uintptr_t>(a.v_scale) % 16 == 0 && a.head_dim % 4 == 0);
  p.tile_counter = a.tile_counter, p.lse = a.lse, p.first_bad = a.first_bad;
  p.heads_q = a.heads_q, p.heads_kv = a.heads_kv, p.seqlen_q = a.seqlen_q, p.seqlen_k = a.seqlen_k;
  p.head_dim = a.head_dim, p.m_blocks = m_blocks, p.n_work = int(n_work);
  auto* kernel = &sage2_fwd_kernel<DP, CAUSAL, Q_FUSED, OutT>;
  const int smem = int(sizeof(Shared<DP, Q_FUSED>)) + 1024;  // + room to align the base to 1024
  static uint64_t reserved = 0;  // one per instantiation: a bit per device
  reserve_shared_memory(kernel, smem, reserved, "sage2 cuda");
  const int64_t ctas = grid_ctas(n_work, CAUSAL, a.tile_counter != nullptr);
#ifdef SAGE2_TRACE
  const size_t trace_words = size_t(n_work) * Config<DP>::CONSUMERS * TRACE_WORDS;
  cudaMalloc(&p.trace, trace_words * sizeof(long long));
  cudaMemsetAsync(p.trace, 0, trace_words * sizeof(long long), stream);
#endif
#ifndef SAGE2_NO_PDL
  // (not where the epilogue reads V's scales itself, with __ldg: a non-coherent load is defined only
  // for data that no one writes while the grid lives, and under PDL the pass may still be writing them)
  const bool after_pass = p.v_scale_copy != 0;
#else
  const bool after_pass = false;
#endif
  if (after_pass) {
    launch_after(kernel, dim3(unsigned(ctas)), dim3(Config<DP>::THREADS), size_t(smem), stream, map_q, map_k, map_v, p);
  } else {
    kernel<<<unsigned(ctas), Config<DP>::THREADS, smem, stream>>>(map_q, map_k, map_v, p);
  }
  check_launch("sage2 cuda");
#ifdef SAGE2_TRACE
  std::vector<long long> w(trace_words);
  cudaStreamSynchronize(stream);
  cudaMemcpy(w.data(), p.trace, trace_words * sizeof(long long), cudaMemcpyDeviceToHost);
  cudaFree(p.trace);
  for (size_t e = 0; e < trace_words / TRACE_WORDS; ++e) {
    const long long* x = w.data() + e * TRACE_WORDS;
    if (x[1] == 0 && x[7] == 0) break;  // CTA 0's work tiles end here
    std::printf("SAGE2_TRACE consumer %d work_tile %d kv_tiles %lld | gap %lld | q %lld | first %lld | loop %lld | "
                "turn %lld | last_pv %lld | epilogue %lld\n",
                int(e % Config<DP>::CONSUMERS), int(e / Config<DP>::CONSUMERS), x[7], x[0], x[1], x[2], x[3], x[4],
                x[5], x[6]);
  }
  std::fflush(stdout);
#endif
}

template <int DP, bool Q_FUSED>
void dispatch_causal_dtype(const Sage2ForwardArgs& a, cudaStream_t stream) {
  if (a.causal) {
    a.out_bf16 ? launch<DP, true, Q_FUSED, __nv_bfloat16>(a, stream) : launch<DP, true, Q_FUSED, __half>(a, stream);
  } else {
    a.out_bf16 ? launch<DP, false, Q_FUSED, __nv_bfloat16>(a, stream) : launch<DP, false, Q_FUSED, __half>(a, stream);
  }
}

// Q quantized here (q as given) or by the pass (q_codes): two builds of the kernel, so that neither
// carries the other's code (csrc/NOTES.md, v13)
template <int DP>
void dispatch(const Sage2ForwardArgs& a, cudaStream_t stream) {
  if (a.q_codes == nullptr) {
    dispatch_causal_dtype<DP, true>(a, stream);
  } else {
    dispatch_causal_dtype<DP, false>(a, stream);
  }
}

}  // namespace

void sage2_sm90_forward(const Sage2ForwardArgs& a, cudaStream_t stream) {
  check_attention_shape(a.heads_q, a.heads_kv, a.npad, BLOCK_N, a.seqlen_q, a.seqlen_k, "sage2 cuda", "v_codes");
  switch (a.padded_head_dim) {
    case 64: return dispatch<64>(a, stream);
    case 128: return dispatch<128>(a, stream);
    default:
      throw std::invalid_argument("sage2 cuda: padded head dim must be 64 or 128, got " +
                                  std::to_string(a.padded_head_dim));
  }
}

}  // namespace sage_cuda
