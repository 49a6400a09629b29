"""Public API of SageAttention2."""

from __future__ import annotations

import math

import torch

from common import build, nonfinite
from common.api import natural_lse, runs_on_input_device, start_call, validate_call
from common.checks import device_capability
from common.compile_ops import AttentionOp
from common.decode import DecodeSpec, decode_attention, resolve_decode_backend, use_decode
from common.int_qk import padded_head_dim, quantize_qk
from common.masking import MASK_NONE, dense_mask, resolve_mask, within_lengths
from common.nonfinite import kernel_buffers, set_nan_rows, zeroed
from common.smoothing import q_smoothing_delta_s
from common.varlen import varlen_api

from . import cuda as cuda_kernel
from .quant_v import P_SCALE, quantize_v

QK_DTYPES = ("int8", "int4")
QK_GRANULARITY = ("per_thread", "per_warp", "per_block", "per_token", "per_tensor")
PV_DTYPES = ("fp8_e4m3", "fp8_e5m2", "fp16")
PV_ACCUM = ("two_level", "single")
BACKENDS = ("auto", "cuda", "triton", "torch")
# Hopper (sm90) tiles of the official kernel, which the per-thread/per-warp/per-block groupings follow:
Q_BLOCK, WARP_Q, K_BLOCK = 64, 16, 128


@runs_on_input_device
def sageattn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, tensor_layout: str = "HND",
             is_causal: bool = False, sm_scale: float | None = None, return_lse: bool = False,
             backend: str = "auto", qk_dtype: str = "int8", qk_granularity: str = "per_thread",
             smooth_q: bool | None = None, smooth_k: bool = True, smooth_v: bool = False,
             pv_dtype: str = "fp8_e4m3", pv_accum: str = "two_level", attn_mask: torch.Tensor | None = None):
    """SageAttention2: INT8/INT4 Q K^T with per-thread scales and smoothing, FP8 P V.

    Args beyond :func:`sage1.sageattn`'s (layouts, causal, sm_scale, return_lse, backend):
        qk_dtype: ``"int8"`` (SageAttn2-8b, the Hopper default) or ``"int4"`` (SageAttn2-4b:
            codes in [-7, 7]). The H100 has no fast INT4 tensor cores, so INT4 codes are
            multiplied on INT8 tensor cores: exactly an INT4 matmul's result, at INT8 speed.
        qk_granularity: ``per_thread`` (scales follow the MMA accumulator fragment: Q rows
            {g, g+8} of each 16-row warp slice of a 64-row block, K tokens {8m+2t, 8m+2t+1} of
            each 128-key block), ``per_warp`` (Q per 16 rows, K per 128), ``per_block`` (Q per
            64, K per 128), ``per_token``, ``per_tensor``.
        smooth_q: subtract each 64-query block's mean and add ``mean_q . K^T`` (fp32, from
            unquantized values) back to S. Default: on for int4, off for int8 (as in the paper).
        smooth_k: subtract K's token mean (exact for the output; the LSE is corrected).
        smooth_v: subtract V's channel mean and add it back to the output.
        pv_dtype: ``fp8_e4m3`` (P with the static scale 448, V per channel), ``fp8_e5m2``
            (scale 57344), ``fp16``.
        pv_accum: ``two_level`` (each 128-key tile's FP8 product in a fresh accumulator, added to
            an fp32 buffer) or ``single`` (one running FP8-MMA accumulator, ~13 mantissa bits on
            Hopper, to show what two-level accumulation fixes). fp16 P V always accumulates in fp32.

    backend: ``"cuda"`` is the Hopper (sm_90a) wgmma kernel of csrc/sage2_sm90 (see
        :mod:`sage2.cuda` for the options it covers), and for decode the split-KV kernel of
        csrc/decode (:mod:`common.cuda_decode`); ``"auto"`` picks them on an sm_90 GPU when the
        options allow and they build, else the Triton kernels (on CPU tensors, the emulation).

    Decode: with ``Nq <= 16`` (not ``per_tensor``, ``smooth_v`` or ``pv_accum="single"``; any
    ``attn_mask``) the call runs :mod:`common.decode`'s split-KV kernel: K and V quantized
    per 64-key tile in registers (K per token, V per channel within the tile), read once.
    """
    if torch.compiler.is_compiling():  # one opaque custom op for torch.compile (common.compile_ops)
        return _OP(q, k, v, tensor_layout=tensor_layout, is_causal=is_causal, sm_scale=sm_scale, return_lse=return_lse,
                   backend=backend, qk_dtype=qk_dtype, qk_granularity=qk_granularity, smooth_q=smooth_q, smooth_k=smooth_k, smooth_v=smooth_v, pv_dtype=pv_dtype, pv_accum=pv_accum, attn_mask=attn_mask)
    flags = dict(is_causal=is_causal, return_lse=return_lse, smooth_k=smooth_k, smooth_v=smooth_v)
    if smooth_q is not None:
        flags["smooth_q"] = smooth_q
    shape, scale, be = validate_call(
        q, k, v, tensor_layout, sm_scale, backend, flags=flags,
        choices=[("qk_dtype", qk_dtype, QK_DTYPES), ("qk_granularity", qk_granularity, QK_GRANULARITY),
                 ("pv_dtype", pv_dtype, PV_DTYPES), ("pv_accum", pv_accum, PV_ACCUM)],
        backends=BACKENDS, attn_mask=attn_mask)
    if be == "cuda":
        build.check_cuda_device(q.device)
    if be == "triton" and q.device.type == "cuda" and pv_dtype != "fp16" and device_capability(q.device) < (8, 9):
        raise ValueError("pv_dtype='fp8_*' with backend='triton' needs FP8 tensor cores (compute capability 8.9+); "
                         "use pv_dtype='fp16' or backend='torch'")
    if smooth_q is None:
        smooth_q = qk_dtype == "int4"

    with torch.no_grad():
        qh, kh, vh, out, out_hnd, trivial = start_call(q, k, v, tensor_layout, shape, return_lse)
        D = qh.shape[-1]
        decode = DecodeSpec(127 if qk_dtype == "int8" else 7, k_per_token=qk_granularity != "per_block",
                            smooth_k=smooth_k, smooth_q=smooth_q, pv="fp16_acc32" if pv_dtype == "fp16" else pv_dtype)
        has_decode_form = qk_granularity != "per_tensor" and not smooth_v and pv_accum == "two_level"
        runs_decode = use_decode(shape.seqlen_q, decode if has_decode_form else None)
        # (checked even where no kernel runs). Decode reads any mask in its kernel: finding key lengths
        # there would cost a host sync per call (a stall per layer of a generation loop)
        mask = resolve_mask(attn_mask, shape, q.device, detect_key_padding=not runs_decode)
        if trivial is not None:
            return trivial
        if runs_decode:
            # few queries: split-KV, K and V quantized per tile in registers (common.decode); "cuda"
            # and "auto" run its CUDA sweep (csrc/decode) where it covers the call
            be = resolve_decode_backend(backend, "triton" if be == "cuda" else be, qh, kh, vh, decode, mask, "sage2")
            lse = decode_attention(qh, kh, vh, out_hnd, decode, sm_scale=scale, is_causal=is_causal, mask=mask,
                                   return_lse=return_lse, backend=be)
            return (out, lse) if return_lse else out
        be = build.pick_cuda(backend, be, q.device, lambda: cuda_kernel.unsupported(
            qk_granularity=qk_granularity, smooth_q=smooth_q, smooth_v=smooth_v, pv_dtype=pv_dtype,
            pv_accum=pv_accum, mask=mask, head_dim=D), "sage2")
        use_cuda = be == "cuda"
        if use_cuda:  # the CUDA kernel takes the Triton passes' Q where it does not quantize Q, and their K and V where
            # the one-read K/V pass (below) cannot run
            be = "triton"
        # NaN/Inf: SDPA's rows, not a quantization block's, with no host wait (common.nonfinite)
        check = nonfinite.CHECK_NONFINITE
        rows_in_kernel = check and be == "triton" and mask.kind == MASK_NONE
        q_in_kernel = use_cuda and cuda_kernel.q_in_kernel(is_causal=is_causal, head_dim=D, seqlen_q=shape.seqlen_q,
                                                           granularity=qk_granularity)
        # K and V in one launch reading each once, where it covers them (sage2.cuda.quantize_kv)
        kv_pass = use_cuda and cuda_kernel.kv_pass_covers(kh, vh, smooth_k=smooth_k, granularity=qk_granularity)
        flags, amax_bits, tile_counter, kv_counters = None, None, None, None
        if be == "triton":
            amax = shape.batch * shape.heads_kv * D if pv_dtype != "fp16" else 0
            # (the CUDA kernel's causal tile counter and the K/V pass's counters ride in the same zeroed
            # buffer: no fill of their own)
            kv_entries = cuda_kernel.kv_counter_entries(shape.batch, shape.heads_kv) if kv_pass else 0
            flags, amax_bits = kernel_buffers(shape, q.device, rows_in_kernel=rows_in_kernel,
                                              amax_entries=amax + int(use_cuda) + kv_entries, q_rows=not q_in_kernel)
            if use_cuda:
                amax_bits, tile_counter, kv_counters = amax_bits[:amax], amax_bits[amax:amax + 1], amax_bits[amax + 1:]
        bits = 8 if qk_dtype == "int8" else 4
        k_quantized = qv = None
        if kv_pass:
            k_quantized, qv = cuda_kernel.quantize_kv(
                kh, vh, bits=bits, granularity=qk_granularity, zero_nonfinite=check,
                first_bad=flags.first_bad if flags is not None else None, counters=kv_counters, v_amax=amax_bits)
        kh_q, vh_q, k_mean = within_lengths(kh, vh, mask, smooth_k)  # (keys past a sequence's length count for nothing)
        qk = quantize_qk(qh, kh_q, sm_scale=scale, smooth_k=smooth_k, smooth_q=smooth_q, granularity=qk_granularity,
                         bits=bits, q_block=Q_BLOCK, k_block=K_BLOCK, warp_rows=WARP_Q,
                         backend=be, zero_nonfinite=check, flags=flags, quantize_q=not q_in_kernel,
                         k_quantized=k_quantized, k_mean_override=k_mean)
        # (zeroed K: a NaN/Inf of a key nobody sees must not reach delta_s, which masks add to)
        delta_s = q_smoothing_delta_s(qk.q_block_mean, zeroed(kh_q) if check else kh_q, qk.k_mean) if smooth_q else None
        if qv is None:
            qv = quantize_v(vh_q, pv_dtype, smooth_v=smooth_v, backend=be, dp=padded_head_dim(D), zero_nonfinite=check,
                            flags=flags, amax_bits=amax_bits if pv_dtype != "fp16" else None,
                            wgmma_key_order=use_cuda, npad_multiple=128 if use_cuda else 16)
        log2_pscale = math.log2(P_SCALE[pv_dtype])
        if use_cuda:
            lse2 = cuda_kernel.launch(qh, qk, qv, out_hnd, granularity=qk_granularity, bits=bits, is_causal=is_causal,
                                      return_lse=return_lse, flags=flags, tile_counter=tile_counter)
        elif be == "triton":
            from .kernel import PV_SINGLE, PV_TWO_LEVEL, launch

            lse2 = launch(qk, qv, out_hnd, delta_s=delta_s, is_causal=is_causal, pv_dtype=pv_dtype,
                          pv_mode=PV_TWO_LEVEL if pv_accum == "two_level" else PV_SINGLE,
                          log2_pscale=log2_pscale, return_lse=return_lse,
                          k_per_thread=qk_granularity == "per_thread", mask=mask, flags=flags)
        else:
            from .emulation import attention_emulated

            bias2 = dense_mask(mask, shape.batch, shape.seqlen_q, shape.seqlen_k, is_causal, q.device)
            o, lse2 = attention_emulated(qk, qv, delta_s=delta_s, is_causal=is_causal, pv_dtype=pv_dtype,
                                         pv_accum=pv_accum, return_lse=return_lse, bias2=bias2)
            out_hnd.copy_(o)
        if check and not rows_in_kernel:
            set_nan_rows(out_hnd, lse2, qh, kh, vh, is_causal=is_causal, mask=mask)
        return (out, natural_lse(lse2, qh, qk.k_mean, scale)) if return_lse else out


# sageattn's options and their schema types (its custom ops, common.compile_ops)
_OPTIONS = [('qk_dtype', 'str'), ('qk_granularity', 'str'), ('smooth_q', 'bool?'), ('smooth_k', 'bool'), ('smooth_v', 'bool'), ('pv_dtype', 'str'), ('pv_accum', 'str')]
sageattn_varlen = varlen_api(sageattn, "sageattn_repro::sage2_varlen", _OPTIONS)

# one opaque custom op for torch.compile (common.compile_ops)
_OP = AttentionOp("sageattn_repro::sage2_attn", sageattn, _OPTIONS, has_mask=True)
