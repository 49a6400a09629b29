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
from common.mma import fp16_accumulated_matmul
from common.online_softmax import OnlineSoftmax, kv_tiles
from common.reference import exact_fp32_matmul


def attention_emulated(qk: QuantizedQK, v_hnd: torch.Tensor, *, is_causal: bool, pv_accum: str,
                       kv_block: int = 64, return_lse: bool = False, bias2: torch.Tensor | None = None,
                       pv_scales: torch.Tensor | None = None):
    """Returns (out fp32 [B, Hq, Nq, D], log2-domain LSE [B, Hq, Nq] or None). ``bias2``: the
    log2-domain mask of common.masking.dense_mask (attn_mask, lengths and causal), if any."""
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

    sm = OnlineSoftmax((B, Hq, Nq), Nk, dev, is_causal=is_causal, bias2=bias2)
    p_scale, out_scale = (pv_scales[0], pv_scales[1]) if pv_scales is not None else (1.0, 1.0)  # range_guard
    acc = torch.zeros(B, Hq, Nq, D, device=dev)
    with exact_fp32_matmul():
        for j0, j1 in kv_tiles(Nk, kv_block):
            s = (qc @ kc[:, :, j0:j1].transpose(-1, -2)).float()
            s = s * (qs[..., :, None] * ks[..., None, j0:j1])
            p, alpha = sm.update(sm.mask(s, j0, j1))
            p16 = (p * p_scale).half()
            if pv_accum == "fp16":
                pv = fp16_accumulated_matmul(p16, v16[:, :, j0:j1])
            else:
                pv = p16.float() @ v16[:, :, j0:j1].float()
            acc = acc * alpha[..., None] + pv
    return sm.normalize(acc) * out_scale, (sm.lse2() if return_lse else None)
