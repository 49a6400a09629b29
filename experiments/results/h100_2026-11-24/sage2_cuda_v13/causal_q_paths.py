"""The attention kernel alone, causal, with Q quantized in the kernel or by the pass (SAGE2_SM90_Q),
alternating twice, 2k-16k keys, B=4 H=32; cuDNN in the same run.

    python causal_q_paths.py
"""
import os

import torch

from common.inputs import make_qkv
from common.timing import attention_flops, bench_ms, tops
from experiments.baselines import sdpa
from experiments.bench_sage2_cuda import kernel_only

cudnn = sdpa("sdpa_cudnn")
for d in (128, 64):
    for n in (2048, 4096, 8192, 16384):
        q, k, v = make_qkv(4, 32, n, d, kind="k_bias", device="cuda", seed=0)
        f = attention_flops(4, 32, n, n, d, True)
        got = {"pass": [], "kernel": []}
        for _ in range(2):
            for mode in got:
                os.environ["SAGE2_SM90_Q"] = mode
                got[mode].append(tops(f, bench_ms(kernel_only(q, k, v, True, "cuda"), rep_ms=100)))
        ref = tops(f, bench_ms(lambda q=q, k=k, v=v: cudnn(q, k, v, is_causal=True), rep_ms=100))
        print(f"D={d} causal N={n}: kernel alone, Q by the pass {got['pass'][0]:.0f} {got['pass'][1]:.0f}, "
              f"in the kernel {got['kernel'][0]:.0f} {got['kernel'][1]:.0f} | cudnn {ref:.0f}", flush=True)
        del q, k, v
        torch.cuda.empty_cache()
