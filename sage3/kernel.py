"""SageAttention3 inference kernel in Triton, exact FP4 emulation for GPUs without FP4 tensor cores.

Q, K and V^T arrive as packed FP4 codes (two per byte) plus block scales. By default a pass before
the kernel (:func:`dequantize_rows`) turns K and V^T into fp16/bf16 once per token, and the kernel
reads those; ``pre_unpack=False`` makes the kernel read the packed codes and unpack them in
registers instead (the same values: an E2M1 value times an E4M3 or in-range E8M0 scale has at most
6 significant bits, exact in 16 bits). It multiplies on 16-bit tensor cores with fp32 accumulation
and quantizes P to FP4 per 16 (32) keys in registers before the P V product.
On Hopper this is an emulation: its speed is that of a 16-bit attention plus the in-register
quantization of P, not of FP4 tensor cores (sage3/NOTES.md).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from common.checks import interpreter_enabled
from common.int_qk import LOG2E
from common.triton_attention import dot_16bit, kv_bounds, masked_row_max, program_tile
from common.triton_quant import to_fp8

from .emulation import TWO_LEVEL_RANGE
from .fp4_triton import (
    dequantize_rows_kernel,
    dequantize_tile,
    e2m1_round,
    e2m1_round_magic,
    load_scales,
    mx_scale_f32,
)


@triton.jit
def _round(a, MAGIC: tl.constexpr, INTERPRET: tl.constexpr):
    if MAGIC:
        out = e2m1_round_magic(a, INTERPRET)
    else:
        out = e2m1_round(a)
    return out


@triton.jit
def _quantize_p(p, BM: tl.constexpr, BN: tl.constexpr, MX: tl.constexpr, OP: tl.constexpr, INTERPRET: tl.constexpr,
                MAGIC: tl.constexpr):
    """P (fp32, >= 0) -> FP4 per block of keys, dequantized into OP (exact)."""
    if MX:
        pb = tl.reshape(p, (BM, BN // 32, 32))
        bmax = tl.max(pb, axis=2)
        e = ((bmax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 2  # floor(log2 max) - 2, biased
        ok = (bmax > 0) & (e > 0)
        sc = mx_scale_f32(tl.minimum(tl.maximum(e, 1), 253))
        inv = mx_scale_f32(254 - tl.minimum(tl.maximum(e, 1), 253))  # 1/sc, exact (powers of two)
        r = _round(pb * tl.where(ok, inv, 0.0)[:, :, None], MAGIC, INTERPRET)
        out = tl.reshape(r * tl.where(ok, sc, 0.0)[:, :, None], (BM, BN)).to(OP)
    else:
        pb = tl.reshape(p, (BM, BN // 16, 16))
        bmax = tl.max(pb, axis=2)
        s = tl.math.div_rn(bmax, 6.0)
        inv = tl.where(bmax > 0, tl.math.div_rn(1.0, tl.where(s > 0, s, 1.0)), 0.0)
        r = _round(pb * inv[:, :, None], MAGIC, INTERPRET)
        if OP == tl.bfloat16:
            s8 = to_fp8(s, False, INTERPRET).to(tl.float32)
            out = tl.reshape(r * s8[:, :, None], (BM, BN)).to(OP)
        else:
            s8 = to_fp8(s, False, INTERPRET).to(OP)
            out = tl.reshape(r.to(OP) * s8[:, :, None], (BM, BN))
    return out


@triton.jit
def sage3_attn_fwd(QP, QSC, KP, KSC, VP, VSC, K16, VT16, DS, O, LSE,
                   stride_ob, stride_oh, stride_on,
                   Hq, Hkv, Nq, Nk, NPAD, D, n_ds_blocks, mult, log2_c,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DP: tl.constexpr, MX: tl.constexpr,
                   SMOOTH_Q: tl.constexpr, IS_CAUSAL: tl.constexpr, RETURN_LSE: tl.constexpr,
                   OP: tl.constexpr, INTERPRET: tl.constexpr, SB: tl.constexpr, PRE: tl.constexpr,
                   MAGIC: tl.constexpr):
    start_m, bh, b, h, hk, kv_bh = program_tile(Hq, Hkv, IS_CAUSAL)
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    half = tl.arange(0, DP // 2)
    sblk = tl.arange(0, DP // SB)
    q = dequantize_tile(tl.load(QP + (bh * Nq + rows[:, None]) * (DP // 2) + half[None, :], mask=rows[:, None] < Nq, other=0),
                 load_scales(QSC + (bh * Nq + rows[:, None]) * (DP // SB) + sblk[None, :], rows[:, None] < Nq, MX),
                 BLOCK_M, DP, MX, OP)

    offs_n = tl.arange(0, BLOCK_N)
    dcols = tl.arange(0, DP)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DP], dtype=tl.float32)
    q_offset = Nk - Nq
    _, hi = kv_bounds(start_m, Nq, Nk, BLOCK_M, BLOCK_N, IS_CAUSAL)  # every tile is masked here
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        kmask = cols[:, None] < Nk
        if PRE:  # K dequantized to 16 bits by a pass before the kernel (the same values)
            k = tl.load(K16 + (kv_bh * Nk + cols[:, None]) * DP + dcols[None, :], mask=kmask, other=0.0)
        else:
            k = dequantize_tile(tl.load(KP + (kv_bh * Nk + cols[:, None]) * (DP // 2) + half[None, :], mask=kmask, other=0),
                         load_scales(KSC + (kv_bh * Nk + cols[:, None]) * (DP // SB) + sblk[None, :], kmask, MX),
                         BLOCK_N, DP, MX, OP)
        s = dot_16bit(q, tl.trans(k), None, INTERPRET)
        if SMOOTH_Q:  # one Q-smoothing block per BLOCK_M tile: delta_s is one row per tile
            s += tl.load(DS + (bh.to(tl.int64) * n_ds_blocks + start_m) * Nk + cols, mask=cols < Nk,  # (64-bit: B Hq NB Nk
                         other=0.0)[None, :]  # values pass 2^31 at B=4, Hq=32, 48k tokens)
        s = s * mult
        s, m_new, m_use = masked_row_max(s, m_i, rows, cols, Nk, q_offset, IS_CAUSAL)
        p = tl.math.exp2(s - (m_use - log2_c)[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        pq = _quantize_p(p, BLOCK_M, BLOCK_N, MX, OP, INTERPRET, MAGIC)
        vhalf = start_n // 2 + tl.arange(0, BLOCK_N // 2)
        vsb = start_n // SB + tl.arange(0, BLOCK_N // SB)
        if PRE:
            vt = tl.load(VT16 + (kv_bh * DP + dcols[:, None]) * NPAD + start_n + offs_n[None, :])
        else:
            vt = dequantize_tile(tl.load(VP + (kv_bh * DP + dcols[:, None]) * (NPAD // 2) + vhalf[None, :]),
                          tl.load(VSC + (kv_bh * DP + dcols[:, None]) * (NPAD // SB) + vsb[None, :]),
                          DP, BLOCK_N, MX, OP)
        acc = dot_16bit(pq, tl.trans(vt), acc * alpha[:, None], INTERPRET)
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + dcols[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(rows[:, None] < Nq) & (dcols[None, :] < D))
    if RETURN_LSE:
        tl.store(LSE + bh * Nq + rows, m_i + tl.math.log2(l_i) - log2_c, mask=rows < Nq)


# (BLOCK_N, num_warps, num_stages) by padded head dim; BLOCK_M = 128 is the Q-smoothing block.
CONFIGS = {32: (64, 4, 2), 64: (64, 4, 3), 128: (64, 4, 2), 256: (32, 8, 1)}


LAST_COMPILED = None  # the last compiled kernel, for inspecting its IR (experiments/sweep_sage3.py)


def kv_tile_for(dp: int) -> int:
    return CONFIGS[dp][0]


def dequantize_rows(packed: torch.Tensor, scales: torch.Tensor, fmt: str, op_dtype: torch.dtype) -> torch.Tensor:
    """[..., R, C/2] packed codes + scales -> [..., R, C] in op_dtype (exact), on the GPU."""
    *lead, R, half = packed.shape
    C = half * 2
    out = torch.empty(*lead, R, C, dtype=op_dtype, device=packed.device)
    rows = packed.numel() // half
    CP = min(C, 128)
    dequantize_rows_kernel[(triton.cdiv(rows, 64), C // CP)](
        packed, scales, out, rows, C, BLOCK_R=64, CP=CP, MX=fmt == "mxfp4", SB=32 if fmt == "mxfp4" else 16,
        OP=tl.float16 if op_dtype == torch.float16 else tl.bfloat16)
    return out


def launch(qf, out_hnd: torch.Tensor, *, sm_scale: float, delta_s, is_causal: bool, two_level_p: bool,
           op_dtype: torch.dtype, return_lse: bool, config=None, pre_unpack: bool = True, magic_round: bool = True,
           unpacked=None):
    B, Hq, Nq, half = qf.q_packed.shape
    DP = half * 2
    Hkv, Nk, NPAD = qf.k_packed.shape[1], qf.seqlen_k, qf.v_packed.shape[-1] * 2
    D = out_hnd.shape[-1]
    BLOCK_N, warps, stages = config or CONFIGS[DP]
    dev = out_hnd.device
    lse = torch.empty(B, Hq, Nq, dtype=torch.float32, device=dev) if return_lse else out_hnd
    final_out = None
    if out_hnd.dtype == torch.bfloat16 and dev.type == "cpu":
        # the CPU interpreter truncates fp32 -> bf16; write fp32 and round on the host (see sage1)
        final_out, out_hnd = out_hnd, torch.empty(out_hnd.shape, dtype=torch.float32)
    k16 = vt16 = None
    if pre_unpack:
        k16, vt16 = unpacked or (dequantize_rows(qf.k_packed, qf.k_scales, qf.fmt, op_dtype),
                                 dequantize_rows(qf.v_packed, qf.v_scales, qf.fmt, op_dtype))
    grid = (triton.cdiv(Nq, 128), B * Hq)
    global LAST_COMPILED
    LAST_COMPILED = sage3_attn_fwd[grid](
        qf.q_packed, qf.q_scales, qf.k_packed, qf.k_scales, qf.v_packed, qf.v_scales,
        k16 if pre_unpack else qf.k_packed, vt16 if pre_unpack else qf.v_packed,
        delta_s if delta_s is not None else lse, out_hnd, lse,
        out_hnd.stride(0), out_hnd.stride(1), out_hnd.stride(2),
        Hq, Hkv, Nq, Nk, NPAD, D, delta_s.shape[2] if delta_s is not None else 1,
        sm_scale * LOG2E, math.log2(TWO_LEVEL_RANGE) if two_level_p else 0.0,
        BLOCK_M=128, BLOCK_N=BLOCK_N, DP=DP, MX=qf.fmt == "mxfp4", SMOOTH_Q=delta_s is not None,
        IS_CAUSAL=is_causal, RETURN_LSE=return_lse,
        OP=tl.float16 if op_dtype == torch.float16 else tl.bfloat16, INTERPRET=interpreter_enabled(),
        SB=32 if qf.fmt == "mxfp4" else 16, PRE=pre_unpack, MAGIC=magic_round, num_warps=warps, num_stages=stages)
    if final_out is not None:
        final_out.copy_(out_hnd)
    return lse if return_lse else None
