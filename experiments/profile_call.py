"""Where the time of one attention call goes at short sequence lengths: host (Python + launches)
against device (kernels), with the NaN/Inf input check on and off, and cuDNN in the same run.

    python -m experiments.profile_call --seqlens 1024 2048 8192 [--cpu-ops]

Per (kernel, check) it prints: the host's enqueue time per call (the GPU may run behind), the
wall time per call in a loop, do_bench's median (what the speed tables report), and the sum of
the kernels' device time; ``--cpu-ops`` adds the host-side operators that take the most time.
"""

from __future__ import annotations

import argparse
import time

import torch

import common.nonfinite as nonfinite
import sage1
import sage2
from common.inputs import make_qkv
from common.timing import attention_flops, bench_ms, graph_replay, tops
from experiments.baselines import sdpa


def loop_times(fn, n=50):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e3  # enqueue rate
    torch.cuda.synchronize()
    return host, (time.perf_counter() - t0) / n * 1e3


def kernel_times(fn, cpu_ops: bool, per_kernel: bool = False):
    acts = [torch.profiler.ProfilerActivity.CUDA] + ([torch.profiler.ProfilerActivity.CPU] if cpu_ops else [])
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        torch.cuda.synchronize()
    ev = prof.key_averages()
    dev = sum(e.device_time_total for e in ev if e.device_time_total > 0) / 1e3
    top_cpu = sorted(((e.key, e.self_cpu_time_total / 1e3, e.count) for e in ev if e.self_cpu_time_total > 0),
                     key=lambda x: -x[1])[:12] if cpu_ops else []
    if per_kernel:
        for e in sorted(ev, key=lambda e: -e.device_time_total):
            if e.device_time_total > 0 and e.self_cpu_time_total == 0:  # kernels, not the operators around them
                print(f"      gpu {e.device_time_total / 1e3:8.3f} ms x{e.count:<3d} {e.key[:80]}")
    return dev, top_cpu


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlens", type=int, nargs="+", default=[1024, 2048, 8192])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--cpu-ops", action="store_true")
    ap.add_argument("--kernels", action="store_true", help="device time of each kernel of one call")
    ap.add_argument("--graphs", action="store_true", help="also time each call replayed from a CUDA graph")
    args = ap.parse_args(argv)
    cudnn = sdpa("sdpa_cudnn")
    rows = []
    for n in args.seqlens:
        q, k, v = make_qkv(4, 32, n, args.dim, device="cuda", seed=0)
        flops = attention_flops(4, 32, n, n, args.dim)
        cases = [("sdpa_cudnn", True, lambda: cudnn(q, k, v))]
        for check in (True, False):
            cases += [("sage1", check, lambda: sage1.sageattn(q, k, v)), ("sage2", check, lambda: sage2.sageattn(q, k, v))]
        base = g_base = None
        for name, check, fn in cases:
            nonfinite.CHECK_NONFINITE = check
            host, wall = loop_times(fn)
            ms = bench_ms(fn)
            dev, top_cpu = kernel_times(fn, args.cpu_ops, args.kernels)
            base = base or ms
            if args.graphs:  # the host's share removed: how serving loops and torch.compile(mode="reduce-overhead") run
                g_ms = bench_ms(graph_replay(fn))
                g_base = g_base if name != "sdpa_cudnn" else g_ms
                print(f"N={n} {name} check={'on' if check else 'off'}: CUDA graph {g_ms:.3f} ms = "
                      f"{g_base / g_ms:.2f}x cuDNN (graph)", flush=True)
            rows.append((n, name, "on" if check else "off", host, wall, ms, dev, tops(flops, ms), base / ms))
            print(f"N={n} {name} check={'on' if check else 'off'}: host {host:.3f} wall {wall:.3f} bench {ms:.3f} "
                  f"kernels {dev:.3f} ms  {tops(flops, ms):.0f} TOPS = {base / ms:.2f}x cuDNN", flush=True)
            for key, t, cnt in top_cpu:
                print(f"      cpu {t:8.3f} ms x{cnt:<3d} {key[:80]}")
        nonfinite.CHECK_NONFINITE = True
    print("\n| N | kernel | check | host ms | wall ms | bench ms | kernels ms | TOPS | x cuDNN |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| {} | {} | {} | {:.3f} | {:.3f} | {:.3f} | {:.3f} | {:.0f} | {:.2f} |".format(*r))


if __name__ == "__main__":
    main()
