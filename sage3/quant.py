"""SageAttention3's quantization stage: Q, K and V to packed FP4 (two codes per byte) plus block
scales, once, before the attention kernel.

Blocks always run along the reduction dimension of the matmul that consumes them:
Q and K per token over 16 (NVFP4) / 32 (MXFP4) consecutive channels (Q K^T reduces over D);
V per channel over 16 / 32 consecutive tokens (P V reduces over keys), so V is stored
transposed, ``[D, N]``. P is quantized inside the kernel, per query row over 16 / 32 keys.

Smoothing as in SageAttention 1/2: K loses its token mean (exact); Q loses the mean of each
block of 128 query tokens, and ``delta_s = q_mean . (K - k_mean)^T`` (fp32, unquantized) is added
back to S before the softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common import fp4, int_qk
from common.checks import interpreter_enabled
from common.smoothing import expand_block_rows, k_mean, q_block_means

Q_BLOCK = 128   # Q smoothing block (the kernel's BLOCK_M)
V_PAD = 128     # V's token axis is padded to the kernel's KV tile
SCALE_BLOCK = {"nvfp4": fp4.NVFP4_BLOCK, "mxfp4": fp4.MXFP4_BLOCK}


@dataclass
class QuantizedFP4:
    fmt: str                   # "nvfp4" or "mxfp4"
    q_packed: torch.Tensor     # uint8 [B, Hq, Nq, DP/2]
    q_scales: torch.Tensor     # [B, Hq, Nq, DP/block]: float8_e4m3fn (nvfp4) or uint8 biased exponents (mxfp4)
    k_packed: torch.Tensor     # uint8 [B, Hkv, Nk, DP/2]
    k_scales: torch.Tensor
    v_packed: torch.Tensor     # uint8 [B, Hkv, DP, NPAD/2]  (V transposed)
    v_scales: torch.Tensor     # [B, Hkv, DP, NPAD/block]
    k_mean: torch.Tensor | None       # fp32 [B, Hkv, 1, D]
    q_block_mean: torch.Tensor | None  # fp32 [B, Hq, ceil(Nq/128), D]
    seqlen_k: int


def padded_head_dim(d: int) -> int:
    """Next power of two >= max(32, d): whole MXFP4 blocks, and tl.dot's minimum (the INT kernels' rule)."""
    return int_qk.padded_head_dim(d)


def _quantize_blocks(x: torch.Tensor, fmt: str):
    if fmt == "nvfp4":
        return fp4.nvfp4_quantize(x)
    return fp4.mxfp4_quantize(x)


def dequantize(packed: torch.Tensor, scales: torch.Tensor, fmt: str) -> torch.Tensor:
    """Packed codes + block scales -> fp32 values (exact)."""
    codes = fp4.unpack_fp4(packed)
    return fp4.nvfp4_dequantize(codes, scales) if fmt == "nvfp4" else fp4.mxfp4_dequantize(codes, scales)


def _pad_last(x: torch.Tensor, n: int) -> torch.Tensor:
    return x if x.shape[-1] == n else torch.nn.functional.pad(x, (0, n - x.shape[-1]))


def quantize_qkv_fp4(q, k, v, *, fmt: str, smooth_q: bool, smooth_k: bool, backend: str) -> QuantizedFP4:
    """Quantize HND views of q, k, v (see the module docstring)."""
    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    dp = padded_head_dim(D)
    npad = -(-Nk // V_PAD) * V_PAD
    km = k_mean(k) if smooth_k else None
    if backend == "triton":
        return _quantize_triton(q, k, v, km, fmt, smooth_q, dp, npad)
    qf = q.float()
    qbm = None
    if smooth_q:
        qbm = q_block_means(qf, Q_BLOCK)
        qf = qf - expand_block_rows(qbm, Q_BLOCK, Nq)
    kf = k.float() - km if km is not None else k.float()
    vt = _pad_last(v.float().transpose(-1, -2), npad)  # [B, Hkv, D, NPAD]
    out = []
    for x in (_pad_last(qf, dp), _pad_last(kf, dp), torch.nn.functional.pad(vt, (0, 0, 0, dp - D))):
        codes, scales = _quantize_blocks(x, fmt)
        out += [fp4.pack_fp4(codes), scales]
    return QuantizedFP4(fmt, *out, km, qbm, Nk)


def _quantize_triton(q, k, v, km, fmt, smooth_q, dp, npad):
    from .fp4_triton import fp4_quantize_rows_kernel, fp4_quantize_v_kernel

    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    sb = SCALE_BLOCK[fmt]
    mx = fmt == "mxfp4"
    sdt = torch.uint8 if mx else torch.float8_e4m3fn
    dev = q.device
    interp = interpreter_enabled()
    outs = []
    for x, mean, smooth in ((q, None, smooth_q), (k, km, False)):
        if x.stride(-1) != 1:
            x = x.contiguous()
        b_, h_, n_, _ = x.shape
        packed = torch.empty(b_, h_, n_, dp // 2, dtype=torch.uint8, device=dev)
        scales = torch.empty(b_, h_, n_, dp // sb, dtype=sdt, device=dev)
        nblk = -(-n_ // Q_BLOCK)
        bmean = torch.empty(b_, h_, nblk, D, dtype=torch.float32, device=dev) if smooth else packed
        fp4_quantize_rows_kernel[(nblk, b_ * h_)](
            x, mean.reshape(b_ * h_, D).contiguous() if mean is not None else packed, packed, scales, bmean,
            x.stride(0), x.stride(1), x.stride(2), h_, n_, D,
            BLOCK=Q_BLOCK, DP=dp, MX=mx, HAS_MEAN=mean is not None, SMOOTH_BLOCK=smooth, INTERPRET=interp,
            SB=sb, num_warps=8)
        outs += [packed, scales, bmean if smooth else None]
    if v.stride(-1) != 1:
        v = v.contiguous()
    vp = torch.empty(B, Hkv, dp, npad // 2, dtype=torch.uint8, device=dev)
    vs = torch.empty(B, Hkv, dp, npad // sb, dtype=sdt, device=dev)
    block = 64
    fp4_quantize_v_kernel[(npad // block, B * Hkv)](
        v, vp, vs, v.stride(0), v.stride(1), v.stride(2), Hkv, Nk, npad, D,
        BLOCK=block, DP=dp, MX=mx, INTERPRET=interp, SB=sb, num_warps=4)
    (qp, qs, qbm), (kp, ks, _) = outs[:3], outs[3:]
    return QuantizedFP4(fmt, qp, qs, kp, ks, vp, vs, km, qbm, Nk)
