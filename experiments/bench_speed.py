"""Speed and accuracy of our kernels against SDPA (FLASH, CUDNN, EFFICIENT) and, where installed,
the released sageattention 1.0.6, in the same run.

    python -m experiments.bench_speed                              # every kernel, full table
    python -m experiments.bench_speed --kernels sage1 sdpa_cudnn --seqlens 16384 --dims 128 --causal no

TOPS = 4*B*H*N*N*D / time (halved for causal), timing the whole call including quantization.
Inputs: fp16, q, v ~ randn, k ~ randn + 3*randn(1, H, 1, D) (per-channel bias). Accuracy: the
first 1024 queries against float32 exact attention. Writes CSV (and a PNG plot) to --out.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import torch

import sage1
import sage2
import sage3
from common.inputs import make_qkv
from common.metrics import accuracy
from common.reference import attention_reference
from common.timing import attention_flops, bench_ms, tops
from experiments.baselines import available_baselines


def accuracy_first_queries(fn, q, k, v, causal, n_check=1024):
    """Accuracy of fn on the first n_check queries (with Nq == Nk, causal keeps keys < n_check)."""
    n = min(n_check, q.shape[2])
    qs, ks, vs = (q[:, :, :n], k[:, :, :n], v[:, :, :n]) if causal else (q[:, :, :n], k, v)
    ref = attention_reference(qs, ks, vs, is_causal=causal)
    return accuracy(ref, fn(q, k, v, causal)[:, :, :n])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--causal", choices=["no", "yes", "both"], default="both")
    ap.add_argument("--kernels", nargs="*", default=None, help="subset of kernel names to run")
    ap.add_argument("--rep-ms", type=float, default=300)
    ap.add_argument("--out", default="bench_speed_out")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_speed needs a CUDA GPU (the CPU path is the emulation: see `python -m experiments`)")

    kernels = {
        "sage1": lambda q, k, v, c: sage1.sageattn(q, k, v, is_causal=c),
        "sage2_8b": lambda q, k, v, c: sage2.sageattn(q, k, v, is_causal=c),  # the CUDA kernel on sm_90
        "sage2_8b_triton": lambda q, k, v, c: sage2.sageattn(q, k, v, is_causal=c, backend="triton"),
        "sage2_4b": lambda q, k, v, c: sage2.sageattn(q, k, v, is_causal=c, qk_dtype="int4"),
        "sage3_fp4_emulated": lambda q, k, v, c: sage3.sageattn(q, k, v, is_causal=c),  # the CUDA kernel on sm_90
        "sage3_fp4_emulated_triton": lambda q, k, v, c: sage3.sageattn(q, k, v, is_causal=c, backend="triton"),
    }
    kernels.update({n: (lambda f: lambda q, k, v, c: f(q, k, v, is_causal=c))(f) for n, f in available_baselines().items()})
    if args.kernels:
        kernels = {n: f for n, f in kernels.items() if n in args.kernels}
    causals = {"no": [False], "yes": [True], "both": [False, True]}[args.causal]
    os.makedirs(args.out, exist_ok=True)
    rows = []
    total = len(args.dims) * len(causals) * len(args.seqlens)
    t0, done = time.time(), 0
    for d in args.dims:
        for causal in causals:
            for n in args.seqlens:
                q, k, v = make_qkv(args.batch, args.heads, n, d, kind="k_bias", dtype=torch.float16, device="cuda", seed=0)
                flops = attention_flops(args.batch, args.heads, n, n, d, causal)
                for name, fn in kernels.items():
                    try:
                        ms = bench_ms(lambda: fn(q, k, v, causal), rep_ms=args.rep_ms)
                        acc = accuracy_first_queries(fn, q, k, v, causal)
                        rows.append(dict(kernel=name, head_dim=d, causal=causal, seqlen=n, ms=ms, tops=tops(flops, ms),
                                         cos_sim=acc.cos_sim, rel_l1=acc.rel_l1, rmse=acc.rmse))
                    except Exception as e:  # e.g. out of memory for a baseline: record and go on
                        rows.append(dict(kernel=name, head_dim=d, causal=causal, seqlen=n, ms=float("nan"), tops=float("nan"),
                                         cos_sim=float("nan"), rel_l1=float("nan"), rmse=float("nan"), error=repr(e)[:120]))
                    torch.cuda.empty_cache()
                done += 1
                print(f"[{done}/{total}] D={d} causal={causal} N={n}: " + "  ".join(
                    f"{r['kernel']} {r['tops']:.0f}" for r in rows if (r['head_dim'], r['causal'], r['seqlen']) == (d, causal, n)),
                    f"({time.time() - t0:.0f}s)", flush=True)
    write_outputs(rows, args.out)
    print_table(rows)


def write_outputs(rows, out):
    keys = ["kernel", "head_dim", "causal", "seqlen", "ms", "tops", "cos_sim", "rel_l1", "rmse", "error"]
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in keys})
    try:
        plot_tops(rows, os.path.join(out, "tops.png"))
    except ImportError:
        print("(matplotlib not installed: no plot)")


def plot_tops(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["head_dim"], r["causal"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    names = list(dict.fromkeys(r["kernel"] for r in rows))
    for ax, (d, c) in zip(axes[0], groups):
        ns = sorted({r["seqlen"] for r in rows if (r["head_dim"], r["causal"]) == (d, c)})
        w = 0.8 / len(names)
        for i, name in enumerate(names):
            ys = [next((r["tops"] for r in rows if (r["kernel"], r["head_dim"], r["causal"], r["seqlen"]) == (name, d, c, n)), 0) for n in ns]
            ax.bar([j + i * w for j in range(len(ns))], ys, w, label=name)
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(ns))], [f"{n // 1024}K" for n in ns])
        ax.set_title(f"head_dim={d}, {'causal' if c else 'non-causal'}")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TOPS")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_table(rows):
    ref = {(r["head_dim"], r["causal"], r["seqlen"]): r["tops"] for r in rows if r["kernel"] == "sdpa_cudnn"}
    print(f"\n{'kernel':22s} {'D':>4s} {'causal':>6s} {'N':>6s} {'TOPS':>7s} {'x cuDNN':>8s} {'cos':>8s} {'relL1':>7s}")
    for r in rows:
        c = ref.get((r["head_dim"], r["causal"], r["seqlen"]))
        ratio = r["tops"] / c if c else float("nan")
        print(f"{r['kernel']:22s} {r['head_dim']:4d} {str(r['causal']):>6s} {r['seqlen']:6d} {r['tops']:7.1f} {ratio:8.3f} "
              f"{r['cos_sim']:8.5f} {r['rel_l1']:7.4f}")


if __name__ == "__main__":
    main()
