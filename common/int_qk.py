"""The integer Q,K quantization stage shared by the generations (SageAttention 1, 2 and SageBwd).

``quantize_qk`` turns fp16/bf16 Q and K (HND views) into integer codes plus fp32 scales:

* K smoothing: K <- K - mean_tokens(K) (fp32), fused into the quantization pass.
* Q is multiplied by ``sm_scale * log2(e)`` in fp32 before quantizing, so that
  ``S = int32(Q_hat K_hat^T) * dq * dk`` is already in the log2 domain of an exp2 softmax.
* Granularities: ``per_block`` (Q blocks of ``q_block`` tokens, K blocks of ``k_block``),
  ``per_token``, ``per_tensor``, and the SageAttention2 ``per_warp`` / ``per_thread`` groupings.

Codes are stored contiguous ``[B, H, N, DP]`` (DP = the kernel's padded head dim, padding = 0)
with INT4 codes one per int8. Scales are stored per *group*; ``q_group``/``k_group`` say how a
token maps to its scale for the kernels:

* ``tokens_per_scale = t > 0``: token n uses scale ``n // t`` (per-block, per-token, per-warp,
  per-tensor with t >= N);
* ``tokens_per_scale = 0``: the scale tensor is already expanded to one scale per token.

``backend="triton"`` runs the Triton pass (:mod:`common.triton_quant`) for per-block and
per-token, ``"torch"`` the PyTorch quantizers; both give identical codes and scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import quant
from .smoothing import k_mean

LOG2E = 1.4426950408889634
GRANULARITIES = ("per_block", "per_token", "per_tensor", "per_warp", "per_thread")


@dataclass
class QuantizedQK:
    q_codes: torch.Tensor      # int8 [B, Hq, Nq, DP]
    q_scale: torch.Tensor      # fp32 [B, Hq, Gq]
    q_tokens_per_scale: int    # see module docstring
    k_codes: torch.Tensor      # int8 [B, Hkv, Nk, DP]
    k_scale: torch.Tensor      # fp32 [B, Hkv, Gk]
    k_tokens_per_scale: int
    k_mean: torch.Tensor | None  # fp32 [B, Hkv, 1, D] subtracted from K, or None
    q_multiplier: float        # sm_scale * log2(e)

    def q_scale_per_token(self) -> torch.Tensor:
        return _per_token(self.q_scale, self.q_tokens_per_scale, self.q_codes.shape[-2])

    def k_scale_per_token(self) -> torch.Tensor:
        return _per_token(self.k_scale, self.k_tokens_per_scale, self.k_codes.shape[-2])


def _per_token(scale, tokens_per_scale, n):
    if tokens_per_scale == 0:
        return scale
    idx = torch.arange(n, device=scale.device) // tokens_per_scale
    return scale.index_select(-1, idx)


def padded_head_dim(d: int) -> int:
    """The kernels' head dim: the next power of two >= max(16, d) (tl.dot needs >= 16)."""
    return max(16, 1 << (d - 1).bit_length())


def _pad_codes(codes: torch.Tensor, dp: int) -> torch.Tensor:
    d = codes.shape[-1]
    return codes if d == dp else torch.nn.functional.pad(codes, (0, dp - d))


def _quantize_torch(x, mean, mult, bits, gran, block, dp, warp_rows, k_side):
    xf = x.float()
    if mean is not None:
        xf = xf - mean
    if mult != 1.0:
        xf = xf * torch.tensor(mult, dtype=torch.float32, device=x.device)
    n = x.shape[-2]
    if gran == "per_block" or (gran == "per_warp" and k_side):
        codes, scale = quant.int_per_block(xf, bits, block)
        tps = block
    elif gran == "per_warp":
        codes, scale = quant.int_per_warp(xf, bits, warp_rows)
        tps = warp_rows
    elif gran == "per_token":
        codes, scale = quant.int_per_token(xf, bits)
        tps = 1
    elif gran == "per_tensor":
        codes, scale = quant.int_per_tensor(xf, bits)
        tps = max(n, 1)
    else:  # per_thread
        if k_side:
            codes, grouped = quant.int_per_thread_k(xf, bits, block)
            scale = quant.token_scales(grouped, quant.groups_per_thread_k(n, block, x.device))
        else:
            codes, grouped = quant.int_per_thread_q(xf, bits, block, warp_rows)
            scale = quant.token_scales(grouped, quant.groups_per_thread_q(n, block, warp_rows, x.device))
        tps = 0
    return _pad_codes(codes, dp).contiguous(), scale.contiguous(), tps


def _quantize_triton(x, mean, mult, bits, gran, block, dp):
    from .triton_quant import GRAN_BLOCK, GRAN_TOKEN, quantize_int_kernel

    B, H, N, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    codes = torch.empty(B, H, N, dp, dtype=torch.int8, device=x.device)
    nblk = triton_cdiv(N, block)
    if gran == "per_block":
        scale = torch.empty(B, H, nblk, dtype=torch.float32, device=x.device)
        g, tps = GRAN_BLOCK, block
    else:
        scale = torch.empty(B, H, N, dtype=torch.float32, device=x.device)
        g, tps = GRAN_TOKEN, 1
    mean_arg = mean.reshape(B * H, D).contiguous() if mean is not None else scale
    quantize_int_kernel[(nblk, B * H)](
        x, mean_arg, codes, scale, x.stride(0), x.stride(1), x.stride(2), H, N, D, float(mult),
        BLOCK=block, DP=dp, QMAX=quant.INT_QMAX[bits], GRAN=g, HAS_MEAN=mean is not None,
        num_warps=4 if dp <= 64 else 8)
    return codes, scale, tps


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def quantize_qk(q, k, *, sm_scale: float, smooth_k: bool = True, granularity: str = "per_block",
                bits: int = 8, q_block: int = 128, k_block: int = 64, warp_rows: int = 32,
                backend: str = "torch", k_mean_override: torch.Tensor | None = None) -> QuantizedQK:
    """Quantize HND views of Q ``[B, Hq, Nq, D]`` and K ``[B, Hkv, Nk, D]`` to integer codes.

    ``warp_rows`` is used by ``per_warp``/``per_thread`` (rows of a Q tile owned by one warp).
    ``k_mean_override`` lets a caller supply the mean to subtract (e.g. one mean over a packed
    varlen batch); by default it is the token mean of each (batch, kv head).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"qk_granularity must be one of {list(GRANULARITIES)}, got {granularity!r}")
    dp = padded_head_dim(q.shape[-1])
    km = None
    if smooth_k:
        km = k_mean_override if k_mean_override is not None else k_mean(k)
    mult = sm_scale * LOG2E
    use_triton = backend == "triton" and granularity in ("per_block", "per_token")
    out = []
    for x, mean, m, block, k_side in ((q, None, mult, q_block, False), (k, km, 1.0, k_block, True)):
        if use_triton:
            out.append(_quantize_triton(x, mean, m, bits, granularity, block, dp))
        else:
            out.append(_quantize_torch(x, mean, m, bits, granularity, block, dp, warp_rows, k_side))
    (qc, qs, qt), (kc, ks, kt) = out
    return QuantizedQK(qc, qs, qt, kc, ks, kt, km, mult)
