"""The integer Q,K quantization stage shared by the generations (SageAttention 1, 2 and SageBwd).

``quantize_qk`` turns fp16/bf16 Q and K (HND views) into integer codes plus fp32 scales:

* K smoothing: K <- K - mean_tokens(K) (fp32), fused into the quantization pass.
* Q smoothing (SageAttention2): each block of ``q_block`` query tokens loses its token mean; the
  means (times the folded constant) are returned so that the attention can add back
  ``delta_s = q_mean . (K - k_mean)^T`` before the softmax (:func:`common.smoothing.q_smoothing_delta_s`).
* Q is multiplied by ``sm_scale * log2(e)`` in fp32 before quantizing, so that
  ``S = int32(Q_hat K_hat^T) * dq * dk`` is already in the log2 domain of an exp2 softmax.
* INT8 (``bits=8``, codes in [-127, 127]) or INT4 (``bits=4``, codes in [-7, 7], one per int8:
  multiplied on INT8 tensor cores, the result is exactly that of an INT4 matmul).
* Granularities: ``per_block`` (Q blocks of ``q_block`` tokens, K blocks of ``k_block``),
  ``per_token``, ``per_tensor``, ``per_warp`` (Q groups of ``warp_rows`` rows, K per block) and
  ``per_thread`` (the MMA-fragment groupings of :func:`common.quant.groups_per_thread_q` and
  ``groups_per_thread_k`` over Q tiles of ``q_block`` and K tiles of ``k_block``).

Codes are stored contiguous ``[B, H, N, DP]`` (DP = the kernel's padded head dim, padding = 0).
Scales are stored per *group*; ``tokens_per_scale = t > 0`` means token n uses scale ``n // t``
(per-block, per-token, per-tensor with t >= N); ``t = 0`` means one scale per token already
(per-warp, per-thread).

``backend="triton"`` runs the Triton pass (:mod:`common.triton_quant`) for every granularity but
per-tensor; ``"torch"`` runs the PyTorch quantizers. Codes and scales are identical (tested);
with Q smoothing the block means are summed in a different order, so a code may differ by one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import quant
from .nonfinite import NO_BAD_KEY, NonfiniteFlags, finite_mean
from .smoothing import expand_block_rows, k_mean, q_block_means

LOG2E = 1.4426950408889634
GRANULARITIES = ("per_block", "per_token", "per_tensor", "per_warp", "per_thread")


@dataclass
class QuantizedQK:
    q_codes: torch.Tensor | None  # int8 [B, Hq, Nq, DP] (None: Q left to the kernel, quantize_q=False)
    q_scale: torch.Tensor | None  # fp32 [B, Hq, Gq]
    q_tokens_per_scale: int    # see module docstring
    k_codes: torch.Tensor      # int8 [B, Hkv, Nk, DP]
    k_scale: torch.Tensor      # fp32 [B, Hkv, Gk]
    k_tokens_per_scale: int
    k_mean: torch.Tensor | None  # fp32 [B, Hkv, 1, D] subtracted from K, or None
    q_multiplier: float        # sm_scale * log2(e)
    q_block_mean: torch.Tensor | None = None  # fp32 [B, Hq, ceil(Nq/q_block), D], times q_multiplier
    q_block: int = 0           # token block of the Q means

    def q_scale_per_token(self) -> torch.Tensor:
        return scale_per_token(self.q_scale, self.q_tokens_per_scale, self.q_codes.shape[-2])

    def k_scale_per_token(self) -> torch.Tensor:
        return scale_per_token(self.k_scale, self.k_tokens_per_scale, self.k_codes.shape[-2])


def scale_per_token(scale, tokens_per_scale, n):
    """Scales stored per group -> one per token (see the module docstring for ``tokens_per_scale``)."""
    if tokens_per_scale == 0 or (tokens_per_scale == 1 and scale.shape[-1] == n):
        # already one per token (the gather below would copy it: three launches, ~15 us of a 2k call)
        return scale
    idx = torch.arange(n, device=scale.device) // tokens_per_scale
    return scale.index_select(-1, idx)


def padded_head_dim(d: int) -> int:
    """The kernels' head dim: the next power of two >= max(32, d) (an INT8 tl.dot needs a
    reduction of at least 32; the padding channels are zeros)."""
    return max(32, 1 << (d - 1).bit_length())


def _pad_codes(codes: torch.Tensor, dp: int) -> torch.Tensor:
    d = codes.shape[-1]
    return codes if d == dp else torch.nn.functional.pad(codes, (0, dp - d))


def _record_nonfinite_torch(x, flags: NonfiniteFlags, k_side: bool):
    """What the Triton pass records (common.triton_quant.zero_bad_tokens), with tensor ops."""
    bad = ~torch.isfinite(x).all(-1)                                      # [B, H, N]
    if not k_side:
        flags.q_bad.copy_(bad)
        return
    n = x.shape[-2]
    first = torch.where(bad, torch.arange(n, device=x.device, dtype=torch.int32), NO_BAD_KEY).amin(-1).flatten()
    torch.maximum(flags.first_bad, NO_BAD_KEY - first, out=flags.first_bad)


def _quantize_torch(x, mean, smooth_block, mult, bits, gran, block, dp, warp_rows, k_side, zero, flags):
    if flags is not None:
        _record_nonfinite_torch(x, flags, k_side)
    xf = x.float()
    bad = None
    if zero:  # a token with a NaN/Inf becomes a zero row, before and after smoothing (as the Triton pass)
        bad = ~torch.isfinite(xf).all(-1, keepdim=True)
        xf = xf.masked_fill(bad, 0.0)
    block_mean = None
    if mean is not None:
        xf = xf - mean
    if smooth_block:
        bm = q_block_means(xf, block)
        xf = xf - expand_block_rows(bm, block, x.shape[-2])
        block_mean = bm * torch.tensor(mult, dtype=torch.float32, device=x.device)
    if mult != 1.0:
        xf = xf * torch.tensor(mult, dtype=torch.float32, device=x.device)
    if bad is not None:
        xf = xf.masked_fill(bad, 0.0)
    n = x.shape[-2]
    if gran == "per_block" or (gran == "per_warp" and k_side):
        codes, scale = quant.int_per_block(xf, bits, block)
        tps = block
    elif gran == "per_warp":
        codes, grouped = quant.int_per_warp(xf, bits, warp_rows)
        scale, tps = quant.token_scales(grouped, quant.groups_per_block(n, warp_rows, x.device)), 0
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
    return _pad_codes(codes, dp).contiguous(), scale.contiguous(), tps, block_mean


_TRITON_GRAN = {"per_block": 0, "per_token": 1, "per_warp": 2, "per_thread": 3}


def _quantize_triton(x, mean, smooth_block, mult, bits, gran, block, dp, warp_rows, k_side, zero, flags):
    from .checks import interpreter_enabled
    from .triton_quant import quantize_int_kernel

    B, H, N, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    codes = torch.empty(B, H, N, dp, dtype=torch.int8, device=x.device)
    nblk = -(-N // block)
    g = _TRITON_GRAN[gran]
    if k_side and gran == "per_warp":
        g = 0  # SageAttention2's per-warp mode quantizes K per block
    if k_side and gran == "per_thread":
        g = 4
    scale = torch.empty(B, H, nblk if g == 0 else N, dtype=torch.float32, device=x.device)
    tps = block if g == 0 else (1 if g == 1 else 0)
    block_mean = torch.empty(B, H, nblk, D, dtype=torch.float32, device=x.device) if smooth_block else scale
    mean_arg = mean.reshape(B * H, D).contiguous() if mean is not None else scale
    quantize_int_kernel[(nblk, B * H)](
        x, mean_arg, codes, scale, block_mean,
        flags.q_bad if flags is not None else codes, flags.first_bad if flags is not None else codes,
        x.stride(0), x.stride(1), x.stride(2), H, N, D, float(mult),
        BLOCK=block, DP=dp, QMAX=quant.INT_QMAX[bits], GRAN=g, WARP=warp_rows, HAS_MEAN=mean is not None,
        SMOOTH_BLOCK=smooth_block, ZERO=zero, FLAGS=0 if flags is None else (2 if k_side else 1),
        INTERPRET=interpreter_enabled(),
        num_warps=4 if dp * block <= 8192 else 8)
    return codes, scale, tps, (block_mean if smooth_block else None)


def quantize_qk(q, k, *, sm_scale: float, smooth_k: bool = True, smooth_q: bool = False,
                granularity: str = "per_block", bits: int = 8, q_block: int = 128, k_block: int = 64,
                warp_rows: int = 32, backend: str = "torch",
                k_mean_override: torch.Tensor | None = None, zero_nonfinite: bool = False,
                flags: NonfiniteFlags | None = None, quantize_q: bool = True,
                k_quantized: tuple | None = None) -> QuantizedQK:
    """Quantize HND views of Q ``[B, Hq, Nq, D]`` and K ``[B, Hkv, Nk, D]`` to integer codes.

    ``k_mean_override`` lets a caller supply the mean to subtract (e.g. one mean over a packed
    varlen batch); by default it is the token mean of each (batch, kv head).
    ``zero_nonfinite``: a token holding a NaN/Inf is quantized as a zero row (a non-finite channel
    of K's mean counts as 0); ``flags``: where to record them (common.nonfinite).
    ``quantize_q=False``: K only (a kernel that quantizes Q itself, sage2.cuda); the Q fields are None.
    ``k_quantized``: K already quantized elsewhere, ``(codes, scale per key, mean)`` (sage2.cuda's
    one-read K/V pass); only Q is quantized here.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"qk_granularity must be one of {list(GRANULARITIES)}, got {granularity!r}")
    dp = padded_head_dim(q.shape[-1])
    km = None
    if k_quantized is not None:
        km = k_quantized[2]
    elif smooth_k:
        km = k_mean_override if k_mean_override is not None else k_mean(k)
        if zero_nonfinite:
            km = finite_mean(km)
    mult = sm_scale * LOG2E
    fn = _quantize_triton if backend == "triton" and granularity != "per_tensor" else _quantize_torch
    z = zero_nonfinite
    qc, qs, qt, qbm = None, None, 0, None
    if quantize_q:
        qc, qs, qt, qbm = fn(q, None, smooth_q, mult, bits, granularity, q_block, dp, warp_rows, False, z, flags)
    if k_quantized is not None:
        (kc, ks, _), kt = k_quantized, 1
    else:
        kc, ks, kt, _ = fn(k, km, False, 1.0, bits, granularity, k_block, dp, warp_rows, True, z, flags)
    return QuantizedQK(qc, qs, qt, kc, ks, kt, km, mult, qbm, q_block if smooth_q else 0)


def quantize_token_blocks(x: torch.Tensor, *, block: int, backend: str, bits: int = 8):
    """INT codes ``[B, H, N, DP]`` and fp32 scales ``[B, H, ceil(N/block)]`` of an HND tensor, one
    scale per ``block`` tokens (SageBwd's V and dO). Same pass and rules as Q and K above."""
    fn = _quantize_triton if backend == "triton" else _quantize_torch
    codes, scale, _, _ = fn(x, None, False, 1.0, bits, "per_block", block, padded_head_dim(x.shape[-1]), 32, False,
                            False, None)
    return codes, scale
