"""Accuracy metrics exactly as the SageAttention papers define them.

Both tensors are flattened to vectors of length n and compared in float64:
  CosSim = sum(O*O') / (sqrt(sum O^2) * sqrt(sum O'^2))
  RelL1  = sum|O - O'| / sum|O|              (O is the reference)
  RMSE   = sqrt(mean((O - O')^2))
plus the max absolute error.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Accuracy:
    cos_sim: float
    rel_l1: float
    rmse: float
    max_abs: float

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"cos {self.cos_sim:.6f}  relL1 {self.rel_l1:.5f}  rmse {self.rmse:.3e}  maxabs {self.max_abs:.3e}"


def _flat(ref: torch.Tensor, out: torch.Tensor):
    if ref.shape != out.shape:
        raise ValueError(f"shapes differ: reference {tuple(ref.shape)} vs output {tuple(out.shape)}")
    return ref.detach().reshape(-1).double(), out.detach().reshape(-1).to(ref.device).double()


def cosine_similarity(ref: torch.Tensor, out: torch.Tensor) -> float:
    r, o = _flat(ref, out)
    den = r.norm() * o.norm()
    return float((r @ o) / den) if den > 0 else (1.0 if torch.equal(r, o) else 0.0)


def relative_l1(ref: torch.Tensor, out: torch.Tensor) -> float:
    r, o = _flat(ref, out)
    den = r.abs().sum()
    return float((r - o).abs().sum() / den) if den > 0 else (0.0 if torch.equal(r, o) else math.inf)


def rmse(ref: torch.Tensor, out: torch.Tensor) -> float:
    r, o = _flat(ref, out)
    return float(((r - o) ** 2).mean().sqrt()) if r.numel() else 0.0


def max_abs_error(ref: torch.Tensor, out: torch.Tensor) -> float:
    r, o = _flat(ref, out)
    return float((r - o).abs().max()) if r.numel() else 0.0


def accuracy(ref: torch.Tensor, out: torch.Tensor) -> Accuracy:
    """All four metrics of ``out`` against the reference ``ref``."""
    return Accuracy(cosine_similarity(ref, out), relative_l1(ref, out), rmse(ref, out), max_abs_error(ref, out))
