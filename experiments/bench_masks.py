"""Masks, varlen and decode on the GPU: our kernels against SDPA in the same run.

    python -m experiments.bench_masks

* key padding: a boolean [B, 1, 1, N] right-padding mask (lengths N, 3N/4, N/2, N/4): ours runs it
  as per-sequence key lengths; SDPA runs the mask (its efficient backend; flash/cuDNN take none).
* varlen: the same sequences packed (sageattn_varlen) against the dense call at the same shape;
  TOPS count the real work, sum of n_i^2 (halved when causal), so equal TOPS = equal speed per token.
* arbitrary boolean mask [B, 1, N, N]: read tile by tile.
* decode: Nq = 1 against Nk up to 32k (B=4, 32 query heads, 8 KV heads).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import sage1
import sage2
from common.timing import bench_ms, tops


def sdpa(q, k, v, **kw):
    if k.shape[1] != q.shape[1] and kw.pop("enable_gqa", False):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)  # GQA without copying K, V
    if k.shape[1] != q.shape[1]:
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    return F.scaled_dot_product_attention(q, k, v, **kw)


def sdpa_backend(name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
          "efficient": SDPBackend.EFFICIENT_ATTENTION}[name]

    def fn(q, k, v, **kw):
        with sdpa_kernel([be]):
            return sdpa(q, k, v, **kw)
    return fn


def row(rows, what, name, ms, flops, base=None):
    r = dict(case=what, impl=name, ms=round(ms, 4), tops=round(tops(flops, ms), 1))
    if base:
        r["x_base"] = round(base / ms, 3)
    rows.append(r)
    print(f"  {what:38s} {name:28s} {ms:8.3f} ms {r['tops']:7.1f} TOPS" + (f"  {r['x_base']:.2f}x" if base else ""),
          flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=8192)
    args = ap.parse_args(argv)
    dev, B, H, D, N = "cuda", 4, 32, 128, args.n
    torch.manual_seed(0)
    rows = []
    lens = [N, 3 * N // 4, N // 2, N // 4]
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.float16, device=dev) for _ in range(3))
    for causal in (False, True):
        work = sum(4.0 * H * n * n * D for n in lens) / (2 if causal else 1)
        # key padding (queries past the length still run in the dense call: count the work SDPA does)
        pad = torch.arange(N, device=dev)[None, :] < torch.tensor(lens, device=dev)[:, None]
        mask = pad[:, None, None, :]
        dense_work = sum(4.0 * H * N * n * D for n in lens)
        if not causal:
            t_sdpa = bench_ms(lambda: sdpa(q, k, v, attn_mask=mask))
            row(rows, "key padding, non-causal", "SDPA (mask)", t_sdpa, dense_work)
            for name, mod in (("sage1", sage1), ("sage2_8b", sage2)):
                row(rows, "key padding, non-causal", name, bench_ms(lambda mod=mod: mod.sageattn(q, k, v, attn_mask=mask)),
                    dense_work, t_sdpa)
        # varlen: pack the valid tokens
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=dev)
        qp, kp, vp = (torch.cat([t[b, :, :n].transpose(0, 1) for b, n in enumerate(lens)]) for t in (q, k, v))
        sq = torch.arange(N, device=dev)
        causal_pad = (sq[None, :, None] >= sq[None, None, :]) & pad[:, None, :]  # [B, N, N] for SDPA
        t_sdpa = bench_ms(lambda: sdpa(q, k, v, attn_mask=causal_pad[:, None] if causal else mask))
        tag = f"varlen {'causal' if causal else 'non-causal'}"
        row(rows, tag, "SDPA padded + mask", t_sdpa, work)
        for name, mod in (("sage1", sage1), ("sage2_8b", sage2)):
            row(rows, tag, f"{name} varlen", bench_ms(lambda mod=mod: mod.sageattn_varlen(
                qp, kp, vp, cu, cu, N, N, is_causal=causal)), work, t_sdpa)
            dense_flops = 4.0 * B * H * N * N * D / (2 if causal else 1)
            row(rows, tag, f"{name} dense {B}x{N} (per-token ref)",
                bench_ms(lambda mod=mod: mod.sageattn(q, k, v, is_causal=causal)), dense_flops)
    # arbitrary boolean mask
    keep = torch.rand(B, 1, N, N, device=dev) > 0.1
    flops = 4.0 * B * H * N * N * D
    t_sdpa = bench_ms(lambda: sdpa(q, k, v, attn_mask=keep))
    row(rows, "bool mask [B,1,N,N]", "SDPA (mask)", t_sdpa, flops)
    for name, mod in (("sage1", sage1), ("sage2_8b", sage2)):
        row(rows, "bool mask [B,1,N,N]", name, bench_ms(lambda mod=mod: mod.sageattn(q, k, v, attn_mask=keep)), flops,
            t_sdpa)
    keep = q = k = v = None  # free the 8k inputs before the decode shapes
    # decode
    for nk in (4096, 32768):
        qd = torch.randn(B, 32, 1, D, dtype=torch.float16, device=dev)
        kd, vd = (torch.randn(B, 8, nk, D, dtype=torch.float16, device=dev) for _ in range(2))
        flops = 4.0 * B * 32 * nk * D
        base = None
        for name in ("flash", "cudnn", "efficient"):
            try:
                ms = bench_ms(lambda name=name: sdpa_backend(name)(qd, kd, vd, enable_gqa=True))
                row(rows, f"decode Nq=1 Nk={nk} GQA 32/8", f"SDPA {name}", ms, flops)
                base = ms if base is None else min(base, ms)
            except Exception as e:  # noqa: BLE001
                print(f"  SDPA {name}: {type(e).__name__}", flush=True)
        for name, mod in (("sage1", sage1), ("sage2_8b", sage2)):
            row(rows, f"decode Nq=1 Nk={nk} GQA 32/8", name, bench_ms(lambda mod=mod: mod.sageattn(qd, kd, vd)), flops,
                base)
    print("\n| case | impl | ms | TOPS | x base (SDPA) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['impl']} | {r['ms']} | {r['tops']} | {r.get('x_base', '')} |")


if __name__ == "__main__":
    main()
