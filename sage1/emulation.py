"""``backend="torch"``: the SageAttention v1 algorithm in plain PyTorch, tile by tile.

Same quantized inputs as the kernel (:func:`common.int_qk.quantize_qk`), same KV tiling, same
online-softmax update order and fp32 arithmetic, same fp16 rounding of P and V. What PyTorch
cannot express exactly is modelled:

* the INT8 dot: int8 x int8 products summed exactly (in fp64 on CPU; in fp32 on GPU, which is
  exact since |sum| <= 127^2 * D < 2^24 for D <= 1040);
* the fp16-accumulated PV tile product (``pv_accum="fp16"``): an MMA instruction reduces 16 keys
  at a time and rounds its result to fp16, so the emulation adds 16-key partial products (exact
  in fp32) to an fp16 running value, rounding after each step, then adds the tile's fp16 result
  to the fp32 accumulator;
* exp2: PyTorch's exp2 is correctly rounded, the GPU's ex2.approx is within 2 ulp.
"""

from __future__ import annotations

import torch

from common.int_qk import QuantizedQK
from common.reference import exact_fp32_matmul

MMA_K = 16  # keys reduced per fp16-accumulating MMA instruction


def fp16_accumulated_matmul(p16: torch.Tensor, v16: torch.Tensor) -> torch.Tensor:
    """``p16 @ v16`` with an fp16 accumulator rounded after every 16-key MMA step (fp32 result)."""
    acc = None
    for k0 in range(0, p16.shape[-1], MMA_K):
        part = p16[..., k0:k0 + MMA_K].float() @ v16[..., k0:k0 + MMA_K, :].float()
        acc = part.half() if acc is None else (acc.float() + part).half()
    return acc.float()


def attention_emulated(qk: QuantizedQK, v_hnd: torch.Tensor, *, is_causal: bool, pv_accum: str,
                       kv_block: int = 64, return_lse: bool = False):
    """Returns (out fp32 [B, Hq, Nq, D], log2-domain LSE [B, Hq, Nq] or None)."""
    B, Hq, Nq, _ = qk.q_codes.shape
    Hkv, Nk = qk.k_codes.shape[1], qk.k_codes.shape[2]
    group = Hq // Hkv
    dev = v_hnd.device
    int_dt = torch.float64 if dev.type == "cpu" else torch.float32
    qc = qk.q_codes.to(int_dt)
    kc = qk.k_codes.to(int_dt).repeat_interleave(group, dim=1)
    qs = qk.q_scale_per_token()
    ks = qk.k_scale_per_token().repeat_interleave(group, dim=1)
    v16 = v_hnd.to(torch.float16).repeat_interleave(group, dim=1)
    D = v16.shape[-1]

    m = torch.full((B, Hq, Nq), float("-inf"), device=dev)
    l = torch.zeros(B, Hq, Nq, device=dev)
    acc = torch.zeros(B, Hq, Nq, D, device=dev)
    rows = torch.arange(Nq, device=dev)[:, None]
    offset = Nk - Nq
    last_key = Nk if not is_causal else max(0, min(Nk, Nq + offset))
    with exact_fp32_matmul():
        for j0 in range(0, last_key, kv_block):
            j1 = min(Nk, j0 + kv_block)
            s = (qc @ kc[:, :, j0:j1].transpose(-1, -2)).float()
            s = s * (qs[..., :, None] * ks[..., None, j0:j1])
            if is_causal:
                cols = torch.arange(j0, j1, device=dev)[None, :]
                s = s.masked_fill(cols > rows + offset, float("-inf"))
            m_new = torch.maximum(m, s.amax(dim=-1))
            m_use = torch.where(m_new == float("-inf"), 0.0, m_new)
            p = torch.exp2(s - m_use[..., None])
            alpha = torch.exp2(m - m_use)
            l = l * alpha + p.sum(dim=-1)
            p16 = p.half()
            if pv_accum == "fp16":
                pv = fp16_accumulated_matmul(p16, v16[:, :, j0:j1])
            else:
                pv = p16.float() @ v16[:, :, j0:j1].float()
            acc = acc * alpha[..., None] + pv
            m = m_new
    out = acc / torch.where(l == 0, 1.0, l)[..., None]
    lse2 = (m + torch.log2(l)) if return_lse else None
    return out, lse2
