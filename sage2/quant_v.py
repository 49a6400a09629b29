"""P and V precision for SageAttention2: FP8 V with one scale per channel, optionally smoothed.

V is quantized per channel over all tokens (``scale = absmax / fmax``; fmax = 448 for E4M3,
57344 for E5M2): only outer-axis scales factor out of ``P V``, and a channel scale is what
handles V's channel outliers. The Triton kernel reads V transposed, ``[D, N]`` with tokens
contiguous, because an FP8 tensor-core MMA needs both operands contiguous along the reduction
dimension (the keys); the quantization pass writes that layout for free.

``smooth_v``: V <- V - mean_tokens(V) first; the kernel adds the mean back to the output
(rows of P sum to 1).

NaN/Inf (``zero_nonfinite``, common.nonfinite): they count as 0 in the scales and the codes, and
the Triton scan records V's first bad key per head in ``flags``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common import quant
from common.checks import interpreter_enabled
from common.nonfinite import finite_mean, zeroed
from common.range_guard import finite_absmax
from common.smoothing import v_channel_mean

P_SCALE = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0, "fp16": 1.0}
FP8_FMT = {"fp8_e4m3": "e4m3", "fp8_e5m2": "e5m2"}


@dataclass
class QuantizedV:
    codes: torch.Tensor          # fp8 [B, H, N, D] (torch) or [B, H, DP, NPAD] transposed (triton); fp16 V for pv_dtype="fp16"
    scale: torch.Tensor | None   # fp32 [B, H, D] (for fp16: the range guard's power of two, usually 1)
    mean: torch.Tensor | None    # fp32 [B, H, 1, D] (smooth_v) or None
    transposed: bool


def channel_absmax(x: torch.Tensor) -> torch.Tensor:
    """Per-channel ``max_tokens |x|`` (fp32 [B, H, D]) in one read, without an fp32 copy."""
    return torch.linalg.vector_norm(x, ord=float("inf"), dim=-2, dtype=torch.float32)


def quantize_v(v: torch.Tensor, pv_dtype: str, *, smooth_v: bool, backend: str, dp: int = 0,
               npad_multiple: int = 16, zero_nonfinite: bool = False, flags=None,
               amax_bits: torch.Tensor | None = None, wgmma_key_order: bool = False) -> QuantizedV:
    """Quantize an HND view of V for P V in ``pv_dtype`` (fp8_e4m3, fp8_e5m2, fp16).
    ``wgmma_key_order`` (Triton FP8 pass only): store each 32 keys of V^T in the order the CUDA
    Hopper kernel holds P in registers (see csrc/sage2_sm90/attention.cu; :func:`wgmma_key_position`).
    ``amax_bits``: a zeroed int32 buffer of B*H*D entries for the Triton scan of FP8 V (allocated if None)."""
    B, H, N, D = v.shape
    mean = v_channel_mean(v) if smooth_v else None
    if mean is not None and zero_nonfinite:
        mean = finite_mean(mean)
    fp8 = pv_dtype != "fp16"
    if backend == "triton" and (flags is not None or fp8):
        # |V - mean| over finite values per channel (FP8's scales); for fp16 P V only V's flags are wanted
        if amax_bits is None:
            amax_bits = torch.zeros(B * H * D if fp8 else 1, dtype=torch.int32, device=v.device)
        absmax = finite_absmax(v, amax_bits, per_channel=fp8, mean=mean, flags=flags)
    if pv_dtype == "fp16":  # bf16 V beyond fp16's range is scaled by a power of two (common.range_guard)
        from common.range_guard import fp16_pv_guard

        centred = zeroed(v) if zero_nonfinite else v
        v16, scales = fp16_pv_guard(centred if mean is None else centred.float() - mean, fp16_accumulation=False)
        return QuantizedV(v16, scales[1].expand(B, H, D).contiguous(), mean, False)
    fmt = FP8_FMT[pv_dtype]
    fmax = quant.FP8_FORMATS[fmt][1]
    if backend != "triton":
        centred = zeroed(v) if zero_nonfinite else v
        centred = centred if mean is None else centred.float() - mean
        absmax = channel_absmax(centred)
        scale = absmax / torch.full_like(absmax, fmax)
        return QuantizedV(quant.fp8_static(centred, fmt, scale[..., None, :]), scale, mean, False)
    from common.triton_quant import quantize_v_fp8_kernel

    if v.stride(-1) != 1:
        v = v.contiguous()
    npad = -(-N // npad_multiple) * npad_multiple
    dtype = quant.FP8_FORMATS[fmt][0]
    out = torch.empty(B, H, dp, npad, dtype=dtype, device=v.device)
    scale = torch.empty(B, H, D, dtype=torch.float32, device=v.device)
    block = 32  # (H100, B=4 H=32 D=128: 305 us at 16k against 323 with 64 tokens, 47 against 53 at 2k)
    quantize_v_fp8_kernel[(-(-npad // block), B * H)](
        v, mean.reshape(B * H, D).contiguous() if mean is not None else scale, absmax, scale, out,
        v.stride(0), v.stride(1), v.stride(2), H, N, npad, D,
        BLOCK=block, DP=dp, HAS_MEAN=mean is not None, FP8_E5M2=fmt == "e5m2", FMAX=fmax,
        INTERPRET=interpreter_enabled(), ZERO=zero_nonfinite, WGMMA_KEY_ORDER=wgmma_key_order, num_warps=4)
    return QuantizedV(out, scale, mean, True)


def wgmma_key_position(n: torch.Tensor) -> torch.Tensor:
    """Where key ``n`` sits in V^T stored with ``wgmma_key_order``: within each 32 keys, slot
    ``4t + j`` (and ``16 + 4t + j``) holds the key that lane ``t`` of the S accumulator owns
    ``j``-th: keys ``2t, 2t+1, 2t+8, 2t+9`` (and 16 more)."""
    r = n % 32
    return n - r + (r // 16) * 16 + ((r % 8) // 2) * 4 + ((r % 16) // 8) * 2 + r % 2
