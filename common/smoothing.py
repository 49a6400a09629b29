"""Smoothing: subtract a mean that the softmax (or the output) cannot see, and the exact corrections.

* K smoothing (SageAttention 1/2/3): K <- K - mean_tokens(K). Every key of a row is shifted by
  the same q.mean_k, which the softmax cancels; only the LSE moves, by sm_scale * q.mean_k.
* Q smoothing (SageAttention 2/3): each block of queries loses its token mean q_bar; the part
  q_bar . K^T (one row per block, shared by the block's rows) is added back to S before the
  softmax, computed in FP32 from unquantized values.
* V smoothing (SageAttention2, optional): V <- V - mean_tokens(V); since each row of P sums to 1,
  the output gets mean_tokens(V) added back.
"""

from __future__ import annotations

import torch


def k_mean(k: torch.Tensor) -> torch.Tensor:
    """Token mean of K ``[..., N, D]`` in fp32: ``[..., 1, D]`` (accumulated in fp32, no fp32 copy of K)."""
    return torch.mean(k, dim=-2, keepdim=True, dtype=torch.float32)


def v_channel_mean(v: torch.Tensor) -> torch.Tensor:
    """Token mean of each channel of V ``[..., N, D]`` in fp32: ``[..., 1, D]``."""
    return torch.mean(v, dim=-2, keepdim=True, dtype=torch.float32)


def q_block_means(q: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of each block of ``block`` consecutive query tokens, fp32 ``[..., ceil(N/block), D]``.

    The last block may be shorter; its mean is over its own tokens only.
    """
    n = q.shape[-2]
    nb = -(-n // block)
    pad = nb * block - n
    qf = q.float()
    if pad:
        qf = torch.nn.functional.pad(qf, (0, 0, 0, pad))
    sums = qf.reshape(*q.shape[:-2], nb, block, q.shape[-1]).sum(dim=-2)
    counts = torch.full((nb,), float(block), device=q.device)
    counts[-1] = block - pad
    return sums / counts[:, None]


def expand_block_rows(x: torch.Tensor, block: int, n: int) -> torch.Tensor:
    """Repeat per-block rows ``[..., nb, C]`` to per-token rows ``[..., n, C]``."""
    return x.repeat_interleave(block, dim=-2)[..., :n, :]


def lse_shift_from_k_mean(q: torch.Tensor, km: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """``sm_scale * q . mean_k`` per query row, fp32 ``[..., Nq]``: add it to an LSE computed with
    smoothed K to get the LSE of the original K. ``km`` is ``[..., 1, D]`` with K's head count;
    q may have a multiple of its heads (GQA) on dim -3."""
    group = q.shape[-3] // km.shape[-3]
    km = km.repeat_interleave(group, dim=-3)
    return sm_scale * (q.float() @ km.transpose(-1, -2)).squeeze(-1)


def q_smoothing_delta_s(q_means: torch.Tensor, k: torch.Tensor, k_mean: torch.Tensor | None = None, *,
                        tf32: bool = False) -> torch.Tensor:
    """``delta_s[.., i, j] = q_bar_i . (k_j - k_mean)`` with an fp32 result ``[..., ceil(Nq/b), Nk]``:
    the bias that Q smoothing removes from every row of query block i and that is added back to S,
    from unquantized values. ``q_means`` has the query heads, ``k`` the KV heads (GQA).
    ``tf32=False``: fp32 products (SageAttention2); ``True``: TF32 on tensor cores, as the official
    SageAttention3 code does with a 16-bit matmul.

    CUDA tensors take one Triton pass (common.triton_quant.delta_s_kernel: K centred in registers,
    read once per query head; 1.08 ms at B=4, H=32, N=16k, D=128 with TF32 on the H100, where the
    PyTorch form, which writes K out in fp32 first, took 3.18 ms); CPU tensors the PyTorch form."""
    if q_means.is_cuda:
        return _delta_s_triton(q_means, k, k_mean, "tf32" if tf32 else "ieee")
    from .reference import exact_fp32_matmul

    kf = k.float()
    if k_mean is not None:
        kf = kf - k_mean
    kf = kf.repeat_interleave(q_means.shape[-3] // k.shape[-3], dim=-3).transpose(-1, -2)
    if not tf32:
        with exact_fp32_matmul():
            return q_means @ kf
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return q_means @ kf
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _delta_s_triton(q_means, k, k_mean, precision: str) -> torch.Tensor:
    from .int_qk import padded_head_dim
    from .triton_quant import delta_s_kernel

    B, Hq, NB, D = q_means.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if k.stride(-1) != 1:
        k = k.contiguous()
    qm = q_means.contiguous()
    out = torch.empty(B, Hq, NB, Nk, dtype=torch.float32, device=q_means.device)
    if out.numel() == 0:
        return out
    km = k_mean.contiguous() if k_mean is not None else qm
    block_n = 64
    delta_s_kernel[(-(-Nk // block_n), B * Hq)](
        qm, k, km, out, k.stride(0), k.stride(1), k.stride(2), Hq, Hkv, NB, Nk, D,
        BLOCK_QB=64 if NB > 32 else (32 if NB > 16 else 16), BLOCK_N=block_n, DP=padded_head_dim(D),
        HAS_KM=k_mean is not None, PRECISION=precision, num_warps=4)
    return out
