"""Shared pieces of the accuracy-table scripts: synthetic "layers" and average/worst rows."""

from __future__ import annotations

from common.inputs import KINDS, make_qkv
from common.reference import attention_reference


def synthetic_layers(heads, seqlen, dim, device, seed0=100):
    """One (kind, q, k, v, exact output) per synthetic input distribution, standing in for the
    layers of a real model."""
    out = []
    for i, kind in enumerate(KINDS):
        q, k, v = make_qkv(1, heads, seqlen, dim, kind=kind, device=device, seed=seed0 + i)
        out.append((kind, q, k, v, attention_reference(q, k, v)))
    return out


def average_and_worst(accs):
    """accs: [(kind, Accuracy)] -> ((cos, relL1, rmse) averages, (kind, Accuracy) with the lowest cosine)."""
    avg = tuple(sum(getattr(a, f) for _, a in accs) / len(accs) for f in ("cos_sim", "rel_l1", "rmse"))
    return avg, min(accs, key=lambda x: x[1].cos_sim)
