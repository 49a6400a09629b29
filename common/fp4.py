"""FP4 (E2M1) microscaling quantizers: NVFP4 and MXFP4, with packing of two codes per byte.

E2M1 is 1 sign, 2 exponent (bias 1) and 1 mantissa bit, with no Inf/NaN. Its magnitudes are
``{0, 0.5, 1, 1.5, 2, 3, 4, 6}``; a 4-bit code is ``sign << 3 | magnitude_index``.

* NVFP4: blocks of 16 consecutive elements along the reduction dimension (dim -1 here), one
  E4M3 scale each: ``s = absmax / 6`` cast to E4M3 (round to nearest even, saturating at 448).
* MXFP4: blocks of 32, one E8M0 (power of two) scale each: ``s = 2**(floor(log2 absmax) - 2)``
  (the OCP MX rule: 2 is the largest exponent of E2M1), elements saturate at 6.

Every E2M1 value times an E4M3 or an in-range E8M0 scale is exactly representable in FP16 and
BF16 (at most 6 significant bits, magnitude in [2^-10, 2688] for E4M3 scales), which is why
kernels on GPUs without FP4 tensor cores can reproduce FP4 matmuls exactly with 16-bit operands.
"""

from __future__ import annotations

import torch

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
E4M3_MAX = 448.0
NVFP4_BLOCK = 16
MXFP4_BLOCK = 32

# Round to nearest, ties to the even code (codes 0, 2, 4, 6 = values 0, 1, 2, 4):
# index = number of thresholds passed, with ">" where the tie goes down and ">=" where it goes up.
_TIE_DOWN = (0.25, 1.25, 2.5, 5.0)
_TIE_UP = (0.75, 1.75, 3.5)


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Round ``x`` to E2M1 (nearest, ties to even, saturating at +-6): uint8 codes 0..15."""
    a = x.float().abs()
    idx = torch.zeros_like(a, dtype=torch.uint8)
    for t in _TIE_DOWN:
        idx += (a > t).to(torch.uint8)
    for t in _TIE_UP:
        idx += (a >= t).to(torch.uint8)
    return idx | ((x < 0).to(torch.uint8) << 3)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8, 0..15) to fp32 values."""
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    mag = lut[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -mag, mag)


def e2m1_round(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded onto the E2M1 grid (fp32)."""
    return e2m1_decode(e2m1_encode(x))


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    if x.shape[-1] % block:
        raise ValueError(f"the last dimension ({x.shape[-1]}) must be a multiple of the block size {block}")
    return x.float().reshape(*x.shape[:-1], x.shape[-1] // block, block)


def e4m3_round_scale(s: torch.Tensor) -> torch.Tensor:
    """Cast fp32 scales to E4M3 (RNE, saturating at 448); returns the float8 tensor."""
    return s.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)


def nvfp4_quantize(x: torch.Tensor, *, divide_by_rounded_scale: bool = True):
    """NVFP4: 1x16 blocks along dim -1, E4M3 scale ``absmax/6`` per block.

    ``divide_by_rounded_scale=True`` (Q, K, V in SageAttention3): elements are divided by the
    E4M3-rounded scale, correctly rounded (the Triton and CUDA paths do the same). The paper writes
    ``x * (1/s8)``; the product with a rounded reciprocal lands differently on an E2M1 rounding
    boundary now and then (17 of 262144 codes on randn, one step each). ``False`` (P in the
    SageAttention3 kernel): by the unrounded fp32 scale, while the stored scale is still the E4M3
    one. A block whose E4M3 scale is 0 quantizes to 0.
    Returns (codes uint8 ``[..., D]``, scales float8_e4m3fn ``[..., D/16]``).
    """
    xb = _blocks(x, NVFP4_BLOCK)
    amax = xb.abs().amax(dim=-1)
    s = amax / torch.full_like(amax, E2M1_MAX)  # a tensor divisor: correctly rounded on CUDA too
    s8 = e4m3_round_scale(s)
    div = s8.float() if divide_by_rounded_scale else s
    div = torch.where(s8.float() == 0, torch.full_like(div, float("inf")), div)
    codes = e2m1_encode(xb / div[..., None])
    return codes.reshape(x.shape), s8


def mxfp4_quantize(x: torch.Tensor):
    """MXFP4: 1x32 blocks along dim -1, E8M0 scale ``2**(floor(log2 absmax) - 2)`` per block.

    Returns (codes uint8 ``[..., D]``, biased exponents uint8 ``[..., D/32]``: scale = 2**(e-127)).
    An all-zero (or below 2**-125) block gets exponent byte 0 and zero codes.
    """
    xb = _blocks(x, MXFP4_BLOCK)
    amax = xb.abs().amax(dim=-1)
    exp = torch.floor(torch.log2(amax)) - 2
    exp = torch.where(amax > 0, exp, torch.full_like(exp, -127.0)).clamp(-127, 127)
    div = torch.where(exp > -127, torch.exp2(exp), torch.full_like(exp, float("inf")))  # exponent byte 0: block is 0
    codes = e2m1_encode(xb / div[..., None])
    return codes.reshape(x.shape), (exp + 127).to(torch.uint8)


def nvfp4_dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    vals = e2m1_decode(codes)
    vb = vals.reshape(*vals.shape[:-1], vals.shape[-1] // NVFP4_BLOCK, NVFP4_BLOCK)
    return (vb * scales.float()[..., None]).reshape(vals.shape)


def mxfp4_dequantize(codes: torch.Tensor, exps: torch.Tensor) -> torch.Tensor:
    vals = e2m1_decode(codes)
    vb = vals.reshape(*vals.shape[:-1], vals.shape[-1] // MXFP4_BLOCK, MXFP4_BLOCK)
    return (vb * torch.exp2(exps.float() - 127)[..., None]).reshape(vals.shape)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte along dim -1: element 2i in the low nibble, 2i+1 in the high."""
    if codes.shape[-1] % 2:
        raise ValueError(f"the last dimension must be even to pack, got {codes.shape[-1]}")
    c = codes.to(torch.uint8)
    return (c[..., 0::2] & 0xF) | ((c[..., 1::2] & 0xF) << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_fp4`."""
    lo = packed & 0xF
    hi = packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
