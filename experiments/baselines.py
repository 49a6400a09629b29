"""The attention implementations we compare against, timed the same way as ours."""

from __future__ import annotations

import torch
import torch.nn.functional as F

SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION"}


def sdpa(backend: str):
    """``fn(q, k, v, is_causal, **sdpa_kwargs)`` running SDPA (HND) pinned to one backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = getattr(SDPBackend, SDPA_BACKENDS[backend])

    def fn(q, k, v, is_causal=False, **kw):
        with sdpa_kernel([be]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, **kw)

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


class SweepLog:
    """Rows of a kernel sweep, with cuDNN and FA2 timed on the same inputs, and the best configs."""

    def __init__(self):
        self.rows = []  # (head_dim, causal, name, tag, ms, tops)

    def add(self, d, causal, name, tag, ms, tops_):
        self.rows.append((d, causal, name, tag, ms, tops_))
        print(f"  D={d} causal={causal} {name} {tag}: {tops_:.0f} TOPS", flush=True)

    def bench(self, d, causal, name, tag, run, flops):
        """Time ``run()`` and add its row; a config that fails to compile or run is reported, not fatal."""
        from common.timing import bench_ms, tops

        try:
            ms = bench_ms(run)
        except Exception as e:  # noqa: BLE001
            print(f"  {tag}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
            return
        self.add(d, causal, name, tag, ms, tops(flops, ms))

    def time_baselines(self, q, k, v, d, causal, flops):
        from common.timing import bench_ms, tops

        for name in ("sdpa_cudnn", "sdpa_flash"):
            f = sdpa(name)
            ms = bench_ms(lambda: f(q, k, v, is_causal=causal))
            self.add(d, causal, name, "", ms, tops(flops, ms))

    def print_best(self, kernel_name, top=5):
        print("\nbest per (D, causal), kernel only, with cuDNN and FA2 in the same run:")
        for d, causal in dict.fromkeys((r[0], r[1]) for r in self.rows):
            rs = [r for r in self.rows if (r[0], r[1]) == (d, causal)]
            cud = next(r[5] for r in rs if r[2] == "sdpa_cudnn")
            fa2 = next(r[5] for r in rs if r[2] == "sdpa_flash")
            for r in sorted([r for r in rs if r[2] == kernel_name], key=lambda r: -r[5])[:top]:
                print(f"D={d} causal={causal} {r[3]:50s} {r[5]:6.0f} TOPS  {r[5] / cud:.3f}x cuDNN ({cud:.0f})  "
                      f"{r[5] / fa2:.2f}x FA2 ({fa2:.0f})")
