"""Decode on Hopper: the split-KV sweep of :mod:`common.decode` in CUDA (csrc/decode/split_kv.cu).

The same algorithm as the Triton kernels (common/triton_decode.py), in one launch: the programs of
a KV head take its tiles dynamically (a claim counter per KV head; the static split points under
``torch.use_deterministic_algorithms(True)``), a program that saw a NaN/Inf or an fp16 overflow
sweeps its own tiles again carefully, and the last program of each KV head to finish merges them
all by their LSE. It exists for
speed: decode is bound by reading the KV cache once; the kernel streams 64-key tiles of K and V into
shared memory with the copy engine (TMA) and quantizes them there (DECODE_NOTES.md).

It covers fp16/bf16 inputs, head dim 64 or 128, up to 16 rows per KV head (query heads per KV head
times Nq rounded up to a power of two), INT8 or INT4 K codes per tile or per token, K smoothing on or
off, Q smoothing with per-token K scales (sage2's INT4 default; ``mean_q . (k - mean_k)`` ~fp32, on
the tensor cores from 16-bit parts of mean q, where the Triton kernel uses 3xTF32), fp16 P V (fp16 or fp32 sums) or FP8 E4M3, causal or not.
Q smoothing with per-block K scales, FP8 E5M2 and per-sequence lengths run the Triton sweep.
``backend="auto"`` picks it on sm_90 (``SAGE_DISABLE_CUDA=1`` turns that off), as does sage2's
``backend="cuda"``.
"""

from __future__ import annotations

import torch

from .build import current_stream_handle, load, on_device
from .checks import check_op_operands
from .decode import DECODE_TILE
from .masking import MASK_NONE, MaskSpec

ROWS = 16                 # query rows per program in the kernel
HEAD_DIMS = (64, 128)
PV_CODES = {"fp16_acc16": 0, "fp16_acc32": 1, "fp8_e4m3": 2}  # csrc/decode/split_kv.h DecodePv


def unsupported(spec, qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, mask, rows: int) -> str | None:
    """Why the CUDA sweep cannot run this decode call (None: it can). ``rows``: query heads per KV
    head x padded queries."""
    if spec.smooth_q:
        if not spec.k_per_token:
            return "smooth_q=True with per-block K scales"
        from . import decode  # (the op below is named decode)

        if decode.DELTA_PRECISION != "tf32x3":  # the kernel's product is ~fp32, not one TF32 pass
            return f"smooth_q=True with DELTA_PRECISION={decode.DELTA_PRECISION!r}"
    if spec.pv not in PV_CODES:
        return f"P V as {spec.pv}"
    if mask.has_lens:
        return "sequence lengths"
    if qh.shape[-1] not in HEAD_DIMS:
        return f"head_dim={qh.shape[-1]} (the kernel takes {HEAD_DIMS})"
    if rows > ROWS:
        return f"{rows} query rows per KV head (at most {ROWS})"
    for name, t in (("k", kh), ("v", vh)):  # the copy engine reads [B, Hkv, Nk] rows of 16-byte multiples
        (batch, heads, keys, _), (sb, sh, sn, sd) = t.shape, t.stride()
        if sd != 1 or t.data_ptr() % 16 or _unusable(batch, sb) or _unusable(heads, sh) or _unusable(keys, sn):
            return f"{name}'s rows are not 16-byte aligned (pointer, and strides of batch, heads and keys)"
    return None


def _unusable(size: int, stride: int) -> bool:
    """A dimension whose stride TMA cannot take (a size-1 one gets the packed stride in the launch)."""
    return size > 1 and (stride <= 0 or stride % 8 != 0)


# The scratch of a call (the programs' partial outputs and LSEs, the links of the tiles each program
# took, per KV head two counters: programs (with helpers: tiles) done, by which the last one knows it
# is last, and tiles claimed, and one count for the helpers) costs host time: eager decode below
# ~16k keys is bound by it (cProfile put allocations and the counters' fill first among our host costs on the H100's host,
# 2026-11-22). So:
# * eager calls keep it per (device, stream): calls on one stream run one after another, and the
#   kernel leaves its counters at zero, so a call needs neither allocations nor a fill. The
#   key is the stream's handle: a stream destroyed with this work still queued, whose handle a new
#   stream then gets, would share it (torch's own streams come from pools and are never destroyed);
# * a call captured into a CUDA graph gets its own partials (from the graph's pool) and its own
#   counters: a slice of a per-device pool zeroed once, before any capture, never handed out again
#   (so no fill kernel is captured; the counters are back at zero after every replay). A graph may be
#   replayed beside eager calls on another stream, so it shares nothing with them. When the pool is
#   used up, or was not there before the capture began, the counters are filled in the graph;
# * under torch.compile each call allocates its own.
# clear_workspaces() frees the per-stream scratch (the capture pool stays: graphs may hold slices).
_WORKSPACES: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
_CAPTURE_COUNTERS: dict[int, list] = {}  # device index -> [zeroed int32 pool, first unused entry]
CAPTURE_POOL = 1 << 19                  # counters for captured calls (2 x B*Hkv + 1 each), per device (2 MB)


def _capture_counters(device: torch.device, bh: int) -> torch.Tensor:
    """``bh`` zeroed counters for a call being captured into a CUDA graph (see above)."""
    pool = _CAPTURE_COUNTERS.get(device.index)
    if pool is None or pool[1] + bh > pool[0].numel():
        return torch.zeros(bh, dtype=torch.int32, device=device)  # captured: a fill per replay
    pool[1] += bh
    return pool[0][pool[1] - bh:pool[1]]


def _eager_scratch(device: torch.device, n: int, bh: int):
    """(fp32 scratch of at least ``n``, ``bh`` zeroed counters) for an eager call on the current stream."""
    key = (device.index, current_stream_handle(device.index))
    scratch, counters = _WORKSPACES.get(key, (None, None))
    if scratch is None or scratch.numel() < n or counters.numel() < bh:
        if device.index not in _CAPTURE_COUNTERS:  # zeroed and finished before any capture can use it
            _CAPTURE_COUNTERS[device.index] = [torch.zeros(CAPTURE_POOL, dtype=torch.int32, device=device), 0]
            torch.cuda.synchronize(device)
        if scratch is None or scratch.numel() < n:
            scratch = torch.empty(max(n, 1 << 16), dtype=torch.float32, device=device)
        if counters is None or counters.numel() < bh:  # a new, larger one starts at zero too
            counters = torch.zeros(max(bh, 1024), dtype=torch.int32, device=device)
        _WORKSPACES[key] = (scratch, counters)
    return scratch, counters


def clear_workspaces() -> None:
    """Free the decode scratch kept per (device, stream) (it is small: ~2 MB at B*Hkv = 32)."""
    _WORKSPACES.clear()


def _check_op_inputs(q, k, v, out, lse, part_out, part_lse, counters, tile_link):
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        if t.dtype not in (torch.float16, torch.bfloat16) or t.dtype != q.dtype or t.dim() != 4 or t.stride(-1) != 1:
            raise ValueError(f"decode: {name} must be a 4-D fp16 or bf16 tensor (q's dtype) with a contiguous last "
                             f"dim, got {t.dtype} {tuple(t.shape)} with strides {tuple(t.stride())}")
    if out.shape != q.shape:
        raise ValueError(f"decode: out must have q's shape {tuple(q.shape)}, got {tuple(out.shape)}")
    B, Hkv, Nk, D = k.shape
    # (the kernel maps q, k and v by these sizes alone)
    if v.shape != k.shape or q.shape[0] != B or q.shape[3] != D or Hkv == 0 or q.shape[1] % Hkv:
        raise ValueError(f"decode: q [B, Hq, Nq, D], k and v [B, Hkv, Nk, D] (the same shape) with Hq a multiple "
                         f"of Hkv, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    check_op_operands("decode", out, [(n, t, None) for n, t in (  # (devices: the sizes are checked around it)
        ("q", q), ("k", k), ("v", v), ("lse", lse), ("part_out", part_out), ("part_lse", part_lse),
        ("counters", counters), ("tile_link", tile_link))], "q and k")
    for name, t, dtype, rank in (("lse", lse, torch.float32, lse.dim()), ("part_out", part_out, torch.float32, 4),
                                 ("part_lse", part_lse, torch.float32, 3), ("counters", counters, torch.int32, 1),
                                 ("tile_link", tile_link, torch.int32, 1)):
        if t.dtype != dtype or t.dim() != rank or not t.is_contiguous():
            raise ValueError(f"decode: {name} must be a contiguous {rank}-D {dtype} tensor, got {t.dtype} "
                             f"{tuple(t.shape)}")
    if lse.numel() and lse.shape != q.shape[:3]:
        raise ValueError(f"decode: lse must be empty or [B, Hq, Nq] = {tuple(q.shape[:3])}, got {tuple(lse.shape)}")
    splits = part_out.shape[0]
    if part_out.shape[1:] != (B * Hkv, ROWS, D) or part_lse.shape != (splits, B * Hkv, ROWS) \
            or counters.shape != (_counters(B * Hkv),) or tile_link.shape != (B * Hkv * _tiles(Nk),):
        raise ValueError(f"decode: part_out {tuple(part_out.shape)}, part_lse {tuple(part_lse.shape)}, counters "
                         f"{tuple(counters.shape)} and tile_link {tuple(tile_link.shape)} must be [splits, B*Hkv, "
                         f"{ROWS}, D], [splits, B*Hkv, {ROWS}], [2*B*Hkv + 1] and [B*Hkv*ceil(Nk/{DECODE_TILE})]")


def _tiles(n_k: int) -> int:
    return -(-n_k // DECODE_TILE)


def _counters(bh: int) -> int:
    """Counters of a call: per KV head programs (or tiles) done and tiles claimed, and one more for
    the helpers (csrc/decode/split_kv.h)."""
    return 2 * bh + 1


def run_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor | None,
               splits: int, helpers: int, rows_per_head: int, tiles_per_split: int, qk_mult: float,
               log2_pscale: float, qmax: int, k_per_token: bool, smooth_k: bool, smooth_q: bool, causal: bool, pv: int,
               dynamic: bool, mask: MaskSpec | None = None) -> None:
    """Decode attention into ``out`` ([B, Hq, Nq, D] view) and ``lse`` (natural log, [B, Hq, Nq],
    or None) in one launch of ``splits`` programs per KV head (``dynamic``: sharing its tiles; else
    ``tiles_per_split`` tiles each), or with ``helpers`` > 0 one owner per KV head and that many
    helper programs, with ``splits`` partial slots per KV head: the owner's and ``splits`` - 1 for
    helpers (common.decode.cuda_plan); the scratch is described above. ``mask``: an attn_mask
    (common.masking.MaskSpec, MASK_KEEP or MASK_BIAS; its [B, Hq, Nq, Nk] view is read through its
    strides). Under tracing this is the
    custom op :func:`decode`, which checks its arguments; eager calls from common.decode (whose
    tensors are made to fit) launch directly: the op's dispatch and checks cost ~0.1 ms of host time
    per call, as much as the kernel at 16k keys."""
    B, Hkv, Nk, D = k.shape
    bh = B * Hkv
    n_out, n_lse, n_link = splits * bh * ROWS * D, splits * bh * ROWS, bh * _tiles(Nk)
    scalars = (dynamic, helpers, rows_per_head, tiles_per_split, qk_mult, log2_pscale, qmax, k_per_token, smooth_k,
               smooth_q, causal, pv)
    mask_kind = MASK_NONE if mask is None else mask.kind
    mask_t = mask.tensor if mask_kind != MASK_NONE else None
    if torch.compiler.is_compiling():
        lse = torch.empty(0, dtype=torch.float32, device=q.device) if lse is None else lse
        part_out = torch.empty(splits, bh, ROWS, D, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(splits, bh, ROWS, dtype=torch.float32, device=q.device)
        counters = torch.zeros(_counters(bh), dtype=torch.int32, device=q.device)
        tile_link = torch.empty(n_link, dtype=torch.int32, device=q.device)
        decode(q, k, v, out, lse, part_out, part_lse, counters, tile_link, *scalars,
               mask_t if mask_t is not None else lse[:0], mask_kind)
        return
    with on_device(q.device):  # the launch, the stream and the capture check are the current device's
        if torch.cuda.is_current_stream_capturing():
            scratch, counters = torch.empty(n_out + n_lse + n_link, dtype=torch.float32, device=q.device), \
                _capture_counters(q.device, _counters(bh))
        else:
            scratch, counters = _eager_scratch(q.device, n_out + n_lse + n_link, _counters(bh))
        part = scratch.data_ptr()  # [partial outputs | partial LSEs | tile links (int32)]
        _launch(q, k, v, out, 0 if lse is None else lse.data_ptr(), part, part + 4 * n_out,
                counters.data_ptr(), part + 4 * (n_out + n_lse), splits, *scalars, mask_t, mask_kind)


def _launch(q, k, v, out, lse_ptr, part_out_ptr, part_lse_ptr, counters_ptr, tile_link_ptr, splits, dynamic,
            helpers, rows_per_head, tiles_per_split, qk_mult, log2_pscale, qmax, k_per_token, smooth_k, smooth_q,
            causal, pv, mask, mask_kind):
    """The extension's launch on the current device and stream (pointers for the scratch and lse)."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    qs, ks, vs, os_ = q.stride(), k.stride(), v.stride(), out.stride()
    ms = mask.stride() if mask_kind != MASK_NONE else (0, 0, 0, 0)
    load().decode_forward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), qs[0], qs[1], qs[2], ks[0], ks[1], ks[2], vs[0], vs[1], vs[2],
        out.data_ptr(), os_[0], os_[1], os_[2], lse_ptr, part_out_ptr, part_lse_ptr, counters_ptr, tile_link_ptr,
        dynamic, B, Hkv, Nq, Nk, D, Hq // Hkv, rows_per_head, tiles_per_split, splits, helpers, qk_mult, log2_pscale,
        qmax, k_per_token, smooth_k, smooth_q, causal, q.dtype == torch.bfloat16, pv,
        mask.data_ptr() if mask_kind != MASK_NONE else 0, mask_kind, *ms, current_stream_handle(q.device.index))


@torch.library.custom_op("sageattn_repro::decode",
                         mutates_args=("out", "lse", "part_out", "part_lse", "counters", "tile_link"))
def decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
           part_out: torch.Tensor, part_lse: torch.Tensor, counters: torch.Tensor, tile_link: torch.Tensor,
           dynamic: bool, helpers: int, rows_per_head: int, tiles_per_split: int, qk_mult: float, log2_pscale: float,
           qmax: int, k_per_token: bool, smooth_k: bool, smooth_q: bool, causal: bool, pv: int, mask: torch.Tensor,
           mask_kind: int) -> None:
    """:func:`run_decode` as a custom op with a fake, so torch.compile sees one opaque op. ``mask``:
    the attn_mask's [B, Hq, Nq, Nk] view (uint8 for ``mask_kind`` 1, fp32 for 2; ignored for 0)."""
    _check_op_inputs(q, k, v, out, lse, part_out, part_lse, counters, tile_link)
    if mask_kind not in (0, 1, 2) or (mask_kind and (
            mask.shape != (q.shape[0], q.shape[1], q.shape[2], k.shape[2]) or mask.device != q.device
            or mask.dtype != (torch.uint8 if mask_kind == 1 else torch.float32))):
        raise ValueError(f"decode: mask_kind must be 0, 1 (a uint8 mask) or 2 (an fp32 bias), with the mask [B, Hq, "
                         f"Nq, Nk] on q's device; got kind {mask_kind}, {mask.dtype} {tuple(mask.shape)}")
    with on_device(q.device):
        _launch(q, k, v, out, lse.data_ptr() if lse.numel() else 0, part_out.data_ptr(), part_lse.data_ptr(),
                counters.data_ptr(), tile_link.data_ptr(), part_out.shape[0], dynamic, helpers, rows_per_head,
                tiles_per_split, qk_mult, log2_pscale, qmax, k_per_token, smooth_k, smooth_q, causal, pv,
                mask if mask_kind else None, mask_kind)


@decode.register_fake
def _(q, k, v, out, lse, part_out, part_lse, counters, tile_link, dynamic, helpers, rows_per_head, tiles_per_split,
      qk_mult, log2_pscale, qmax, k_per_token, smooth_k, smooth_q, causal, pv, mask, mask_kind):
    return None
