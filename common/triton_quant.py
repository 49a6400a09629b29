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

``scan_v_kernel``: max |V - mean| over the finite values, per channel (sage2's FP8 scales) or of
the whole tensor (sage1's fp16 range guard), in the same read that flags V's non-finite keys.

Division by the scales: every code is ``round(x / scale)`` with ``x / scale`` correctly rounded
(as PyTorch's division), but on the GPU not by a division per value (:func:`div_by_scale`).

NaN/Inf (``ZERO``, see :mod:`common.nonfinite`), so that one bad value cannot spoil its block's
scale or mean: the Q/K pass finds them in the row absmax the scales need anyway (a NaN counts as
+inf) and quantizes such a token as a zero row; the V passes count non-finite values as 0. Where
they were is recorded (``FLAGS``): per query token, or the first bad key of each (batch, kv head),
which the attention kernels read to set SDPA's NaN rows themselves. No host ever waits for a check.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .nonfinite import NO_BAD_KEY

_NO_BAD_KEY = tl.constexpr(NO_BAD_KEY)
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
def div_by_scale(x, scale, INTERPRET: tl.constexpr):
    """``x / scale`` correctly rounded, for finite x and finite scale > 0 (broadcast against x: one
    per row or channel). A correctly rounded division per value (div.rn, a branchy subroutine) made
    the Q/K and V passes run at half the copy speed. Instead: inv = RN(1 / scale) once per row, q0 =
    x * inv (within 1.5 ulps of x / scale), and two corrections q + RN(x - q * scale) * inv by FMA:
    the first leaves q within an ulp, so that the second gives RN(x / scale) (Markstein's theorem:
    the remainder is exact by FMA and inv is within half an ulp of 1 / scale) wherever the remainder
    does not underflow: |x / scale| >= 2^-41 at least, which covers every nonzero code (INT8 from
    1/2, E4M3 from 2^-10, E5M2 from 2^-17); smaller quotients may be an ulp off and still give code
    0. A scale below 2^-60 is scaled by 2^64 with x (both exact), so that 1 / scale does not
    overflow. x = -0 stays -0 (FP8 keeps the sign of zero). The CPU interpreter has no fused FMA:
    there it divides."""
    if INTERPRET:
        return tl.math.div_rn(x, scale)
    factor = tl.where(scale < 8.673617379884035e-19, 1.8446744073709552e19, 1.0)  # 2^-60, 2^64
    scale = scale * factor
    inv = tl.math.div_rn(1.0, scale)  # one per row or channel
    x = x * factor
    q = x * inv
    q = tl.fma(tl.fma(-q, scale, x), inv, q)
    q = tl.fma(tl.fma(-q, scale, x), inv, q)
    return tl.where(x == 0.0, x, q)


@triton.jit
def zero_nonfinite(x):
    """NaN/Inf -> 0, in x's dtype."""
    return tl.where(tl.abs(x) < float("inf"), x, 0.0).to(x.dtype)


@triton.jit
def abs_nan_as_inf(x):
    """|x| with NaN counted as +inf: a max over it is +inf exactly when a NaN/Inf is there."""
    return tl.where(x == x, tl.abs(x), float("inf"))


@triton.jit
def load_token_tile(X, MEAN, stride_xb, stride_xh, stride_xn, H, N, D,
                    BLOCK: tl.constexpr, DP: tl.constexpr, HAS_MEAN: tl.constexpr):
    """The tile this program quantizes: BLOCK tokens (program id 0) x DP channels of head
    program id 1, as fp32, zero outside [N, D), minus the per-head token mean if HAS_MEAN.
    Returns (x, rows, cols, in_bounds, pid_n, pid_bh)."""
    return load_token_tile_nonfinite(X, MEAN, stride_xb, stride_xh, stride_xn, H, N, D, BLOCK, DP, HAS_MEAN, False)


@triton.jit
def load_token_tile_nonfinite(X, MEAN, stride_xb, stride_xh, stride_xn, H, N, D,
                              BLOCK: tl.constexpr, DP: tl.constexpr, HAS_MEAN: tl.constexpr, ZERO: tl.constexpr):
    """:func:`load_token_tile`, with NaN/Inf values replaced by 0 before the mean is subtracted (``ZERO``)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    x, rows, cols, in_bounds = load_tile_at(X, MEAN, stride_xb, stride_xh, stride_xn, H, N, D, pid_n, pid_bh,
                                            BLOCK, DP, HAS_MEAN, ZERO)
    return x, rows, cols, in_bounds, pid_n, pid_bh


@triton.jit
def load_tile_at(X, MEAN, stride_xb, stride_xh, stride_xn, H, N, D, pid_n, pid_bh,
                 BLOCK: tl.constexpr, DP: tl.constexpr, HAS_MEAN: tl.constexpr, ZERO: tl.constexpr):
    """Token tile ``pid_n`` of head ``pid_bh`` (:func:`load_token_tile_nonfinite`). Returns (x, rows, cols, in_bounds)."""
    rows = pid_n * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, DP)
    in_bounds = (rows[:, None] < N) & (cols[None, :] < D)
    # the tile's start in 64 bits: a view into a larger buffer (q, k, v of one packed QKV tensor, a
    # slice of a preallocated cache) may reach past 2^31 elements while the view itself is small
    tile = X + (pid_bh // H).to(tl.int64) * stride_xb + (pid_bh % H).to(tl.int64) * stride_xh \
        + (pid_n * BLOCK).to(tl.int64) * stride_xn
    x = tl.load(tile + tl.arange(0, BLOCK)[:, None] * stride_xn + cols[None, :], mask=in_bounds, other=0.0).to(tl.float32)
    if ZERO:
        x = zero_nonfinite(x)
    if HAS_MEAN:
        x = tl.where(in_bounds, x - tl.load(MEAN + pid_bh * D + cols, mask=cols < D, other=0.0)[None, :], 0.0)
    return x, rows, cols, in_bounds


@triton.jit
def zero_nonfinite_centred(x, rows, cols, D, pid_bh, MEAN, FIRST_BAD, HAS_MEAN: tl.constexpr, FLAG: tl.constexpr):
    """x = raw - mean still holding raw's NaN/Inf: the same numbers as zeroing raw first, i.e.
    0 - mean in their place. FLAG: fold the tile's first token with one into FIRST_BAD[pid_bh]
    (int32, NO_BAD_KEY - token, atomic max: V's keys)."""
    finite = tl.abs(x) < float("inf")
    if FLAG:
        bad = tl.max(tl.where(finite, 0, 1), axis=1)
        first = tl.min(tl.where(bad != 0, rows, _NO_BAD_KEY), axis=0)
        tl.atomic_max(FIRST_BAD + pid_bh, -first + _NO_BAD_KEY, mask=first < _NO_BAD_KEY)
    if HAS_MEAN:
        x = tl.where(finite, x, (0.0 - tl.load(MEAN + pid_bh * D + cols, mask=cols < D, other=0.0))[None, :])
    else:
        x = tl.where(finite, x, 0.0)
    return x


@triton.jit
def zero_bad_tokens(x, row_absmax, rows, N, pid_bh, BAD_ROWS, FIRST_BAD, FLAGS: tl.constexpr):
    """Q and K: a token whose row absmax is +inf (a NaN/Inf in it, NaN counted as +inf) becomes a
    zero row (its rows of the output are set to NaN later, so its codes never matter). Recorded
    with predicated stores, no reduction: FLAGS 1 marks the token (BAD_ROWS, zeroed uint8 per
    token: Q's rows), 2 folds it into FIRST_BAD[pid_bh] (int32 NO_BAD_KEY - token, atomic max:
    K's keys). Returns (x, bad)."""
    bad = (row_absmax == float("inf")) & (rows < N)
    if FLAGS == 1:
        tl.store(BAD_ROWS + pid_bh * N + rows, tl.full(rows.shape, 1, tl.uint8), mask=bad)
    elif FLAGS == 2:
        tl.atomic_max(FIRST_BAD + pid_bh + rows * 0, -rows + _NO_BAD_KEY, mask=bad)
    return tl.where(bad[:, None], 0.0, x), bad


@triton.jit
def subtract_tile_mean(x, in_bounds, cols, BLOCK_MEAN, pid_n, pid_bh, N, D, mult, BLOCK: tl.constexpr):
    """Q smoothing: subtract this tile's token mean (tail rows excluded) and store it times mult."""
    count = tl.minimum(N - pid_n * BLOCK, BLOCK).to(tl.float32)
    bmean = tl.sum(x, axis=0) / count
    tl.store(BLOCK_MEAN + (pid_bh * tl.num_programs(0) + pid_n) * D + cols, bmean * mult, mask=cols < D)
    return tl.where(in_bounds, x - bmean[None, :], 0.0)


@triton.jit
def quantize_int_kernel(X, MEAN, OUT, SCALE, BLOCK_MEAN, BAD_ROWS, FIRST_BAD,
                        stride_xb, stride_xh, stride_xn,
                        H, N, D, mult,
                        BLOCK: tl.constexpr, DP: tl.constexpr, QMAX: tl.constexpr,
                        GRAN: tl.constexpr, WARP: tl.constexpr, HAS_MEAN: tl.constexpr,
                        SMOOTH_BLOCK: tl.constexpr, ZERO: tl.constexpr, FLAGS: tl.constexpr,
                        INTERPRET: tl.constexpr):
    x, rows, cols, in_bounds, pid_n, pid_bh = load_token_tile(X, MEAN, stride_xb, stride_xh, stride_xn, H, N, D,
                                                               BLOCK, DP, HAS_MEAN)
    if SMOOTH_BLOCK:
        if ZERO:  # the tile's mean needs finite rows
            x, bad = zero_bad_tokens(x, tl.max(abs_nan_as_inf(x), axis=1), rows, N, pid_bh, BAD_ROWS, FIRST_BAD,
                                     FLAGS)
        x = subtract_tile_mean(x, in_bounds, cols, BLOCK_MEAN, pid_n, pid_bh, N, D, mult, BLOCK)
        x = x * mult
        if ZERO:
            x = tl.where(bad[:, None], 0.0, x)
        row_absmax = tl.max(tl.abs(x), axis=1)
    else:
        x = x * mult
        if ZERO:  # a NaN counts as +inf in the rows' absmax: no reduction beyond the one the scales need
            row_absmax = tl.max(abs_nan_as_inf(x), axis=1)
            x, bad = zero_bad_tokens(x, row_absmax, rows, N, pid_bh, BAD_ROWS, FIRST_BAD, FLAGS)
            row_absmax = tl.where(bad, 0.0, row_absmax)
        else:
            row_absmax = tl.max(tl.abs(x), axis=1)
    if GRAN == 0:
        absmax = tl.max(row_absmax, axis=0)
        scale = tl.math.div_rn(absmax, QMAX * 1.0)
        tl.store(SCALE + pid_bh * tl.num_programs(0) + pid_n, scale)
        y = div_by_scale(x, tl.where(scale == 0.0, 1.0, scale), INTERPRET)
    else:
        absmax = _group_absmax(row_absmax, BLOCK, GRAN, WARP)
        scale = tl.math.div_rn(absmax, QMAX * 1.0)
        tl.store(SCALE + pid_bh * N + rows, scale, mask=rows < N)
        y = div_by_scale(x, tl.where(scale == 0.0, 1.0, scale)[:, None], INTERPRET)
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
                          FP8_E5M2: tl.constexpr, FMAX: tl.constexpr, INTERPRET: tl.constexpr,
                          ZERO: tl.constexpr, WGMMA_KEY_ORDER: tl.constexpr = False):
    x, rows, cols, in_bounds, pid_n, pid_bh = load_token_tile_nonfinite(
        V, MEAN, stride_vb, stride_vh, stride_vn, H, N, D, BLOCK, DP, HAS_MEAN, ZERO)
    # scale = absmax / fmax per channel; the first program of each head stores it
    scale = tl.math.div_rn(tl.load(ABSMAX + pid_bh * D + cols, mask=cols < D, other=0.0), FMAX)
    if pid_n == 0:
        tl.store(SCALE + pid_bh * D + cols, scale, mask=cols < D)
    y = div_by_scale(x, tl.where(scale == 0.0, 1.0, scale)[None, :], INTERPRET)
    y = tl.where(in_bounds, y, 0.0)
    # transposed store: [DP, NPAD] per head, tokens contiguous (coalesced); padding tokens get zeros
    yt = to_fp8(tl.trans(y), FP8_E5M2, INTERPRET)
    if WGMMA_KEY_ORDER:
        # csrc/sage2_sm90: key 16h + 8e + 2t + b of each 32 goes to slot 16h + 4t + 2e + b, where
        # the S fragment puts lane t's P. Permuted in registers, so the store stays contiguous.
        yt = tl.reshape(tl.permute(tl.reshape(yt, (DP, BLOCK // 32, 2, 2, 4, 2)), (0, 1, 2, 4, 3, 5)), (DP, BLOCK))
    tl.store(OUT + (pid_bh * DP + cols[:, None]) * NPAD + rows[None, :], yt, mask=rows[None, :] < NPAD)


@triton.jit
def scan_v_kernel(V, MEAN, AMAX, FIRST_BAD, stride_vb, stride_vh, stride_vn, H, N, D,
                  BLOCK: tl.constexpr, DP: tl.constexpr, HAS_MEAN: tl.constexpr, PER_CHANNEL: tl.constexpr,
                  FLAG: tl.constexpr, TILES: tl.constexpr = 1):
    """AMAX (int32 bits of fp32, zero-initialized): max |V - mean| over finite values, per
    (batch, head, channel) or of the whole tensor. Non-negative floats order as their bits, so an
    integer atomic max gives the exact maximum in any order (deterministic). Each program scans
    TILES tiles of BLOCK tokens and folds them into one atomic per channel (one per tile made the
    scan run at 1.9 TB/s on the H100: csrc/NOTES.md, v12). The tiles are read unrolled, with no
    branch between them, so that their loads can be in flight together; a NaN/Inf anywhere in them
    (rare) sends the program through them again, zeroing and recording (csrc/NOTES.md, v13)."""
    pid_bh = tl.program_id(1)
    col_absmax = tl.zeros([DP], dtype=tl.float32)
    for i in tl.static_range(TILES):
        x, _, _, _ = load_tile_at(V, MEAN, stride_vb, stride_vh, stride_vn, H, N, D,
                                  tl.program_id(0) * TILES + i, pid_bh, BLOCK, DP, HAS_MEAN, False)
        col_absmax = tl.maximum(col_absmax, tl.max(abs_nan_as_inf(x), axis=0))
    if tl.max(col_absmax, axis=0) == float("inf"):  # rare: again, zeroing and recording them
        col_absmax = tl.zeros([DP], dtype=tl.float32)
        for tile in range(TILES):
            y, y_rows, y_cols, _ = load_tile_at(V, MEAN, stride_vb, stride_vh, stride_vn, H, N, D,
                                                tl.program_id(0) * TILES + tile, pid_bh, BLOCK, DP, HAS_MEAN, False)
            y = zero_nonfinite_centred(y, y_rows, y_cols, D, pid_bh, MEAN, FIRST_BAD, HAS_MEAN, FLAG)
            col_absmax = tl.maximum(col_absmax, tl.max(tl.abs(y), axis=0))
    cols = tl.arange(0, DP)
    if PER_CHANNEL:
        tl.atomic_max(AMAX + pid_bh * D + cols, col_absmax.to(tl.int32, bitcast=True), mask=cols < D)
    else:
        tl.atomic_max(AMAX, tl.max(col_absmax, axis=0).to(tl.int32, bitcast=True))


@triton.jit
def delta_s_kernel(QM, K, KM, OUT, stride_kb, stride_kh, stride_kn, Hq, Hkv, NB, Nk, D,
                   BLOCK_QB: tl.constexpr, BLOCK_N: tl.constexpr, DP: tl.constexpr, HAS_KM: tl.constexpr,
                   PRECISION: tl.constexpr):
    """Q smoothing's ``delta_s[bh, i, n] = q_mean[bh, i] . (k[n] - k_mean)`` (fp32) for BLOCK_N keys of
    one query head and all its query blocks: K is read once per query head, centred in registers,
    and never written out in fp32 (common.smoothing.q_smoothing_delta_s)."""
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // Hq, bh % Hq
    hk = h // (Hq // Hkv)
    bh = bh.to(tl.int64)  # OUT holds B Hq NB Nk values: past 2^31 at B=4, Hq=32, 48k tokens
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, DP)
    # (the tile's start in 64 bits: K may be a view into a larger buffer, as in load_tile_at)
    k_tile = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh + (pid_n * BLOCK_N).to(tl.int64) * stride_kn
    k = tl.load(k_tile + tl.arange(0, BLOCK_N)[:, None] * stride_kn + d[None, :],
                mask=(cols[:, None] < Nk) & (d[None, :] < D), other=0.0).to(tl.float32)
    if HAS_KM:
        k = k - tl.load(KM + (b * Hkv + hk) * D + d, mask=d < D, other=0.0)[None, :]
    for qb0 in range(0, NB, BLOCK_QB):
        rows = qb0 + tl.arange(0, BLOCK_QB)
        qm = tl.load(QM + (bh * NB + rows[:, None]) * D + d[None, :], mask=(rows[:, None] < NB) & (d[None, :] < D),
                     other=0.0)
        s = tl.dot(qm, tl.trans(k), input_precision=PRECISION)
        tl.store(OUT + (bh * NB + rows[:, None]) * Nk + cols[None, :], s, mask=(rows[:, None] < NB) & (cols[None, :] < Nk))
