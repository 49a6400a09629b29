"""Time builds of sage2's Hopper kernel (csrc/sage2_sm90) that differ in compile-time switches, each
against cuDNN in the same process (each variant runs in its own process, with its own build).

    python -m experiments.sage2_cuda_variants "base:" "try:-DMY_SWITCH=1" [--rounds 2]

A variant is ``name:nvcc flags`` (the flags go to ``$SAGE_NVCC_FLAGS``, see common/build.py): a patch
under test puts its change behind a ``#ifndef`` switch in csrc/sage2_sm90/attention.cu (v11's A/B
used SAGE2_EXP_ONE_FMA and SAGE2_ROWSUM_MMA, both since made unconditional; csrc/NOTES.md). The
builds run in parallel first; then each variant times, per shape (B=4, H=32, fp16, k_bias inputs),
the whole ``sage2.sageattn(..., backend="cuda")`` call, the attention kernel alone on pre-quantized
inputs (timed right after the whole call: it swings by ~10%, so compare whole calls), and cuDNN, and measures the whole call's accuracy (cosine, relative L1) against exact
attention on the first 1024 queries. ``--rounds 2`` runs every variant twice, alternating, so that
a drift of the machine shows. Ratios are within one process. The table is printed last.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

SHAPES = [(128, False, 16384), (128, False, 8192), (128, False, 2048), (64, False, 16384), (128, True, 16384)]


def time_one(rep_ms: float) -> None:
    import torch

    import sage2
    from common.metrics import accuracy
    from common.reference import attention_reference
    from common.timing import attention_flops, bench_ms, tops
    from experiments.baselines import sdpa
    from experiments.bench_sage2_cuda import kernel_only

    cudnn = sdpa("sdpa_cudnn")
    for d, causal, n in SHAPES:
        torch.cuda.empty_cache()
        torch.manual_seed(0)
        q, k, v = (torch.randn(4, 32, n, d, dtype=torch.float16, device="cuda") for _ in range(3))
        k += 3.0 * torch.randn(1, 32, 1, d, dtype=torch.float16, device="cuda")  # common.inputs' k_bias
        flops = attention_flops(4, 32, n, n, d, causal)
        whole = tops(flops, bench_ms(lambda: sage2.sageattn(q, k, v, is_causal=causal, backend="cuda"), rep_ms=rep_ms))
        kern = tops(flops, bench_ms(kernel_only(q, k, v, causal, "cuda"), rep_ms=rep_ms))
        base = tops(flops, bench_ms(lambda: cudnn(q, k, v, is_causal=causal), rep_ms=rep_ms))
        acc = "-"
        if not causal:
            ref = attention_reference(q[:, :, :1024], k, v)
            a = accuracy(ref, sage2.sageattn(q, k, v, backend="cuda")[:, :, :1024])
            acc = f"{a.cos_sim:.6f}/{a.rel_l1:.5f}"
        print(f"RESULT D={d} {'causal' if causal else 'full'} N={n // 1024}k | whole {whole:.0f} ({whole / base:.3f}x) "
              f"| kernel {kern:.0f} ({kern / base:.3f}x) | cuDNN {base:.0f} | cos/relL1 {acc}", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="*", default=["base:"])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--rep-ms", type=float, default=300)
    ap.add_argument("--time", action="store_true", help=argparse.SUPPRESS)  # child
    args = ap.parse_args(argv)
    if args.time:
        return time_one(args.rep_ms)
    parsed = [v.split(":", 1) for v in args.variants]
    for v, parts in zip(args.variants, parsed):
        if len(parts) != 2 or not parts[0]:
            ap.error(f"a variant is 'name:nvcc flags' (flags may be empty), got {v!r}")
    from common.build import build_flag_variants

    t0 = time.time()
    env_of = build_flag_variants(dict(parsed))
    lines = []
    for rnd in range(args.rounds):
        for name, flags in parsed:
            if name not in env_of:
                continue
            print(f"[time {name}, round {rnd + 1}] flags '{flags}' ({time.time() - t0:.0f}s)", flush=True)
            out = subprocess.run([sys.executable, "-m", "experiments.sage2_cuda_variants", "--time", "--rep-ms",
                                  str(args.rep_ms)], env=env_of[name], capture_output=True, text=True)
            found = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")]
            if out.returncode or not found:
                print(out.stdout[-2000:], out.stderr[-3000:])
            for ln in found:
                print(f"  {ln[7:]}", flush=True)
            lines += [f"{name:10s} r{rnd + 1} {ln[7:]}" for ln in found]
    print("\n".join(sorted(lines, key=lambda ln: ln[ln.index("D="):ln.index("|")])))  # by shape


if __name__ == "__main__":
    main()
