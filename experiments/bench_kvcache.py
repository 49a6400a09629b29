"""Decode from the quantized KV cache (sage2.sageattn_kvcache) against SDPA on an fp16 cache and
against sage2's dense decode call, in the same run.

    python -m experiments.bench_kvcache [--out DIR]

Decode reads the KV cache once per step, so bytes decide: the quantized cache holds 276 bytes per
key and KV head at D=128 (INT8 K with a scale per token and a mean per tile, FP8 V with scales per
channel per tile) against fp16's 512. Columns, per shape: the attention call alone (eager, and
replayed from a CUDA graph: what a serving loop runs), one decode step (append one key, then the
attention call; SDPA's step writes the key into a preallocated fp16 cache), the accuracy against
exact attention, and the cache's bytes. ``x best SDPA`` is against the best of SDPA's flash and
cuDNN backends (GQA through ``enable_gqa``, no copies). Causal rows with Nq > 1: ours is
bottom-right aligned (speculative decoding), SDPA runs non-causal (its is_causal is top-left), the
same work to within Nq keys.
"""

from __future__ import annotations

import argparse

import torch

import sage2
from common.inputs import make_qkv
from common.kv_cache import QuantizedKVCache
from common.metrics import accuracy
from common.reference import attention_reference
from common.timing import bench_ms, graph_replay
from experiments.bench_decode import sdpa_fn

# (B, Hq, Hkv, Nq, Nk, causal)
SHAPES = [
    (4, 32, 8, 1, 1024, False), (4, 32, 8, 1, 4096, False), (4, 32, 8, 1, 16384, False),
    (4, 32, 8, 1, 32768, False), (1, 32, 8, 1, 131072, False), (16, 32, 32, 1, 4096, False),
    (4, 32, 8, 4, 16384, True),
]
TAIL_SHORT = 27  # keys short of the shape's Nk: the last tile holds 37 keys (quantized at each step)


def run_shape(B, Hq, Hkv, Nq, Nk, causal, D, n, total):
    case = f"B={B} Hq/Hkv={Hq}/{Hkv} Nq={Nq} Nk={Nk // 1024}k-{TAIL_SHORT}" + (" causal" if causal else "")
    print(f"[{n}/{total}] {case}", flush=True)
    Nk -= TAIL_SHORT  # a partial last tile, as in most decode steps
    q, k, v = make_qkv(B, Hq, Nq, D, heads_kv=Hkv, seqlen_k=Nk + 1, kind="k_bias", device="cuda", seed=n)
    k_new, v_new = k[:, :, Nk:], v[:, :, Nk:]
    k, v = k[:, :, :Nk].contiguous(), v[:, :, :Nk].contiguous()
    cache = QuantizedKVCache(B, Hkv, D, Nk + 64, dtype=k.dtype, device="cuda")
    cache.append(k, v)
    rows = []

    def row(impl, ms, best, extra=None):
        r = dict(case=case, impl=impl, ms=round(ms, 4), x_best_sdpa=round(best / ms, 3), **(extra or {}))
        rows.append(r)
        more = "".join(f"  {k_}={v_}" for k_, v_ in (extra or {}).items())
        print(f"  {impl:34s} {ms:8.4f} ms  {r['x_best_sdpa']:.3f}x best SDPA{more}", flush=True)

    sdpa = {name: sdpa_fn(name) for name in ("flash", "cudnn")}
    ours = {"sage2 dense decode (auto)": lambda: sage2.sageattn(q, k, v, is_causal=causal),
            "sage2_kvcache (triton)": lambda: sage2.sageattn_kvcache(q, cache, is_causal=causal)}
    eager = {f"SDPA {n_}": bench_ms(lambda f=f: f(q, k, v, causal)) for n_, f in sdpa.items()}
    eager.update({n_: bench_ms(f) for n_, f in ours.items()})
    graph = {f"SDPA {n_}": bench_ms(graph_replay(lambda f=f: f(q, k, v, causal))) for n_, f in sdpa.items()}
    graph.update({n_: bench_ms(graph_replay(f)) for n_, f in ours.items()})
    best_e = min(t for n_, t in eager.items() if n_.startswith("SDPA"))
    best_g = min(t for n_, t in graph.items() if n_.startswith("SDPA"))
    ref = attention_reference(q, k, v, is_causal=causal)
    acc = {n_: accuracy(ref, f()) for n_, f in ours.items()}
    fp16_bytes = 2 * k.numel() * 2
    for n_, t in eager.items():
        extra = {"cos": round(acc[n_].cos_sim, 5), "rel_l1": round(acc[n_].rel_l1, 4)} if n_ in acc else None
        row(n_ + " eager", t, best_e, extra)
    for n_, t in graph.items():
        row(n_ + " CUDA graph", t, best_g)
    # one decode step: append one key, then attend (SDPA: write it into a preallocated fp16 cache)
    k_buf = torch.empty(B, Hkv, Nk + 1, D, dtype=k.dtype, device="cuda")
    v_buf = torch.empty_like(k_buf)
    k_buf[:, :, :Nk], v_buf[:, :, :Nk] = k, v
    best_name = min(sdpa, key=lambda n_: eager[f"SDPA {n_}"])

    def sdpa_step():
        k_buf[:, :, Nk:Nk + 1] = k_new
        v_buf[:, :, Nk:Nk + 1] = v_new
        return sdpa[best_name](q, k_buf, v_buf, causal)

    def cache_step():
        cache.length = Nk  # (the same step again: the key goes to the same place)
        cache.append(k_new, v_new)
        return sage2.sageattn_kvcache(q, cache, is_causal=causal)

    step_sdpa = bench_ms(sdpa_step)
    row(f"step: SDPA {best_name} + fp16 cache write", step_sdpa, step_sdpa)
    row("step: sage2_kvcache + append", bench_ms(cache_step), step_sdpa,
        {"cache_MB": round(cache.nbytes() / 2**20, 1), "fp16_MB": round(fp16_bytes / 2**20, 1)})
    # the step captured once in a CUDA graph and replayed (the append reads its position from the
    # device: each replay adds a key; past the capacity, Nk + 64, the keys are dropped, so the replays
    # time steps at Nk to Nk + 64 keys). SDPA's graph replays one step at one position: its best case
    step_sdpa_g = bench_ms(graph_replay(sdpa_step))
    row(f"step: SDPA {best_name} + fp16 cache write CUDA graph", step_sdpa_g, step_sdpa_g)
    row("step: sage2_kvcache + append CUDA graph", bench_ms(_captured_step(q, k, v, k_new, v_new, causal)),
        step_sdpa_g)
    return rows


def _captured_step(q, k, v, k_new, v_new, causal):
    """The replay of one decode step (append one key per sequence, attend) captured in a CUDA graph,
    over a fresh cache holding k and v."""
    B, Hkv, Nk, D = k.shape
    cache = QuantizedKVCache(B, Hkv, D, Nk + 64, dtype=k.dtype, device="cuda")
    cache.append(k, v)
    cache._append_on_device(k_new, v_new, "HND")  # (compiles the device append before the capture)

    def step():
        cache.append(k_new, v_new)
        return sage2.sageattn_kvcache(q, cache, is_causal=causal)

    return graph_replay(step)


def sweep(D: int) -> None:
    """The cached kernel's launch settings at B=4 32/8 Nk=16k (graph replay, ms), best SDPA alongside."""
    from common import kv_cache

    B, Hq, Hkv, Nk = 4, 32, 8, 16384 - TAIL_SHORT
    q, k, v = make_qkv(B, Hq, 1, D, heads_kv=Hkv, seqlen_k=Nk, kind="k_bias", device="cuda", seed=0)
    cache = QuantizedKVCache(B, Hkv, D, Nk, dtype=k.dtype, device="cuda")
    cache.append(k, v)
    best = min(bench_ms(graph_replay(lambda f=sdpa_fn(n): f(q, k, v, False))) for n in ("flash", "cudnn"))
    print(f"sweep B={B} {Hq}/{Hkv} Nk={Nk} D={D}: best SDPA (graph) {best:.4f} ms", flush=True)
    default = kv_cache.CACHE_WARPS, kv_cache.CACHE_STAGES, kv_cache.CACHE_MAXNREG, kv_cache.CACHE_PROGRAMS_PER_SM
    for warps, stages, maxnreg, per_sm in ((4, 3, None, 2), (4, 2, None, 2), (4, 4, None, 2), (4, 3, 168, 3),
                                           (4, 2, 168, 3), (4, 3, 128, 4), (8, 3, None, 1), (8, 4, None, 1),
                                           (4, 3, None, 4), (4, 3, None, 1)):
        kv_cache.CACHE_WARPS, kv_cache.CACHE_STAGES, kv_cache.CACHE_MAXNREG, kv_cache.CACHE_PROGRAMS_PER_SM = \
            warps, stages, maxnreg, per_sm
        ms = bench_ms(graph_replay(lambda: sage2.sageattn_kvcache(q, cache)))
        print(f"  warps={warps} stages={stages} maxnreg={maxnreg} programs/SM={per_sm}: {ms:.4f} ms "
              f"({best / ms:.3f}x)", flush=True)
    kv_cache.CACHE_WARPS, kv_cache.CACHE_STAGES, kv_cache.CACHE_MAXNREG, kv_cache.CACHE_PROGRAMS_PER_SM = default


def sweep_splits(D: int) -> None:
    """Tiles per split at short contexts (B=4 32/8, graph replay, ms), the plan's own first: where
    fixed per-program costs (Q's quantization, the partial tile, the merge) weigh most."""
    from common import kv_cache

    B, Hq, Hkv = 4, 32, 8
    for Nk in (1024 - TAIL_SHORT, 2048 - TAIL_SHORT, 4096 - TAIL_SHORT):
        q, k, v = make_qkv(B, Hq, 1, D, heads_kv=Hkv, seqlen_k=Nk, kind="k_bias", device="cuda", seed=0)
        best = min(bench_ms(graph_replay(lambda f=sdpa_fn(n): f(q, k, v, False))) for n in ("flash", "cudnn"))
        cache = QuantizedKVCache(B, Hkv, D, Nk, dtype=k.dtype, device="cuda")
        cache.append(k, v)
        plan = kv_cache.launch_plan(cache, 1, -(-Nk // 64), q.device)
        line = [f"plan (tps={plan[2]}) {bench_ms(graph_replay(lambda: sage2.sageattn_kvcache(q, cache))):.4f}"]
        split_tiles = kv_cache.split_tiles
        try:
            for tps in (1, 2, 3, 4, 6, 8, 16):
                kv_cache.split_tiles = lambda *a, tps=tps, **kw: tps
                cache._plans.clear()
                line.append(f"{tps}: {bench_ms(graph_replay(lambda: sage2.sageattn_kvcache(q, cache))):.4f}")
        finally:
            kv_cache.split_tiles = split_tiles
            cache._plans.clear()
        print(f"splits B={B} {Hq}/{Hkv} Nk={Nk}: best SDPA (graph) {best:.4f} ms | " + " | ".join(line), flush=True)


def host(D: int) -> None:
    """Host time per call (us, a loop of calls without waiting on the GPU) at B=4 32/8 Nk=4k-27, and
    its parts: the Python front end (the launch stubbed out), the launch alone (through Triton's
    JIT, and through common.triton_launch.FastLauncher, which the call uses), the append of one key;
    then a cProfile of the call. The eager columns of the table are host-bound where this exceeds the GPU
    time."""
    import cProfile
    import pstats

    from common import kv_cache, timing, triton_decode

    B, Hq, Hkv, Nk = 4, 32, 8, 4096 - TAIL_SHORT
    q, k, v = make_qkv(B, Hq, 1, D, heads_kv=Hkv, seqlen_k=Nk + 1, kind="k_bias", device="cuda", seed=0)
    k_new, v_new = k[:, :, Nk:], v[:, :, Nk:]
    k, v = k[:, :, :Nk].contiguous(), v[:, :, :Nk].contiguous()
    cache = QuantizedKVCache(B, Hkv, D, Nk + 64, dtype=k.dtype, device="cuda")
    cache.append(k, v)

    def host_us(fn):
        return timing.host_us(fn, n=500, warmup=5)

    recorded = {}

    def record(grid, *args, **kwargs):  # the front end alone: records the launch, launches nothing
        recorded.update(grid=grid, args=args, kwargs=kwargs)

    def append_step():
        cache.length = Nk
        cache.append(k_new, v_new)

    call = lambda: sage2.sageattn_kvcache(q, cache)  # noqa: E731
    times = {"SDPA cudnn": host_us(lambda: sdpa_fn("cudnn")(q, k, v, False)),
             "sage2 dense decode": host_us(lambda: sage2.sageattn(q, k, v)),
             "sage2_kvcache": host_us(call)}
    launch = kv_cache._launch_cached
    kv_cache._launch_cached = record
    try:
        times["  front end (launch stubbed)"] = host_us(call)
    finally:
        kv_cache._launch_cached = launch
    grid, args, kwargs = recorded["grid"], recorded["args"], recorded["kwargs"]
    times["  launch through Triton's JIT"] = host_us(lambda: triton_decode.decode_cached_kernel[grid](*args, **kwargs))
    times["  launch through FastLauncher"] = host_us(lambda: launch(grid, *args, **kwargs))
    times["append one key (+ rollback)"] = host_us(append_step)
    print(f"host time per call, B={B} {Hq}/{Hkv} Nk={Nk} D={D}:", flush=True)
    for name, us in times.items():
        print(f"  {name:36s} {us:8.1f} us", flush=True)
    for name, fn in (("sage2_kvcache", call), ("append", append_step)):
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        print(f"cProfile, {name} x200:", flush=True)
        pstats.Stats(prof).sort_stats("tottime").print_stats(16)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None, help="write kvcache.csv/.md and kvcache.png here")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--shapes", type=int, nargs="*", default=None, help="indices into SHAPES (default: all)")
    ap.add_argument("--sweep", action="store_true", help="time the cached kernel's launch settings first")
    ap.add_argument("--host", action="store_true", help="host time per call and its parts, then exit")
    ap.add_argument("--sweep-splits", action="store_true", help="tiles per split at 1k-4k keys, then exit")
    args = ap.parse_args(argv)
    if args.host or args.sweep_splits:
        (host if args.host else sweep_splits)(args.d)
        return
    if args.sweep:
        sweep(args.d)
    picked = [SHAPES[i] for i in args.shapes] if args.shapes else SHAPES
    rows = []
    for n, shape in enumerate(picked, 1):
        rows += run_shape(*shape, args.d, n, len(picked))
        torch.cuda.empty_cache()
    from experiments.outputs import report_by_case

    report_by_case(rows, args.out, "kvcache", "Decode from the quantized KV cache vs SDPA (same run)",
                   ["case", "impl", "ms", "x_best_sdpa"], "speed / best SDPA", "Decode from a quantized KV cache (H100)",
                   plotted=lambda r: "graph" in r["impl"] or "step" in r["impl"])

if __name__ == "__main__":
    main()
