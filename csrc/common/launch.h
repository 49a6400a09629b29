// Host-side launch plumbing shared by the kernels: the dynamic shared-memory reservation (once per
// kernel instantiation and device), the launch-error check, both naming the kernel in the exception,
// and the runner of the GPU self-checks (counters of mismatches).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

namespace sage_cuda {

// Raise `kernel`'s dynamic shared-memory limit to `bytes` on the current device (the attribute is
// per device). `reserved` is a static of the caller's instantiation, one bit per device (kernels of
// one signature share a function-pointer type, so it cannot live here).
template <typename Kernel>
void reserve_shared_memory(Kernel kernel, int bytes, uint64_t& reserved, const char* who) {
  int device = 0;
  cudaGetDevice(&device);
  const uint64_t bit = device < 64 ? uint64_t(1) << device : 0;  // beyond 64 devices: every launch
  if (reserved & bit) return;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(who) + ": cannot reserve " + std::to_string(bytes) +
                             " bytes of shared memory: " + cudaGetErrorString(err));
  reserved |= bit;
}

// The arguments every attention forward entry point checks before launching (`who` names the kernel,
// `v_name` its V operand): GQA head counts, V's key dim padded to the KV tile, non-empty sequences.
inline void check_attention_shape(int heads_q, int heads_kv, int npad, int block_n, int seqlen_q, int seqlen_k,
                                  const std::string& who, const std::string& v_name) {
  if (heads_kv <= 0 || heads_q % heads_kv != 0)
    throw std::invalid_argument(who + ": heads_q must be a multiple of heads_kv");
  if (npad % block_n != 0)
    throw std::invalid_argument(who + ": the key dim of " + v_name + " must be padded to " + std::to_string(block_n));
  if (seqlen_q <= 0 || seqlen_k <= 0) throw std::invalid_argument(who + ": empty sequences run no kernel");
}

// Launch `kernel` so that it may start while the kernel before it on `stream` finishes
// (programmatic dependent launch, sm_90): its CTAs are placed as that kernel's CTAs leave, and it
// must call griddep_wait() before reading anything that kernel wrote. Under stream capture this
// becomes a programmatic edge of the graph.
template <typename... Params, typename... Args>
cudaError_t launch_after(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                         Args&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid, config.blockDim = block, config.dynamicSmemBytes = smem, config.stream = stream;
  config.attrs = attr, config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

inline void check_launch(const char* who) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(who) + ": launch failed: " + cudaGetErrorString(err));
}

// A GPU self-check that counts N kinds of mismatch: launch(counts, first) runs the checking kernel
// on `stream` with zeroed device counters (unsigned long long[N]) and the first offending input of
// each kind (unsigned int[N], starting at 0xffffffff, lowered by atomicMin); the results come back
// to the host arrays.
template <int N, typename Launch>
void run_mismatch_check(Launch&& launch, const char* who, uint64_t (&counts)[N], uint32_t (&first)[N],
                        cudaStream_t stream) {
  struct Result {
    unsigned long long counts[N];
    unsigned int first[N];
  };
  Result* dev = nullptr;
  if (cudaMallocAsync(&dev, sizeof(Result), stream) != cudaSuccess)
    throw std::runtime_error(std::string(who) + ": cudaMallocAsync failed");
  Result host{};
  for (auto& f : host.first) f = 0xffffffffu;
  cudaMemcpyAsync(dev, &host, sizeof(Result), cudaMemcpyHostToDevice, stream);
  launch(dev->counts, dev->first);
  check_launch(who);
  cudaMemcpyAsync(&host, dev, sizeof(Result), cudaMemcpyDeviceToHost, stream);
  cudaFreeAsync(dev, stream);
  if (cudaStreamSynchronize(stream) != cudaSuccess) throw std::runtime_error(std::string(who) + ": kernel failed");
  for (int i = 0; i < N; ++i) counts[i] = host.counts[i], first[i] = host.first[i];
}

}  // namespace sage_cuda
