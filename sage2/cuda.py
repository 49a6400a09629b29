"""``backend="cuda"``: SageAttention2 on Hopper's own instructions (csrc/sage2_sm90/attention.cu).

INT8 Q K^T on wgmma (IGMMA), FP8 P V on wgmma (QGMMA) with P straight from registers, TMA loads
and a producer warpgroup feeding two (head dim 128) or three (64) consumer warpgroups that take
turns on the tensor cores. The quantization passes are the Triton
ones of the Triton backend (same codes, same scales); only V^T's key order differs (see
``quant_v.wgmma_key_position``). Built on first use by :mod:`common.build`.

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


def _check_op_inputs(q_codes, k_codes, v_codes, q_scale, k_scale, v_scale, out):
    """The kernel reads every input through its shape alone (TMA maps of contiguous tensors)."""
    for name, t, dtype in (("q_codes", q_codes, torch.int8), ("k_codes", k_codes, torch.int8),
                           ("v_codes", v_codes, torch.uint8), ("q_scale", q_scale, torch.float32),
                           ("k_scale", k_scale, torch.float32), ("v_scale", v_scale, torch.float32)):
        if t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"sage2_sm90_fwd: {name} must be a contiguous {dtype} tensor, got {t.dtype} "
                             f"with strides {tuple(t.stride())}")
    if q_codes.dim() != 4 or k_codes.dim() != 4 or v_codes.dim() != 4:
        raise ValueError("sage2_sm90_fwd: q_codes, k_codes and v_codes must be 4-D ([B, H, N, DP], [B, H, DP, NPAD])")
    if out.dtype not in (torch.float16, torch.bfloat16) or out.stride(-1) != 1:
        raise ValueError(f"sage2_sm90_fwd: out must be fp16 or bf16 with a contiguous last dim, got {out.dtype} "
                         f"with strides {tuple(out.stride())}")


@torch.library.custom_op("sageattn_repro::sage2_sm90_fwd", mutates_args=("out",))
def sage2_sm90_fwd(q_codes: torch.Tensor, k_codes: torch.Tensor, v_codes: torch.Tensor, q_scale: torch.Tensor,
                   k_scale: torch.Tensor, v_scale: torch.Tensor, out: torch.Tensor, q_bad: torch.Tensor | None,
                   first_bad: torch.Tensor | None, causal: bool, return_lse: bool) -> torch.Tensor:
    """The kernel on quantized inputs (``v_codes``: V^T's E4M3 bytes as uint8, keys in the wgmma
    order); writes ``out`` ([B, Hq, Nq, D] view, any strides with a contiguous last dim) and
    returns the log2-domain LSE ([B, Hq, Nq], or empty)."""
    _check_op_inputs(q_codes, k_codes, v_codes, q_scale, k_scale, v_scale, out)
    B, Hq, Nq, DP = q_codes.shape
    Hkv, Nk = k_codes.shape[1], k_codes.shape[2]
    D = out.shape[-1]
    lse = torch.empty((B, Hq, Nq) if return_lse else (0,), dtype=torch.float32, device=out.device)
    from common import build

    with build.on_device(out.device):  # the launch goes to the current device
        build.load().sage2_sm90_forward(
            q_codes=q_codes.data_ptr(), k_codes=k_codes.data_ptr(), v_codes=v_codes.data_ptr(),
            q_scale=q_scale.data_ptr(), k_scale=k_scale.data_ptr(), v_scale=v_scale.data_ptr(),
            out=out.data_ptr(), out_stride_b=out.stride(0), out_stride_h=out.stride(1), out_stride_n=out.stride(2),
            lse=lse.data_ptr() if return_lse else 0,
            q_bad=q_bad.data_ptr() if q_bad is not None else 0,
            first_bad=first_bad.data_ptr() if first_bad is not None else 0,
            batch=B, heads_q=Hq, heads_kv=Hkv, seqlen_q=Nq, seqlen_k=Nk, npad=v_codes.shape[-1], head_dim=D,
            padded_head_dim=DP, causal=causal, out_bf16=out.dtype == torch.bfloat16,
            stream=build.current_stream_handle(out.device.index))
    return lse


@sage2_sm90_fwd.register_fake
def _(q_codes, k_codes, v_codes, q_scale, k_scale, v_scale, out, q_bad, first_bad, causal, return_lse):
    B, Hq, Nq, _ = q_codes.shape
    return q_codes.new_empty((B, Hq, Nq) if return_lse else (0,), dtype=torch.float32)


def launch(qk, qv, out_hnd: torch.Tensor, *, is_causal: bool, return_lse: bool, flags=None):
    """Run the kernel on sage2's quantized Q, K (common.int_qk) and V (quant_v, wgmma key order).
    Returns the log2-domain LSE or None."""
    q_scale = qk.q_scale_per_token().contiguous()
    k_scale = qk.k_scale_per_token().contiguous()
    lse = sage2_sm90_fwd(qk.q_codes, qk.k_codes, qv.codes.view(torch.uint8), q_scale, k_scale, qv.scale, out_hnd,
                         flags.q_bad if flags is not None else None, flags.first_bad if flags is not None else None,
                         is_causal, return_lse)
    return lse if return_lse else None
