"""Decode: a few queries (``Nq <= DECODE_MAX_QUERIES``) against a long KV sequence.

Why a path of its own. The prefill path quantizes K and V in passes over the whole sequence (K's
mean, K's codes, V's scales and codes, the NaN check) and then runs one program per 128 queries of
one head. With one query per head that is 3-4 reads of the KV cache for one read's worth of work,
and only B*Hq programs to spread 32k keys over. Decode is bound by reading K and V once (SDPA's
fused kernels do exactly that), so here K and V are quantized in registers, tile by tile, by the
attention kernel itself, the key range is split across programs (split-KV) and the splits are
merged by their log-sum-exp. Every statistic the quantization needs is therefore local to a tile:

* Q: one INT scale per query row (Nq is tiny; per-block and per-thread groupings of one row are
  the same thing at Nq = 1). ``smooth_q``: each head's mean over its queries is subtracted first
  and ``mean_q . (k - m_j)`` is added back from a tensor-core product in 3xTF32 (~fp32; at
  Nq = 1 the scores are then nearly exact).
* Rounding: to nearest even (one fp32 add of 1.5 * 2^23 on the GPU), not the prefill
  quantizers' half away from zero; codes are ``round(x * RN(1 / scale))``. The kernels are built
  without FMA contraction so that the product rounds first, as in the emulation.
* K: K smoothing per tile of ``T = 64`` keys: the tile's own token mean ``m_j`` is subtracted
  (a closer centre than the whole sequence's mean) and ``q . m_j`` is added back to the scores in
  fp32, so the scores and the LSE need no later correction. INT scale per tile (sage1's
  per-block) or per token (sage2's per-thread groups, finer at no cost here).
* P after the tile's own row max, not the running max: ``p = exp2(s - m_t)``, and the tile enters
  the running state scaled by ``exp2(m_t - m)`` (:meth:`OnlineSoftmax.update_own_max`). A tile's
  quantized P then does not depend on the tiles before it, so the CUDA kernel's programs may claim
  tiles dynamically (whoever is free takes the next one; with one program per KV head, helper
  programs join the KV heads with the most tiles left: :func:`cuda_plan`) and still agree with
  this emulation up to fp32 rounding (``torch.use_deterministic_algorithms(True)`` keeps the static
  split points). Its accuracy equals the running max's or is slightly better (each tile's FP8 P spans the whole range;
  DECODE_NOTES.md).
* P, V: sage1: fp16 P and fp16 V with the tile product accumulated in fp16 (``pv_accum="fp16"``,
  the paper) or fp32; V is scaled by a power of two per tile when ``T * max|V|`` would overflow
  the fp16 sum (exact otherwise). sage2: FP8 P with its static scale and FP8 V with one scale per
  channel *per tile*; the tile's products are exact and summed in fp32 (FP8 values are exact in
  fp16, so the kernel multiplies them on 16-bit tensor cores: Hopper's FP22 accumulator truncation
  is not reproduced here, where a tile is only 64 keys).
* NaN/Inf: the rule of :mod:`common.nonfinite`, on the GPU and with no host sync. The fast sweep
  has no checks (nor the fp16 range guard): a NaN, an Inf or an fp16 overflow cannot vanish from
  K's running token sum, the scores, l or acc, so one test per program flags it, and the combine
  kernel redoes the flagged splits with the careful sweep (per-key checks, guarded V).

Rows of all query heads that share a KV head are one program's rows (GQA packing), so K and V are
read once per KV head. ``backend="torch"`` runs :func:`decode_emulated`, the same algorithm with
the Triton kernel's split points (the CUDA kernel's dynamic tiles differ from them in fp32
rounding only). Options that have no decode form (sage1 ``qk_granularity`` other than
``per_block``, sage2 ``per_tensor``, ``smooth_v``, ``pv_accum="single"``) run the prefill path,
as do calls with more queries.

``attn_mask`` (any SDPA mask: a batched generation step's left- or right-padding mask, bool or
additive, or a per-head, per-query one) is read by the kernels tile by tile through its broadcast
strides (no host sync, so also under CUDA-graph capture): in Triton every tile of such a call
takes the masked path; the CUDA sweep reads a padding mask's row once per key through shared
memory and, with per-tile K scales (sage1), copies only the tiles the row keeps
(csrc/decode/split_kv.cu). Dropped keys still count in their tile's K mean and scales and V's
scales, as dense masks do in the prefill quantization (only tiles where kept and dropped keys meet
are touched).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from .checks import sm_count
from .int_qk import LOG2E, padded_head_dim
from .masking import MaskSpec, dense_mask, kernel_args
from .mma import fp16_accumulated_matmul
from .nonfinite import nan_rows
from .online_softmax import OnlineSoftmax, kv_tiles
from .quant import div_rn, safe_div

DECODE_MAX_QUERIES = 16
DECODE_TILE = 64
MAX_ROWS_PER_PROGRAM = 64
# Launch settings (experiments/bench_decode.py --sweep; sage1/NOTES.md): 4 warps capped at 168
# registers (three programs per SM; unbounded, ptxas takes 255) for head dims <= 128.
DECODE_WARPS = None      # None: 4 for head dims <= 128, else 8
DECODE_STAGES = 2
DECODE_MAXNREG = 168
PROGRAMS_PER_SM = 2
# The CUDA kernel's programs of a KV head claim its tiles dynamically (False, or torch's deterministic
# mode: the static split points, bitwise reproducible; DECODE_NOTES.md, c10). Not with Q smoothing
# and several queries per head: compute-bound, and 1-2 points slower with dynamic tiles (c11). With
# one query per head Q smoothing quantizes nothing (the kernel skips K's codes, c12) and dynamic
# tiles are 1-3 points faster (H100, 2026-11-23)
DYNAMIC_TILES = True
DYNAMIC_TILES_SMOOTH_Q = False  # True: Q smoothing with several queries per head claims tiles too
# With one program per KV head (more KV heads than fit at once, so they run in waves) the CUDA kernel
# appends PROGRAMS_PER_SM * SMs helper programs, which start as owners finish and each join the KV
# head with the most tiles left, up to this many per KV head (0: none). They take the last wave's tail
# (DECODE_NOTES.md, c13). Needs dynamic tiles
HELPERS_PER_KV_HEAD = 3
HELPER_MIN_TILES = 6  # fewer tiles per KV head: no helpers (the kernel's two stages + kMinHelpTiles)
HELPER_MAX_WAVES = 1.5  # more KV heads than this many waves of owners: no helpers (see cuda_plan)
# The CUDA kernel counts claims in the low 20 bits of a word (kClaimBits, with the look-ahead claims
# past the end): longer KV sequences (> 67M keys) run its static split
MAX_CLAIMED_TILES = (1 << 20) - 1024  # (room for every program's claim past the end)
# smooth_q's mean_q . (k - m_j) on tensor cores: "tf32x3" (~fp32, as SageAttention2's delta_s) or
# "tf32" (one pass; the emulation then rounds its operands to TF32 alike on the GPU)
DELTA_PRECISION = "tf32x3"
PV_KINDS = ("fp16_acc16", "fp16_acc32", "fp8_e4m3", "fp8_e5m2")
# FP8 P is spread over (0, fmax] by this shift of the tile's row max (fp16 P stays in (0, 1])
LOG2_P_SCALE = {"fp8_e4m3": math.log2(448.0), "fp8_e5m2": math.log2(57344.0)}


class DecodeSpec(NamedTuple):  # a tuple: built on every call, ~5x cheaper than a frozen dataclass
    qmax: int            # 127 (INT8) or 7 (INT4)
    k_per_token: bool    # K's INT scale per token (else one per tile)
    smooth_k: bool
    smooth_q: bool
    pv: str              # one of PV_KINDS


def use_decode(n_q: int, spec: DecodeSpec | None) -> bool:
    """Whether a call runs the decode path: few enough queries, and options with a decode form
    (``spec``; None: none)."""
    return spec is not None and n_q <= DECODE_MAX_QUERIES


@functools.lru_cache(maxsize=256)  # pure, and asked twice on every call
def _row_layout(group: int, n_q: int):
    """(NQP, BLOCK_M, row tiles): rows R = g * NQP + i, NQP = next power of two >= Nq."""
    nqp = 1 << max(0, (n_q - 1).bit_length())
    rows = group * nqp
    block_m = min(MAX_ROWS_PER_PROGRAM, max(16, 1 << max(0, (rows - 1).bit_length())))
    return nqp, block_m, -(-rows // block_m)


def resolve_decode_backend(requested: str, resolved: str, qh, kh, vh, spec: DecodeSpec, mask: MaskSpec,
                           who: str) -> str:
    """The decode sweep to run: ``"cuda"`` (common.cuda_decode) where the caller asked for ``"auto"``,
    the Triton backend was resolved, and the CUDA sweep covers the call on a Hopper GPU; else
    ``resolved``. sage2's explicit ``"cuda"`` (passed with ``resolved="triton"``) gets the CUDA sweep
    or a ValueError naming what it does not cover."""
    if resolved != "triton" or requested not in ("auto", "cuda"):
        return resolved
    from . import build, cuda_decode

    nqp, _, _ = _row_layout(qh.shape[1] // kh.shape[1], qh.shape[2])
    rows = qh.shape[1] // kh.shape[1] * nqp
    reason = cuda_decode.unsupported(spec, qh, kh, vh, mask, rows)
    if requested == "cuda":
        if reason is not None:
            raise ValueError(f"backend='cuda' does not support {reason} in decode (Nq <= {DECODE_MAX_QUERIES}); "
                             "use backend='triton'")
        if not build.hopper(qh.device):
            raise ValueError(f"backend='cuda' needs tensors on an sm_90 GPU, got {qh.device}")
        return "cuda"
    if reason is not None:
        return "triton"
    return "cuda" if build.usable_for_auto(qh.device, who) else "triton"


def planned_sms(device) -> int:
    """The SMs a launch plan spreads programs over: the GPU's, or an H100's 132 off the GPU (the
    interpreter then runs the plan a GPU would)."""
    return sm_count(device) if device.type == "cuda" else 132


def split_tiles(batch_kv_heads: int, row_tiles: int, n_k: int, device, per_sm: int | None = None) -> int:
    """Tiles per split: about ``per_sm`` (default PROGRAMS_PER_SM) programs per SM."""
    n_tiles = -(-n_k // DECODE_TILE)
    sms = planned_sms(device)
    splits = max(1, min(n_tiles, ((per_sm or PROGRAMS_PER_SM) * sms) // max(1, batch_kv_heads * row_tiles)))
    return -(-n_tiles // splits)


def cuda_plan(batch_kv_heads: int, n_tiles: int, tiles_per_split: int, dynamic: bool, device) -> tuple[int, int]:
    """(partial slots per KV head, helper programs) of a CUDA decode launch: the split plan's
    programs per KV head and no helpers, or, with one program per KV head and dynamic tiles, 1 +
    HELPERS_PER_KV_HEAD slots and PROGRAMS_PER_SM * SMs helpers."""
    splits = -(-n_tiles // tiles_per_split)
    resident = PROGRAMS_PER_SM * planned_sms(device)
    if splits > 1 or not dynamic or HELPERS_PER_KV_HEAD <= 0 or n_tiles < HELPER_MIN_TILES \
            or batch_kv_heads > HELPER_MAX_WAVES * resident:
        return splits, 0
    helpers = min(resident, 65535 - batch_kv_heads)
    return (1 + HELPERS_PER_KV_HEAD, helpers) if helpers > 0 else (1, 0)


def decode_attention(qh, kh, vh, out_hnd, spec: DecodeSpec, *, sm_scale: float, is_causal: bool, mask: MaskSpec,
                     return_lse: bool, backend: str):
    """Decode attention into ``out_hnd`` (the caller's output, any layout view); returns the natural
    LSE [B, Hq, Nq] (or None)."""
    B, Hq, Nq, D = qh.shape
    Hkv, Nk = kh.shape[1], kh.shape[2]
    nqp, block_m, row_tiles = _row_layout(Hq // Hkv, Nq)
    tps = split_tiles(B * Hkv, row_tiles, Nk, qh.device)
    if backend == "torch":
        out, lse = decode_emulated(qh, kh, vh, spec, sm_scale=sm_scale, is_causal=is_causal, mask=mask,
                                   tiles_per_split=tps)
        out_hnd.copy_(out)
        return lse if return_lse else None

    qh, kh, vh = (t if t.stride(-1) == 1 else t.contiguous() for t in (qh, kh, vh))
    n_tiles = -(-Nk // DECODE_TILE)
    splits = -(-n_tiles // tps)
    if backend == "cuda":  # the same algorithm in one CUDA launch (common.cuda_decode)
        from .cuda_decode import PV_CODES, run_decode

        lse = torch.empty((B, Hq, Nq), dtype=torch.float32, device=qh.device) if return_lse else None
        dynamic = DYNAMIC_TILES and (DYNAMIC_TILES_SMOOTH_Q or not spec.smooth_q or Nq == 1) \
            and not torch.are_deterministic_algorithms_enabled() and n_tiles < MAX_CLAIMED_TILES
        splits, helpers = cuda_plan(B * Hkv, n_tiles, tps, dynamic, qh.device)
        run_decode(qh, kh, vh, out_hnd, lse, splits, helpers, nqp, tps, sm_scale * LOG2E,
                   LOG2_P_SCALE.get(spec.pv, 0.0), spec.qmax, spec.k_per_token, spec.smooth_k, spec.smooth_q,
                   is_causal, PV_CODES[spec.pv], dynamic, mask)
        return lse

    from .checks import interpreter_enabled, kernel_store_dtype
    from .triton_decode import decode_combine_kernel, decode_split_kernel

    dp = padded_head_dim(D)
    rows_total = row_tiles * block_m
    part_o = torch.empty(splits, B * Hkv, rows_total, dp, dtype=torch.float32, device=qh.device)
    part_l = torch.empty(splits, B * Hkv, rows_total, dtype=torch.float32, device=qh.device)
    lse = torch.empty(B, Hq, Nq, dtype=torch.float32, device=qh.device) if return_lse else part_l
    # attn_mask (pointer and strides) and per-sequence lengths, or stand-in pointers
    mask_args = kernel_args(mask, B, Nq, Nk, part_l)
    pv = PV_KINDS.index(spec.pv)
    log2_pscale = LOG2_P_SCALE.get(spec.pv, 0.0)
    warps = DECODE_WARPS or (4 if dp <= 128 else 8)
    interp = interpreter_enabled()
    limits = {"maxnreg": DECODE_MAXNREG} if DECODE_MAXNREG and dp <= 128 and not interp else {}
    if not interp:  # no FMA contraction: x * (1/scale) must round before the rounding add, as in the
        limits["enable_fp_fusion"] = False  # emulation (fp16 inputs make exact .5 ties common)
    flags = torch.empty(splits * B * Hkv * row_tiles, dtype=torch.int32, device=qh.device)
    target = out_hnd
    if kernel_store_dtype(out_hnd.dtype) != out_hnd.dtype:  # round on the host
        target = torch.empty(out_hnd.shape, dtype=torch.float32)
    strides = (qh.stride(0), qh.stride(1), qh.stride(2), kh.stride(0), kh.stride(1), kh.stride(2),
               vh.stride(0), vh.stride(1), vh.stride(2))
    sizes = (Hkv, Nq, Nk, D, Hq // Hkv, sm_scale * LOG2E, tps, log2_pscale)
    meta = dict(BLOCK_M=block_m, NQP=nqp, T=DECODE_TILE, DP=dp, QMAX=spec.qmax, K_PER_TOKEN=spec.k_per_token,
                SMOOTH_K=spec.smooth_k, SMOOTH_Q=spec.smooth_q, PV=pv, IS_CAUSAL=is_causal, HAS_LENS=mask.has_lens,
                PER_SEQ_CAUSAL=mask.q_lens is not None, INTERPRET=interp, DELTA_PRECISION=DELTA_PRECISION,
                EVEN_D=D == dp, MASK_KIND=mask.kind)
    ql, kl, mask_ptrs = mask_args[-2], mask_args[-1], mask_args[:-2]
    decode_split_kernel[(splits, B * Hkv, row_tiles)](qh, kh, vh, part_o, part_l, flags, ql, kl, *mask_ptrs, *strides,
                                                      *sizes, **meta, num_warps=warps, num_stages=DECODE_STAGES,
                                                      **limits)
    decode_combine_kernel[(B * Hkv, row_tiles)](
        qh, kh, vh, part_o, part_l, flags, ql, kl, *mask_ptrs, target, lse, splits, *strides,
        target.stride(0), target.stride(1), target.stride(2), *sizes, **meta, RETURN_LSE=return_lse, num_warps=4,
        **({"enable_fp_fusion": False} if not interp else {}))
    if target is not out_hnd:
        out_hnd.copy_(target)
    return lse if return_lse else None


# ----------------------------------------------------------------------------------------------
# backend="torch": the same algorithm in PyTorch
# ----------------------------------------------------------------------------------------------

def _reciprocal(scale: torch.Tensor) -> torch.Tensor:
    """RN(1 / scale) (1 where scale is 0): the kernel multiplies by it instead of dividing."""
    return safe_div(torch.ones_like(scale), scale)


def _int_codes(x: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.round(x * _reciprocal(scale)).clamp_(-qmax, qmax)  # half to even, as the kernel


def fp16_guard(vmax: torch.Tensor, t_eff: int) -> torch.Tensor:
    """The power of two g <= 1 with ``t_eff * vmax * g <= 2^15`` (the kernel's _fp16_guard)."""
    x = vmax * (t_eff / 32768.0)
    e = ((x.view(torch.int32) + 0x7FFFFF) >> 23) - 127
    e = torch.where(x > 1.0, e, torch.zeros_like(e))
    return ((127 - e) << 23).view(torch.float32)


def quantize_k_tile(k: torch.Tensor, valid: torch.Tensor, cnt: torch.Tensor, spec: DecodeSpec):
    """One KV tile's K (k [.., T, D] fp32, finite; ``valid`` [.., T, 1] its keys in the sequence; ``cnt``
    how many, as fp32 broadcastable to [.., 1, D]) -> (INT codes (float), scales [.., T] per token or
    [..] per tile, the tile's token mean [.., 1, D] or None, k minus that mean)."""
    if spec.smooth_k:
        mk = k.sum(-2, keepdim=True) * _reciprocal(cnt)
        kc = torch.where(valid, k - mk, 0.0)
    else:
        mk, kc = None, k
    if spec.k_per_token:
        sk = div_rn(kc.abs().amax(-1), spec.qmax)
        return _int_codes(kc, sk[..., None], spec.qmax), sk, mk, kc
    sk = div_rn(kc.abs().amax(dim=(-2, -1)), spec.qmax)
    return _int_codes(kc, sk[..., None, None], spec.qmax), sk, mk, kc


def quantize_v_tile_fp8(v: torch.Tensor, pv: str):
    """One KV tile's V (v [.., T, D] fp32, finite) -> (FP8 codes, one scale per channel [.., 1, D])."""
    fp8, fmax = (torch.float8_e4m3fn, 448.0) if pv == "fp8_e4m3" else (torch.float8_e5m2, 57344.0)
    sv = div_rn(v.abs().amax(dim=-2, keepdim=True), fmax)
    return (v * _reciprocal(sv)).to(fp8), sv


def _tile_pv(p: torch.Tensor, v: torch.Tensor, pv: str, v_codes=None) -> torch.Tensor:
    """The tile's P V in fp32 (p [.., Nq, T] fp32; v [.., T, D] fp32, finite; or FP8 ``v_codes``
    (codes, scales) already made by :func:`quantize_v_tile_fp8`)."""
    if pv in ("fp16_acc16", "fp16_acc32"):
        vmax = v.abs().amax(dim=(-2, -1), keepdim=True)
        gv = fp16_guard(vmax, v.shape[-2] if pv == "fp16_acc16" else 1)
        v16, p16 = (v * gv).half(), p.half()
        prod = fp16_accumulated_matmul(p16, v16) if pv == "fp16_acc16" else p16.float() @ v16.float()
        return prod / gv
    v8, sv = v_codes if v_codes is not None else quantize_v_tile_fp8(v, pv)
    fp8 = torch.float8_e4m3fn if pv == "fp8_e4m3" else torch.float8_e5m2
    return (p.to(fp8).float() @ v8.float()) * sv


def decode_emulated(qh, kh, vh, spec: DecodeSpec, *, sm_scale: float, is_causal: bool, mask: MaskSpec,
                    tiles_per_split: int, cache=None):
    """Returns (out fp32 [B, Hq, Nq, D], natural LSE [B, Hq, Nq]): the decode kernel's algorithm,
    split for split (each split's own online softmax, merged by LSE). ``cache``: a
    :class:`common.kv_cache.QuantizedKVCache` whose quantized tiles stand in for those of kh and vh
    (which then hold the cache's keys past them: :meth:`~common.kv_cache.QuantizedKVCache.emulation_views`)."""
    from .reference import exact_fp32_matmul

    B, Hq, Nq, D = qh.shape
    Hkv, Nk = kh.shape[1], kh.shape[2]
    group = Hq // Hkv
    dev = qh.device
    int_dt = torch.float64 if dev.type == "cpu" else torch.float32
    ql, kl = mask.lens_or_full(B, Nq, Nk, dev)
    row_ok = (torch.arange(Nq, device=dev)[None, :] < ql[:, None])[:, None, :, None]  # [B, 1, Nq, 1]
    if cache is None:
        bad = nan_rows(qh, kh, vh, is_causal=is_causal, mask=mask)
    else:
        bad = cache.nan_rows(qh, is_causal=is_causal)

    def finite(x):
        return torch.nan_to_num(x.float(), nan=0.0, posinf=0.0, neginf=0.0)

    q = finite(qh) * (sm_scale * LOG2E)
    q = torch.where(row_ok, q, 0.0)
    if spec.smooth_q:
        mu = q.sum(-2, keepdim=True) / ql.clamp(min=1)[:, None, None, None].float()
        mu = torch.where(row_ok, mu, 0.0)
        qc = torch.where(row_ok, q - mu, 0.0)
    else:
        qc = q
    sq = div_rn(qc.abs().amax(-1), spec.qmax)                               # [B, Hq, Nq]
    q8 = _int_codes(qc, sq[..., None], spec.qmax).to(int_dt)
    k_all, v_all = finite(kh), finite(vh)
    in_seq = (torch.arange(Nk, device=dev)[None, :] < kl[:, None])[:, None, :, None]  # [B, 1, Nk, 1]
    k_all, v_all = torch.where(in_seq, k_all, 0.0), torch.where(in_seq, v_all, 0.0)
    bias2 = dense_mask(mask, B, Nq, Nk, is_causal, dev)
    shift = LOG2_P_SCALE.get(spec.pv, 0.0)

    def rep(x):  # KV heads -> query heads
        return x.repeat_interleave(group, dim=1)

    parts = []
    span = tiles_per_split * DECODE_TILE
    tf32_delta = DELTA_PRECISION == "tf32" and dev.type == "cuda"
    with exact_fp32_matmul():
        for s0 in range(0, Nk, span):
            sm = OnlineSoftmax((B, Hq, Nq), Nk, dev, is_causal=is_causal, log2_shift=shift, bias2=bias2)
            acc = torch.zeros(B, Hq, Nq, D, device=dev)
            for j0, j1 in kv_tiles(min(Nk, s0 + span), DECODE_TILE):
                if j0 < s0:
                    continue
                # the cache's sequences that hold this tile as codes (the others: their partial tile,
                # quantized here from its keys, as without a cache)
                coded = None if cache is None else torch.tensor([j1 <= n for n in cache.quantized], device=dev)
                if coded is not None and coded.any():
                    c8, csk, cmk, v8, sv = cache.tile(j0, j1)
                    v_codes = (rep(v8), rep(sv))
                    s_coded = (q8 @ rep(c8).to(int_dt).transpose(-1, -2)).float() * sq[..., None] \
                        * rep(csk)[:, :, None, :] + (q * rep(cmk)).sum(-1, keepdim=True)
                if coded is None or not coded.all():
                    k, v = k_all[:, :, j0:j1], v_all[:, :, j0:j1]
                    cnt = (kl - j0).clamp(1, j1 - j0).float()[:, None, None, None]
                    k8, sk, mk, kc = quantize_k_tile(k, in_seq[:, :, j0:j1], cnt, spec)
                    sk_b = rep(sk)[:, :, None, :] if spec.k_per_token else rep(sk)[:, :, None, None]
                    s = (q8 @ rep(k8).to(int_dt).transpose(-1, -2)).float() * sq[..., None] * sk_b
                    if spec.smooth_k:
                        s = s + (q * rep(mk)).sum(-1, keepdim=True)
                    if coded is not None and coded.any():
                        s = torch.where(coded[:, None, None, None], s_coded, s)
                else:
                    s = s_coded
                if spec.smooth_q:  # the kernel's tensor-core product: TF32 operands on the GPU
                    torch.backends.cuda.matmul.allow_tf32 = tf32_delta
                    s = s + mu @ rep(kc).transpose(-1, -2)
                    torch.backends.cuda.matmul.allow_tf32 = False
                p, alpha, beta = sm.update_own_max(sm.mask(s, j0, j1))  # P after the tile's own max
                if coded is None or not coded.any():
                    pv = _tile_pv(p, rep(v), spec.pv)
                elif coded.all():
                    pv = _tile_pv(p, None, spec.pv, v_codes)
                else:
                    pv = torch.where(coded[:, None, None, None], _tile_pv(p, None, spec.pv, v_codes),
                                     _tile_pv(p, rep(v), spec.pv))
                acc = acc * alpha[..., None] + pv * beta[..., None]
            parts.append((sm.normalize(acc), sm.lse2()))
    # merge the splits by their LSE (log2 domain)
    m = torch.stack([lse for _, lse in parts]).amax(0)
    m_use = torch.where(m == float("-inf"), 0.0, m)
    w = [torch.exp2(lse - m_use) for _, lse in parts]
    den = sum(w)
    out = sum(wi[..., None] * o for wi, (o, _) in zip(w, parts)) / torch.where(den == 0, 1.0, den)[..., None]
    lse = (m + torch.log2(den)) * math.log(2.0)
    out = out.masked_fill(bad[..., None], float("nan"))
    return out, lse.masked_fill(bad, float("nan"))
