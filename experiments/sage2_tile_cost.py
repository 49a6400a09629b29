"""Where sage2's Hopper kernel (csrc/sage2_sm90) spends a work tile's time beyond its KV tiles.

    python -m experiments.sage2_tile_cost fit [--paths kernel pass]
    python -m experiments.sage2_tile_cost trace [--seqlens 8192 2048]

``fit`` times the attention kernel alone (inputs quantized once; D=128, non-causal, B=4, H=32) at
pairs of query and key lengths and fits T = rounds x (X + kv_tiles x c): c is one 128-key tile's
cost, X a work tile's beyond its keys (its Q, its first and last sections, its epilogue), in us.
``--paths``: Q quantized in the kernel and/or by the pass (``SAGE2_SM90_Q``).

``trace`` builds the kernel with ``-DSAGE2_TRACE`` (its own cache entry) and runs it once per
length in a child process: consumer warp 0's lane 0 of CTA 0 records ``clock64()`` at each phase of
every work tile, and the kernel's launch prints them. The table gives the median cycles per phase
and consumer (the first work tile left out): gap (from the last tile's end), q (Q's quantization or
scales), first (the first section), loop (the other sections), turn (the last turn wait), last_pv,
epilogue. csrc/NOTES.md (v13.3) has what these found.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import subprocess
import sys

PHASES = ["gap", "q", "first", "loop", "turn", "last_pv", "epilogue"]
FIT_PAIRS = [(16384, 16384), (8192, 16384), (2048, 16384), (8192, 8192), (8192, 4096), (8192, 2048)]
BLOCK_M, BLOCK_N = 128, 128  # D=128: query rows per work tile, keys per KV tile


def fit_tile_cost(points):
    """Least squares of ``us_per_work_tile = X + kv_tiles * c`` over ``[(kv_tiles, us), ...]``;
    returns (X, c)."""
    n = len(points)
    sx = sum(x for x, _ in points)
    sy = sum(y for _, y in points)
    sxx = sum(x * x for x, _ in points)
    sxy = sum(x * y for x, y in points)
    det = n * sxx - sx * sx
    if n < 2 or det == 0:
        raise ValueError("fit_tile_cost needs points at two or more KV lengths")
    c = (n * sxy - sx * sy) / det
    return (sy - c * sx) / n, c


_TRACE_LINE = re.compile(r"SAGE2_TRACE consumer (\d+) work_tile (\d+) kv_tiles (\d+) \| (.*)")


def summarize_trace(text: str) -> dict[int, dict[str, float]]:
    """The median cycles of each phase per consumer over the trace lines in ``text`` (the first work
    tile of each consumer left out: it includes the launch)."""
    rows: dict[int, list[dict[str, int]]] = {}
    for line in text.splitlines():
        m = _TRACE_LINE.match(line.strip())
        if not m:
            continue
        consumer, tile = int(m.group(1)), int(m.group(2))
        fields = dict(part.split() for part in m.group(4).split(" | "))
        if tile > 0:
            rows.setdefault(consumer, []).append({k: int(v) for k, v in fields.items()})
    return {c: {p: statistics.median(r[p] for r in rs) for p in PHASES} for c, rs in sorted(rows.items())}


def _kernel_ms(nq: int, nk: int, q_path: str) -> float:
    import torch

    from common.timing import bench_ms
    from experiments.bench_sage2_cuda import kernel_only

    os.environ["SAGE2_SM90_Q"] = q_path
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(4, 32, nq, 128, device="cuda", generator=g, dtype=torch.float16)
    k = (torch.randn(4, 32, nk, 128, device="cuda", generator=g) + 3 * torch.randn(1, 32, 1, 128, device="cuda", generator=g)).half()
    v = torch.randn(4, 32, nk, 128, device="cuda", generator=g, dtype=torch.float16)
    return bench_ms(kernel_only(q, k, v, False, "cuda"), rep_ms=150)


def run_fit(paths) -> None:
    import torch

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for path in paths:
        points = []
        for nq, nk in FIT_PAIRS:
            ms = _kernel_ms(nq, nk, path)
            rounds = 4 * 32 * math.ceil(nq / BLOCK_M) / sms
            points.append((nk / BLOCK_N, ms * 1e3 / rounds))
            print(f"Q by {path:6s} Nq={nq:5d} Nk={nk:5d}: {ms:7.3f} ms, {points[-1][1]:7.2f} us per work tile", flush=True)
        x, c = fit_tile_cost(points)
        print(f"Q by {path}: X = {x:.2f} us per work tile, c = {c:.3f} us per KV tile (X = {x / c:.1f} KV tiles)\n")


def run_trace_child(seqlens) -> None:
    import torch

    from experiments.bench_sage2_cuda import kernel_only

    for n in seqlens:
        q, k, v = (torch.randn(4, 32, n, 128, device="cuda", dtype=torch.float16) for _ in range(3))
        f = kernel_only(q, k + 3, v, False, "cuda")
        f()  # the build and the first launch
        torch.cuda.synchronize()
        print(f"=== N={n}", flush=True)
        f()
        torch.cuda.synchronize()
        print("=== end", flush=True)


def run_trace(seqlens) -> None:
    env = dict(os.environ, SAGE_NVCC_FLAGS=(os.environ.get("SAGE_NVCC_FLAGS", "") + " -DSAGE2_TRACE").strip())
    done = subprocess.run([sys.executable, "-m", "experiments.sage2_tile_cost", "trace-child", "--seqlens",
                           *map(str, seqlens)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the traced run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    out = done.stdout
    for section in out.split("=== N=")[1:]:
        n, body = section.split("\n", 1)
        body = body.split("=== end")[0]  # (the next length's first launch prints after it)
        print(f"N={n}: median cycles per work tile (consumer warp 0 of CTA 0)")
        for consumer, phases in summarize_trace(body).items():
            print(f"  consumer {consumer}: " + " | ".join(f"{p} {phases[p]:.0f}" for p in PHASES))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["fit", "trace", "trace-child"])
    ap.add_argument("--paths", nargs="+", choices=["kernel", "pass"], default=["kernel", "pass"])
    ap.add_argument("--seqlens", nargs="+", type=int, default=[8192, 2048])
    args = ap.parse_args(argv)
    if args.mode == "fit":
        run_fit(args.paths)
    elif args.mode == "trace":
        run_trace(args.seqlens)
    else:
        run_trace_child(args.seqlens)


if __name__ == "__main__":
    main()
