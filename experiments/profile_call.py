"""Where the time of one attention call goes at short sequence lengths: host (Python + launches)
against device (kernels). ``python -m experiments.profile_call --seqlen 1024``"""

from __future__ import annotations

import argparse
import time

import torch

import sage1
import sage2
from common.inputs import make_qkv


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--dim", type=int, default=128)
    args = ap.parse_args(argv)
    q, k, v = make_qkv(4, 32, args.seqlen, args.dim, device="cuda", seed=0)
    for name, fn in (("sage1", lambda: sage1.sageattn(q, k, v)), ("sage2", lambda: sage2.sageattn(q, k, v))):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        n = 50
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        host = (time.perf_counter() - t0) / n * 1e3  # enqueue-rate (GPU may run behind)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / n * 1e3
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        kernels = [(e.key, e.device_time_total / 1e3) for e in prof.key_averages() if e.device_time_total > 0]
        dev = sum(t for _, t in kernels)
        print(f"{name} N={args.seqlen} D={args.dim}: host {host:.3f} ms/call, wall {wall:.3f} ms/call, kernels {dev:.3f} ms")
        for key, t in sorted(kernels, key=lambda x: -x[1]):
            print(f"    {t:8.3f} ms  {key[:90]}")


if __name__ == "__main__":
    main()
