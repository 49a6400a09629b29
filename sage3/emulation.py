"""``backend="torch"``: SageAttention3's FP4 attention in plain PyTorch, tile by tile.

Q, K, V are dequantized exactly (E2M1 value x E4M3/E8M0 scale fits fp16/bf16), so their products
are exact; only fp32 summation order differs from the kernel (and from FP4 tensor cores). Per
KV tile (64 keys here; 128 in the official kernel):

    s   = (Q_deq K_deq_j^T + delta_s) * sm_scale*log2(e)
    p   = exp2(s - m' + log2(448*6))        # two-level: rows spread over (0, 2688]
    l   = a*l + rowsum(p)                    # from the unquantized p
    P   = phi(p): per 16 keys, s_b = max/6 (fp32), codes = round_E2M1(p * (1/s_b)), scale E4M3(s_b)
    acc = a*acc + P_deq V_deq_j              # fp32 accumulation
    out = acc / l                            # 2688 cancels

``two_level_p=False`` is the paper's "direct" ablation: p = exp2(s - m') in (0, 1], whose block
scales max/6 <= 1/6 fall where E4M3 is coarse or subnormal. MXFP4: 32-key blocks, power-of-two
scales ``2**(floor(log2 max) - 2)``.
"""

from __future__ import annotations

import math

import torch

from common import fp4
from common.int_qk import LOG2E
from common.online_softmax import OnlineSoftmax, kv_tiles
from common.reference import exact_fp32_matmul
from common.smoothing import expand_block_rows

from .quant import Q_BLOCK, QuantizedFP4, dequantize

TWO_LEVEL_RANGE = fp4.E4M3_MAX * fp4.E2M1_MAX  # 2688


def quantize_p(p: torch.Tensor, fmt: str) -> torch.Tensor:
    """Quantize-dequantize P (>= 0) along its last dim, as the kernel does in registers."""
    n = p.shape[-1]
    blk = fp4.NVFP4_BLOCK if fmt == "nvfp4" else fp4.MXFP4_BLOCK
    pad = (-n) % blk
    pb = torch.nn.functional.pad(p, (0, pad)).reshape(*p.shape[:-1], (n + pad) // blk, blk)
    bmax = pb.amax(dim=-1)
    if fmt == "nvfp4":
        s = bmax / torch.full_like(bmax, fp4.E2M1_MAX)
        inv = torch.where(bmax > 0, 1.0 / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))
        r = fp4.e2m1_round(pb * inv[..., None])
        deq = r * fp4.e4m3_round_scale(s).float()[..., None]
    else:
        e = torch.floor(torch.log2(bmax)) - 2
        ok = (bmax > 0) & (e > -127)
        div = torch.where(ok, torch.exp2(e), torch.full_like(e, float("inf")))
        deq = fp4.e2m1_round(pb / div[..., None]) * torch.where(ok, div, torch.zeros_like(div))[..., None]
    return deq.reshape(*p.shape[:-1], n + pad)[..., :n]


def attention_emulated(qf: QuantizedFP4, *, sm_scale: float, delta_s, is_causal: bool, two_level_p: bool,
                       op_dtype: torch.dtype, return_lse: bool = False, kv_tile: int | None = None):
    """Returns (out fp32 [B, Hq, Nq, DP], log2-domain LSE [B, Hq, Nq] or None).

    ``kv_tile`` defaults to the kernel's KV tile for this head dim: P is quantized after the
    exponent is shifted by the running max, which depends on the tiling, so the tile is part of
    the algorithm."""
    from .kernel import kv_tile_for

    KV_TILE = kv_tile or kv_tile_for(qf.q_packed.shape[-1] * 2)
    B, Hq, Nq, _ = qf.q_packed.shape
    Hkv, Nk = qf.k_packed.shape[1], qf.seqlen_k
    group = Hq // Hkv
    dev = qf.q_packed.device
    # exact 16-bit operands, multiplied in fp32
    qd = dequantize(qf.q_packed, qf.q_scales, qf.fmt).to(op_dtype).float()
    kd = dequantize(qf.k_packed, qf.k_scales, qf.fmt).to(op_dtype).float().repeat_interleave(group, dim=1)
    vd = dequantize(qf.v_packed, qf.v_scales, qf.fmt).to(op_dtype).float().transpose(-1, -2).repeat_interleave(group, dim=1)
    if delta_s is not None:
        delta_s = expand_block_rows(delta_s, Q_BLOCK, Nq)
    mult = sm_scale * LOG2E
    c = math.log2(TWO_LEVEL_RANGE) if two_level_p else 0.0
    sm = OnlineSoftmax((B, Hq, Nq), Nk, dev, is_causal=is_causal, log2_shift=c)
    acc = torch.zeros(B, Hq, Nq, vd.shape[-1], device=dev)
    with exact_fp32_matmul():
        for j0, j1 in kv_tiles(Nk, KV_TILE):
            s = qd @ kd[:, :, j0:j1].transpose(-1, -2)
            if delta_s is not None:
                s = s + delta_s[..., j0:j1]
            p, alpha = sm.update(sm.mask(s * mult, j0, j1))
            pq = quantize_p(p, qf.fmt).to(op_dtype).float()
            acc = acc * alpha[..., None] + pq @ vd[:, :, j0:j1]
    return sm.normalize(acc), (sm.lse2() if return_lse else None)
