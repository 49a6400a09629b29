"""sage2's K/V pass alone (sage2.cuda.quantize_kv, csrc/sage2_sm90/kv_pass.cu), GPU time per call:
its persistent kernel against one thread block cluster per head, at each cluster size that holds
the head, and the size it chooses. B=4, H=32, fp16, as in a sage2 CUDA call (zero_nonfinite, per-thread
INT8 K, E4M3 V in the wgmma key order). HBM bytes: K and V read once and their codes written,
1.5 x 2 x B H N D x 2 bytes (the TB/s column).

    python -m experiments.bench_kv_pass [--shapes D:N ...] [--rounds R]
"""
import argparse
import os

import torch

from common.timing import bench_ms
from sage2 import cuda as sc

DEFAULT_SHAPES = [(128, 2048), (128, 4096), (128, 8192), (128, 16384), (64, 2048), (64, 8192)]
SIZES = ["persistent", "1", "2", "4", "8", "16", ""]  # "": the pass's own choice


def one_pass(k, v, bufs):
    for b in bufs:
        b.zero_()
    return sc.quantize_kv(k, v, bits=8, granularity="per_thread", zero_nonfinite=True, first_bad=bufs[2],
                          counters=bufs[0], v_amax=bufs[1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", help="D:N, e.g. 128:2048")
    ap.add_argument("--rounds", type=int, default=2, help="times through the sizes (machines are noisy)")
    args = ap.parse_args(argv)
    shapes = [tuple(int(x) for x in s.split(":")) for s in args.shapes] if args.shapes else DEFAULT_SHAPES
    B, H = 4, 32
    has_plan = hasattr(sc, "kv_pass_plan")  # (an older checkout has the persistent kernel only)
    rows = []
    for d, n in shapes:
        k = torch.randn(B, H, n, d, device="cuda", dtype=torch.float16) + 0.5
        v = torch.randn(B, H, n, d, device="cuda", dtype=torch.float16)
        bufs = [torch.zeros(x, dtype=torch.int32, device="cuda") for x in (sc.kv_counter_entries(B, H), B * H * d, B * H)]
        fills = bench_ms(lambda: [b.zero_() for b in bufs], rep_ms=50) * 1e3  # the zero fills the timing includes
        gbytes = 1.5 * 2 * B * H * n * d * 2 / 1e9
        for r in range(args.rounds):
            for size in SIZES if has_plan else ["persistent"]:
                os.environ["SAGE2_SM90_KV_CLUSTER"] = size
                try:
                    plan = sc.kv_pass_plan(n, d, k.device) if has_plan else (0, 0)
                except ValueError:
                    continue  # this cluster size cannot hold the head
                shape = f"{plan[0]}x{plan[1]}" if plan[0] else "persistent"
                label = f"chosen: {shape}" if size == "" else shape
                us = bench_ms(lambda: one_pass(k, v, bufs), rep_ms=100) * 1e3 - fills
                rows.append((d, n, r, label, us, gbytes / (us * 1e-6) / 1e3))
                print(f"D={d} N={n} round {r}: {label}: {us:.1f} us ({rows[-1][-1]:.2f} TB/s)", flush=True)
        os.environ.pop("SAGE2_SM90_KV_CLUSTER", None)
        k = v = None  # (released before the next size)
        torch.cuda.empty_cache()
    print("\nD N | kernel | us per round | TB/s (best)")
    for d, n in shapes:
        labels = dict.fromkeys(lab for (dd, nn, _, lab, _, _) in rows if (dd, nn) == (d, n))
        for lab in labels:
            runs = [(us, tb) for (dd, nn, _, lb, us, tb) in rows if (dd, nn, lb) == (d, n, lab)]
            print(f"{d} {n} | {lab} | {' / '.join(f'{us:.1f}' for us, _ in runs)} | {max(tb for _, tb in runs):.2f}")


if __name__ == "__main__":
    main()
