"""Public API of SageAttention v1 (the pattern every generation follows)."""

from __future__ import annotations

import torch

from common import nonfinite
from common.api import natural_lse, runs_on_input_device, start_call, validate_call
from common.compile_ops import AttentionOp
from common.decode import DecodeSpec, decode_attention, resolve_decode_backend, use_decode
from common.int_qk import quantize_qk
from common.masking import MASK_NONE, dense_mask, resolve_mask, within_lengths
from common.nonfinite import kernel_buffers, set_nan_rows, zeroed
from common.range_guard import finite_absmax, fp16_pv_guard, to_fp16_for_pv
from common.varlen import varlen_api

PV_ACCUM = ("fp16", "fp32")
QK_GRANULARITY = ("per_block", "per_token", "per_tensor")
Q_BLOCK, K_BLOCK = 128, 64  # quantization blocks of the paper's SAGEAttn-B (= the kernel's tiles)


@runs_on_input_device
def sageattn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, tensor_layout: str = "HND",
             is_causal: bool = False, sm_scale: float | None = None, return_lse: bool = False,
             backend: str = "auto", smooth_k: bool = True, pv_accum: str = "fp16",
             qk_granularity: str = "per_block", attn_mask: torch.Tensor | None = None):
    """SageAttention v1: INT8 Q K^T with K smoothing, FP16 P V.

    Args:
        q: ``[B, Hq, Nq, D]`` (HND) or ``[B, Nq, Hq, D]`` (NHD), float16 or bfloat16.
        k, v: ``[B, Hkv, Nk, D]`` / ``[B, Nk, Hkv, D]``; ``Hq % Hkv == 0`` (GQA/MQA).
        tensor_layout: ``"HND"`` or ``"NHD"``.
        is_causal: causal mask, bottom-right aligned when Nq != Nk (query i sees keys
            ``j <= i + Nk - Nq``); rows that see no key return 0.
        sm_scale: softmax scale, default ``1/sqrt(D)``.
        return_lse: also return the natural-log log-sum-exp of ``sm_scale * Q K^T``, ``[B, Hq, Nq]``
            fp32 (the K-smoothing shift is added back, so it matches exact attention).
        backend: ``"triton"`` (GPU kernel; on CPU only under ``TRITON_INTERPRET=1``), ``"torch"``
            (the PyTorch emulation of the same algorithm), ``"auto"`` (Triton on CUDA tensors,
            the emulation on CPU tensors).
        smooth_k: subtract K's token mean before quantizing (exact for the output).
        pv_accum: ``"fp16"``: each KV tile's P V product accumulates in fp16 and is added to an
            fp32 buffer (the paper); ``"fp32"``: fp32 accumulation throughout.
        qk_granularity: ``"per_block"`` (Q per 128 tokens, K per 64: the paper's SAGEAttn-B),
            ``"per_token"`` or ``"per_tensor"`` (the paper's ablations).
        attn_mask: as SDPA's: boolean (True = keep) or additive float, broadcastable to
            ``[B, Hq, Nq, Nk]``; composes with ``is_causal``. A boolean key-padding mask (broadcast
            over heads and queries, right padding) runs as per-sequence key lengths. Rows with every
            key masked give 0 (and an LSE of -inf). See :mod:`common.masking`.

    P and V are fp16 for both input dtypes: bf16 V is converted to fp16 (as in the paper), and
    the output is returned in the input dtype and layout. Inputs are never modified.

    Decode: with ``Nq <= 16`` (and ``qk_granularity="per_block"``; any ``attn_mask``) the call
    runs :mod:`common.decode`: a split-KV kernel that reads K and V once and quantizes them per
    64-key tile in registers (K smoothed by each tile's own mean, added back exactly); on Hopper
    ``backend="auto"`` runs it in CUDA (:mod:`common.cuda_decode`), ``"triton"`` in Triton.
    """
    if torch.compiler.is_compiling():  # one opaque custom op for torch.compile (common.compile_ops)
        return _OP(q, k, v, tensor_layout=tensor_layout, is_causal=is_causal, sm_scale=sm_scale, return_lse=return_lse,
                   backend=backend, smooth_k=smooth_k, pv_accum=pv_accum, qk_granularity=qk_granularity, attn_mask=attn_mask)
    shape, scale, be = validate_call(
        q, k, v, tensor_layout, sm_scale, backend,
        flags=dict(is_causal=is_causal, return_lse=return_lse, smooth_k=smooth_k),
        choices=[("pv_accum", pv_accum, PV_ACCUM), ("qk_granularity", qk_granularity, QK_GRANULARITY)], attn_mask=attn_mask)

    with torch.no_grad():
        qh, kh, vh, out, out_hnd, trivial = start_call(q, k, v, tensor_layout, shape, return_lse)
        decode = DecodeSpec(127, k_per_token=False, smooth_k=smooth_k, smooth_q=False,
                            pv="fp16_acc16" if pv_accum == "fp16" else "fp16_acc32")
        runs_decode = use_decode(shape.seqlen_q, decode if qk_granularity == "per_block" else None)
        # (checked even where no kernel runs). Decode reads any mask in its kernel: finding key lengths
        # there would cost a host sync per call (a stall per layer of a generation loop)
        mask = resolve_mask(attn_mask, shape, q.device, detect_key_padding=not runs_decode)
        if trivial is not None:
            return trivial
        if runs_decode:
            # few queries: split-KV, K and V quantized per tile in registers (common.decode)
            be = resolve_decode_backend(backend, be, qh, kh, vh, decode, mask, "sage1")
            lse = decode_attention(qh, kh, vh, out_hnd, decode, sm_scale=scale, is_causal=is_causal, mask=mask,
                                   return_lse=return_lse, backend=be)
            return (out, lse) if return_lse else out
        # NaN/Inf: SDPA's rows, not a quantization block's, with no host wait (common.nonfinite)
        check = nonfinite.CHECK_NONFINITE
        rows_in_kernel = check and be == "triton" and mask.kind == MASK_NONE
        kh_q, vh_q, k_mean = within_lengths(kh, vh, mask, smooth_k)  # (keys past a sequence's length count for nothing)
        qk_args = dict(sm_scale=scale, smooth_k=smooth_k, granularity=qk_granularity, bits=8, q_block=Q_BLOCK,
                       k_block=K_BLOCK, backend=be, zero_nonfinite=check, k_mean_override=k_mean)
        if be == "triton":
            from .kernel import launch

            flags, amax_bits = kernel_buffers(shape, q.device, rows_in_kernel=rows_in_kernel, amax_entries=1)
            qk = quantize_qk(qh, kh_q, **qk_args, flags=flags)
            # fp16 V and fp16 accumulation: powers of two keep large |V| finite (common.range_guard);
            # the kernel derives them from max|V|, read here with V's NaN/Inf keys
            vmax = finite_absmax(vh_q, amax_bits, per_channel=False, flags=flags)
            v16 = to_fp16_for_pv(vh_q, vmax)
            if v16.stride(-1) != 1:
                v16 = v16.contiguous()
            lse2 = launch(qk, v16, out_hnd, is_causal=is_causal, pv_fp16_acc=pv_accum == "fp16",
                          return_lse=return_lse, mask=mask, vmax=vmax, v_rescaled=vh.dtype != torch.float16, zero_v=check,
                          flags=flags)
        else:
            from .emulation import attention_emulated

            qk = quantize_qk(qh, kh_q, **qk_args)
            v16, pv_scales = fp16_pv_guard(zeroed(vh_q) if check else vh_q, fp16_accumulation=pv_accum == "fp16")
            bias2 = dense_mask(mask, shape.batch, shape.seqlen_q, shape.seqlen_k, is_causal, q.device)
            o, lse2 = attention_emulated(qk, v16, is_causal=is_causal, pv_accum=pv_accum,
                                         kv_block=K_BLOCK, return_lse=return_lse, bias2=bias2, pv_scales=pv_scales)
            out_hnd.copy_(o)
        if check and not rows_in_kernel:
            set_nan_rows(out_hnd, lse2, qh, kh, vh, is_causal=is_causal, mask=mask)
        return (out, natural_lse(lse2, qh, qk.k_mean, scale)) if return_lse else out


# sageattn's options and their schema types (its custom ops, common.compile_ops)
_OPTIONS = [('smooth_k', 'bool'), ('pv_accum', 'str'), ('qk_granularity', 'str')]
sageattn_varlen = varlen_api(sageattn, "sageattn_repro::sage1_varlen", _OPTIONS)

# one opaque custom op for torch.compile (common.compile_ops)
_OP = AttentionOp("sageattn_repro::sage1_attn", sageattn, _OPTIONS, has_mask=True)
