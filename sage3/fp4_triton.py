"""Triton building blocks for FP4 (E2M1) microscaling: encode, decode, and the quantization pass.

The same rules as :mod:`common.fp4` (round to nearest, ties to the even code, saturating at 6;
NVFP4: E4M3 scale ``absmax/6`` per 16 elements; MXFP4: E8M0 scale ``2**(floor(log2 absmax)-2)``
per 32), written with fp32 compares and integer bit operations so that the GPU and Triton's CPU
interpreter compute the same codes as PyTorch, bit for bit.
"""

from __future__ import annotations

import triton
import triton.language as tl

from common.triton_quant import load_token_tile, subtract_tile_mean, to_fp8


@triton.jit
def e2m1_index(a):
    """|x| (fp32, >= 0) -> E2M1 magnitude index 0..7 (nearest, ties to even, saturating)."""
    return ((a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32) + (a >= 1.75).to(tl.int32)
            + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32) + (a > 5.0).to(tl.int32))


@triton.jit
def e2m1_round(a):
    """|x| (fp32, >= 0) rounded onto the E2M1 grid {0, .5, 1, 1.5, 2, 3, 4, 6} (fp32)."""
    return tl.where(a > 5.0, 6.0, tl.where(a >= 3.5, 4.0, tl.where(a > 2.5, 3.0, tl.where(
        a >= 1.75, 2.0, tl.where(a > 1.25, 1.5, tl.where(a >= 0.75, 1.0, tl.where(a > 0.25, 0.5, 0.0)))))))


@triton.jit
def _add_rn(x, y, INTERPRET: tl.constexpr):
    # add.rn.f32 cannot be contracted with a preceding multiply into an FMA (which would round
    # the exact product instead of the fp32 product the emulation rounds)
    if INTERPRET:
        out = x + y
    else:
        out = tl.inline_asm_elementwise("add.rn.f32 $0, $1, $2;", "=r,r,r", [x, y], dtype=tl.float32,
                                        is_pure=True, pack=1)
    return out


@triton.jit
def e2m1_round_magic(a, INTERPRET: tl.constexpr):
    """The same rounding as :func:`e2m1_round` for fp32 a >= 0, in 6 ops instead of 14.

    Within a binade 2**E (E = max(0, floor(log2 a)), capped at 2) the E2M1 grid is spaced
    2**(E-1), which is the fp32 spacing at M = 2**(E+22): fl(a + M) - M rounds a to that spacing
    with ties to an even multiple, i.e. to the even E2M1 code. Then saturate at 6."""
    e = a.to(tl.int32, bitcast=True) & 0x7F800000
    e = tl.minimum(tl.maximum(e, 127 << 23), 129 << 23)
    m = (e + (22 << 23)).to(tl.float32, bitcast=True)
    return tl.minimum(_add_rn(a, m, INTERPRET) - m, 6.0)


@triton.jit
def e2m1_to_f16_bits(c):
    """4-bit codes (int32 0..15) -> fp16 bit patterns (int32): sign<<15 | exponent | mantissa.

    E2M1 exponent e (bias 1) and mantissa m: e > 0 -> fp16 exponent e + 14, mantissa bit 9;
    e == 0 (subnormal): the value is m * 0.5, i.e. fp16 exponent 14 with no mantissa."""
    e = (c >> 1) & 3
    m = c & 1
    mag = tl.where(e > 0, ((e + 14) << 10) | (m << 9), m * (14 << 10))
    return mag | ((c >> 3) << 15)


@triton.jit
def unpack_fp4(packed, ROWS: tl.constexpr, COLS: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """uint8 [ROWS, COLS/2] (low nibble first) -> E2M1 values [ROWS, COLS] in fp16/bf16 (exact)."""
    p = packed.to(tl.int32)
    lo = e2m1_to_f16_bits(p & 0xF).to(tl.int16).to(tl.float16, bitcast=True)
    hi = e2m1_to_f16_bits(p >> 4).to(tl.int16).to(tl.float16, bitcast=True)
    vals = tl.reshape(tl.join(lo, hi), (ROWS, COLS))
    return vals.to(OUT_DTYPE)


@triton.jit
def apply_block_scales(vals, scales, ROWS: tl.constexpr, COLS: tl.constexpr, BLOCK: tl.constexpr):
    """vals [ROWS, COLS] times one scale per BLOCK consecutive columns (scales [ROWS, COLS/BLOCK],
    same dtype as vals): exact, since every E2M1 value times its scale is representable."""
    v3 = tl.reshape(vals, (ROWS, COLS // BLOCK, BLOCK))
    return tl.reshape(v3 * scales[:, :, None], (ROWS, COLS))


@triton.jit
def mx_scale_f32(e):
    """E8M0 biased exponent (int32 1..254) -> 2**(e-127) in fp32 (exact)."""
    return (e << 23).to(tl.float32, bitcast=True)


@triton.jit
def quantize_fp4_tile(x, ROWS: tl.constexpr, COLS: tl.constexpr, MX: tl.constexpr, INTERPRET: tl.constexpr):
    """Quantize x [ROWS, COLS] (fp32) along COLS: returns (packed uint8 [ROWS, COLS/2], scales
    [ROWS, COLS/BLOCK] as E4M3 (NVFP4) or uint8 biased exponents (MXFP4))."""
    if MX:
        xb = tl.reshape(x, (ROWS, COLS // 32, 32))
        amax = tl.max(tl.abs(xb), axis=2)
        bits = amax.to(tl.int32, bitcast=True)
        e = tl.where(amax > 0, ((bits >> 23) & 0xFF) - 2, 0)  # floor(log2 amax) - 2, biased
        e = tl.maximum(e, 0)
        div = tl.where(e > 0, mx_scale_f32(tl.maximum(e, 1)), float("inf"))
        scales = e.to(tl.uint8)
    else:
        xb = tl.reshape(x, (ROWS, COLS // 16, 16))
        amax = tl.max(tl.abs(xb), axis=2)
        s8 = to_fp8(tl.math.div_rn(amax, 6.0), False, INTERPRET)
        sf = s8.to(tl.float32)
        div = tl.where(sf == 0.0, float("inf"), sf)
        scales = s8
    y = tl.reshape(tl.math.div_rn(xb, div[:, :, None]), (ROWS, COLS))
    code = e2m1_index(tl.abs(y)) | ((y < 0).to(tl.int32) << 3)
    lo, hi = tl.split(tl.reshape(code, (ROWS, COLS // 2, 2)))
    return (lo | (hi << 4)).to(tl.uint8), scales


@triton.jit
def fp4_quantize_rows_kernel(X, MEAN, PACKED, SCALES, BLOCK_MEAN,
                             stride_xb, stride_xh, stride_xn, H, N, D,
                             BLOCK: tl.constexpr, DP: tl.constexpr, MX: tl.constexpr, HAS_MEAN: tl.constexpr,
                             SMOOTH_BLOCK: tl.constexpr, INTERPRET: tl.constexpr, SB: tl.constexpr):
    """Q or K: one program quantizes BLOCK tokens of one head along the channels (padded to DP).
    HAS_MEAN subtracts K's token mean; SMOOTH_BLOCK subtracts (and stores) this tile's token mean."""
    x, rows, cols, inb, pid_n, pid_bh = load_token_tile(X, MEAN, stride_xb, stride_xh, stride_xn, H, N, D,
                                                         BLOCK, DP, HAS_MEAN)
    if SMOOTH_BLOCK:
        x = subtract_tile_mean(x, inb, cols, BLOCK_MEAN, pid_n, pid_bh, N, D, 1.0, BLOCK)
    packed, scales = quantize_fp4_tile(x, BLOCK, DP, MX, INTERPRET)
    tl.store(PACKED + (pid_bh * N + rows[:, None]) * (DP // 2) + tl.arange(0, DP // 2)[None, :], packed,
             mask=rows[:, None] < N)
    tl.store(SCALES + (pid_bh * N + rows[:, None]) * (DP // SB) + tl.arange(0, DP // SB)[None, :], scales,
             mask=rows[:, None] < N)


@triton.jit
def fp4_quantize_v_kernel(V, PACKED, SCALES, stride_vb, stride_vh, stride_vn, H, N, NPAD, D,
                          BLOCK: tl.constexpr, DP: tl.constexpr, MX: tl.constexpr, INTERPRET: tl.constexpr,
                          SB: tl.constexpr):
    """V: one program quantizes BLOCK tokens x all channels of one head along the tokens, written
    transposed: packed [DP, NPAD/2] and scales [DP, NPAD/BLOCK_SIZE] per head (padding = zeros)."""
    x, toks, chans, inb, pid_n, pid_bh = load_token_tile(V, V, stride_vb, stride_vh, stride_vn, H, N, D,
                                                          BLOCK, DP, False)
    xt = tl.trans(x)  # [DP, BLOCK]
    packed, scales = quantize_fp4_tile(xt, DP, BLOCK, MX, INTERPRET)
    pc = pid_n * (BLOCK // 2) + tl.arange(0, BLOCK // 2)
    sc = pid_n * (BLOCK // SB) + tl.arange(0, BLOCK // SB)
    tl.store(PACKED + (pid_bh * DP + chans[:, None]) * (NPAD // 2) + pc[None, :], packed)
    tl.store(SCALES + (pid_bh * DP + chans[:, None]) * (NPAD // SB) + sc[None, :], scales)


@triton.jit
def dequantize_tile(packed, scales, ROWS: tl.constexpr, COLS: tl.constexpr, MX: tl.constexpr, OP: tl.constexpr):
    """Packed FP4 [ROWS, COLS/2] + block scales -> OP [ROWS, COLS], exact."""
    vals = unpack_fp4(packed, ROWS, COLS, OP)
    if MX:  # power-of-two scales may leave the 16-bit range on their own: multiply in fp32
        sc = mx_scale_f32(tl.maximum(scales.to(tl.int32), 1))
        sc = tl.where(scales.to(tl.int32) == 0, 0.0, sc)
        out = apply_block_scales(vals.to(tl.float32), sc, ROWS, COLS, 32).to(OP)
    elif OP == tl.bfloat16:  # exact either way; bf16 arithmetic is not exact in Triton's CPU interpreter
        out = apply_block_scales(vals.to(tl.float32), scales.to(tl.float32), ROWS, COLS, 16).to(OP)
    else:
        out = apply_block_scales(vals, scales.to(OP), ROWS, COLS, 16)
    return out


@triton.jit
def load_scales(ptrs, mask, MX: tl.constexpr):
    # MXFP4 scales are uint8 exponents, NVFP4 scales E4M3: the fill value must match the type
    if MX:
        out = tl.load(ptrs, mask=mask, other=0)
    else:
        out = tl.load(ptrs, mask=mask, other=0.0)
    return out


@triton.jit
def dequantize_rows_kernel(PACKED, SCALES, OUT, R, COLS, BLOCK_R: tl.constexpr, CP: tl.constexpr, MX: tl.constexpr,
                           SB: tl.constexpr, OP: tl.constexpr):
    """Packed FP4 rows [R, COLS/2] + block scales -> OP [R, COLS] (exact), CP columns per program."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c0 = tl.program_id(1) * CP
    inb = r[:, None] < R
    packed = tl.load(PACKED + r[:, None] * (COLS // 2) + c0 // 2 + tl.arange(0, CP // 2)[None, :], mask=inb, other=0)
    scales = load_scales(SCALES + r[:, None] * (COLS // SB) + c0 // SB + tl.arange(0, CP // SB)[None, :], inb, MX)
    out = dequantize_tile(packed, scales, BLOCK_R, CP, MX, OP)
    tl.store(OUT + r[:, None] * COLS + c0 + tl.arange(0, CP)[None, :], out, mask=inb)
