"""NaN and Inf inputs: SDPA's pattern, not a quantization block's.

A quantized kernel shares one scale among a block of tokens, so a single NaN or Inf would spread
over its whole block (or vanish: Triton's INT8 conversion of NaN gives 0). The rule, for every
public function: the output (and LSE) is NaN exactly on the rows SDPA would make NaN, and every
other row is finite and as accurate as on finite inputs (the bad values counted as zeros):

* every query row with a non-finite value in q;
* every row that sees (causal / lengths / attn_mask) a key whose k or v has a non-finite value.

A key a row does not see (causal, lengths, attn_mask) never affects it: SDPA's math backend spreads
a NaN of V through masked keys as 0 * NaN, its fused backends do not (tile by tile); we follow the
definition. Inf is treated like NaN (SDPA's backends disagree on Inf: ±Inf or NaN).

How, without the host ever waiting (sage1, sage2):

* the quantization passes (common.triton_quant) keep scales and means finite: a Q or K token with
  a NaN/Inf is quantized as a zero row (found in the row absmax the scales need anyway), V's
  NaN/Inf values count as 0, and a channel whose K token mean is not finite is smoothed by 0
  instead (any vector subtracted from every key is exact, :func:`finite_mean`);
* on the way they record the query tokens with a bad value and, per (batch, kv head), the first
  key with one in k or v (:class:`NonfiniteFlags`);
* the attention kernel's epilogue sets the rows from those flags; tiles that mask keys (causal
  diagonal, lengths) zero V's non-finite values so that 0 * NaN cannot reach a row that does not
  see the key. With a dense ``attn_mask`` the rows come from :func:`nan_rows` (tensor ops, still
  no host wait). The emulations zero the same values and use :func:`nan_rows`: the same numbers.

sage3 (FP4 inference, SageBwd) checks with one sum per tensor read back by the host, and reruns
on the zeroed inputs when needed (:func:`nonfinite_flag`, :func:`rerun_without_nonfinite`).
``CHECK_NONFINITE = False`` switches all of it off (then non-finite inputs give undefined rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import capturing
from .masking import MASK_NONE, MaskSpec

CHECK_NONFINITE = True
NO_BAD_KEY = 2 ** 31 - 1   # FIRST_BAD holds NO_BAD_KEY - (first bad key); 0: none (an atomic max)


@dataclass
class NonfiniteFlags:
    """What the quantization passes record for the attention kernels' epilogue."""
    q_bad: torch.Tensor | None  # uint8 [B, Hq, Nq]: the query token has a NaN/Inf (None: no pass over Q)
    first_bad: torch.Tensor    # int32 [B * Hkv]: NO_BAD_KEY - first key with a NaN/Inf in k or v (0: none)


def kernel_buffers(shape, device, *, rows_in_kernel: bool, amax_entries: int, q_rows: bool = True):
    """(NonfiniteFlags for the passes to fill, or None unless ``rows_in_kernel``; a zeroed int32
    [amax_entries] buffer for V's atomic max). All zeroed: the passes write only where they find a
    NaN/Inf. ``shape``: common.checks.AttentionShape. ``q_rows=False``: no pass quantizes Q (the
    kernel finds Q's NaN/Inf rows itself), so no ``q_bad``."""
    n_keys = shape.batch * shape.heads_kv if rows_in_kernel else 0
    buf = torch.zeros(n_keys + amax_entries, dtype=torch.int32, device=device)
    if not rows_in_kernel:
        return None, buf
    q_bad = torch.zeros((shape.batch, shape.heads_q, shape.seqlen_q), dtype=torch.uint8, device=device) if q_rows else None
    return NonfiniteFlags(q_bad, buf[:n_keys]), buf[n_keys:]


def finite_mean(mean: torch.Tensor) -> torch.Tensor:
    """A smoothing mean with its non-finite channels set to 0 (from a NaN/Inf in the tensor)."""
    return torch.nan_to_num(mean, nan=0.0, posinf=0.0, neginf=0.0)


def set_nan_rows(out_hnd: torch.Tensor, lse: torch.Tensor | None, qh, kh, vh, *, is_causal: bool, mask: MaskSpec):
    """NaN on the rows :func:`nan_rows` gives, in the output (HND view) and the LSE, in place."""
    rows = nan_rows(qh, kh, vh, is_causal=is_causal, mask=mask)
    out_hnd.masked_fill_(rows[..., None], float("nan"))
    if lse is not None:
        lse.masked_fill_(rows, float("nan"))


class _PendingFlag:
    """A device flag on its way to the host: copied (non-blocking, pinned memory) right after the
    sums, so that reading it waits for the sums only, not for the attention kernels queued after."""

    def __init__(self, flag: torch.Tensor):
        self.host = torch.empty((), dtype=torch.bool, pin_memory=True)
        self.host.copy_(flag, non_blocking=True)
        self.ready = torch.cuda.Event()
        self.ready.record()

    def __bool__(self) -> bool:
        self.ready.synchronize()
        return bool(self.host)


def nonfinite_flag(*tensors: torch.Tensor):
    """(sage3) True (when read) if any tensor holds NaN or ±Inf (an fp32 sum per tensor; a sum that
    overflows fp32 only sends the call down the slower, still correct path), or None when the check
    is off or a CUDA graph is being captured. Queued before the kernels and read by :func:`flagged`
    after they are queued: the host waits for the sums (a read of the inputs), the GPU never waits
    for the host, and the attention kernels run while the host goes on."""
    if not CHECK_NONFINITE or any(t.numel() == 0 for t in tensors):
        return None
    if capturing(tensors[0].device):
        return None
    flag = ~torch.isfinite(torch.stack([t.sum(dtype=torch.float32) for t in tensors])).all()
    return _PendingFlag(flag) if flag.is_cuda else flag


def flagged(flag) -> bool:
    return flag is not None and bool(flag)


def zeroed(t: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)


def nan_rows(qh, kh, vh, *, is_causal: bool, mask: MaskSpec) -> torch.Tensor:
    """bool [B, Hq, Nq]: the rows SDPA makes NaN (HND views of the original inputs)."""
    B, Hq, Nq, _ = qh.shape
    Hkv, Nk = kh.shape[1], kh.shape[2]
    q_bad = ~torch.isfinite(qh).all(-1)
    key_bad = (~torch.isfinite(kh).all(-1) | ~torch.isfinite(vh).all(-1)).repeat_interleave(Hq // Hkv, dim=1)
    ql, kl = mask.lens_or_full(B, Nq, Nk, qh.device)
    j = torch.arange(Nk, device=qh.device)
    i = torch.arange(Nq, device=qh.device)
    key_bad = key_bad & (j[None, None, :] < kl[:, None, None])
    if mask.kind != MASK_NONE:  # an attn_mask: which keys each row sees, a block of rows at a time
        reach = torch.zeros(B, Hq, Nq, dtype=torch.bool, device=qh.device)
        offset = Nk - Nq if mask.q_lens is None else (kl - ql)[:, None, None, None]
        for r0 in range(0, Nq, 1024):
            r1 = min(Nq, r0 + 1024)
            m = mask.tensor[:, :, r0:r1]
            keep = (m != 0) if m.dtype == torch.uint8 else (m > float("-inf"))
            if is_causal:
                keep = keep & (j[None, None, None, :] <= i[r0:r1, None] + offset)
            reach[:, :, r0:r1] = (keep & key_bad[:, :, None, :]).any(-1)
    else:
        if is_causal:
            first = torch.where(key_bad, j, Nk).amin(-1)                        # [B, Hq]
            offset = (kl - ql) if mask.q_lens is not None else torch.full_like(kl, Nk - Nq)
            reach = first[..., None] <= i[None, None, :] + offset[:, None, None]
        else:
            reach = key_bad.any(-1)[..., None].expand(B, Hq, Nq)
    return (q_bad | reach) & (i[None, None, :] < ql[:, None, None])


def rerun_without_nonfinite(sageattn, q, k, v, qh, kh, vh, *, tensor_layout, is_causal, return_lse, mask, **kw):
    """``sageattn`` on the zeroed inputs, then NaN on the rows SDPA makes NaN (output and LSE)."""
    from .checks import to_hnd

    if mask.kind != MASK_NONE or mask.has_lens:
        kw["attn_mask"] = mask
    res = sageattn(zeroed(q), zeroed(k), zeroed(v), tensor_layout=tensor_layout, is_causal=is_causal,
                   return_lse=return_lse, **kw)
    rows = nan_rows(qh, kh, vh, is_causal=is_causal, mask=mask)
    out, lse = res if return_lse else (res, None)
    to_hnd(out, tensor_layout).masked_fill_(rows[..., None], float("nan"))
    if lse is not None:
        lse.masked_fill_(rows, float("nan"))
    return res
