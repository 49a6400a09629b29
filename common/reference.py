"""The exact reference attention every kernel is measured against.

float64 on CPU, float32 (TF32 off) on GPU. Layouts HND/NHD, GQA/MQA, causal with bottom-right
alignment when Nq != Nk (the FlashAttention convention: query i sees keys j <= i + Nk - Nq),
any sm_scale, natural-log log-sum-exp. Rows with no visible key (causal with Nq > Nk) are
defined to give a zero output and an LSE of -inf.
"""

from __future__ import annotations

import contextlib

import torch

from .checks import from_hnd, resolve_sm_scale, to_hnd


@contextlib.contextmanager
def exact_fp32_matmul():
    """Disable TF32 so that float32 matmuls on GPU are true float32."""
    old_mm, old_cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old_mm, old_cudnn


def causal_mask(n_q: int, n_k: int, device=None) -> torch.Tensor:
    """Boolean [Nq, Nk] mask, True where query i may see key j (bottom-right aligned)."""
    i = torch.arange(n_q, device=device)[:, None]
    j = torch.arange(n_k, device=device)[None, :]
    return j <= i + (n_k - n_q)


def reference_dtype(device: torch.device) -> torch.dtype:
    return torch.float64 if device.type == "cpu" else torch.float32


def attention_reference(q, k, v, *, tensor_layout="HND", is_causal=False, sm_scale=None, return_lse=False,
                        attn_mask=None, max_chunk_elems=2**28):
    """Exact softmax(sm_scale * Q K^T [+ mask]) V in high precision.

    Returns the output in ``tensor_layout`` in float64 (CPU) / float32 (GPU), and with
    ``return_lse`` also the LSE ``[B, Hq, Nq]``. ``attn_mask`` (optional) follows SDPA: a boolean
    mask (True = keep) or an additive float mask, broadcastable to ``[B, Hq, Nq, Nk]``.
    """
    qh, kh, vh = (to_hnd(t, tensor_layout) for t in (q, k, v))
    B, Hq, Nq, D = qh.shape
    Hkv, Nk = kh.shape[1], kh.shape[2]
    scale = resolve_sm_scale(sm_scale, D)
    dt = reference_dtype(q.device)
    group = Hq // Hkv
    kh = kh.to(dt).repeat_interleave(group, dim=1)
    vh = vh.to(dt).repeat_interleave(group, dim=1)
    out = torch.empty(B, Hq, Nq, vh.shape[-1], dtype=dt, device=q.device)
    lse = torch.empty(B, Hq, Nq, dtype=dt, device=q.device)
    if attn_mask is not None:
        attn_mask = attn_mask.to(q.device)  # (a 0-d mask broadcasts as one value, SDPA's rule)
        attn_mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)).expand(B, Hq, Nq, Nk)
    chunk = max(1, min(Nq, max_chunk_elems // max(1, Hq * Nk)))
    with exact_fp32_matmul():
        for b in range(B):
            for s in range(0, Nq, chunk):
                e = min(Nq, s + chunk)
                scores = torch.matmul(qh[b, :, s:e].to(dt), kh[b].transpose(-1, -2)) * scale
                keep = torch.ones(e - s, Nk, dtype=torch.bool, device=q.device)
                if is_causal:
                    keep = causal_mask(Nq, Nk, q.device)[s:e]
                if attn_mask is not None:
                    m = attn_mask[b, :, s:e]
                    if m.dtype == torch.bool:
                        keep = keep & m
                    else:
                        scores = scores + m.to(dt)
                scores = scores.masked_fill(~keep, float("-inf"))
                row_lse = torch.logsumexp(scores, dim=-1)
                # A row with no visible key has lse = -inf: shift by 0 so that p is 0, not NaN.
                p = torch.exp(scores - torch.where(row_lse == float("-inf"), 0.0, row_lse)[..., None])
                out[b, :, s:e] = torch.matmul(p, vh[b])
                lse[b, :, s:e] = row_lse
    out = from_hnd(out, tensor_layout)
    return (out, lse) if return_lse else out
