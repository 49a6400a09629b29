// pybind11 module `_sage_cuda`: the CUDA kernels' entry points, on raw device pointers and a CUDA
// stream handle. Tensors, checks and torch.library registration live on the Python side
// (sage2/cuda.py, sage3/cuda.py, common/cuda_decode.py), so this module does not depend on torch's C++ ABI.
#include <pybind11/pybind11.h>

#include <array>
#include <cstdint>

#include "decode/split_kv.h"
#include "sage2_sm90/attention.h"
#include "sage2_sm90/kv_pass.h"
#include "sage3_sm90/attention.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void sage2_sm90_forward(uintptr_t q, int64_t q_stride_b, int64_t q_stride_h, int64_t q_stride_n, int q_channels,
                        float q_mult, int q_max, int q_group_pairs, uintptr_t q_codes,
                        uintptr_t q_scale, uintptr_t q_bad, uintptr_t k_codes,
                        uintptr_t v_codes, uintptr_t k_scale, uintptr_t v_scale, uintptr_t out, int64_t out_stride_b,
                        int64_t out_stride_h, int64_t out_stride_n, uintptr_t lse, uintptr_t first_bad,
                        uintptr_t tile_counter, int batch, int heads_q, int heads_kv, int seqlen_q, int seqlen_k, int npad, int head_dim,
                        int padded_head_dim, bool causal, bool out_bf16, uintptr_t stream) {
  sage_cuda::Sage2ForwardArgs a{};
  a.q = ptr<const void>(q);
  a.q_stride_b = q_stride_b, a.q_stride_h = q_stride_h, a.q_stride_n = q_stride_n;
  a.q_channels = q_channels;
  a.q_mult = q_mult, a.q_max = q_max, a.q_group_pairs = q_group_pairs;
  a.q_codes = ptr<const void>(q_codes);
  a.q_scale = ptr<const float>(q_scale);
  a.q_bad = ptr<const uint8_t>(q_bad);
  a.k_codes = ptr<const void>(k_codes);
  a.v_codes = ptr<const void>(v_codes);
  a.k_scale = ptr<const float>(k_scale);
  a.v_scale = ptr<const float>(v_scale);
  a.out = ptr<void>(out);
  a.out_stride_b = out_stride_b, a.out_stride_h = out_stride_h, a.out_stride_n = out_stride_n;
  a.lse = ptr<float>(lse);
  a.first_bad = ptr<const int32_t>(first_bad);
  a.tile_counter = ptr<int>(tile_counter);
  a.batch = batch, a.heads_q = heads_q, a.heads_kv = heads_kv, a.seqlen_q = seqlen_q, a.seqlen_k = seqlen_k;
  a.npad = npad, a.head_dim = head_dim, a.padded_head_dim = padded_head_dim;
  a.causal = causal, a.out_bf16 = out_bf16;
  sage_cuda::sage2_sm90_forward(a, reinterpret_cast<cudaStream_t>(stream));
}

void sage3_sm90_forward(uintptr_t q, uintptr_t k, uintptr_t vt, uintptr_t delta_s, uintptr_t out, int64_t out_stride_b,
                        int64_t out_stride_h, int64_t out_stride_n, uintptr_t lse, float mult, float log2_p_range,
                        int batch, int heads_q, int heads_kv, int seqlen_q, int seqlen_k, int npad, int head_dim,
                        int padded_head_dim, bool causal, bool bf16, bool mxfp4, uintptr_t stream) {
  sage_cuda::Sage3ForwardArgs a{};
  a.q = ptr<const void>(q);
  a.k = ptr<const void>(k);
  a.vt = ptr<const void>(vt);
  a.delta_s = ptr<const float>(delta_s);
  a.out = ptr<void>(out);
  a.out_stride_b = out_stride_b, a.out_stride_h = out_stride_h, a.out_stride_n = out_stride_n;
  a.lse = ptr<float>(lse);
  a.mult = mult, a.log2_p_range = log2_p_range;
  a.batch = batch, a.heads_q = heads_q, a.heads_kv = heads_kv, a.seqlen_q = seqlen_q, a.seqlen_k = seqlen_k;
  a.npad = npad, a.head_dim = head_dim, a.padded_head_dim = padded_head_dim;
  a.causal = causal, a.bf16 = bf16, a.mxfp4 = mxfp4;
  sage_cuda::sage3_sm90_forward(a, reinterpret_cast<cudaStream_t>(stream));
}

void decode_forward(uintptr_t q, uintptr_t k, uintptr_t v, int64_t q_stride_b, int64_t q_stride_h, int64_t q_stride_n,
                    int64_t k_stride_b, int64_t k_stride_h, int64_t k_stride_n, int64_t v_stride_b, int64_t v_stride_h,
                    int64_t v_stride_n, uintptr_t out, int64_t out_stride_b, int64_t out_stride_h, int64_t out_stride_n,
                    uintptr_t lse, uintptr_t part_out, uintptr_t part_lse, uintptr_t counters, uintptr_t tile_link,
                    bool dynamic, int batch, int heads_kv, int seqlen_q, int seqlen_k, int head_dim, int group,
                    int rows_per_head, int tiles_per_split, int splits, int helpers, float qk_mult, float log2_pscale, int qmax,
                    bool k_per_token, bool smooth_k, bool smooth_q, bool causal, bool bf16, int pv, uintptr_t mask,
                    int mask_kind, int64_t mask_stride_b, int64_t mask_stride_h, int64_t mask_stride_q,
                    int64_t mask_stride_k, uintptr_t stream) {
  sage_cuda::DecodeArgs a{};
  a.q = ptr<const void>(q);
  a.k = ptr<const void>(k);
  a.v = ptr<const void>(v);
  a.q_stride_b = q_stride_b, a.q_stride_h = q_stride_h, a.q_stride_n = q_stride_n;
  a.k_stride_b = k_stride_b, a.k_stride_h = k_stride_h, a.k_stride_n = k_stride_n;
  a.v_stride_b = v_stride_b, a.v_stride_h = v_stride_h, a.v_stride_n = v_stride_n;
  a.out = ptr<void>(out);
  a.out_stride_b = out_stride_b, a.out_stride_h = out_stride_h, a.out_stride_n = out_stride_n;
  a.lse = ptr<float>(lse);
  a.part_out = ptr<float>(part_out);
  a.part_lse = ptr<float>(part_lse);
  a.counters = ptr<int32_t>(counters);
  a.tile_link = ptr<int32_t>(tile_link);
  a.dynamic = dynamic;
  a.batch = batch, a.heads_kv = heads_kv, a.seqlen_q = seqlen_q, a.seqlen_k = seqlen_k, a.head_dim = head_dim;
  a.group = group, a.rows_per_head = rows_per_head, a.tiles_per_split = tiles_per_split, a.splits = splits;
  a.helpers = helpers;
  a.qk_mult = qk_mult, a.log2_pscale = log2_pscale, a.qmax = qmax;
  a.k_per_token = k_per_token, a.smooth_k = smooth_k, a.smooth_q = smooth_q, a.causal = causal, a.bf16 = bf16;
  a.pv = pv;
  a.mask = ptr<const void>(mask), a.mask_kind = mask_kind;
  a.mask_stride_b = mask_stride_b, a.mask_stride_h = mask_stride_h, a.mask_stride_q = mask_stride_q;
  a.mask_stride_k = mask_stride_k;
  sage_cuda::decode_forward(a, reinterpret_cast<cudaStream_t>(stream));
}


// positional: k, v, their strides, the outputs, the scratch and counters, then the sizes and flags
void sage2_kv_pass(uintptr_t k, uintptr_t v, int64_t k_stride_b, int64_t k_stride_h, int64_t k_stride_n,
                   int64_t v_stride_b, int64_t v_stride_h, int64_t v_stride_n, uintptr_t k_codes, uintptr_t k_scale,
                   uintptr_t k_mean, uintptr_t v_codes, uintptr_t v_scale, uintptr_t k_partial, uintptr_t counters,
                   uintptr_t v_amax, uintptr_t first_bad, int batch, int heads, int seqlen, int npad, int head_dim,
                   int padded_head_dim, int chunks, int qmax, bool k_per_thread, bool zero_nonfinite, bool bf16,
                   uintptr_t stream) {
  sage_cuda::KvPassArgs a{};
  a.k = reinterpret_cast<const void*>(k), a.v = reinterpret_cast<const void*>(v);
  a.k_stride_b = k_stride_b, a.k_stride_h = k_stride_h, a.k_stride_n = k_stride_n;
  a.v_stride_b = v_stride_b, a.v_stride_h = v_stride_h, a.v_stride_n = v_stride_n;
  a.k_codes = reinterpret_cast<int8_t*>(k_codes), a.k_scale = reinterpret_cast<float*>(k_scale);
  a.k_mean = reinterpret_cast<float*>(k_mean), a.v_codes = reinterpret_cast<uint8_t*>(v_codes);
  a.v_scale = reinterpret_cast<float*>(v_scale), a.k_partial = reinterpret_cast<float*>(k_partial);
  a.counters = reinterpret_cast<int32_t*>(counters), a.v_amax = reinterpret_cast<int32_t*>(v_amax);
  a.first_bad = reinterpret_cast<int32_t*>(first_bad);
  a.batch = batch, a.heads = heads, a.seqlen = seqlen, a.npad = npad, a.head_dim = head_dim;
  a.padded_head_dim = padded_head_dim, a.chunks = chunks, a.qmax = qmax;
  a.k_per_thread = k_per_thread, a.zero_nonfinite = zero_nonfinite, a.bf16 = bf16;
  sage_cuda::sage2_kv_pass(a, reinterpret_cast<cudaStream_t>(stream));
}
}  // namespace

namespace sage_cuda {  // csrc/common/exact_div_check.cu (its header holds device code)
void exact_div_mismatches(uint32_t lo_bits, uint32_t hi_bits, uint64_t (&counts)[6], uint32_t (&first)[6],
                          cudaStream_t stream);
}

namespace {

// A GPU self-check (common/launch.h run_mismatch_check) as a Python function of (lo bits, hi bits,
// stream) returning {name: (mismatches, first offending bits)} for its N kinds of mismatch
template <int N, typename Check>
auto mismatch_check(Check check, std::array<const char*, N> names) {
  return [check, names](uint32_t lo, uint32_t hi, uintptr_t stream) {
    uint64_t counts[N];
    uint32_t first[N];
    check(lo, hi, counts, first, reinterpret_cast<cudaStream_t>(stream));
    py::dict out;
    for (int i = 0; i < N; ++i) out[names[i]] = py::make_tuple(counts[i], first[i]);
    return out;
  };
}

}  // namespace

PYBIND11_MODULE(_sage_cuda, m) {
  m.doc() = "SageAttention CUDA kernels (see csrc/README.md); called through sage2.cuda";
  m.def("sage2_sm90_forward", &sage2_sm90_forward, "SageAttention2 forward, Hopper wgmma kernel (pointers: 0 = none)",
        py::arg("q"), py::arg("q_stride_b"), py::arg("q_stride_h"), py::arg("q_stride_n"), py::arg("q_channels"),
        py::arg("q_mult"), py::arg("q_max"), py::arg("q_group_pairs"), py::arg("q_codes"),
        py::arg("q_scale"), py::arg("q_bad"), py::arg("k_codes"),
        py::arg("v_codes"), py::arg("k_scale"), py::arg("v_scale"), py::arg("out"), py::arg("out_stride_b"),
        py::arg("out_stride_h"), py::arg("out_stride_n"), py::arg("lse"), py::arg("first_bad"),
        py::arg("tile_counter"), py::arg("batch"), py::arg("heads_q"),
        py::arg("heads_kv"), py::arg("seqlen_q"), py::arg("seqlen_k"), py::arg("npad"), py::arg("head_dim"),
        py::arg("padded_head_dim"), py::arg("causal"), py::arg("out_bf16"), py::arg("stream"));
  m.def("sage3_p_scale_mismatches", mismatch_check<3>(sage_cuda::sage3_p_scale_mismatches, {"s", "s8", "inv"}),
        "sage3 kernel's branch-free NVFP4 P scales vs div.rn/rcp.rn over fp32 maxima [lo, hi] (bits): "
        "{name: (mismatches, first bits)}");
  m.def("exact_div_mismatches",
        mismatch_check<6>(sage_cuda::exact_div_mismatches, {"div6", "div7", "div127", "div448", "rcp", "rcp_normal"}),
        "csrc/common/exact_div.cuh's branch-free divisions vs div.rn/rcp.rn over fp32 inputs [lo, hi] (bits): "
        "{name: (mismatches, first bits)}");
  m.def("sage3_sm90_forward", &sage3_sm90_forward,
        "SageAttention3 forward (FP4 emulated exactly on 16-bit wgmma), Hopper kernel (positional; pointers: 0 = none)");
  m.def("sage2_kv_pass", &sage2_kv_pass,
        "SageAttention2's K and V quantization for the Hopper kernel, one launch reading each once (positional)");
  m.def("sage2_kv_pass_chunk_tokens", &sage_cuda::kv_pass_chunk_tokens, "tokens per chunk of the K/V pass");
  m.def("sage2_kv_pass_max_chunks", &sage_cuda::kv_pass_max_chunks,
        "the most chunks per head one K/V pass launch takes on the current device");
  // positional arguments only: pybind11's keyword matching costs more host time than the launch
  m.def("decode_forward", &decode_forward,
        "Decode attention (common/decode.py's split-KV algorithm) into out/lse, one launch (pointers: 0 = none)");
}
