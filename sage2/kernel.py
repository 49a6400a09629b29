"""SageAttention2 forward kernel in Triton: INT8/INT4 Q K^T with per-thread (or coarser) scales,
optional Q smoothing, exp2 online softmax, FP8 P V with two-level accumulation.

One program computes BLOCK_M query rows of one (batch, query head); Q, K and V^T tiles arrive
through tensor descriptors (TMA on Hopper). Per tile of BLOCK_N keys:

    s   = (int32(Q_hat K_hat_j^T) * dk_j) * dq_i (+ delta_s)     # log2 domain
    p   = exp2(s - m' + log2(P_SCALE))                           # (0, 448]: FP8 E4M3's range
    acc = a*acc + fp8(p) @ fp8(V_j)                              # see PV_MODE

Per-thread scales. In an MMA accumulator fragment (mma.m16n8 / each warp's 16 rows of wgmma
m64nNk32) lane l holds rows g, g+8 (g = l >> 2) and columns 2t, 2t+1 of every 8 (t = l & 3).
SageAttention2 quantizes so that every value a thread holds shares one Q scale and one K scale:
Q rows {g, g+8} of each 16-row warp slice, K tokens {8m+2t, 8m+2t+1} of each 128-key tile
(common.quant.groups_per_thread_q / _k). Triton does not expose fragment ownership, so here the
scales arrive expanded to one per token and S is scaled by the outer product dk_j * dq_i: the
same numbers a per-thread CUDA kernel computes (it multiplies by the thread's one dq*dk).

PV_MODE (how the FP8 products accumulate; Hopper's FP8 MMA accumulator keeps ~13 mantissa bits
and Triton's default on sm_90 is max_num_imprecise_acc = 2**30, i.e. never promote):
  0 single:    acc is fed to every tl.dot as the MMA accumulator -> truncated at every MMA
  1 two-level: each tile's product starts in a fresh accumulator, added to acc in fp32
  2 two-level: the same through Triton's own promotion (max_num_imprecise_acc = BLOCK_N)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from common.checks import interpreter_enabled
from common.masking import NO_MASK, kernel_args
from common.triton_attention import (
    apply_tile_mask,
    kv_range,
    masked_row_max,
    program_tile,
    write_output,
)
from common.triton_quant import to_fp8

PV_SINGLE, PV_TWO_LEVEL, PV_TWO_LEVEL_PROMOTE = 0, 1, 2


@triton.jit
def _tile(acc, l_i, m_i, q, qs, ks_ptr, DS_ptrs, K_desc, V_desc, kv_bh, b, h, hk, start_n, rows, Nq, Nk, nk,
          q_offset, log2_pscale, MASKP, smb, smh, smm, smn,
          BLOCK_N: tl.constexpr, DP: tl.constexpr, MASK: tl.constexpr, IS_CAUSAL: tl.constexpr,
          PV_FP8: tl.constexpr, FP8_E5M2: tl.constexpr, PV_MODE: tl.constexpr, SMOOTH_Q: tl.constexpr,
          K_SCALE_MODE: tl.constexpr, INTERPRET: tl.constexpr, MASK_KIND: tl.constexpr):
    cols = start_n + tl.arange(0, BLOCK_N)
    k = K_desc.load([kv_bh, start_n, 0]).reshape(BLOCK_N, DP)
    s = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
    # K scales (per token in memory). Loading a [BLOCK_N] vector would need a layout conversion
    # through shared memory on every tile; per-tile and per-thread scales are a few scalars.
    if K_SCALE_MODE == 0:  # one scale per tile (per-block, per-warp, per-tensor)
        s = s * tl.load(ks_ptr + start_n)
    elif K_SCALE_MODE == 1:  # per-thread: token 8m+2t+j of a 128-key block uses scale t
        t = (cols % 8) // 2
        k0 = tl.load(ks_ptr + start_n)
        k1 = tl.load(ks_ptr + start_n + 2, mask=start_n + 2 < Nk, other=0.0)
        k2 = tl.load(ks_ptr + start_n + 4, mask=start_n + 4 < Nk, other=0.0)
        k3 = tl.load(ks_ptr + start_n + 6, mask=start_n + 6 < Nk, other=0.0)
        ks = tl.where(t == 0, k0, tl.where(t == 1, k1, tl.where(t == 2, k2, k3)))
        s = s * ks[None, :]
    else:
        ks = tl.load(ks_ptr + cols, mask=cols < Nk, other=0.0)
        s = s * ks[None, :]
    if SMOOTH_Q or MASK:
        s = s * qs[:, None]
        if SMOOTH_Q:
            s += tl.load(DS_ptrs + start_n, mask=(rows[:, None] < Nq) & (cols[None, :] < Nk), other=0.0)
        if MASK and MASK_KIND != 0:
            s = apply_tile_mask(s, MASKP, b, h, rows, cols, Nq, Nk, smb, smh, smm, smn, MASK_KIND)
        # unmasked tiles come here only with Q smoothing: all their keys are in range and visible
        s, m_new, m_use = masked_row_max(s, m_i, rows, cols, nk, q_offset, IS_CAUSAL and MASK)
        p = tl.math.exp2(s - (m_use - log2_pscale)[:, None])
    else:
        # dq >= 0: take the row max before scaling by dq, then scale and shift in one FMA
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qs)
        m_use = m_new
        p = tl.math.exp2(s * qs[:, None] - (m_use - log2_pscale)[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if PV_FP8:
        vt = V_desc.load([kv_bh, 0, start_n]).reshape(DP, BLOCK_N)
        p8 = to_fp8(p, FP8_E5M2, INTERPRET)
        if PV_MODE == 0:
            acc = tl.dot(p8, tl.trans(vt), acc * alpha[:, None])
        elif PV_MODE == 1:
            acc = acc * alpha[:, None] + tl.dot(p8, tl.trans(vt))
        else:
            acc = tl.dot(p8, tl.trans(vt), acc * alpha[:, None], max_num_imprecise_acc=BLOCK_N)
    else:
        v = V_desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, DP)
        acc = tl.dot(p.to(tl.float16), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def sage2_attn_fwd(Q_desc, K_desc, V_desc, QS, KS, DS, VS, VM, O, LSE,
                   stride_ob, stride_oh, stride_on,
                   Hq, Hkv, Nq, Nk, D, n_ds_blocks, log2_pscale,
                   MASKP, smb, smh, smm, smn, QLEN, KLEN, QBAD, FIRST_BAD,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DP: tl.constexpr, DS_BLOCK: tl.constexpr,
                   IS_CAUSAL: tl.constexpr, PV_FP8: tl.constexpr, FP8_E5M2: tl.constexpr,
                   PV_MODE: tl.constexpr, SMOOTH_Q: tl.constexpr, SMOOTH_V: tl.constexpr,
                   K_SCALE_MODE: tl.constexpr, RETURN_LSE: tl.constexpr, INTERPRET: tl.constexpr,
                   MASK_KIND: tl.constexpr, HAS_LENS: tl.constexpr, PER_SEQ_CAUSAL: tl.constexpr,
                   HAS_VS: tl.constexpr, NAN_ROWS: tl.constexpr):
    start_m, bh, b, h, hk, kv_bh = program_tile(Hq, Hkv, IS_CAUSAL)
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dcols = tl.arange(0, DP)
    d_mask = dcols < D
    q = Q_desc.load([bh, start_m * BLOCK_M, 0]).reshape(BLOCK_M, DP)
    qs = tl.load(QS + bh * Nq + rows, mask=rows < Nq, other=0.0)
    ks_ptr = KS + kv_bh * Nk
    # (delta_s holds B Hq NB Nk values: past 2^31 at B=4, Hq=32, 48k tokens, so 64-bit offsets)
    DS_ptrs = DS + (bh.to(tl.int64) * n_ds_blocks + rows[:, None] // DS_BLOCK) * Nk + tl.arange(0, BLOCK_N)[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DP], dtype=tl.float32)

    nk, q_offset, full_end, hi = kv_range(start_m, b, Nq, Nk, QLEN, KLEN, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_LENS,
                                          PER_SEQ_CAUSAL, MASK_KIND)

    for start_n in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _tile(acc, l_i, m_i, q, qs, ks_ptr, DS_ptrs, K_desc, V_desc, kv_bh, b, h, hk, start_n, rows,
                              Nq, Nk, nk, q_offset, log2_pscale, MASKP, smb, smh, smm, smn,
                              BLOCK_N, DP, False, IS_CAUSAL, PV_FP8, FP8_E5M2,
                              PV_MODE, SMOOTH_Q, K_SCALE_MODE, INTERPRET, MASK_KIND)
    for start_n in range(full_end, hi, BLOCK_N):
        acc, l_i, m_i = _tile(acc, l_i, m_i, q, qs, ks_ptr, DS_ptrs, K_desc, V_desc, kv_bh, b, h, hk, start_n, rows,
                              Nq, Nk, nk, q_offset, log2_pscale, MASKP, smb, smh, smm, smn,
                              BLOCK_N, DP, True, IS_CAUSAL, PV_FP8, FP8_E5M2,
                              PV_MODE, SMOOTH_Q, K_SCALE_MODE, INTERPRET, MASK_KIND)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if HAS_VS:  # V's per-channel scales (FP8), or the fp16 range guard's power of two: after the division,
        # since acc ~ l |V's codes| and l reaches P_SCALE * Nk (acc * scale overflowed from |V| ~ 1e33)
        out = out * tl.load(VS + kv_bh * D + dcols, mask=d_mask, other=0.0)[None, :]
    if SMOOTH_V:
        vmean = tl.load(VM + kv_bh * D + dcols, mask=d_mask, other=0.0)
        out = tl.where(l_i[:, None] == 0.0, 0.0, out + vmean[None, :])
    lse = m_i + tl.math.log2(l_i) - log2_pscale
    # NaN/Inf inputs: SDPA's rows (common.nonfinite), then the output
    write_output(out, lse, O, LSE, rows, dcols, d_mask, b, h, bh, kv_bh, Nq, Nk, stride_ob, stride_oh, stride_on,
                 QLEN, KLEN, QBAD, FIRST_BAD, IS_CAUSAL, HAS_LENS, PER_SEQ_CAUSAL, RETURN_LSE, NAN_ROWS)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) by (padded head dim, causal, fp8 PV).
# BLOCK_N = 128 is the two-level flush interval of the official sm90 kernel.
CONFIGS = {
    (32, False, True): (128, 128, 8, 3),
    (64, False, True): (128, 128, 4, 3), (128, False, True): (128, 128, 8, 4),
    (256, False, True): (64, 64, 4, 2),
    (32, False, False): (128, 64, 4, 3),
    (64, False, False): (128, 64, 4, 3), (128, False, False): (128, 64, 4, 3),
    (256, False, False): (64, 64, 4, 2),
}


def config_for(dp: int, is_causal: bool, pv_fp8: bool):
    return CONFIGS.get((dp, is_causal, pv_fp8)) or CONFIGS[(dp, False, pv_fp8)]


def _desc(t, block):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(t, list(t.shape), list(t.stride()), block)


def smooth_q_config(delta_s, config) -> bool:
    return delta_s is not None and config is None


def launch(qk, qv, out_hnd: torch.Tensor, *, delta_s, is_causal: bool, pv_dtype: str, pv_mode: int,
           log2_pscale: float, return_lse: bool, config=None, k_per_thread: bool = False, mask=NO_MASK,
           flags=None):
    """Run the kernel; ``k_per_thread`` says K's scales follow the per-thread grouping over
    128-key blocks (four scales per block), which the kernel reads as four scalars. ``flags``
    (common.nonfinite.NonfiniteFlags): set SDPA's NaN rows from them (the passes zeroed the values)."""
    B, Hq, Nq, DP = qk.q_codes.shape
    Hkv, Nk = qk.k_codes.shape[1], qk.k_codes.shape[2]
    D = out_hnd.shape[-1]
    pv_fp8 = pv_dtype != "fp16"
    BLOCK_M, BLOCK_N, warps, stages = config or config_for(DP, is_causal, pv_fp8)
    if mask.kind != 0 and config is None:
        # an attn_mask tile (fp32 bias or uint8 keep) is pipelined beside K and V: a 64-row Q tile and
        # two stages keep shared memory under Hopper's 227 KB at head_dim 128 (the 128-key tile stays)
        BLOCK_M, warps, stages = 64, 4, 2
    if smooth_q_config(delta_s, config):
        # the fp32 delta_s tiles are pipelined through shared memory too: a smaller Q tile and two
        # stages keep them in (the 128-key tile, and so the algorithm, stay the same)
        BLOCK_M, warps, stages = 64, 4, 2
    dev = out_hnd.device
    q_desc = _desc(qk.q_codes.view(B * Hq, Nq, DP), [1, BLOCK_M, DP])
    k_desc = _desc(qk.k_codes.view(B * Hkv, Nk, DP), [1, BLOCK_N, DP])
    if pv_fp8:
        vt = qv.codes
        v_desc = _desc(vt.view(B * Hkv, DP, vt.shape[-1]), [1, DP, BLOCK_N])
    else:
        v = qv.codes
        from sage1.kernel import tma_compatible

        if not tma_compatible(v):
            v = v.contiguous()
        v_desc = _desc(v, [1, 1, BLOCK_N, DP])
    tps = qk.k_tokens_per_scale
    if tps > 0 and tps % BLOCK_N == 0:
        k_scale_mode = 0
    elif tps == 0 and k_per_thread and 128 % BLOCK_N == 0:
        k_scale_mode = 1
    else:
        k_scale_mode = 2
    q_scale = qk.q_scale_per_token().contiguous()
    k_scale = qk.k_scale_per_token().contiguous()
    dummy = q_scale
    lse = torch.empty(B, Hq, Nq, dtype=torch.float32, device=dev) if return_lse else dummy
    final_out = None
    if out_hnd.dtype == torch.bfloat16 and dev.type == "cpu":
        # the CPU interpreter truncates fp32 -> bf16; write fp32 and round on the host (see sage1)
        final_out, out_hnd = out_hnd, torch.empty(out_hnd.shape, dtype=torch.float32)
    grid = (triton.cdiv(Nq, BLOCK_M), B * Hq)
    sage2_attn_fwd[grid](
        q_desc, k_desc, v_desc, q_scale, k_scale,
        delta_s if delta_s is not None else dummy,
        qv.scale if qv.scale is not None else dummy,
        qv.mean.reshape(B, Hkv, D) if qv.mean is not None else dummy,
        out_hnd, lse, out_hnd.stride(0), out_hnd.stride(1), out_hnd.stride(2),
        Hq, Hkv, Nq, Nk, D, delta_s.shape[2] if delta_s is not None else 1, log2_pscale,
        *kernel_args(mask, B, Nq, Nk, q_scale),
        flags.q_bad if flags is not None else dummy, flags.first_bad if flags is not None else dummy,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, DP=DP, DS_BLOCK=max(qk.q_block, 1), IS_CAUSAL=is_causal,
        PV_FP8=pv_fp8, FP8_E5M2=pv_dtype == "fp8_e5m2", PV_MODE=pv_mode, SMOOTH_Q=delta_s is not None,
        SMOOTH_V=qv.mean is not None, K_SCALE_MODE=k_scale_mode, RETURN_LSE=return_lse, INTERPRET=interpreter_enabled(),
        MASK_KIND=mask.kind, HAS_LENS=mask.has_lens, PER_SEQ_CAUSAL=mask.q_lens is not None,
        HAS_VS=qv.scale is not None, NAN_ROWS=flags is not None, num_warps=warps, num_stages=stages)
    if final_out is not None:
        final_out.copy_(out_hnd)
    return lse if return_lse else None
