"""Guards for inputs whose magnitude would overflow a 16-bit path (the rule, documented in the
README): values are rescaled by powers of two, which is exact in binary floating point (short of
underflow far below anything that changes the result), and the output is scaled back.

* fp16 P V (sage1; sage2 with pv_dtype="fp16"): V must be representable in fp16 (bf16 inputs can
  reach 3e38) and, with fp16 accumulation, a KV tile's sum of p*v (p <= 1, 64 keys per tile,
  so up to 64 max|V|) must stay below fp16's 65504. With m = max|V| (one read of V on the device,
  no host sync), V is multiplied by s_v = 2^floor(log2(2^15 / m)) when m > 2^15, P by
  s_p = 2^floor(log2(2^10 / (m s_v))) when the accumulation is fp16 and m s_v > 2^10, and the
  output by 1 / (s_v s_p). Inputs within range are untouched (both scales are 1).
* FP8 P V (sage2) and INT8 Q, K need no guard: their scales are fp32, per channel / block.
"""

from __future__ import annotations

import torch

FP16_SAFE = 2.0 ** 15           # |V| kept below this for the fp16 conversion
FP16_ACC_SAFE = 2.0 ** 10       # |V| (times P's scale) kept below this for 64-key fp16 accumulation


def _pow2_at_most_one(limit: float, m: torch.Tensor) -> torch.Tensor:
    return torch.exp2(torch.clamp(torch.floor(torch.log2(limit / m)), max=0.0))


def fp16_pv_guard(v: torch.Tensor, fp16_accumulation: bool):
    """(v in fp16, scales fp32 [2] = (P's scale, the output's scale)) for a fp16 P V product."""
    m = torch.linalg.vector_norm(v, ord=float("inf"), dtype=torch.float32)
    m = torch.where(torch.isfinite(m) & (m > 0), m, torch.ones_like(m))  # NaN/Inf inputs: no rescaling
    s_v = _pow2_at_most_one(FP16_SAFE, m)
    v16 = v.to(torch.float16) if v.dtype == torch.float16 else (v * s_v.to(v.dtype)).to(torch.float16)
    if v.dtype == torch.float16:
        s_v = torch.ones_like(s_v)  # fp16 V is representable as it is
    s_p = _pow2_at_most_one(FP16_ACC_SAFE, m * s_v) if fp16_accumulation else torch.ones_like(m)
    return v16, torch.stack([s_p, 1.0 / (s_v * s_p)])
