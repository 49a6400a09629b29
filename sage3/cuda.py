"""``backend="cuda"``: SageAttention3's FP4 attention on Hopper wgmma (csrc/sage3_sm90/attention.cu).

Still an exact emulation (the H100 has no FP4 tensor cores): Q, K and V are quantized to FP4 by
the Triton passes of the Triton backend (same codes, same scales), dequantized exactly into
fp16/bf16 once per token, and multiplied on 16-bit wgmma with fp32 accumulation; P is quantized
to FP4 per 16 (NVFP4) or 32 (MXFP4) keys in registers. The schedule is sage2's Hopper kernel's
(a TMA producer warpgroup and two consumer warpgroups taking turns on the tensor cores), which
runs the P quantization's ALU work under the other warpgroup's matmuls.

The kernel's KV tile is 128 keys (the Triton kernel's is 64). P is quantized after the running
max shift, so the tile is part of the algorithm: the emulation that matches this backend is
``attention_emulated(..., kv_tile=128)`` (:data:`KV_TILE`).

What it covers (others: ``backend="triton"``, which ``"auto"`` then picks): sm_90 GPUs; padded
head dim 64 or 128 (head dims 33..128); everything else sage3.sageattn takes (both scale formats,
two-level or direct P, smoothing, causal, GQA, layouts, return_lse, any length, fp16/bf16).
Speed and versions: sage3/NOTES.md.
"""

from __future__ import annotations

import math

import torch

from common.checks import check_op_kv_layout, check_op_operands
from common.int_qk import LOG2E

from .emulation import TWO_LEVEL_RANGE
from .quant import Q_BLOCK, padded_head_dim

HEAD_DIMS = (64, 128)
KV_TILE = 128


def unsupported(head_dim: int) -> str | None:
    """Why the CUDA kernel cannot run this call (None: it can)."""
    if padded_head_dim(head_dim) not in HEAD_DIMS:
        return f"head_dim={head_dim} (the kernel takes padded head dims {HEAD_DIMS}: 33..128)"
    return None


def _check_op_inputs(q, k, vt, delta_s, out):
    """The kernel reads q, k and vt through their shapes alone (TMA maps of contiguous tensors)."""
    for name, t in (("q", q), ("k", k), ("vt", vt)):
        if t.dim() != 4 or t.dtype != out.dtype or not t.is_contiguous():
            raise ValueError(f"sage3_sm90_fwd: {name} must be a contiguous 4-D {out.dtype} tensor, got {t.dtype} "
                             f"{tuple(t.shape)} with strides {tuple(t.stride())}")
    if out.dtype not in (torch.float16, torch.bfloat16) or out.stride(-1) != 1:
        raise ValueError(f"sage3_sm90_fwd: out must be fp16 or bf16 with a contiguous last dim, got {out.dtype} "
                         f"with strides {tuple(out.stride())}")
    B, Hq, Nq, DP = q.shape
    _, Hkv, Nk, _ = k.shape
    D, npad = out.shape[-1], vt.shape[-1]
    check_op_operands("sage3_sm90_fwd", out, [
        ("q", q, None), ("out", out, (B, Hq, Nq, D)), ("k", k, (B, Hkv, Nk, DP)), ("vt", vt, (B, Hkv, DP, npad)),
        ("delta_s", delta_s, None)],
        f"q {list(q.shape)}, k {list(k.shape)}, out's head dim and vt's keys")
    check_op_kv_layout("sage3_sm90_fwd", HEAD_DIMS, DP, D, Hq, Hkv, Nk, npad, KV_TILE, "vt")
    if B * Hq > 65535:  # (the grid's y; the public path refuses it first, common.api)
        raise ValueError(f"sage3_sm90_fwd: batch * query heads = {B * Hq} is more than 65535")
    want = (B, Hq, -(-Nq // Q_BLOCK), k.shape[2])
    if delta_s is not None and (tuple(delta_s.shape) != want or delta_s.dtype != torch.float32
                                or not delta_s.is_contiguous()):
        raise ValueError(f"sage3_sm90_fwd: delta_s must be a contiguous float32 tensor of shape {want}, got "
                         f"{delta_s.dtype} {tuple(delta_s.shape)}")


@torch.library.custom_op("sageattn_repro::sage3_sm90_fwd", mutates_args=("out",))
def sage3_sm90_fwd(q: torch.Tensor, k: torch.Tensor, vt: torch.Tensor, delta_s: torch.Tensor | None,
                   out: torch.Tensor, mult: float, log2_p_range: float, mxfp4: bool, causal: bool,
                   return_lse: bool) -> torch.Tensor:
    """The kernel on dequantized FP4 values: q [B, Hq, Nq, DP], k [B, Hkv, Nk, DP], vt [B, Hkv, DP,
    NPAD] (V transposed, keys padded to 128), all in out's dtype; delta_s [B, Hq, ceil(Nq/128), Nk]
    fp32 or None. Writes ``out`` ([B, Hq, Nq, D] view, contiguous last dim) and returns the
    log2-domain LSE ([B, Hq, Nq], or empty)."""
    _check_op_inputs(q, k, vt, delta_s, out)
    from common import build

    B, Hq, Nq, DP = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    lse = torch.empty((B, Hq, Nq) if return_lse else (0,), dtype=torch.float32, device=out.device)
    with build.on_device(out.device):  # the launch goes to the current device
        build.load().sage3_sm90_forward(
            q.data_ptr(), k.data_ptr(), vt.data_ptr(), delta_s.data_ptr() if delta_s is not None else 0,
            out.data_ptr(), out.stride(0), out.stride(1), out.stride(2), lse.data_ptr() if return_lse else 0,
            mult, log2_p_range, B, Hq, Hkv, Nq, Nk, vt.shape[-1], out.shape[-1], DP, causal,
            out.dtype == torch.bfloat16, mxfp4, build.current_stream_handle(out.device.index))
    return lse


@sage3_sm90_fwd.register_fake
def _(q, k, vt, delta_s, out, mult, log2_p_range, mxfp4, causal, return_lse):
    B, Hq, Nq, _ = q.shape
    return q.new_empty((B, Hq, Nq) if return_lse else (0,), dtype=torch.float32)


def dequantized(qf, op_dtype: torch.dtype):
    """Q, K and V^T of a QuantizedFP4 as exact 16-bit values, one Triton pass each."""
    from .kernel import dequantize_rows

    return tuple(dequantize_rows(p, s, qf.fmt, op_dtype) for p, s in
                 ((qf.q_packed, qf.q_scales), (qf.k_packed, qf.k_scales), (qf.v_packed, qf.v_scales)))


def launch(qf, out_hnd: torch.Tensor, *, sm_scale: float, delta_s, is_causal: bool, two_level_p: bool,
           op_dtype: torch.dtype, return_lse: bool, unpacked=None):
    """Run the kernel on sage3's quantized Q, K, V (sage3.quant). Returns the log2-domain LSE or None.
    ``unpacked``: :func:`dequantized`'s result, when the caller has it (to time the kernel alone)."""
    q16, k16, vt16 = unpacked or dequantized(qf, op_dtype)
    lse = sage3_sm90_fwd(q16, k16, vt16, delta_s, out_hnd, sm_scale * LOG2E,
                         math.log2(TWO_LEVEL_RANGE) if two_level_p else 0.0, qf.fmt == "mxfp4", is_causal, return_lse)
    return lse if return_lse else None
