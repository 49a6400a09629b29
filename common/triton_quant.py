"""Triton quantization passes (the GPU side of :mod:`common.int_qk` and of FP8 V).

``quantize_int_kernel``: one program quantizes one tile of ``BLOCK`` tokens x all channels of
one head. It reads the input once, optionally subtracts K's token mean (K smoothing) or the
tile's own token mean (Q smoothing, storing that mean), multiplies by a constant (the
``sm_scale * log2(e)`` folded into Q), and writes int codes (zero-padded to ``DP`` channels)
plus fp32 scales. The arithmetic matches the PyTorch quantizers in :mod:`common.quant` op for
op, so both give identical codes and scales (tested).

Scale groupings (``GRAN``), all within one tile:
  0 per-block:  one scale for the tile (stored per tile)
  1 per-token:  one scale per row                        (stored per token)
  2 per-warp:   rows in groups of ``WARP`` consecutive    (stored per token)
  3 per-thread Q: rows {g + 8r} of each WARP-row slice   (stored per token)
  4 per-thread K: tokens {8m+2t, 8m+2t+1} of the tile    (stored per token)
See :func:`common.quant.groups_per_thread_q` / ``groups_per_thread_k`` for why.

``quantize_v_fp8_kernel``: V - mean (optional) divided by its per-channel scale, rounded to FP8
and written transposed, ``[D, N]`` with tokens contiguous, the layout an FP8 tensor-core MMA
needs for P V (the reduction runs over tokens).
"""

from __future__ import annotations

import triton
import triton.language as tl

GRAN_BLOCK, GRAN_TOKEN, GRAN_WARP, GRAN_THREAD_Q, GRAN_THREAD_K = 0, 1, 2, 3, 4


@triton.jit
def _group_absmax(absmax, BLOCK: tl.constexpr, GRAN: tl.constexpr, WARP: tl.constexpr):
    """Per-row absmax [BLOCK] -> the absmax of each row's group, per row [BLOCK]."""
    if GRAN == 2:
        g = tl.max(tl.reshape(absmax, (BLOCK // WARP, WARP)), axis=1)
        return tl.reshape(tl.broadcast_to(g[:, None], (BLOCK // WARP, WARP)), (BLOCK,))
    elif GRAN == 3:
        g = tl.max(tl.reshape(absmax, (BLOCK // WARP, WARP // 8, 8)), axis=1)
        return tl.reshape(tl.broadcast_to(g[:, None, :], (BLOCK // WARP, WARP // 8, 8)), (BLOCK,))
    elif GRAN == 4:
        g = tl.max(tl.max(tl.reshape(absmax, (BLOCK // 8, 4, 2)), axis=2), axis=0)
        return tl.reshape(tl.broadcast_to(g[None, :, None], (BLOCK // 8, 4, 2)), (BLOCK,))
    else:
        return absmax


@triton.jit
def load_token_tile(X, MEAN, stride_xb, stride_xh, stride_xn, H, N, D,
                    BLOCK: tl.constexpr, DP: tl.constexpr, HAS_MEAN: tl.constexpr):
    """The tile this program quantizes: BLOCK tokens (program id 0) x DP channels of head
    program id 1, as fp32, zero outside [N, D), minus the per-head token mean if HAS_MEAN.
    Returns (x, rows, cols, in_bounds, pid_n, pid_bh)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    rows = pid_n * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, DP)
    in_bounds = (rows[:, None] < N) & (cols[None, :] < D)
    x = tl.load(X + (pid_bh // H) * stride_xb + (pid_bh % H) * stride_xh + rows[:, None] * stride_xn + cols[None, :],
                mask=in_bounds, other=0.0).to(tl.float32)
    if HAS_MEAN:
        x = tl.where(in_bounds, x - tl.load(MEAN + pid_bh * D + cols, mask=cols < D, other=0.0)[None, :], 0.0)
    return x, rows, cols, in_bounds, pid_n, pid_bh


@triton.jit
def subtract_tile_mean(x, in_bounds, cols, BLOCK_MEAN, pid_n, pid_bh, N, D, mult, BLOCK: tl.constexpr):
    """Q smoothing: subtract this tile's token mean (tail rows excluded) and store it times mult."""
    count = tl.minimum(N - pid_n * BLOCK, BLOCK).to(tl.float32)
    bmean = tl.sum(x, axis=0) / count
    tl.store(BLOCK_MEAN + (pid_bh * tl.num_programs(0) + pid_n) * D + cols, bmean * mult, mask=cols < D)
    return tl.where(in_bounds, x - bmean[None, :], 0.0)


@triton.jit
def quantize_int_kernel(X, MEAN, OUT, SCALE, BLOCK_MEAN,
                        stride_xb, stride_xh, stride_xn,
                        H, N, D, mult,
                        BLOCK: tl.constexpr, DP: tl.constexpr, QMAX: tl.constexpr,
                        GRAN: tl.constexpr, WARP: tl.constexpr, HAS_MEAN: tl.constexpr,
                        SMOOTH_BLOCK: tl.constexpr):
    x, rows, cols, in_bounds, pid_n, pid_bh = load_token_tile(X, MEAN, stride_xb, stride_xh, stride_xn, H, N, D,
                                                               BLOCK, DP, HAS_MEAN)
    if SMOOTH_BLOCK:
        x = subtract_tile_mean(x, in_bounds, cols, BLOCK_MEAN, pid_n, pid_bh, N, D, mult, BLOCK)
    x = x * mult
    if GRAN == 0:
        absmax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
        scale = tl.math.div_rn(absmax, QMAX * 1.0)
        tl.store(SCALE + pid_bh * tl.num_programs(0) + pid_n, scale)
        y = tl.math.div_rn(x, tl.where(scale == 0.0, 1.0, scale))
    else:
        absmax = _group_absmax(tl.max(tl.abs(x), axis=1), BLOCK, GRAN, WARP)
        scale = tl.math.div_rn(absmax, QMAX * 1.0)
        tl.store(SCALE + pid_bh * N + rows, scale, mask=rows < N)
        y = tl.math.div_rn(x, tl.where(scale == 0.0, 1.0, scale)[:, None])
    # round half away from zero: add +-0.5, then the float->int conversion truncates
    y = tl.where(y >= 0, y + 0.5, y - 0.5)
    y = tl.minimum(tl.maximum(y, -QMAX * 1.0), QMAX * 1.0)
    tl.store(OUT + (pid_bh * N + rows[:, None]) * DP + cols[None, :], y.to(tl.int8), mask=rows[:, None] < N)


@triton.jit
def round_to_fp8_grid(x, MANT: tl.constexpr, MIN_EXP: tl.constexpr, FMAX: tl.constexpr):
    """Round fp32 to the FP8 grid (nearest even, saturating) with exact fp32 operations.

    Only for Triton's CPU interpreter, whose fp32 -> fp8 conversion truncates: after this the
    conversion is exact, as the GPU's cvt.rn.satfinite is."""
    x = tl.minimum(tl.maximum(x, -FMAX), FMAX)
    e = ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.maximum(e, MIN_EXP) - MANT  # exponent of one unit in the last place
    ulp = ((e + 127) << 23).to(tl.float32, bitcast=True)
    y = x / ulp  # exact: a power of two
    y = (y + 12582912.0) - 12582912.0  # round half to even (|y| < 2^22)
    return y * ulp


@triton.jit
def to_fp8(x, FP8_E5M2: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 -> FP8 E4M3 (or E5M2), round to nearest even, saturating."""
    if FP8_E5M2:
        if INTERPRET:
            x = round_to_fp8_grid(x, 2, -14, 57344.0)
        return x.to(tl.float8e5)
    else:
        if INTERPRET:
            x = round_to_fp8_grid(x, 3, -6, 448.0)
        return x.to(tl.float8e4nv)


@triton.jit
def quantize_v_fp8_kernel(V, MEAN, ABSMAX, SCALE, OUT,
                          stride_vb, stride_vh, stride_vn,
                          H, N, NPAD, D,
                          BLOCK: tl.constexpr, DP: tl.constexpr, HAS_MEAN: tl.constexpr,
                          FP8_E5M2: tl.constexpr, FMAX: tl.constexpr, INTERPRET: tl.constexpr):
    x, rows, cols, in_bounds, pid_n, pid_bh = load_token_tile(V, MEAN, stride_vb, stride_vh, stride_vn, H, N, D,
                                                               BLOCK, DP, HAS_MEAN)
    # scale = absmax / fmax per channel; the first program of each head stores it
    scale = tl.math.div_rn(tl.load(ABSMAX + pid_bh * D + cols, mask=cols < D, other=0.0), FMAX)
    if pid_n == 0:
        tl.store(SCALE + pid_bh * D + cols, scale, mask=cols < D)
    y = tl.math.div_rn(x, tl.where(scale == 0.0, 1.0, scale)[None, :])
    y = tl.where(in_bounds, y, 0.0)
    # transposed store: [DP, NPAD] per head, tokens contiguous (coalesced); padding tokens get zeros
    yt = to_fp8(tl.trans(y), FP8_E5M2, INTERPRET)
    tl.store(OUT + (pid_bh * DP + cols[:, None]) * NPAD + rows[None, :], yt, mask=rows[None, :] < NPAD)
