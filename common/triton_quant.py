"""Triton quantization passes for Q and K (fused mean subtraction, scale folding, INT8/INT4 codes).

One program quantizes one tile of ``BLOCK`` tokens x all channels of one head: it reads the
input once, subtracts the token mean (K smoothing) if given, multiplies by a constant (the
``sm_scale * log2(e)`` folded into Q), and writes int8 codes (zero-padded to ``DP`` channels, the
kernel's head dim) plus fp32 scales. The arithmetic is the same, op for op, as the PyTorch
quantizers in :mod:`common.quant`, so both produce identical codes and scales (tested).

Granularities computed here (``GRAN``): 0 = one scale per tile (per-block), 1 = one scale per
token (per-token). Others are computed by the PyTorch quantizers.
"""

from __future__ import annotations

import triton
import triton.language as tl

GRAN_BLOCK = 0
GRAN_TOKEN = 1


@triton.jit
def quantize_int_kernel(X, MEAN, OUT, SCALE,
                        stride_xb, stride_xh, stride_xn,
                        H, N, D, mult,
                        BLOCK: tl.constexpr, DP: tl.constexpr, QMAX: tl.constexpr,
                        GRAN: tl.constexpr, HAS_MEAN: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_n * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, DP)
    in_bounds = (rows[:, None] < N) & (cols[None, :] < D)
    x = tl.load(X + b * stride_xb + h * stride_xh + rows[:, None] * stride_xn + cols[None, :],
                mask=in_bounds, other=0.0).to(tl.float32)
    if HAS_MEAN:
        mean = tl.load(MEAN + pid_bh * D + cols, mask=cols < D, other=0.0)
        x = tl.where(in_bounds, x - mean[None, :], 0.0)
    x = x * mult
    if GRAN == 0:
        absmax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
        scale = tl.math.div_rn(absmax, QMAX * 1.0)
        tl.store(SCALE + pid_bh * tl.num_programs(0) + pid_n, scale)
        y = tl.math.div_rn(x, tl.where(scale == 0.0, 1.0, scale))
    else:
        absmax = tl.max(tl.abs(x), axis=1)
        scale = tl.math.div_rn(absmax, QMAX * 1.0)
        tl.store(SCALE + pid_bh * N + rows, scale, mask=rows < N)
        y = tl.math.div_rn(x, tl.where(scale == 0.0, 1.0, scale)[:, None])
    # round half away from zero: add +-0.5, then the float->int conversion truncates
    y = tl.where(y >= 0, y + 0.5, y - 0.5)
    y = tl.minimum(tl.maximum(y, -QMAX * 1.0), QMAX * 1.0)
    tl.store(OUT + (pid_bh * N + rows[:, None]) * DP + cols[None, :], y.to(tl.int8), mask=rows[:, None] < N)
