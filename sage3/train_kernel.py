"""SageBwd Triton kernels: INT8 forward, and the backward as FlashAttention-2 recomputes it.

Layouts, chosen so that every INT8 matmul reads both operands contiguous along its reduction
(what Hopper's 8-bit tensor cores want; see ../shared/anchors): Q_hat, K_hat, V_hat, dO_hat are
``[B, H, N, DP]``; the backward also reads Q_hat^T, K_hat^T, dO_hat^T ``[B, H, DP, N64]`` and the
forward V_hat^T, made by a transposing copy of the codes (N64 = N rounded up to 64, zeros).

The algorithm, tile sizes and rounding rules are those of :mod:`sage3.train_emulation`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from common.checks import interpreter_enabled, kernel_store_dtype
from common.triton_attention import dot_16bit, kv_bounds, program_tile, visible_keys

from .train_emulation import BWD_TILE, FWD_KV_TILE, FWD_Q_BLOCK, TINY

assert TINY == 7.888609052210118e-31  # the literal in _inv_scale


@triton.jit
def _int8_codes(x, inv):
    """x * inv (finite, |x * inv| <= 127) to the nearest integer, ties to even, as INT8, by one FMA with
    1.5 * 2**23: the sum's low byte is then the code, and no float -> int conversion is issued
    (F2I per code cost the H100 forward 44.8 -> 51.7 ms at 16k, TRAIN_NOTES.md v4)."""
    return tl.fma(x, inv, 12582912.0).to(tl.int32, bitcast=True).to(tl.int8)


@triton.jit
def _inv_scale(amax):
    """(127 / amax or 0, amax / 127) with blocks below TINY set to 0."""
    amax = tl.where(amax >= 7.888609052210118e-31, amax, 0.0)  # TINY = 2**-100
    inv = tl.where(amax > 0, tl.math.div_rn(127.0, tl.where(amax > 0, amax, 1.0)), 0.0)
    return inv, tl.math.div_rn(amax, 127.0)


@triton.jit
def _quant_rows(p, pmax):
    """INT8 per row of p [M, N] (>= 0) whose row maxima are pmax: (codes, scales [M])."""
    inv, scale = _inv_scale(pmax)
    return _int8_codes(p, inv[:, None]), scale


@triton.jit
def _quant_tile(x):
    """INT8 with one scale for the whole tile: (codes, scale)."""
    inv, scale = _inv_scale(tl.max(tl.max(tl.abs(x), axis=1), axis=0))
    return _int8_codes(x, inv), scale


@triton.jit
def _visible(rows_q, cols_k, Nq, Nk, IS_CAUSAL: tl.constexpr):
    """visible_keys, and the query exists too: the backward sums over queries, so padding rows count."""
    return visible_keys(rows_q, cols_k, Nk, Nk - Nq, IS_CAUSAL) & (rows_q[:, None] < Nq)


@triton.jit
def _fwd_tile(q, sq, K, KS, VT, VS, acc, m_i, l_i, start_n, rows, kv_bh, Nq, Nk, NKP, n_kb,
              BLOCK_N: tl.constexpr, DP: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK: tl.constexpr):
    cols = start_n + tl.arange(0, BLOCK_N)
    dcols = tl.arange(0, DP)
    if MASK:
        k = tl.load(K + (kv_bh * Nk + cols[:, None]) * DP + dcols[None, :], mask=cols[:, None] < Nk, other=0)
    else:
        k = tl.load(K + (kv_bh * Nk + cols[:, None]) * DP + dcols[None, :])
    sk = tl.load(KS + kv_bh * n_kb + start_n // BLOCK_N)
    s = tl.dot(q, tl.trans(k)).to(tl.float32) * (sq * sk)
    if MASK:
        s = tl.where(visible_keys(rows, cols, Nk, Nk - Nq, IS_CAUSAL), s, float("-inf"))
    smax = tl.max(s, axis=1)
    m_new = tl.maximum(m_i, smax)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    # the row max of p is exp2 of the row max of s (exp2 is monotonic): no second reduction
    pc, ps = _quant_rows(p, tl.math.exp2(smax - m_use))
    vt = tl.load(VT + (kv_bh * DP + dcols[:, None]) * NKP + cols[None, :])  # padded with zeros: no mask
    sv = tl.load(VS + kv_bh * n_kb + start_n // BLOCK_N)
    pv = tl.dot(pc, tl.trans(vt)).to(tl.float32)
    acc = acc * alpha[:, None] + pv * (ps * sv)[:, None]
    return acc, m_new, l_i


@triton.jit
def sagebwd_fwd_kernel(Q, QS, K, KS, VT, VS, O, L, Hq, Hkv, Nq, Nk, NKP, n_qb, n_kb,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DP: tl.constexpr, IS_CAUSAL: tl.constexpr,
                       QB: tl.constexpr):
    start_m, bh, b, h, hk, kv_bh = program_tile(Hq, Hkv, IS_CAUSAL)
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dcols = tl.arange(0, DP)
    q = tl.load(Q + (bh * Nq + rows[:, None]) * DP + dcols[None, :], mask=rows[:, None] < Nq, other=0)
    sq = tl.load(QS + bh * n_qb + start_m * BLOCK_M // QB)  # QB (Q's quantization block) % BLOCK_M == 0
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DP], dtype=tl.float32)
    full_end, hi = kv_bounds(start_m, Nq, Nk, BLOCK_M, BLOCK_N, IS_CAUSAL)
    for start_n in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(q, sq, K, KS, VT, VS, acc, m_i, l_i, start_n, rows, kv_bh, Nq, Nk, NKP, n_kb,
                                  BLOCK_N, DP, IS_CAUSAL, False)
    for start_n in range(full_end, hi, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(q, sq, K, KS, VT, VS, acc, m_i, l_i, start_n, rows, kv_bh, Nq, Nk, NKP, n_kb,
                                  BLOCK_N, DP, IS_CAUSAL, True)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(O + (bh * Nq + rows[:, None]) * DP + dcols[None, :], out.to(O.dtype.element_ty), mask=rows[:, None] < Nq)
    tl.store(L + bh * Nq + rows, m_i + tl.math.log2(l_i), mask=rows < Nq)


@triton.jit
def _quant_tile_nonneg(x):
    """_quant_tile for x >= 0 (P): no |x|."""
    inv, scale = _inv_scale(tl.max(tl.max(x, axis=1), axis=0))
    return _int8_codes(x, inv), scale


@triton.jit
def _dkdv_tile(k, sk, vv, sv, dk, dv, start_m, cols, bh, Q, QS, QT, DO16, DOC, DOT, DOS, L, DI,
               Nq, Nk, NQP, n_qb, n_db, BLOCK: tl.constexpr, QB: tl.constexpr, DP: tl.constexpr,
               IS_CAUSAL: tl.constexpr, DOV: tl.constexpr, INTERPRET: tl.constexpr):
    """One query tile's share of dK and dV for the program's keys (and dS, for dQ by atomics)."""
    rows = start_m + tl.arange(0, BLOCK)
    dcols = tl.arange(0, DP)
    rmask = rows[:, None] < Nq
    q = tl.load(Q + (bh * Nq + rows[:, None]) * DP + dcols[None, :], mask=rmask, other=0)
    lse = tl.load(L + bh * Nq + rows, mask=rows < Nq, other=0.0)
    di = tl.load(DI + bh * Nq + rows, mask=rows < Nq, other=0.0)
    sq = tl.load(QS + bh * n_qb + start_m // QB)
    st = tl.dot(k, tl.trans(q)).to(tl.float32) * (sk * sq)                   # S^T [keys, queries]
    pt = tl.where(tl.trans(_visible(rows, cols, Nq, Nk, IS_CAUSAL)), tl.math.exp2(st - lse[None, :]), 0.0)
    pc, ps = _quant_tile_nonneg(pt)
    dot_t = tl.load(DOT + (bh * DP + dcols[:, None]) * NQP + rows[None, :])   # padded: no mask
    sdo = tl.load(DOS + bh * n_db + start_m // BLOCK)
    dv += tl.dot(pc, tl.trans(dot_t)).to(tl.float32) * (ps * sdo)
    if DOV:
        doc = tl.load(DOC + (bh * Nq + rows[:, None]) * DP + dcols[None, :], mask=rmask, other=0)
        dpt = tl.dot(vv, tl.trans(doc)).to(tl.float32) * (sdo * sv)
    else:
        do16 = tl.load(DO16 + (bh * Nq + rows[:, None]) * DP + dcols[None, :], mask=rmask, other=0.0)
        dpt = dot_16bit(vv, tl.trans(do16), None, INTERPRET)
    dst = pt * (dpt - di[None, :])
    dsc, dss = _quant_tile(dst)
    qt = tl.load(QT + (bh * DP + dcols[:, None]) * NQP + rows[None, :])
    dk += tl.dot(dsc, tl.trans(qt)).to(tl.float32) * (dss * sq)
    return dk, dv, dsc, dss


@triton.jit
def sagebwd_dkdv_kernel(Q, QS, QT, K, KS, KT, V16, VC, VS, DO16, DOC, DOT, DOS, L, DI, DK, DV, DQACC,
                        Hq, Hkv, Nq, Nk, NQP, NKP, n_qb, n_kb, n_db,
                        BLOCK: tl.constexpr, QB: tl.constexpr, DP: tl.constexpr, IS_CAUSAL: tl.constexpr,
                        DOV: tl.constexpr, ATOMIC_DQ: tl.constexpr, INTERPRET: tl.constexpr):
    """One program per (64-key tile, batch, KV head): dK and dV of those keys, summed over every
    query tile of every query head of the GQA group; with ATOMIC_DQ also dQ's share (fp32 atomics)."""
    pid_n = tl.program_id(0)
    kv_bh = tl.program_id(1)
    b = kv_bh // Hkv
    hk = kv_bh % Hkv
    G = Hq // Hkv
    start_n = pid_n * BLOCK
    cols = start_n + tl.arange(0, BLOCK)
    dcols = tl.arange(0, DP)
    kmask = cols[:, None] < Nk
    k = tl.load(K + (kv_bh * Nk + cols[:, None]) * DP + dcols[None, :], mask=kmask, other=0)
    sk = tl.load(KS + kv_bh * n_kb + pid_n)
    if DOV:
        vv = tl.load(VC + (kv_bh * Nk + cols[:, None]) * DP + dcols[None, :], mask=kmask, other=0)
        sv = tl.load(VS + kv_bh * n_kb + pid_n)
    else:
        vv = tl.load(V16 + (kv_bh * Nk + cols[:, None]) * DP + dcols[None, :], mask=kmask, other=0.0)
        sv = 1.0
    if ATOMIC_DQ:
        kt = tl.load(KT + (kv_bh * DP + dcols[:, None]) * NKP + cols[None, :])
    dk = tl.zeros([BLOCK, DP], dtype=tl.float32)
    dv = tl.zeros([BLOCK, DP], dtype=tl.float32)
    # (every query tile with masks: splitting off the tiles that need none, as the dQ kernel does, made
    # this kernel 137 -> 195 ms at 16k on the H100; TRAIN_NOTES.md, v3)
    lo = 0
    if IS_CAUSAL:  # query row i sees key j iff j <= i + Nk - Nq
        lo = tl.maximum(start_n - (Nk - Nq), 0) // BLOCK * BLOCK
    for g in range(0, G):
        bh = b * Hq + hk * G + g
        for start_m in range(lo, Nq, BLOCK):
            dk, dv, dsc, dss = _dkdv_tile(k, sk, vv, sv, dk, dv, start_m, cols, bh, Q, QS, QT, DO16, DOC, DOT, DOS,
                                          L, DI, Nq, Nk, NQP, n_qb, n_db, BLOCK, QB, DP, IS_CAUSAL, DOV, INTERPRET)
            if ATOMIC_DQ:
                _atomic_dq(dsc, dss, kt, sk, DQACC, bh, start_m, Nq, BLOCK, DP)
    tl.store(DK + (kv_bh * Nk + cols[:, None]) * DP + dcols[None, :], (dk * 0.6931471805599453).to(DK.dtype.element_ty),
             mask=kmask)
    tl.store(DV + (kv_bh * Nk + cols[:, None]) * DP + dcols[None, :], dv.to(DV.dtype.element_ty), mask=kmask)


@triton.jit
def _atomic_dq(dsc, dss, kt, sk, DQACC, bh, start_m, Nq, BLOCK: tl.constexpr, DP: tl.constexpr):
    rows = start_m + tl.arange(0, BLOCK)
    dcols = tl.arange(0, DP)
    dq = tl.dot(tl.trans(dsc), tl.trans(kt)).to(tl.float32) * (dss * sk)
    tl.atomic_add(DQACC + (bh * Nq + rows[:, None]) * DP + dcols[None, :], dq, mask=rows[:, None] < Nq, sem="relaxed")


@triton.jit
def _dq_tile(q, sq, do, sdo, lse, di, dq, start_n, rows, kv_bh, K, KS, KT, V16, VC, VS, Nq, Nk, NKP, n_kb,
             BLOCK: tl.constexpr, DP: tl.constexpr, IS_CAUSAL: tl.constexpr, DOV: tl.constexpr,
             MASK: tl.constexpr, INTERPRET: tl.constexpr):
    """One key tile's share of dQ for the program's queries (MASK = False: no masks needed)."""
    cols = start_n + tl.arange(0, BLOCK)
    dcols = tl.arange(0, DP)
    if MASK:
        kmask = cols[:, None] < Nk
        k = tl.load(K + (kv_bh * Nk + cols[:, None]) * DP + dcols[None, :], mask=kmask, other=0)
    else:
        k = tl.load(K + (kv_bh * Nk + cols[:, None]) * DP + dcols[None, :])
    sk = tl.load(KS + kv_bh * n_kb + start_n // BLOCK)
    s = tl.dot(q, tl.trans(k)).to(tl.float32) * (sk * sq)
    p = tl.math.exp2(s - lse[:, None])
    if MASK:
        p = tl.where(_visible(rows, cols, Nq, Nk, IS_CAUSAL), p, 0.0)
    if DOV:
        if MASK:
            vc = tl.load(VC + (kv_bh * Nk + cols[:, None]) * DP + dcols[None, :], mask=kmask, other=0)
        else:
            vc = tl.load(VC + (kv_bh * Nk + cols[:, None]) * DP + dcols[None, :])
        sv = tl.load(VS + kv_bh * n_kb + start_n // BLOCK)
        dp = tl.dot(do, tl.trans(vc)).to(tl.float32) * (sdo * sv)
    else:
        if MASK:
            v16 = tl.load(V16 + (kv_bh * Nk + cols[:, None]) * DP + dcols[None, :], mask=kmask, other=0.0)
        else:
            v16 = tl.load(V16 + (kv_bh * Nk + cols[:, None]) * DP + dcols[None, :])
        dp = dot_16bit(do, tl.trans(v16), None, INTERPRET)
    ds = p * (dp - di[:, None])
    dsc, dss = _quant_tile(ds)
    kt = tl.load(KT + (kv_bh * DP + dcols[:, None]) * NKP + cols[None, :])
    dq += tl.dot(dsc, tl.trans(kt)).to(tl.float32) * (dss * sk)
    return dq


@triton.jit
def sagebwd_dq_kernel(Q, QS, K, KS, KT, V16, VC, VS, DO16, DOC, DOS, L, DI, DQ, dq_mult,
                      Hq, Hkv, Nq, Nk, NKP, n_qb, n_kb, n_db,
                      BLOCK: tl.constexpr, QB: tl.constexpr, DP: tl.constexpr, IS_CAUSAL: tl.constexpr,
                      DOV: tl.constexpr, INTERPRET: tl.constexpr):
    """Deterministic dQ: one program per (64-query tile, batch, head) loops over the key tiles;
    the key tiles that need no mask run without one; dQ is stored times dq_mult (sm_scale)."""
    start_m, bh, b, h, hk, kv_bh = program_tile(Hq, Hkv, IS_CAUSAL)
    start_m = start_m * BLOCK
    rows = start_m + tl.arange(0, BLOCK)
    dcols = tl.arange(0, DP)
    rmask = rows[:, None] < Nq
    q = tl.load(Q + (bh * Nq + rows[:, None]) * DP + dcols[None, :], mask=rmask, other=0)
    sq = tl.load(QS + bh * n_qb + start_m // QB)
    lse = tl.load(L + bh * Nq + rows, mask=rows < Nq, other=0.0)
    di = tl.load(DI + bh * Nq + rows, mask=rows < Nq, other=0.0)
    sdo = tl.load(DOS + bh * n_db + start_m // BLOCK)
    if DOV:
        do = tl.load(DOC + (bh * Nq + rows[:, None]) * DP + dcols[None, :], mask=rmask, other=0)
    else:
        do = tl.load(DO16 + (bh * Nq + rows[:, None]) * DP + dcols[None, :], mask=rmask, other=0.0)
    dq = tl.zeros([BLOCK, DP], dtype=tl.float32)
    full_end, hi = kv_bounds(start_m // BLOCK, Nq, Nk, BLOCK, BLOCK, IS_CAUSAL)
    full_end = tl.where(start_m + BLOCK > Nq, 0, full_end)  # query rows past the end: all masked
    for start_n in range(0, full_end, BLOCK):
        dq = _dq_tile(q, sq, do, sdo, lse, di, dq, start_n, rows, kv_bh, K, KS, KT, V16, VC, VS, Nq, Nk, NKP, n_kb,
                      BLOCK, DP, IS_CAUSAL, DOV, False, INTERPRET)
    for start_n in range(full_end, hi, BLOCK):
        dq = _dq_tile(q, sq, do, sdo, lse, di, dq, start_n, rows, kv_bh, K, KS, KT, V16, VC, VS, Nq, Nk, NKP, n_kb,
                      BLOCK, DP, IS_CAUSAL, DOV, True, INTERPRET)
    tl.store(DQ + (bh * Nq + rows[:, None]) * DP + dcols[None, :], (dq * dq_mult).to(DQ.dtype.element_ty), mask=rmask)


@triton.jit
def row_dot_kernel(A, B, OUT, n_rows, BLOCK: tl.constexpr, DP: tl.constexpr):
    """OUT[r] = sum_d A[r, d] * B[r, d] in fp32 (Di = rowsum(dO * O), one pass over both)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    dcols = tl.arange(0, DP)
    m = rows[:, None] < n_rows
    a = tl.load(A + rows[:, None] * DP + dcols[None, :], mask=m, other=0.0).to(tl.float32)
    b = tl.load(B + rows[:, None] * DP + dcols[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(OUT + rows, tl.sum(a * b, axis=1), mask=rows < n_rows)


@triton.jit
def transpose_codes_kernel(X, Y, N, NP, BLOCK_N: tl.constexpr, DP: tl.constexpr):
    """Y[bh, d, n] = X[bh, n, d] for n < N, 0 for N <= n < NP (int8 codes, one [BLOCK_N, DP] tile each)."""
    bh = tl.program_id(1)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, DP)
    x = tl.load(X + (bh * N + n[:, None]) * DP + d[None, :], mask=n[:, None] < N, other=0)
    tl.store(Y + (bh * DP + d[:, None]) * NP + n[None, :], tl.trans(x), mask=n[None, :] < NP)


# (query tile, num_warps, num_stages) of the forward, by padded head dim (the query tile divides Q's
# quantization block; D=128 at 64 queries and 4 warps: 44.0 -> 38.5 ms at 16k on the H100, TRAIN_NOTES v4.1)
FWD_CONFIGS = {32: (128, 4, 2), 64: (128, 4, 3), 128: (64, 4, 3), 256: (128, 8, 1)}
# a register cap for the forward, by padded head dim: at D=128 168 registers (12 bytes of spills)
# let three CTAs share an SM instead of two: 38.2 -> 34.7 ms at 16k on the H100 (TRAIN_NOTES v4.2; the
# same cap on the dQ kernel made it slower, 63.5 -> 68.4)
FWD_MAXNREG = {128: 168}
# (num_warps, num_stages) of the backward kernels, by padded head dim
BWD_CONFIGS = {32: (4, 2), 64: (4, 2), 128: (4, 2), 256: (8, 1)}  # the dK/dV kernel
DQ_CONFIGS = dict(BWD_CONFIGS)                                    # the deterministic dQ kernel


def _transposed(codes: torch.Tensor, mult: int) -> torch.Tensor:
    """[B, H, N, DP] -> [B, H, DP, N rounded up to mult] (padding = 0), contiguous, in one pass (a
    torch transposing copy of 268 MB of codes took ~1.8 ms on the H100, four per step)."""
    B, H, n, dp = codes.shape
    n_pad = n + (-n) % mult
    out = torch.empty(B, H, dp, n_pad, dtype=codes.dtype, device=codes.device)
    if out.numel():
        block = 64
        transpose_codes_kernel[(triton.cdiv(n_pad, block), B * H)](codes.contiguous(), out, n, n_pad,
                                                                   BLOCK_N=block, DP=dp)
    return out


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp32 [..., N] = sum over the last dim of a * b (16-bit [..., N, DP] contiguous inputs)."""
    out = torch.empty(a.shape[:-1], dtype=torch.float32, device=a.device)
    n_rows = out.numel()
    if n_rows:
        block = 64
        row_dot_kernel[(triton.cdiv(n_rows, block),)](a.contiguous(), b.contiguous(), out, n_rows, BLOCK=block,
                                                      DP=a.shape[-1])
    return out


def forward_triton(st, *, is_causal: bool, out_dtype: torch.dtype, config=None):
    """Returns (O [B, Hq, Nq, DP] in out_dtype, log2 LSE fp32 [B, Hq, Nq])."""
    qk = st.qk
    B, Hq, Nq, DP = qk.q_codes.shape
    Hkv, Nk = qk.k_codes.shape[1], qk.k_codes.shape[2]
    vt = _transposed(st.v_codes, FWD_KV_TILE)
    dev = qk.q_codes.device
    # stored in out_dtype (a separate fp32 -> 16-bit copy cost ~0.03 ms per call at 1k on the H100)
    o = torch.empty(B, Hq, Nq, DP, dtype=kernel_store_dtype(out_dtype), device=dev)
    lse = torch.empty(B, Hq, Nq, dtype=torch.float32, device=dev)
    block_m, warps, stages = config or FWD_CONFIGS[DP]
    assert FWD_Q_BLOCK % block_m == 0, f"the forward's query tile {block_m} must divide Q's block {FWD_Q_BLOCK}"
    limits = {"maxnreg": FWD_MAXNREG[DP]} if DP in FWD_MAXNREG and not config and not interpreter_enabled() else {}
    grid = (triton.cdiv(Nq, block_m), B * Hq)
    sagebwd_fwd_kernel[grid](qk.q_codes, qk.q_scale, qk.k_codes, qk.k_scale, vt, st.v_scale, o, lse,
                             Hq, Hkv, Nq, Nk, vt.shape[-1], qk.q_scale.shape[-1], qk.k_scale.shape[-1],
                             BLOCK_M=block_m, BLOCK_N=FWD_KV_TILE, DP=DP, IS_CAUSAL=is_causal, QB=FWD_Q_BLOCK,
                             num_warps=warps, num_stages=stages, **limits)
    return o.to(out_dtype), lse


def backward_triton(st, do: torch.Tensor, o: torch.Tensor, lse2: torch.Tensor, *, is_causal: bool,
                    quantize_dov: bool, deterministic: bool, config=None, dq_config=None,
                    out_dtype=torch.float32):
    """(dQ, dK, dV) [.., DP] in out_dtype (summed in fp32, rounded once at the store); see
    :func:`sage3.train_emulation.backward_emulated`."""
    qk = st.qk
    B, Hq, Nq, DP = qk.q_codes.shape
    Hkv, Nk = qk.k_codes.shape[1], qk.k_codes.shape[2]
    dev = do.device
    di = row_dot(do, o)
    qt = _transposed(qk.q_codes, BWD_TILE)
    kt = _transposed(qk.k_codes, BWD_TILE)
    dot_ = _transposed(st.do_codes, BWD_TILE)
    # dK, dV stored in fp32 and rounded after: the dK/dV kernel storing fp16 itself ran 147 ms against
    # 135 at 16k on the H100 (TRAIN_NOTES.md, v3); dQ's kernel stores the input dtype at no cost
    dk = torch.empty(B, Hkv, Nk, DP, dtype=torch.float32, device=dev)
    dv = torch.empty_like(dk)
    # the dQ kernel stores out_dtype; the atomic path sums dQ in place (fp32, scaled and rounded after)
    dq_stored = kernel_store_dtype(out_dtype) if deterministic else torch.float32
    dq = (torch.empty if deterministic else torch.zeros)(B, Hq, Nq, DP, dtype=dq_stored, device=dev)
    warps, stages = config or BWD_CONFIGS[DP]
    dq_warps, dq_stages = dq_config or DQ_CONFIGS[DP]
    common = dict(BLOCK=BWD_TILE, QB=FWD_Q_BLOCK, DP=DP, IS_CAUSAL=is_causal, DOV=quantize_dov,
                  INTERPRET=interpreter_enabled())
    n_qb, n_kb, n_db = qk.q_scale.shape[-1], qk.k_scale.shape[-1], st.do_scale.shape[-1]
    sagebwd_dkdv_kernel[(triton.cdiv(Nk, BWD_TILE), B * Hkv)](
        qk.q_codes, qk.q_scale, qt, qk.k_codes, qk.k_scale, kt, st.v16, st.v_codes, st.v_scale,
        do, st.do_codes, dot_, st.do_scale, lse2, di, dk, dv, dq,
        Hq, Hkv, Nq, Nk, qt.shape[-1], kt.shape[-1], n_qb, n_kb, n_db, ATOMIC_DQ=not deterministic,
        num_warps=warps, num_stages=stages, **common)
    if deterministic:
        sagebwd_dq_kernel[(triton.cdiv(Nq, BWD_TILE), B * Hq)](
            qk.q_codes, qk.q_scale, qk.k_codes, qk.k_scale, kt, st.v16, st.v_codes, st.v_scale,
            do, st.do_codes, st.do_scale, lse2, di, dq, st.sm_scale,
            Hq, Hkv, Nq, Nk, kt.shape[-1], n_qb, n_kb, n_db, num_warps=dq_warps, num_stages=dq_stages, **common)
        return tuple(g.to(out_dtype) for g in (dq, dk, dv))
    return tuple(g.to(out_dtype) for g in ((dq * st.sm_scale), dk, dv))

