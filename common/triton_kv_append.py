"""The quantized KV cache's append of one key per sequence on the device (common.kv_cache), for
decode steps captured in a CUDA graph.

The cache's own append reads each sequence's length on the host (a Python int), so a captured
graph would replay one position. This kernel reads the position from ``SEQLENS`` (the lengths the
decode kernel reads too) and moves it on, so one captured step appends at the right place at
every replay: grid (B * Hkv,), program (b, h) writes its key and value into the tail tile at
``SEQLENS[b] % T`` and, where that key fills the tile, quantizes the tile as the host path's
``_quantize_tiles`` does (:func:`common.decode.quantize_k_tile`, :func:`common.decode.quantize_v_tile_fp8`:
K minus the tile's token mean, INT8 per token; V as FP8 per channel; NaN/Inf keys as zeros, the
first one remembered). The tile's mean is a sum in a different order than torch's, so a code may
differ by one from the host path's where a product lands on a rounding tie's edge.

The last of the H programs of sequence b to take its ticket (``ARRIVED[b]``) moves ``SEQLENS[b]``
on (every program of b has read it by then) and puts the ticket back to zero. A sequence already
holding ``max_seqlen`` keys keeps its length: the key is dropped (the eager append raises instead).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_decode import _nonfinite_rows, _round_int
from .triton_quant import to_fp8, zero_nonfinite

_NO_BAD_KEY = tl.constexpr(2**31 - 1)


@triton.jit
def append_step_kernel(K, V, TK, TV, LTK, LTV, KC, KS, KM, VC, VS, FIRST_BAD, SEQLENS, ARRIVED,
                       skb, skh, svb, svh, stb, sth, stn, scb, sch, scn, ssb, ssh, smb, smh, smj,
                       Hkv, D, max_seqlen,
                       T: tl.constexpr, DP: tl.constexpr, PV: tl.constexpr, INTERPRET: tl.constexpr):
    """K, V: the new keys [B, Hkv, 1, D] (strides skb, skh; channels contiguous); TK, TV, LTK, LTV:
    the tail and the last quantized tile [B, Hkv, T, D] (strides stb, sth, stn, all four alike);
    KC, VC [B, Hkv, capacity, DP] (scb, sch, scn); KS [B, Hkv, capacity] (ssb, ssh); KM, VS
    [B, Hkv, tiles, DP] (smb, smh, smj); FIRST_BAD [B * Hkv]; SEQLENS, ARRIVED [B] int32."""
    pid = tl.program_id(0)
    b = pid // Hkv
    h = pid % Hkv
    pos = tl.load(SEQLENS + b)
    room = pos < max_seqlen
    at = pos % T
    d = tl.arange(0, DP)
    dm = d < D
    k = tl.load(K + b.to(tl.int64) * skb + h.to(tl.int64) * skh + d, mask=dm, other=0.0)  # (views of larger buffers)
    v = tl.load(V + b.to(tl.int64) * svb + h.to(tl.int64) * svh + d, mask=dm, other=0.0)
    tail = b * stb + h * sth
    if room:
        tl.store(TK + tail + at * stn + d, k, mask=dm)
        tl.store(TV + tail + at * stn + d, v, mask=dm)
    # the last program of sequence b to read its length moves it on (the barrier first: every warp of
    # this program has read pos before its ticket releases it)
    tl.debug_barrier()
    if tl.atomic_add(ARRIVED + b, 1, sem="acq_rel") == Hkv - 1:
        tl.store(ARRIVED + b, 0)
        tl.store(SEQLENS + b, pos + room.to(tl.int32))
    if room & (at == T - 1):  # this key fills tile j = pos // T: quantize it
        rows = tl.arange(0, T)
        tile = rows[:, None] * stn + d[None, :]
        new = (rows == at)[:, None]  # (its own store above is not read back: another thread made it)
        kt = tl.where(new, k[None, :], tl.load(TK + tail + tile, mask=dm[None, :], other=0.0))
        vt = tl.where(new, v[None, :], tl.load(TV + tail + tile, mask=dm[None, :], other=0.0))
        tl.store(LTK + tail + tile, kt, mask=dm[None, :])  # kept as given, for a rollback into this tile
        tl.store(LTV + tail + tile, vt, mask=dm[None, :])
        kf = kt.to(tl.float32)
        vf = vt.to(tl.float32)
        t0 = pos - (T - 1)
        bad = _nonfinite_rows(kf) | _nonfinite_rows(vf)
        first = tl.min(tl.where(bad != 0, t0 + rows, _NO_BAD_KEY), axis=0)
        tl.store(FIRST_BAD + pid, tl.minimum(tl.load(FIRST_BAD + pid), first))
        kf = zero_nonfinite(kf)
        vf = zero_nonfinite(vf)
        mk = tl.sum(kf, axis=0) * (1.0 / T)  # exact: T is a power of two
        kc = tl.where(dm[None, :], kf - mk[None, :], 0.0)
        sk = tl.math.div_rn(tl.max(tl.abs(kc), axis=1), 127.0)
        k8 = _round_int(kc * tl.math.div_rn(1.0, tl.where(sk == 0.0, 1.0, sk))[:, None])
        if PV == 2:
            fmax = 448.0
        else:
            fmax = 57344.0
        sv = tl.math.div_rn(tl.max(tl.abs(vf), axis=0), fmax)
        v8 = to_fp8(vf * tl.math.div_rn(1.0, tl.where(sv == 0.0, 1.0, sv))[None, :], PV == 3, INTERPRET)
        j = pos // T
        codes = b * scb + h * sch + (t0 + rows)[:, None] * scn + d[None, :]
        tl.store(KC + codes, k8, mask=dm[None, :])
        tl.store(VC + codes, v8, mask=dm[None, :])
        tl.store(KS + b * ssb + h * ssh + t0 + rows, sk)
        tl.store(KM + b * smb + h * smh + j * smj + d, mk, mask=dm)
        tl.store(VS + b * smb + h * smh + j * smj + d, sv, mask=dm)
