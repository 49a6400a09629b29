"""Triton pieces every attention kernel here shares: which tile a program owns, which KV tiles it
visits (bottom-right causal alignment), and the masked online-softmax maximum."""

from __future__ import annotations

import triton
import triton.language as tl

from .nonfinite import NO_BAD_KEY

_NO_BAD_KEY = tl.constexpr(NO_BAD_KEY)


@triton.jit
def program_tile(Hq, Hkv, IS_CAUSAL: tl.constexpr):
    """(start_m, bh, b, h, hk, kv_bh) of this program: grid (q tiles, B*Hq); GQA maps query head
    h to KV head h // (Hq/Hkv); causal programs take the longest rows first, for load balance."""
    n_m = tl.num_programs(0)
    if IS_CAUSAL:
        start_m = n_m - 1 - tl.program_id(0)
    else:
        start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // (Hq // Hkv)
    return start_m, bh, b, h, hk, b * Hkv + hk


@triton.jit
def kv_bounds(start_m, Nq, Nk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """(full_end, hi): tiles [0, full_end) need no mask for any row of this Q tile; tiles
    [full_end, hi) need one (the causal diagonal, the tail past Nk). Row i sees keys
    j <= i + Nk - Nq (bottom-right alignment, as FlashAttention)."""
    return kv_bounds_from(start_m, Nk - Nq, Nk, BLOCK_M, BLOCK_N, IS_CAUSAL)


@triton.jit
def kv_bounds_from(start_m, q_offset, Nk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """kv_bounds with the causal offset given (row i sees keys j <= i + q_offset, j < Nk)."""
    if IS_CAUSAL:
        hi = tl.minimum(Nk, (start_m + 1) * BLOCK_M + q_offset)
        full_end = tl.minimum(Nk, start_m * BLOCK_M + q_offset + 1)
    else:
        hi = Nk
        full_end = Nk
    return tl.maximum(full_end, 0) // BLOCK_N * BLOCK_N, tl.maximum(hi, 0)


@triton.jit
def visible_keys(rows, cols, Nk, q_offset, IS_CAUSAL: tl.constexpr):
    """[len(rows), len(cols)]: key j exists (j < Nk) and, causal, query i may see it (j <= i + q_offset)."""
    keep = cols[None, :] < Nk
    if IS_CAUSAL:
        keep = keep & (cols[None, :] <= rows[:, None] + q_offset)
    return keep


@triton.jit
def masked_row_max(s, m_i, rows, cols, Nk, q_offset, IS_CAUSAL: tl.constexpr):
    """Mask s (keys past Nk; causal: j > i + q_offset) with -inf and return (s, m_new, m_use):
    m_use is m_new with -inf replaced by 0, so that a row with no visible key yet gets p = 0."""
    s = tl.where(visible_keys(rows, cols, Nk, q_offset, IS_CAUSAL), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    return s, m_new, tl.where(m_new == float("-inf"), 0.0, m_new)


@triton.jit
def dot_16bit(a, b, acc, INTERPRET: tl.constexpr):
    # Triton's CPU interpreter multiplies bf16 tiles wrongly (numpy has no bf16): use fp32 there,
    # which is exact for these operands' products as well. (One return per path: the compiler
    # does not stop at a return inside a constexpr if.)
    if INTERPRET and a.dtype == tl.bfloat16:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def kv_range(start_m, b, Nq, Nk, QLEN, KLEN, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
             HAS_LENS: tl.constexpr, PER_SEQ_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr):
    """(nk, q_offset, full_end, hi) of this Q tile with per-sequence lengths (varlen / key padding:
    tiles past them are skipped, and a tile past nq visits none, so its rows give 0) and an
    attn_mask (MASK_KIND != 0: every KV tile takes the masked path)."""
    nq, nk, q_offset = sequence_bounds(b, Nq, Nk, QLEN, KLEN, HAS_LENS, PER_SEQ_CAUSAL)
    full_end, hi = kv_bounds_from(start_m, q_offset, nk, BLOCK_M, BLOCK_N, IS_CAUSAL)
    if MASK_KIND != 0:
        full_end = 0
    if HAS_LENS:
        hi = tl.where(start_m * BLOCK_M < nq, hi, 0)
        full_end = tl.minimum(full_end, hi)
    return nk, q_offset, full_end, hi


@triton.jit
def sequence_bounds(b, Nq, Nk, QLEN, KLEN, HAS_LENS: tl.constexpr, PER_SEQ_CAUSAL: tl.constexpr):
    """(nq, nk, q_offset): this sequence's query and key counts (per-sequence lengths, or the
    tensors' sizes) and the causal offset (row i sees keys j <= i + q_offset): bottom-right per
    sequence for varlen, from the tensors' sizes for a key-padding mask (as SDPA's masks compose)."""
    if HAS_LENS:
        nq = tl.load(QLEN + b)
        nk = tl.load(KLEN + b)
    else:
        nq = Nq
        nk = Nk
    if PER_SEQ_CAUSAL:
        q_offset = nk - nq
    else:
        q_offset = Nk - Nq
    return nq, nk, q_offset


@triton.jit
def apply_tile_mask(s, MASKP, b, h, rows, cols, Nq, Nk, smb, smh, smm, smn, MASK_KIND: tl.constexpr):
    """attn_mask on a [rows, cols] tile of log2-domain scores, read through its broadcast strides:
    MASK_KIND 1 keeps where the uint8 mask is nonzero (else -inf), 2 adds the fp32 log2 bias."""
    # (64-bit: a [B, H, Nq, Nk] mask passes 2^31 elements from Nq = Nk = 46341 on)
    ptrs = (MASKP + b.to(tl.int64) * smb + h.to(tl.int64) * smh + rows.to(tl.int64)[:, None] * smm
            + cols.to(tl.int64)[None, :] * smn)
    inb = (rows[:, None] < Nq) & (cols[None, :] < Nk)
    if MASK_KIND == 1:
        s = tl.where(tl.load(ptrs, mask=inb, other=0) != 0, s, float("-inf"))
    else:
        s = s + tl.load(ptrs, mask=inb, other=0.0)
    return s


@triton.jit
def write_output(out, lse, O, LSE, rows, dcols, d_mask, b, h, bh, kv_bh, Nq, Nk, stride_ob, stride_oh, stride_on,
                 QLEN, KLEN, QBAD, FIRST_BAD, IS_CAUSAL: tl.constexpr, HAS_LENS: tl.constexpr,
                 PER_SEQ_CAUSAL: tl.constexpr, RETURN_LSE: tl.constexpr, NAN_ROWS: tl.constexpr):
    """The attention kernels' epilogue: SDPA's NaN rows if asked (NAN_ROWS), then this program's
    output rows in O's layout and dtype and, if asked, the log2-domain LSE."""
    if NAN_ROWS:
        out, lse = nonfinite_rows(out, lse, rows, bh, kv_bh, b, Nq, Nk, QLEN, KLEN, QBAD, FIRST_BAD, IS_CAUSAL,
                                  HAS_LENS, PER_SEQ_CAUSAL)
    o_ptrs = O + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + dcols[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(rows[:, None] < Nq) & d_mask[None, :])
    if RETURN_LSE:
        tl.store(LSE + bh * Nq + rows, lse, mask=rows < Nq)


@triton.jit
def nonfinite_rows(out, lse, rows, bh, kv_bh, b, Nq, Nk, QLEN, KLEN, QBAD, FIRST_BAD, IS_CAUSAL: tl.constexpr,
                   HAS_LENS: tl.constexpr, PER_SEQ_CAUSAL: tl.constexpr):
    """SDPA's NaN rows (common.nonfinite) on this program's output tile and LSE: rows whose query
    had a NaN/Inf, and rows that see the first key with one (as the quantization passes recorded)."""
    nq, nk, q_offset = sequence_bounds(b, Nq, Nk, QLEN, KLEN, HAS_LENS, PER_SEQ_CAUSAL)
    first = -tl.load(FIRST_BAD + kv_bh) + _NO_BAD_KEY
    bad = tl.load(QBAD + bh * Nq + rows, mask=rows < Nq, other=0) != 0
    if IS_CAUSAL:
        bad = bad | ((first < nk) & (first <= rows + q_offset))
    else:
        bad = bad | (first < nk)
    bad = bad & (rows < nq)
    return tl.where(bad[:, None], float("nan"), out), tl.where(bad, float("nan"), lse)

