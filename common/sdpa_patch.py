"""A scoped patch of ``torch.nn.functional.scaled_dot_product_attention`` that routes the calls
an attention of ours can serve to it, and falls back to the original for the rest (saying why,
once per reason). This is how a real model (e.g. a transformers BERT) runs with a generation
swapped in, without editing the model:

    with patch_sdpa(lambda q, k, v, is_causal, sm_scale: sage2.sageattn(q, k, v, is_causal=is_causal,
                                                                          sm_scale=sm_scale)) as stats:
        model(...)
    print(stats)

Served: 4-D [B, H, N, D] calls without dropout, with no mask, or with a key-padding mask (boolean
True = keep, or additive 0 / very negative) whose kept keys form a prefix of each sequence (right
padding): each sequence then runs on its own kept keys, which is exactly what SDPA computes.
Float32 inputs are cast to ``compute_dtype`` (fp16 by default) for the attention and the output
cast back. Anything else (dropout, arbitrary masks, fully masked rows, masks with causal) falls back.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PatchStats:
    served: int = 0
    fallbacks: Counter = field(default_factory=Counter)

    def __str__(self):
        fb = ", ".join(f"{n}x {r}" for r, n in self.fallbacks.items()) or "none"
        return f"served {self.served} SDPA calls; fell back for: {fb}"


def _key_lengths(mask: torch.Tensor, batch: int, n_k: int):
    """Per-sequence kept-key counts if ``mask`` is a right-padding key mask, else None."""
    if mask.dim() != 4 or mask.shape[-1] != n_k or mask.shape[0] not in (1, batch):
        return None
    if mask.dtype == torch.bool:
        keep = mask
    else:
        big_negative = mask <= torch.finfo(mask.dtype).min / 2
        if not bool(((mask == 0) | big_negative | torch.isneginf(mask)).all()):
            return None  # a real additive bias, not padding
        keep = ~(big_negative | torch.isneginf(mask))
    # one key mask for every head and query row
    if not bool((keep == keep[:, :1, :1, :]).all()):
        return None
    keep = keep[:, 0, 0, :].expand(batch, n_k)
    lengths = keep.sum(-1)
    prefix = torch.arange(n_k, device=keep.device)[None, :] < lengths[:, None]
    if not bool((keep == prefix).all()) or int(lengths.min()) == 0:
        return None
    return lengths.tolist()


@contextlib.contextmanager
def patch_sdpa(attn_fn, *, compute_dtype: torch.dtype = torch.float16, name: str = "attention"):
    """Within the block, F.scaled_dot_product_attention calls that ``attn_fn(q, k, v, is_causal,
    sm_scale)`` can serve go to it (HND tensors, fp16/bf16); yields the PatchStats."""
    original = F.scaled_dot_product_attention
    stats = PatchStats()

    def fallback(reason, *args, **kwargs):
        if reason not in stats.fallbacks:
            print(f"(patch_sdpa[{name}]: falling back to torch SDPA for calls with {reason})", flush=True)
        stats.fallbacks[reason] += 1
        return original(*args, **kwargs)

    def patched(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                **extra):
        args = (query, key, value)
        kwargs = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **extra)
        if enable_gqa:
            kwargs["enable_gqa"] = True
        if extra:
            return fallback(f"arguments {sorted(extra)}", *args, **kwargs)
        if dropout_p:
            return fallback("dropout_p > 0", *args, **kwargs)
        if query.dim() != 4 or key.dim() != 4:
            return fallback("inputs that are not 4-D [B, H, N, D]", *args, **kwargs)
        if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return fallback(f"dtype {query.dtype}", *args, **kwargs)
        if key.shape[1] != query.shape[1] and (query.shape[1] % key.shape[1]):
            return fallback("head counts that do not group", *args, **kwargs)
        lengths = None
        if attn_mask is not None:
            if is_causal:
                return fallback("a mask together with is_causal", *args, **kwargs)
            lengths = _key_lengths(attn_mask, query.shape[0], key.shape[2])
            if lengths is None:
                return fallback("a mask that is not right key padding", *args, **kwargs)
        stats.served += 1
        dt = compute_dtype if query.dtype == torch.float32 else query.dtype
        q, k, v = (t.to(dt) for t in args)
        if lengths is None or all(n == key.shape[2] for n in lengths):
            out = attn_fn(q, k, v, is_causal, scale)
        else:
            out = torch.cat([attn_fn(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], False, scale)
                             for b, n in enumerate(lengths)])
        return out.to(query.dtype)

    F.scaled_dot_product_attention = patched
    torch.nn.functional.scaled_dot_product_attention = patched
    try:
        yield stats
    finally:
        F.scaled_dot_product_attention = original
        torch.nn.functional.scaled_dot_product_attention = original
