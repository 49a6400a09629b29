"""Triton kernels of the decode path (:mod:`common.decode`): split-KV attention that quantizes
K and V in registers, and the combine of the splits.

``decode_split_kernel``: grid (splits, B*Hkv, row tiles). A program owns the rows of every query
head that shares one KV head (GQA: row R is head ``hk*G + R // NQP``, query ``R % NQP``), and one
contiguous range of KV tiles. It reads Q, quantizes it (per row, optionally minus its head's mean),
then for each tile of ``T`` keys reads K and V once in their own dtype and:

    m_j   = mean of the tile's keys (K smoothing, per tile)            fp32
    k8    = rne((k - m_j) * RN(1 / sk))  sk per tile or per token      round to nearest even
    s     = int32(q8 . k8) * sq * sk + q . m_j  [+ mean_q . (k - m_j)]  log2 domain, true scores
    p     = exp2(s - m_t [+ log2 P_SCALE])   m_t: the tile's own row max; m' = max(m, m_t)
    l     = alpha l + beta rowsum p         alpha = exp2(m - m'), beta = exp2(m_t - m')
    acc   = alpha acc + beta PV(p, v)    fp16 P x fp16 V (fp16 or fp32 tile sum, a power of two on V
                                     when |V| is large), or FP8 P x FP8 V per channel per tile

and writes its normalized partial output and log2 LSE. That sweep is the fast one (no NaN/Inf checks,
no fp16 range guard; a flag per program says whether either was needed). ``decode_combine_kernel``
redoes the flagged programs with the careful sweep (NaN for a row that sees a non-finite value),
merges the splits by their LSE and writes the output in the caller's layout and dtype.

``decode_cached_kernel``: the same sweep over a quantized KV cache (common.kv_cache): the tiles it
holds as codes are read as codes (no quantization, 0.54x the bytes), the partial last tile is
quantized here by the careful tile, and the last program of each KV head merges the splits (one
launch).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_attention import kv_bounds_from, sequence_bounds
from .triton_quant import abs_nan_as_inf, to_fp8, zero_nonfinite

# PV (constexpr), common.decode.PV_KINDS: 0 fp16 P x fp16 V with fp16 tile sums, 1 the same with fp32
# sums, 2 FP8 E4M3 P x V, 3 FP8 E5M2 P x V


@triton.jit
def _round_int(x):
    """Round to nearest even, to int8, in two integer-exact steps: adding 1.5 * 2^23 leaves
    round(x) in the low mantissa bits (fp32 addition rounds to nearest even). x = value *
    RN(1 / RN(absmax / QMAX)) is within a few ulp of QMAX at most, so no clamp is needed."""
    return ((x + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000).to(tl.int8)


@triton.jit
def _nonfinite_rows(x):
    """1 for each row of x with a NaN or Inf, else 0 (int32)."""
    return tl.max(tl.where(x == x, tl.where(tl.abs(x) < float("inf"), 0, 1), 1), axis=1)


@triton.jit
def _fp16_guard(vmax, T_EFF: tl.constexpr):
    """The power of two g <= 1 with T_EFF * vmax * g <= 2^15 (exact: from the exponent bits)."""
    x = vmax * (T_EFF / 32768.0)
    e = ((x.to(tl.int32, bitcast=True) + 0x7FFFFF) >> 23) - 127  # ceil(log2 x) for normal x > 0
    e = tl.where(x > 1.0, e, 0)
    return ((127 - e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _own_max_update(s, m_i, l_i, log2_pscale, MASKED: tl.constexpr):
    """P of a tile's scores after the tile's own row max m_t, and the running state's update:
    (p, alpha, beta, m', l'); the tile enters as alpha * state + beta * tile, beta = exp2(m_t - m')."""
    m_t = tl.max(s, axis=1)
    m_new = tl.maximum(m_i, m_t)
    if MASKED:
        t_use = tl.where(m_t == float("-inf"), 0.0, m_t)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        beta = tl.where(m_t == float("-inf"), 0.0, tl.math.exp2(t_use - m_use))
    else:
        t_use = m_t  # every row saw a key: finite
        m_use = m_new
        beta = tl.math.exp2(t_use - m_use)
    p = tl.math.exp2(s - (t_use - log2_pscale)[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, axis=1) * beta
    return p, alpha, beta, m_new, l_i


@triton.jit
def _tile(acc, l_i, m_i, kacc, bad, q, q8, sq, mu_rows, row_ok, i, k_base, v_base, skn, svn, nk, q_offset, start,
          log2_pscale, dcols, dm, mask_base, mask_rows, smn, T: tl.constexpr, QMAX: tl.constexpr,
          K_PER_TOKEN: tl.constexpr, SMOOTH_K: tl.constexpr, SMOOTH_Q: tl.constexpr, PV: tl.constexpr,
          IS_CAUSAL: tl.constexpr, INTERPRET: tl.constexpr, DELTA_PRECISION: tl.constexpr, CAREFUL: tl.constexpr,
          MASKED: tl.constexpr, EVEN_D: tl.constexpr, MASK_KIND: tl.constexpr):
    """One KV tile. MASKED: the tile may hold keys past nk or, causal, keys some row may not see,
    or an attn_mask applies (else no bounds or visibility masks at all). MASK_KIND (common.masking):
    1 keeps the keys whose uint8 mask is nonzero, 2 adds the fp32 log2 bias; ``mask_base`` is the
    mask at this program's sequence and ``mask_rows`` each row's offset in it (head and query)."""
    cols = start + tl.arange(0, T)
    k_base = k_base + tl.cast(start, tl.int64) * skn
    v_base = v_base + tl.cast(start, tl.int64) * svn
    if MASKED:
        inb = (cols < nk)[:, None] & dm[None, :]
        visible = row_ok[:, None] & (cols < nk)[None, :]
        if IS_CAUSAL:
            visible = visible & (cols[None, :] <= i[:, None] + q_offset)
        if MASK_KIND != 0:  # a key the mask drops is not seen: no NaN of its reaches the row (common.nonfinite)
            mvals = tl.load(mask_base + mask_rows[:, None] + tl.cast(cols, tl.int64)[None, :] * smn, mask=visible,
                            other=0)
            if MASK_KIND == 1:
                visible = visible & (mvals != 0)
            else:  # (a NaN bias keeps the key: the row gets NaN, as from SDPA and the emulation)
                visible = visible & (mvals != float("-inf"))
    else:
        inb = dm[None, :]
        visible = row_ok[:, None]
    if MASKED or not EVEN_D:
        k = tl.load(k_base + tl.arange(0, T)[:, None] * skn + dcols[None, :], mask=inb, other=0.0).to(tl.float32)
    else:
        k = tl.load(k_base + tl.arange(0, T)[:, None] * skn + dcols[None, :]).to(tl.float32)
    if CAREFUL:
        k_bad = _nonfinite_rows(k)
        k = zero_nonfinite(k)
    if SMOOTH_K or not CAREFUL:
        ksum = tl.sum(k, axis=0)
    if not CAREFUL:
        kacc += ksum
    if SMOOTH_K:
        if MASKED:
            mk = ksum * tl.math.div_rn(1.0, tl.minimum(nk - start, T).to(tl.float32))
            kc = tl.where(inb, k - mk[None, :], 0.0)
        else:
            mk = ksum * (1.0 / T)  # exact: T is a power of two
            kc = k - mk[None, :]
        qm = tl.sum(q * mk[None, :], axis=1)
    else:
        kc = k
    if K_PER_TOKEN:
        sk = tl.math.div_rn(tl.max(tl.abs(kc), axis=1), QMAX * 1.0)
        k8 = _round_int(kc * tl.math.div_rn(1.0, tl.where(sk == 0.0, 1.0, sk))[:, None])
    else:
        sk = tl.math.div_rn(tl.max(tl.max(tl.abs(kc), axis=1), axis=0), QMAX * 1.0)
        k8 = _round_int(kc * tl.math.div_rn(1.0, tl.where(sk == 0.0, 1.0, sk)))
    s = tl.dot(q8, tl.trans(k8), out_dtype=tl.int32).to(tl.float32)
    if K_PER_TOKEN:
        s = s * sq[:, None] * sk[None, :]
    else:
        s = s * sq[:, None] * sk
    if SMOOTH_K:
        s = s + qm[:, None]
    if SMOOTH_Q:
        s = s + tl.dot(mu_rows, tl.trans(kc), input_precision=DELTA_PRECISION)
    if MASKED:
        if MASK_KIND == 2:
            s = tl.where(visible, s + mvals, float("-inf"))
        else:
            s = tl.where(visible, s, float("-inf"))
    # P after the tile's own row max m_t (common.online_softmax.OnlineSoftmax.update_own_max): the
    # tile enters the running state scaled by beta = exp2(m_t - m')
    p, alpha, beta, m_new, l_i = _own_max_update(s, m_i, l_i, log2_pscale, MASKED)
    if MASKED or not EVEN_D:
        v = tl.load(v_base + tl.arange(0, T)[:, None] * svn + dcols[None, :], mask=inb, other=0.0)
    else:
        v = tl.load(v_base + tl.arange(0, T)[:, None] * svn + dcols[None, :])
    if CAREFUL:
        vf = v.to(tl.float32)
        key_bad = k_bad | _nonfinite_rows(vf)
        bad = bad | tl.max(tl.where(visible & (key_bad[None, :] != 0), 1, 0), axis=1)
        vf = zero_nonfinite(vf)
    if PV == 0 or PV == 1:  # fp16 P and V (the careful sweep scales V by a power of two)
        if CAREFUL:
            gv = _fp16_guard(tl.max(tl.max(tl.abs(vf), axis=1), axis=0), T if PV == 0 else 1)
            v16 = (vf * gv).to(tl.float16)
        else:
            v16 = v.to(tl.float16)
        if PV == 0:
            pv = tl.dot(p.to(tl.float16), v16, out_dtype=tl.float16).to(tl.float32)
        else:
            pv = tl.dot(p.to(tl.float16), v16, out_dtype=tl.float32)
        if CAREFUL:
            pv = pv / gv
    else:  # FP8 P (static scale) x FP8 V (per channel over this tile); exact products, fp32 sum
        if not CAREFUL:
            vf = v.to(tl.float32)
        if PV == 2:
            fmax = 448.0
        else:
            fmax = 57344.0
        # a NaN counts as +inf in the channel max: then pv = 0 * inf = NaN, so the fast sweep's check
        # sees it whatever the FP8 conversion does with a NaN (Triton's CPU interpreter makes it 0)
        sv = tl.math.div_rn(tl.max(abs_nan_as_inf(vf), axis=0), fmax)
        v8 = to_fp8(vf * tl.math.div_rn(1.0, tl.where(sv == 0.0, 1.0, sv))[None, :], PV == 3, INTERPRET)
        p8 = to_fp8(p, PV == 3, INTERPRET)
        pv = tl.dot(p8.to(tl.float16), v8.to(tl.float16), out_dtype=tl.float32) * sv[None, :]
    acc = acc * alpha[:, None] + pv * beta[:, None]
    return acc, l_i, m_new, kacc, bad


@triton.jit
def _sweep(q, q8, sq, mu_rows, bad, row_ok, i, k_base, v_base, skn, svn, nk, q_offset, t_begin, t_end,
           log2_pscale, dcols, dm, mask_base, mask_rows, smn, BLOCK_M: tl.constexpr, T: tl.constexpr,
           DP: tl.constexpr, QMAX: tl.constexpr, K_PER_TOKEN: tl.constexpr, SMOOTH_K: tl.constexpr,
           SMOOTH_Q: tl.constexpr, PV: tl.constexpr, IS_CAUSAL: tl.constexpr, INTERPRET: tl.constexpr,
           DELTA_PRECISION: tl.constexpr, CAREFUL: tl.constexpr, EVEN_D: tl.constexpr, MASK_KIND: tl.constexpr):
    """One program's KV tiles [t_begin, t_end): (acc, l, m, bad rows, check). Tiles that every valid
    row sees in full run without masks, the rest (the tail past nk, the causal diagonal, every tile
    under an attn_mask) with them.
    CAREFUL: zero non-finite K/V values, mark the rows that see them, and scale V by the fp16 guard;
    else ``check`` is non-finite when any of that was needed."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DP], dtype=tl.float32)
    kacc = tl.zeros([DP], dtype=tl.float32)
    # tiles [0, full) are in bounds and, causal, seen in full by row 0 and so by every row
    full, _ = kv_bounds_from(0, q_offset, nk, 1, T, IS_CAUSAL)
    full_end = tl.maximum(tl.minimum(full, t_end), t_begin)
    if MASK_KIND != 0:
        full_end = t_begin
    for start in range(t_begin, full_end, T):
        acc, l_i, m_i, kacc, bad = _tile(acc, l_i, m_i, kacc, bad, q, q8, sq, mu_rows, row_ok, i, k_base, v_base,
                                         skn, svn, nk, q_offset, start, log2_pscale, dcols, dm, mask_base, mask_rows,
                                         smn, T, QMAX, K_PER_TOKEN, SMOOTH_K, SMOOTH_Q, PV, IS_CAUSAL, INTERPRET,
                                         DELTA_PRECISION, CAREFUL, False, EVEN_D, 0)
    for start in range(full_end, t_end, T):
        acc, l_i, m_i, kacc, bad = _tile(acc, l_i, m_i, kacc, bad, q, q8, sq, mu_rows, row_ok, i, k_base, v_base,
                                         skn, svn, nk, q_offset, start, log2_pscale, dcols, dm, mask_base, mask_rows,
                                         smn, T, QMAX, K_PER_TOKEN, SMOOTH_K, SMOOTH_Q, PV, IS_CAUSAL, INTERPRET,
                                         DELTA_PRECISION, CAREFUL, True, EVEN_D, MASK_KIND)
    chk = tl.sum(kacc, axis=0) + tl.sum(l_i, axis=0) + tl.sum(tl.sum(acc, axis=1), axis=0)
    return acc, l_i, m_i, bad, chk


@triton.jit
def decode_split_kernel(Q, K, V, PO, PL, FLAG, QLEN, KLEN, MASKP, smb, smh, smm, smn,
                        sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                        Hkv, Nq, Nk, D, G, qk_mult, tiles_per_split, log2_pscale,
                        BLOCK_M: tl.constexpr, NQP: tl.constexpr, T: tl.constexpr, DP: tl.constexpr,
                        QMAX: tl.constexpr, K_PER_TOKEN: tl.constexpr, SMOOTH_K: tl.constexpr,
                        SMOOTH_Q: tl.constexpr, PV: tl.constexpr, IS_CAUSAL: tl.constexpr,
                        HAS_LENS: tl.constexpr, PER_SEQ_CAUSAL: tl.constexpr, INTERPRET: tl.constexpr,
                        DELTA_PRECISION: tl.constexpr, EVEN_D: tl.constexpr, MASK_KIND: tl.constexpr):
    """The fast sweep of every (split, KV head, row tile): no NaN/Inf checks, no fp16 range guard.
    A non-finite input or an fp16 overflow cannot vanish (it reaches K's running token sum, the
    scores, l or acc), so one check at the end sets the program's FLAG, and the combine kernel
    redoes the flagged programs with the careful sweep. (In the combine kernel rather than here:
    the careful sweep's registers would otherwise be allocated, and occupancy lost, everywhere.)"""
    _decode_program(Q, K, V, PO, PL, FLAG, QLEN, KLEN, MASKP, smb, smh, smm, smn,
                    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                    Hkv, Nq, Nk, D, G, qk_mult, tiles_per_split, log2_pscale,
                    tl.program_id(0), tl.program_id(1), tl.program_id(2), tl.num_programs(1), tl.num_programs(2),
                    BLOCK_M, NQP, T, DP, QMAX, K_PER_TOKEN, SMOOTH_K, SMOOTH_Q, PV, IS_CAUSAL, HAS_LENS,
                    PER_SEQ_CAUSAL, INTERPRET, DELTA_PRECISION, False, EVEN_D, MASK_KIND)


@triton.jit
def _split_keys(split, tiles_per_split, nk, nq, q_offset, T: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """The keys [t_begin, t_end) of a program's split: its tiles, cut at the keys its rows may see
    ([0, nk); causal: up to the last valid row's diagonal)."""
    hi = nk
    if IS_CAUSAL:
        hi = tl.minimum(nk, nq + q_offset)
    hi = tl.maximum(hi, 0)
    t_begin = split * tiles_per_split * T
    return t_begin, tl.minimum(t_begin + tiles_per_split * T, hi)


@triton.jit
def _quantized_q(Q, b, hk, g, i, row_ok, nq, sqb, sqh, sqn, G, qk_mult, dcols, dm, BLOCK_M: tl.constexpr,
                 NQP: tl.constexpr, DP: tl.constexpr, QMAX: tl.constexpr, SMOOTH_Q: tl.constexpr):
    """The program's rows of Q: (q log2-scaled fp32 with non-finite values zeroed, INT codes, their
    per-row scales, each row's head mean (SMOOTH_Q), rows with a non-finite value (NaN at the end))."""
    q = tl.load(Q + b.to(tl.int64) * sqb + (hk.to(tl.int64) * G + g[:, None]) * sqh + i[:, None] * sqn + dcols[None, :],
                mask=row_ok[:, None] & dm[None, :], other=0.0).to(tl.float32) * qk_mult
    bad = _nonfinite_rows(q)
    q = zero_nonfinite(q)
    if SMOOTH_Q:  # each head's mean over its queries; mean_q . (k - m_j) is added back in fp32
        q3 = tl.reshape(q, (BLOCK_M // NQP, NQP, DP))
        mu = tl.sum(q3, axis=1) / tl.maximum(nq, 1).to(tl.float32)
        mu_rows = tl.reshape(tl.broadcast_to(mu[:, None, :], (BLOCK_M // NQP, NQP, DP)), (BLOCK_M, DP))
        mu_rows = tl.where(row_ok[:, None], mu_rows, 0.0)
        qc = tl.where(row_ok[:, None], q - mu_rows, 0.0)
    else:
        qc = q
        mu_rows = q  # unused
    sq = tl.math.div_rn(tl.max(tl.abs(qc), axis=1), QMAX * 1.0)
    q8 = _round_int(qc * tl.math.div_rn(1.0, tl.where(sq == 0.0, 1.0, sq))[:, None])
    return q, q8, sq, mu_rows, bad


@triton.jit
def _decode_program(Q, K, V, PO, PL, FLAG, QLEN, KLEN, MASKP, smb, smh, smm, smn,
                    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                    Hkv, Nq, Nk, D, G, qk_mult, tiles_per_split, log2_pscale,
                    split, kv_bh, row_tile, n_kv_bh, n_row_tiles,
                    BLOCK_M: tl.constexpr, NQP: tl.constexpr, T: tl.constexpr, DP: tl.constexpr,
                    QMAX: tl.constexpr, K_PER_TOKEN: tl.constexpr, SMOOTH_K: tl.constexpr,
                    SMOOTH_Q: tl.constexpr, PV: tl.constexpr, IS_CAUSAL: tl.constexpr,
                    HAS_LENS: tl.constexpr, PER_SEQ_CAUSAL: tl.constexpr, INTERPRET: tl.constexpr,
                    DELTA_PRECISION: tl.constexpr, CAREFUL: tl.constexpr, EVEN_D: tl.constexpr,
                    MASK_KIND: tl.constexpr):
    b = kv_bh // Hkv
    hk = kv_bh % Hkv
    R = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    g = R // NQP
    i = R % NQP
    nq, nk, q_offset = sequence_bounds(b, Nq, Nk, QLEN, KLEN, HAS_LENS, PER_SEQ_CAUSAL)
    row_ok = (g < G) & (i < nq)
    dcols = tl.arange(0, DP)
    dm = dcols < D

    q, q8, sq, mu_rows, bad = _quantized_q(Q, b, hk, g, i, row_ok, nq, sqb, sqh, sqn, G, qk_mult, dcols, dm,
                                           BLOCK_M, NQP, DP, QMAX, SMOOTH_Q)

    t_begin, t_end = _split_keys(split, tiles_per_split, nk, nq, q_offset, T, IS_CAUSAL)

    # 64-bit bases (and tile starts, _tile): K and V may be views into a larger buffer, e.g. a
    # preallocated cache sliced to the current length, past 2^31 elements while the views are small
    k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    # attn_mask: the mask at this sequence, and each row's offset in it (its query head and query)
    mask_base = MASKP + b.to(tl.int64) * smb
    mask_rows = (hk * G + g).to(tl.int64) * smh + i.to(tl.int64) * smm
    acc, l_i, m_i, bad, chk = _sweep(q, q8, sq, mu_rows, bad, row_ok, i, k_base, v_base, skn, svn, nk, q_offset,
                                     t_begin, t_end, log2_pscale, dcols, dm, mask_base, mask_rows, smn, BLOCK_M, T, DP,
                                     QMAX, K_PER_TOKEN, SMOOTH_K, SMOOTH_Q, PV, IS_CAUSAL, INTERPRET, DELTA_PRECISION,
                                     CAREFUL, EVEN_D, MASK_KIND)
    if not CAREFUL:
        pid = (split * n_kv_bh + kv_bh) * n_row_tiles + row_tile
        tl.store(FLAG + pid, (chk - chk != 0.0).to(tl.int32))

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    lse2 = m_i + tl.math.log2(l_i) - log2_pscale
    lse2 = tl.where(bad != 0, float("nan"), lse2)
    base = (split * n_kv_bh + kv_bh) * n_row_tiles * BLOCK_M + R
    tl.store(PO + base[:, None] * DP + dcols[None, :], out)
    tl.store(PL + base, lse2)


@triton.jit
def decode_combine_kernel(Q, K, V, PO, PL, FLAG, QLEN, KLEN, MASKP, smb, smh, smm, smn, O, LSE, n_splits,
                          sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                          Hkv, Nq, Nk, D, G, qk_mult, tiles_per_split, log2_pscale,
                          BLOCK_M: tl.constexpr, NQP: tl.constexpr, T: tl.constexpr, DP: tl.constexpr,
                          QMAX: tl.constexpr, K_PER_TOKEN: tl.constexpr, SMOOTH_K: tl.constexpr,
                          SMOOTH_Q: tl.constexpr, PV: tl.constexpr, IS_CAUSAL: tl.constexpr,
                          HAS_LENS: tl.constexpr, PER_SEQ_CAUSAL: tl.constexpr, INTERPRET: tl.constexpr,
                          DELTA_PRECISION: tl.constexpr, EVEN_D: tl.constexpr, MASK_KIND: tl.constexpr,
                          RETURN_LSE: tl.constexpr):
    """Merge the splits of one (KV head, row tile) by their LSE, after redoing (careful sweep) the
    splits the fast sweep flagged; writes the output in the caller's layout and dtype."""
    kv_bh = tl.program_id(0)
    for s in range(0, n_splits):
        if tl.load(FLAG + (s * tl.num_programs(0) + kv_bh) * tl.num_programs(1) + tl.program_id(1)) != 0:
            _decode_program(Q, K, V, PO, PL, FLAG, QLEN, KLEN, MASKP, smb, smh, smm, smn,
                            sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                            Hkv, Nq, Nk, D, G, qk_mult, tiles_per_split, log2_pscale,
                            s, kv_bh, tl.program_id(1), tl.num_programs(0), tl.num_programs(1),
                            BLOCK_M, NQP, T, DP, QMAX, K_PER_TOKEN, SMOOTH_K, SMOOTH_Q, PV, IS_CAUSAL, HAS_LENS,
                            PER_SEQ_CAUSAL, INTERPRET, DELTA_PRECISION, True, EVEN_D, MASK_KIND)
    tl.debug_barrier()  # the redone partials were written by other threads of this program
    _merge_splits(PO, PL, O, LSE, n_splits, sob, soh, son, Hkv, Nq, D, G, kv_bh, tl.program_id(1),
                  tl.num_programs(0), tl.num_programs(1), BLOCK_M, NQP, DP, RETURN_LSE, "")


@triton.jit
def _merge_splits(PO, PL, O, LSE, n_splits, sob, soh, son, Hkv, Nq, D, G, kv_bh, row_tile, n_kv_bh, n_row_tiles,
                  BLOCK_M: tl.constexpr, NQP: tl.constexpr, DP: tl.constexpr, RETURN_LSE: tl.constexpr,
                  PART_CACHE: tl.constexpr):
    """The output rows of one (KV head, row tile): its splits' partials merged by their LSE, in the
    caller's layout and dtype. PART_CACHE: the partials' load cache modifier ("": default)."""
    b = kv_bh // Hkv
    hk = kv_bh % Hkv
    R = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    g = R // NQP
    i = R % NQP
    dcols = tl.arange(0, DP)
    stride_split = n_kv_bh * n_row_tiles * BLOCK_M
    base = kv_bh * n_row_tiles * BLOCK_M + R
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    den = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DP], dtype=tl.float32)
    bad = tl.zeros([BLOCK_M], dtype=tl.int32)
    for s in range(0, n_splits):
        lse = tl.load(PL + s * stride_split + base, cache_modifier=PART_CACHE)
        bad = bad | tl.where(lse != lse, 1, 0)
        lse = tl.where(lse != lse, float("-inf"), lse)
        o = tl.load(PO + (s * stride_split + base)[:, None] * DP + dcols[None, :], cache_modifier=PART_CACHE)
        m_new = tl.maximum(m, lse)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m - m_use)
        w = tl.math.exp2(lse - m_use)
        den = den * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o
        m = m_new
    out = acc / tl.where(den == 0.0, 1.0, den)[:, None]
    out = tl.where(bad[:, None] != 0, float("nan"), out)
    row_ok = (g < G) & (i < Nq)
    h = hk * G + g
    tl.store(O + b * sob + h[:, None] * soh + i[:, None] * son + dcols[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (dcols < D)[None, :])
    if RETURN_LSE:
        lse_out = (m + tl.math.log2(den)) * 0.6931471805599453
        lse_out = tl.where(bad != 0, float("nan"), lse_out)
        tl.store(LSE + (b * Hkv * G + h) * Nq + i, lse_out, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# decode from a quantized KV cache (common.kv_cache): the tiles the cache holds as codes are read
# as codes; the keys past them (fewer than T) are quantized here, as above
# ----------------------------------------------------------------------------------------------

@triton.jit
def _tile_cached(acc, l_i, m_i, q, q8, sq, i, k_codes, k_scales, k_means, v_codes, v_scales, scn, start, q_offset,
                 log2_pscale, dcols, T: tl.constexpr, DP: tl.constexpr, PV: tl.constexpr, INTERPRET: tl.constexpr,
                 MASKED: tl.constexpr):
    """One KV tile the cache holds as codes (pointers at the program's KV head): INT8 codes of
    k - m_j with a scale per token and m_j the tile's token mean (fp32), FP8 codes of V with a scale
    per channel. The same scores and P V as :func:`_tile` computes from the keys themselves.
    MASKED: causal, some row does not see some of the tile's keys."""
    cols = start + tl.arange(0, T)
    tile = start // T
    k8 = tl.load(k_codes + cols[:, None] * scn + dcols[None, :])
    sk = tl.load(k_scales + cols)
    mk = tl.load(k_means + tile * DP + dcols)
    s = tl.dot(q8, tl.trans(k8), out_dtype=tl.int32).to(tl.float32) * sq[:, None] * sk[None, :]
    s = s + tl.sum(q * mk[None, :], axis=1)[:, None]
    if MASKED:
        s = tl.where(cols[None, :] <= i[:, None] + q_offset, s, float("-inf"))
    p, alpha, beta, m_new, l_i = _own_max_update(s, m_i, l_i, log2_pscale, MASKED)
    v8 = tl.load(v_codes + cols[:, None] * scn + dcols[None, :])
    sv = tl.load(v_scales + tile * DP + dcols)
    p8 = to_fp8(p, PV == 3, INTERPRET)  # FP8 values are exact in fp16: 16-bit tensor cores, fp32 sums
    pv = tl.dot(p8.to(tl.float16), v8.to(tl.float16), out_dtype=tl.float32) * sv[None, :]
    acc = acc * alpha[:, None] + pv * beta[:, None]
    return acc, l_i, m_new


@triton.jit
def decode_cached_kernel(Q, KC, KS, KM, VC, VS, KT, VT, FIRST_BAD, SEQLENS, PO, PL, COUNT, O, LSE,
                         sqb, sqh, sqn, scb, sch, scn, ssb, ssh, smb, smh, stb, sth, stn, sob, soh, son,
                         Hkv, Nq, D, G, qk_mult, tiles_per_split, log2_pscale,
                         BLOCK_M: tl.constexpr, NQP: tl.constexpr, T: tl.constexpr, DP: tl.constexpr,
                         PV: tl.constexpr, IS_CAUSAL: tl.constexpr, INTERPRET: tl.constexpr,
                         EVEN_D: tl.constexpr, RETURN_LSE: tl.constexpr):
    """Grid (splits, B*Hkv, row tiles), as decode_split_kernel. KC/VC: the cache's K and V codes
    [B, Hkv, capacity, DP] (strides scb, sch, scn); KS: K's scales [B, Hkv, capacity]; KM, VS: K's
    tile means and V's channel scales [B, Hkv, tiles, DP]; KT, VT: the keys past the n_cached
    quantized ones, [B, Hkv, T, D] in the input dtype; FIRST_BAD: per (batch, KV head) the first key
    with a non-finite value (quantized as zeros), or a value >= Nk; SEQLENS: each sequence's keys
    Nk (its first Nk // T * T as codes), read here: the launch depends on the longest only. Cached tiles have no NaN/Inf
    and no fp16 range to guard, so the only careful tile is the last, partial one.

    One launch: each program writes its split's partial (PO, PL) and takes a ticket on its (KV head,
    row tile)'s counter (COUNT, zero between calls); the last program of each merges the splits
    into O (and LSE) and puts the counter back to zero. (A second launch for the merge cost ~30 us
    of host time per call: the eager call was host-bound at 16k keys.)"""
    split = tl.program_id(0)
    kv_bh = tl.program_id(1)
    row_tile = tl.program_id(2)
    b = kv_bh // Hkv
    hk = kv_bh % Hkv
    R = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    g = R // NQP
    i = R % NQP
    row_ok = (g < G) & (i < Nq)
    Nk = tl.load(SEQLENS + b)
    n_cached = Nk // T * T
    q_offset = Nk - Nq
    dcols = tl.arange(0, DP)
    dm = dcols < D
    q, q8, sq, mu_rows, bad = _quantized_q(Q, b, hk, g, i, row_ok, Nq, sqb, sqh, sqn, G, qk_mult, dcols, dm,
                                           BLOCK_M, NQP, DP, 127, False)
    first_bad = tl.load(FIRST_BAD + kv_bh)
    if IS_CAUSAL:
        bad = bad | tl.where(first_bad <= i + q_offset, 1, 0)
    else:
        bad = bad | tl.where(first_bad < Nk, 1, 0)

    t_begin, t_end = _split_keys(split, tiles_per_split, Nk, Nq, q_offset, T, IS_CAUSAL)
    full, _ = kv_bounds_from(0, q_offset, Nk, 1, T, IS_CAUSAL)  # tiles [0, full): every row sees them whole
    c_end = tl.maximum(tl.minimum(t_end, n_cached), t_begin)
    u_end = tl.maximum(tl.minimum(full, c_end), t_begin)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DP], dtype=tl.float32)
    kc = KC + b * scb + hk * sch
    vc = VC + b * scb + hk * sch
    ks = KS + b * ssb + hk * ssh
    km = KM + b * smb + hk * smh
    vs = VS + b * smb + hk * smh
    for start in range(t_begin, u_end, T):
        acc, l_i, m_i = _tile_cached(acc, l_i, m_i, q, q8, sq, i, kc, ks, km, vc, vs, scn, start, q_offset,
                                     log2_pscale, dcols, T, DP, PV, INTERPRET, False)
    for start in range(u_end, c_end, T):
        acc, l_i, m_i = _tile_cached(acc, l_i, m_i, q, q8, sq, i, kc, ks, km, vc, vs, scn, start, q_offset,
                                     log2_pscale, dcols, T, DP, PV, INTERPRET, True)
    if (t_end > n_cached) & (t_begin <= n_cached):  # the last, partial tile: its keys in the input dtype, checked as they are read
        kt = KT + b * stb + hk * sth - n_cached * stn  # (indexed by the key's position in the sequence)
        vt = VT + b * stb + hk * sth - n_cached * stn
        kacc = tl.zeros([DP], dtype=tl.float32)
        acc, l_i, m_i, kacc, bad = _tile(acc, l_i, m_i, kacc, bad, q, q8, sq, mu_rows, row_ok, i, kt, vt, stn, stn,
                                         Nk, q_offset, n_cached, log2_pscale, dcols, dm, FIRST_BAD, i, 0, T, 127, True,
                                         True, False, PV, IS_CAUSAL, INTERPRET, "tf32x3", True, True, EVEN_D, 0)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    lse2 = m_i + tl.math.log2(l_i) - log2_pscale
    lse2 = tl.where(bad != 0, float("nan"), lse2)
    base = (split * tl.num_programs(1) + kv_bh) * tl.num_programs(2) * BLOCK_M + R
    tl.store(PO + base[:, None] * DP + dcols[None, :], out)
    tl.store(PL + base, lse2)
    # the last of the (KV head, row tile)'s programs to finish merges: the barrier orders this
    # program's stores before its ticket (release), the ticket's acquire orders the others' before
    # the merge's loads, which skip L1 (.cg: lines an earlier call left there would be stale)
    tl.debug_barrier()
    counter = COUNT + kv_bh * tl.num_programs(2) + row_tile
    ticket = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
    if ticket == tl.num_programs(0) - 1:
        tl.store(counter, 0)
        _merge_splits(PO, PL, O, LSE, tl.num_programs(0), sob, soh, son, Hkv, Nq, D, G, kv_bh, row_tile,
                      tl.num_programs(1), tl.num_programs(2), BLOCK_M, NQP, DP, RETURN_LSE, ".cg")
