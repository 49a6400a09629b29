// Host side of TMA: the driver's tensor-map encoder (looked up once) and byte tensor maps, shared by
// the kernels that load tiles with the copy engine (sage2_sm90/attention.cu, decode/split_kv.cu).
#pragma once
#include <cuda.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <stdexcept>
#include <string>

namespace sage_cuda {

inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  if (fn == nullptr) {
    cudaDriverEntryPointQueryResult found;
    void* ptr = nullptr;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      throw std::runtime_error("the driver has no cuTensorMapEncodeTiled (needs CUDA 12+)");
    fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }
  return fn;
}

// A RANK-D byte tensor (dims[0] contiguous; strides[i] in bytes between steps of dims[i + 1], each a
// multiple of 16) read in boxes of box[0] x box[1] x 1 ..., with a 128-byte swizzle when box[0] is
// 128 bytes (64-byte otherwise); rows past the end of a dimension arrive as zeros. `who` names the
// tensor in the error; `l2_promotion` is how much of L2 each request fetches.
template <int RANK>
CUtensorMap byte_tensor_map(const void* base, const cuuint64_t (&dims)[RANK], const cuuint64_t (&strides)[RANK - 1],
                            const cuuint32_t (&box)[RANK], const std::string& who,
                            CUtensorMapL2promotion l2_promotion = CU_TENSOR_MAP_L2_PROMOTION_L2_128B) {
  CUtensorMap map;
  cuuint32_t elem_strides[RANK];
  for (int i = 0; i < RANK; ++i) elem_strides[i] = 1;
  const CUtensorMapSwizzle swizzle = box[0] == 128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_64B;
  const CUresult rc = tensor_map_encoder()(&map, CU_TENSOR_MAP_DATA_TYPE_UINT8, RANK, const_cast<void*>(base), dims,
                                           strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
                                           l2_promotion, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (rc != CUDA_SUCCESS)
    throw std::runtime_error(who + ": cuTensorMapEncodeTiled failed (error " + std::to_string(int(rc)) +
                             "); the data must be 16-byte aligned with strides that are multiples of 16 bytes");
  return map;
}

}  // namespace sage_cuda
