"""Public API of SageAttention3 (inference): FP4 microscaling attention."""

from __future__ import annotations

import math

import torch

from common import build, nonfinite
from common.checks import device_capability
from common.api import natural_lse, runs_on_input_device, start_call, validate_call
from common.compile_ops import AttentionOp
from common.masking import NO_MASK
from common.nonfinite import flagged, nonfinite_flag, rerun_without_nonfinite
from common.smoothing import q_smoothing_delta_s

from . import cuda as cuda_kernel
from .quant import quantize_qkv_fp4

SCALE_FORMATS = ("nvfp4", "mxfp4")
BACKENDS = ("auto", "cuda", "triton", "torch")


def fp4_hardware(device=None) -> bool:
    """Whether the GPU has native FP4 tensor cores (Blackwell: compute capability 10.0 and newer).

    False on Hopper (H100/H200) and older: there sage3 is an exact emulation (FP4 values and
    scales dequantized into 16-bit tensor-core operands), with the speed of that emulation.
    """
    if not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device)[0] >= 10


GLOBAL_RANGE = 1344.0  # 448 (E4M3 max) * 6 (E2M1 max) / 2: smoothing can double a value's magnitude


def global_scales(qh, kh, vh):
    """((s_q, s_k, s_v), (q / s_q, k / s_k, v / s_v) in fp32, all finite): one scale per tensor,
    amax / GLOBAL_RANGE (1 for an all-zero or non-finite tensor; the NaN/Inf rule handles the
    latter). The three maxima are read on the host (one sync): they scale the softmax and the
    output, and a NaN or Inf input shows in them, so no separate check is needed."""
    amax = torch.stack([t.abs().amax().float() for t in (qh, kh, vh)]).tolist()
    finite = all(math.isfinite(a) for a in amax)
    scales = [a / GLOBAL_RANGE if math.isfinite(a) and a > 0 else 1.0 for a in amax]
    return scales, tuple(t.float() / sc for t, sc in zip((qh, kh, vh), scales)), finite


@runs_on_input_device
def sageattn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, tensor_layout: str = "HND",
             is_causal: bool = False, sm_scale: float | None = None, return_lse: bool = False,
             backend: str = "auto", scale_format: str = "nvfp4", two_level_p: bool = True,
             smooth_q: bool = True, smooth_k: bool = True, global_scale: bool = False):
    """SageAttention3: Q, K, P, V in FP4 (E2M1) with block scales, exactly as the paper quantizes.

    Args beyond :func:`sage1.sageattn`'s (layouts, causal, sm_scale, return_lse, backend):
        scale_format: ``"nvfp4"`` (an E4M3 scale per 16 elements) or ``"mxfp4"`` (an E8M0,
            power-of-two, scale per 32), along each matmul's reduction dimension.
        two_level_p: first spread each row of P over (0, 448*6] (the range FP4 x E4M3 can
            represent), then quantize per block; ``False`` quantizes P in [0, 1] directly.
        smooth_q: subtract each 128-query block's mean, add ``mean_q . K^T`` back to S (fp32).
        smooth_k: subtract K's token mean (exact; the LSE is corrected).
        global_scale: divide Q, K and V by one fp32 scale each before the block quantization
            (``amax / GLOBAL_RANGE``: NVFP4's second-level, per-tensor scale, with 2x headroom for
            the smoothing) and fold it back into the softmax scale and the output. The paper has
            none, so the default is off; then block scales saturate at 448 (|x| beyond ~2.7e3 is
            clipped) and underflow below 2^-9 (blocks with |x| below ~1e-2 vanish). On, both are
            handled, for one host read of the three maxima and fp32 copies of the scaled inputs.

    On GPUs without FP4 tensor cores (``fp4_hardware()`` is False, e.g. the H100) the FP4 codes
    are dequantized exactly into 16-bit operands (K and V by a pass before the kernel, Q in it)
    and multiplied on 16-bit tensor cores: the paper's numerics, not its speed.

    backend: ``"cuda"`` is the Hopper wgmma kernel of csrc/sage3_sm90 (:mod:`sage3.cuda`: padded
        head dims 64 and 128; its KV tile is 128 keys, the Triton kernel's 64, and P's
        quantization depends on the tile); ``"auto"`` picks it on an sm_90 GPU where it covers
        the call and builds, else the Triton kernel (CUDA tensors) or the emulation (CPU).
    """
    if torch.compiler.is_compiling():  # one opaque custom op for torch.compile (common.compile_ops)
        return _OP(q, k, v, tensor_layout=tensor_layout, is_causal=is_causal, sm_scale=sm_scale, return_lse=return_lse,
                   backend=backend, scale_format=scale_format, two_level_p=two_level_p, smooth_q=smooth_q, smooth_k=smooth_k,
                   global_scale=global_scale)
    shape, scale, be = validate_call(
        q, k, v, tensor_layout, sm_scale, backend,
        flags=dict(is_causal=is_causal, return_lse=return_lse, two_level_p=two_level_p, smooth_q=smooth_q,
                   smooth_k=smooth_k, global_scale=global_scale),
        choices=[("scale_format", scale_format, SCALE_FORMATS)], backends=BACKENDS)
    if be == "cuda":
        build.check_cuda_device(q.device)
    be = build.pick_cuda(backend, be, q.device, lambda: cuda_kernel.unsupported(shape.head_dim), "sage3")
    if be == "triton" and q.device.type == "cuda" and device_capability(q.device) < (8, 9):
        raise ValueError("sage3's Triton kernels store and read E4M3 (FP8) block scales, which Triton needs compute "
                         "capability 8.9+ for; use backend='torch' (the emulation) on this GPU")

    with torch.no_grad():
        qh, kh, vh, out, out_hnd, trivial = start_call(q, k, v, tensor_layout, shape, return_lse)
        D = qh.shape[-1]
        if trivial is not None:
            return trivial
        v_scale = 1.0
        if global_scale:  # quantize q/s_q, k/s_k, v/s_v; S and the output get the scales back
            (s_q, s_k, v_scale), (qh, kh, vh), finite = global_scales(qh, kh, vh)
            scale = scale * s_q * s_k
            bad = nonfinite.CHECK_NONFINITE and not finite
        else:
            bad = nonfinite_flag(qh, kh, vh)  # NaN/Inf: SDPA's rows, not a quantization block's (common.nonfinite)
        qf = quantize_qkv_fp4(qh, kh, vh, fmt=scale_format, smooth_q=smooth_q, smooth_k=smooth_k,
                              backend="triton" if be == "cuda" else be)
        ds = q_smoothing_delta_s(qf.q_block_mean, kh, qf.k_mean, tf32=True) if smooth_q else None
        if be == "cuda":
            lse2 = cuda_kernel.launch(qf, out_hnd, sm_scale=scale, delta_s=ds, is_causal=is_causal,
                                      two_level_p=two_level_p, op_dtype=q.dtype, return_lse=return_lse)
        elif be == "triton":
            from .kernel import launch

            lse2 = launch(qf, out_hnd, sm_scale=scale, delta_s=ds, is_causal=is_causal, two_level_p=two_level_p,
                          op_dtype=q.dtype, return_lse=return_lse)
        else:
            from .emulation import attention_emulated

            o, lse2 = attention_emulated(qf, sm_scale=scale, delta_s=ds, is_causal=is_causal, two_level_p=two_level_p,
                                         op_dtype=q.dtype, return_lse=return_lse)
            out_hnd.copy_(o[..., :D])
        if v_scale != 1.0:
            out_hnd.mul_(v_scale)
        res = (out, natural_lse(lse2, qh, qf.k_mean, scale)) if return_lse else out
        if flagged(bad):
            return rerun_without_nonfinite(sageattn, q, k, v, qh, kh, vh, tensor_layout=tensor_layout, is_causal=is_causal,
                                           return_lse=return_lse, mask=NO_MASK, sm_scale=sm_scale, backend=backend,
                                           scale_format=scale_format, two_level_p=two_level_p, smooth_q=smooth_q,
                                           smooth_k=smooth_k, global_scale=global_scale)
        return res


# one opaque custom op for torch.compile (common.compile_ops)
_OP = AttentionOp("sageattn_repro::sage3_attn", sageattn, [('scale_format', 'str'), ('two_level_p', 'bool'), ('smooth_q', 'bool'), ('smooth_k', 'bool'), ('global_scale', 'bool')], has_mask=False)
