"""A/B: the whole sage2 CUDA call against cuDNN SDPA, same inputs, same process; one line per shape.

    python ab.py TAG [--causal-only]   (run from the checkout whose sage2 is timed)
"""
import sys

import torch

import sage2
from common.inputs import make_qkv
from common.timing import attention_flops, bench_ms, tops
from experiments.baselines import sdpa

tag = sys.argv[1]
causal_only = "--causal-only" in sys.argv
cudnn = sdpa("sdpa_cudnn")
shapes = [(128, False, 16384), (128, True, 16384), (128, False, 8192), (128, True, 8192), (128, False, 2048),
          (128, True, 2048), (64, False, 16384), (64, True, 16384)]
for d, c, n in shapes:
    if causal_only and not c:
        continue
    q, k, v = make_qkv(4, 32, n, d, kind="k_bias", device="cuda", seed=0)
    f = attention_flops(4, 32, n, n, d, c)
    a = tops(f, bench_ms(lambda q=q, k=k, v=v: sage2.sageattn(q, k, v, is_causal=c, backend="cuda"), rep_ms=80))
    b = tops(f, bench_ms(lambda q=q, k=k, v=v: cudnn(q, k, v, is_causal=c), rep_ms=80))
    print(f"{tag} D={d} causal={int(c)} N={n}: cuda {a:.0f} cudnn {b:.0f} ratio {a / b:.3f}", flush=True)
    del q, k, v
    torch.cuda.empty_cache()
