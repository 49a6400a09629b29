"""Decode on Hopper: the split-KV sweep of :mod:`common.decode` in CUDA (csrc/decode/split_kv.cu).

The same algorithm, the same split points and the same partial outputs as the Triton sweep
(common/triton_decode.py), whose combine kernel then merges the splits (and redoes, carefully, any
split that saw a NaN/Inf or an fp16 overflow). The CUDA sweep exists for speed: decode is bound by
reading the KV cache once, and it keeps three tiles of K and V in flight per program with cp.async
and quantizes them from shared memory (DECODE_NOTES.md has the numbers).

It covers fp16/bf16 inputs, head dim 64 or 128, up to 16 rows per KV head (query heads per KV head
times Nq rounded up to a power of two), INT8 or INT4 K codes per tile or per token, K smoothing on or
off, fp16 P V (fp16 or fp32 sums) or FP8 E4M3, causal or not. Q smoothing, FP8 E5M2 and
per-sequence lengths run the Triton sweep. ``backend="auto"`` picks it on sm_90 (``SAGE_DISABLE_CUDA=1``
turns that off), as does sage2's ``backend="cuda"``.
"""

from __future__ import annotations

import torch

ROWS = 16                 # query rows per program in the kernel
HEAD_DIMS = (64, 128)
PV_CODES = {"fp16_acc16": 0, "fp16_acc32": 1, "fp8_e4m3": 2}  # csrc/decode/split_kv.h DecodePv


def unsupported(spec, qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, mask, rows: int) -> str | None:
    """Why the CUDA sweep cannot run this decode call (None: it can). ``rows``: query heads per KV
    head x padded queries."""
    if spec.smooth_q:
        return "smooth_q=True"
    if spec.pv not in PV_CODES:
        return f"P V as {spec.pv}"
    if mask.has_lens:
        return "sequence lengths"
    if qh.shape[-1] not in HEAD_DIMS:
        return f"head_dim={qh.shape[-1]} (the kernel takes {HEAD_DIMS})"
    if rows > ROWS:
        return f"{rows} query rows per KV head (at most {ROWS})"
    for name, t in (("k", kh), ("v", vh)):  # cp.async copies 16-byte pieces of each row
        if t.stride(-1) != 1 or t.stride(-2) % 8 or t.data_ptr() % 16:
            return f"{name}'s rows are not 16-byte aligned"
    return None


def _check_op_inputs(q, k, v, part_out, part_lse, flags):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in (torch.float16, torch.bfloat16) or t.dtype != q.dtype or t.dim() != 4 or t.stride(-1) != 1:
            raise ValueError(f"decode_split: {name} must be a 4-D fp16 or bf16 tensor (q's dtype) with a contiguous "
                             f"last dim, got {t.dtype} {tuple(t.shape)} with strides {tuple(t.stride())}")
    B, Hkv, D = k.shape[0], k.shape[1], k.shape[3]
    for name, t, dtype, rank in (("part_out", part_out, torch.float32, 4), ("part_lse", part_lse, torch.float32, 3),
                                 ("flags", flags, torch.int32, 1)):
        if t.dtype != dtype or t.dim() != rank or not t.is_contiguous():
            raise ValueError(f"decode_split: {name} must be a contiguous {rank}-D {dtype} tensor, got {t.dtype} "
                             f"{tuple(t.shape)}")
    splits = part_out.shape[0]
    if part_out.shape[1:] != (B * Hkv, ROWS, D) or part_lse.shape != (splits, B * Hkv, ROWS) \
            or flags.shape != (splits * B * Hkv,):
        raise ValueError(f"decode_split: part_out {tuple(part_out.shape)}, part_lse {tuple(part_lse.shape)} and flags "
                         f"{tuple(flags.shape)} must be [splits, B*Hkv, {ROWS}, D], [splits, B*Hkv, {ROWS}] and "
                         "[splits*B*Hkv]")


def run_split(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor,
              flags: torch.Tensor, rows_per_head: int, tiles_per_split: int, qk_mult: float, log2_pscale: float,
              qmax: int, k_per_token: bool, smooth_k: bool, causal: bool, pv: int) -> None:
    """The fast sweep of every (split, KV head): each split's normalized output ``part_out``, its
    log2 LSE ``part_lse`` and ``flags`` (1: a NaN/Inf or an fp16 overflow, redo carefully).
    Under tracing this is the custom op :func:`decode_split`; eager calls launch directly (the
    op's dispatch costs ~0.1 ms of host time per call, as much as the kernel at 16k keys)."""
    args = (q, k, v, part_out, part_lse, flags, rows_per_head, tiles_per_split, qk_mult, log2_pscale, qmax,
            k_per_token, smooth_k, causal, pv)
    if torch.compiler.is_compiling():
        decode_split(*args)
    else:
        _launch(*args)


def _launch(q, k, v, part_out, part_lse, flags, rows_per_head, tiles_per_split, qk_mult, log2_pscale, qmax,
            k_per_token, smooth_k, causal, pv):
    _check_op_inputs(q, k, v, part_out, part_lse, flags)
    from . import build

    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    # positional: pybind11 matching 33 keywords costs more host time than the launch
    build.load().decode_split_forward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
        k.stride(2), v.stride(0), v.stride(1), v.stride(2), part_out.data_ptr(), part_lse.data_ptr(), flags.data_ptr(),
        B, Hkv, Nq, Nk, D, Hq // Hkv, rows_per_head, tiles_per_split, part_out.shape[0], qk_mult, log2_pscale, qmax,
        k_per_token, smooth_k, causal, q.dtype == torch.bfloat16, pv, torch.cuda.current_stream(q.device).cuda_stream)


@torch.library.custom_op("sageattn_repro::decode_split", mutates_args=("part_out", "part_lse", "flags"))
def decode_split(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor,
                 flags: torch.Tensor, rows_per_head: int, tiles_per_split: int, qk_mult: float, log2_pscale: float,
                 qmax: int, k_per_token: bool, smooth_k: bool, causal: bool, pv: int) -> None:
    """:func:`run_split` as a custom op with a fake, so torch.compile sees one opaque op."""
    _launch(q, k, v, part_out, part_lse, flags, rows_per_head, tiles_per_split, qk_mult, log2_pscale, qmax,
            k_per_token, smooth_k, causal, pv)


@decode_split.register_fake
def _(q, k, v, part_out, part_lse, flags, rows_per_head, tiles_per_split, qk_mult, log2_pscale, qmax, k_per_token,
      smooth_k, causal, pv):
    return None
