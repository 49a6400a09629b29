// SageAttention2's quantization of K and V for the Hopper kernel (attention.cu), reading each once.
//
// Both need a statistic over all of a head's tokens before any code: K's token mean (K smoothing:
// K - mean_tokens(K) is what is quantized) and V's per-channel max (FP8 V's scales). The Triton passes
// read K and V twice for it (a statistic pass, then the codes): 2.7 GB at B=4 H=32 N=16k D=128, ~1 ms
// beside an 11-21 ms kernel. Here a chunk of one head (128 tokens, 256 at head dim 64) comes into
// shared memory by TMA; its CTA adds the chunk's share of the statistic and, once every chunk of the
// head has, writes the chunk's codes from shared memory: K and V are read once.
//
// Persistent CTAs with two chunk buffers: while a CTA waits for its chunk's head, its next chunk is
// loading, and the CTA adds that chunk's statistic as soon as it lands (v1, one chunk per CTA, held
// its shared memory idle through the wait: 1.6 TB/s; this one 1.9 TB/s, 860 us at 16k against the
// Triton passes' 1035: csrc/NOTES.md, v13.2). Chunks are claimed on a ticket in the order
// CTAs take them, so the chunks a CTA waits for are all claimed by running CTAs, each of which adds
// its chunks' statistics without waiting on anything; a head completes once all its chunks are
// claimed, which needs no more chunks per head than CTAs running (kv_pass_max_chunks; longer
// sequences take the Triton passes, sage2/cuda.py).
//
// Determinism: K's mean is the sum of the chunks' column sums in chunk order, by the last chunk of the
// head to arrive (the others wait for its mean); V's maxima are integer atomic maxima of fp32 bits
// (exact in any order). The codes are the Triton passes' arithmetic (common/quant_codes.cuh): given
// the same mean, the same bits (tests/test_sage2_cuda.py).
#include <algorithm>
#include <climits>
#include <stdexcept>
#include <string>

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include "../common/hopper.cuh"
#include "../common/launch.h"
#include "../common/quant_codes.cuh"
#include "../common/tensor_map.h"
#include "kv_pass.h"

namespace sage_cuda {
namespace {

constexpr int THREADS = 256;
constexpr int NO_BAD_KEY = INT_MAX;  // common.nonfinite: FIRST_BAD holds NO_BAD_KEY - key
constexpr int K_BLOCK = 128;         // sage2's K block: per-block scales, and per-thread groups within it
constexpr float E4M3_MAX = 448.f;

template <int DP>
__host__ __device__ constexpr int chunk_tokens() {
  return DP == 128 ? 128 : 256;  // 32 KB of 16-bit values; multiples of 128 (npad's multiple, K_BLOCK)
}

__device__ __forceinline__ bool finite(float x) { return fabsf(x) < INFINITY; }
// max(m, |x|) of two packed 16-bit values, NaN-propagating (exact: |.| and max round nothing)
template <typename InT>
__device__ __forceinline__ uint32_t max_abs2(uint32_t m, uint32_t x);
template <>
__device__ __forceinline__ uint32_t max_abs2<__half>(uint32_t m, uint32_t x) {
  const __half2 r = __hmax2_nan(*reinterpret_cast<const __half2*>(&m), __habs2(*reinterpret_cast<const __half2*>(&x)));
  return *reinterpret_cast<const uint32_t*>(&r);
}
template <>
__device__ __forceinline__ uint32_t max_abs2<__nv_bfloat16>(uint32_t m, uint32_t x) {
  const __nv_bfloat162 r = __hmax2_nan(*reinterpret_cast<const __nv_bfloat162*>(&m),
                                       __habs2(*reinterpret_cast<const __nv_bfloat162*>(&x)));
  return *reinterpret_cast<const uint32_t*>(&r);
}

template <int DP>
struct Smem {
  static constexpr int T = chunk_tokens<DP>();
  uint32_t tile[2][T * DP / 2];  // two chunks: rows of DP 16-bit values (zeros past N and D: TMA's fill)
  uint64_t full[2];              // each buffer's load
  float2 part[THREADS];          // per-thread column statistics, reduced in a fixed order
  float col[DP];                 // K: the mean (0 past D)
  float row_max[T];              // K: each row's max |x| (+inf: a NaN/Inf in it)
  float group_max[T / 32];       // K: the max of each scale group (4 per 128 rows at most)
  float row_scale[T], row_inv[T], row_factor[T];
  float col_scale[DP], col_inv[DP], col_factor[DP];  // V
  int next_item, last, bad_row, poll;
  int nonfinite[2];  // V: whether the chunk in each buffer holds a NaN/Inf (its codes then zero them)
};

struct Chunk {
  bool is_k;
  int head, index, b, h;  // head = b * heads + h; index: the chunk within the head
};
__device__ __forceinline__ Chunk chunk_of(const KvPassArgs& a, int item) {
  const int k_items = a.batch * a.heads * a.chunks;
  Chunk c;
  c.is_k = item < k_items;
  const int i = c.is_k ? item : item - k_items;
  c.head = i / a.chunks, c.index = i % a.chunks, c.b = c.head / a.heads, c.h = c.head % a.heads;
  return c;
}
// this chunk's head has all its statistics (K: and its mean published)
__device__ __forceinline__ bool head_done(const KvPassArgs& a, const Chunk& c) {
  return c.is_k ? load_acquire_gpu(a.counters + 1 + c.head) > a.chunks
                : load_acquire_gpu(a.counters + 1 + a.batch * a.heads + c.head) >= a.chunks;
}

// (thread 0) the chunk into buffer `buf` by one TMA box of T rows x DP channels
template <int DP>
__device__ __forceinline__ void issue_load(Smem<DP>& sm, int buf, const Chunk& c, const CUtensorMap* k_map,
                                           const CUtensorMap* v_map) {
  fence_proxy_async_shared();  // the CTA's reads of the buffer (before the caller's barrier) come first
  mbar_arrive_expect_tx(&sm.full[buf], Smem<DP>::T * DP * 2);
  tma_load_4d(sm.tile[buf], c.is_k ? k_map : v_map, &sm.full[buf], 0, c.index * Smem<DP>::T, c.h, c.b);
}

// each thread's pair of column sums added over the PARTS threads of its channel pair, in part order
// (deterministic): thread p's result is pair p's (a barrier first; the caller's threads < PAIRS use it)
template <int DP>
__device__ __forceinline__ float2 sum_over_parts(Smem<DP>& sm, float2 s, int p) {
  constexpr int PAIRS = DP / 2, PARTS = THREADS / PAIRS;
  sm.part[threadIdx.x] = s;
  __syncthreads();
  float2 t = sm.part[p];
#pragma unroll
  for (int q = 1; q < PARTS; ++q) t.x += sm.part[q * PAIRS + p].x, t.y += sm.part[q * PAIRS + p].y;
  return t;
}

// K's statistic: the chunk's column sums into k_partial; the last chunk of the head to arrive sums
// them in chunk order into the mean and publishes it (the arrival count goes to chunks + 1)
template <int DP, typename InT>
__device__ void k_stats(const KvPassArgs& a, Smem<DP>& sm, const uint32_t* tile, int head, int chunk) {
  constexpr int T = Smem<DP>::T, PAIRS = DP / 2, PARTS = THREADS / PAIRS;
  const int n = a.seqlen, d = a.head_dim;
  const int p = threadIdx.x % PAIRS, part = threadIdx.x / PAIRS;
  {  // each thread a pair of channels over every PARTS-th row, then the parts in order
    float2 s = make_float2(0.f, 0.f);
#pragma unroll 8
    for (int r = part; r < T; r += PARTS) {
      const float2 x = to_float2<InT>(tile[r * PAIRS + p]);
      s.x += x.x, s.y += x.y;
    }
    const float2 t = sum_over_parts(sm, s, p);
    if (threadIdx.x < PAIRS) reinterpret_cast<float2*>(a.k_partial)[(int64_t(head) * a.chunks + chunk) * PAIRS + p] = t;
    __syncthreads();
  }
  int* arrived = a.counters + 1 + head;
  if (threadIdx.x == 0) sm.last = atomic_add_acq_rel_gpu(arrived, 1) == a.chunks - 1;
  __syncthreads();
  if (!sm.last) return;
  // every chunk's sums are in: the mean, summed in chunk order (PARTS ranges, then the ranges in order)
  const int per = (a.chunks + PARTS - 1) / PARTS, j0 = part * per, j1 = min(a.chunks, j0 + per);
  const float2* partial = reinterpret_cast<const float2*>(a.k_partial) + int64_t(head) * a.chunks * PAIRS + p;
  float2 s = make_float2(0.f, 0.f);
#pragma unroll 16  // the loads in flight together: the head's other chunks wait for this sum
  for (int j = j0; j < j1; ++j) {
    const float2 x = __ldcg(partial + int64_t(j) * PAIRS);
    s.x += x.x, s.y += x.y;
  }
  const float2 t = sum_over_parts(sm, s, p);
  if (threadIdx.x < PAIRS) {
    float m[2] = {__fdiv_rn(t.x, float(n)), __fdiv_rn(t.y, float(n))};
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int c = 2 * p + e;
      if (a.zero_nonfinite && !finite(m[e])) m[e] = 0.f;  // common.nonfinite.finite_mean
      if (c < d) a.k_mean[int64_t(head) * d + c] = m[e];
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) atomic_add_acq_rel_gpu(arrived, 1);  // releases the mean: chunks + 1
}

// V's statistic: the chunk's max |v| per channel over finite values into v_amax (atomic max of the
// bits), its first NaN/Inf key into first_bad, then the arrival
template <int DP, typename InT>
__device__ void v_stats(const KvPassArgs& a, Smem<DP>& sm, const uint32_t* tile, int buf, int head, int chunk) {
  constexpr int T = Smem<DP>::T, PAIRS = DP / 2, PARTS = THREADS / PAIRS;
  const int row0 = chunk * T, d = a.head_dim;
  const int p = threadIdx.x % PAIRS, part = threadIdx.x / PAIRS;
  // max |v| on the packed 16-bit values (NaN-propagating): two values per instruction
  uint32_t m2 = 0;
#pragma unroll 8
  for (int r = part; r < T; r += PARTS) m2 = max_abs2<InT>(m2, tile[r * PAIRS + p]);
  float2 m = to_float2<InT>(m2);
  const bool nonfinite = __syncthreads_or(!(finite(m.x) && finite(m.y)));
  if (threadIdx.x == 0) sm.nonfinite[buf] = nonfinite, sm.bad_row = INT_MAX;
  if (nonfinite) {  // rare: the max over finite values, and the chunk's first key with a NaN/Inf
    __syncthreads();
    m = make_float2(0.f, 0.f);
    int bad_row = INT_MAX;
    for (int r = part; r < T; r += PARTS) {
      const float2 x = to_float2<InT>(tile[r * PAIRS + p]);
      const bool f0 = finite(x.x), f1 = finite(x.y);
      m.x = fmaxf(m.x, f0 ? fabsf(x.x) : 0.f), m.y = fmaxf(m.y, f1 ? fabsf(x.y) : 0.f);
      if (!(f0 && f1)) bad_row = min(bad_row, r);
    }
    if (bad_row != INT_MAX) atomicMin(&sm.bad_row, bad_row);
  }
  sm.part[threadIdx.x] = m;
  __syncthreads();
  if (threadIdx.x < PAIRS) {
    float2 t = sm.part[p];
#pragma unroll
    for (int q = 1; q < PARTS; ++q) t.x = fmaxf(t.x, sm.part[q * PAIRS + p].x), t.y = fmaxf(t.y, sm.part[q * PAIRS + p].y);
    if (2 * p < d) atomicMax(a.v_amax + int64_t(head) * d + 2 * p, __float_as_int(t.x));
    if (2 * p + 1 < d) atomicMax(a.v_amax + int64_t(head) * d + 2 * p + 1, __float_as_int(t.y));
  }
  if (threadIdx.x == 0 && sm.bad_row != INT_MAX && a.first_bad != nullptr)
    atomicMax(a.first_bad + head, NO_BAD_KEY - (row0 + sm.bad_row));
  __syncthreads();
  if (threadIdx.x == 0) atomic_add_acq_rel_gpu(a.counters + 1 + a.batch * a.heads + head, 1);
}

template <int DP, typename InT>
__device__ __forceinline__ void stats(const KvPassArgs& a, Smem<DP>& sm, int buf, const Chunk& c) {
  if (c.is_k)
    k_stats<DP, InT>(a, sm, sm.tile[buf], c.head, c.index);
  else
    v_stats<DP, InT>(a, sm, sm.tile[buf], buf, c.head, c.index);
}

// K's codes of the chunk's rows from the scales in shared memory (k_codes)
template <int DP, typename InT, bool CLAMP>
__device__ __forceinline__ void k_code_rows(const KvPassArgs& a, Smem<DP>& sm, const uint32_t* tile, int head,
                                            int row0) {
  constexpr int T = Smem<DP>::T, PAIRS = DP / 2, WORDS = DP / 8;
  const int n = a.seqlen, w = threadIdx.x % WORDS;
  const float qmax = float(a.qmax);
  for (int r = threadIdx.x / WORDS; r < T && row0 + r < n; r += THREADS / WORDS) {
    uint2 packed = make_uint2(0u, 0u);  // a row with a NaN/Inf: zero codes
    if (!(a.zero_nonfinite && sm.row_max[r] == INFINITY)) {
      const uint4 raw = *reinterpret_cast<const uint4*>(tile + r * PAIRS + w * 4);
      const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
      const float s = sm.row_scale[r], inv = sm.row_inv[r], f = sm.row_factor[r];
      uint32_t bytes[8];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 x = to_float2<InT>(words[e]);
        const float x0 = x.x - sm.col[w * 8 + 2 * e], x1 = x.y - sm.col[w * 8 + 2 * e + 1];
        if (f != 1.f) {  // a scale below 2^-60 (rare): maybe subnormal, too coarse for the unclamped form
          bytes[2 * e] = int_code(x0 * f, s, inv, qmax), bytes[2 * e + 1] = int_code(x1 * f, s, inv, qmax);
        } else {
          bytes[2 * e] = CLAMP ? int_code(x0, s, inv, qmax) : int_code_unclamped(x0, s, inv);
          bytes[2 * e + 1] = CLAMP ? int_code(x1, s, inv, qmax) : int_code_unclamped(x1, s, inv);
        }
      }
      packed.x = bytes[0] | (bytes[1] << 8) | (bytes[2] << 16) | (bytes[3] << 24);
      packed.y = bytes[4] | (bytes[5] << 8) | (bytes[6] << 16) | (bytes[7] << 24);
    }
    *reinterpret_cast<uint2*>(a.k_codes + (int64_t(head) * n + row0 + r) * DP + w * 8) = packed;
  }
}

// K's codes, once the head's mean is out: x = k - mean; per row max |x|; scales per 128 keys or per
// thread group; codes as the Triton pass (common.triton_quant.quantize_int_kernel, HAS_MEAN, mult 1)
template <int DP, typename InT>
__device__ void k_codes(const KvPassArgs& a, Smem<DP>& sm, const uint32_t* tile, int head, int chunk) {
  constexpr int T = Smem<DP>::T, PAIRS = DP / 2, WORDS = DP / 8;
  const int row0 = chunk * T, n = a.seqlen, d = a.head_dim;
  for (int c = threadIdx.x; c < DP; c += THREADS) sm.col[c] = c < d ? __ldcg(a.k_mean + int64_t(head) * d + c) : 0.f;
  __syncthreads();
  // each row's max |x| (a NaN counts as +inf): WORDS lanes per row, 8 channels each
  const int w = threadIdx.x % WORDS;
  for (int r = threadIdx.x / WORDS; r < T; r += THREADS / WORDS) {
    const uint4 raw = *reinterpret_cast<const uint4*>(tile + r * PAIRS + w * 4);
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
    float amax = 0.f, nonfinite = 0.f;  // nonfinite: NaN once an x is NaN or +-inf (x * 0)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float2 x = to_float2<InT>(words[e]);
      const float x0 = x.x - sm.col[w * 8 + 2 * e], x1 = x.y - sm.col[w * 8 + 2 * e + 1];
      amax = fmaxf(amax, fmaxf(fabsf(x0), fabsf(x1)));
      nonfinite = fmaf(x0, 0.f, fmaf(x1, 0.f, nonfinite));
    }
    // a NaN/Inf makes the row a zero row (zero_nonfinite: +inf marks it, as the Triton pass's NaN-as-inf
    // max); otherwise the max of |x| ignores NaN, as the pass's tl.max does
    if (a.zero_nonfinite && nonfinite != nonfinite) amax = INFINITY;
    if (row0 + r >= n) amax = 0.f;  // rows past N hold 0 - mean here; the pass's are 0
#pragma unroll
    for (int lanes = 1; lanes < WORDS; lanes *= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffff, amax, lanes));
    if (w == 0) {
      sm.row_max[r] = amax;
      if (a.zero_nonfinite && amax == INFINITY && a.first_bad != nullptr)
        atomicMax(a.first_bad + head, NO_BAD_KEY - (row0 + r));
    }
  }
  __syncthreads();
  // each group's max (a row with a NaN/Inf counts 0: it becomes a zero row), one warp per group: per
  // block, the 128 rows of each K block; per thread, rows 8m + 2t, 8m + 2t + 1 of a block for each t
  const int groups = a.k_per_thread ? 4 : 1, lane = threadIdx.x % 32;
  for (int gi = threadIdx.x / 32; gi < (T / K_BLOCK) * groups; gi += THREADS / 32) {
    const int b0 = (gi / groups) * K_BLOCK, t = gi % groups;
    float g = 0.f;
#pragma unroll
    for (int i = 0; i < K_BLOCK / 32; ++i) {
      if (a.k_per_thread && i > 0) break;
      const float m = sm.row_max[a.k_per_thread ? b0 + 8 * (lane / 2) + 2 * t + lane % 2 : b0 + lane + 32 * i];
      g = fmaxf(g, a.zero_nonfinite && m == INFINITY ? 0.f : m);
    }
#pragma unroll
    for (int lanes = 1; lanes < 32; lanes *= 2) g = fmaxf(g, __shfl_xor_sync(0xffffffff, g, lanes));
    if (lane == 0) sm.group_max[gi] = g;
  }
  __syncthreads();
  for (int r = threadIdx.x; r < T; r += THREADS) {
    const float g = sm.group_max[(r / K_BLOCK) * groups + (a.k_per_thread ? (r % 8) / 2 : 0)];
    const float scale = __fdiv_rn(g, float(a.qmax));
    if (row0 + r < n) a.k_scale[int64_t(head) * n + row0 + r] = scale;
    const Divisor div(scale);
    sm.row_scale[r] = div.scale, sm.row_inv[r] = div.inv, sm.row_factor[r] = div.factor;
  }
  __syncthreads();
  // codes: 8 channels per thread, a row's WORDS threads writing its DP bytes together. With NaN/Inf
  // zeroed every group max is finite, and RN(x / RN(max / qmax)) is within an ulp of qmax, so the
  // code needs no clamp (the Triton pass clamps; it never binds there)
  if (a.zero_nonfinite)
    k_code_rows<DP, InT, false>(a, sm, tile, head, row0);
  else
    k_code_rows<DP, InT, true>(a, sm, tile, head, row0);
}

// V's codes, once the head's maxima are in: E4M3 of v / (amax / 448), keys in the wgmma order, V^T
// (common.triton_quant.quantize_v_fp8_kernel)
template <int DP, typename InT>
__device__ void v_codes(const KvPassArgs& a, Smem<DP>& sm, const uint32_t* tile, bool nonfinite, int head,
                        int chunk) {
  constexpr int T = Smem<DP>::T, PAIRS = DP / 2;
  const int row0 = chunk * T, d = a.head_dim;
  for (int c = threadIdx.x; c < DP; c += THREADS) {
    const float amax = c < d ? __int_as_float(load_relaxed_gpu(a.v_amax + int64_t(head) * d + c)) : 0.f;
    const float scale = __fdiv_rn(amax, E4M3_MAX);
    if (chunk == 0 && c < d) a.v_scale[int64_t(head) * d + c] = scale;
    const Divisor div(scale);
    sm.col_scale[c] = div.scale, sm.col_inv[c] = div.inv, sm.col_factor[c] = div.factor;
  }
  __syncthreads();
  const bool zero = a.zero_nonfinite && nonfinite;
  // one task: channels 2p, 2p + 1 and 32 keys (32 bytes of two rows of V^T); slot 16h + 4t + 2e + b of
  // each 32 holds key 16h + 8e + 2t + b (where the S fragment puts lane t's P)
  for (int task = threadIdx.x; task < PAIRS * (T / 32); task += THREADS) {
    const int p = task % PAIRS, g = task / PAIRS;
    if (row0 + 32 * g >= a.npad) break;
    float s[2], inv[2], f[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) s[e] = sm.col_scale[2 * p + e], inv[e] = sm.col_inv[2 * p + e], f[e] = sm.col_factor[2 * p + e];
    const bool unit = f[0] == 1.f && f[1] == 1.f;
    uint32_t words[2][8];
#pragma unroll
    for (int q = 0; q < 8; ++q) {  // slots 4q .. 4q + 3: h = q / 4, t = q % 4, (e, b) = 00, 01, 10, 11
      float y[2][4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int key = 32 * g + 16 * (q / 4) + 8 * (j / 2) + 2 * (q % 4) + (j % 2);
        const float2 x2 = to_float2<InT>(tile[key * PAIRS + p]);
        float x[2] = {x2.x, x2.y};
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          if (zero && !finite(x[e])) x[e] = 0.f;
          if (!unit) x[e] *= f[e];
          y[e][j] = div_by_scale(x[e], s[e], inv[e]);
        }
      }
      words[0][q] = pack_e4m3x4(y[0][0], y[0][1], y[0][2], y[0][3]);
      words[1][q] = pack_e4m3x4(y[1][0], y[1][1], y[1][2], y[1][3]);
    }
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      uint4* dst = reinterpret_cast<uint4*>(a.v_codes + (int64_t(head) * DP + 2 * p + e) * a.npad + row0 + 32 * g);
      dst[0] = make_uint4(words[e][0], words[e][1], words[e][2], words[e][3]);
      dst[1] = make_uint4(words[e][4], words[e][5], words[e][6], words[e][7]);
    }
  }
}

template <int DP, typename InT>
__global__ void __launch_bounds__(THREADS, 3)  // three CTAs (two 32 KB chunks each) per SM
    kv_pass_kernel(const __grid_constant__ CUtensorMap k_map, const __grid_constant__ CUtensorMap v_map,
                   const KvPassArgs a) {
  extern __shared__ __align__(128) uint8_t smem_raw[];
  Smem<DP>& sm = *reinterpret_cast<Smem<DP>*>(smem_raw);
  const int total = 2 * a.batch * a.heads * a.chunks;
#ifndef SAGE2_NO_PDL
  // the attention kernel after this one may take SMs as this grid's CTAs leave (it waits for the
  // whole pass before reading any of it; it is placed only once every CTA here has run this line)
  griddep_launch_dependents();
#endif
  if (threadIdx.x == 0) {
    mbar_init(&sm.full[0], 1), mbar_init(&sm.full[1], 1);
    fence_barrier_init();
    sm.next_item = atomicAdd(a.counters, 1);  // chunks in the order CTAs take them
    if (sm.next_item < total) issue_load(sm, 0, chunk_of(a, sm.next_item), &k_map, &v_map);
  }
  __syncthreads();
  if (sm.next_item >= total) return;
  Chunk cur = chunk_of(a, sm.next_item);
  int buf = 0;
  uint32_t parity = 0;  // bit i: the next phase of buffer i's barrier
  mbar_wait(&sm.full[0], 0), parity ^= 1;
  stats<DP, InT>(a, sm, 0, cur);
  while (true) {
    __syncthreads();  // (everyone is done with the other buffer and has read next_item)
    if (threadIdx.x == 0) {
      sm.next_item = atomicAdd(a.counters, 1);
      if (sm.next_item < total) issue_load(sm, buf ^ 1, chunk_of(a, sm.next_item), &k_map, &v_map);
    }
    __syncthreads();
    const bool has_next = sm.next_item < total;
    const Chunk next = has_next ? chunk_of(a, sm.next_item) : cur;
    bool next_in = !has_next;  // the next chunk's statistic added
    // wait for this chunk's head, adding the next chunk's statistic as soon as it lands
    while (true) {
      if (threadIdx.x == 0) {
        int state = head_done(a, cur) ? 1 : 0;
        if (!next_in && mbar_test(&sm.full[buf ^ 1], (parity >> (buf ^ 1)) & 1)) state |= 2;
        if (state == 0) __nanosleep(32);
        sm.poll = state;
      }
      __syncthreads();
      const int state = sm.poll;
      __syncthreads();  // (poll is written again)
      if (state & 2) {
        mbar_wait(&sm.full[buf ^ 1], (parity >> (buf ^ 1)) & 1), parity ^= 1u << (buf ^ 1);
        stats<DP, InT>(a, sm, buf ^ 1, next);
        next_in = true;
      }
      if (state & 1) break;
    }
    if (cur.is_k)
      k_codes<DP, InT>(a, sm, sm.tile[buf], cur.head, cur.index);
    else
      v_codes<DP, InT>(a, sm, sm.tile[buf], sm.nonfinite[buf], cur.head, cur.index);
    if (!has_next) break;
    if (!next_in) {
      mbar_wait(&sm.full[buf ^ 1], (parity >> (buf ^ 1)) & 1), parity ^= 1u << (buf ^ 1);
      __syncthreads();  // (the codes' reads of shared statistics are done)
      stats<DP, InT>(a, sm, buf ^ 1, next);
    }
    cur = next, buf ^= 1;
  }
}

template <int DP, typename InT>
int resident_ctas() {
  static int cached[64] = {};
  int device = 0, sms = 0, per_sm = 0;
  cudaGetDevice(&device);
  if (device < 64 && cached[device]) return cached[device];
  static uint64_t reserved = 0;
  reserve_shared_memory(kv_pass_kernel<DP, InT>, int(sizeof(Smem<DP>)), reserved, "sage2_kv_pass");
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kv_pass_kernel<DP, InT>, THREADS, sizeof(Smem<DP>));
  const int total = sms * per_sm;
  if (device < 64) cached[device] = total;
  return total;
}

// K or V, [B][H][N][D] 16-bit values through strides (elements; a dimension of size 1 may carry any),
// read in boxes of T rows x DP channels (channels past D and rows past N arrive as zeros)
CUtensorMap chunk_map(const void* base, const KvPassArgs& a, int64_t stride_b, int64_t stride_h, int64_t stride_n,
                      int tokens, const char* who) {
  auto stride_bytes = [](int size, int64_t stride, uint64_t packed) {
    return cuuint64_t(size == 1 ? packed : uint64_t(stride) * 2);
  };
  const uint64_t row = 2 * uint64_t(a.head_dim), head = row * a.seqlen, batch = head * a.heads;
  const cuuint64_t dims[4] = {cuuint64_t(a.head_dim), cuuint64_t(a.seqlen), cuuint64_t(a.heads), cuuint64_t(a.batch)};
  const cuuint64_t strides[3] = {stride_bytes(a.seqlen, stride_n, (row + 15) / 16 * 16),
                                 stride_bytes(a.heads, stride_h, (head + 15) / 16 * 16),
                                 stride_bytes(a.batch, stride_b, (batch + 15) / 16 * 16)};
  const cuuint32_t box[4] = {cuuint32_t(a.padded_head_dim), cuuint32_t(tokens), 1, 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  CUtensorMap map;
  const CUresult rc = tensor_map_encoder()(&map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 4, const_cast<void*>(base), dims,
                                           strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                           CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                           CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (rc != CUDA_SUCCESS)
    throw std::runtime_error(std::string("sage2_kv_pass: ") + who + ": cuTensorMapEncodeTiled failed (error " +
                             std::to_string(int(rc)) + ")");
  return map;
}

template <int DP, typename InT>
void launch(const KvPassArgs& a, cudaStream_t stream) {
  const int total = 2 * a.batch * a.heads * a.chunks;
  const int grid = std::min(total, resident_ctas<DP, InT>());  // (also reserves the shared memory)
  const CUtensorMap k_map = chunk_map(a.k, a, a.k_stride_b, a.k_stride_h, a.k_stride_n, chunk_tokens<DP>(), "k");
  const CUtensorMap v_map = chunk_map(a.v, a, a.v_stride_b, a.v_stride_h, a.v_stride_n, chunk_tokens<DP>(), "v");
  kv_pass_kernel<DP, InT><<<grid, THREADS, sizeof(Smem<DP>), stream>>>(k_map, v_map, a);
  check_launch("sage2_kv_pass");
}

}  // namespace

int kv_pass_chunk_tokens(int padded_head_dim) {
  if (padded_head_dim != 64 && padded_head_dim != 128)
    throw std::invalid_argument("sage2_kv_pass: padded_head_dim must be 64 or 128");
  return padded_head_dim == 128 ? chunk_tokens<128>() : chunk_tokens<64>();
}

int kv_pass_max_chunks(int padded_head_dim) {
  kv_pass_chunk_tokens(padded_head_dim);
  // fp16 and bf16 instantiations use the same resources; half the resident CTAs, a margin for others'
  return (padded_head_dim == 128 ? resident_ctas<128, __half>() : resident_ctas<64, __half>()) / 2;
}

void sage2_kv_pass(const KvPassArgs& a, cudaStream_t stream) {
  const std::string who = "sage2_kv_pass: ";
  const int dp = a.padded_head_dim;
  const int tokens = kv_pass_chunk_tokens(dp);
  if (a.batch <= 0 || a.heads <= 0 || a.seqlen <= 0) throw std::invalid_argument(who + "empty K/V run no kernel");
  if (a.head_dim <= 0 || a.head_dim > dp || a.head_dim % 8 != 0)
    throw std::invalid_argument(who + "head_dim must be a multiple of 8, at most padded_head_dim");
  if (a.chunks != (a.seqlen + tokens - 1) / tokens)
    throw std::invalid_argument(who + "chunks must be ceil(seqlen / " + std::to_string(tokens) + ")");
  if (a.npad % 128 != 0 || a.npad < a.seqlen || a.npad - a.seqlen >= 128)
    throw std::invalid_argument(who + "npad must be seqlen rounded up to a multiple of 128");
  if (a.qmax != 127 && a.qmax != 7) throw std::invalid_argument(who + "qmax must be 127 or 7");
  if (a.chunks > kv_pass_max_chunks(dp))
    throw std::invalid_argument(who + "seqlen is too long for one launch (kv_pass_max_chunks)");
  const int64_t strides[6] = {a.k_stride_b, a.k_stride_h, a.k_stride_n, a.v_stride_b, a.v_stride_h, a.v_stride_n};
  for (int64_t s : strides)
    if (s % 8 != 0) throw std::invalid_argument(who + "K's and V's strides must be multiples of 8 elements");
  if (reinterpret_cast<uintptr_t>(a.k) % 16 || reinterpret_cast<uintptr_t>(a.v) % 16)
    throw std::invalid_argument(who + "k and v must be 16-byte aligned");
  if (dp == 128)
    a.bf16 ? launch<128, __nv_bfloat16>(a, stream) : launch<128, __half>(a, stream);
  else
    a.bf16 ? launch<64, __nv_bfloat16>(a, stream) : launch<64, __half>(a, stream);
}

}  // namespace sage_cuda
