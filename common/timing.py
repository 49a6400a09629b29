"""Timing for benchmarks: warm-up, then the median of CUDA-event timings (triton's do_bench)."""

from __future__ import annotations

import torch


def attention_flops(batch, heads_q, seqlen_q, seqlen_k, head_dim, is_causal=False) -> float:
    """4*B*Hq*Nq*Nk*D (two matmuls), halved for causal when Nq == Nk (the papers' convention)."""
    f = 4.0 * batch * heads_q * seqlen_q * seqlen_k * head_dim
    return f / 2 if is_causal and seqlen_q == seqlen_k else f


def tops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def bench_ms(fn, *, warmup_ms: float = 100, rep_ms: float = 500) -> float:
    """Median time of ``fn()`` in milliseconds.

    On CUDA: triton.testing.do_bench (CUDA events, L2 flushed between runs) after a warm-up call
    that also triggers compilation. On CPU: the median of wall-clock runs.
    """
    fn()  # compile / warm up outside the timed region
    if torch.cuda.is_available():
        import triton.testing

        torch.cuda.synchronize()
        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    import statistics
    import time

    times = []
    end = time.perf_counter() + rep_ms / 1e3
    while time.perf_counter() < end or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def host_us(fn, n: int = 300, warmup: int = 1) -> float:
    """Host time per call of fn in microseconds: a loop of n calls that does not wait on the GPU
    (where the GPU keeps up, what the caller's Python and launches cost)."""
    import time

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    dt = time.perf_counter() - t
    torch.cuda.synchronize()
    return dt / n * 1e6


def graph_replay(fn):
    """``fn`` captured in a CUDA graph (warmed up on a side stream first, as capture requires);
    returns the graph's replay, which runs fn's kernels with no host launch cost."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay
