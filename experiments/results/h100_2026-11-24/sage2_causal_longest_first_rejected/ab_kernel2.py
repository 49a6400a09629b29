"""A/B of the attention kernel alone (inputs quantized once), one line per shape.

    python ab_kernel.py TAG [--d64]   (run from the checkout whose kernel is timed; --d64: the
                                       shapes of ab_kernel_d64_v12_vs_v13.log)
"""
import sys

import torch

from common.inputs import make_qkv
from common.timing import attention_flops, bench_ms, tops
from experiments.bench_sage2_cuda import kernel_only

tag = sys.argv[1]
shapes = [(128, True, 2048), (128, True, 4096), (128, True, 8192), (128, True, 16384), (64, True, 4096), (64, True, 16384), (128, False, 16384)]
if "--d64" in sys.argv:
    shapes = [(64, False, 16384), (64, False, 8192), (64, True, 16384), (128, False, 16384)]
for d, c, n in shapes:
    q, k, v = make_qkv(4, 32, n, d, kind="k_bias", device="cuda", seed=0)
    f = attention_flops(4, 32, n, n, d, c)
    a = tops(f, bench_ms(kernel_only(q, k, v, c, "cuda"), rep_ms=150))
    print(f"{tag} D={d} causal={int(c)} N={n}: kernel {a:.0f}", flush=True)
    del q, k, v
    torch.cuda.empty_cache()
