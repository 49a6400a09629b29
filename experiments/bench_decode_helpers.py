"""Decode's helper programs (common.decode.cuda_plan, csrc/decode/split_kv.cu) on and off, replayed
from CUDA graphs, x cuDNN in the same process (Nq = 1, D = 128, fp16):

    python -m experiments.bench_decode_helpers [--out DIR]

With one program per KV head (more KV heads than half the programs that fit at once) the owners run
in waves; between one and 1.5 waves the last one left most SMs idle. The shapes sweep that range,
then two of 2 waves and the single-wave GQA cases, where the plan has no helpers.
"""

from __future__ import annotations

import argparse
import os

import torch

import sage1
import sage2
from common import decode
from common.timing import bench_ms, graph_replay
from experiments.bench_decode import sdpa_fn

# (B, Hq, Hkv, Nk)
SHAPES = [(5, 32, 32, 8192), (9, 32, 32, 4096), (12, 32, 32, 4096), (40, 32, 8, 4096), (36, 32, 8, 8192),
          (8, 32, 32, 8192), (16, 32, 32, 4096), (4, 32, 8, 16384), (1, 32, 8, 131072)]
GENS = {"sage1": lambda q, k, v: sage1.sageattn(q, k, v), "sage2_8b": lambda q, k, v: sage2.sageattn(q, k, v),
        "sage2_4b": lambda q, k, v: sage2.sageattn(q, k, v, qk_dtype="int4")}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=None, help="write decode_helpers.md and .png here")
    args = ap.parse_args(argv)
    head = "| B | Hq/Hkv | Nk | KV heads | helpers | cuDNN us | " + " | ".join(GENS) + " | " + \
        " | ".join(f"{g} helpers off" for g in GENS) + " |"
    lines = [head, "|" + "---|" * (6 + 2 * len(GENS))]
    rows = []
    for n, (B, Hq, Hkv, Nk) in enumerate(SHAPES):
        print(f"[{n + 1}/{len(SHAPES)}] B={B} {Hq}/{Hkv} Nk={Nk}", flush=True)
        torch.manual_seed(0)
        q = torch.randn(B, Hq, 1, 128, dtype=torch.float16, device="cuda")
        k, v = (torch.randn(B, Hkv, Nk, 128, dtype=torch.float16, device="cuda") for _ in range(2))
        cudnn = bench_ms(graph_replay(lambda: sdpa_fn("cudnn")(q, k, v, False)), rep_ms=300)
        tiles = -(-Nk // decode.DECODE_TILE)
        _, helpers = decode.cuda_plan(B * Hkv, tiles, decode.split_tiles(B * Hkv, 1, Nk, q.device), True, q.device)
        ratio = {}
        for off in (False, True):
            saved, decode.HELPERS_PER_KV_HEAD = decode.HELPERS_PER_KV_HEAD, 0 if off else decode.HELPERS_PER_KV_HEAD
            try:
                for g, fn in GENS.items():
                    ratio[g, off] = cudnn / bench_ms(graph_replay(lambda: fn(q, k, v)), rep_ms=300)
            finally:
                decode.HELPERS_PER_KV_HEAD = saved
        rows.append((f"B={B} {Hq}/{Hkv}\n{Nk // 1024}k", ratio))
        lines.append(f"| {B} | {Hq}/{Hkv} | {Nk // 1024}k | {B * Hkv} | {helpers} | {cudnn * 1e3:.1f} | "
                     + " | ".join(f"{ratio[g, off]:.3f}x" for off in (False, True) for g in GENS) + " |")
        print(lines[-1], flush=True)
    print("\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "decode_helpers.md"), "w") as f:
            f.write(f"Decode, CUDA graphs, x cuDNN (same process), {torch.cuda.get_device_name()}\n\n")
            f.write("\n".join(lines) + "\n")
        plot(rows, os.path.join(args.out, "decode_helpers.png"))


def plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.13
    for j, g in enumerate(GENS):
        for off in (True, False):
            xs = [i + (2 * j + (0 if off else 1) - 2.5) * width for i in range(len(rows))]
            ax.bar(xs, [r[g, off] for _, r in rows], width, label=f"{g}{' helpers off' if off else ''}",
                   alpha=0.45 if off else 1.0, color=f"C{j}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(rows)), [name for name, _ in rows], fontsize=8)
    ax.set_ylabel("x cuDNN (CUDA graphs)")
    ax.set_ylim(0.6, 1.1)
    ax.legend(ncol=3, fontsize=8)
    ax.set_title("Decode (Nq=1, D=128): helper programs for one-program-per-KV-head plans")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
