"""sage2's Hopper CUDA kernel against its Triton kernel, cuDNN and FA2, in one run.

    python -m experiments.bench_sage2_cuda [--seqlens 2048 8192 16384] [--dims 64 128] [--causal both]

Per shape (B=4, H=32, fp16): TOPS of the whole call (quantization included) and of the attention
kernel alone on pre-quantized inputs (the CUDA kernel with its own quantization of Q), and each whole call's ratio to cuDNN timed on the same
inputs. Accuracy (cosine, relative L1) of the CUDA and Triton calls against exact attention on the
first 1024 queries. Writes ``--out``/results.csv and tops.png (as bench_speed does) and prints a table.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import sage2
from common.inputs import make_qkv
from common.int_qk import padded_head_dim, quantize_qk
from common.metrics import accuracy
from common.reference import attention_reference
from common.timing import attention_flops, bench_ms, tops
from experiments.baselines import sdpa
from sage2.cuda import q_in_kernel
from sage2.interface import K_BLOCK, Q_BLOCK, WARP_Q
from sage2.quant_v import P_SCALE, quantize_v


def kernel_only(q, k, v, causal, backend):
    """A closure running only the attention kernel on inputs quantized once (where the CUDA kernel
    quantizes Q itself, sage2.cuda.q_in_kernel, it is timed with it)."""
    d = q.shape[-1]
    dp = padded_head_dim(d)
    cuda = backend == "cuda"
    qk = quantize_qk(q, k, sm_scale=d ** -0.5, granularity="per_thread", q_block=Q_BLOCK, k_block=K_BLOCK,
                     warp_rows=WARP_Q, backend="triton",
                     quantize_q=not (cuda and q_in_kernel(is_causal=causal, head_dim=d, seqlen_q=q.shape[2])))
    qv = quantize_v(v, "fp8_e4m3", smooth_v=False, backend="triton", dp=dp, npad_multiple=128 if cuda else 16,
                    wgmma_key_order=cuda)
    out = torch.empty_like(q)
    if cuda:
        from sage2.cuda import launch

        counter = torch.zeros(1, dtype=torch.int32, device=q.device)  # (the kernel leaves it at zero)
        return lambda: launch(q, qk, qv, out, granularity="per_thread", bits=8, is_causal=causal, return_lse=False,
                              tile_counter=counter)
    from sage2.kernel import PV_TWO_LEVEL, launch

    return lambda: launch(qk, qv, out, delta_s=None, is_causal=causal, pv_dtype="fp8_e4m3", pv_mode=PV_TWO_LEVEL,
                          log2_pscale=math.log2(P_SCALE["fp8_e4m3"]), return_lse=False, k_per_thread=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--dims", type=int, nargs="+", default=[128])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[2048, 8192, 16384])
    ap.add_argument("--causal", choices=["no", "yes", "both"], default="no")
    ap.add_argument("--rep-ms", type=float, default=200)
    ap.add_argument("--kernels", action="store_true", help="device time of each kernel of one CUDA-backend call")
    ap.add_argument("--out", default="bench_sage2_cuda_out")
    args = ap.parse_args(argv)
    causals = {"no": [False], "yes": [True], "both": [False, True]}[args.causal]
    whole = {
        "cuda": lambda q, k, v, c: sage2.sageattn(q, k, v, is_causal=c, backend="cuda"),
        "triton": lambda q, k, v, c: sage2.sageattn(q, k, v, is_causal=c, backend="triton"),
        "cudnn": lambda q, k, v, c, f=sdpa("sdpa_cudnn"): f(q, k, v, is_causal=c),
        "fa2": lambda q, k, v, c, f=sdpa("sdpa_flash"): f(q, k, v, is_causal=c),
    }
    rows, t0 = [], time.time()
    for d in args.dims:
        for causal in causals:
            for n in args.seqlens:
                q, k, v = make_qkv(args.batch, args.heads, n, d, kind="k_bias", device="cuda", seed=0)
                flops = attention_flops(args.batch, args.heads, n, n, d, causal)
                r = {"D": d, "causal": causal, "N": n}
                for name, fn in whole.items():
                    r[name] = tops(flops, bench_ms(lambda: fn(q, k, v, causal), rep_ms=args.rep_ms))
                for be in ("cuda", "triton"):
                    r[be + "_kernel"] = tops(flops, bench_ms(kernel_only(q, k, v, causal, be), rep_ms=args.rep_ms))
                    nq = min(n, 1024)
                    ref = attention_reference(q[:, :, :nq], k, v, is_causal=causal and nq == n)
                    if not (causal and nq < n):
                        a = accuracy(ref, whole[be](q, k, v, causal)[:, :, :nq])
                        r[be + "_acc"] = f"{a.cos_sim:.5f}/{a.rel_l1:.4f}"
                rows.append(r)
                if args.kernels:
                    from experiments.profile_call import kernel_times

                    print(f"  kernels of one backend='cuda' call, D={d} causal={causal} N={n}:")
                    kernel_times(lambda: whole["cuda"](q, k, v, causal), False, per_kernel=True)
                print(f"D={d} causal={causal} N={n}: " + " ".join(
                    f"{key}={val:.0f}" for key, val in r.items() if isinstance(val, float)), f"({time.time() - t0:.0f}s)", flush=True)
                torch.cuda.empty_cache()
    save(rows, args.out)
    print("\n| D | causal | N | cuda (x cuDNN) | triton (x cuDNN) | cuda kernel | triton kernel | cuDNN | FA2 | cuda acc cos/relL1 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c = r["cudnn"]
        print(f"| {r['D']} | {'yes' if r['causal'] else 'no'} | {r['N']} | {r['cuda']:.0f} ({r['cuda'] / c:.2f}x) | "
              f"{r['triton']:.0f} ({r['triton'] / c:.2f}x) | {r['cuda_kernel']:.0f} | {r['triton_kernel']:.0f} | "
              f"{c:.0f} | {r['fa2']:.0f} | {r.get('cuda_acc', '-')} |")


COLUMNS = {"cuda": "sage2_cuda", "triton": "sage2_triton", "cuda_kernel": "sage2_cuda_kernel_only",
           "triton_kernel": "sage2_triton_kernel_only", "cudnn": "sdpa_cudnn", "fa2": "sdpa_flash"}


def save(rows, out):
    """results.csv and tops.png in bench_speed's long format (one row per kernel and shape)."""
    import os

    from experiments.bench_speed import write_outputs

    os.makedirs(out, exist_ok=True)
    long = [dict(kernel=name, head_dim=r["D"], causal=r["causal"], seqlen=r["N"], tops=r[col])
            for r in rows for col, name in COLUMNS.items()]
    write_outputs(long, out)


if __name__ == "__main__":
    main()
