"""``backend="cuda"``: SageAttention2 on Hopper's own instructions (csrc/sage2_sm90/attention.cu).

INT8 Q K^T on wgmma (IGMMA), FP8 P V on wgmma (QGMMA) with P straight from registers, TMA loads
and a producer warpgroup feeding two (head dim 128) or three (64) consumer warpgroups that take
turns on the tensor cores; causal calls on a persistent grid whose CTAs claim work tiles on a counter.
At head dim 128 (non-causal, or causal from 8k queries) Q is quantized inside the kernel, by each
consumer at the start of a work tile (the same codes and scales as the Triton pass, bit for bit;
no pass over Q of its own: :func:`q_in_kernel`); elsewhere the kernel takes the Triton backend's Q
pass. K and V (K's token mean and V's channel maxima need all of K and V before any code) come from
one CUDA launch that reads each once (:func:`quantize_kv`, csrc/sage2_sm90/kv_pass.cu; the Triton
passes read them twice), or where it cannot run them, from the Triton passes; only V^T's key order
differs from the Triton backend's (see ``quant_v.wgmma_key_position``). Built on first use by
:mod:`common.build`.

What the kernel covers (others: ``backend="triton"``, which ``"auto"`` then picks): sm_90 GPUs;
INT8, or INT4 codes without Q smoothing; every Q/K granularity but ``per_token``; ``fp8_e4m3``
with two-level accumulation; no ``smooth_v``; no ``attn_mask``; padded head dim 64 or 128 (head
dims 33..128); causal or not, GQA, both layouts, ``return_lse``, any length, fp16/bf16. Few
queries (``Nq <= 16``) take the split-KV decode path (common.decode), whose own CUDA kernel
(csrc/decode, common.cuda_decode) runs on ``"auto"`` and ``"cuda"`` where it covers the call.
Speed and version history: csrc/NOTES.md.
"""

from __future__ import annotations

import torch

from common.checks import check_op_kv_layout, check_op_operands
from common.int_qk import padded_head_dim
from common.masking import MASK_NONE

HEAD_DIMS = (64, 128)


def unsupported(*, qk_granularity: str, smooth_q: bool, smooth_v: bool, pv_dtype: str, pv_accum: str, mask,
                head_dim: int) -> str | None:
    """Why the CUDA kernel cannot run these options (None: it can)."""
    if qk_granularity == "per_token":
        return "qk_granularity='per_token' (its K scales differ within a lane's keys)"
    if smooth_q:
        return "smooth_q=True (the kernel does not add delta_s)"
    if smooth_v:
        return "smooth_v=True"
    if pv_dtype != "fp8_e4m3":
        return f"pv_dtype={pv_dtype!r} (only 'fp8_e4m3')"
    if pv_accum != "two_level":
        return f"pv_accum={pv_accum!r} (only 'two_level')"
    if mask.kind != MASK_NONE or mask.has_lens:
        return "attn_mask / sequence lengths"
    if padded_head_dim(head_dim) not in HEAD_DIMS:
        return f"head_dim={head_dim} (the kernel takes padded head dims {HEAD_DIMS}: 33..128)"
    return None


# Q's scale groups in the kernel, in pairs of query rows {16s + g, 16s + g + 8} (sage2's WARP_Q = 16
# rows per warp, Q_BLOCK = 64 rows per block); per_tensor (one scale over all of Q) takes the pass's codes
Q_GROUP_PAIRS = {"per_thread": 1, "per_warp": 8, "per_block": 32}


# causal at head dim 128: Q quantized in the kernel from this many queries on (csrc/NOTES.md, v13)
CAUSAL_Q_IN_KERNEL_FROM = 8192


def q_in_kernel(*, is_causal: bool, head_dim: int, seqlen_q: int, granularity: str = "per_thread") -> bool:
    """Whether the kernel quantizes Q itself: where that measured faster than the pass (csrc/NOTES.md,
    v12 and v13, same-run A/B on an H100): non-causal head dim 128 (+1-4% at 8k-16k, +4-7% at 2k);
    causal head dim 128 from :data:`CAUSAL_Q_IN_KERNEL_FROM` queries (+2-4% at 8k-16k; below, the
    quantization at each work tile's start outweighs the pass: the kernel alone 8% slower at 4k, 14%
    at 2k). Not at head dim 64, whose third consumer waits on the others' quantization (3-10%
    slower).
    ``SAGE2_SM90_Q=kernel`` or ``=pass`` forces one (tests run both). Never at the per-tensor
    granularity, whose one scale needs all of Q first."""
    import os

    forced = os.environ.get("SAGE2_SM90_Q", "")
    if forced not in ("", "kernel", "pass"):
        raise ValueError(f"sage2 cuda: SAGE2_SM90_Q must be 'kernel' or 'pass', got {forced!r}")
    if granularity not in Q_GROUP_PAIRS:
        return False
    if forced:
        return forced == "kernel"
    return padded_head_dim(head_dim) == 128 and (not is_causal or seqlen_q >= CAUSAL_Q_IN_KERNEL_FROM)


def _tma_ready(q: torch.Tensor) -> bool:
    """The kernel reads Q (and the K/V pass K and V) by TMA: 16-byte aligned, channels contiguous and
    a multiple of 8 of them (the kernels give a dimension of size 1 the packed stride, which must be a
    multiple of 16 bytes too), and every other stride (of a dimension longer than 1) a positive
    multiple of 8 elements."""
    return (q.stride(-1) == 1 and q.data_ptr() % 16 == 0 and q.shape[-1] % 8 == 0
            and all(size == 1 or (st > 0 and st % 8 == 0) for size, st in zip(q.shape[:3], q.stride()[:3])))


def q_for_kernel(q: torch.Tensor, dp: int) -> torch.Tensor:
    """Q ``[B, Hq, Nq, D]`` (an HND view, any layout) as the kernel can read it: itself where
    :func:`_tma_ready`, else a contiguous copy padded to ``dp`` channels."""
    if _tma_ready(q):
        return q
    return torch.nn.functional.pad(q, (0, dp - q.shape[-1])).contiguous()


def _check_op_inputs(q, q_codes, q_scale, q_bad, k_codes, v_codes, k_scale, v_scale, out, first_bad, q_max,
                     q_group_pairs):
    """The kernel reads K, V, the pass's Q codes and their scales through their shapes alone (TMA maps
    of contiguous tensors), and Q as given through its strides."""
    given = [("k_codes", k_codes, torch.int8), ("v_codes", v_codes, torch.uint8), ("k_scale", k_scale, torch.float32),
             ("v_scale", v_scale, torch.float32)]
    if (q_codes is None) != (q_scale is None):
        raise ValueError("sage2_sm90_fwd: q_codes and q_scale come together (the pass's Q), or neither (the "
                         "kernel quantizes q)")
    if q_codes is not None:
        given += [("q_codes", q_codes, torch.int8), ("q_scale", q_scale, torch.float32)]
    for name, t, dtype in given:
        if t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"sage2_sm90_fwd: {name} must be a contiguous {dtype} tensor, got {t.dtype} "
                             f"with strides {tuple(t.stride())}")
    if q.dim() != 4 or k_codes.dim() != 4 or v_codes.dim() != 4:
        raise ValueError("sage2_sm90_fwd: q, k_codes and v_codes must be 4-D ([B, H, N, D], [B, H, N, DP], "
                         "[B, H, DP, NPAD])")
    if out.dtype not in (torch.float16, torch.bfloat16) or out.stride(-1) != 1:
        raise ValueError(f"sage2_sm90_fwd: out must be fp16 or bf16 with a contiguous last dim, got {out.dtype} "
                         f"with strides {tuple(out.stride())}")
    if q_codes is None and (q.dtype != out.dtype or not _tma_ready(q) or q.shape[-1] > k_codes.shape[-1]):
        raise ValueError(f"sage2_sm90_fwd: q must have out's dtype ({out.dtype}), at most DP = {k_codes.shape[-1]} "
                         "channels, contiguous channels, 16-byte alignment and other strides that are multiples "
                         f"of 8 (sage2.cuda.q_for_kernel makes one), got {q.dtype} {tuple(q.shape)} with strides "
                         f"{tuple(q.stride())}")
    if q_max not in (127, 7) or q_group_pairs not in (1, 8, 32):
        raise ValueError(f"sage2_sm90_fwd: q_max must be 127 or 7 and q_group_pairs 1, 8 or 32, got {q_max}, "
                         f"{q_group_pairs}")
    # the sizes the kernel takes from q, k_codes and out must hold for every other tensor, which it
    # reads and writes by them alone
    B, Hq, Nq = q.shape[:3]
    _, Hkv, Nk, DP = k_codes.shape
    D, npad = out.shape[-1], v_codes.shape[-1]
    check_op_operands("sage2_sm90_fwd", out, [
        ("q", q, None), ("out", out, (B, Hq, Nq, D)), ("k_codes", k_codes, (B, Hkv, Nk, DP)),
        ("v_codes", v_codes, (B, Hkv, DP, npad)), ("k_scale", k_scale, (B, Hkv, Nk)), ("v_scale", v_scale, (B, Hkv, D)),
        ("q_codes", q_codes, (B, Hq, Nq, DP)), ("q_scale", q_scale, (B, Hq, Nq))],
        f"q {list(q.shape)}, k_codes {list(k_codes.shape)}, out's head dim and v_codes' keys")
    check_op_kv_layout("sage2_sm90_fwd", HEAD_DIMS, DP, D, Hq, Hkv, Nk, npad, 128, "V")
    for name, t, n, dtype in (("q_bad", q_bad, B * Hq * Nq, torch.uint8), ("first_bad", first_bad, B * Hkv, torch.int32)):
        if t is not None and (t.dtype != dtype or t.numel() < n or not t.is_contiguous() or t.device != out.device):
            raise ValueError(f"sage2_sm90_fwd: {name} must be a contiguous {dtype} of at least {n} values on "
                             f"{out.device}, got {t.dtype} {tuple(t.shape)} on {t.device}")


def _forward(q, q_codes, q_scale, q_bad, k_codes, v_codes, k_scale, v_scale, out, first_bad, q_mult, q_max,
             q_group_pairs, causal, return_lse, tile_counter):
    """:func:`sage2_sm90_fwd` without torch.library's dispatch, an estimated 40-110 us of host time per
    call on the H100 machine's host (csrc/NOTES.md, v13): :func:`launch` calls this where it is not
    being traced."""
    _check_op_inputs(q, q_codes, q_scale, q_bad, k_codes, v_codes, k_scale, v_scale, out, first_bad, q_max,
                     q_group_pairs)
    if tile_counter is not None and (tile_counter.dtype != torch.int32 or tile_counter.numel() != 1
                                     or tile_counter.device != out.device):
        raise ValueError(f"sage2_sm90_fwd: tile_counter must be one int32 on {out.device}, got {tile_counter.dtype} "
                         f"{tuple(tile_counter.shape)} on {tile_counter.device}")
    B, Hq, Nq, _ = q.shape
    Hkv, Nk, DP = k_codes.shape[1], k_codes.shape[2], k_codes.shape[3]
    D = out.shape[-1]
    lse = torch.empty((B, Hq, Nq) if return_lse else (0,), dtype=torch.float32, device=out.device)
    from common import build

    with build.on_device(out.device):  # the launch goes to the current device
        build.load().sage2_sm90_forward(
            q=q.data_ptr(), q_stride_b=q.stride(0), q_stride_h=q.stride(1), q_stride_n=q.stride(2),
            q_channels=q.shape[-1], q_mult=q_mult, q_max=q_max, q_group_pairs=q_group_pairs,
            q_codes=q_codes.data_ptr() if q_codes is not None else 0,
            q_scale=q_scale.data_ptr() if q_scale is not None else 0,
            q_bad=q_bad.data_ptr() if q_bad is not None else 0,
            k_codes=k_codes.data_ptr(), v_codes=v_codes.data_ptr(), k_scale=k_scale.data_ptr(),
            v_scale=v_scale.data_ptr(), out=out.data_ptr(), out_stride_b=out.stride(0), out_stride_h=out.stride(1),
            out_stride_n=out.stride(2), lse=lse.data_ptr() if return_lse else 0,
            first_bad=first_bad.data_ptr() if first_bad is not None else 0,
            tile_counter=tile_counter.data_ptr() if tile_counter is not None else 0,
            batch=B, heads_q=Hq, heads_kv=Hkv, seqlen_q=Nq, seqlen_k=Nk, npad=v_codes.shape[-1], head_dim=D,
            padded_head_dim=DP, causal=causal, out_bf16=out.dtype == torch.bfloat16,
            stream=build.current_stream_handle(out.device.index))
    return lse


@torch.library.custom_op("sageattn_repro::sage2_sm90_fwd", mutates_args=("out", "tile_counter"))
def sage2_sm90_fwd(q: torch.Tensor, q_codes: torch.Tensor | None, q_scale: torch.Tensor | None,
                   q_bad: torch.Tensor | None, k_codes: torch.Tensor, v_codes: torch.Tensor, k_scale: torch.Tensor,
                   v_scale: torch.Tensor, out: torch.Tensor, first_bad: torch.Tensor | None, q_mult: float,
                   q_max: int, q_group_pairs: int, causal: bool, return_lse: bool,
                   tile_counter: torch.Tensor | None) -> torch.Tensor:
    """The kernel on Q as given, quantized inside (times ``q_mult`` = sm_scale * log2(e), codes up to
    ``q_max``, one scale per ``q_group_pairs`` pairs of rows), or on the pass's ``q_codes`` and
    per-row ``q_scale`` (``q_bad``: its NaN/Inf rows) where given; and on quantized K, V
    (``v_codes``: V^T's E4M3 bytes as uint8, keys in the wgmma order). Writes ``out`` ([B, Hq, Nq, D]
    view, any strides with a contiguous last dim) and returns the log2-domain LSE ([B, Hq, Nq], or
    empty). ``tile_counter`` (one int32, zero; zero again afterwards): one CTA per SM, each claiming
    work tiles on it as it finishes one (what causal calls use: its work tiles differ in length);
    None: non-causal, one CTA per SM with tiles dealt round robin, causal one CTA per work tile.
    The counter must be zero when the kernel starts (a nonzero one skips work tiles, whose output
    rows are then left as they were) and belongs to one launch at a time: two launches in flight on
    different streams must not share it. sage2.sageattn gives each call its own."""
    return _forward(q, q_codes, q_scale, q_bad, k_codes, v_codes, k_scale, v_scale, out, first_bad, q_mult, q_max,
                    q_group_pairs, causal, return_lse, tile_counter)


@sage2_sm90_fwd.register_fake
def _(q, q_codes, q_scale, q_bad, k_codes, v_codes, k_scale, v_scale, out, first_bad, q_mult, q_max, q_group_pairs,
      causal, return_lse, tile_counter):
    B, Hq, Nq, _ = q.shape
    return q.new_empty((B, Hq, Nq) if return_lse else (0,), dtype=torch.float32)


def _traced(t: torch.Tensor) -> bool:
    """Whether a call on ``t`` is being traced (torch.compile, a dispatch mode, fake tensors): then
    only the custom op, with its fake implementation, may run."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None or isinstance(t, FakeTensor)


def launch(q: torch.Tensor, qk, qv, out_hnd: torch.Tensor, *, granularity: str, bits: int, is_causal: bool,
           return_lse: bool, flags=None, tile_counter: torch.Tensor | None = None):
    """Run the kernel on sage2's quantized K (``qk``, from common.int_qk.quantize_qk) and V (quant_v,
    wgmma key order), and on Q: the pass's codes where ``qk`` holds them, else Q itself (an HND view,
    quantized in the kernel: :func:`q_in_kernel`). Returns the log2-domain LSE or None.
    ``tile_counter`` (one zeroed int32): causal CTAs claim their work tiles on it (a fresh one is
    made where it is None); ``SAGE2_SM90_GRID=tiles`` runs one CTA per work tile instead."""
    import os
    from common.quant import INT_QMAX

    q_codes = q_scale = q_bad = None
    if qk.q_codes is not None:
        q_codes, q_scale = qk.q_codes, qk.q_scale_per_token().contiguous()
        q_bad = flags.q_bad if flags is not None else None
    else:
        q = q_for_kernel(q, qk.k_codes.shape[-1])
    if not is_causal or os.environ.get("SAGE2_SM90_GRID", "") == "tiles":
        tile_counter = None
    elif tile_counter is None:
        tile_counter = torch.zeros(1, dtype=torch.int32, device=out_hnd.device)
    fwd = sage2_sm90_fwd if _traced(out_hnd) else _forward
    lse = fwd(q, q_codes, q_scale, q_bad, qk.k_codes, qv.codes.view(torch.uint8), qk.k_scale_per_token().contiguous(),
              qv.scale, out_hnd, flags.first_bad if flags is not None else None, qk.q_multiplier, INT_QMAX[bits],
              Q_GROUP_PAIRS.get(granularity, 1), is_causal, return_lse, tile_counter)
    return lse if return_lse else None


# ---- K and V: one launch reading each once (csrc/sage2_sm90/kv_pass.cu) ----

_KV_MAX_CHUNKS: dict[tuple[int, int], tuple[int, int]] = {}


def _kv_pass_limits(device: torch.device, dp: int) -> tuple[int, int]:
    """(tokens per chunk, most chunks per head) of the K/V pass on ``device`` (cached: a query of the
    occupancy per call would cost host time)."""
    key = (device.index, dp)
    if key not in _KV_MAX_CHUNKS:
        from common import build

        with build.on_device(device):
            lib = build.load()
            _KV_MAX_CHUNKS[key] = (lib.sage2_kv_pass_chunk_tokens(dp), lib.sage2_kv_pass_max_chunks(dp))
    return _KV_MAX_CHUNKS[key]


def _strides_for_pass(t: torch.Tensor) -> tuple[int, int, int] | None:
    """t's batch, head and token strides as the pass takes them (a dimension of size 1: 0), or None
    where TMA cannot read t (:func:`_tma_ready`: a broadcast dimension, say, goes to the Triton passes)."""
    if not _tma_ready(t):
        return None
    return tuple(0 if size == 1 else st for size, st in zip(t.shape[:3], t.stride()[:3]))


def kv_pass_covers(k: torch.Tensor, v: torch.Tensor, *, smooth_k: bool, granularity: str) -> bool:
    """Whether the one-read K/V pass runs this call's K and V (HND views): K smoothed, K's scales per
    block or per thread (sage2's per_warp is per block for K; not per_tensor), 16-bit K and V of
    one dtype that the pass can read (:func:`_strides_for_pass`), and a head whose chunks all fit on
    the GPU at once (beyond, ~25k keys at head dim 128 and ~50k at 64 on an H100, the two-read Triton passes run:
    there the passes are a small part of the call). ``SAGE2_SM90_KV=triton`` forces the Triton
    passes, ``=cuda`` this one (an error where it cannot run; tests run both)."""
    import os

    forced = os.environ.get("SAGE2_SM90_KV", "")
    if forced not in ("", "cuda", "triton"):
        raise ValueError(f"sage2 cuda: SAGE2_SM90_KV must be 'cuda' or 'triton', got {forced!r}")
    if forced == "triton":
        return False
    why = None
    if not smooth_k:
        why = "smooth_k=False"
    elif granularity not in ("per_thread", "per_warp", "per_block"):
        why = f"qk_granularity={granularity!r}"
    elif k.dtype != v.dtype or k.dtype not in (torch.float16, torch.bfloat16) or k.shape[-1] != v.shape[-1]:
        why = "K and V must be fp16 or bf16 of one dtype and head dim"
    elif _strides_for_pass(k) is None or _strides_for_pass(v) is None:
        why = "K and V need contiguous channels, a head dim and strides that are multiples of 8, 16-byte alignment"
    else:
        tokens, max_chunks = _kv_pass_limits(k.device, padded_head_dim(k.shape[-1]))
        if -(-k.shape[-2] // tokens) > max_chunks:
            why = f"{k.shape[-2]} keys: more than {tokens * max_chunks} in one launch"
    if why is not None and forced == "cuda":
        raise ValueError(f"sage2 cuda: SAGE2_SM90_KV=cuda, but the K/V pass cannot run: {why}")
    return why is None


def kv_counter_entries(batch: int, heads_kv: int) -> int:
    """Zeroed int32 entries the K/V pass needs beside V's maxima: its ticket and per head K's and V's
    arrivals (sage2.interface takes them from the call's one zeroed buffer)."""
    return 1 + 2 * batch * heads_kv


def quantize_kv(k: torch.Tensor, v: torch.Tensor, *, bits: int, granularity: str, zero_nonfinite: bool,
                first_bad: torch.Tensor | None, counters: torch.Tensor, v_amax: torch.Tensor):
    """K and V (HND views ``[B, H, N, D]``, :func:`kv_pass_covers`) quantized as the Triton passes do
    for the kernel, in one launch: ``((k_codes [B, H, N, DP] int8, k_scale [B, H, N] per key, k_mean
    [B, H, 1, D] fp32), QuantizedV)`` with V^T's E4M3 codes in the wgmma key order. ``counters``: a
    zeroed int32 buffer of :func:`kv_counter_entries`; ``v_amax``: a zeroed int32 [B * H * D];
    ``first_bad``: common.nonfinite's per-head first bad key (int32 [B * H]) or None. Given the same
    mean, codes and scales are the Triton passes' bit for bit; the mean is summed in a fixed order of
    its own (deterministic; an ulp or so from torch.mean's)."""
    from common import build
    from common.quant import INT_QMAX

    from .quant_v import QuantizedV

    B, H, N, D = k.shape
    dp = padded_head_dim(D)
    tokens, _ = _kv_pass_limits(k.device, dp)
    chunks = -(-N // tokens)
    npad = -(-N // 128) * 128
    if counters.numel() < kv_counter_entries(B, H) or v_amax.numel() < B * H * D:
        raise ValueError("sage2 cuda: quantize_kv needs counters of kv_counter_entries(B, H) and v_amax of B*H*D")
    k_codes = torch.empty(B, H, N, dp, dtype=torch.int8, device=k.device)
    k_scale = torch.empty(B, H, N, dtype=torch.float32, device=k.device)
    k_mean = torch.empty(B, H, 1, D, dtype=torch.float32, device=k.device)
    v_codes = torch.empty(B, H, dp, npad, dtype=torch.float8_e4m3fn, device=k.device)
    v_scale = torch.empty(B, H, D, dtype=torch.float32, device=k.device)
    partial = torch.empty(B * H * chunks * dp, dtype=torch.float32, device=k.device)
    ks, vs = _strides_for_pass(k), _strides_for_pass(v)
    with build.on_device(k.device):
        build.load().sage2_kv_pass(
            k.data_ptr(), v.data_ptr(), *ks, *vs, k_codes.data_ptr(), k_scale.data_ptr(), k_mean.data_ptr(),
            v_codes.data_ptr(), v_scale.data_ptr(), partial.data_ptr(), counters.data_ptr(), v_amax.data_ptr(),
            first_bad.data_ptr() if first_bad is not None else 0, B, H, N, npad, D, dp, chunks, INT_QMAX[bits],
            granularity == "per_thread", zero_nonfinite, k.dtype == torch.bfloat16,
            build.current_stream_handle(k.device.index))
    return (k_codes, k_scale, k_mean), QuantizedV(v_codes, v_scale, None, True)
