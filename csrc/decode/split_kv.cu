// Decode: common/decode.py's split-KV algorithm in one CUDA launch. The algorithm, tile for tile, is
// the one `backend="torch"` emulates (common.decode.decode_emulated) and common/triton_decode.py
// runs; what differs is how the work is laid out on the machine, because decode is bound by reading
// K and V once:
//
//   * the programs of a KV head (about two per SM in all) share its tiles dynamically: each takes
//     one tile per stage first, then claims the next tile on the KV head's counter, so that programs
//     the memory serves faster take more tiles. Each tile's P is quantized after the tile's own row
//     max, so the result does not depend on who took which tile beyond fp32 rounding. Fixed splits
//     (a.dynamic false: torch's deterministic mode, Q smoothing with several queries per head) keep
//     static ranges. With one program per KV head (more KV heads than half the programs that fit),
//     helper programs after the owners join the KV heads with the most tiles left (a.helpers);
//   * the copy engine (TMA) brings each 64-key tile of K and V (fp16/bf16, as the caller stores them)
//     into shared memory, in 64-row x 128-byte boxes with the 128-byte swizzle, completing on one
//     mbarrier per stage: one thread issues them, so no warp spends instructions on copies. Two
//     stages per program, two programs per SM. The first claim and Q's loads go out first, then
//     the first tiles (before Q is used); each tile refills its stage as soon as every warp has
//     read it (K in the quantization, V's fragments with it), while its softmax and P V still run;
//   * 4 warps quantize the tile from shared memory: K's token mean over the tile (channel sums as
//     ones x K on the tensor cores), K - mean to INT8/INT4 codes with one scale per tile or per token,
//     straight into mma.sync B fragments; INT8 Q K^T on mma.sync m16n8k32 (16 query rows: every
//     query head of the KV head);
//   * the online softmax over the tile (one row max shared through shared memory, so P is rounded
//     exactly as the emulation rounds it), P to fp16 or to FP8 E4M3 (kept as exact fp16) in shared
//     memory; V to FP8 per channel per tile (sage2) in registers, on its mma fragments;
//   * P V on mma.sync m16n8k16, each warp a quarter of the channels over all 64 keys, summed in fp16
//     (sage1, the paper's FP16 accumulator) or fp32, then rescaled into an fp32 accumulator;
//   * Q smoothing (sage2's INT4 default): Q minus each head's mean over its queries is what gets
//     quantized, and mean_q . (K - mean_k) per head and key is added to the scores, as
//     qc . mean_k + mean_q . K: the second on the tensor cores, the warp's keys as stored against
//     each head's mean_q in 16-bit parts (two for fp16, three for bf16; the Triton kernel uses 3xTF32
//     on K - mean_k: both ~fp32).
//
// An attn_mask (uint8 keep or fp32 log2 bias, [B, Hq, Nq, Nk] through its strides; HAS_MASK) is read
// per score, one tile ahead (loaded at the tile's own start, their latency was not hidden): a mask
// whose rows are alike within a program (a padding mask [B, 1, 1, Nk]) one key per thread into
// shared memory, any other by each thread for its own scores. With a keep mask of alike rows and
// one K scale per tile (sage1) a program first lists the tiles its row keeps and goes through those
// alone: left padding's tiles are never copied. (An L2 prefetch of the next tile's mask lines by
// the thread that issues the copies was 20-30% slower: DECODE_NOTES.md.)
//
// As in the Triton fast sweep there are no NaN/Inf checks per element: a non-finite input cannot
// vanish from K's token sums, l or the accumulator, so one test per program flags it, and a flagged
// program sweeps its own tiles again carefully (NaN/Inf zeroed and their rows marked, fp16 V scaled
// by a power of two). The last program of each KV head to finish merges all of them by their LSE
// into the caller's output. Products that must round before an add use __fmul_rn / __fadd_rn: the
// emulation rounds them. Versions and measurements: common/DECODE_NOTES.md.
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>

#include "common/exact_div.cuh"
#include "common/hopper.cuh"
#include "common/launch.h"
#include "common/mma_sync.cuh"
#include "common/tensor_map.h"
#include "decode/split_kv.h"

namespace sage_cuda {
namespace {

constexpr int kTile = 64;     // keys per tile: common.decode.DECODE_TILE
constexpr int kRows = 16;     // query rows per program: (query heads of a KV head) x (queries, padded)
// Tuning builds override these (SAGE_NVCC_FLAGS="-DSAGE_DECODE_STAGES=3 ...", common/build.py;
// experiments/decode_variants.py times such builds side by side). Measured on the H100, sage1 at 16k:
// 3 stages 4% slower than 2, three programs per SM or 8 warps no faster (DECODE_NOTES.md, c4, with
// cp.async); with TMA 3 stages 1-3% slower (c6, c8).
#ifndef SAGE_DECODE_WARPS
#define SAGE_DECODE_WARPS 4
#endif
#ifndef SAGE_DECODE_STAGES
#define SAGE_DECODE_STAGES 2
#endif
#ifndef SAGE_DECODE_MIN_BLOCKS
#define SAGE_DECODE_MIN_BLOCKS 2
#endif
constexpr int kWarps = SAGE_DECODE_WARPS;
constexpr int kThreads = 32 * kWarps;
constexpr int kStages = SAGE_DECODE_STAGES;         // tiles in flight
constexpr int kMinBlocks = SAGE_DECODE_MIN_BLOCKS;  // programs per SM the registers must allow
constexpr float kInf = __builtin_huge_valf();
// A KV head's claim word (DecodeArgs::counters): tiles claimed in the low bits, helpers that joined
// the KV head above them
constexpr int kClaimBits = 20;
constexpr int kClaimMask = (1 << kClaimBits) - 1;
// a helper joins a KV head only with at least this many tiles unclaimed: below that, its start (Q, the
// first tile's latency, ~3-5 us) costs more than the tiles it would take
constexpr int kMinHelpTiles = 4;

// Measurement builds (-DSAGE_DECODE_TRACE, experiments/decode_trace.py): thread 0 of each program
// writes the global timer (ns) at its steps into rows 8..15 of its partial outputs, which hold
// nothing when Nq * group <= 8: slot 0 start, 1 Q ready, 2 + 2 it / 3 + 2 it tile it's data in /
// done, 126 sweep done, 127 split counted, 128 merge done (the merging program only); 129 the SM
#ifdef SAGE_DECODE_TRACE
__device__ __forceinline__ uint64_t* trace_slots(const DecodeArgs& a, int dp) {
  return reinterpret_cast<uint64_t*>(a.part_out + ((int64_t(blockIdx.x) * gridDim.y + blockIdx.y) * kRows + 8) * dp);
}
__device__ __forceinline__ uint64_t global_timer() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ uint64_t sm_id() {
  uint32_t id;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
  return id;
}
#define DECODE_TRACE(slot) \
  if (tid == 0) trace_slots(a, DP)[slot] = global_timer();
#else
#define DECODE_TRACE(slot) {}
#endif

// A tile of K or V in shared memory as TMA writes it: DP / 64 boxes of 64 rows x 128 bytes (64
// channels), each row's eight 16-byte chunks permuted by the 128-byte swizzle (chunk c of row r lands
// at c ^ (r % 8)), so that eight rows read at one column hit eight different bank groups.
constexpr int kBoxBytes = kTile * 128;
__device__ __forceinline__ int tile_offset(int row, int byte) {  // byte: within the row, 0 .. 2 DP - 1
  return (byte >> 7) * kBoxBytes + row * 128 + ((((byte >> 4) & 7) ^ (row & 7)) << 4) + (byte & 15);
}
// tile_offset(r + R, b + B) from base = tile_offset(r, b), for the loops' compile-time steps R and
// B: one XOR and a constant, where computing it afresh costs ~5 integer instructions per access (K's
// reads in (2) make 16 per thread and tile). Valid when r % 8 and R % 8 share no bits, b's and
// B's 16-byte chunks share no bits, B % 16 == 0 and b + B stays in b's 128-byte box.
__device__ __forceinline__ int tile_step(int base, int R, int B) {
  return (base ^ ((((B >> 4) & 7) ^ (R & 7)) << 4)) + (B >> 7) * kBoxBytes + R * 128;
}

__device__ __forceinline__ float exp2_int(int e) { return __int_as_float((127 + e) << 23); }  // 2^e, |e| < 127
// the least e >= 0 with 2^e >= x, by the exponent bits (x > 1 and finite, else 0)
__device__ __forceinline__ int ceil_log2_above_one(float x) {
  return x > 1.f ? ((__float_as_int(x) + 0x7FFFFF) >> 23) - 127 : 0;
}

// Q smoothing's mean q as 16-bit parts whose sum is ~fp32: hi + lo for fp16 (22 bits where lo is a
// normal fp16, ~2^-25 absolute below; a third part changed nothing measurable, as the fp32 sums'
// own rounding dominates), three for bf16's 8-bit mantissa. fp16 parts hold the mean / 2^e where
// the log2 scaling of q exceeds 1 (2^e >= it), so that |mean q| / 2^e stays within fp16's range
constexpr int kMqParts = 3;  // room for bf16's; fp16 uses the first two (the kernel's MQP)

// A padding mask's kept tiles (HAS_MASK, rows alike): up to this many tiles (64k keys) a program lists
// the tiles its mask row keeps and claims those alone (longer rows: every tile)
constexpr int kMaxListTiles = 1024;

template <int DP, bool SMOOTH_Q, bool HAS_MASK = false>
struct Layout {
  static constexpr int kTileBytes = kTile * DP * 2;  // one stage of K (or V), unpadded
  static constexpr int kPitchP = kTile * 2 + 16;
  static constexpr int kK = 0;                       // 1024-byte aligned (the swizzle's period)
  static constexpr int kV = kK + kStages * kTileBytes;
  static constexpr int kP = kV + kStages * kTileBytes;           // P (fp16), Q's codes in the prologue
  static constexpr int kMeanK = kP + kRows * kPitchP;          // float[DP]: the tile's token mean
  static constexpr int kQm = kMeanK + DP * 4;                  // float[16]: q . mean_k (Q smoothing: qc . mean_k)
  static constexpr int kScaleQ = kQm + kRows * 4;              // float[16]
  static constexpr int kBadQ = kScaleQ + kRows * 4;            // int[16]
  static constexpr int kAmax = kBadQ + kRows * 4;              // float[warps]
  static constexpr int kRowMax = kAmax + kWarps * 4;           // float[warps][16]
  static constexpr int kRowSum = kRowMax + kWarps * kRows * 4; // float[warps][16]
  static constexpr int kKeyBad = kRowSum + kWarps * kRows * 4; // int[64]: careful sweep, keys with a NaN/Inf
  static constexpr int kRowBad = kKeyBad + kTile * 4;          // int[16]: rows that saw one
  static constexpr int kMask = kRowBad + kRows * 4;            // float[64]: attn_mask entries of the tile's keys (rows alike)
  static constexpr int kFlag = kMask + kTile * 4;              // int: this program merges the splits
  static constexpr int kTileOf = kFlag + 16;                    // int[stages]: the tile each stage holds (-1: none)
  static constexpr int kPitchMq = DP * 2 + 16;                 // (padded: conflict-free ldmatrix rows)
  static constexpr int kMeanQ = kTileOf + 16;                   // smooth_q: 16-bit[parts][16 heads][DP]: each head's mean q
  static constexpr int kPitchDelta = 20;                        // floats per head and warp: conflict-free C stores
  static constexpr int kDelta = kMeanQ + (SMOOTH_Q ? kMqParts * kRows * kPitchMq : 0);  // float[warps][16 heads][20]
  static constexpr int kBar = kDelta + (SMOOTH_Q ? kWarps * kRows * kPitchDelta * 4 : 0);  // uint64[stages]
  static constexpr int kKeep = kBar + kStages * 8;              // mask: uint32[kMaxListTiles / 32], a bit per tile it keeps
  static constexpr int kKept = kKeep + (HAS_MASK ? kMaxListTiles / 8 : 0);  // mask: int, then uint16[kMaxListTiles]: the kept tiles
  static constexpr int kBytes = kKept + (HAS_MASK ? 16 + kMaxListTiles * 2 : 0) + 1024;  // + the slack to align the base
  static_assert(kRows * DP <= kRows * kPitchP, "Q's codes must fit in P's buffer");
  static_assert(kMeanK % 16 == 0 && kMeanQ % 16 == 0 && kBar % 8 == 0 && kMask % 8 == 0,
                "aligned reads of the means, the barriers, mask pairs");
  static_assert(kRows * DP * 4 <= kTileBytes, "smooth_q's scratch for Q must fit in one stage of K");
  static_assert(kStages >= 2, "a tile is copied while the one before is computed");
  static_assert(kStages <= 4, "kTileOf holds four stages");
};


template <typename In>
__device__ __forceinline__ float4 load4(const char* p) {  // four consecutive 16-bit values
  const uint2 r = *reinterpret_cast<const uint2*>(p);
  const float2 a = pair_to_float2<In>(r.x), b = pair_to_float2<In>(r.y);
  return make_float4(a.x, a.y, b.x, b.y);
}

// mma.sync B fragments (k = key, n = channel) of a [64 keys x channels] tile in shared memory, for
// the CW channels from c0, by ldmatrix.trans: fn(k-step, n-tile, b0, b1) for each 16 keys x 8 channels
template <int CW, typename Fn>
__device__ __forceinline__ void for_each_b_fragment(const char* tile, int c0, int lane, Fn&& fn) {
  const int mat = lane >> 3, r8 = lane & 7;
  uint32_t b[4];
  if constexpr (CW >= 16) {  // one call: two n-tiles of one k-step
    const int base = tile_offset(r8 + (mat & 1) * 8, (c0 + (mat >> 1) * 8) * 2);  // c0: a multiple of CW
#pragma unroll
    for (int kk = 0; kk < kTile / 16; ++kk)
#pragma unroll
      for (int np = 0; np < CW / 16; ++np) {
        ldmatrix_x4_trans(b, tile + tile_step(base, 16 * kk, 32 * np));
        fn(kk, 2 * np, b[0], b[1]);
        fn(kk, 2 * np + 1, b[2], b[3]);
      }
  } else {  // 8 channels: one call, one n-tile of two k-steps
    static_assert(CW == 8, "channels per warp: 8 or a multiple of 16");
#pragma unroll
    for (int kp = 0; kp < kTile / 32; ++kp) {
      ldmatrix_x4_trans(b, tile + tile_offset(32 * kp + 8 * mat + r8, c0 * 2));
      fn(2 * kp, 0, b[0], b[1]);
      fn(2 * kp + 1, 0, b[2], b[3]);
    }
  }
}

// The tiles that a keep-mask row (uint8, one byte per key) keeps, in order, into s_kept; returns
// their count (with none, tile 0 alone: its keys are all dropped, so its rows give zeros and an LSE
// of -inf, as with every tile). The row is read in aligned 16-byte
// chunks (a chunk holds keys of at most two tiles), eight chunks per thread in flight; each thread
// sets its chunks' tiles' bits, and warp 0 turns the bits into the list. Called by every thread of
// the block, between barriers of its own.
// The first and last chunks may hold up to 15 bytes outside the row, read and ignored: an aligned
// chunk never crosses a page, and torch's caching allocator hands out parts of larger segments, but
// compute-sanitizer's memcheck with PYTORCH_NO_CUDA_MEMORY_CACHING=1 would report a mask whose
// allocation ends mid-chunk (not seen: the sanitizer script has not run over masked decode yet).
__device__ int list_kept_tiles(const DecodeArgs& a, int64_t row, int n_total, uint32_t* s_keep, uint16_t* s_kept,
                               int* s_n_kept) {
  static_assert(kMaxListTiles <= 32 * 32, "warp 0 lists the kept tiles, a word of 32 tiles per lane");
  const int tid = threadIdx.x, nk = a.seqlen_k, words = (n_total + 31) / 32;
  for (int i = tid; i < words; i += kThreads) s_keep[i] = 0u;
  __syncthreads();
  const uintptr_t at = reinterpret_cast<uintptr_t>(static_cast<const uint8_t*>(a.mask) + row);
  const int head = int(at & 15u);  // bytes of the first chunk before key 0
  const uint4* chunks = reinterpret_cast<const uint4*>(at - head);
  const int n_chunks = (head + nk + 15) / 16;
  constexpr int kInFlight = 8;
  for (int c0 = tid; c0 < n_chunks; c0 += kInFlight * kThreads) {
    uint4 v[kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const int c = c0 + u * kThreads;
      v[u] = c < n_chunks ? __ldg(chunks + c) : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const int first = (c0 + u * kThreads) * 16 - head;  // the key of the chunk's byte 0
      const uint32_t w[4] = {v[u].x, v[u].y, v[u].z, v[u].w};
      uint32_t kept = 0u;  // bit j: byte j keeps its key
#pragma unroll
      for (int j = 0; j < 16; ++j) kept |= uint32_t(((w[j >> 2] >> (8 * (j & 3))) & 0xffu) != 0u) << j;
      const int lo = max(0, -first), hi = min(16, nk - first);  // the bytes of keys in range
      if (hi <= lo) continue;
      kept &= ((1u << hi) - 1u) & ~((1u << lo) - 1u);
      if (kept == 0u) continue;
      const int tile = (first + lo) / kTile, next = (tile + 1) * kTile - first;  // next: byte of the next tile's first key
      const uint32_t in_tile = next >= 16 ? kept : kept & ((1u << next) - 1u);
      if (in_tile != 0u) atomicOr(s_keep + tile / 32, 1u << (tile % 32));
      if (kept != in_tile) atomicOr(s_keep + (tile + 1) / 32, 1u << ((tile + 1) % 32));
    }
  }
  __syncthreads();
  if (tid < 32) {
    const uint32_t word = tid < words ? s_keep[tid] : 0u;
    const int count = __popc(word);
    int upto = count;  // inclusive prefix sum over the lanes
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, upto, off);
      if (tid >= off) upto += y;
    }
    int pos = upto - count;
    for (uint32_t bits = word; bits != 0u; bits &= bits - 1u) s_kept[pos++] = uint16_t(tid * 32 + __ffs(bits) - 1);
    if (tid == 31) {
      if (upto == 0) s_kept[0] = 0;
      *s_n_kept = max(upto, 1);
    }
  }
  __syncthreads();
  return *s_n_kept;
}

template <int DP, bool BF16, int PV, bool K_PER_TOKEN, bool SMOOTH_Q, bool HAS_MASK>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    decode_kernel(const DecodeArgs a, const __grid_constant__ CUtensorMap map_k, const __grid_constant__ CUtensorMap map_v) {
  using In = std::conditional_t<BF16, __nv_bfloat16, __half>;
  constexpr bool FP8 = PV == kPvFp8E4m3;
  using L = Layout<DP, SMOOTH_Q, HAS_MASK>;
  constexpr int KS = DP / 32;          // k-steps of the INT8 mma over channels
  constexpr int KPW = kTile / kWarps;  // keys per warp (Q K^T), in n-tiles of 8
  constexpr int NKT = KPW / 8;
  constexpr int CW = DP / kWarps;      // channels per warp (K sums, P V)
  constexpr int NT = CW / 8;           // n-tiles of P V per warp
  constexpr int TPR = kThreads / kRows;  // threads per Q row in the prologue and for q . mean_k
  constexpr int QC = DP / TPR;
  constexpr int MQP = BF16 ? 3 : 2;    // Q smoothing's mean q in 16-bit parts (kMqParts)
  static_assert(NKT >= 1 && NT >= 1 && TPR <= 32, "tile, warps and head dim do not fit together");
  static_assert(!SMOOTH_Q || KPW == 16 || KPW == 8, "(2b) takes a warp's keys as one 16-row A operand");
  extern __shared__ __align__(16) char smem_raw[];
  // the swizzle's 1024-byte period, by pointer arithmetic on the shared array: a round trip through an
  // integer would hide that it is shared memory, and every read would become a generic load
  char* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  char* s_k = smem + L::kK;
  char* s_v = smem + L::kV;
  char* s_p = smem + L::kP;
  float* s_mean_k = reinterpret_cast<float*>(smem + L::kMeanK);
  float* s_qm = reinterpret_cast<float*>(smem + L::kQm);
  float* s_scale_q = reinterpret_cast<float*>(smem + L::kScaleQ);
  int* s_bad_q = reinterpret_cast<int*>(smem + L::kBadQ);
  float* s_amax = reinterpret_cast<float*>(smem + L::kAmax);
  float* s_row_max = reinterpret_cast<float*>(smem + L::kRowMax);
  float* s_row_sum = reinterpret_cast<float*>(smem + L::kRowSum);
  int* s_key_bad = reinterpret_cast<int*>(smem + L::kKeyBad);
  int* s_row_bad = reinterpret_cast<int*>(smem + L::kRowBad);
  float* s_mask = reinterpret_cast<float*>(smem + L::kMask);
  int* s_flag = reinterpret_cast<int*>(smem + L::kFlag);
  int* s_tile_of = reinterpret_cast<int*>(smem + L::kTileOf);
  char* s_mean_q = smem + L::kMeanQ;
  float* s_delta = reinterpret_cast<float*>(smem + L::kDelta);
  uint64_t* s_bar = reinterpret_cast<uint64_t*>(smem + L::kBar);
  uint32_t* s_keep = reinterpret_cast<uint32_t*>(smem + L::kKeep);
  int* s_n_kept = reinterpret_cast<int*>(smem + L::kKept);
  uint16_t* s_kept = reinterpret_cast<uint16_t*>(smem + L::kKept + 16);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const int bh = a.batch * a.heads_kv, n_total = (a.seqlen_k + kTile - 1) / kTile;
  DECODE_TRACE(0)
#ifdef SAGE_DECODE_TRACE
  if (tid == 0) trace_slots(a, DP)[129] = sm_id();
#endif
  // ---- helpers (a.helpers > 0, one owner program per KV head: more KV heads than programs fit at
  // once). The owners run in waves, and the memory serves SMs unevenly, so the last wave used to end
  // ~10 us after most of it. The helper programs come after every owner in the grid, so they start
  // as owners finish; each joins the KV head with the most tiles left (at most a.splits - 1 per KV
  // head: its partial slots) and claims tiles on its counter beside the owner. Which program takes a
  // tile does not change the result beyond fp32 rounding (each tile's P is quantized after its own
  // row max). Helpers that start together spread over the KV heads with about as many tiles left (in
  // steps of 8), in an order of their own; all taking the one with the most left, every one but three
  // failed to join (measured: a 1.09-wave grid gained 2% instead of the idle slots). A KV head's programs are then not known in advance, its tiles are: the program that
  // completes the last tile merges. The counters are zeroed by whoever counts the last of the bh
  // merges and a.helpers helper exits, when nothing reads them any more ----
  const bool helping = a.helpers > 0;
  auto count_finished = [&](int events) {  // block-wide (helper mode)
    __syncthreads();
    if (tid == 0) s_flag[1] = atomic_add_acq_rel_gpu(a.counters + 2 * bh, events) + events == bh + a.helpers;
    __syncthreads();
    if (s_flag[1])
      for (int i = tid; i <= 2 * bh; i += kThreads) a.counters[i] = 0;
  };
  int split = blockIdx.x, kv_bh = blockIdx.y;
  int joined_at = 0;  // a helper's first claim (its tile: kStages + joined_at)
  const bool helper = helping && kv_bh >= bh;
  if (helper) {
    // the best candidate as (valid bit, tiles left / 8 capped at 15 bits, this helper's order, KV head):
    // one atomicMax picks it; the valid bit tells a candidate from "none" (KV head 0 with order 0 and
    // 4-7 tiles left would otherwise read as 0)
    __shared__ unsigned long long s_pick;
    kv_bh = -1;
    const unsigned seed = blockIdx.y * 0x85EBCA6Bu;
    for (int attempt = 0; attempt < 4 && kv_bh < 0; ++attempt) {  // (others may take the last slots)
      if (tid == 0) s_pick = 0;
      __syncthreads();
      unsigned long long best = 0;
      for (int h = tid; h < bh; h += kThreads) {
        const int w = load_relaxed_gpu(a.counters + bh + h);
        const int left = n_total - kStages - (w & kClaimMask);  // the owner's first kStages tiles are its own
        const unsigned order = ((static_cast<unsigned>(h) * 0x9E3779B1u) ^ seed) >> 16;  // 16 bits
        if ((w >> kClaimBits) < a.splits - 1 && left >= kMinHelpTiles)
          best = max(best, (1ull << 63) | (static_cast<unsigned long long>(min(left >> 3, 0x7fff)) << 48) |
                               (static_cast<unsigned long long>(order) << 32) | static_cast<unsigned>(h));
      }
      if (best != 0) atomicMax(&s_pick, best);
      __syncthreads();
      if (tid == 0) {  // join it: one more helper and its first claim in one compare-and-swap
        int target = -1, slot = 0, at = 0;
        if (s_pick != 0) {
          const int h = static_cast<int>(s_pick & 0xffffffffu);
          int* word = a.counters + bh + h;
          int cur = load_relaxed_gpu(word);
          // (the same bar as the scan's: the word may have moved since, and a helper that joins for fewer
          // tiles costs more than it takes)
          while ((cur >> kClaimBits) < a.splits - 1 && n_total - kStages - (cur & kClaimMask) >= kMinHelpTiles) {
            const int prev = atomicCAS(word, cur, cur + (1 << kClaimBits) + 1);
            if (prev == cur) {
              target = h, slot = 1 + (cur >> kClaimBits), at = cur & kClaimMask;
              break;
            }
            cur = prev;
          }
        }
        s_flag[1] = target, s_flag[2] = slot, s_flag[3] = at;
      }
      __syncthreads();
      kv_bh = s_flag[1], split = s_flag[2], joined_at = s_flag[3];
      __syncthreads();  // (s_flag and s_pick are written again)
    }
    if (kv_bh < 0) {  // nothing left worth joining
      count_finished(1);
      return;
    }
  }
  const int b = kv_bh / a.heads_kv, hk = kv_bh % a.heads_kv;
  const int nq = a.seqlen_q, nk = a.seqlen_k, q_offset = nk - nq;  // causal: bottom-right
  // attn_mask: every row of this program (the query heads and queries of one KV head) reads one mask
  // row, this one (recomputed where used: a register held through the sweep cost sage2's loop)
  const bool mask_rows_alike = HAS_MASK && (a.group == 1 || a.mask_stride_h == 0) && (nq == 1 || a.mask_stride_q == 0);
  auto mask_row_alike = [&]() { return b * a.mask_stride_b + int64_t(hk * a.group) * a.mask_stride_h; };
  // Q smoothing with one query per head leaves nothing to quantize: q minus its head's mean is 0
  // exactly, Q's codes are 0, and the scores are (2b)'s mean_q . K alone. K's codes and the INT8
  // product (2)-(3) would add exact zeros, so they are skipped (the same result, bit for bit)
  const bool codes_are_zero = SMOOTH_Q && nq == 1;
  // (2b)'s fp16 parts hold mean q / 2^e (kMqParts), C is multiplied back by 2^e: both exact
  const int mq_exp = BF16 ? 0 : ceil_log2_above_one(a.qk_mult);
  const float qmax = float(a.qmax), inv_qmax = __frcp_rn(qmax);

  // ---- which tiles this program takes. The memory serves programs unevenly (the slowest tenth of a
  // static split finished streaming 9-12 us after the fastest half; experiments/decode_trace.py), so
  // by default the programs of a KV head share its tiles dynamically: program `split` first takes
  // tiles split, split + splits, ... (one per stage, asked for before Q is read), then whichever tile
  // is next on the KV head's claim counter, claimed one refill ahead so that the atomic's latency
  // hides under a tile. Any order gives the same result up to fp32 rounding, because each tile's P is
  // quantized after its own row max (common.decode). a.dynamic == false (torch's deterministic mode):
  // the static split [split tps, (split + 1) tps), bit for bit the same on every run. Thread 0 keeps
  // the sequence; a stage's tile goes through s_tile_of. Each tile taken is linked to the one this
  // program took before it (a.tile_link), so a flagged program's careful sweep replays its own tiles.
  // A keep mask whose rows are alike (a padding mask): the sequence is the list of the tiles the mask
  // keeps (built below, before the first copy; position i of the sequence is the list's entry i): a
  // tile it drops for every row adds nothing, and its copy is never asked for (left padding: each
  // sequence's prefix). Not with helpers (they join a KV head for its tiles left, counted in all of
  // its tiles), nor with a bias (Hugging Face's additive padding is finfo.min, finite: nothing to
  // drop), nor past kMaxListTiles. Nor with per-token K scales (sage2's default): the list's code
  // in their loop (the position's tile read at each refill, which they issue mid-tile) changed its
  // schedule, and every masked call of theirs ran 5-11% slower, bias masks too, gaining 3-5% on
  // left padding (H100, 2026-11-25, DECODE_NOTES.md); their loop is the one before the list
  constexpr bool kListable = HAS_MASK && !K_PER_TOKEN;
  const bool kept_list = kListable && a.mask_kind == 1 && mask_rows_alike && !helping && n_total <= kMaxListTiles &&
                         (nk == 1 || a.mask_stride_k == 1);
  int n_seq = n_total;  // the sequence's length (with a kept list: the list's)
  const bool dynamic = a.dynamic && a.splits > 1;  // (one program per KV head: nobody to share with)
  int seq_next, seq_step, seq_end;  // thread 0: the statically assigned positions still to take
  auto plan_sequence = [&]() {
    if (helping) {  // the owner takes the first kStages tiles, then claims; a helper only claims
      seq_next = 0, seq_step = 1, seq_end = helper ? 0 : min(n_seq, kStages);
    } else if (dynamic) {
      seq_next = split, seq_step = a.splits, seq_end = min(n_seq, split + kStages * a.splits);
    } else {
      seq_next = split * a.tiles_per_split, seq_step = 1, seq_end = min(n_seq, seq_next + a.tiles_per_split);
    }
  };
  plan_sequence();
  const int first_claimed = helping ? kStages : dynamic ? kStages * a.splits : n_total;  // from here on claimed
  int* claims = a.counters + a.batch * a.heads_kv + kv_bh;
  int32_t* link = a.tile_link + int64_t(kv_bh) * n_total;
  bool claiming = first_claimed < n_total;  // thread 0: claims are not yet used up
  int claimed = joined_at;  // thread 0: the claim asked for one refill ahead (its tile: first_claimed + its
                            // low kClaimBits).
                        // Read only at the next refill, so that nothing waits for the atomic before then
  int chain = -1;       // thread 0: the last tile taken (the fast sweep), the next to replay (careful)
  int taken = 0;        // thread 0: tiles taken in the fast sweep (helper mode counts KV heads' tiles done)
  bool replay = false;  // the careful sweep: walk the chain
  // the first claim, read at the first refill, goes out before anything else: behind the first tiles'
  // copies in the memory queues it came back only after ~8 us, and Q's processing waited for it
  if (tid == 0 && claiming && !helper) claimed = atomicAdd(claims, 1);  // (a helper's came with joining)

  // ---- Q's loads are issued next, before the tiles' copies: behind every program's first tiles in the
  // memory queues they came back only after ~8 us, when every stage had long landed and the memory
  // was idle (trace, experiments/decode_trace.py) ----
  In q_in[QC];
  const int q_row = tid / TPR, q_part = tid % TPR;
  const int q_head = q_row / a.rows_per_head, q_i = q_row % a.rows_per_head;
  const bool q_ok = q_head < a.group && q_i < nq;
  {
    const In* src = static_cast<const In*>(a.q) + b * a.q_stride_b + int64_t(hk * a.group + q_head) * a.q_stride_h +
                    int64_t(q_i) * a.q_stride_n + q_part * QC;
#pragma unroll
    for (int j = 0; j < QC; ++j) q_in[j] = q_ok ? src[j] : In(0.f);
  }

  auto next_tile = [&]() -> int {  // thread 0
    int t = -1;
    if (replay) {
      t = chain;
      if (t >= 0) chain = link[t];
      return t;
    }
    if (seq_next < seq_end) {
      t = seq_next, seq_next += seq_step;
    } else if (claiming) {
      t = first_claimed + (claimed & kClaimMask);
      if (t < n_seq) {
        claimed = atomicAdd(claims, 1);
      } else {
        t = -1, claiming = false;
      }
    }
    if constexpr (kListable) {
      if (kept_list && t >= 0) t = s_kept[t];  // the position's tile
    }
    if (t >= 0) link[t] = chain, chain = t, ++taken;
    return t;
  };
  uint32_t phase = 0;  // bit s: the parity stage s's barrier completes with next
  auto load_tile = [&](int stage, int start) {  // thread 0: one tile of K and V (keys past nk: zeros)
    mbar_arrive_expect_tx(&s_bar[stage], 2 * L::kTileBytes);
#pragma unroll
    for (int box = 0; box < DP / 64; ++box) {
      tma_load_4d(s_k + stage * L::kTileBytes + box * kBoxBytes, &map_k, &s_bar[stage], box * 128, start, hk, b);
      tma_load_4d(s_v + stage * L::kTileBytes + box * kBoxBytes, &map_v, &s_bar[stage], box * 128, start, hk, b);
    }
  };
  auto fill = [&](int stage) {  // thread 0: the next tile of the sequence into `stage`, if there is one
    const int t = next_tile();
    s_tile_of[stage] = t;
    if (t >= 0) load_tile(stage, t * kTile);
  };
  auto issue_stages = [&](int lo, int hi) {  // the sequence's next tiles into stages lo .. hi - 1
    if (tid == 0)
      for (int s = lo; s < hi; ++s) fill(s);
  };
  // the stage's next tile, once every warp has read the stage (the barrier in (4)): the copy starts
  // while this tile's softmax and P V run
  auto refill = [&](int stage) {
    if (tid == 0) fill(stage);
  };
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) mbar_init(&s_bar[s], 1);
    fence_barrier_init();
  }
  // the kept list before the first copy: listed after it, the sequence's first tiles were copied
  // whatever the mask (at 16k keys 6% of the tiles, with left padding mostly dropped ones: 7% slower)
  if constexpr (kListable) {
    if (kept_list) {  // block-uniform
      n_seq = list_kept_tiles(a, mask_row_alike(), n_total, s_keep, s_kept, s_n_kept);
      // (fixed splits keep their tiles_per_split, planned for n_total: the kept tiles fill the first
      // splits, the rest take none; the same bits on every call, no faster than without the list.
      // A first claim already asked for (for n_total) and now past the list goes unused: it comes
      // before this program is counted, and the counter is reset after the last one is)
      plan_sequence();
      claiming = first_claimed < n_seq;
    }
  }
  __syncthreads();
  constexpr int kPrimed = SMOOTH_Q ? kStages - 1 : kStages;  // Q smoothing's prologue uses the last stage as scratch
  issue_stages(0, kPrimed);

  // ---- Q: log2-scaled fp32 (non-finite rows zeroed and marked), one INT scale per row ----
  float q[QC];
  {
    const int row = q_row, part = q_part, head = q_head, i = q_i;
    const bool ok = q_ok;
    int bad = 0;
    float amax = 0.f;
#pragma unroll
    for (int j = 0; j < QC; ++j) {
      float x = ok ? __fmul_rn(to_float(q_in[j]), a.qk_mult) : 0.f;
      if (!isfinite(x)) bad = 1, x = 0.f;
      q[j] = x;
      amax = fmaxf(amax, fabsf(x));
    }
    float qc[QC];  // what is quantized: q, or (smooth_q) q minus its head's mean over the queries
#pragma unroll
    for (int j = 0; j < QC; ++j) qc[j] = q[j];
    if constexpr (SMOOTH_Q) {  // the mean over a head's rows, through shared memory (K's last stage is free)
      float* scratch = reinterpret_cast<float*>(s_k + (kStages - 1) * L::kTileBytes);
#pragma unroll
      for (int j = 0; j < QC; ++j) scratch[row * DP + part * QC + j] = q[j];
      // (2b)'s B columns of heads past the group (a program has at most 8 or 16) are zeros, not junk
      for (int c = tid; c < MQP * kRows * (DP / 8); c += kThreads) {
        const int pt_head = c / (DP / 8);
        if (pt_head % kRows >= a.group)
          *reinterpret_cast<uint4*>(s_mean_q + pt_head * L::kPitchMq + (c % (DP / 8)) * 16) = make_uint4(0u, 0u, 0u, 0u);
      }
      fence_proxy_async_shared();  // before the copy engine fills the stage (at the fast sweep's start)
      __syncthreads();
      amax = 0.f;
#pragma unroll
      for (int j = 0; j < QC; ++j) {
        float sum = 0.f;
        for (int r = 0; r < nq; ++r) sum += scratch[(head * a.rows_per_head + r) * DP + part * QC + j];
        const float mean = __fdiv_rn(sum, float(nq));
        // the head's mean as 16-bit parts (B operands of (2b)), written by its first row
        float rest = __fmul_rn(mean, exp2_int(-mq_exp));
#pragma unroll
        for (int pt = 0; pt < MQP; ++pt) {
          const In x = In(rest);
          if (ok && i == 0) *reinterpret_cast<In*>(s_mean_q + (pt * kRows + head) * L::kPitchMq + (part * QC + j) * 2) = x;
          rest = __fsub_rn(rest, to_float(x));
        }
        qc[j] = ok ? __fsub_rn(q[j], mean) : 0.f;
        amax = fmaxf(amax, fabsf(qc[j]));
      }
      // (2)'s q . mean_k becomes qc . mean_k: with mean_q . K from (2b), qc . m + mean_q . k =
      // q . m + mean_q . (k - m), what the emulation adds
#pragma unroll
      for (int j = 0; j < QC; ++j) q[j] = qc[j];
    }
#pragma unroll
    for (int off = 1; off < TPR; off <<= 1) {
      amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
      bad |= __shfl_xor_sync(0xffffffffu, bad, off);
    }
    const float sq = __fdiv_rn(amax, qmax);
    const float inv = __frcp_rn(sq == 0.f ? 1.f : sq);
    int8_t* codes = reinterpret_cast<int8_t*>(s_p) + row * DP + part * QC;
#pragma unroll
    for (int j = 0; j < QC; ++j) codes[j] = int8_t(round_even(__fmul_rn(qc[j], inv)));
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
  int i_row[2], delta_head[2];  // delta_head: the row's head (0 for padding rows: finite junk)
  bool ok_row[2];
  int64_t mask_row[2];  // attn_mask: the row's offset in it (its sequence, query head and query)
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = g + 8 * h;
    i_row[h] = row % a.rows_per_head;
    ok_row[h] = row / a.rows_per_head < a.group && i_row[h] < nq;
    delta_head[h] = row / a.rows_per_head < a.group ? row / a.rows_per_head : 0;
    mask_row[h] = b * a.mask_stride_b + int64_t(hk * a.group + delta_head[h]) * a.mask_stride_h +
                  int64_t(i_row[h]) * a.mask_stride_q;
  }
  __syncthreads();  // P's buffer is reused below

  // the sweep's state (per thread: rows g and g + 8; l over this warp's keys only)
  float m_row[2], l_row[2], acc[NT][4];
  float k_check;   // K's token sums: non-finite iff K had a NaN/Inf
  int bad_kv[2];   // careful sweep: the row saw a key with a NaN/Inf in K or V
  // attn_mask (HAS_MASK): the entries of the tile being computed (0 / -inf for a keep mask, the bias),
  // loaded one tile ahead, as soon as the previous tile's are used: loaded at the tile's own start,
  // their latency (a cold line or a busy L2: ~1 us) was not hidden by K's quantization, and the
  // masked calls ran 24-29% slower than unmasked ones (DECODE_NOTES.md). When every row of the
  // program reads one mask row (a padding mask [B, 1, 1, Nk], or one head and query), thread k < 64
  // loads key k's entry and puts it in shared memory at the next tile's start (one load per thread
  // instead of eight, and none of their address arithmetic: the loop is issue-bound once the mask's
  // work is added); otherwise each thread loads its own scores' entries into mask_vals
  static_assert(!HAS_MASK || (kStages >= 2 && kThreads >= kTile), "the mask is loaded one stage ahead, a key per thread");
  float mask_next = 0.f;  // rows alike: key tid's entry in the next tile (tid < kTile)
  float mask_vals[HAS_MASK ? NKT : 1][4];
  auto mask_entry = [&](int64_t at) {
    return a.mask_kind == 1 ? (__ldg(static_cast<const uint8_t*>(a.mask) + at) ? 0.f : -kInf)
                            : __ldg(static_cast<const float*>(a.mask) + at);
  };
  auto load_mask = [&](int tile_index) {
    if constexpr (HAS_MASK) {
      if (mask_rows_alike) {  // block-uniform
        const int key = tile_index * kTile + tid;
        mask_next = tid < kTile && tile_index >= 0 && key < nk ? mask_entry(mask_row_alike() + int64_t(key) * a.mask_stride_k) : 0.f;
        return;
      }
#pragma unroll
      for (int kk = 0; kk < NKT; ++kk)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int h = e >> 1, key = tile_index * kTile + KPW * warp + 8 * kk + 2 * t4 + (e & 1);
          mask_vals[kk][e] = tile_index >= 0 && ok_row[h] && key < nk ? mask_entry(mask_row[h] + int64_t(key) * a.mask_stride_k) : 0.f;
        }
    }
  };

  // One tile. MASKED: it holds keys past the end or, causal, keys some row may not see. CAREFUL:
  // NaN/Inf in K or V are zeroed and their keys mark the rows that see them; fp16 V is scaled by
  // the power of two that keeps the fp16 tile sum finite (the fast sweep has neither: a program that
  // needed them is flagged and sweeps its tiles again carefully)
  auto tile = [&](auto masked_tag, auto careful_tag, int stage, int start) {
    constexpr bool MASKED = decltype(masked_tag)::value;
    constexpr bool CAREFUL = decltype(careful_tag)::value;
    const int count = MASKED ? min(nk - start, kTile) : kTile;
    char* tk = s_k + stage * L::kTileBytes;
    char* tv = s_v + stage * L::kTileBytes;
    float inv_guard = 1.f;  // careful, fp16 P V: 1 / the power of two V was scaled by
    // (the last tile's reads of s_mask are before its barrier in (4); this tile's after (1)'s)
    if (HAS_MASK && mask_rows_alike && tid < kTile) s_mask[tid] = mask_next;
    if constexpr (CAREFUL) {
      if (tid < kTile) s_key_bad[tid] = 0;
      __syncthreads();
      float vmax = 0.f;
      constexpr int kChunks = DP / 8;
      for (int c = tid; c < kTile * kChunks; c += kThreads) {  // 16-byte pieces of K and V
        const int r = c / kChunks, col = (c % kChunks) * 16;
#pragma unroll
        for (int t = 0; t < 2; ++t) {
          uint4* piece = reinterpret_cast<uint4*>((t == 0 ? tk : tv) + tile_offset(r, col));
          uint4 x = *piece;
          uint32_t* w = reinterpret_cast<uint32_t*>(&x);
          bool bad = false;
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            float2 f = pair_to_float2<In>(w[j]);
            if (!isfinite(f.x)) f.x = 0.f, bad = true;
            if (!isfinite(f.y)) f.y = 0.f, bad = true;
            if (t == 1) vmax = fmaxf(vmax, fmaxf(fabsf(f.x), fabsf(f.y)));
            if constexpr (BF16) {
              __nv_bfloat162 h = __floats2bfloat162_rn(f.x, f.y);  // exact: f came from bf16 or is 0
              w[j] = *reinterpret_cast<uint32_t*>(&h);
            } else {
              w[j] = f16x2_rn(f.x, f.y);
            }
          }
          if (bad) *piece = x, s_key_bad[r] = 1;
        }
      }
      fence_proxy_async_shared();  // these stores into the stage come before the copy engine refills it
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) vmax = fmaxf(vmax, __shfl_xor_sync(0xffffffffu, vmax, off));
      if (lane == 0) s_amax[warp] = vmax;
      __syncthreads();
      if constexpr (!FP8) {  // common.decode.fp16_guard: g <= 1 with T_EFF * max|V| * g <= 2^15
        float m = s_amax[0];
#pragma unroll
        for (int w = 1; w < kWarps; ++w) m = fmaxf(m, s_amax[w]);
        const float x = m * ((PV == kPvFp16Acc16 ? kTile : 1) / 32768.f);
        inv_guard = exp2_int(ceil_log2_above_one(x));
      }
      __syncthreads();  // s_amax is reused below
    }

    // (1) K's token mean over the tile, per channel (0 without smoothing): the channel sums as a
    // product of ones and the tile on the tensor cores (warp w: channels [w CW, (w+1) CW)). Any
    // centre is exact here, since q . mean_k is added back; the emulation's differs in rounding only.
    {
      float sum[NT][4];
#pragma unroll
      for (int n = 0; n < NT; ++n) sum[n][0] = sum[n][1] = sum[n][2] = sum[n][3] = 0.f;
      constexpr uint32_t kOnes = BF16 ? 0x3F803F80u : 0x3C003C00u;
      const uint32_t ones[4] = {kOnes, kOnes, kOnes, kOnes};
      for_each_b_fragment<CW>(tk, warp * CW, lane, [&](int, int n, uint32_t b0, uint32_t b1) {
        if constexpr (BF16) {
          mma_bf16_16816_f32(sum[n], ones, b0, b1);
        } else {
          mma_f16_16816_f32(sum[n], ones, b0, b1);
        }
      });
      if (g == 0) {  // row 0 of the product: channels w CW + 8 n + 2 t4 + {0, 1}
        const float inv_count = MASKED ? __frcp_rn(float(count)) : 1.f / kTile;
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          const float2 mean = a.smooth_k ? make_float2(__fmul_rn(sum[n][0], inv_count), __fmul_rn(sum[n][1], inv_count))
                                         : make_float2(0.f, 0.f);
          *reinterpret_cast<float2*>(s_mean_k + warp * CW + 8 * n + 2 * t4) = mean;
          k_check += sum[n][0] + sum[n][1];
        }
      }
    }
    __syncthreads();
    // (2) q . mean_k per row (Q smoothing: qc . mean_k), and K - mean_k for this warp's keys with its max
    {
      const int part = tid % TPR;
      float qm = 0.f;
#pragma unroll
      for (int j = 0; j < QC; ++j) qm = __fadd_rn(qm, __fmul_rn(q[j], s_mean_k[part * QC + j]));
#pragma unroll
      for (int off = 1; off < TPR; off <<= 1) qm += __shfl_xor_sync(0xffffffffu, qm, off);
      if (part == 0) s_qm[tid / TPR] = qm;
    }
    float kc[NKT][KS][8];  // keys KPW w + 8 kk + g: channels 32ks + 4t4 + {0..3} and + 16
    float amax[NKT];
    const int k_base = tile_offset(KPW * warp + g, 8 * t4);
#pragma unroll
    for (int kk = 0; kk < NKT; ++kk) amax[kk] = 0.f;
    if (!codes_are_zero) {  // block-uniform
#pragma unroll
      for (int kk = 0; kk < NKT; ++kk) {
        const int key = KPW * warp + 8 * kk + g;
        const bool valid = !MASKED || start + key < nk;
        float m2[2] = {0.f, 0.f};  // two chains: half the latency
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int c = ks * 32 + 16 * half + 4 * t4;
            const float4 x = load4<In>(tk + tile_step(k_base, 8 * kk, 64 * ks + 32 * half));
            const float4 m = *reinterpret_cast<const float4*>(s_mean_k + c);
            float* out = &kc[kk][ks][4 * half];
            out[0] = x.x - m.x, out[1] = x.y - m.y, out[2] = x.z - m.z, out[3] = x.w - m.w;
            if (MASKED && !valid) out[0] = out[1] = out[2] = out[3] = 0.f;
#pragma unroll
            for (int e = 0; e < 4; ++e) m2[half] = fmaxf(m2[half], fabsf(out[e]));
          }
        }
        amax[kk] = fmaxf(m2[0], m2[1]);
      }
    }
    // V's B fragments for (5), read now so that the stage is free after the barrier in (4):
    // keys 16 kk + 2 t4 + {0, 1} (and + 8), channel warp CW + 8 n + g
    constexpr int KT = kTile / 16;
    uint32_t vb[KT][NT][2];
    for_each_b_fragment<CW>(tv, warp * CW, lane, [&](int kk, int n, uint32_t b0, uint32_t b1) {
      vb[kk][n][0] = b0, vb[kk][n][1] = b1;
    });
    // (2b) Q smoothing's mean_q . K per head and key on the tensor cores: this warp's 16 keys as the A
    // operand (the tile as the caller stores it, exact 16-bit), each head's mean q as a B column, in
    // 16-bit parts summed in the fp32 accumulator: ~fp32, as the emulation's mean_q . (K - mean_k)
    // with (2)'s qc . mean_k. Keys x heads is the scores' transpose: the C fragments go through this
    // warp's part of shared memory (one n-tile of 8 heads, two past 8)
    if constexpr (SMOOTH_Q) {
      const int mat = lane >> 3, r8 = lane & 7;
      float* delta = s_delta + warp * kRows * L::kPitchDelta;
#pragma unroll
      for (int nt = 0; nt < kRows / 8; ++nt) {
        if (nt * 8 >= a.group) break;  // warp-uniform
        float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int cp = 0; cp < DP / 32; ++cp) {  // 32 channels: two k-steps of 16
          uint32_t ka[2][4];  // A: keys KPW w + (0..15), channels 32 cp + 16 st + (0..15)
#pragma unroll
          for (int st = 0; st < 2; ++st)
            ldmatrix_x4(ka[st], tk + tile_offset(KPW * warp + ((r8 + (mat & 1) * 8) & (KPW - 1)),
                                                 (32 * cp + 16 * st + (mat >> 1) * 8) * 2));
#pragma unroll
          for (int pt = 0; pt < MQP; ++pt) {
            uint32_t mb[4];  // B: heads 8 nt + (0..7); b0, b1 of k-step 2 cp, then of 2 cp + 1
            ldmatrix_x4(mb, s_mean_q + (pt * kRows + 8 * nt + r8) * L::kPitchMq + (32 * cp + 8 * mat) * 2);
#pragma unroll
            for (int st = 0; st < 2; ++st) {
              if constexpr (BF16) {
                mma_bf16_16816_f32(c, ka[st], mb[2 * st], mb[2 * st + 1]);
              } else {
                mma_f16_16816_f32(c, ka[st], mb[2 * st], mb[2 * st + 1]);
              }
            }
          }
        }
        // C: keys g, g + 8 (rows) x heads 8 nt + 2 t4, + 1 (columns), times 2^e
        const int h0 = 8 * nt + 2 * t4;
        const float up = exp2_int(mq_exp);
        delta[h0 * L::kPitchDelta + g] = __fmul_rn(c[0], up), delta[(h0 + 1) * L::kPitchDelta + g] = __fmul_rn(c[1], up);
        if constexpr (KPW == 16) {  // (8 keys per warp: rows g + 8 repeat rows g)
          delta[h0 * L::kPitchDelta + g + 8] = __fmul_rn(c[2], up);
          delta[(h0 + 1) * L::kPitchDelta + g + 8] = __fmul_rn(c[3], up);
        }
      }
      __syncwarp();
    }
    float inv_k[NKT], scale_k[NKT];  // per key (K_PER_TOKEN) or the tile's
    if constexpr (K_PER_TOKEN) {
#pragma unroll
      for (int kk = 0; kk < NKT; ++kk) {
        amax[kk] = fmaxf(amax[kk], __shfl_xor_sync(0xffffffffu, amax[kk], 1));
        amax[kk] = fmaxf(amax[kk], __shfl_xor_sync(0xffffffffu, amax[kk], 2));
      }
    } else {
      float m = amax[0];
#pragma unroll
      for (int kk = 1; kk < NKT; ++kk) m = fmaxf(m, amax[kk]);
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
      if (lane == 0) s_amax[warp] = m;
    }
    if constexpr (!K_PER_TOKEN) {
      __syncthreads();  // s_amax (per-token scales need no barrier here: q . mean_k is read after (4)'s)
      refill(stage);  // every warp has read the stage: K in (1)-(2), V's fragments in (2)
      float m = s_amax[0];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) m = fmaxf(m, s_amax[w]);
#pragma unroll
      for (int kk = 0; kk < NKT; ++kk) amax[kk] = m;
    }
#pragma unroll
    for (int kk = 0; kk < NKT; ++kk) {
      scale_k[kk] = div_rn(amax[kk], qmax, inv_qmax);  // the branch-free div.rn / rcp.rn (exact_div.cuh)
      inv_k[kk] = rcp_rn(scale_k[kk] == 0.f ? 1.f : scale_k[kk]);
    }
    // (3) K's codes as B fragments, S = Q8 K8^T on the INT8 tensor cores
    int c_qk[NKT][4];
#pragma unroll
    for (int kk = 0; kk < NKT; ++kk) c_qk[kk][0] = c_qk[kk][1] = c_qk[kk][2] = c_qk[kk][3] = 0;
    if (!codes_are_zero) {  // block-uniform
#pragma unroll
      for (int ks = 0; ks < KS; ++ks)
#pragma unroll
        for (int kk = 0; kk < NKT; ++kk) {
          uint32_t kb[2];
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const float* x = &kc[kk][ks][4 * half];
            const float inv = inv_k[kk];
            kb[half] = pack_low_bytes(round_even_bits(__fmul_rn(x[0], inv)), round_even_bits(__fmul_rn(x[1], inv)),
                                      round_even_bits(__fmul_rn(x[2], inv)), round_even_bits(__fmul_rn(x[3], inv)));
          }
          mma_s8_16832(c_qk[kk], qa[ks], kb[0], kb[1]);
        }
    }
    // (4) log2-domain scores, the tile's row max (all warps), P. The scores leave out q . mean_k until
    // the row max is shared: it is the same for the whole row, and x -> x + qm rounds monotonically,
    // so max(x) + qm rounds to the max of the full scores exactly
    float s[NKT][4];
#pragma unroll
    for (int kk = 0; kk < NKT; ++kk) {
      float2 alike = make_float2(0.f, 0.f);  // rows alike: keys 2 t4 + {0, 1} of this n-tile
      if (HAS_MASK && mask_rows_alike) alike = *reinterpret_cast<const float2*>(s_mask + KPW * warp + 8 * kk + 2 * t4);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e >> 1, col = KPW * warp + 8 * kk + 2 * t4 + (e & 1);
        // a key's scale sits in the lanes with g = 2 t4 + (e & 1)
        float sk = scale_k[kk];
        if constexpr (K_PER_TOKEN) sk = __shfl_sync(0xffffffffu, scale_k[kk], (2 * t4 + (e & 1)) * 4);
        float x = __fmul_rn(__fmul_rn(float(c_qk[kk][e]), sq_row[h]), sk);
        if constexpr (SMOOTH_Q) x = __fadd_rn(x, s_delta[(warp * kRows + delta_head[h]) * L::kPitchDelta + 8 * kk + 2 * t4 + (e & 1)]);
        bool visible = ok_row[h];
        if constexpr (MASKED) {
          const int key = start + col;
          visible = visible && key < nk && (!a.causal || key <= i_row[h] + q_offset);
        }
        if constexpr (HAS_MASK) {  // a key the mask drops is not seen (no NaN of its reaches the row)
          const float mv = mask_rows_alike ? ((e & 1) ? alike.y : alike.x) : mask_vals[kk][e];
          visible = visible && mv != -kInf;  // (a NaN bias: a NaN row, as SDPA's)
          x = __fadd_rn(x, mv);
        }
        if constexpr (MASKED || HAS_MASK) x = visible ? x : -kInf;
        if constexpr (CAREFUL) bad_kv[h] |= visible && s_key_bad[col];
        s[kk][e] = x;
      }
    }
    // the next tile's mask entries (its stage's tile was set before this tile's first barrier): here
    // with per-tile K scales, after the barrier and refill below with per-token ones (sage2), where
    // issued here they delayed the copy; each placement measured the faster for its kernel (H100,
    // 2026-11-25, DECODE_NOTES.md)
    if constexpr (!K_PER_TOKEN) load_mask(s_tile_of[(stage + 1) % kStages]);
    float mx[2] = {-kInf, -kInf};
#pragma unroll
    for (int kk = 0; kk < NKT; ++kk)
      mx[0] = fmaxf(mx[0], fmaxf(s[kk][0], s[kk][1])), mx[1] = fmaxf(mx[1], fmaxf(s[kk][2], s[kk][3]));
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
      if (t4 == 0) s_row_max[warp * kRows + g + 8 * h] = mx[h];
    }
    __syncthreads();  // s_row_max, s_qm; and every warp is done reading this stage
    if constexpr (K_PER_TOKEN) refill(stage);  // (per-tile scales: at the barrier of K's max)
    if constexpr (K_PER_TOKEN) load_mask(s_tile_of[(stage + 1) % kStages]);
    // P after the tile's own row max m_t (common.decode: a tile's P does not depend on the tiles
    // before it), entering the running state scaled by beta = exp2(m_t - m')
    float alpha[2], beta[2], shift[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = g + 8 * h;
      const float qm = s_qm[row];
#pragma unroll
      for (int kk = 0; kk < NKT; ++kk) s[kk][2 * h] = __fadd_rn(s[kk][2 * h], qm), s[kk][2 * h + 1] = __fadd_rn(s[kk][2 * h + 1], qm);
      float tile_max = s_row_max[row];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) tile_max = fmaxf(tile_max, s_row_max[w * kRows + row]);
      tile_max = __fadd_rn(tile_max, qm);
      const float t_use = tile_max == -kInf ? 0.f : tile_max;  // a row that sees no key here: p = 0
      const float m_new = fmaxf(m_row[h], tile_max);
      const float m_use = m_new == -kInf ? 0.f : m_new;
      alpha[h] = fast_exp2(m_row[h] - m_use);
      beta[h] = tile_max == -kInf ? 0.f : fast_exp2(t_use - m_use);
      shift[h] = t_use - a.log2_pscale;  // FP8 P spreads over (0, 448]
      m_row[h] = m_new;
    }
    float row_sum[2] = {0.f, 0.f};
#pragma unroll
    for (int kk = 0; kk < NKT; ++kk) {
      float p[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) p[e] = fast_exp2(s[kk][e] - shift[e >> 1]), row_sum[e >> 1] += p[e];
      const int col = KPW * warp + 8 * kk + 2 * t4;
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
      l_row[h] = __fadd_rn(__fmul_rn(l_row[h], alpha[h]), __fmul_rn(row_sum[h], beta[h]));
    }
    __syncthreads();  // P in shared memory
    // (5) P V: this warp's channels [w CW, (w+1) CW) over the 64 keys. V's B fragments (read in (2))
    // are changed in registers: FP8 per channel over the tile (sage2), bf16 -> fp16 (sage1 on bf16
    // inputs), the careful sweep's guard on fp16 V. A fragment register holds two keys of one channel
    // (channel 8 n + g of the n-tile), so a channel's max over the tile is this thread's and its
    // quad's: no pass through shared memory, no barrier
    {
      const int mat = lane >> 3, r8 = lane & 7;
      constexpr bool acc16 = PV == kPvFp16Acc16;
      uint32_t pa[KT][4];  // P's A fragments, one per k-step
#pragma unroll
      for (int kk = 0; kk < KT; ++kk)
        ldmatrix_x4(pa[kk], s_p + (r8 + (mat & 1) * 8) * L::kPitchP + (16 * kk + (mat >> 1) * 8) * 2);
      [[maybe_unused]] float scale_v[NT][2];  // FP8: V's scales of this thread's accumulator channels warp CW + 8 n + 2 t4 + {0, 1}
      if constexpr (FP8) {
        // |V|'s max in 16-bit pairs (exact: a max rounds nothing). max skips a NaN, which then
        // reaches the FP8 codes (cvt keeps NaN) and pv: the split is flagged; an Inf makes the scale
        // inf and pv = 0 * inf = NaN alike
        using In2 = std::conditional_t<BF16, __nv_bfloat162, __half2>;
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          uint32_t mx = 0u;
#pragma unroll
          for (int kk = 0; kk < KT; ++kk)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              const uint32_t ax = vb[kk][n][r] & 0x7FFF7FFFu;  // |v|, both halves
              const In2 m2 = __hmax2(*reinterpret_cast<const In2*>(&mx), *reinterpret_cast<const In2*>(&ax));
              mx = *reinterpret_cast<const uint32_t*>(&m2);
            }
          const float2 m2 = pair_to_float2<In>(mx);
          float m = fmaxf(m2.x, m2.y);
          m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
          m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
          // m / 448, exactly as div.rn (m is a 16-bit value: m * 2^-6 is exact; exact_div.cuh)
          const float sv = div_rn(m * 0x1p-6f, 7.f, 1.f / 7.f), inv = rcp_rn(sv == 0.f ? 1.f : sv);
#pragma unroll
          for (int kk = 0; kk < KT; ++kk)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              const float2 x = pair_to_float2<In>(vb[kk][n][r]);
              vb[kk][n][r] = e4m3_round_trip_f16x2(__fmul_rn(x.x, inv), __fmul_rn(x.y, inv));
            }
          scale_v[n][0] = __shfl_sync(0xffffffffu, sv, 8 * t4), scale_v[n][1] = __shfl_sync(0xffffffffu, sv, 8 * t4 + 4);
        }
      } else if (BF16 || (CAREFUL && inv_guard != 1.f)) {
        const float guard = __frcp_rn(inv_guard);  // exact: a power of two
#pragma unroll
        for (int kk = 0; kk < KT; ++kk)
#pragma unroll
          for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              const float2 x = pair_to_float2<In>(vb[kk][n][r]);
              vb[kk][n][r] = f16x2_rn(x.x * guard, x.y * guard);
            }
      }
      float pv[NT][4];
      uint32_t pv16[NT][2];
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        pv[n][0] = pv[n][1] = pv[n][2] = pv[n][3] = 0.f;
        pv16[n][0] = pv16[n][1] = 0u;
      }
#pragma unroll
      for (int kk = 0; kk < KT; ++kk)
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          if constexpr (acc16) {
            mma_f16_16816_f16(pv16[n], pa[kk], vb[kk][n][0], vb[kk][n][1]);
          } else {
            mma_f16_16816_f32(pv[n], pa[kk], vb[kk][n][0], vb[kk][n][1]);
          }
        }
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        if constexpr (acc16) {
          const float2 lo = pair_to_float2<__half>(pv16[n][0]), hi = pair_to_float2<__half>(pv16[n][1]);
          pv[n][0] = lo.x, pv[n][1] = lo.y, pv[n][2] = hi.x, pv[n][3] = hi.y;
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float x = pv[n][e];
          if constexpr (FP8) x = __fmul_rn(x, scale_v[n][e & 1]);
          if constexpr (CAREFUL && !FP8) x *= inv_guard;  // exact
          acc[n][e] = __fadd_rn(__fmul_rn(acc[n][e], alpha[e >> 1]), __fmul_rn(x, beta[e >> 1]));
        }
      }
    }
  };

  auto sweep = [&](auto careful_tag, bool primed) {
    m_row[0] = m_row[1] = -kInf, l_row[0] = l_row[1] = 0.f, k_check = 0.f, bad_kv[0] = bad_kv[1] = 0;
#pragma unroll
    for (int n = 0; n < NT; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    // every stage has its next tile of the sequence coming, or -1 (the stages kPrimed.. are asked
    // for here: Q smoothing's prologue used the last one as scratch); each tile refills its own
    // stage once every warp has read it
    if (!primed) {  // the careful sweep: this program's tiles again, from its chain
      replay = true;
      issue_stages(0, kStages);
      __syncthreads();  // s_tile_of
    } else if constexpr (kPrimed < kStages) {
      issue_stages(kPrimed, kStages);  // read at the second tile, after the first one's barriers
    }
    // a stage's tile was set before a barrier every thread has passed; the sequence ends at the first
    // stage without one (every later stage has none either, so no copy is left in flight)
    load_mask(s_tile_of[0]);  // (set by a fill before a barrier: at the kernel's start, or just above)
    for (int it = 0;; ++it) {
      const int tile_index = s_tile_of[it % kStages];
      if (tile_index < 0) break;
      mbar_wait(&s_bar[it % kStages], (phase >> (it % kStages)) & 1);
      if (it < 62) DECODE_TRACE(2 + 2 * it)
      phase ^= 1u << (it % kStages);
      const int start = tile_index * kTile;
#ifdef SAGE_DECODE_LOAD_ONLY  // measurement: the copies alone, the floor of this data movement (output garbage)
      __syncthreads();
      refill(it % kStages);
      continue;
#endif
      if (start + kTile > nk || (a.causal && start + kTile - 1 > q_offset)) {  // (a mask: in both)
        tile(std::true_type{}, careful_tag, it % kStages, start);
      } else {
        tile(std::false_type{}, careful_tag, it % kStages, start);
      }
      if (it < 62) DECODE_TRACE(3 + 2 * it)
    }
    __syncthreads();  // every warp is done with the stages (a careful sweep refills them)
  };

  // l over the warps; this thread's share of the flag check
  float l_tot[2];
  auto row_sums = [&]() {
    if (t4 == 0) s_row_sum[warp * kRows + g] = l_row[0], s_row_sum[warp * kRows + g + 8] = l_row[1];
    __syncthreads();
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      l_tot[h] = s_row_sum[g + 8 * h];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) l_tot[h] += s_row_sum[w * kRows + g + 8 * h];
    }
    __syncthreads();
  };

  DECODE_TRACE(1)
  sweep(std::false_type{}, true);
  DECODE_TRACE(126)
  row_sums();
  float check = k_check + l_tot[0] + l_tot[1];
#pragma unroll
  for (int n = 0; n < NT; ++n) check += (acc[n][0] + acc[n][1]) + (acc[n][2] + acc[n][3]);
  if (tid < kRows) s_row_bad[tid] = s_bad_q[tid];
  if (__syncthreads_or(!isfinite(check))) {  // a NaN/Inf or an fp16 overflow: sweep again, carefully
    sweep(std::true_type{}, false);
    row_sums();
#pragma unroll
    for (int h = 0; h < 2; ++h)
      if (bad_kv[h]) atomicOr(&s_row_bad[g + 8 * h], 1);
    __syncthreads();
  }

  // ---- this program's normalized output and log2 LSE (NaN: a row that saw a NaN/Inf), real rows only ----
  const int64_t prog = int64_t(split) * bh + kv_bh;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (!ok_row[h]) continue;
    const int row = g + 8 * h;
    const float denom = l_tot[h] == 0.f ? 1.f : l_tot[h];
    float* out = a.part_out + (prog * kRows + row) * DP + warp * CW + 2 * t4;
#pragma unroll
    for (int n = 0; n < NT; ++n)
      *reinterpret_cast<float2*>(out + 8 * n) = make_float2(__fdiv_rn(acc[n][2 * h], denom), __fdiv_rn(acc[n][2 * h + 1], denom));
    if (warp == 0 && t4 == 0) {
      const float lse2 = m_row[h] + log2f(l_tot[h]) - a.log2_pscale;
      a.part_lse[prog * kRows + row] = s_row_bad[row] ? __int_as_float(0x7fc00000) : lse2;
    }
  }

  // ---- the last program of this KV head to finish merges them all by their LSE ----
  // Thread 0 counts the program with a release (the barrier before it orders every thread's partials
  // and claims first) and an acquire (the barrier after it orders the merge's reads after every
  // program's).
  // With helpers the count is of tiles (a KV head's programs are not known in advance).
  __syncthreads();
  if (tid == 0)
    s_flag[0] = helping ? atomic_add_acq_rel_gpu(a.counters + kv_bh, taken) + taken == n_total
                        : atomic_add_acq_rel_gpu(a.counters + kv_bh, 1) == a.splits - 1;
  __syncthreads();
  DECODE_TRACE(127)
  if (!s_flag[0]) {
    if (helper) count_finished(1);
    return;
  }
  if (tid == 0 && !helping) a.counters[kv_bh] = 0, *claims = 0;  // ready for the next call on this buffer (every claim is in)
  // the partials to merge: every helper that joined took a tile, so it has counted before this
  const int parts = helping ? 1 + (__ldcg(claims) >> kClaimBits) : a.splits;
  // one float4 of one real row per item: at Nq = 1 and 4 query heads per KV head, one item per thread
  constexpr int C4 = DP / 4;
  for (int item = tid; item < a.group * a.rows_per_head * C4; item += kThreads) {
    const int row = item / C4, c4 = item % C4;
    const int head = row / a.rows_per_head, i = row % a.rows_per_head;
    if (i >= nq) continue;
    // the splits' LSEs and outputs in chunks of 8, loaded together (one L2 round trip per chunk,
    // one in all up to 8 splits), merged by a running max: with one chunk each split's weight is
    // one exp2 of its LSE minus the max, as a merge by the largest LSE first
    float m = -kInf, den = 0.f;
    bool bad = false;
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int sp0 = 0; sp0 < parts; sp0 += 8) {
      float lse[8];
      float4 x[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int64_t base = (int64_t(sp0 + j) * bh + kv_bh) * kRows + row;
        const bool in = sp0 + j < parts;
        lse[j] = in ? __ldcg(a.part_lse + base) : -kInf;  // L2: other programs' partials
        x[j] = in ? __ldcg(reinterpret_cast<const float4*>(a.part_out + base * DP) + c4) : make_float4(0.f, 0.f, 0.f, 0.f);
      }
      float mc = m;
#pragma unroll
      for (int j = 0; j < 8; ++j) bad |= lse[j] != lse[j], mc = fmaxf(mc, lse[j]);  // fmaxf skips a NaN
      const float mu = mc == -kInf ? 0.f : mc;
      const float alpha = m == -kInf ? 1.f : fast_exp2(m - mu);  // nothing merged yet: den = 0, o = 0
      den *= alpha, o.x *= alpha, o.y *= alpha, o.z *= alpha, o.w *= alpha;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float w = lse[j] != lse[j] ? 0.f : fast_exp2(lse[j] - mu);
        den += w;
        o.x += w * x[j].x, o.y += w * x[j].y, o.z += w * x[j].z, o.w += w * x[j].w;
      }
      m = mc;
    }
    const float inv = den == 0.f ? 1.f : den;
    const float nan = __int_as_float(0x7fc00000);
    const float r[4] = {bad ? nan : o.x / inv, bad ? nan : o.y / inv, bad ? nan : o.z / inv, bad ? nan : o.w / inv};
    In* dst = static_cast<In*>(a.out) + b * a.out_stride_b + int64_t(hk * a.group + head) * a.out_stride_h +
              int64_t(i) * a.out_stride_n + 4 * c4;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if constexpr (BF16) {
        dst[j] = __float2bfloat16_rn(r[j]);
      } else {
        dst[j] = __float2half_rn(r[j]);
      }
    }
    if (a.lse != nullptr && c4 == 0)
      a.lse[(int64_t(b) * a.heads_kv * a.group + hk * a.group + head) * nq + i] =
          bad ? nan : (m + log2f(den)) * 0.6931471805599453f;
  }
  DECODE_TRACE(128)
  if (helping) count_finished(helper ? 2 : 1);  // this KV head merged (and a helper's exit)
}

template <int DP, bool BF16, int PV, bool HAS_MASK, bool K_PER_TOKEN, bool SMOOTH_Q = false>
void launch(const DecodeArgs& a, cudaStream_t stream) {
  constexpr int bytes = Layout<DP, SMOOTH_Q, HAS_MASK>::kBytes;
  auto kernel = decode_kernel<DP, BF16, PV, K_PER_TOKEN, SMOOTH_Q, HAS_MASK>;
  static uint64_t reserved = 0;  // one per instantiation: a bit per device
  reserve_shared_memory(kernel, bytes, reserved, "decode");
  // K and V as byte tensors [B][Hkv][Nk][2 D] (any strides, multiples of 16 bytes), read in boxes of
  // 64 keys x 128 bytes
  auto map_of = [&](const void* p, int64_t stride_b, int64_t stride_h, int64_t stride_n, const char* who) {
    // a dimension of size 1 may carry any stride (0 from an expand, say): then the packed one
    auto bytes_of = [](int size, int64_t stride, uint64_t packed) {
      return cuuint64_t(size == 1 && (stride <= 0 || stride % 8) ? packed : uint64_t(stride) * 2);
    };
    const uint64_t row = DP * 2, head = row * a.seqlen_k, batch = head * a.heads_kv;
    return byte_tensor_map<4>(p, {cuuint64_t(DP * 2), cuuint64_t(a.seqlen_k), cuuint64_t(a.heads_kv), cuuint64_t(a.batch)},
                              {bytes_of(a.seqlen_k, stride_n, row), bytes_of(a.heads_kv, stride_h, head),
                               bytes_of(a.batch, stride_b, batch)},
                              {128, kTile, 1, 1}, std::string("decode: ") + who, CU_TENSOR_MAP_L2_PROMOTION_L2_256B);
  };
  const CUtensorMap map_k = map_of(a.k, a.k_stride_b, a.k_stride_h, a.k_stride_n, "k");
  const CUtensorMap map_v = map_of(a.v, a.v_stride_b, a.v_stride_h, a.v_stride_n, "v");
  const int bh = a.batch * a.heads_kv;  // helpers come after every owner (the y index runs last)
  kernel<<<a.helpers > 0 ? dim3(1, bh + a.helpers) : dim3(a.splits, bh), kThreads, bytes, stream>>>(a, map_k, map_v);
  check_launch("decode");
}

// the template arguments from the run-time ones: head dim, input dtype, P V kind, K's scale grouping
// and Q smoothing (only with per-token K scales: sage2's grouping, checked in decode_forward)
template <int DP, bool BF16, int PV>
void dispatch_k(const DecodeArgs& a, cudaStream_t stream) {
  if (a.mask_kind != 0) {
    if (a.smooth_q) return launch<DP, BF16, PV, true, true, true>(a, stream);
    return a.k_per_token ? launch<DP, BF16, PV, true, true>(a, stream) : launch<DP, BF16, PV, true, false>(a, stream);
  }
  if (a.smooth_q) return launch<DP, BF16, PV, false, true, true>(a, stream);
  return a.k_per_token ? launch<DP, BF16, PV, false, true>(a, stream) : launch<DP, BF16, PV, false, false>(a, stream);
}

template <int DP, bool BF16>
void dispatch_pv(const DecodeArgs& a, cudaStream_t stream) {
  switch (a.pv) {
    case kPvFp16Acc16:
      return dispatch_k<DP, BF16, kPvFp16Acc16>(a, stream);
    case kPvFp16Acc32:
      return dispatch_k<DP, BF16, kPvFp16Acc32>(a, stream);
    default:
      return dispatch_k<DP, BF16, kPvFp8E4m3>(a, stream);
  }
}

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("decode: " + what);
}

}  // namespace

void decode_forward(const DecodeArgs& a, cudaStream_t stream) {
  require(a.head_dim == 64 || a.head_dim == 128, "head_dim must be 64 or 128, got " + std::to_string(a.head_dim));
  require(a.group >= 1 && a.rows_per_head >= 1 && a.group * a.rows_per_head <= kRows,
          "group * rows_per_head must be in [1, 16], got " + std::to_string(a.group) + " * " +
              std::to_string(a.rows_per_head));
  require(a.seqlen_q >= 1 && a.seqlen_q <= a.rows_per_head, "seqlen_q must be in [1, rows_per_head]");
  require(a.qmax == 127 || a.qmax == 7, "qmax must be 127 or 7, got " + std::to_string(a.qmax));
  require(!a.smooth_q || a.k_per_token, "smooth_q needs per-token K scales (k_per_token)");
  require(a.pv == kPvFp16Acc16 || a.pv == kPvFp16Acc32 || a.pv == kPvFp8E4m3, "pv must be 0, 1 or 2");
  require(a.tiles_per_split >= 1 && a.splits >= 1, "tiles_per_split and splits must be positive");
  // (only launches that claim: dynamic tiles with more than one program per KV head)
  require(!a.dynamic || a.splits == 1 || int64_t(a.seqlen_k) / kTile + a.splits + 1 < (1 << kClaimBits),
          "seqlen_k must be below 2^" + std::to_string(kClaimBits) + " tiles of " + std::to_string(kTile) +
              " keys (the claim counters)");
  require(a.helpers == 0 || (a.helpers > 0 && a.dynamic && a.splits >= 2 &&
                             int64_t(a.batch) * a.heads_kv + a.helpers <= 65535),
          "helpers must be 0, or positive with dynamic tiles, splits >= 2 (1 + helper slots per KV head) and "
          "batch * heads_kv + helpers <= 65535");
  require(a.part_out != nullptr && a.part_lse != nullptr && a.counters != nullptr && a.tile_link != nullptr,
          "part_out, part_lse, counters and tile_link must be given (scratch)");
  for (const auto& [name, p, sb, sh, sn] : {std::tuple{"k", a.k, a.k_stride_b, a.k_stride_h, a.k_stride_n},
                                             std::tuple{"v", a.v, a.v_stride_b, a.v_stride_h, a.v_stride_n}})
    require(reinterpret_cast<uintptr_t>(p) % 16 == 0 && (a.seqlen_k == 1 || (sn > 0 && sn % 8 == 0)) &&
                (a.heads_kv == 1 || (sh > 0 && sh % 8 == 0)) && (a.batch == 1 || (sb > 0 && sb % 8 == 0)),
            std::string(name) + ": the copy engine needs a 16-byte aligned data pointer and positive strides of "
            "multiples of 16 bytes (8 elements) for batch, heads and keys");
  require(a.mask_kind >= 0 && a.mask_kind <= 2 && (a.mask_kind == 0 || a.mask != nullptr),
          "mask_kind must be 0, 1 or 2 (with a mask), got " + std::to_string(a.mask_kind));
  if (a.seqlen_k == 0) return;  // no keys: the caller does not run decode then
  if (a.head_dim == 64) {
    a.bf16 ? dispatch_pv<64, true>(a, stream) : dispatch_pv<64, false>(a, stream);
  } else {
    a.bf16 ? dispatch_pv<128, true>(a, stream) : dispatch_pv<128, false>(a, stream);
  }
}

}  // namespace sage_cuda
