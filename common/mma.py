"""How the tensor-core instructions modelled by the PyTorch emulations accumulate (shared by
sage1's emulation and the decode path's, :mod:`common.decode`)."""

from __future__ import annotations

import torch

MMA_K = 16  # keys reduced per fp16-accumulating MMA instruction


def fp16_accumulated_matmul(p16: torch.Tensor, v16: torch.Tensor) -> torch.Tensor:
    """``p16 @ v16`` with an fp16 accumulator rounded after every 16-key MMA step (fp32 result)."""
    acc = None
    for k0 in range(0, p16.shape[-1], MMA_K):
        part = p16[..., k0:k0 + MMA_K].float() @ v16[..., k0:k0 + MMA_K, :].float()
        acc = part.half() if acc is None else (acc.float() + part).half()
    return acc.float()
