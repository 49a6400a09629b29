"""Triton pieces every attention kernel here shares: which tile a program owns, which KV tiles it
visits (bottom-right causal alignment), and the masked online-softmax maximum."""

from __future__ import annotations

import triton
import triton.language as tl


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
    q_offset = Nk - Nq
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
