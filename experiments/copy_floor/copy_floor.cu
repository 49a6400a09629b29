// How fast can decode's data movement stream K and V, with no arithmetic? The decode kernel
// (csrc/decode/split_kv.cu) copies each 64-key tile with 16-byte cp.async by every thread; with its
// compute switched off (-DSAGE_DECODE_LOAD_ONLY) it reached 0.95-0.97x of cuDNN's whole decode call
// (common/DECODE_NOTES.md, c4). This program times that copy pattern against TMA tensor-map boxes
// (one request per 64-row x 128-byte box, 128-byte swizzle, completing on an mbarrier), at the
// decode benchmark's shape and split plan, so that a rewrite of the kernel's loads can be judged
// before it is written.
//
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -Icsrc \
//        experiments/copy_floor/copy_floor.cu -o /tmp/copy_floor && /tmp/copy_floor
//
// Prints GB/s per variant (bytes of K and V read once / time per launch, CUDA events, 20 launches
// after a warm-up). cuDNN's decode kernel streamed 2.9 TB/s at this shape on the H100 (2026-11-22).
// Measured there the same day (experiments/results/h100_2026-11-22/decode_c6/copy_floor.txt): at 16k
// keys cp.async 2950-2965 GB/s, TMA boxes 3017-3038 GB/s (2-4 stages); at 32k 2920-3012 against
// 3020-3100. The decode kernel moved to TMA boxes on the strength of it (DECODE_NOTES.md, c6).
#include <cuda_fp16.h>
#include <cudaTypedefs.h>

#include <cstdio>
#include <cstdlib>

#include "common/hopper.cuh"
#include "common/mma_sync.cuh"

using namespace sage_cuda;

namespace {

constexpr int kD = 128, kTile = 64, kThreads = 128;
constexpr int kPitchK = kD * 2 + 32, kPitchV = kD * 2 + 16;  // the decode kernel's padded rows
constexpr int kBox = kTile * 128;                             // one 64-row x 128-byte TMA box

#define CHECK(x)                                                                              \
  do {                                                                                        \
    cudaError_t e = (x);                                                                      \
    if (e != cudaSuccess) {                                                                   \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e)); \
      std::exit(1);                                                                           \
    }                                                                                         \
  } while (0)

// the decode kernel's copy loop: every thread one 16-byte column of every 8th row, fixed strides
template <int STAGES>
__global__ void __launch_bounds__(kThreads, 2) cp_async_stream(const char* k, const char* v, int n, int tiles_per_split,
                                                                float* sink) {
  extern __shared__ __align__(16) char smem[];
  const int tid = threadIdx.x, split = blockIdx.x, bh = blockIdx.y;
  const int t0 = split * tiles_per_split, tiles = min(tiles_per_split, n / kTile - t0);
  constexpr int kChunks = kD / 8, kRowStep = kThreads / kChunks, kCopies = kTile / kRowStep;
  const int row = tid / kChunks, col = (tid % kChunks) * 16;
  const int64_t row_bytes = kD * 2, head = int64_t(bh) * n * row_bytes;
  const uint32_t kd0 = smem_addr(smem) + row * kPitchK + col;
  const uint32_t vd0 = smem_addr(smem) + STAGES * kTile * kPitchK + row * kPitchV + col;
  auto load = [&](int stage, int t) {
    const char* ks = k + head + (int64_t(t0 + t) * kTile + row) * row_bytes + col;
    const char* vs = v + head + (int64_t(t0 + t) * kTile + row) * row_bytes + col;
#pragma unroll
    for (int i = 0; i < kCopies; ++i) {
      cp_async16(kd0 + (stage * kTile + i * kRowStep) * kPitchK, ks + i * kRowStep * row_bytes);
      cp_async16(vd0 + (stage * kTile + i * kRowStep) * kPitchV, vs + i * kRowStep * row_bytes);
    }
  };
  float acc = 0.f;
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < tiles) load(s, s);
    cp_async_commit();
  }
  for (int t = 0; t < tiles; ++t) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    if (t + STAGES - 1 < tiles) load((t + STAGES - 1) % STAGES, t + STAGES - 1);
    cp_async_commit();
    acc += __half2float(reinterpret_cast<const __half*>(smem + (t % STAGES) * kTile * kPitchK)[tid]);
  }
  cp_async_wait<0>();
  sink[blockIdx.y * gridDim.x + blockIdx.x] = acc;
}

// TMA: thread 0 asks for the tile's four boxes (K and V, channels 0-63 and 64-127); the stage's
// mbarrier completes when their 32 KB have landed
template <int STAGES>
__global__ void __launch_bounds__(kThreads, 1) tma_stream(const __grid_constant__ CUtensorMap map_k,
                                                           const __grid_constant__ CUtensorMap map_v, int n,
                                                           int tiles_per_split, float* sink) {
  extern __shared__ __align__(1024) char smem_raw[];
  char* smem = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint64_t* bar = reinterpret_cast<uint64_t*>(smem + STAGES * 4 * kBox);
  const int tid = threadIdx.x, split = blockIdx.x, bh = blockIdx.y;
  const int t0 = split * tiles_per_split, tiles = min(tiles_per_split, n / kTile - t0);
  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) mbar_init(&bar[s], 1);
    fence_barrier_init();
    prefetch_tensor_map(&map_k);
    prefetch_tensor_map(&map_v);
  }
  __syncthreads();
  auto load = [&](int stage, int t) {
    char* dst = smem + stage * 4 * kBox;
    const int y = (t0 + t) * kTile;
    mbar_arrive_expect_tx(&bar[stage], 4 * kBox);
    tma_load_3d(dst, &map_k, &bar[stage], 0, y, bh);
    tma_load_3d(dst + kBox, &map_k, &bar[stage], 128, y, bh);
    tma_load_3d(dst + 2 * kBox, &map_v, &bar[stage], 0, y, bh);
    tma_load_3d(dst + 3 * kBox, &map_v, &bar[stage], 128, y, bh);
  };
  float acc = 0.f;
  if (tid == 0)
    for (int s = 0; s < STAGES - 1 && s < tiles; ++s) load(s, s);
  for (int t = 0; t < tiles; ++t) {
    const int stage = t % STAGES;
    mbar_wait(&bar[stage], (t / STAGES) & 1);
    __syncthreads();  // every thread is done with the stage refilled next
    if (tid == 0 && t + STAGES - 1 < tiles) load((t + STAGES - 1) % STAGES, t + STAGES - 1);
    acc += __half2float(reinterpret_cast<const __half*>(smem + stage * 4 * kBox)[tid]);
  }
  sink[blockIdx.y * gridDim.x + blockIdx.x] = acc;
}

__global__ void fill(__half* x, int64_t count) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x)
    x[i] = __float2half(float((i * 2654435761u) % 2001) * 1e-3f - 1.f);
}

CUtensorMap box_map(const void* base, int n, int heads) {  // bytes [heads][n][256], boxes 128 B x 64 rows
  static PFN_cuTensorMapEncodeTiled_v12000 encode = nullptr;
  if (encode == nullptr) {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found;
    CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found));
    encode = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }
  CUtensorMap map;
  const cuuint64_t dims[3] = {kD * 2, cuuint64_t(n), cuuint64_t(heads)};
  const cuuint64_t strides[2] = {kD * 2, cuuint64_t(n) * kD * 2};
  const cuuint32_t box[3] = {128, kTile, 1}, unit[3] = {1, 1, 1};
  if (encode(&map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 3, const_cast<void*>(base), dims, strides, box, unit,
             CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
             CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS) {
    std::fprintf(stderr, "cuTensorMapEncodeTiled failed\n");
    std::exit(1);
  }
  return map;
}

template <typename Launch>
float time_us(Launch launch) {
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) launch();
  CHECK(cudaEventRecord(a));
  for (int i = 0; i < 20; ++i) launch();
  CHECK(cudaEventRecord(b));
  CHECK(cudaEventSynchronize(b));
  CHECK(cudaGetLastError());
  float ms = 0.f;
  CHECK(cudaEventElapsedTime(&ms, a, b));
  return ms * 1e3f / 20;
}

template <int STAGES>
void run_cp_async(const char* k, const char* v, int n, int heads, int splits, float* sink, double bytes) {
  const int tps = n / kTile / splits, smem = STAGES * kTile * (kPitchK + kPitchV);
  CHECK(cudaFuncSetAttribute(cp_async_stream<STAGES>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const float us = time_us([&] { cp_async_stream<STAGES><<<dim3(splits, heads), kThreads, smem>>>(k, v, n, tps, sink); });
  std::printf("| cp.async 16 B, %d stages, %d splits | %8.1f us | %6.0f GB/s |\n", STAGES, splits, us, bytes / us * 1e-3);
}

template <int STAGES>
void run_tma(const CUtensorMap& mk, const CUtensorMap& mv, int n, int heads, int splits, float* sink, double bytes) {
  const int tps = n / kTile / splits, smem = STAGES * 4 * kBox + 1024 + 64;
  CHECK(cudaFuncSetAttribute(tma_stream<STAGES>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const float us = time_us([&] { tma_stream<STAGES><<<dim3(splits, heads), kThreads, smem>>>(mk, mv, n, tps, sink); });
  std::printf("| TMA boxes, %d stages, %d splits | %8.1f us | %6.0f GB/s |\n", STAGES, splits, us, bytes / us * 1e-3);
}

}  // namespace

int main() {
  for (const int n : {16384, 32768}) {
    const int heads = 4 * 8;  // B=4 x Hkv=8, as the decode benchmark
    const int64_t count = int64_t(heads) * n * kD;
    __half *k, *v;
    float* sink;
    CHECK(cudaMalloc(&k, count * 2));
    CHECK(cudaMalloc(&v, count * 2));
    CHECK(cudaMalloc(&sink, 1 << 20));
    fill<<<1024, 256>>>(k, count);
    fill<<<1024, 256>>>(v, count);
    CHECK(cudaDeviceSynchronize());
    const double bytes = 2.0 * count * 2;
    const CUtensorMap mk = box_map(k, n, heads), mv = box_map(v, n, heads);
    const int splits = 8 * n / 16384;  // the decode plan: ~2 programs per SM
    std::printf("\nNk=%d, B*Hkv=%d, D=%d: %.0f MB of K and V\n| variant | time | K+V read |\n|---|---|---|\n", n, heads,
                kD, bytes / 1e6);
    const char *kc = reinterpret_cast<const char*>(k), *vc = reinterpret_cast<const char*>(v);
    run_cp_async<2>(kc, vc, n, heads, splits, sink, bytes);
    run_cp_async<3>(kc, vc, n, heads, splits, sink, bytes);
    run_tma<2>(mk, mv, n, heads, splits, sink, bytes);
    run_tma<3>(mk, mv, n, heads, splits, sink, bytes);
    run_tma<4>(mk, mv, n, heads, splits, sink, bytes);
    run_tma<3>(mk, mv, n, heads, 2 * splits, sink, bytes);
    CHECK(cudaFree(k));
    CHECK(cudaFree(v));
    CHECK(cudaFree(sink));
  }
  return 0;
}
