"""Decode from a quantized KV cache (common.kv_cache): sage2's decode with K and V quantized once,
when each 64-key tile fills, instead of at every step.

    cache = sage2.QuantizedKVCache(batch, kv_heads, head_dim, max_seqlen, dtype=torch.float16)
    cache.append(k_prefill, v_prefill)            # [B, Hkv, N, D]
    for step in ...:
        cache.append(k_new, v_new)                # [B, Hkv, 1, D]
        out = sage2.sageattn_kvcache(q_new, cache)  # q_new [B, Hq, 1, D]

A step (append, then this call) captured with ``torch.cuda.graph`` replays at the right positions:
the append reads them on the device during capture, and the call plans for ``max_seqlen``.

The same algorithm as ``sage2.sageattn(q, k, v)`` on ``Nq <= 16`` queries (INT8 Q and K with K
smoothing per tile and per-token K scales, FP8 P and V per channel per tile): a tile's codes are the
ones the decode kernel would compute from it, so the outputs agree with the plain call's to fp32
rounding. The kernel reads 276 bytes per key and KV head at head dim 128 instead of 512.
"""

from __future__ import annotations

import torch

from common.api import new_output, runs_on_input_device
from common.checks import (capturing, check_flag, check_no_grad, device_capability, resolve_backend,
                           resolve_sm_scale)
from common.kv_cache import QuantizedKVCache, check_query, decode_from_cache

BACKENDS = ("auto", "triton", "torch")


@runs_on_input_device
def sageattn_kvcache(q: torch.Tensor, cache: QuantizedKVCache, *, tensor_layout: str = "HND", is_causal: bool = False,
                     sm_scale: float | None = None, return_lse: bool = False, backend: str = "auto"):
    """Attention of ``q`` (``Nq <= 16`` queries; ``[B, Hq, Nq, D]`` for ``"HND"``, ``[B, Nq, Hq, D]``
    for ``"NHD"``) over the keys appended to ``cache``.

    is_causal: bottom-right per sequence (query i of sequence b sees its keys up to
        ``cache.lengths[b] - Nq + i``), as SDPA's ``is_causal`` with Nq queries at the end of the
        sequence.
    sm_scale: default ``1 / sqrt(D)``. return_lse: also the natural log-sum-exp ``[B, Hq, Nq]``.
    backend: ``"triton"`` (GPU; the CPU interpreter under TRITON_INTERPRET=1), ``"torch"`` (the
        emulation), ``"auto"`` (Triton on a GPU, else the emulation).
    Returns the output in q's layout and dtype (and the LSE). A row that sees no key: zeros (LSE
    -inf); a row with a non-finite query value: NaN, keys or not.
    """
    if torch.compiler.is_compiling():  # one opaque op (common.kv_cache): the cache's length is read when it runs
        if not isinstance(cache, QuantizedKVCache):
            raise TypeError(f"cache must be a QuantizedKVCache, got {type(cache).__name__}")
        out, lse = torch.ops.sageattn_repro.kvcache_attention(q, *cache.state_tensors(), cache.handle, tensor_layout,
                                                              is_causal, sm_scale, return_lse, backend)
        return (out, lse) if return_lse else out
    qh = check_query(q, cache, tensor_layout)
    check_flag("is_causal", is_causal)
    check_flag("return_lse", return_lse)
    sm_scale = resolve_sm_scale(sm_scale, qh.shape[-1])
    be = resolve_backend(backend, q.device, BACKENDS)
    if be == "triton" and q.device.type == "cuda" and device_capability(q.device) < (8, 9):
        raise ValueError("the quantized KV cache's kernel multiplies FP8 P and V: it needs compute capability 8.9+ "
                         "(FP8 tensor cores); use backend='torch'")
    check_no_grad(q, q, q, "sage3.sageattn_train")  # (then nothing here records a graph: no no_grad needed)
    out, out_hnd = new_output(q, tensor_layout)
    # no keys: zeros, NaN rows for a non-finite query (while captured the lengths are the device's)
    if out.numel() == 0 or (not capturing(q.device) and cache.length == 0):
        bad = ~torch.isfinite(qh).all(-1)
        out_hnd.copy_(torch.where(bad[..., None], float("nan"), 0.0))
        lse = torch.where(bad, float("nan"), float("-inf")).float()
        return (out, lse) if return_lse else out
    lse = decode_from_cache(qh, cache, out_hnd, sm_scale=sm_scale, is_causal=is_causal,
                            return_lse=return_lse, backend=be)
    return (out, lse) if return_lse else out
