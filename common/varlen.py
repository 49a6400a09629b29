"""Variable-length (packed) batches for any generation's dense ``sageattn``.

``q`` is ``[total_q, Hq, D]`` (the sequences one after another), ``k``/``v`` ``[total_k, Hkv, D]``,
``cu_seqlens_*`` the int32/int64 ``[B + 1]`` offsets (FlashAttention's convention). The sequences
are scattered into a zero-padded ``[B, max_seqlen, H, D]`` batch (NHD) and run as one dense call
with per-sequence lengths: key tiles past a sequence's end are skipped by the kernel, query tiles
past it do no work, and causal masking is bottom-right aligned per sequence. When every sequence
has the maximum length (``total == B * max_seqlen``, known without a host sync) nothing is copied.
As in FlashAttention, ``max_seqlen_*`` must be at least every sequence's length (not checked: it
would cost a host sync).
"""

from __future__ import annotations

import torch

from .checks import capturing
from .masking import MaskSpec, lengths_from_cu_seqlens


def _check(name, t, heads=None):
    if not isinstance(t, torch.Tensor) or t.dim() != 3:
        raise ValueError(f"{name} must be a [total_tokens, heads, head_dim] tensor, got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")


def _positions(cu, lengths, total, batch):
    seq = torch.repeat_interleave(torch.arange(batch, device=cu.device), lengths.long(), output_size=total)
    pos = torch.arange(total, device=cu.device) - cu.long()[seq]
    return seq, pos


def _pad(x, seq, pos, batch, max_len):
    out = x.new_zeros(batch, max_len, *x.shape[1:])
    out[seq, pos] = x
    return out


def _check_offsets(cu_q, cu_k, total_q: int, total_k: int, max_q: int, max_k: int) -> None:
    """The offsets against the packed tensors (one read back from the device): wrong ones would index
    out of bounds in the copies below (a device-side assert that kills the CUDA context)."""
    values = torch.cat([cu_q.long(), cu_k.long()]).tolist()
    n = cu_q.numel()
    for name, cu, total, most, max_name in (("cu_seqlens_q", values[:n], total_q, max_q, "max_seqlen_q"),
                                           ("cu_seqlens_k", values[n:], total_k, max_k, "max_seqlen_k")):
        lens = [b - a for a, b in zip(cu, cu[1:])] or [0]  # (no sequences: [0])
        if cu[0] != 0 or cu[-1] != total or min(lens) < 0:
            raise ValueError(f"{name} must rise from 0 to the packed tensor's {total} tokens, got {cu}")
        if max(lens) > most:
            raise ValueError(f"{name} holds a sequence of {max(lens)} tokens, more than {max_name}={most}")


def attention_varlen(sageattn, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, *,
                     return_lse: bool = False, **options):
    """Run ``sageattn`` (a generation's dense function) on a packed batch; returns ``[total_q, Hq, D]``
    (and the natural-log LSE ``[Hq, total_q]`` with ``return_lse``)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check(name, t)
    for name, n in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{name} must be a non-negative int, got {n!r}")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if isinstance(cu, torch.Tensor) and cu.device != q.device:
            raise ValueError(f"{name} must be on the inputs' device ({q.device}), got {cu.device}")
    if "tensor_layout" in options or "attn_mask" in options:
        raise ValueError("sageattn_varlen takes packed [total, H, D] inputs and no attn_mask")
    ql = lengths_from_cu_seqlens(cu_seqlens_q, "cu_seqlens_q")
    kl = lengths_from_cu_seqlens(cu_seqlens_k, "cu_seqlens_k")
    if ql.numel() != kl.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"{ql.numel()} and {kl.numel()}")
    if not capturing(q.device):  # (a capture cannot read them back)
        _check_offsets(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"k and v must have the same number of tokens, got {k.shape[0]} and {v.shape[0]}")
    B, tq, tk = ql.numel(), q.shape[0], k.shape[0]
    if B == 0 or tq == 0 or max_seqlen_k == 0:  # no sequences, no queries, or no keys: no kernel
        out = q.new_zeros(q.shape)
        return (out, torch.full((q.shape[1], tq), float("-inf"), device=q.device)) if return_lse else out
    if tq == B * max_seqlen_q and tk == B * max_seqlen_k:  # all at the maximum length: a dense batch, no copies
        qp, kp, vp = (t.view(B, -1, *t.shape[1:]) for t in (q, k, v))
        res = sageattn(qp, kp, vp, tensor_layout="NHD", return_lse=return_lse, **options)
        if not return_lse:
            return res.reshape(tq, *res.shape[2:])
        out, lse = res
        return out.reshape(tq, *out.shape[2:]), lse.transpose(0, 1).reshape(lse.shape[1], tq)
    sq, pq = _positions(cu_seqlens_q, ql, tq, B)
    sk, pk = _positions(cu_seqlens_k, kl, tk, B)
    qp = _pad(q, sq, pq, B, max_seqlen_q)
    kp, vp = _pad(k, sk, pk, B, max_seqlen_k), _pad(v, sk, pk, B, max_seqlen_k)
    res = sageattn(qp, kp, vp, tensor_layout="NHD", return_lse=return_lse,
                   attn_mask=MaskSpec(q_lens=ql, k_lens=kl), **options)
    if not return_lse:
        return res[sq, pq]
    out, lse = res
    return out[sq, pq], lse[sq, :, pq].transpose(0, 1).contiguous()  # (contiguous, as on the equal-lengths path)


def varlen_api(sageattn, qualname: str, options: list[tuple[str, str]]):
    """The ``sageattn_varlen`` of a generation whose dense function is ``sageattn``: under
    torch.compile the custom op ``qualname`` (common.compile_ops.VarlenOp; ``options``: the
    generation's options and their schema types, as its AttentionOp's)."""
    from .compile_ops import VarlenOp

    op = VarlenOp(qualname, sageattn, options)

    def sageattn_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                        cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, **options):
        if torch.compiler.is_compiling():
            return op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **options)
        return attention_varlen(sageattn, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **options)

    sageattn_varlen.__doc__ = f"""``{sageattn.__module__.split('.')[0]}.sageattn`` on a packed batch of
    variable-length sequences (FlashAttention's varlen convention): ``q`` ``[total_q, Hq, D]``,
    ``k``/``v`` ``[total_k, Hkv, D]``, ``cu_seqlens_*`` int ``[B + 1]`` offsets, ``max_seqlen_*`` the
    longest sequence. ``is_causal`` is bottom-right aligned per sequence. ``options``: those of
    ``sageattn`` (``is_causal``, ``sm_scale``, ``return_lse`` (LSE ``[Hq, total_q]``), ``backend``
    and the quantization options). See :mod:`common.varlen`."""
    return sageattn_varlen
