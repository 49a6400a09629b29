"""The attention implementations we compare against, timed the same way as ours."""

from __future__ import annotations

import torch
import torch.nn.functional as F

SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION"}


def sdpa(backend: str):
    """``fn(q, k, v, is_causal)`` running SDPA (HND) pinned to one backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = getattr(SDPBackend, SDPA_BACKENDS[backend])

    def fn(q, k, v, is_causal=False):
        with sdpa_kernel([be]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)

    return fn


def sageattention_106():
    """The released ``sageattention==1.0.6`` (Triton v1) if it is installed, else None."""
    try:
        import importlib.metadata as md

        from sageattention import sageattn
        ver = md.version("sageattention")
    except Exception:  # not installed, or a broken install
        return None
    if ver != "1.0.6":
        return None

    def fn(q, k, v, is_causal=False):
        return sageattn(q, k, v, is_causal=is_causal, tensor_layout="HND")

    return fn


def available_baselines(device: str = "cuda") -> dict:
    out = {}
    if device == "cuda" and torch.cuda.is_available():
        out.update({name: sdpa(name) for name in SDPA_BACKENDS})
        s106 = sageattention_106()
        if s106 is not None:
            out["sageattention_1.0.6"] = s106
    return out
