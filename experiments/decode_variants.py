"""Time builds of the CUDA decode kernel that differ in compile-time settings, against cuDNN in the
same process (each variant runs in its own process, with its own build).

    python -m experiments.decode_variants "base::2" "s2x3:-DSAGE_DECODE_STAGES=2 -DSAGE_DECODE_MIN_BLOCKS=3:3"

A variant is ``name:nvcc flags:programs per SM`` (the flags go to ``$SAGE_NVCC_FLAGS``, see
common/build.py; programs per SM set the split plan, common.decode.PROGRAMS_PER_SM; a trailing ``s``,
as in ``2s``, runs the static split instead of dynamic tiles, common.decode.DYNAMIC_TILES; a trailing
``q`` gives Q smoothing dynamic tiles too, common.decode.DYNAMIC_TILES_SMOOTH_Q). The builds
run in parallel first; then each variant times sage1, sage2 (8-bit) and sage2 INT4 (Q smoothing)
decode, replayed from a CUDA graph, on a few shapes, next to cuDNN's, and the device time of each
kernel of cuDNN's and sage1's call at 16k. Ratios are within one process, so within one run.
``--kernels``: each kernel's device time of one call at 16k keys (torch.profiler).
"""

from __future__ import annotations

import argparse
import subprocess
import sys

SHAPES = [(4, 32, 8, 16384), (4, 32, 8, 32768), (1, 32, 8, 131072), (16, 32, 32, 4096)]  # B, Hq, Hkv, Nk


def time_one(per_sm: str) -> None:
    import torch

    import sage1
    import sage2
    from common import decode
    from common.timing import bench_ms, graph_replay
    from experiments.bench_decode import sdpa_fn

    decode.PROGRAMS_PER_SM = int(per_sm.rstrip("sq"))
    decode.DYNAMIC_TILES = not per_sm.endswith("s")
    decode.DYNAMIC_TILES_SMOOTH_Q = per_sm.endswith("q")
    for B, Hq, Hkv, Nk in SHAPES:
        torch.manual_seed(0)
        q = torch.randn(B, Hq, 1, 128, dtype=torch.float16, device="cuda")
        k, v = (torch.randn(B, Hkv, Nk, 128, dtype=torch.float16, device="cuda") for _ in range(2))
        cudnn = bench_ms(graph_replay(lambda: sdpa_fn("cudnn")(q, k, v, False)))
        s1 = bench_ms(graph_replay(lambda: sage1.sageattn(q, k, v)))
        s2 = bench_ms(graph_replay(lambda: sage2.sageattn(q, k, v)))
        s4 = bench_ms(graph_replay(lambda: sage2.sageattn(q, k, v, qk_dtype="int4")))
        print(f"RESULT B={B} {Hq}/{Hkv} Nk={Nk // 1024}k cudnn {cudnn * 1e3:.1f} us | sage1 {s1 * 1e3:.1f} us "
              f"{cudnn / s1:.3f}x | sage2_8b {s2 * 1e3:.1f} us {cudnn / s2:.3f}x | sage2_4b {s4 * 1e3:.1f} us "
              f"{cudnn / s4:.3f}x", flush=True)
    kernel_breakdown(("cudnn", "sage1"), prefix="RESULT ")


def kernel_breakdown(names=("cudnn", "sage1", "sage2_8b", "sage2_4b"), prefix: str = "") -> None:
    """Device time of each kernel of one call (torch.profiler, mean of 20 calls) at 16k keys."""
    import torch

    import sage1
    import sage2
    from experiments.bench_decode import sdpa_fn

    torch.manual_seed(0)
    q = torch.randn(4, 32, 1, 128, dtype=torch.float16, device="cuda")
    k, v = (torch.randn(4, 8, 16384, 128, dtype=torch.float16, device="cuda") for _ in range(2))
    fns = {"cudnn": lambda: sdpa_fn("cudnn")(q, k, v, False), "sage1": lambda: sage1.sageattn(q, k, v),
           "sage2_8b": lambda: sage2.sageattn(q, k, v), "sage2_4b": lambda: sage2.sageattn(q, k, v, qk_dtype="int4")}
    for name in names:
        fn = fns[name]
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
        for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total):
            if e.device_time_total > 0 and e.self_cpu_time_total == 0:
                print(f"{prefix}KERNEL {name:9s} {e.device_time_total / e.count:8.1f} us x{e.count // 20} {e.key[:60]}",
                      flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("variants", nargs="*", default=["base::2"])
    ap.add_argument("--time", default=None, help=argparse.SUPPRESS)  # child: programs per SM [s]
    ap.add_argument("--kernels", action="store_true", help="only: each kernel's device time at 16k keys")
    args = ap.parse_args(argv)
    if args.kernels:
        return kernel_breakdown()
    if args.time is not None:
        return time_one(args.time)
    parsed = [v.split(":") for v in args.variants]
    for v, parts in zip(args.variants, parsed):
        if len(parts) != 3 or not parts[0] or not parts[2].rstrip("sq").isdigit():
            ap.error(f"a variant is 'name:nvcc flags:programs per SM[s|q]' (flags may be empty), got {v!r}")
    from common.build import build_flag_variants

    env_of = build_flag_variants({name: flags for name, flags, _ in parsed})
    lines = []
    for name, flags, per_sm in parsed:
        if name not in env_of:
            continue
        print(f"[time {name}] flags '{flags}', {per_sm} programs/SM", flush=True)
        out = subprocess.run([sys.executable, "-m", "experiments.decode_variants", "--time", per_sm],
                             env=env_of[name], capture_output=True, text=True)
        found = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")]
        if out.returncode or not found:
            print(out.stdout[-2000:], out.stderr[-3000:])
        lines += [f"{name:10s} {ln[7:]}" for ln in found]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
