"""Attention masks with SDPA's semantics, in the form the kernels and emulations take.

``attn_mask`` (as ``F.scaled_dot_product_attention`` takes it): a boolean mask (True = the key
takes part) or an additive float mask, broadcastable to ``[B, Hq, Nq, Nk]``. Three forms reach
the kernels:

* per-sequence lengths (``q_lens``, ``k_lens``, int32 ``[B]``): the varlen path, and the
  key-padding fast path: a boolean mask broadcast over heads and queries whose kept keys are a
  prefix of every sequence (right padding) runs as key lengths, so padded key tiles are skipped
  (detecting it costs one host sync; not done for decode steps, whose kernels read masks);
* a keep mask (uint8, 1 = keep) read tile by tile through its broadcast strides (nothing is
  materialized at ``[B, Hq, Nq, Nk]``);
* an additive bias, converted once to fp32 and multiplied by log2(e): the kernels' scores are in
  the log2 domain.

Rows in which every key is masked give an output of 0 and an LSE of -inf (a documented choice:
SDPA gives NaN there). Causal masking composes with all three (bottom-right aligned per sequence).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .checks import capturing

MASK_NONE, MASK_KEEP, MASK_BIAS = 0, 1, 2


@dataclass
class MaskSpec:
    kind: int = MASK_NONE                # MASK_NONE | MASK_KEEP | MASK_BIAS
    tensor: torch.Tensor | None = None   # [B, Hq, Nq, Nk] view (broadcast strides): uint8 keep or fp32 log2 bias
    q_lens: torch.Tensor | None = None   # int32 [B] valid queries per sequence (rows beyond give 0)
    k_lens: torch.Tensor | None = None   # int32 [B] valid keys per sequence

    @property
    def has_lens(self) -> bool:
        return self.k_lens is not None or self.q_lens is not None

    def lens_or_full(self, batch: int, n_q: int, n_k: int, device):
        """(q_lens, k_lens) int32 [B] tensors (the full lengths where not given)."""
        ql = self.q_lens if self.q_lens is not None else torch.full((batch,), n_q, dtype=torch.int32, device=device)
        kl = self.k_lens if self.k_lens is not None else torch.full((batch,), n_k, dtype=torch.int32, device=device)
        return ql, kl


NO_MASK = MaskSpec()


_BIAS_LIMIT = torch.finfo(torch.float32).max / math.log2(math.e) / 2  # x log2(e) stays finite, with room


def prepare_mask(attn_mask, batch: int, heads_q: int, n_q: int, n_k: int, device, *, tensor_layout: str = "HND",
                 detect_key_padding: bool = True) -> MaskSpec:
    """Check ``attn_mask`` (SDPA semantics) and turn it into a MaskSpec. The mask is indexed
    [B, Hq, Nq, Nk] whatever ``tensor_layout`` the inputs use (as in SDPA)."""
    if attn_mask is None:
        return NO_MASK
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise ValueError(f"attn_mask must be a boolean mask (True = keep) or a float additive mask, got {attn_mask.dtype}")
    if attn_mask.device != device:
        raise ValueError(f"attn_mask must be on the inputs' device ({device}), got {attn_mask.device}")
    if attn_mask.dim() > 4:
        raise ValueError(f"attn_mask must have at most 4 dims (broadcastable to [B, Hq, Nq, Nk]), got shape "
                         f"{tuple(attn_mask.shape)}")
    full = (batch, heads_q, n_q, n_k)
    try:
        m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)).expand(full)
    except RuntimeError:
        raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to [B, Hq, Nq, Nk] = "
                         f"{list(full)}") from None
    if m.dtype == torch.bool:
        # One row of keys for every head and query, a prefix in each sequence: key lengths. A size-1
        # dim keeps its stride under expand, so it counts by its size (a decode step's [B, 1, 1, Nk]
        # mask missed this and took the dense-mask path). Not with no queries or query heads (the
        # call returns empty, as SDPA's), and not while a CUDA graph is being captured: the prefix
        # test reads one value back (the mask then runs as a dense one).
        broadcast = (heads_q == 1 or m.stride(1) == 0) and (n_q == 1 or m.stride(2) == 0)
        if detect_key_padding and broadcast and n_q > 0 and heads_q > 0 and not capturing(m.device):
            keep = m[:, 0, 0, :]                               # [B, Nk]
            lens = keep.sum(-1, dtype=torch.int32)
            prefix = torch.arange(n_k, device=keep.device)[None, :] < lens[:, None]
            if bool((keep == prefix).all()):                   # one host sync
                return MaskSpec(k_lens=lens.to(device))
        return MaskSpec(MASK_KEEP, m.view(torch.uint8))
    # -inf stays -inf; a finite bias is clamped first so that its log2-domain value stays finite
    # (Hugging Face masks with finfo(bf16).min = -3.39e38, which times log2(e) would be -inf)
    bias = attn_mask.to(torch.float32)
    bias = torch.where(bias.isinf(), bias, bias.clamp(-_BIAS_LIMIT, _BIAS_LIMIT)) * math.log2(math.e)
    bias = bias.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)).expand(full)
    return MaskSpec(MASK_BIAS, bias)


def within_lengths(k: torch.Tensor, v: torch.Tensor, mask: MaskSpec, smooth_k: bool):
    """K and V ``[B, Hkv, Nk, D]`` (HND views) as the prefill quantization should see them when the
    call has per-sequence key lengths (a key-padding mask, varlen). Keys past a sequence's length
    are never attended, but K's mean and scales and V's scales (and smoothing mean, and sage1's fp16
    guard) counted them: a zero-padded varlen batch gave a short sequence a fraction of its own K
    mean (its smoothing lost), and garbage in padded slots skewed every code. Here K's smoothing
    mean is taken over the real keys, the keys past each length are replaced by it (by zeros
    without smoothing: smoothed they are ~0 and widen no scale), and V's rows there by zeros.
    Returns ``(k, v, k_mean)``: ``k``, ``v`` as given and ``k_mean`` None without lengths;
    ``k_mean`` fp32 ``[B, Hkv, 1, D]`` (None without smoothing). Costs copies of K and V on calls
    with lengths only."""
    if mask.k_lens is None:
        return k, v, None
    lens = mask.k_lens.to(device=k.device, dtype=torch.int64)
    keep = (torch.arange(k.shape[-2], device=k.device)[None, :] < lens[:, None])[:, None, :, None]
    kz = torch.where(keep, k, torch.zeros((), dtype=k.dtype, device=k.device))
    vz = torch.where(keep, v, torch.zeros((), dtype=v.dtype, device=v.device))
    if not smooth_k:
        return kz, vz, None
    mean = kz.sum(-2, keepdim=True, dtype=torch.float32) / lens.clamp(min=1).to(torch.float32)[:, None, None, None]
    # (a non-finite mean, from a NaN/Inf in a real key, pads with zeros: common.nonfinite's rules then apply)
    pad = torch.where(torch.isfinite(mean), mean, 0.0).to(k.dtype)
    return torch.where(keep, k, pad), vz, mean


def resolve_mask(attn_mask, shape, device, *, detect_key_padding: bool = True) -> MaskSpec:
    """A public function's ``attn_mask`` as a MaskSpec: a MaskSpec itself (the varlen path) passes
    through, anything else goes through :func:`prepare_mask` (``shape``: common.checks.AttentionShape)."""
    if isinstance(attn_mask, MaskSpec):
        return attn_mask
    return prepare_mask(attn_mask, shape.batch, shape.heads_q, shape.seqlen_q, shape.seqlen_k, device,
                        detect_key_padding=detect_key_padding)


def kernel_args(mask: MaskSpec, batch: int, n_q: int, n_k: int, dummy: torch.Tensor):
    """(MASKP, smb, smh, smm, smn, QLEN, KLEN): the mask arguments of the sage1/sage2 kernels;
    ``dummy`` stands in for the pointers a kernel does not read."""
    t = mask.tensor if mask.kind != MASK_NONE else dummy
    strides = mask.tensor.stride() if mask.kind != MASK_NONE else (0, 0, 0, 0)
    ql, kl = mask.lens_or_full(batch, n_q, n_k, dummy.device) if mask.has_lens else (dummy, dummy)
    return (t, *strides, ql, kl)


def lengths_from_cu_seqlens(cu_seqlens: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{name} must be a 1-D int tensor [B + 1] of cumulative sequence lengths starting at 0")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64, got {cu_seqlens.dtype}")
    return (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int32)


def dense_mask(spec: MaskSpec, batch: int, n_q: int, n_k: int, is_causal: bool, device) -> torch.Tensor | None:
    """The [B, Hq|1, Nq, Nk] log2-domain additive mask (0 / -inf / bias) the emulations apply,
    causal included (bottom-right per sequence), or None when nothing is masked but causal-free
    full lengths (then the emulations' own causal mask applies)."""
    if spec.kind == MASK_NONE and not spec.has_lens:
        return None
    ql, kl = spec.lens_or_full(batch, n_q, n_k, device)
    i = torch.arange(n_q, device=device)[None, :, None]
    j = torch.arange(n_k, device=device)[None, None, :]
    keep = (j < kl[:, None, None]) & (i < ql[:, None, None])
    if is_causal:  # bottom-right per sequence for varlen (q_lens), else from the tensors' sizes
        offset = (kl - ql)[:, None, None] if spec.q_lens is not None else n_k - n_q
        keep = keep & (j <= i + offset)
    bias = torch.where(keep, 0.0, float("-inf"))[:, None]        # [B, 1, Nq, Nk]
    if spec.kind == MASK_KEEP:
        bias = torch.where(spec.tensor.to(device).bool(), bias, float("-inf"))
    elif spec.kind == MASK_BIAS:
        bias = bias + spec.tensor.to(device)
    return bias
