// Host-side launch plumbing shared by the kernels: the dynamic shared-memory reservation (once per
// kernel instantiation) and the launch-error check, both naming the kernel in the exception.
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace sage_cuda {

// Raise `kernel`'s dynamic shared-memory limit to `bytes`. `reserved` is a static of the caller's
// instantiation (kernels of one signature share a function-pointer type, so it cannot live here).
template <typename Kernel>
void reserve_shared_memory(Kernel kernel, int bytes, bool& reserved, const char* who) {
  if (reserved) return;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(who) + ": cannot reserve " + std::to_string(bytes) +
                             " bytes of shared memory: " + cudaGetErrorString(err));
  reserved = true;
}

inline void check_launch(const char* who) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(who) + ": launch failed: " + cudaGetErrorString(err));
}

}  // namespace sage_cuda
