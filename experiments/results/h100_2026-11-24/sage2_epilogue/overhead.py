"""Per-work-tile overhead of the sage2 sm90 kernel: kernel alone at (Nq, Nk), D=128 non-causal.
T = rounds * (X + tiles_k * c): fit X (per work tile) and c (per 128-key tile)."""
import os, sys, math
import torch
from common.inputs import make_qkv
from common.timing import attention_flops, bench_ms, tops
from experiments.bench_sage2_cuda import kernel_only, sdpa

B, H, D = 4, 32, 128
shapes = [(16384, 16384), (8192, 16384), (4096, 16384), (2048, 16384),
          (8192, 8192), (8192, 4096), (8192, 2048), (2048, 2048), (16384, 2048)]
paths = sys.argv[1:] or ["kernel", "pass"]
rows = []
for path in paths:
    os.environ["SAGE2_SM90_Q"] = path
    for nq, nk in shapes:
        q, k, v = make_qkv(B, H, nq, D, seqlen_k=nk, kind="k_bias", device="cuda", seed=0)
        ms = bench_ms(kernel_only(q, k, v, False, "cuda"), rep_ms=150)
        cud = bench_ms(lambda q=q, k=k, v=v: sdpa("sdpa_cudnn")(q, k, v, is_causal=False), rep_ms=100) if path == paths[0] else float("nan")
        n_work = B * H * math.ceil(nq / 128)
        rounds = n_work / 132
        per_round = ms * 1e3 / rounds
        f = attention_flops(B, H, nq, nk, D, False)
        print(f"{path:6s} Nq={nq:5d} Nk={nk:5d}: {ms:8.3f} ms {tops(f, ms):5.0f} TOPS (cudnn {tops(f, cud):4.0f}); "
              f"per work tile {per_round:7.2f} us = {per_round / (nk / 128):5.3f} us per KV tile", flush=True)
        rows.append((path, nq, nk, per_round))
        del q, k, v
        torch.cuda.empty_cache()
# least squares per path: per_round = X + (nk/128) * c
for path in paths:
    pts = [(nk / 128, y) for p, nq, nk, y in rows if p == path]
    n = len(pts); sx = sum(x for x, _ in pts); sy = sum(y for _, y in pts)
    sxx = sum(x * x for x, _ in pts); sxy = sum(x * y for x, y in pts)
    c = (n * sxy - sx * sy) / (n * sxx - sx * sx); X = (sy - c * sx) / n
    print(f"fit {path}: X = {X:.2f} us per work tile, c = {c:.3f} us per KV tile (X = {X / c:.1f} KV tiles)")
    for p, nq, nk, y in rows:
        if p == path:
            print(f"   Nq={nq} Nk={nk}: measured {y:.2f} fit {X + nk / 128 * c:.2f}")
