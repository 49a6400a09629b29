"""Where a short sequence's call goes: the whole call eager, the same call replayed from a CUDA graph
(no host launch cost), the kernel alone, and the host's time per call (tiny inputs, so that the
GPU never holds the host back); then a cProfile of the host side. cuDNN in the same run.

    python host_cost.py
"""
import cProfile
import pstats
import time

import torch

import sage2
from common.inputs import make_qkv
from common.timing import attention_flops, bench_ms, graph_replay
from experiments.baselines import sdpa
from experiments.bench_sage2_cuda import kernel_only

cudnn = sdpa("sdpa_cudnn")
for d, c, n in [(128, False, 2048), (128, True, 2048), (128, False, 8192)]:
    q, k, v = make_qkv(4, 32, n, d, kind="k_bias", device="cuda", seed=0)
    call = lambda: sage2.sageattn(q, k, v, is_causal=c, backend="cuda")  # noqa: E731
    eager = bench_ms(call, rep_ms=200)
    graphed = bench_ms(graph_replay(call), rep_ms=200)
    kern = bench_ms(kernel_only(q, k, v, c, "cuda"), rep_ms=200)
    ref = bench_ms(lambda: cudnn(q, k, v, is_causal=c), rep_ms=200)
    ref_graphed = bench_ms(graph_replay(lambda: cudnn(q, k, v, is_causal=c)), rep_ms=200)
    f = attention_flops(4, 32, n, n, d, c) / 1e9
    print(f"D={d} causal={int(c)} N={n}: ms eager {eager:.3f} graphed {graphed:.3f} kernel {kern:.3f} | cudnn eager "
          f"{ref:.3f} graphed {ref_graphed:.3f} | TOPS eager {f / eager:.0f} graphed {f / graphed:.0f} kernel "
          f"{f / kern:.0f} cudnn {f / ref:.0f}", flush=True)

for c in (False, True):
    qs, ks, vs = make_qkv(1, 1, 256, 128, device="cuda", seed=1)
    tiny = lambda: sage2.sageattn(qs, ks, vs, is_causal=c, backend="cuda")  # noqa: E731
    for _ in range(20):
        tiny()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(300):
        tiny()
    host_ms = (time.perf_counter() - t0) / 300 * 1e3
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(300):
        cudnn(qs, ks, vs, is_causal=c)
    ref_ms = (time.perf_counter() - t0) / 300 * 1e3
    torch.cuda.synchronize()
    print(f"host per call (causal={int(c)}): sage2 cuda {host_ms * 1e3:.0f} us, cudnn sdpa {ref_ms * 1e3:.0f} us",
          flush=True)
prof = cProfile.Profile()
prof.enable()
for _ in range(200):
    tiny()
prof.disable()
torch.cuda.synchronize()
pstats.Stats(prof).sort_stats("tottime").print_stats(30)
