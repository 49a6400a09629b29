"""Small calls that launch every Triton and CUDA kernel once (run under compute-sanitizer by sanitize.sh):
the Q/K/V quantization passes and V's scan, the attention kernels of sage1, sage2 (8b, 4b, fp16 PV,
masks, varlen), sage3 (Triton and csrc/sage3_sm90) and SageBwd (forward, backward, atomic dQ),
the decode kernels (split and combine, and over the quantized KV cache), and all of them again on inputs with NaN/Inf, so that the
passes' recording stores and atomics, the epilogue's NaN rows and decode's careful sweep run too.
``--decode-only``: the decode calls alone (after a change to csrc/decode); ``--sage3-only``: sage3's
inference kernels alone (after a change to csrc/sage3_sm90); ``--sage2-cuda-only``: csrc/sage2_sm90
alone, on small grids that loop over work tiles; ``--kv-cache-only``: the quantized KV cache's decode
kernel alone."""

import os
import sys
from unittest import mock

import torch

import sage1
import sage2
import sage3
from common.inputs import make_qkv


def main(decode_only: bool = False, sage3_only: bool = False, sage2_cuda_only: bool = False,
         kv_cache_only: bool = False):
    dev = "cuda"
    if kv_cache_only:
        n = kv_cache_cases(dev)
    elif sage2_cuda_only or sage3_only:
        cases = sage2_cuda_cases if sage2_cuda_only else sage3_cases
        n = sum(cases(*prefill_inputs(dev), causal) for causal in (False, True))
    else:
        n = 0 if decode_only else everything_but_decode(dev)
        n += decode_cases(dev)
    torch.cuda.synchronize()
    print(f"{n} cases ok")


def prefill_inputs(dev):
    """(q, k, v): GQA 4/2, 200 queries, 333 keys, D=64, HND; (q128, k128, v128): bf16, 130 tokens, D=128, NHD."""
    q, k, v = make_qkv(2, 4, 200, 64, heads_kv=2, seqlen_k=333, kind="k_bias", device=dev, seed=0)
    q128, k128, v128 = make_qkv(1, 2, 130, 128, kind="k_bias", dtype=torch.bfloat16, device=dev, layout="NHD", seed=1)
    return q, k, v, q128, k128, v128


def sage2_cuda_cases(q, k, v, q128, k128, v128, causal) -> int:
    """csrc/sage2_sm90 on its default grid, then on grids of 1, 2 and 3 CTAs (SAGE2_SM90_GRID): each
    CTA loops over several work tiles (causal: claimed on the tile counter), reusing both Q buffers;
    then Q quantized in the kernel (SAGE2_SM90_Q=kernel) and by the pass, each on 2 CTAs."""
    n = 0
    grids = [{}, {"SAGE2_SM90_GRID": "1"}, {"SAGE2_SM90_GRID": "2"}, {"SAGE2_SM90_GRID": "3"}]
    q_paths = [{"SAGE2_SM90_GRID": "2", "SAGE2_SM90_Q": mode} for mode in ("kernel", "pass")]
    for env in grids + q_paths:
        with mock.patch.dict(os.environ, env):
            sage2.sageattn(q, k, v, is_causal=causal, return_lse=True, backend="cuda")
            sage2.sageattn(q128, k128, v128, tensor_layout="NHD", is_causal=causal, backend="cuda")
        n += 2
    return n


def everything_but_decode(dev) -> int:
    q, k, v, q128, k128, v128 = prefill_inputs(dev)
    mask = torch.rand(2, 1, 200, 333, device=dev) > 0.3
    pad = (torch.arange(333, device=dev)[None, :] < torch.tensor([333, 100], device=dev)[:, None])[:, None, None]
    n = 0
    for causal in (False, True):
        for call in (
            lambda: sage1.sageattn(q, k, v, is_causal=causal, return_lse=True),
            lambda: sage1.sageattn(q128, k128, v128, tensor_layout="NHD", is_causal=causal, pv_accum="fp32",
                                   qk_granularity="per_token"),
            lambda: sage1.sageattn(q, k, v, is_causal=causal, attn_mask=mask),
            lambda: sage1.sageattn(q, k, v, is_causal=causal, attn_mask=pad),
            lambda: sage2.sageattn(q, k, v, is_causal=causal, return_lse=True, backend="triton"),
            lambda: sage2.sageattn(q, k, v, is_causal=causal, qk_dtype="int4", smooth_v=True),
            lambda: sage2.sageattn(q128, k128, v128, tensor_layout="NHD", is_causal=causal, pv_dtype="fp16"),
            lambda: sage2.sageattn(q, k, v, is_causal=causal, attn_mask=mask.float()),
        ):
            call()
            n += 1
        n += sage2_cuda_cases(q, k, v, q128, k128, v128, causal)  # csrc/sage2_sm90
        n += sage3_cases(q, k, v, q128, k128, v128, causal)
        # varlen
        cu_q = torch.tensor([0, 37, 200], dtype=torch.int32, device=dev)
        cu_k = torch.tensor([0, 150, 333], dtype=torch.int32, device=dev)
        qp = q[0].transpose(0, 1).reshape(-1, 4, 64)[:200]
        kp, vp = (t[0].transpose(0, 1).reshape(-1, 2, 64)[:333] for t in (k, v))
        sage1.sageattn_varlen(qp, kp, vp, cu_q, cu_k, 163, 183, is_causal=causal)
        sage2.sageattn_varlen(qp, kp, vp, cu_q, cu_k, 163, 183, is_causal=causal)
        n += 2
        # SageBwd forward + backward (deterministic dQ and atomic dQ)
        for det in (True, False):
            qt, kt, vt = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
            sage3.sageattn_train(qt, kt, vt, is_causal=causal, deterministic=det).sum().backward()
            n += 1
    # NaN/Inf inputs: the rule's slow paths
    qn, kn, vn = (t.clone() for t in (q, k, v))
    qn[1, 3, 7, 5] = float("nan")
    kn[0, 1, 170, 2] = float("inf")
    vn[1, 0, 75, 9] = float("-inf")
    for causal in (False, True):
        for call in (
            lambda: sage1.sageattn(qn, kn, vn, is_causal=causal, return_lse=True),
            lambda: sage1.sageattn(qn, kn, vn, is_causal=causal, attn_mask=pad),
            lambda: sage1.sageattn(qn, kn, vn, is_causal=causal, attn_mask=mask),
            lambda: sage2.sageattn(qn, kn, vn, is_causal=causal, return_lse=True, backend="triton"),
            lambda: sage2.sageattn(qn, kn, vn, is_causal=causal, return_lse=True, backend="cuda"),
            lambda: sage2.sageattn(qn, kn, vn, is_causal=causal, qk_dtype="int4", smooth_v=True),
            lambda: sage2.sageattn(qn, kn, vn, is_causal=causal, qk_granularity="per_tensor", pv_dtype="fp16"),
            lambda: sage3.sageattn(qn, kn, vn, is_causal=causal, backend="triton"),
            lambda: sage3.sageattn(qn, kn, vn, is_causal=causal, backend="cuda"),
        ):
            call()
            n += 1
    return n


def sage3_cases(q, k, v, q128, k128, v128, causal) -> int:
    """sage3's Triton kernel and its Hopper kernel (csrc/sage3_sm90), both scale formats, with and
    without Q smoothing (the kernel's delta_s stages)."""
    for backend in ("triton", "cuda"):
        sage3.sageattn(q, k, v, is_causal=causal, return_lse=True, backend=backend)
        sage3.sageattn(q128, k128, v128, tensor_layout="NHD", is_causal=causal, scale_format="mxfp4", backend=backend)
        sage3.sageattn(q, k, v, is_causal=causal, smooth_q=False, two_level_p=False, backend=backend)
    return 6


def decode_cases(dev) -> int:
    """Decode (Nq = 1, and speculative decoding's Nq = 4 causal), GQA 4/2, a partial last tile: the
    CUDA kernel ("auto" on Hopper, csrc/decode) and the Triton kernels, on clean inputs and on
    inputs with NaN/Inf (the careful re-sweep); 40k keys on one KV head (dynamic tiles); 288 KV
    heads (helpers)."""
    n = 0
    qd, kd, vd = make_qkv(2, 4, 1, 64, heads_kv=2, seqlen_k=700, kind="k_bias", device=dev, seed=2)
    q4 = make_qkv(2, 4, 4, 64, heads_kv=2, seqlen_k=700, device=dev, seed=3)[0]
    qb, kb, vb = make_qkv(1, 8, 1, 128, heads_kv=2, seqlen_k=1000, dtype=torch.bfloat16, layout="NHD", device=dev,
                          seed=4)
    for fn in (sage1.sageattn, sage2.sageattn):
        for backend in ("auto", "triton"):
            fn(qd, kd, vd, return_lse=True, backend=backend)
            fn(q4, kd, vd, is_causal=True, backend=backend)
            fn(qb, kb, vb, tensor_layout="NHD", backend=backend)
            n += 3
    for backend in ("auto", "triton"):  # sage2's INT4 default: Q smoothing
        sage2.sageattn(q4, kd, vd, qk_dtype="int4", backend=backend)
        n += 1
    kdn, vdn = kd.clone(), vd.clone()
    kdn[1, 0, 300, 1] = float("nan")
    vdn[0, 1, 650, 4] = float("inf")
    for causal in (False, True):
        for backend in ("auto", "triton"):
            sage1.sageattn(qd, kdn, vdn, is_causal=causal, backend=backend)
            sage2.sageattn(q4, kdn, vdn, is_causal=causal, backend=backend)
            sage2.sageattn(q4, kdn, vdn, is_causal=causal, qk_dtype="int4", backend=backend)
            n += 3
    # the CUDA kernel's dynamic tiles (more than two tiles per program: claims), and a program flagged
    # by a NaN replaying the chain of tiles it claimed
    qy, ky, vy = make_qkv(1, 4, 1, 64, heads_kv=1, seqlen_k=40000, kind="k_bias", device=dev, seed=5)
    sage1.sageattn(qy, ky, vy)
    ky[0, 0, 30001, 3] = float("nan")
    sage1.sageattn(qy, ky, vy)
    sage2.sageattn(qy, ky, vy)
    # helpers (common.decode.cuda_plan: one owner per KV head, 288 of them, and helper programs that
    # join them), clean and with a NaN that flags the program that took its tile
    qh, kh, vh = make_qkv(9, 32, 1, 64, heads_kv=32, seqlen_k=1000, kind="k_bias", device=dev, seed=6)
    sage1.sageattn(qh, kh, vh)
    sage2.sageattn(qh, kh, vh, qk_dtype="int4")
    kh[4, 7, 900, 3] = float("nan")
    sage2.sageattn(qh, kh, vh)
    # masks in the decode kernels: left padding (rows alike: through shared memory; sage1's list of
    # kept tiles, the mask's rows starting off 16-byte chunks, one sequence keeping nothing), a
    # per-head bias (per thread), with claims (8001 keys over 8 KV heads)
    qm, km, vm = make_qkv(3, 32, 1, 64, heads_kv=8, seqlen_k=8001, kind="k_bias", device=dev, seed=7)
    first = torch.tensor([0, 3000, 8001], device=dev)
    pad = (torch.arange(8001, device=dev)[None, :] >= first[:, None])[:, None, None, :]
    bias = torch.randn(3, 32, 1, 8001, device=dev).masked_fill(torch.rand(3, 32, 1, 8001, device=dev) < 0.3,
                                                              float("-inf"))
    for mask in (pad, bias):
        for backend in ("auto", "triton"):
            sage1.sageattn(qm, km, vm, attn_mask=mask, backend=backend)
            sage2.sageattn(qm, km, vm, attn_mask=mask, backend=backend)
    return n + 6 + 8 + kv_cache_cases(dev)


def kv_cache_cases(dev) -> int:
    """The quantized KV cache's decode kernel (common.kv_cache): one split and many (the merge by the
    last program's ticket), a partial last tile, causal Nq = 4, a NaN in a quantized tile and one in
    the partial tile, E5M2, and the same call twice (the counters back at zero)."""
    from common.kv_cache import QuantizedKVCache

    n = 0
    for n_k, heads_kv, pv_dtype in ((700, 2, "fp8_e4m3"), (5000, 1, "fp8_e5m2")):
        q, k, v = make_qkv(2, 4, 4, 64, heads_kv=heads_kv, seqlen_k=n_k, kind="k_bias", device=dev, seed=n_k)
        k[1, 0, 100, 1] = float("nan")
        v[0, heads_kv - 1, n_k - 3, 2] = float("inf")
        cache = QuantizedKVCache(2, heads_kv, 64, n_k, device=dev, pv_dtype=pv_dtype)
        cache.append(k[:, :, :n_k - 1], v[:, :, :n_k - 1])
        cache.append(k[:, :, n_k - 1:], v[:, :, n_k - 1:])
        for causal in (False, True):
            sage2.sageattn_kvcache(q, cache, is_causal=causal, return_lse=True)
            sage2.sageattn_kvcache(q[:, :, :1], cache, is_causal=causal)
            sage2.sageattn_kvcache(q[:, :, :1], cache, is_causal=causal)
            n += 3
    return n


if __name__ == "__main__":
    main(decode_only="--decode-only" in sys.argv[1:], sage3_only="--sage3-only" in sys.argv[1:],
         sage2_cuda_only="--sage2-cuda-only" in sys.argv[1:], kv_cache_only="--kv-cache-only" in sys.argv[1:])
