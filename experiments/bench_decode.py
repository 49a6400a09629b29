"""Decode on the GPU: a few queries against a long KV sequence, ours against SDPA in the same run.

    python -m experiments.bench_decode [--out DIR]

Decode reads the whole KV cache for very little arithmetic, so the columns that matter are the
time and the bandwidth reached (bytes of K and V in their fp16 form / time; the H100's copy
ceiling measured 3.0 TB/s). ``x best SDPA`` is the best of SDPA's flash, cuDNN and efficient
backends on the same inputs (GQA through ``enable_gqa``, no copies). Our calls include every
step: the quantization of Q, K and V happens inside the split-KV kernel (common.decode).
Causal rows with Nq > 1: ours is bottom-right aligned (query i of Nq sees keys up to
Nk - Nq + i, what speculative decoding needs); SDPA's ``is_causal`` is top-left aligned (query i
sees i + 1 keys, not a decode), so SDPA runs non-causal there, the same work to within Nq keys.
``--sweep`` times the kernel's launch settings on one shape first. ``--masks`` times decode steps
with a left-padding attn_mask (batched generation) instead.
"""

from __future__ import annotations

import argparse

import torch

import sage1
import sage2
from common.timing import bench_ms, graph_replay
from experiments.baselines import sdpa

# (B, Hq, Hkv, Nq, Nk, causal)
SHAPES = [
    (4, 32, 8, 1, 1024, False), (4, 32, 8, 1, 4096, False), (4, 32, 8, 1, 16384, False),
    (4, 32, 8, 1, 32768, False), (1, 32, 8, 1, 131072, False), (16, 32, 32, 1, 4096, False),
    (4, 32, 8, 4, 16384, True), (8, 32, 8, 16, 8192, True), (4, 64, 8, 1, 16384, False),
    # one program per KV head in 1.09 and 1.21 waves: the CUDA kernel's helpers take the idle SMs
    # (experiments/bench_decode_helpers.py; before them 0.66-0.73x cuDNN)
    (9, 32, 32, 1, 4096, False), (40, 32, 8, 1, 4096, False),
]
# backend="auto": the CUDA sweep on Hopper where it covers the call; "(triton)": the Triton sweep, for
# comparison
OURS = {"sage1": lambda q, k, v, c: sage1.sageattn(q, k, v, is_causal=c),
        "sage2_8b": lambda q, k, v, c: sage2.sageattn(q, k, v, is_causal=c),
        "sage2_4b": lambda q, k, v, c: sage2.sageattn(q, k, v, is_causal=c, qk_dtype="int4"),
        "sage1 (triton)": lambda q, k, v, c: sage1.sageattn(q, k, v, is_causal=c, backend="triton"),
        "sage2_8b (triton)": lambda q, k, v, c: sage2.sageattn(q, k, v, is_causal=c, backend="triton")}


def sdpa_fn(name):
    """``fn(q, k, v, causal)``: SDPA pinned to one backend, GQA without copies. Bottom-right causal
    over Nq << Nk keys is (to Nq keys) the non-causal work; SDPA's is_causal would be top-left."""
    run = sdpa(f"sdpa_{name}")

    def fn(q, k, v, c):
        return run(q, k, v, c and q.shape[2] == k.shape[2], enable_gqa=k.shape[1] != q.shape[1])
    return fn


def sweep(D: int) -> None:
    from common import decode

    B, Hq, Hkv, Nk = 4, 32, 8, 16384
    q = torch.randn(B, Hq, 1, D, dtype=torch.float16, device="cuda")
    k, v = (torch.randn(B, Hkv, Nk, D, dtype=torch.float16, device="cuda") for _ in range(2))
    base = min(bench_ms(lambda f=sdpa_fn(n): f(q, k, v, False)) for n in ("flash", "cudnn"))
    print(f"sweep B={B} {Hq}/{Hkv} Nk={Nk} D={D}: best SDPA {base:.4f} ms", flush=True)
    print(f"  sage1 smooth_k=False: {bench_ms(lambda: sage1.sageattn(q, k, v, smooth_k=False)):.4f} ms", flush=True)
    default = decode.DECODE_TILE, decode.DECODE_WARPS, decode.DECODE_MAXNREG, decode.PROGRAMS_PER_SM, decode.DECODE_STAGES
    for tile, warps, maxnreg, per_sm, stages in (
            (64, 4, 168, 2, 2), (64, 4, 168, 3, 2), (64, 4, 168, 3, 3), (64, 4, 168, 6, 2), (64, 4, 128, 4, 2),
            (64, 4, 128, 4, 3), (32, 4, 128, 4, 3), (32, 4, 128, 6, 4), (128, 8, 128, 2, 2)):
        decode.DECODE_TILE, decode.DECODE_WARPS, decode.DECODE_MAXNREG = tile, warps, maxnreg
        decode.PROGRAMS_PER_SM, decode.DECODE_STAGES = per_sm, stages
        line = [f"{n} {bench_ms(lambda f=f: f(q, k, v, False)):.4f}" for n, f in OURS.items() if "triton" in n]
        print(f"  tile={tile} warps={warps} maxnreg={maxnreg} programs/SM={per_sm} stages={stages}: "
              + ", ".join(line) + " ms", flush=True)
    (decode.DECODE_TILE, decode.DECODE_WARPS, decode.DECODE_MAXNREG, decode.PROGRAMS_PER_SM,
     decode.DECODE_STAGES) = default


def overhead() -> None:
    """Host time per call (no GPU wait) against the GPU time, at a size where launches dominate."""
    from common import decode
    from common.timing import host_us
    from common.masking import NO_MASK

    B, Hq, Hkv, Nk, D = 4, 32, 8, 1024, 128
    q = torch.randn(B, Hq, 1, D, dtype=torch.float16, device="cuda")
    k, v = (torch.randn(B, Hkv, Nk, D, dtype=torch.float16, device="cuda") for _ in range(2))
    out = torch.empty_like(q)
    spec = decode.DecodeSpec(127, k_per_token=False, smooth_k=True, smooth_q=False, pv="fp16_acc16")

    cases = {"SDPA cudnn": lambda: sdpa_fn("cudnn")(q, k, v, False),
             "sage1.sageattn": lambda: sage1.sageattn(q, k, v),
             "sage2.sageattn": lambda: sage2.sageattn(q, k, v),
             "decode_attention only": lambda: decode.decode_attention(q, k, v, out, spec, sm_scale=0.088, is_causal=False,
                                                                       mask=NO_MASK, return_lse=False, backend="triton"),
             "torch.empty x4": lambda: [torch.empty(8, 32, 16, 128, device="cuda") for _ in range(4)]}
    print(f"host overhead, B={B} {Hq}/{Hkv} Nk={Nk}: us per call on the host | GPU ms (do_bench)", flush=True)
    for name, fn in cases.items():
        print(f"  {name:24s} {host_us(fn):8.1f} us | {bench_ms(fn):.4f} ms", flush=True)
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        sage1.sageattn(q, k, v)
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(14)


# Batched generation passes a padding mask with every decode step ([B, 1, 1, Nk]): Hugging Face pads
# on the left for decoder-only models, as a boolean mask (recent versions) or an additive one
# (finfo.min where masked). (B, Hq, Hkv, Nk, fraction of the batch's keys that are padding)
MASK_SHAPES = [(4, 32, 8, 4096, 0.2), (4, 32, 8, 16384, 0.2), (16, 32, 8, 4096, 0.2), (8, 32, 8, 32768, 0.1)]


def masked(out_rows: list, graphs: bool) -> None:
    """Decode with a left-padding mask: ours (``backend="auto"``: on Hopper the CUDA split-KV sweep,
    which reads the mask per score) against SDPA given the same mask (its flash backend takes none),
    and against what the call ran before (the prefill kernel with a dense mask: DECODE_MAX_QUERIES=0)."""
    from common import decode

    D = 128
    for n, (B, Hq, Hkv, Nk, pad) in enumerate(MASK_SHAPES):
        g = torch.Generator(device="cuda").manual_seed(n)
        q = torch.randn(B, Hq, 1, D, dtype=torch.float16, device="cuda", generator=g)
        k, v = (torch.randn(B, Hkv, Nk, D, dtype=torch.float16, device="cuda", generator=g) for _ in range(2))
        first = (torch.rand(B, device="cuda", generator=g) * 2 * pad * Nk).long()   # mean pad fraction
        keep = (torch.arange(Nk, device="cuda")[None, :] >= first[:, None])[:, None, None, :]
        additive = torch.where(keep, 0.0, torch.finfo(torch.float16).min).half()
        kx, vx = (t.repeat_interleave(Hq // Hkv, dim=1) for t in (k, v))
        kv_bytes = 2 * k.numel() * 2
        for mask_name, mask in (("bool", keep), ("additive", additive)):
            case = f"B={B} Hq/Hkv={Hq}/{Hkv} Nk={Nk // 1024}k left-padded {mask_name}"
            print(f"[masks {n + 1}/{len(MASK_SHAPES)}] {case}", flush=True)
            # pinned to cuDNN or efficient, SDPA takes GQA with a mask only on K and V expanded to the
            # query heads (Hugging Face's repeat_kv does this; the copy is not timed here); unpinned,
            # with enable_gqa, it picks its own backend (2.3-2.9 TB/s on the H100, 2026-11-25)
            def sdpa_default():
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

            times = {"SDPA default (enable_gqa)": bench_ms(sdpa_default)}
            if graphs:  # like with like: ours replayed against SDPA replayed
                times["SDPA default (CUDA graph)"] = graph_ms(sdpa_default)
            for name in ("cudnn", "efficient"):
                try:
                    f = sdpa(f"sdpa_{name}")
                    times[f"SDPA {name} (K, V expanded)"] = bench_ms(lambda f=f: f(q, kx, vx, False, attn_mask=mask))
                except RuntimeError as e:
                    print(f"  SDPA {name}: {str(e).splitlines()[0][:80]}", flush=True)
            best = min(times.values())
            for name, fn in (("sage1", sage1.sageattn), ("sage2_8b", sage2.sageattn)):
                times[name] = bench_ms(lambda fn=fn: fn(q, k, v, attn_mask=mask))
                if graphs:
                    times[f"{name} (CUDA graph)"] = graph_ms(lambda fn=fn: fn(q, k, v, attn_mask=mask))
                saved, decode.DECODE_MAX_QUERIES = decode.DECODE_MAX_QUERIES, 0
                try:
                    times[f"{name} (before: prefill)"] = bench_ms(lambda fn=fn: fn(q, k, v, attn_mask=mask))
                finally:
                    decode.DECODE_MAX_QUERIES = saved
            for name, ms in times.items():
                r = dict(case=case, impl=name, ms=round(ms, 4), kv_gbps=round(kv_bytes / (ms * 1e-3) / 1e9, 1),
                         x_best_sdpa=round(best / ms, 3))
                out_rows.append(r)
                print(f"  {name:26s} {ms:8.4f} ms {r['kv_gbps']:8.1f} GB/s  {r['x_best_sdpa']:.2f}x best SDPA",
                      flush=True)
        q = k = v = kx = vx = None


def graph_ms(fn) -> float:
    """GPU time of fn replayed from a CUDA graph (no host launch cost): decode loops are captured."""
    return bench_ms(graph_replay(fn))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None, help="write decode.csv/.md (and decode.png) here")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--sweep", action="store_true", help="time warps/stages/delta precision on one shape first")
    ap.add_argument("--overhead", action="store_true", help="host time per call first")
    ap.add_argument("--graphs", action="store_true", help="also time every call replayed from a CUDA graph")
    ap.add_argument("--masks", action="store_true", help="only the decode steps with a left-padding mask")
    args = ap.parse_args(argv)
    dev, D = "cuda", args.d
    if args.overhead:
        overhead()
    if args.sweep:
        sweep(D)
    rows = []
    if args.masks:
        masked(rows, args.graphs)
    for n, (B, Hq, Hkv, Nq, Nk, causal) in enumerate([] if args.masks else SHAPES):
        torch.manual_seed(n)
        q = torch.randn(B, Hq, Nq, D, dtype=torch.float16, device=dev)
        k, v = (torch.randn(B, Hkv, Nk, D, dtype=torch.float16, device=dev) for _ in range(2))
        kv_bytes = 2 * k.numel() * 2
        case = f"B={B} Hq/Hkv={Hq}/{Hkv} Nq={Nq} Nk={Nk // 1024}k" + (" causal" if causal else "")
        print(f"[{n + 1}/{len(SHAPES)}] {case}", flush=True)
        times = {}
        for name in ("flash", "cudnn", "efficient"):
            try:
                times[f"SDPA {name}"] = bench_ms(lambda f=sdpa_fn(name): f(q, k, v, causal))
            except RuntimeError as e:  # a backend that does not take this shape
                print(f"  SDPA {name}: {str(e).splitlines()[0][:80]}", flush=True)
        best = min(times.values())
        for name, f in OURS.items():
            times[name] = bench_ms(lambda f=f: f(q, k, v, causal))
        if args.graphs:  # both sides without host launch costs, as a serving loop runs them
            g_sdpa = {n: graph_ms(lambda f=sdpa_fn(n.split()[1]): f(q, k, v, causal)) for n in times if n.startswith("SDPA")}
            best_graph = min(g_sdpa.values())
            for name, f in list(OURS.items())[:2]:
                ms = graph_ms(lambda f=f: f(q, k, v, causal))
                r = dict(case=case, impl=f"{name} (CUDA graph)", ms=round(ms, 4),
                         kv_gbps=round(kv_bytes / (ms * 1e-3) / 1e9, 1), x_best_sdpa=round(best_graph / ms, 3))
                rows.append(r)
                print(f"  {r['impl']:16s} {ms:8.4f} ms  {r['x_best_sdpa']:.2f}x best SDPA (graph {best_graph:.4f} ms)",
                      flush=True)
        for name, ms in times.items():
            r = dict(case=case, impl=name, ms=round(ms, 4), kv_gbps=round(kv_bytes / (ms * 1e-3) / 1e9, 1),
                     x_best_sdpa=round(best / ms, 3))
            rows.append(r)
            print(f"  {name:16s} {ms:8.4f} ms {r['kv_gbps']:8.1f} GB/s  {r['x_best_sdpa']:.2f}x best SDPA", flush=True)
        q = k = v = None  # free before the next shape
    from experiments.outputs import report_by_case

    report_by_case(rows, args.out, "decode_masks" if args.masks else "decode", "Decode: ours vs SDPA (same run)",
                   ["case", "impl", "ms", "kv_gbps", "x_best_sdpa"], "speed / best SDPA backend", "Decode on the H100")

if __name__ == "__main__":
    main()
