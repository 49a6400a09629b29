// Decode: the split-KV sweep of common/decode.py (common/triton_decode.py's decode_split_kernel)
// in CUDA. The algorithm, tile for tile, is the one `backend="torch"` emulates
// (common.decode.decode_emulated); what differs from the Triton kernel is only how the work is laid
// out on the machine, because decode is bound by reading K and V once:
//
//   * cp.async copies each 64-key tile of K and V (fp16/bf16, as the caller stores them) into
//     shared memory, three tiles in flight per program, two programs per SM;
//   * 4 warps quantize the tile from shared memory: K's token mean over the tile (per channel),
//     K - mean to INT8/INT4 codes with one scale per tile or per token, straight into mma.sync
//     B fragments; INT8 Q K^T on mma.sync m16n8k32 (16 query rows: every query head of the KV head);
//   * the online softmax over the tile (one row max shared through shared memory, so P is rounded
//     exactly as the emulation rounds it), P to fp16 or to FP8 E4M3 (kept as exact fp16) in shared
//     memory; V to FP8 per channel per tile in place (sage2);
//   * P V on mma.sync m16n8k16, each warp a quarter of the channels over all 64 keys, summed in fp16
//     (sage1, the paper's FP16 accumulator) or fp32, then rescaled into an fp32 accumulator.
//
// As in the Triton fast sweep there are no NaN/Inf checks per element: a non-finite input cannot
// vanish from K's token sums, l or the accumulator, so one test per program sets its flag and the
// combine kernel (Triton, common/triton_decode.py) redoes flagged programs with the careful sweep.
// Products that must round before an add use __fmul_rn / __fadd_rn: the emulation rounds them.
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>

#include "common/mma_sync.cuh"
#include "decode/split_kv.h"

namespace sage_cuda {
namespace {

constexpr int kTile = 64;     // keys per tile: common.decode.DECODE_TILE
constexpr int kRows = 16;     // query rows per program: (query heads of a KV head) x (queries, padded)
constexpr int kThreads = 128;
constexpr int kStages = 3;    // tiles in flight
constexpr int kMinBlocks = 2; // programs per SM the registers must allow
constexpr float kInf = __builtin_huge_valf();

template <int DP>
struct Layout {
  static constexpr int kPitchK = DP * 2 + 32;  // bytes per K row: 8-byte fragment reads hit 32 banks
  static constexpr int kPitchV = DP * 2 + 16;  // bytes per V row: ldmatrix rows hit distinct banks
  static constexpr int kPitchP = kTile * 2 + 16;
  static constexpr int kK = 0;
  static constexpr int kV = kK + kStages * kTile * kPitchK;
  static constexpr int kP = kV + kStages * kTile * kPitchV;   // P (fp16), Q's codes in the prologue
  static constexpr int kMeanK = kP + kRows * kPitchP;          // float[DP]: the tile's token mean
  static constexpr int kScaleV = kMeanK + DP * 4;              // float[DP]: V's FP8 scale per channel
  static constexpr int kQm = kScaleV + DP * 4;                 // float[16]: q . mean_k
  static constexpr int kScaleQ = kQm + kRows * 4;              // float[16]
  static constexpr int kBadQ = kScaleQ + kRows * 4;            // int[16]
  static constexpr int kAmax = kBadQ + kRows * 4;              // float[4]: per warp
  static constexpr int kRowMax = kAmax + 16;                   // float[4][16]
  static constexpr int kRowSum = kRowMax + 4 * kRows * 4;      // float[4][16]
  static constexpr int kBytes = kRowSum + 4 * kRows * 4;
  static_assert(kRows * DP <= kRows * kPitchP, "Q's codes must fit in P's buffer");
};

__device__ __forceinline__ float abs_nan_as_inf(float x) { return x != x ? kInf : fabsf(x); }

template <typename In>
__device__ __forceinline__ float4 load4(const char* p) {  // four consecutive 16-bit values
  const uint2 r = *reinterpret_cast<const uint2*>(p);
  const float2 a = pair_to_float2<In>(r.x), b = pair_to_float2<In>(r.y);
  return make_float4(a.x, a.y, b.x, b.y);
}

template <int DP, bool BF16, bool FP8>
__global__ void __launch_bounds__(kThreads, kMinBlocks) decode_split_kernel(const DecodeSplitArgs a) {
  using In = std::conditional_t<BF16, __nv_bfloat16, __half>;
  using L = Layout<DP>;
  constexpr int KS = DP / 32;   // k-steps of the INT8 mma over channels
  constexpr int CW = DP / 4;    // channels per warp (K sums, V pass, P V)
  constexpr int NT = CW / 8;    // n-tiles of P V per warp
  constexpr int QC = DP / 8;    // Q channels per thread in the prologue (8 threads per row)
  extern __shared__ __align__(16) char smem[];
  char* s_k = smem + L::kK;
  char* s_v = smem + L::kV;
  char* s_p = smem + L::kP;
  float* s_mean_k = reinterpret_cast<float*>(smem + L::kMeanK);
  float* s_scale_v = reinterpret_cast<float*>(smem + L::kScaleV);
  float* s_qm = reinterpret_cast<float*>(smem + L::kQm);
  float* s_scale_q = reinterpret_cast<float*>(smem + L::kScaleQ);
  int* s_bad_q = reinterpret_cast<int*>(smem + L::kBadQ);
  float* s_amax = reinterpret_cast<float*>(smem + L::kAmax);
  float* s_row_max = reinterpret_cast<float*>(smem + L::kRowMax);
  float* s_row_sum = reinterpret_cast<float*>(smem + L::kRowSum);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const int split = blockIdx.x, kv_bh = blockIdx.y;
  const int b = kv_bh / a.heads_kv, hk = kv_bh % a.heads_kv;
  const int nq = a.seqlen_q, nk = a.seqlen_k, q_offset = nk - nq;  // causal: bottom-right
  const float qmax = float(a.qmax);

  // ---- Q: log2-scaled fp32 (non-finite rows zeroed and marked), one INT scale per row ----
  float q[QC];
  {
    const int row = tid >> 3, part = tid & 7;
    const int head = row / a.rows_per_head, i = row % a.rows_per_head;
    const bool ok = head < a.group && i < nq;
    const In* src = static_cast<const In*>(a.q) + b * a.q_stride_b + int64_t(hk * a.group + head) * a.q_stride_h +
                    int64_t(i) * a.q_stride_n + part * QC;
    int bad = 0;
    float amax = 0.f;
#pragma unroll
    for (int j = 0; j < QC; ++j) {
      float x = ok ? __fmul_rn(to_float(src[j]), a.qk_mult) : 0.f;
      if (!isfinite(x)) bad = 1, x = 0.f;
      q[j] = x;
      amax = fmaxf(amax, fabsf(x));
    }
#pragma unroll
    for (int off = 1; off < 8; off <<= 1) {
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
      bad |= __shfl_xor_sync(0xffffffffu, bad, off);
    }
    const float sq = __fdiv_rn(amax, qmax);
    const float inv = __frcp_rn(sq == 0.f ? 1.f : sq);
    int8_t* codes = reinterpret_cast<int8_t*>(s_p) + row * DP + part * QC;
#pragma unroll
    for (int j = 0; j < QC; ++j) codes[j] = int8_t(round_even(__fmul_rn(q[j], inv)));
    if (part == 0) s_scale_q[row] = sq, s_bad_q[row] = bad;
  }
  __syncthreads();
  uint32_t qa[KS][4];  // A fragments of Q's codes, rows {g, g+8}
  {
    const int8_t* codes = reinterpret_cast<const int8_t*>(s_p);
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      const int c = ks * 32 + 4 * t4;
      qa[ks][0] = *reinterpret_cast<const uint32_t*>(codes + g * DP + c);
      qa[ks][1] = *reinterpret_cast<const uint32_t*>(codes + (g + 8) * DP + c);
      qa[ks][2] = *reinterpret_cast<const uint32_t*>(codes + g * DP + c + 16);
      qa[ks][3] = *reinterpret_cast<const uint32_t*>(codes + (g + 8) * DP + c + 16);
    }
  }
  const float sq_row[2] = {s_scale_q[g], s_scale_q[g + 8]};
  int i_row[2];
  bool ok_row[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = g + 8 * h;
    i_row[h] = row % a.rows_per_head;
    ok_row[h] = row / a.rows_per_head < a.group && i_row[h] < nq;
  }
  __syncthreads();  // P's buffer is reused below

  // ---- this program's keys: [t_begin, t_end) ----
  const int t_begin = split * a.tiles_per_split * kTile;
  const int t_end = min(t_begin + a.tiles_per_split * kTile, nk);
  const int n_tiles = t_end > t_begin ? (t_end - t_begin + kTile - 1) / kTile : 0;
  const char* k_head = reinterpret_cast<const char*>(static_cast<const In*>(a.k) + b * a.k_stride_b + hk * a.k_stride_h);
  const char* v_head = reinterpret_cast<const char*>(static_cast<const In*>(a.v) + b * a.v_stride_b + hk * a.v_stride_h);
  const int64_t k_row_bytes = a.k_stride_n * 2, v_row_bytes = a.v_stride_n * 2;
  auto load_tile = [&](int stage, int start) {
    constexpr int kChunks = DP / 8;  // 16-byte chunks per row
    char* dk = s_k + stage * kTile * L::kPitchK;
    char* dv = s_v + stage * kTile * L::kPitchV;
    for (int c = tid; c < kTile * kChunks; c += kThreads) {
      const int r = c / kChunks, col = c % kChunks, key = start + r;
      const bool in = key < nk;  // keys past the end: zero bytes (the source stays a valid address)
      const int64_t src = in ? key : start;
      cp_async16(dk + r * L::kPitchK + col * 16, k_head + src * k_row_bytes + col * 16, in);
      cp_async16(dv + r * L::kPitchV + col * 16, v_head + src * v_row_bytes + col * 16, in);
    }
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_tiles) load_tile(s, t_begin + s * kTile);
    cp_async_commit();
  }

  float m_row[2] = {-kInf, -kInf}, l_row[2] = {0.f, 0.f};  // l: this warp's keys only
  float acc[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
  float k_check = 0.f;  // K's token sums: non-finite iff K had a NaN/Inf

  for (int it = 0; it < n_tiles; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // the tile has landed; every warp is done with the stage refilled next
    if (it + kStages - 1 < n_tiles) load_tile((it + kStages - 1) % kStages, t_begin + (it + kStages - 1) * kTile);
    cp_async_commit();
    const int start = t_begin + it * kTile;
    const int count = min(nk - start, kTile);
    const bool masked = count < kTile || (a.causal && start + kTile - 1 > q_offset);
    const char* tk = s_k + (it % kStages) * kTile * L::kPitchK;
    char* tv = s_v + (it % kStages) * kTile * L::kPitchV;

    // (1) K's token mean over the tile, per channel: warp w sums channels [w CW, (w+1) CW)
    {
      constexpr int kQuads = CW / 4, kGroups = 32 / kQuads, kPerLane = kTile / kGroups;
      const int quad = lane % kQuads, grp = lane / kQuads;
      // key order {0, 2, 1, 3} for 4 groups: a half-warp's two rows then fall on disjoint banks
      const int first = kGroups == 4 ? ((grp & 1) * 2 + (grp >> 1)) : grp;
      const int ch = warp * CW + 4 * quad;
      float sum[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        const float4 x = load4<In>(tk + (j * kGroups + first) * L::kPitchK + ch * 2);
        sum[0] += x.x, sum[1] += x.y, sum[2] += x.z, sum[3] += x.w;
      }
#pragma unroll
      for (int off = kQuads; off < 32; off <<= 1)
#pragma unroll
        for (int e = 0; e < 4; ++e) sum[e] += __shfl_xor_sync(0xffffffffu, sum[e], off);
      if (grp == 0) {
        const float inv_count = __frcp_rn(float(count));
#pragma unroll
        for (int e = 0; e < 4; ++e) s_mean_k[ch + e] = __fmul_rn(sum[e], inv_count), k_check += sum[e];
      }
    }
    __syncthreads();
    // (2) q . mean_k per row (8 threads per row), K - mean_k for this warp's 16 keys and its max
    if (a.smooth_k) {
      const int part = tid & 7;
      float qm = 0.f;
#pragma unroll
      for (int j = 0; j < QC; ++j) qm = __fadd_rn(qm, __fmul_rn(q[j], s_mean_k[part * QC + j]));
#pragma unroll
      for (int off = 1; off < 8; off <<= 1) qm += __shfl_xor_sync(0xffffffffu, qm, off);
      if (part == 0) s_qm[tid >> 3] = qm;
    }
    float kc[2][KS][8];  // keys 16w + g (+8): channels 32ks + 4t4 + {0..3} and + 16
    float amax[2] = {0.f, 0.f};
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      const int key = 16 * warp + 8 * kk + g;
      const bool valid = start + key < nk;
      const char* row = tk + key * L::kPitchK;
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int c = ks * 32 + 16 * half + 4 * t4;
          const float4 x = load4<In>(row + c * 2);
          float* out = &kc[kk][ks][4 * half];
          out[0] = x.x, out[1] = x.y, out[2] = x.z, out[3] = x.w;
          if (a.smooth_k) {
            const float4 m = *reinterpret_cast<const float4*>(s_mean_k + c);
            out[0] = valid ? x.x - m.x : 0.f, out[1] = valid ? x.y - m.y : 0.f;
            out[2] = valid ? x.z - m.z : 0.f, out[3] = valid ? x.w - m.w : 0.f;
          }
#pragma unroll
          for (int e = 0; e < 4; ++e) amax[kk] = fmaxf(amax[kk], fabsf(out[e]));
        }
      }
    }
    float inv_k[2], scale_k[2];  // per key (k_per_token) or the tile's
    if (a.k_per_token) {
#pragma unroll
      for (int kk = 0; kk < 2; ++kk) {
        amax[kk] = fmaxf(amax[kk], __shfl_xor_sync(0xffffffffu, amax[kk], 1));
        amax[kk] = fmaxf(amax[kk], __shfl_xor_sync(0xffffffffu, amax[kk], 2));
      }
    } else {
      float m = fmaxf(amax[0], amax[1]);
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
      if (lane == 0) s_amax[warp] = m;
    }
    __syncthreads();  // s_qm, s_amax
    if (!a.k_per_token) amax[0] = amax[1] = fmaxf(fmaxf(s_amax[0], s_amax[1]), fmaxf(s_amax[2], s_amax[3]));
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      scale_k[kk] = __fdiv_rn(amax[kk], qmax);
      inv_k[kk] = __frcp_rn(scale_k[kk] == 0.f ? 1.f : scale_k[kk]);
    }
    // (3) K's codes as B fragments, S = Q8 K8^T on the INT8 tensor cores
    int c_qk[2][4] = {{0, 0, 0, 0}, {0, 0, 0, 0}};
#pragma unroll
    for (int ks = 0; ks < KS; ++ks)
#pragma unroll
      for (int kk = 0; kk < 2; ++kk) {
        uint32_t kb[2];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const float* x = &kc[kk][ks][4 * half];
          kb[half] = pack_s8x4(round_even(__fmul_rn(x[0], inv_k[kk])), round_even(__fmul_rn(x[1], inv_k[kk])),
                               round_even(__fmul_rn(x[2], inv_k[kk])), round_even(__fmul_rn(x[3], inv_k[kk])));
        }
        mma_s8_16832(c_qk[kk], qa[ks], kb[0], kb[1]);
      }
    // (4) true log2-domain scores, the tile's row max (all four warps), P
    const float qm_row[2] = {a.smooth_k ? s_qm[g] : 0.f, a.smooth_k ? s_qm[g + 8] : 0.f};
    float s[2][4];
#pragma unroll
    for (int kk = 0; kk < 2; ++kk)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e >> 1, col = 16 * warp + 8 * kk + 2 * t4 + (e & 1);
        // the key's scale sits in the lanes with g = 2 t4 + (e & 1)
        const float sk = a.k_per_token ? __shfl_sync(0xffffffffu, scale_k[kk], (2 * t4 + (e & 1)) * 4) : scale_k[0];
        float x = __fmul_rn(__fmul_rn(float(c_qk[kk][e]), sq_row[h]), sk);
        if (a.smooth_k) x = __fadd_rn(x, qm_row[h]);
        if (masked) {
          const int key = start + col;
          const bool visible = ok_row[h] && key < nk && (!a.causal || key <= i_row[h] + q_offset);
          x = visible ? x : -kInf;
        }
        s[kk][e] = x;
      }
    float mx[2] = {fmaxf(fmaxf(s[0][0], s[0][1]), fmaxf(s[1][0], s[1][1])),
                   fmaxf(fmaxf(s[0][2], s[0][3]), fmaxf(s[1][2], s[1][3]))};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
      if (t4 == 0) s_row_max[warp * kRows + g + 8 * h] = mx[h];
    }
    __syncthreads();  // s_row_max
    float alpha[2], shift[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = g + 8 * h;
      const float tile_max = fmaxf(fmaxf(s_row_max[row], s_row_max[kRows + row]),
                                   fmaxf(s_row_max[2 * kRows + row], s_row_max[3 * kRows + row]));
      const float m_new = fmaxf(m_row[h], tile_max);
      const float m_use = m_new == -kInf ? 0.f : m_new;
      alpha[h] = exp2_approx(m_row[h] - m_use);
      shift[h] = m_use - a.log2_pscale;  // FP8 P spreads over (0, 448]
      m_row[h] = m_new;
    }
    float row_sum[2] = {0.f, 0.f};
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      float p[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) p[e] = exp2_approx(s[kk][e] - shift[e >> 1]), row_sum[e >> 1] += p[e];
      const int col = 16 * warp + 8 * kk + 2 * t4;
      uint32_t lo, hi;
      if constexpr (FP8) {
        lo = e4m3_round_trip_f16x2(p[0], p[1]), hi = e4m3_round_trip_f16x2(p[2], p[3]);
      } else {
        lo = f16x2_rn(p[0], p[1]), hi = f16x2_rn(p[2], p[3]);
      }
      *reinterpret_cast<uint32_t*>(s_p + g * L::kPitchP + col * 2) = lo;
      *reinterpret_cast<uint32_t*>(s_p + (g + 8) * L::kPitchP + col * 2) = hi;
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 1);
      row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 2);
      l_row[h] = __fadd_rn(__fmul_rn(l_row[h], alpha[h]), row_sum[h]);
    }
    // (5) V: FP8 per channel over the tile (sage2), or bf16 -> fp16 (sage1 on bf16 inputs), in place
    if constexpr (FP8 || BF16) {
      constexpr int kPairs = CW / 2, kGroups = 32 / kPairs, kPerLane = kTile / kGroups;
      const int ch = warp * CW + 2 * (lane % kPairs), grp = lane / kPairs;
      if constexpr (FP8) {
        float m0 = 0.f, m1 = 0.f;  // a NaN counts as +inf: the scale is then inf and pv NaN (flagged)
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) {
          const float2 x = pair_to_float2<In>(*reinterpret_cast<const uint32_t*>(tv + (j * kGroups + grp) * L::kPitchV + ch * 2));
          m0 = fmaxf(m0, abs_nan_as_inf(x.x)), m1 = fmaxf(m1, abs_nan_as_inf(x.y));
        }
#pragma unroll
        for (int off = kPairs; off < 32; off <<= 1) {
          m0 = fmaxf(m0, __shfl_xor_sync(0xffffffffu, m0, off));
          m1 = fmaxf(m1, __shfl_xor_sync(0xffffffffu, m1, off));
        }
        const float sv0 = __fdiv_rn(m0, 448.f), sv1 = __fdiv_rn(m1, 448.f);
        const float inv0 = __frcp_rn(sv0 == 0.f ? 1.f : sv0), inv1 = __frcp_rn(sv1 == 0.f ? 1.f : sv1);
        if (grp == 0) s_scale_v[ch] = sv0, s_scale_v[ch + 1] = sv1;
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) {
          uint32_t* p = reinterpret_cast<uint32_t*>(tv + (j * kGroups + grp) * L::kPitchV + ch * 2);
          const float2 x = pair_to_float2<In>(*p);
          *p = e4m3_round_trip_f16x2(__fmul_rn(x.x, inv0), __fmul_rn(x.y, inv1));
        }
      } else {
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) {
          uint32_t* p = reinterpret_cast<uint32_t*>(tv + (j * kGroups + grp) * L::kPitchV + ch * 2);
          const float2 x = pair_to_float2<In>(*p);
          *p = f16x2_rn(x.x, x.y);
        }
      }
    }
    __syncthreads();  // P and V in shared memory
    // (6) P V: this warp's channels [w CW, (w+1) CW) over the 64 keys
    {
      const int mat = lane >> 3, r8 = lane & 7;
      const int c0 = warp * CW;
      const bool acc16 = !FP8 && a.pv == kPvFp16Acc16;
      float pv[NT][4];
      uint32_t pv16[NT][2];
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        pv[n][0] = pv[n][1] = pv[n][2] = pv[n][3] = 0.f;
        pv16[n][0] = pv16[n][1] = 0u;
      }
#pragma unroll
      for (int kk = 0; kk < kTile / 16; ++kk) {
        uint32_t pa[4];
        ldmatrix_x4(pa, s_p + (r8 + (mat & 1) * 8) * L::kPitchP + (16 * kk + (mat >> 1) * 8) * 2);
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
          uint32_t vb[4];
          ldmatrix_x4_trans(vb, tv + (16 * kk + r8 + (mat & 1) * 8) * L::kPitchV + (c0 + 16 * np + (mat >> 1) * 8) * 2);
          if (acc16) {
            mma_f16_16816_f16(pv16[2 * np], pa, vb[0], vb[1]);
            mma_f16_16816_f16(pv16[2 * np + 1], pa, vb[2], vb[3]);
          } else {
            mma_f16_16816_f32(pv[2 * np], pa, vb[0], vb[1]);
            mma_f16_16816_f32(pv[2 * np + 1], pa, vb[2], vb[3]);
          }
        }
      }
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        if (acc16) {
          const float2 lo = f16x2_to_float2(pv16[n][0]), hi = f16x2_to_float2(pv16[n][1]);
          pv[n][0] = lo.x, pv[n][1] = lo.y, pv[n][2] = hi.x, pv[n][3] = hi.y;
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float x = pv[n][e];
          if constexpr (FP8) x = __fmul_rn(x, s_scale_v[c0 + 8 * n + 2 * t4 + (e & 1)]);
          acc[n][e] = __fadd_rn(__fmul_rn(acc[n][e], alpha[e >> 1]), x);
        }
      }
    }
  }
  cp_async_wait<0>();

  // ---- epilogue: l over the four warps, the normalized partial output and its log2 LSE ----
  if (t4 == 0) s_row_sum[warp * kRows + g] = l_row[0], s_row_sum[warp * kRows + g + 8] = l_row[1];
  __syncthreads();
  const int64_t prog = int64_t(split) * gridDim.y + kv_bh;
  float check = k_check;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = g + 8 * h;
    const float l = ((s_row_sum[row] + s_row_sum[kRows + row]) + s_row_sum[2 * kRows + row]) + s_row_sum[3 * kRows + row];
    check += l;
    const float denom = l == 0.f ? 1.f : l;
    float* out = a.part_out + (prog * kRows + row) * DP + warp * CW + 2 * t4;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      check += acc[n][2 * h] + acc[n][2 * h + 1];
      *reinterpret_cast<float2*>(out + 8 * n) = make_float2(__fdiv_rn(acc[n][2 * h], denom), __fdiv_rn(acc[n][2 * h + 1], denom));
    }
    if (warp == 0 && t4 == 0) {
      const float lse2 = m_row[h] + log2f(l) - a.log2_pscale;
      a.part_lse[prog * kRows + row] = s_bad_q[row] ? __int_as_float(0x7fc00000) : lse2;
    }
  }
  const int flagged = __syncthreads_or(!isfinite(check));
  if (tid == 0) a.flags[prog] = flagged;
}

template <int DP, bool BF16, bool FP8>
void launch(const DecodeSplitArgs& a, cudaStream_t stream) {
  constexpr int bytes = Layout<DP>::kBytes;
  auto kernel = decode_split_kernel<DP, BF16, FP8>;
  static bool configured = false;  // one attribute call per instantiation and process
  if (!configured) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (err != cudaSuccess) throw std::runtime_error(std::string("decode_split: ") + cudaGetErrorString(err));
    configured = true;
  }
  kernel<<<dim3(a.splits, a.batch * a.heads_kv), kThreads, bytes, stream>>>(a);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("decode_split launch: ") + cudaGetErrorString(err));
}

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("decode_split: " + what);
}

}  // namespace

void decode_split_forward(const DecodeSplitArgs& a, cudaStream_t stream) {
  require(a.head_dim == 64 || a.head_dim == 128, "head_dim must be 64 or 128, got " + std::to_string(a.head_dim));
  require(a.group >= 1 && a.rows_per_head >= 1 && a.group * a.rows_per_head <= kRows,
          "group * rows_per_head must be in [1, 16], got " + std::to_string(a.group) + " * " +
              std::to_string(a.rows_per_head));
  require(a.seqlen_q >= 1 && a.seqlen_q <= a.rows_per_head, "seqlen_q must be in [1, rows_per_head]");
  require(a.qmax == 127 || a.qmax == 7, "qmax must be 127 or 7, got " + std::to_string(a.qmax));
  require(a.pv == kPvFp16Acc16 || a.pv == kPvFp16Acc32 || a.pv == kPvFp8E4m3, "pv must be 0, 1 or 2");
  require(a.tiles_per_split >= 1 && a.splits >= 1, "tiles_per_split and splits must be positive");
  for (const auto& [name, p, stride] : {std::tuple{"k", a.k, a.k_stride_n}, std::tuple{"v", a.v, a.v_stride_n}})
    require(reinterpret_cast<uintptr_t>(p) % 16 == 0 && stride % 8 == 0,
            std::string(name) + ": 16-byte aligned rows are needed (data pointer and row stride)");
  if (a.seqlen_k == 0) return;  // no keys: the caller does not run decode then
  const bool fp8 = a.pv == kPvFp8E4m3;
#define SAGE_DECODE_DISPATCH(DP)                                   \
  if (a.bf16) {                                                    \
    fp8 ? launch<DP, true, true>(a, stream) : launch<DP, true, false>(a, stream); \
  } else {                                                         \
    fp8 ? launch<DP, false, true>(a, stream) : launch<DP, false, false>(a, stream); \
  }
  if (a.head_dim == 64) {
    SAGE_DECODE_DISPATCH(64)
  } else {
    SAGE_DECODE_DISPATCH(128)
  }
#undef SAGE_DECODE_DISPATCH
}

}  // namespace sage_cuda
