"""SageAttention v1 forward kernel in Triton: INT8 Q K^T, exp2 online softmax, FP16 P V.

One program computes BLOCK_M query rows of one (batch, query head) and walks the KV sequence in
BLOCK_N-key tiles:

    s   = int32(Q_hat K_hat_j^T) * dq * dk        # already log2-scaled: sm_scale*log2(e) is in dq
    m'  = max(m, rowmax s);  p = exp2(s - m');  a = exp2(m - m')
    l   = a*l + rowsum(p)                         # fp32, from the unrounded p
    acc = a*acc + fp16(p) @ V_j                   # pv_accum="fp16": the tile product accumulates in
                                                  # fp16, then is added to the fp32 acc
                                                  # pv_accum="fp32": fp32 accumulation throughout
    out = acc / l

Masking: keys past Nk and, when causal, keys j > i + Nk - Nq (bottom-right) get -inf. Tiles that
need no mask run a loop without any; only the tiles on the diagonal or the tail pay for it.
Rows that see no key (causal with Nq > Nk) give 0 and an LSE of -inf.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from common.checks import device_capability
from common.masking import MASK_NONE, NO_MASK, kernel_args
from common.range_guard import guard_scales_tl
from common.triton_attention import (
    apply_tile_mask,
    kv_range,
    masked_row_max,
    program_tile,
    write_output,
)
from common.triton_quant import zero_nonfinite


@triton.jit
def _tile(acc, l_i, m_i, q, qs, K_ptrs, ks_ptr, V_ptrs, K_desc, V_desc, kv_bh, b, hk,
          start_n, rows, Nq, Nk, nk, q_offset, k_tps, d_mask, MASKP, h, smb, smh, smm, smn, p_scale,
          BLOCK_N: tl.constexpr, DP: tl.constexpr, Q_SCALAR: tl.constexpr, K_SCALAR: tl.constexpr, MASK: tl.constexpr,
          IS_CAUSAL: tl.constexpr, PV_FP16_ACC: tl.constexpr, LOAD_DMASK: tl.constexpr,
          USE_DESC: tl.constexpr, MASK_KIND: tl.constexpr, ZERO_V: tl.constexpr):
    cols = start_n + tl.arange(0, BLOCK_N)
    if USE_DESC:  # TMA: out-of-range rows/channels arrive as zeros
        k = K_desc.load([kv_bh, start_n, 0]).reshape(BLOCK_N, DP)
    elif MASK:
        k = tl.load(K_ptrs, mask=cols[:, None] < Nk, other=0)
    else:
        k = tl.load(K_ptrs)
    s = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
    if K_SCALAR:
        ks = tl.load(ks_ptr + start_n // k_tps)
    else:
        ks = tl.load(ks_ptr + cols // k_tps, mask=cols < Nk, other=0.0)
    if Q_SCALAR and K_SCALAR and not MASK:
        # One scale for the whole tile (per-block, the default): since dq*dk >= 0 the row max can
        # be taken on the raw scores, and scaling and the max-shift fuse into one FMA per score.
        sc = qs * ks
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * sc)
        m_use = m_new
        p = tl.math.exp2(s * sc - m_use[:, None])
    else:
        # s * (dq * dk): the same fp32 product per element whichever of the scales are per tile
        if Q_SCALAR and K_SCALAR:
            s = s * (qs * ks)
        elif Q_SCALAR:
            s = s * (qs * ks)[None, :]
        elif K_SCALAR:
            s = s * (qs * ks)[:, None]
        else:
            s = s * (qs[:, None] * ks[None, :])
        if MASK:
            if MASK_KIND != 0:
                s = apply_tile_mask(s, MASKP, b, h, rows, cols, Nq, Nk, smb, smh, smm, smn, MASK_KIND)
            s, m_new, m_use = masked_row_max(s, m_i, rows, cols, nk, q_offset, IS_CAUSAL)
        else:
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = m_new
        p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    if USE_DESC:
        v = V_desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, DP)
    elif MASK or LOAD_DMASK:
        v = tl.load(V_ptrs, mask=(cols[:, None] < Nk) & d_mask[None, :], other=0.0)
    else:
        v = tl.load(V_ptrs)
    if MASK and ZERO_V:  # p = 0 for a key a row does not see: 0 * NaN must not reach that row
        v = zero_nonfinite(v)
    if PV_FP16_ACC:  # p_scale (a power of two <= 1) keeps the fp16 tile sums of large V finite
        acc += tl.dot((p * p_scale).to(tl.float16), v, out_dtype=tl.float16).to(tl.float32)
    else:
        acc = tl.dot((p * p_scale).to(tl.float16), v, acc)
    return acc, l_i, m_new


@triton.jit
def sage1_attn_fwd(Q, K, V, QS, KS, O, LSE, Q_desc, K_desc, V_desc,
                   stride_vb, stride_vh, stride_vn,
                   stride_ob, stride_oh, stride_on,
                   Hq, Hkv, Nq, Nk, D, q_groups, k_groups, q_tps, k_tps,
                   MASKP, smb, smh, smm, smn, QLEN, KLEN, VMAX, QBAD, FIRST_BAD,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DP: tl.constexpr,
                   Q_SCALAR: tl.constexpr, K_SCALAR: tl.constexpr, IS_CAUSAL: tl.constexpr,
                   PV_FP16_ACC: tl.constexpr, RETURN_LSE: tl.constexpr, USE_DESC: tl.constexpr,
                   MASK_KIND: tl.constexpr, HAS_LENS: tl.constexpr, PER_SEQ_CAUSAL: tl.constexpr,
                   V_RESCALED: tl.constexpr, ZERO_V: tl.constexpr, NAN_ROWS: tl.constexpr):
    start_m, bh, b, h, hk, kv_bh = program_tile(Hq, Hkv, IS_CAUSAL)
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dcols = tl.arange(0, DP)
    d_mask = dcols < D
    if USE_DESC:
        q = Q_desc.load([bh, start_m * BLOCK_M, 0]).reshape(BLOCK_M, DP)
    else:
        q = tl.load(Q + (bh * Nq + rows[:, None]) * DP + dcols[None, :], mask=rows[:, None] < Nq, other=0)
    if Q_SCALAR:
        qs = tl.load(QS + bh * q_groups + (start_m * BLOCK_M) // q_tps)
    else:
        qs = tl.load(QS + bh * q_groups + rows // q_tps, mask=rows < Nq, other=0.0)
    offs_n = tl.arange(0, BLOCK_N)
    K_ptrs = K + (kv_bh * Nk + offs_n[:, None]) * DP + dcols[None, :]
    # (64-bit base and tile steps: V is read as the caller gave it, which may be a view into a larger
    # buffer, e.g. one packed QKV tensor, reaching past 2^31 elements)
    V_ptrs = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh + offs_n[:, None] * stride_vn + dcols[None, :]
    ks_ptr = KS + kv_bh * k_groups

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DP], dtype=tl.float32)

    nk, q_offset, full_end, hi = kv_range(start_m, b, Nq, Nk, QLEN, KLEN, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_LENS,
                                          PER_SEQ_CAUSAL, MASK_KIND)
    # large-|V| guard (common.range_guard): P's scale before fp16, and the output's after normalizing
    s_v, p_scale = guard_scales_tl(tl.load(VMAX), V_RESCALED, PV_FP16_ACC)
    out_scale = 1.0 / (s_v * p_scale)

    for start_n in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _tile(acc, l_i, m_i, q, qs, K_ptrs + start_n * DP, ks_ptr, V_ptrs + tl.cast(start_n, tl.int64) * stride_vn,
                              K_desc, V_desc, kv_bh, b, hk, start_n, rows, Nq, Nk, nk, q_offset, k_tps, d_mask,
                              MASKP, h, smb, smh, smm, smn, p_scale,
                              BLOCK_N, DP, Q_SCALAR, K_SCALAR, False, IS_CAUSAL, PV_FP16_ACC, DP != D, USE_DESC,
                              MASK_KIND, ZERO_V)
    for start_n in range(full_end, hi, BLOCK_N):
        acc, l_i, m_i = _tile(acc, l_i, m_i, q, qs, K_ptrs + start_n * DP, ks_ptr, V_ptrs + tl.cast(start_n, tl.int64) * stride_vn,
                              K_desc, V_desc, kv_bh, b, hk, start_n, rows, Nq, Nk, nk, q_offset, k_tps, d_mask,
                              MASKP, h, smb, smh, smm, smn, p_scale,
                              BLOCK_N, DP, Q_SCALAR, K_SCALAR, True, IS_CAUSAL, PV_FP16_ACC, DP != D, USE_DESC,
                              MASK_KIND, ZERO_V)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None] * out_scale
    lse = m_i + tl.math.log2(l_i)  # log2 domain; the host converts to natural log and adds the K-smoothing shift
    # NaN/Inf inputs: SDPA's rows (common.nonfinite), then the output
    write_output(out, lse, O, LSE, rows, dcols, d_mask, b, h, bh, kv_bh, Nq, Nk, stride_ob, stride_oh, stride_on,
                 QLEN, KLEN, QBAD, FIRST_BAD, IS_CAUSAL, HAS_LENS, PER_SEQ_CAUSAL, RETURN_LSE, NAN_ROWS)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) by (padded head dim, causal): chosen by the sweep
# recorded in sage1/NOTES.md. BLOCK_N stays 64: it is the K quantization block of the paper
# (one scalar scale per tile pair) and the span of each fp16-accumulated PV product.
CONFIGS = {
    (32, False): (128, 64, 4, 3), (32, True): (128, 64, 4, 3),
    (64, False): (128, 64, 4, 4), (64, True): (128, 64, 4, 3),
    (128, False): (128, 64, 4, 2), (128, True): (128, 64, 4, 3),
    (256, False): (64, 64, 4, 2), (256, True): (64, 64, 4, 2),
}


def tma_compatible(*tensors) -> bool:
    """TMA needs 16-byte aligned base pointers and strides (all but the last, contiguous dim)."""
    return all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and
               all((st * t.element_size()) % 16 == 0 for st in t.stride()[:-1]) for t in tensors)


def use_descriptors(*tensors) -> bool:
    """Tensor-descriptor (TMA) loads on Hopper and newer; pointer loads elsewhere. The CPU
    interpreter runs the descriptor path too (it zero-fills out-of-range boxes like TMA)."""
    dev = tensors[0].device
    if dev.type == "cuda" and device_capability(dev)[0] < 9:
        return False
    return _has_descriptors() and tma_compatible(*tensors)


def _has_descriptors() -> bool:
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return True


def _descriptors(qk, v_hnd, block_m, block_n, dp):
    from triton.tools.tensor_descriptor import TensorDescriptor

    B, Hq, Nq, _ = qk.q_codes.shape
    q3 = qk.q_codes.view(B * Hq, Nq, dp)
    k3 = qk.k_codes.view(-1, qk.k_codes.shape[2], dp)
    return (TensorDescriptor(q3, list(q3.shape), list(q3.stride()), [1, block_m, dp]),
            TensorDescriptor(k3, list(k3.shape), list(k3.stride()), [1, block_n, dp]),
            TensorDescriptor(v_hnd, list(v_hnd.shape), list(v_hnd.stride()), [1, 1, block_n, dp]))


def launch(qk, v_hnd: torch.Tensor, out_hnd: torch.Tensor, *, is_causal: bool, pv_fp16_acc: bool,
           return_lse: bool, config=None, use_desc=None, mask=NO_MASK, vmax=None, v_rescaled=False,
           zero_v=False, flags=None):
    """Run the kernel on quantized Q,K (:class:`common.int_qk.QuantizedQK`) and fp16 V.

    ``v_hnd``/``out_hnd`` are [B, H, N, D] views (any strides with a contiguous last dim).
    ``vmax``: fp32 0-dim device tensor, max |V| over its finite values, from which the kernel
    derives the range guard's scales (common.range_guard; ``v_rescaled``: V was converted to fp16
    with s_v); None: no guard. ``zero_v``: masked tiles zero V's NaN/Inf; ``flags``
    (common.nonfinite.NonfiniteFlags): set SDPA's NaN rows from them.
    Returns the log2-domain LSE [B, Hq, Nq] (or None).
    """
    B, Hq, Nq, DP = qk.q_codes.shape
    Hkv, Nk = qk.k_codes.shape[1], qk.k_codes.shape[2]
    D = v_hnd.shape[-1]
    BLOCK_M, BLOCK_N, warps, stages = config or CONFIGS[(DP, is_causal)]
    if mask.kind != MASK_NONE and config is None:
        stages = min(stages, 2)  # the attn_mask tile is pipelined too: keep shared memory in bounds
    q_tps = qk.q_tokens_per_scale or 1
    k_tps = qk.k_tokens_per_scale or 1
    q_scalar = qk.q_tokens_per_scale > 0 and qk.q_tokens_per_scale % BLOCK_M == 0
    k_scalar = qk.k_tokens_per_scale > 0 and qk.k_tokens_per_scale % BLOCK_N == 0
    lse = torch.empty(B, Hq, Nq, dtype=torch.float32, device=v_hnd.device) if return_lse else out_hnd
    final_out = None
    if out_hnd.dtype == torch.bfloat16 and out_hnd.device.type == "cpu":
        # Triton's CPU interpreter converts fp32 -> bf16 by truncation (numpy has no bf16), the GPU
        # rounds to nearest even: write fp32 and round on the host so both round the same way.
        final_out, out_hnd = out_hnd, torch.empty(out_hnd.shape, dtype=torch.float32)
    if use_desc is None:
        use_desc = use_descriptors(qk.q_codes, qk.k_codes, v_hnd)
    descs = _descriptors(qk, v_hnd, BLOCK_M, BLOCK_N, DP) if use_desc else (None, None, None)
    grid = (triton.cdiv(Nq, BLOCK_M), B * Hq)
    sage1_attn_fwd[grid](
        qk.q_codes, qk.k_codes, v_hnd, qk.q_scale, qk.k_scale, out_hnd, lse, *descs,
        v_hnd.stride(0), v_hnd.stride(1), v_hnd.stride(2),
        out_hnd.stride(0), out_hnd.stride(1), out_hnd.stride(2),
        Hq, Hkv, Nq, Nk, D, qk.q_scale.shape[-1], qk.k_scale.shape[-1], q_tps, k_tps,
        *kernel_args(mask, B, Nq, Nk, qk.q_scale),
        vmax if vmax is not None else torch.zeros((), device=v_hnd.device),
        flags.q_bad if flags is not None else qk.q_scale, flags.first_bad if flags is not None else qk.q_scale,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, DP=DP, Q_SCALAR=q_scalar, K_SCALAR=k_scalar,
        IS_CAUSAL=is_causal, PV_FP16_ACC=pv_fp16_acc, RETURN_LSE=return_lse, USE_DESC=use_desc,
        MASK_KIND=mask.kind, HAS_LENS=mask.has_lens, PER_SEQ_CAUSAL=mask.q_lens is not None,
        V_RESCALED=v_rescaled, ZERO_V=zero_v, NAN_ROWS=flags is not None, num_warps=warps, num_stages=stages)
    if final_out is not None:
        final_out.copy_(out_hnd)
    return lse if return_lse else None
