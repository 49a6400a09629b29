"""Guards for inputs whose magnitude would overflow a 16-bit path (the rule, documented in the
README): values are rescaled by powers of two, which is exact in binary floating point (short of
underflow far below anything that changes the result), and the output is scaled back.

* fp16 P V (sage1; sage2 with pv_dtype="fp16"): V must be representable in fp16 (bf16 inputs can
  reach 3e38) and, with fp16 accumulation, a KV tile's sum of p*v (p <= 1, 64 keys per tile,
  so up to 64 max|V|) must stay below fp16's 65504. With m = max|V| over V's finite values (one
  read of V on the device, no host sync), V is multiplied by s_v = 2^floor(log2(2^15 / m)) when
  m > 2^15, P by s_p = 2^floor(log2(960 / (m s_v))) when the accumulation is fp16 and
  m s_v > 960, and the output by 1 / (s_v s_p). The other way, bf16 V far below fp16's range
  (m < 2^-4; fp16's smallest normal is 6e-5, so V ~ 1e-8 would flush to zero) is multiplied by
  s_v = 2^floor(log2(1 / m)) (its max into (1/2, 1]). Inputs within range are untouched (both
  scales are 1). The Triton kernels compute s_v and s_p from m themselves (:func:`guard_scales_tl`), with
  the same exact arithmetic as the emulation (:func:`guard_scales`).
* FP8 P V (sage2) and INT8 Q, K need no guard: their scales are fp32, per channel / block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP16_SAFE = 2.0 ** 15           # |V| kept below this for the fp16 conversion
# |V| (times P's scale) kept at most this for 64-key fp16 accumulation: 64 * 960 = 61440 leaves
# fp16's 65504 room for the partial sums' rounding and a p a hair above 1 (exp2.approx). It was
# 2^10, which a power-of-two max|V| of 1024 or more reached exactly: 64 * 1024 = 65536 -> inf.
FP16_ACC_SAFE = 960.0
_FP16_SAFE = tl.constexpr(FP16_SAFE)
_FP16_ACC_SAFE = tl.constexpr(FP16_ACC_SAFE)


def pow2_at_most_one(limit: float, m: torch.Tensor) -> torch.Tensor:
    """2^floor(log2(limit / m)), at most 1 (1 where m is 0 or not finite); exact: an IEEE
    division and the exponent of the quotient."""
    ok = torch.isfinite(m) & (m > 0)
    x = torch.clamp(torch.div(torch.full_like(m, limit), torch.where(ok, m, torch.ones_like(m))), max=1.0)
    e = torch.frexp(x).exponent - 1                    # floor(log2 x): x = f 2^e', f in [0.5, 1)
    return torch.where(ok, torch.ldexp(torch.ones_like(x), e), torch.ones_like(x))


@triton.jit
def pow2_at_most_one_tl(limit, m):
    """:func:`pow2_at_most_one` in a kernel: the quotient's exponent bits (it is a normal float)."""
    ok = (m > 0.0) & (m < float("inf"))
    x = tl.minimum(tl.math.div_rn(tl.zeros_like(m) + limit, tl.where(ok, m, 1.0)), 1.0)
    e = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    return tl.where(ok, ((e + 127) << 23).to(tl.float32, bitcast=True), 1.0)


TINY_V = 2.0 ** -4  # bf16 V whose max is below this is scaled up for fp16 (see above)
_TINY_V = tl.constexpr(TINY_V)


def fp16_v_scale(m: torch.Tensor) -> torch.Tensor:
    """s_v for bf16 V of max m going to fp16: down below 2^15, or up into (1/2, 1] from below TINY_V."""
    ok = torch.isfinite(m) & (m > 0)
    up = torch.clamp(torch.div(torch.ones_like(m), torch.where(ok, m, torch.ones_like(m))), max=2.0 ** 126)
    up = torch.ldexp(torch.ones_like(up), torch.frexp(up).exponent - 1)  # 2^floor(log2(1 / m))
    return torch.where(ok & (m < TINY_V), up, pow2_at_most_one(FP16_SAFE, m))


def guard_scales(m: torch.Tensor, *, rescale_v: bool, fp16_accumulation: bool):
    """(s_v, s_p) for max|V| = m (fp32 0-dim): s_v = 1 unless V is converted to fp16 here."""
    one = torch.ones_like(m)
    s_v = fp16_v_scale(m) if rescale_v else one
    s_p = pow2_at_most_one(FP16_ACC_SAFE, m * s_v) if fp16_accumulation else one
    return s_v, s_p


@triton.jit
def guard_scales_tl(m, RESCALE_V: tl.constexpr, FP16_ACC: tl.constexpr):
    """:func:`guard_scales` in a kernel: (s_v, s_p)."""
    if RESCALE_V:
        ok = (m > 0.0) & (m < _TINY_V)  # (fp16_v_scale: up from below TINY_V)
        up = tl.minimum(tl.math.div_rn(tl.zeros_like(m) + 1.0, tl.where(ok, m, 1.0)), 2.0 ** 126)
        up = (((up.to(tl.int32, bitcast=True) >> 23) & 0xFF) << 23).to(tl.float32, bitcast=True)
        s_v = tl.where(ok, up, pow2_at_most_one_tl(_FP16_SAFE, m))
    else:
        s_v = tl.zeros_like(m) + 1.0
    if FP16_ACC:
        s_p = pow2_at_most_one_tl(_FP16_ACC_SAFE, m * s_v)
    else:
        s_p = tl.zeros_like(m) + 1.0
    return s_v, s_p


def to_fp16_for_pv(v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """V in fp16 for a fp16 P V product: fp16 V as it is; other dtypes times s_v (see above)."""
    if v.dtype == torch.float16:
        return v
    s_v, _ = guard_scales(m, rescale_v=True, fp16_accumulation=False)
    return (v * s_v.to(v.dtype)).to(torch.float16)


def fp16_pv_guard(v: torch.Tensor, fp16_accumulation: bool):
    """(v in fp16, scales fp32 [2] = (P's scale, the output's scale)) for a fp16 P V product, with
    tensor ops (the emulations; V is expected finite: common.nonfinite zeroes it first)."""
    m = torch.linalg.vector_norm(v, ord=float("inf"), dtype=torch.float32)
    s_v, s_p = guard_scales(m, rescale_v=v.dtype != torch.float16, fp16_accumulation=fp16_accumulation)
    return to_fp16_for_pv(v, m), torch.stack([s_p, 1.0 / (s_v * s_p)])


def finite_absmax(v: torch.Tensor, amax_bits: torch.Tensor, *, per_channel: bool, mean: torch.Tensor | None = None,
                  flags=None) -> torch.Tensor:
    """max |v - mean| over v's finite values (Triton, one read of an HND view ``[B, H, N, D]``):
    fp32 ``[B, H, D]`` per channel, or ``[]`` for the whole tensor. ``amax_bits``: a zeroed int32
    buffer of that many entries (common.nonfinite.kernel_buffers), returned as its fp32 view. With
    ``flags`` the same read records V's first non-finite key per (batch, head)."""
    from .triton_quant import scan_v_kernel

    B, H, N, D = v.shape
    if v.stride(-1) != 1:
        v = v.contiguous()
    # tiles per program: one atomic per channel for each 512 tokens; two warps (H100, B=4 H=32 D=128:
    # 190 us at 16k against 255 with four, the occupancy of smaller programs; csrc/NOTES.md, v13.1)
    block, tiles = 64, 8
    dp = max(16, 1 << (D - 1).bit_length())
    scan_v_kernel[(-(-N // (block * tiles)), B * H)](
        v, mean.reshape(B * H, D).contiguous() if mean is not None else v, amax_bits,
        flags.first_bad if flags is not None else amax_bits, v.stride(0), v.stride(1), v.stride(2), H, N, D,
        BLOCK=block, DP=dp, HAS_MEAN=mean is not None, PER_CHANNEL=per_channel, FLAG=flags is not None,
        TILES=tiles, num_warps=2)
    m = amax_bits.view(torch.float32)
    return m.view(B, H, D) if per_channel else m.view(())
