"""Input checks and tensor layouts shared by every generation's public function.

Every public ``sageattn``-style function calls :func:`check_attention_inputs` first, so that bad
input gets a ``ValueError``/``TypeError`` naming the argument and what is allowed, never a crash
inside a kernel or a silently wrong result.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
LAYOUTS = ("HND", "NHD")
MAX_HEAD_DIM = 256


class AttentionShape(NamedTuple):  # a tuple: built on every call, ~5x cheaper than a frozen dataclass
    batch: int
    heads_q: int
    heads_kv: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    layout: str

    @property
    def gqa_group(self) -> int:
        return self.heads_q // self.heads_kv


def check_choice(name: str, value, allowed) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def to_hnd(x: torch.Tensor, layout: str) -> torch.Tensor:
    """View a ``layout`` tensor as ``[B, H, N, D]`` (no copy)."""
    return x if layout == "HND" else x.transpose(1, 2)


def from_hnd(x: torch.Tensor, layout: str) -> torch.Tensor:
    """View a ``[B, H, N, D]`` tensor in ``layout`` (no copy)."""
    return x if layout == "HND" else x.transpose(1, 2)


def check_attention_inputs(q, k, v, tensor_layout: str = "HND", *, max_head_dim: int = MAX_HEAD_DIM) -> AttentionShape:
    """Validate q, k, v for attention and return their shape.

    Rules: tensors of rank 4 in ``tensor_layout`` (``HND`` = [B, H, N, D], ``NHD`` = [B, N, H, D]);
    dtype float16 or bfloat16, the same for all three; one device; equal batch; k and v of the same
    shape; ``Hq % Hkv == 0`` (GQA/MQA); equal head_dim, at most ``max_head_dim``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_choice("tensor_layout", tensor_layout, LAYOUTS)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            want = "[B, H, N, D]" if tensor_layout == "HND" else "[B, N, H, D]"
            raise ValueError(f"{name} must have rank 4 ({want} for tensor_layout={tensor_layout!r}), got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name}.dtype must be torch.float16 or torch.bfloat16, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on the same device, got {q.device}, {k.device}, {v.device}")
    qh, kh, vh = (to_hnd(t, tensor_layout) for t in (q, k, v))
    B, Hq, Nq, D = qh.shape
    _, Hkv, Nk, Dk = kh.shape
    if kh.shape != vh.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if kh.shape[0] != B:
        raise ValueError(f"q and k must have the same batch size, got {B} and {kh.shape[0]}")
    if Dk != D:
        raise ValueError(f"q and k must have the same head_dim, got {D} and {Dk}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"the number of query heads ({Hq}) must be a multiple of the number of key/value heads ({Hkv})")
    if not 1 <= D <= max_head_dim:
        raise ValueError(f"head_dim must be between 1 and {max_head_dim}, got {D}")
    return AttentionShape(B, Hq, Hkv, Nq, Nk, D, tensor_layout)


def device_capability(device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device (cached: torch's query costs ~20 us of
    host time, paid on every attention call otherwise)."""
    return _properties(_index(device))[0]


def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device (cached, as :func:`device_capability`)."""
    return _properties(_index(device))[1]


def _index(device) -> int:
    index = (device if isinstance(device, torch.device) else torch.device(device)).index
    return torch.cuda.current_device() if index is None else index


@functools.lru_cache(maxsize=None)
def _properties(index: int) -> tuple[tuple[int, int], int]:
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), props.multi_processor_count


def resolve_sm_scale(sm_scale, head_dim: int) -> float:
    """``sm_scale`` or its default ``1/sqrt(head_dim)``; must be a finite positive number."""
    if sm_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, (int, float)):
        raise TypeError(f"sm_scale must be a float or None, got {type(sm_scale).__name__}")
    if not math.isfinite(sm_scale) or sm_scale <= 0:
        raise ValueError(f"sm_scale must be a finite positive number, got {sm_scale!r}")
    return float(sm_scale)


def check_no_grad(q, k, v, training_hint: str, attn_mask=None) -> None:
    """Inference kernels cut gradients: refuse inputs (a float mask, a learned bias, among them)
    that require grad while grad mode is on."""
    mask = (attn_mask,) if isinstance(attn_mask, torch.Tensor) else ()
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *mask)):
        raise RuntimeError(
            "this attention is inference-only and would silently cut gradients, but an input requires grad; "
            f"use {training_hint} for training, or call it under torch.no_grad() / torch.inference_mode()"
        )


def check_op_operands(who: str, out: torch.Tensor, expect, source: str) -> None:
    """For a kernel's custom op, which reads and writes every tensor by the sizes it takes from a
    few of them (``source`` names those): each ``(name, tensor, shape)`` of ``expect`` has that
    shape (a None shape: any; a None tensor is skipped), and every tensor is on ``out``'s device."""
    for name, t, shape in expect:
        if t is not None and shape is not None and tuple(t.shape) != tuple(shape):
            raise ValueError(f"{who}: {name} must be {list(shape)} (from {source}), got {list(t.shape)}")
    devices = {str(t.device) for _, t, _ in expect if t is not None}
    if devices - {str(out.device)}:
        raise ValueError(f"{who}: every tensor must be on out's device ({out.device}), got {sorted(devices)}")


def check_op_kv_layout(who: str, head_dims, dp: int, head_dim: int, heads_q: int, heads_kv: int, keys: int,
                       padded_keys: int, multiple: int, v_name: str) -> None:
    """For a Hopper kernel's custom op: the padded head dim ``dp`` is one the build has, the head dim
    fits in it, query heads are a multiple of KV heads, and V's transposed codes (``v_name``) hold
    the keys rounded up to ``multiple`` (the kernel's key tile)."""
    if dp not in head_dims or not 0 < head_dim <= dp or heads_kv == 0 or heads_q % heads_kv \
            or padded_keys % multiple or not keys <= padded_keys < keys + multiple:
        raise ValueError(f"{who}: need DP in {head_dims}, 0 < head dim {head_dim} <= DP = {dp}, query heads "
                         f"{heads_q} a multiple of KV heads {heads_kv}, and {v_name}'s keys {padded_keys} = {keys} "
                         f"keys rounded up to {multiple}")


def capturing(device: torch.device) -> bool:
    """Whether work queued on ``device`` now is recorded into a CUDA graph (the current stream is
    capturing): host reads of device values are refused then."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def interpreter_enabled() -> bool:
    """True when Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_store_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a Triton kernel should store an output of ``dtype`` in: fp32 where the interpreter
    would convert fp32 -> bf16 by truncation (numpy has no bf16; the GPU rounds to nearest even), so
    that the host rounds it instead; ``dtype`` otherwise."""
    return torch.float32 if dtype == torch.bfloat16 and interpreter_enabled() else dtype


def resolve_backend(backend: str, device: torch.device, allowed=("auto", "triton", "torch")) -> str:
    """Turn ``backend`` into the one that will run for tensors on ``device``.

    ``auto``: the Triton kernel for CUDA tensors, the PyTorch emulation for CPU tensors.
    ``triton`` on CPU tensors runs only under Triton's interpreter (``TRITON_INTERPRET=1``).
    Other allowed values (``cuda`` for sage2) are returned as they are, for the caller to check.
    """
    check_choice("backend", backend, allowed)
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton":
        if device.type == "cuda":
            if interpreter_enabled():
                return "triton"
            major, _ = device_capability(device)
            if major < 8:
                raise ValueError(f"backend='triton' needs a GPU of compute capability 8.0 or newer, got {major}.x; use backend='torch'")
            return "triton"
        if device.type == "cpu" and interpreter_enabled():
            return "triton"
        raise ValueError(
            f"backend='triton' needs CUDA tensors, got tensors on {device}; use backend='torch' (the emulation) "
            "or set TRITON_INTERPRET=1 before importing triton to run the kernel in Triton's CPU interpreter"
        )
    return backend
