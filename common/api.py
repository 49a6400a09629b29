"""What every generation's public function does around its kernel: the output tensor, the
trivial cases that run no kernel, and the natural-log LSE with the K-smoothing shift undone."""

from __future__ import annotations

import functools
import math

import torch

from . import build
from .checks import (AttentionShape, check_attention_inputs, check_choice, check_flag, check_no_grad, resolve_backend,
                     resolve_sm_scale, to_hnd)
from .smoothing import lse_shift_from_k_mean


def runs_on_input_device(fn):
    """``fn(q, ...)`` run with q's CUDA device current (:func:`common.build.on_device`): Triton and
    the CUDA extension launch on the current device, which a model spread over GPUs
    (``device_map="auto"``) need not have made its tensors' device."""
    @functools.wraps(fn)
    def call(q, *args, **kwargs):
        if isinstance(q, torch.Tensor) and q.is_cuda and not torch.compiler.is_compiling():
            with build.on_device(q.device):
                return fn(q, *args, **kwargs)
        return fn(q, *args, **kwargs)
    return call


def validate_call(q, k, v, tensor_layout: str, sm_scale, backend: str, *, flags: dict, choices=(),
                  backends=("auto", "triton", "torch"), attn_mask=None):
    """The checks every public function runs, in this order: the tensors, the bool ``flags``
    ({name: value}), the ``choices`` ((name, value, allowed) triples), sm_scale, the backend, and
    that no input requires grad (these kernels are inference-only). Returns (shape, sm_scale, backend)."""
    shape = check_attention_inputs(q, k, v, tensor_layout)
    for name, flag in flags.items():
        check_flag(name, flag)
    for name, value, allowed in choices:
        check_choice(name, value, allowed)
    scale = resolve_sm_scale(sm_scale, shape.head_dim)
    be = resolve_backend(backend, q.device, backends)
    check_kernel_sizes(shape, be)
    check_no_grad(q, k, v, "sage3.sageattn_train", attn_mask)
    return shape, scale, be


# The GPU kernels (Triton and CUDA, and the passes that quantize for them) address a tensor with
# 32-bit offsets where a program finds its batch and head (b * stride_b): beyond 2^31 elements, the
# kernels' padding included, they would read and write out of bounds. Such calls get an error.
KERNEL_MAX_ELEMENTS = 2**31
GRID_Y_MAX = 65535


def check_kernel_sizes(shape: AttentionShape, backend: str) -> None:
    """Raise ``ValueError`` where a GPU backend would address q or k/v past 32-bit offsets, or
    launch more than 65535 (batch, head) programs on a grid's second axis (CUDA's limit there), naming
    the largest batch that fits; the emulation, ``backend="torch"``, has neither limit."""
    if backend == "torch":
        return
    if shape.batch * shape.heads_q > GRID_Y_MAX:
        raise ValueError(f"batch {shape.batch} x {shape.heads_q} query heads = {shape.batch * shape.heads_q} (batch, "
                         f"head) pairs: backend={backend!r} launches one program row per pair on a grid axis that CUDA "
                         f"caps at {GRID_Y_MAX}; split the batch into calls of at most "
                         f"{max(1, GRID_Y_MAX // shape.heads_q)} sequences, or use backend='torch'")
    from .int_qk import padded_head_dim

    dp = padded_head_dim(shape.head_dim)
    for name, heads, n in (("q", shape.heads_q, shape.seqlen_q), ("k and v", shape.heads_kv, shape.seqlen_k)):
        per_sequence = heads * (-(-n // 128) * 128) * dp  # (lengths padded to 128, channels to dp)
        if shape.batch * per_sequence >= KERNEL_MAX_ELEMENTS:
            fits = (KERNEL_MAX_ELEMENTS - 1) // per_sequence
            how = (f"split the batch into calls of at most {fits} sequences" if fits else
                   "one sequence alone is too long for them")
            raise ValueError(
                f"{name} of batch {shape.batch}, {heads} heads, {n} tokens and head_dim {shape.head_dim} hold "
                f"{shape.batch * per_sequence} values with the kernels' padding: backend={backend!r} addresses "
                f"at most 2^31 with 32-bit offsets; {how}, or use backend='torch'")


def start_call(q, k, v, tensor_layout: str, shape: AttentionShape, return_lse: bool):
    """What every public function does before quantizing: HND views of q, k, v, a fresh output in
    q's layout and its HND view, and the result of a call that needs no kernel (else None).
    Returns (qh, kh, vh, out, out_hnd, trivial)."""
    qh, kh, vh = (to_hnd(t, tensor_layout) for t in (q, k, v))
    out, out_hnd = new_output(q, tensor_layout)
    return qh, kh, vh, out, out_hnd, trivial_result(out, shape, return_lse)


def new_output(q: torch.Tensor, tensor_layout: str):
    """A fresh output in q's layout and dtype, and its [B, H, N, D] view."""
    out = torch.empty_like(q, memory_format=torch.contiguous_format)  # ~4x cheaper than torch.empty(q.shape, ...)
    return out, to_hnd(out, tensor_layout)


def trivial_result(out: torch.Tensor, shape: AttentionShape, return_lse: bool):
    """Empty batch/heads/queries or no keys: zeros (and an LSE of -inf), no kernel; else None."""
    if out.numel() and shape.seqlen_k:
        return None
    out.zero_()
    if not return_lse:
        return out
    return out, torch.full((shape.batch, shape.heads_q, shape.seqlen_q), float("-inf"), device=out.device)


def natural_lse(lse2: torch.Tensor, q_hnd: torch.Tensor, k_mean: torch.Tensor | None, sm_scale: float) -> torch.Tensor:
    """log2-domain LSE of the kernels -> natural log of the exact attention's LSE: the kernels saw
    K - mean_k, which moved every score of row i by sm_scale * q_i . mean_k."""
    lse = lse2 * math.log(2.0)
    return lse if k_mean is None else lse + lse_shift_from_k_mean(q_hnd, k_mean, sm_scale)
