// SageAttention3 (FP4 microscaling) forward for Hopper (sm_90a): an exact emulation.
//
// Hopper has no FP4 tensor cores. An E2M1 value times its E4M3 (or in-range E8M0) block scale has
// at most 6 significant bits, so Q, K and V, quantized to FP4 before the kernel, are dequantized
// exactly into fp16/bf16 (sage3/kernel.py's dequantize_rows), and this kernel multiplies them on
// 16-bit wgmma with fp32 accumulation. P is quantized to FP4 here, in registers, and dequantized
// exactly into the 16-bit A operand of the P V wgmma. The result is the FP4 algorithm's up to fp32
// summation order (and ex2.approx): the paper's numerics, not its speed.
//
// The schedule is sage2_sm90's (FlashAttention-3's): a producer warpgroup (TMA copies of the K and
// V^T tiles into a ring of stages; its second warp copies Q smoothing's delta_s row of each tile)
// and two consumer warpgroups of 64 query rows that take turns on the tensor cores (ping-pong),
// each overlapping the softmax and P quantization of S_j with its own P_{j-1} V_{j-1}.
// One CTA = 128 query rows = one Q-smoothing block of sage3.quant (one delta_s row per CTA).
//
// Per 128-key tile j, in each consumer warpgroup (log2 domain; sage3/emulation.py step by step):
//   s   = (Q K_j^T) * mult + delta_s_j * mult        fp32; mult = sm_scale * log2(e)
//   m'  = max(m, rowmax s);  p = exp2(s - m' + c)     c = log2(2688) two-level (p in (0, 2688]), or 0
//   l   = exp2(m - m') l + rowsum p                   from the unquantized p
//   P   = phi(p)  per 16 keys (NVFP4): s_b = max/6, codes = E2M1(p * (1/s_b)), scale E4M3(s_b);
//                 per 32 keys (MXFP4): s_b = 2^(floor(log2 max) - 2), codes = E2M1(p / s_b)
//   O   = exp2(m - m') O + P_deq V_j                  the wgmma accumulates into O (fp32)
//   out = O / l
// The KV tile is part of the algorithm (p is shifted by the running max before P is quantized):
// 128 keys here, the official Blackwell kernel's; the emulation takes kv_tile=128 to match.
//
// Register layouts: a 64-row warpgroup accumulator gives lane t (= lane % 4) of row g (= lane / 4,
// + 8 for the second half) columns {8n + 2t, 8n + 2t + 1}. The A operand of a k16 step over keys
// 16c..16c+15 wants exactly the values the S accumulator holds for those keys (FlashAttention-3's
// register reuse), and one NVFP4 block of P is one k16 step: 4 values per lane and row, the block
// max is 3 in-lane maxima and 2 quad shuffles.
#include <cfloat>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include "../common/exact_div.cuh"
#include "../common/hopper.cuh"
#include "../common/launch.h"
#include "../common/pingpong.cuh"
#include "../common/tensor_map.h"
#include "../common/wgmma.cuh"
#include "attention.h"

namespace sage_cuda {
namespace {

constexpr int WG_ROWS = 64;    // query rows per consumer warpgroup
constexpr int CONSUMERS = 2;
constexpr int BLOCK_M = WG_ROWS * CONSUMERS;  // = sage3's Q-smoothing block (128)
constexpr int BLOCK_N = 128;   // keys per tile (see above: part of the algorithm)
constexpr int STAGES = 2;      // 32 KB (Q) + 2 x 64 KB (K, V^T) at head dim 128
constexpr int THREADS = 128 * (CONSUMERS + 1);
constexpr int CONSUMER_REGS = 240;  // 128 x 24 + 256 x 240 <= 64K
constexpr int SWIZZLE_BYTES = 128;  // TMA rows of 64 16-bit values, 128-byte swizzle
constexpr int CHUNK = SWIZZLE_BYTES / 2;  // 16-bit values per swizzled row

// 16-bit tiles are stored K-major in chunks of 64 values along the reduction dim (one 128-byte
// swizzled row each): chunk c of a [rows][DP] tile sits at c * rows * 128 bytes.
template <int DP>
struct Shared {
  alignas(1024) uint8_t q[BLOCK_M * DP * 2];
  alignas(1024) uint8_t k[STAGES][BLOCK_N * DP * 2];
  alignas(1024) uint8_t vt[STAGES][DP * BLOCK_N * 2];  // two chunks of [DP][64 keys]
  float ds[STAGES][BLOCK_N];  // delta_s * mult of the tile's keys (written by the producer's warp 1)
  uint64_t q_full, k_full[STAGES], k_empty[STAGES], v_full[STAGES], v_empty[STAGES], ds_full[STAGES], ds_empty[STAGES];
};

struct KernelParams {
  const float* delta_s;
  void* out;
  int64_t out_sb, out_sh, out_sn;
  float* lse;
  float mult, log2_p_range;
  int heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, n_ds_blocks;
};

// wgmma descriptor of k16 step `kk` of a K-major 16-bit tile with `rows` rows (see Shared)
__device__ __forceinline__ uint64_t desc_step(uint64_t base, int rows, int kk) {
  return base + uint64_t(((kk / 4) * rows * SWIZZLE_BYTES) >> 4) + uint64_t(2 * (kk % 4));
}

// S_j = Q K_j^T (fp32): issue the k16 steps over the head dim; the caller waits.
template <int DP, bool BF16>
__device__ __forceinline__ void issue_qk(Shared<DP>& sm, int j, uint64_t desc_q, float (&s)[64]) {
  const int stage = j % STAGES;
  mbar_wait(&sm.k_full[stage], (j / STAGES) & 1);
  const uint64_t desc_k = smem_desc_kmajor(sm.k[stage], SWIZZLE_BYTES);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < DP / 16; ++kk)
    wgmma_16bit_m64n128k16_ss<BF16>(s, desc_step(desc_q, BLOCK_M, kk), desc_step(desc_k, BLOCK_N, kk), kk);
  wgmma_commit();
}

// O += P_j V_j, P_j from registers (8 k16 steps over the tile's keys); the caller waits.
template <int DP, bool BF16>
__device__ __forceinline__ void issue_pv(Shared<DP>& sm, int j, const uint32_t (&pa)[8][4], float (&o)[DP / 2]) {
  const int stage = j % STAGES;
  mbar_wait(&sm.v_full[stage], (j / STAGES) & 1);
  const uint64_t desc_v = smem_desc_kmajor(sm.vt[stage], SWIZZLE_BYTES);
  wgmma_fence();
#pragma unroll
  for (int c = 0; c < BLOCK_N / 16; ++c) {
    if constexpr (DP == 128) {
      wgmma_16bit_m64n128k16_rs<BF16>(o, pa[c], desc_step(desc_v, DP, c), 1);
    } else {
      wgmma_16bit_m64n64k16_rs<BF16>(o, pa[c], desc_step(desc_v, DP, c), 1);
    }
  }
  wgmma_commit();
}

// fp32 -> the fp32 value of its E4M3 rounding (nearest even, saturating at 448), for two at once
__device__ __forceinline__ float2 e4m3_round2(float a, float b) {
  uint16_t bytes;
  uint32_t halves;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(bytes) : "f"(b), "f"(a));
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;\n" : "=r"(halves) : "h"(bytes));
  return __half22float2(*reinterpret_cast<__half2*>(&halves));
}

// NVFP4 block scales of P, two blocks at once: s = max / 6 (the fp32 quotient, correctly rounded),
// its E4M3 rounding s8 (the stored scale) and inv = 1 / s (correctly rounded), by which P is
// multiplied before the E2M1 rounding: sage3/emulation.py's quantize_p. The branch-free forms of
// div.rn and rcp.rn (common/exact_div.cuh): the library's branch to a slow path per call split the
// unrolled P quantization into dozens of serial blocks (v1, 2x slower). rcp_rn_normal is exact for
// the normal s that reach it; a block whose s8 is 0 dequantizes to 0 whatever its codes, so it gets
// inv = 0 (no Inf * 0). sage3_p_scale_mismatches checks them for every fp32 max in (0, 2688].
struct Nvfp4Scales {
  float s8[2], inv[2];
};
__device__ __forceinline__ float div6_rn(float x) { return div_rn_finite(x, 6.f, 1.f / 6.f); }
__device__ __forceinline__ Nvfp4Scales nvfp4_scales(float bmax0, float bmax1) {
  const float s[2] = {div6_rn(bmax0), div6_rn(bmax1)};
  const float2 s8 = e4m3_round2(s[0], s[1]);
  return Nvfp4Scales{{s8.x, s8.y}, {s8.x > 0.f ? rcp_rn_normal(s[0]) : 0.f, s8.y > 0.f ? rcp_rn_normal(s[1]) : 0.f}};
}

// a >= 0 (fp32, below 8) rounded onto the E2M1 grid {0, .5, 1, 1.5, 2, 3, 4, 6}, nearest, ties to
// the even code: fl(a + M) - M with M = 2^(E + 22) for a's binade 2^E, E = max(0, floor(log2 a)),
// has the grid's spacing there (sage3/fp4_triton.py's e2m1_round_magic; a < 8 keeps E <= 2).
// SATURATE clips at 6 (MXFP4, whose a reaches 8); NVFP4's a = p * inv <= 6 (1 + 2^-22) rounds to 6
// without it. The rounded adds keep the compiler from fusing them with the multiply that made a.
template <bool SATURATE>
__device__ __forceinline__ float e2m1_round(float a) {
  const float m = __int_as_float((__float_as_int(fmaxf(a, 1.f)) & 0x7F800000) + (22 << 23));
  const float r = __fsub_rn(__fadd_rn(a, m), m);
  return SATURATE ? fminf(r, 6.f) : r;
}

// P (fp32, >= 0) -> FP4 per block of keys, dequantized in place (exact in fp32 and in 16 bits).
// Value i of a lane is row (i / 2) % 2, key 8 (i / 4) + 2t + i % 2 of the tile.
template <bool MX>
__device__ __forceinline__ void quantize_p(float (&p)[64]) {
  if constexpr (!MX) {  // NVFP4: block b = keys 16b..16b+15 = values 8b + {0, 1, 4, 5} (row 0), + 2 (row 1)
#pragma unroll
    for (int b = 0; b < 8; ++b) {
      float bmax[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int i = 8 * b + 2 * r;
        bmax[r] = quad_max(fmaxf(fmaxf(p[i], p[i + 1]), fmaxf(p[i + 4], p[i + 5])));
      }
      const Nvfp4Scales sc = nvfp4_scales(bmax[0], bmax[1]);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          float& x = p[8 * b + 2 * r + k % 2 + 4 * (k / 2)];
          x = e2m1_round<false>(__fmul_rn(x, sc.inv[r])) * sc.s8[r];
        }
      }
    }
  } else {  // MXFP4: block b = keys 32b..32b+31 = values 16b + 4n + {0, 1} (row 0), + 2 (row 1)
#pragma unroll
    for (int b = 0; b < 4; ++b) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = 0.f;
#pragma unroll
        for (int n = 0; n < 4; ++n) mx = fmaxf(mx, fmaxf(p[16 * b + 4 * n + 2 * r], p[16 * b + 4 * n + 2 * r + 1]));
        const float bmax = quad_max(mx);
        const int e = ((__float_as_int(bmax) >> 23) & 0xFF) - 2;  // floor(log2 max) - 2, biased
        const bool ok = bmax > 0.f && e > 0;
        const int ec = min(max(e, 1), 253);
        const float sc = ok ? __int_as_float(ec << 23) : 0.f;
        const float inv = ok ? __int_as_float((254 - ec) << 23) : 0.f;  // 1/sc, exact
#pragma unroll
        for (int n = 0; n < 4; ++n)
#pragma unroll
          for (int e2 = 0; e2 < 2; ++e2) {
            float& x = p[16 * b + 4 * n + 2 * r + e2];
            x = e2m1_round<true>(__fmul_rn(x, inv)) * sc;
          }
      }
    }
  }
}

// P (dequantized, exact in 16 bits) as the A operand of the P V wgmma's k16 steps
template <bool BF16>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (BF16) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  } else {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
}
template <bool BF16>
__device__ __forceinline__ void pack_p(const float (&p)[64], uint32_t (&pa)[8][4]) {
#pragma unroll
  for (int c = 0; c < 8; ++c) {
#pragma unroll
    for (int r = 0; r < 4; ++r) pa[c][r] = pack2<BF16>(p[8 * c + 2 * r], p[8 * c + 2 * r + 1]);
  }
}

// What the softmax of every tile needs from the thread's position.
struct Softmax {
  int row[2];
  int seqlen_k, q_offset, t;
  float mult, log2_p_range;
  bool smooth;
};

// The online softmax of tile j, in place on S (in: Q K^T; out: p, unquantized): updates m and l
// (this lane's columns), returns alpha, the factor O must be scaled by. ds: the tile's delta_s *
// mult in shared memory. MASKED: keys past the end and (causal) keys after the diagonal get p = 0.
template <bool CAUSAL, bool MASKED>
__device__ __forceinline__ void softmax_tile(float (&s)[64], int j, float (&m)[2], float (&l)[2], const Softmax& a,
                                             const float* ds, float (&alpha)[2]) {
  const int start_n = j * BLOCK_N;
  // row reductions in 4 independent chains per row (sage2_sm90 v9: dependent chains stall)
  constexpr int CHAINS = 4;
  auto chain = [](int i) { return i % 2 + 2 * ((i / 4) % 2); };
  auto visible = [&](int i) {
    const int col = start_n + 8 * (i / 4) + 2 * a.t + (i % 2);
    return col < a.seqlen_k && (!CAUSAL || col <= a.row[(i / 2) % 2] + a.q_offset);
  };
  if (a.smooth) {
#pragma unroll
    for (int n = 0; n < 16; ++n) {
      const float2 d = *reinterpret_cast<const float2*>(ds + 8 * n + 2 * a.t);
      s[4 * n + 0] = fmaf(s[4 * n + 0], a.mult, d.x);
      s[4 * n + 1] = fmaf(s[4 * n + 1], a.mult, d.y);
      s[4 * n + 2] = fmaf(s[4 * n + 2], a.mult, d.x);
      s[4 * n + 3] = fmaf(s[4 * n + 3], a.mult, d.y);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 64; ++i) s[i] *= a.mult;
  }
  float part[2][CHAINS];
#pragma unroll
  for (int c = 0; c < CHAINS; ++c) part[0][c] = part[1][c] = -INFINITY;
#pragma unroll
  for (int i = 0; i < 64; ++i) {
    if (MASKED && !visible(i)) s[i] = -INFINITY;
    part[(i / 2) % 2][chain(i)] = fmaxf(part[(i / 2) % 2][chain(i)], s[i]);
  }
  float shift[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float tile_max = fmaxf(fmaxf(part[r][0], part[r][1]), fmaxf(part[r][2], part[r][3]));
    const float m_new = fmaxf(m[r], quad_max(tile_max));
    const float m_use = m_new == -INFINITY ? 0.f : m_new;  // no visible key yet: p = 0
    alpha[r] = fast_exp2(m[r] - m_use);
    shift[r] = m_use - a.log2_p_range;
    m[r] = m_new;
  }
  float sum[2][CHAINS] = {};
#pragma unroll
  for (int i = 0; i < 64; ++i) {
    s[i] = fast_exp2(s[i] - shift[(i / 2) % 2]);  // exp2(-inf) = 0 for masked keys
    sum[(i / 2) % 2][chain(i)] += s[i];
  }
#pragma unroll
  for (int r = 0; r < 2; ++r)  // this lane's columns; the quad is summed at the end
    l[r] = l[r] * alpha[r] + ((sum[r][0] + sum[r][1]) + (sum[r][2] + sum[r][3]));
}

// After S_j's wgmma completed: K_j's stage goes back to the producer, then the softmax of the tile
// (delta_s from its stage once the producer's warp 1 has written it) and P's FP4 quantization.
template <bool CAUSAL, bool MASKED, bool MX, int DP>
__device__ __forceinline__ void softmax_after_qk(Shared<DP>& sm, float (&s)[64], int j, float (&m)[2], float (&l)[2],
                                                 const Softmax& a, int lane, float (&alpha)[2]) {
  fence_registers(s);
  if (lane == 0) mbar_arrive(&sm.k_empty[j % STAGES]);
  if (a.smooth) mbar_wait(&sm.ds_full[j % STAGES], (j / STAGES) & 1);
  softmax_tile<CAUSAL, MASKED>(s, j, m, l, a, sm.ds[j % STAGES], alpha);
  if (a.smooth) mbar_arrive(&sm.ds_empty[j % STAGES]);  // (each thread: its own reads are done)
  quantize_p<MX>(s);
}

// After P_{j-1} V_{j-1} completed: its V stage goes back to the producer, O takes tile j's alpha.
template <int DP>
__device__ __forceinline__ void rescale_o(Shared<DP>& sm, int j_done, const float (&alpha)[2], float (&o)[DP / 2],
                                          int lane) {
  fence_registers(o);
  if (lane == 0) mbar_arrive(&sm.v_empty[j_done % STAGES]);
  // once the row maxima settle, most tiles leave them unchanged (alpha = 1) in the whole warp
  if (__any_sync(0xffffffff, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
    for (int i = 0; i < DP / 2; ++i) o[i] *= alpha[(i / 2) % 2];
  }
}

template <int DP, bool CAUSAL, bool BF16, bool MX>
__global__ void __launch_bounds__(THREADS, 1)
    sage3_fwd_kernel(const __grid_constant__ CUtensorMap map_q, const __grid_constant__ CUtensorMap map_k,
                     const __grid_constant__ CUtensorMap map_v, const KernelParams p) {
  using OutT = std::conditional_t<BF16, __nv_bfloat16, __half>;
  extern __shared__ uint8_t smem_raw[];
  Shared<DP>& sm = *reinterpret_cast<Shared<DP>*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));

  // warp-uniform to the compiler (wgmma in a branch it thinks divergent is serialized: C7518)
  const int warpgroup = __shfl_sync(0xffffffff, int(threadIdx.x) / 128, 0);
  const CtaTiles cta = cta_tiles<BLOCK_M, BLOCK_N, CAUSAL>(p.heads_q, p.heads_kv, p.seqlen_q, p.seqlen_k);
  const int m_block = cta.m_block, bh = cta.bh, b = cta.b, h = cta.h, kv_bh = cta.kv_bh;
  const int q_offset = cta.q_offset, n_tiles = cta.n_tiles, n_unmasked = cta.n_unmasked;
  const bool smooth = p.delta_s != nullptr;

  if (threadIdx.x == 0) {
    mbar_init(&sm.q_full, 1);
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(&sm.k_full[s], 1);
      mbar_init(&sm.v_full[s], 1);
      mbar_init(&sm.k_empty[s], 4 * CONSUMERS);  // one arrival per consumer warp
      mbar_init(&sm.v_empty[s], 4 * CONSUMERS);
      mbar_init(&sm.ds_full[s], 32);             // every lane of the producer's warp 1
      mbar_init(&sm.ds_empty[s], 128 * CONSUMERS);  // every consumer thread, once it has read its values
    }
    fence_barrier_init();
  }
  __syncthreads();

  if (warpgroup == 0) {  // producer
    regs_dec<24>();
    if (threadIdx.x == 0) {
      prefetch_tensor_map(&map_q);
      prefetch_tensor_map(&map_k);
      prefetch_tensor_map(&map_v);
      mbar_arrive_expect_tx(&sm.q_full, BLOCK_M * DP * 2);
      for (int c = 0; c < DP / CHUNK; ++c)
        tma_load_3d(sm.q + c * BLOCK_M * SWIZZLE_BYTES, &map_q, &sm.q_full, c * SWIZZLE_BYTES, m_block * BLOCK_M, bh);
      for (int j = 0; j < n_tiles; ++j) {
        const int stage = j % STAGES;
        const uint32_t phase = (j / STAGES) & 1;
        mbar_wait(&sm.k_empty[stage], phase ^ 1);
        mbar_arrive_expect_tx(&sm.k_full[stage], BLOCK_N * DP * 2);
        for (int c = 0; c < DP / CHUNK; ++c)
          tma_load_3d(sm.k[stage] + c * BLOCK_N * SWIZZLE_BYTES, &map_k, &sm.k_full[stage], c * SWIZZLE_BYTES,
                      j * BLOCK_N, kv_bh);
        mbar_wait(&sm.v_empty[stage], phase ^ 1);
        mbar_arrive_expect_tx(&sm.v_full[stage], DP * BLOCK_N * 2);
        for (int c = 0; c < BLOCK_N / CHUNK; ++c)
          tma_load_3d(sm.vt[stage] + c * DP * SWIZZLE_BYTES, &map_v, &sm.v_full[stage],
                      j * BLOCK_N * 2 + c * SWIZZLE_BYTES, 0, kv_bh);
      }
    } else if (smooth && threadIdx.x / 32 == 1) {
      // delta_s of this CTA's Q block (one row), times mult, into a stage every consumer thread has
      // read; the next tile's values are loaded before the wait, so their latency hides behind it.
      const int lane = threadIdx.x % 32;
      const float* ds_row = p.delta_s + (int64_t(bh) * p.n_ds_blocks + m_block) * p.seqlen_k;
      auto load = [&](int j, float (&v)[BLOCK_N / 32]) {
#pragma unroll
        for (int i = 0; i < BLOCK_N / 32; ++i) {
          const int key = j * BLOCK_N + 32 * i + lane;
          v[i] = key < p.seqlen_k ? ds_row[key] : 0.f;
        }
      };
      float next[BLOCK_N / 32];
      load(0, next);
      for (int j = 0; j < n_tiles; ++j) {
        const int stage = j % STAGES;
        float cur[BLOCK_N / 32];
#pragma unroll
        for (int i = 0; i < BLOCK_N / 32; ++i) cur[i] = next[i];
        if (j + 1 < n_tiles) load(j + 1, next);
        mbar_wait(&sm.ds_empty[stage], ((j / STAGES) & 1) ^ 1);
#pragma unroll
        for (int i = 0; i < BLOCK_N / 32; ++i) sm.ds[stage][32 * i + lane] = cur[i] * p.mult;
        mbar_arrive(&sm.ds_full[stage]);
      }
    }
    return;
  }

  regs_inc<CONSUMER_REGS>();
  const int consumer = warpgroup - 1;
  const int tid = threadIdx.x % 128, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int row0 = m_block * BLOCK_M + consumer * WG_ROWS + warp * 16 + g;
  const Softmax sm_args{{row0, row0 + 8}, p.seqlen_k, q_offset, t, p.mult, p.log2_p_range, smooth};

  float o[DP / 2];
#pragma unroll
  for (int i = 0; i < DP / 2; ++i) o[i] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  mbar_wait(&sm.q_full, 0);
  const uint64_t desc_q = smem_desc_kmajor(sm.q + consumer * WG_ROWS * SWIZZLE_BYTES, SWIZZLE_BYTES);
  // Section j (one turn on the tensor cores): issue S_j = Q K_j^T and P_{j-1} V_{j-1}, pass the
  // turn; while both run (and the other warpgroup takes its turn), the softmax of S_j and P_j's FP4
  // quantization; then O takes alpha_j and P_j is packed for the next section. The first and last
  // sections are peeled off: straight-line wgmma code in the loop (else ptxas serializes: C7514).
  uint32_t pa[8][4];
  auto section = [&](int j, auto masked) {
    float s[64], alpha[2];
    turn_wait(consumer);
    issue_qk<DP, BF16>(sm, j, desc_q, s);
    issue_pv<DP, BF16>(sm, j - 1, pa, o);
    turn_pass(consumer, CONSUMERS);
    wgmma_wait<1>();  // S_j is ready; P_{j-1} V_{j-1} may still run
    softmax_after_qk<CAUSAL, decltype(masked)::value, MX>(sm, s, j, m, l, sm_args, lane, alpha);
    wgmma_wait<0>();
    rescale_o(sm, j - 1, alpha, o, lane);
    pack_p<BF16>(s, pa);
  };
  const bool last = consumer == CONSUMERS - 1;
  if (last) turn_pass(consumer, CONSUMERS);  // consumer 0 goes first
  if (n_tiles > 0) {
    {
      float s[64], alpha[2];
      turn_wait(consumer);
      issue_qk<DP, BF16>(sm, 0, desc_q, s);
      turn_pass(consumer, CONSUMERS);
      wgmma_wait<0>();
      if (n_unmasked > 0) {
        softmax_after_qk<CAUSAL, false, MX>(sm, s, 0, m, l, sm_args, lane, alpha);
      } else {
        softmax_after_qk<CAUSAL, true, MX>(sm, s, 0, m, l, sm_args, lane, alpha);
      }
      pack_p<BF16>(s, pa);  // (O is still 0: no alpha to apply)
    }
    const int unmasked_end = min(n_unmasked, n_tiles);
    for (int j = 1; j < unmasked_end; ++j) section(j, std::false_type{});
    for (int j = max(1, unmasked_end); j < n_tiles; ++j) section(j, std::true_type{});
    turn_wait(consumer);
    issue_pv<DP, BF16>(sm, n_tiles - 1, pa, o);
    if (!last) turn_pass(consumer, CONSUMERS);  // (balanced: the last consumer passed once up front)
    wgmma_wait<0>();
    fence_registers(o);
  } else {
    turn_wait(consumer);
    if (!last) turn_pass(consumer, CONSUMERS);
  }

  // epilogue: out = O / l, the log2-domain LSE (without the two-level shift)
  OutT* out = reinterpret_cast<OutT*>(p.out) + b * p.out_sb + h * p.out_sh;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l_row = quad_sum(l[r]);
    const int row = sm_args.row[r];
    if (row >= p.seqlen_q) continue;
    const float inv_l = 1.f / (l_row == 0.f ? 1.f : l_row);
    OutT* out_row = out + int64_t(row) * p.out_sn;
#pragma unroll
    for (int nt = 0; nt < DP / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = 8 * nt + 2 * t + e;
        if (col < p.head_dim) out_row[col] = to_out<OutT>(o[4 * nt + 2 * r + e] * inv_l);
      }
    }
    if (p.lse != nullptr && t == 0) p.lse[int64_t(bh) * p.seqlen_q + row] = m[r] + log2f(l_row) - p.log2_p_range;
  }
}

// The branch-free P scales against the library's div.rn / rcp.rn for every fp32 max in [lo, hi]
// (bit patterns): counts[0] the maxima whose s differs where it is used (s8 > 0), counts[1] s8,
// counts[2] inv; first[i] the smallest such max (bits).
__global__ void p_scale_check_kernel(uint32_t lo, uint32_t hi, unsigned long long* counts, unsigned int* first) {
  unsigned long long bad[3] = {0, 0, 0};
  for (uint64_t bits = uint64_t(lo) + blockIdx.x * blockDim.x + threadIdx.x; bits <= hi;
       bits += uint64_t(gridDim.x) * blockDim.x) {
    const float bmax = __uint_as_float(uint32_t(bits));
    const Nvfp4Scales fast = nvfp4_scales(bmax, bmax);
    const float s = __fdiv_rn(bmax, 6.f);
    const float s8 = e4m3_round2(s, s).x;
    const float inv = s8 > 0.f ? __frcp_rn(s) : 0.f;
    const bool differs[3] = {s8 > 0.f && __float_as_uint(div6_rn(bmax)) != __float_as_uint(s),
                             __float_as_uint(fast.s8[0]) != __float_as_uint(s8),
                             __float_as_uint(fast.inv[0]) != __float_as_uint(inv)};
#pragma unroll
    for (int i = 0; i < 3; ++i) {
      if (differs[i]) {
        ++bad[i];
        atomicMin(first + i, uint32_t(bits));
      }
    }
  }
#pragma unroll
  for (int i = 0; i < 3; ++i)
    if (bad[i]) atomicAdd(counts + i, bad[i]);
}

// ---- host ----

// A 3-D tensor of 16-bit values [d2][d1][d0] (d0 contiguous) as bytes, read in boxes of 64 values
// (one 128-byte swizzled row) x box1 rows.
CUtensorMap tensor_map_16bit(const void* base, uint64_t d0, uint64_t d1, uint64_t d2, uint32_t box1, const char* what) {
  return byte_tensor_map<3>(base, {2 * d0, d1, d2}, {2 * d0, 2 * d0 * d1}, {SWIZZLE_BYTES, box1, 1},
                            std::string("sage3 cuda: ") + what);
}

template <int DP, bool CAUSAL, bool BF16, bool MX>
void launch(const Sage3ForwardArgs& a, cudaStream_t stream) {
  const CUtensorMap map_q = tensor_map_16bit(a.q, DP, a.seqlen_q, uint64_t(a.batch) * a.heads_q, BLOCK_M, "q");
  const CUtensorMap map_k = tensor_map_16bit(a.k, DP, a.seqlen_k, uint64_t(a.batch) * a.heads_kv, BLOCK_N, "k");
  const CUtensorMap map_v = tensor_map_16bit(a.vt, a.npad, DP, uint64_t(a.batch) * a.heads_kv, DP, "vt");
  const KernelParams p{a.delta_s,  a.out,      a.out_stride_b, a.out_stride_h, a.out_stride_n,
                       a.lse,      a.mult,     a.log2_p_range, a.heads_q,      a.heads_kv,
                       a.seqlen_q, a.seqlen_k, a.head_dim,     (a.seqlen_q + BLOCK_M - 1) / BLOCK_M};
  auto* kernel = &sage3_fwd_kernel<DP, CAUSAL, BF16, MX>;
  const int smem = int(sizeof(Shared<DP>)) + 1024;  // + room to align the base to 1024
  static uint64_t reserved = 0;  // one per instantiation: a bit per device
  reserve_shared_memory(kernel, smem, reserved, "sage3 cuda");
  const dim3 grid((a.seqlen_q + BLOCK_M - 1) / BLOCK_M, a.batch * a.heads_q);
  kernel<<<grid, THREADS, smem, stream>>>(map_q, map_k, map_v, p);
  check_launch("sage3 cuda");
}

template <int DP, bool CAUSAL>
void dispatch_dtype_format(const Sage3ForwardArgs& a, cudaStream_t stream) {
  if (a.bf16) {
    a.mxfp4 ? launch<DP, CAUSAL, true, true>(a, stream) : launch<DP, CAUSAL, true, false>(a, stream);
  } else {
    a.mxfp4 ? launch<DP, CAUSAL, false, true>(a, stream) : launch<DP, CAUSAL, false, false>(a, stream);
  }
}

template <int DP>
void dispatch(const Sage3ForwardArgs& a, cudaStream_t stream) {
  a.causal ? dispatch_dtype_format<DP, true>(a, stream) : dispatch_dtype_format<DP, false>(a, stream);
}

}  // namespace

void sage3_p_scale_mismatches(uint32_t lo_bits, uint32_t hi_bits, uint64_t (&counts)[3], uint32_t (&first)[3],
                               cudaStream_t stream) {
  run_mismatch_check(
      [&](unsigned long long* c, unsigned int* f) { p_scale_check_kernel<<<1024, 256, 0, stream>>>(lo_bits, hi_bits, c, f); },
      "sage3 p-scale check", counts, first, stream);
}

void sage3_sm90_forward(const Sage3ForwardArgs& a, cudaStream_t stream) {
  check_attention_shape(a.heads_q, a.heads_kv, a.npad, BLOCK_N, a.seqlen_q, a.seqlen_k, "sage3 cuda", "vt");
  switch (a.padded_head_dim) {
    case 64: return dispatch<64>(a, stream);
    case 128: return dispatch<128>(a, stream);
    default:
      throw std::invalid_argument("sage3 cuda: padded head dim must be 64 or 128, got " +
                                  std::to_string(a.padded_head_dim));
  }
}

}  // namespace sage_cuda
