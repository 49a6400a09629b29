"""The ``attention/`` config group made callable: every generation and every baseline behind one
signature, ``fn(q, k, v, is_causal=False, tensor_layout="HND", sm_scale=None) -> out``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).parent / "conf"
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "math": "MATH"}
_NOT_OPTIONS = ("label", "impl", "backend", "sdpa_backend")


@dataclass
class Attention:
    label: str
    fn: Callable
    note: str = ""          # e.g. "emulation": printed beside its numbers
    differentiable: bool = False


def load_attention(name: str) -> DictConfig:
    """The typed config of ``attention/<name>.yaml`` (as ``attention=<name>`` would give it)."""
    from experiments.config import SCHEMAS

    path = CONF_DIR / "attention" / f"{name}.yaml"
    if not path.exists():
        choices = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ValueError(f"unknown attention {name!r}; choices: {choices}")
    raw = OmegaConf.load(path)
    schema = next(d.split("/")[-1].split("@")[0] for d in raw.pop("defaults") if "/schema/attention/" in d)
    return OmegaConf.merge(OmegaConf.structured(SCHEMAS["attention"][schema]), raw)


def options(cfg: DictConfig) -> dict:
    """The generation's keyword options in an attention config (None means "the default")."""
    return {k: v for k, v in OmegaConf.to_container(cfg).items() if k not in _NOT_OPTIONS and v is not None}


def _hnd(t, layout):
    return t if layout == "HND" else t.transpose(1, 2)


def _sdpa(backend: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = getattr(SDPBackend, SDPA_BACKENDS[backend])

    def fn(q, k, v, is_causal=False, tensor_layout="HND", sm_scale=None):
        qh, kh, vh = (_hnd(t, tensor_layout) for t in (q, k, v))
        if kh.shape[1] != qh.shape[1]:  # GQA, as the sage kernels take it
            g = qh.shape[1] // kh.shape[1]
            kh, vh = kh.repeat_interleave(g, 1), vh.repeat_interleave(g, 1)
        causal_ok = is_causal and qh.shape[2] == kh.shape[2]
        if is_causal and not causal_ok:  # SDPA aligns top-left; ours bottom-right: pass the mask
            from common.reference import causal_mask
            with sdpa_kernel([be, SDPBackend.MATH]):
                return _hnd(F.scaled_dot_product_attention(qh, kh, vh, attn_mask=causal_mask(
                    qh.shape[2], kh.shape[2], q.device), scale=sm_scale), tensor_layout)
        with sdpa_kernel([be]):
            return _hnd(F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal_ok, scale=sm_scale), tensor_layout)

    return fn


def build_attention(cfg: DictConfig, device: str = "cpu", check: bool = True) -> Attention:
    """The callable of one attention config. With ``check``, runs it once on a tiny CPU input
    through the emulation so that a bad option value fails now, with the generation's own
    message, not after a long run has started."""
    opts = options(cfg)
    impl, backend, label = cfg.impl, cfg.backend, cfg.label
    note = ""
    if impl in ("sage1", "sage2", "sage3"):
        import importlib

        mod = importlib.import_module(impl)
        if backend == "cuda":  # sage2's Hopper kernel (csrc/sage2_sm90): a GPU of compute capability 9.0
            if impl != "sage2":
                raise ValueError(f"attention {label!r}: backend='cuda' exists for sage2 only; use 'auto' or 'triton'")
            if device != "cuda" or torch.cuda.get_device_capability()[0] != 9:
                raise ValueError(f"attention {label!r}: backend='cuda' needs an sm_90 (Hopper) GPU")

        def fn(q, k, v, is_causal=False, tensor_layout="HND", sm_scale=None, _be=backend):
            return mod.sageattn(q, k, v, is_causal=is_causal, tensor_layout=tensor_layout, sm_scale=sm_scale,
                                backend=_be, **opts)

        on_cpu = device == "cpu" or backend == "torch"
        note = "emulation" if on_cpu else ("FP4 emulated on 16-bit tensor cores" if impl == "sage3" else "")
        differentiable = False
    elif impl == "sage3_train":
        import sage3

        def fn(q, k, v, is_causal=False, tensor_layout="HND", sm_scale=None, _be=backend):
            return sage3.sageattn_train(q, k, v, is_causal=is_causal, tensor_layout=tensor_layout, sm_scale=sm_scale,
                                        backend=_be, **opts)

        note = "emulation" if device == "cpu" or backend == "torch" else ""
        differentiable = True
    elif impl == "sdpa":
        if cfg.sdpa_backend not in SDPA_BACKENDS:
            raise ValueError(f"attention.sdpa_backend must be one of {list(SDPA_BACKENDS)}, got {cfg.sdpa_backend!r}")
        if device == "cpu" and cfg.sdpa_backend in ("flash", "cudnn", "efficient"):
            raise ValueError(f"attention {label!r} (SDPA {cfg.sdpa_backend}) needs a CUDA GPU")
        fn = _sdpa(cfg.sdpa_backend)
        differentiable = True
    elif impl == "exact":
        from common.reference import attention_reference

        def fn(q, k, v, is_causal=False, tensor_layout="HND", sm_scale=None):
            if torch.is_grad_enabled() and q.requires_grad:  # differentiable exact attention, in q's dtype
                return _sdpa("math")(q.float(), k.float(), v.float(), is_causal, tensor_layout, sm_scale).to(q.dtype)
            with torch.autocast(device_type=q.device.type, enabled=False):  # keep it fp32 inside a bf16 model
                return attention_reference(q, k, v, tensor_layout=tensor_layout, is_causal=is_causal,
                                           sm_scale=sm_scale).to(q.dtype)

        differentiable = True
    else:
        raise ValueError(f"attention.impl must be one of sage1, sage2, sage3, sage3_train, sdpa, exact; got {impl!r}")
    att = Attention(label, fn, note, differentiable)
    if check and impl in ("sage1", "sage2", "sage3", "sage3_train"):
        _dry_run(cfg, opts)
    return att


def _dry_run(cfg, opts):
    import importlib

    q = torch.randn(1, 1, 16, 64, dtype=torch.float16)
    if cfg.backend not in ("auto", "triton", "torch", "cuda"):
        raise ValueError(f"attention.backend must be one of auto, triton, torch, cuda; got {cfg.backend!r}")
    if cfg.impl == "sage3_train":
        import sage3
        sage3.sageattn_train(q, q, q, backend="torch", **opts)
    else:
        importlib.import_module(cfg.impl).sageattn(q, q, q, backend="torch", **opts)


def attention_choices() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "attention").glob("*.yaml"))
