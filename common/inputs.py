"""Synthetic attention inputs that look like real activations.

Every test and benchmark draws its inputs here, so "the same inputs" means the same thing
everywhere. Distributions (``kind``):

* ``randn``:      q, k, v ~ N(0, 1).
* ``k_bias``:     randn plus a per-channel bias in K of 3*randn(1, H, 1, D): the channel-wise
                  outlier structure that K smoothing exists for (the benchmark inputs).
* ``qk_bias``:    per-channel biases in both Q and K (what Q smoothing addresses).
* ``outliers``:   k_bias plus a few channels of Q and K scaled by 10 (massive activations).
* ``heavy_tail``: Student-t (3 d.o.f.) q, k, v plus the K bias.
* ``sharp``:      k_bias with q scaled by 4: peaked attention rows, small P values matter less.
* ``v_bias``:     k_bias plus a per-channel bias in V of 8*randn (what V smoothing targets).
* ``sink``:       k_bias plus an attention sink: queries share a direction u and key 0 is 8/sqrt(D)*u,
                  so every row puts most of its weight on key 0 and the rest is spread thin (the
                  pattern of real LLM layers; small P values then decide the output).
"""

from __future__ import annotations

import torch

from .checks import from_hnd

KINDS = ("randn", "k_bias", "qk_bias", "outliers", "heavy_tail", "sharp", "v_bias", "sink")


def make_qkv(batch=1, heads=2, seqlen=128, head_dim=64, *, kind="k_bias", heads_kv=None, seqlen_k=None,
             dtype=torch.float16, device="cpu", layout="HND", seed=0):
    """Draw (q, k, v) of the given shape in ``layout``; see the module docstring for ``kind``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    heads_kv = heads if heads_kv is None else heads_kv
    seqlen_k = seqlen if seqlen_k is None else seqlen_k
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    def student_t(*shape, dof=3.0):
        z = randn(*shape)
        chi2 = (randn(*shape, int(dof)) ** 2).sum(-1)  # chi-squared with `dof` degrees of freedom
        return z / torch.sqrt(chi2 / dof)

    qs, ks = (batch, heads, seqlen, head_dim), (batch, heads_kv, seqlen_k, head_dim)
    if kind == "heavy_tail":
        q, k, v = student_t(*qs), student_t(*ks), student_t(*ks)
    else:
        q, k, v = randn(*qs), randn(*ks), randn(*ks)
    if kind == "sink":  # before the K bias, which shifts every key alike
        u = randn(1, heads_kv, 1, head_dim)
        u = u / u.norm(dim=-1, keepdim=True) * head_dim ** 0.5
        q = q + u.repeat_interleave(heads // heads_kv, dim=1)
        k[:, :, 0, :] = 8.0 / head_dim ** 0.5 * u[:, :, 0, :]
    if kind != "randn":
        k = k + 3.0 * randn(1, heads_kv, 1, head_dim)
    if kind == "qk_bias":
        q = q + 3.0 * randn(1, heads, 1, head_dim)
    if kind == "outliers":
        ch = torch.randperm(head_dim, generator=g)[: max(1, head_dim // 32)]
        q[..., ch] *= 10.0
        k[..., ch] *= 10.0
    if kind == "sharp":
        q = q * 4.0
    if kind == "v_bias":
        v = v + 8.0 * randn(1, heads_kv, 1, head_dim)
    return tuple(from_hnd(t.to(dtype), layout).contiguous().to(device) for t in (q, k, v))
