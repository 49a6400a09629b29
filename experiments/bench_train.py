"""SageBwd (sage3.sageattn_train) on the GPU: forward+backward speed against SDPA's FA2 and cuDNN
backends in the same run, and the gradient accuracy table of the issue (N=4k, D=128).

    python -m experiments.bench_train                       # speed table + accuracy table
    python -m experiments.bench_train --sweep               # kernel configs at N=16k first
    python -m experiments.bench_train --kernels 16384       # each kernel's device time of one step

TOPS = (forward 4*B*H*N^2*D + backward 2.5x that) / time, halved for causal (FlashAttention's count).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

import sage3
import sage3.train_kernel as tk
from common.inputs import make_qkv
from common.metrics import accuracy
from common.reference import attention_reference
from common.timing import attention_flops, bench_ms, tops
from experiments.baselines import sdpa

RESULTS = Path(__file__).parent / "results"


def fwd_bwd(fn, q, k, v, do):
    def step():
        q.grad = k.grad = v.grad = None
        fn(q, k, v).backward(do)
    return step


def impls(causal):
    return {
        "sdpa_flash (FA2)": lambda q, k, v: sdpa("sdpa_flash")(q, k, v, is_causal=causal),
        "sdpa_cudnn": lambda q, k, v: sdpa("sdpa_cudnn")(q, k, v, is_causal=causal),
        "sageattn_train": lambda q, k, v: sage3.sageattn_train(q, k, v, is_causal=causal),
        "sageattn_train atomic dQ": lambda q, k, v: sage3.sageattn_train(q, k, v, is_causal=causal,
                                                                          deterministic=False),
    }


def speed(seqlens, causals, d=128, B=4, H=32):
    rows = []
    for causal in causals:
        for n in seqlens:
            rows.append(speed_row(causal, n, d, B, H))
            torch.cuda.empty_cache()
    return rows


def speed_row(causal, n, d, B, H):
    q, k, v = (t.requires_grad_(True) for t in make_qkv(B, H, n, d, device="cuda", seed=0))
    do = torch.randn_like(q)
    flops = 3.5 * attention_flops(B, H, n, n, d, is_causal=causal)
    res = {}
    for name, fn in impls(causal).items():
        if name.endswith("atomic dQ") and n not in (4096, 16384):
            continue
        res[name] = bench_ms(fwd_bwd(fn, q, k, v, do))
    fwd_only = bench_ms(lambda: sage3.sageattn_train(q, k, v, is_causal=causal))
    fa2, cud, ours = res["sdpa_flash (FA2)"], res["sdpa_cudnn"], res["sageattn_train"]
    print(f"causal={causal} N={n}: FA2 {tops(flops, fa2):.0f}, cuDNN {tops(flops, cud):.0f}, "
          f"sage {tops(flops, ours):.0f} TOPS (fwd {fwd_only:.2f} ms of {ours:.2f}) -> "
          f"{fa2 / ours:.2f}x FA2, {cud / ours:.2f}x cuDNN", flush=True)
    return dict(causal=causal, seqlen=n, **{f"{name} ms": round(ms, 3) for name, ms in res.items()},
                **{f"{name} TOPS": round(tops(flops, ms), 1) for name, ms in res.items()},
                sage_fwd_ms=round(fwd_only, 3), vs_fa2=round(fa2 / ours, 3), vs_cudnn=round(cud / ours, 3))


def grad_accuracy(n=4096, d=128, H=8, kinds=("randn", "k_bias", "v_bias", "sharp", "outliers", "heavy_tail")):
    rows = []
    for kind in kinds:
        q, k, v = make_qkv(1, H, n, d, kind=kind, device="cuda", seed=1)
        do = torch.randn_like(q)
        ref = _grads(lambda a, b, c: attention_reference(a, b, c), q.float(), k.float(), v.float(), do.float())
        for dov in (False, True):
            got = _grads(lambda a, b, c: sage3.sageattn_train(a, b, c, quantize_dov=dov), q, k, v, do)
            row = {"inputs": kind, "quantize_dov": dov}
            for name, r, g in zip(("O", "dQ", "dK", "dV"), ref, got):
                a = accuracy(r, g)
                row[f"{name} cos"], row[f"{name} relL1"] = round(a.cos_sim, 5), round(a.rel_l1, 4)
            rows.append(row)
            print(row, flush=True)
    return rows


def _grads(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    o = fn(q, k, v)
    o.backward(do)
    return o.detach(), q.grad, k.grad, v.grad


def sweep(n=16384, d=128, B=4, H=32):
    q, k, v = (t.requires_grad_(True) for t in make_qkv(B, H, n, d, device="cuda", seed=0))
    do = torch.randn_like(q)
    flops = 3.5 * attention_flops(B, H, n, n, d)
    dp = 128 if d > 64 else 64
    base_f = tk.FWD_CONFIGS[dp]
    cap = tk.FWD_MAXNREG.get(dp)  # every forward config runs under the register cap, if any
    try:
        for cfg in [(128, 4, 2), (128, 8, 2), (128, 4, 3), (128, 8, 3), (64, 4, 2), (64, 4, 3)]:
            tk.FWD_CONFIGS[dp] = cfg
            ms = bench_ms(lambda: sage3.sageattn_train(q, k, v))
            print(f"  fwd config (query tile, warps, stages)={cfg}, maxnreg {cap}: {ms:.2f} ms "
                  f"({tops(flops / 3.5, ms):.0f} TOPS fwd)", flush=True)
    finally:
        tk.FWD_CONFIGS[dp] = base_f
    for table, label in ((tk.BWD_CONFIGS, "dK/dV"), (tk.DQ_CONFIGS, "dQ")):  # one kernel at a time
        base = table[dp]
        for cfg in [(4, 1), (4, 2), (8, 1), (8, 2), (4, 3)]:
            table[dp] = cfg
            try:
                ms = bench_ms(fwd_bwd(lambda a, b, c: sage3.sageattn_train(a, b, c), q, k, v, do))
                print(f"  {label} config (warps, stages)={cfg}: fwd+bwd {ms:.2f} ms ({tops(flops, ms):.0f} TOPS)",
                      flush=True)
            except Exception as e:  # noqa: BLE001 - a config that does not compile is reported, not fatal
                print(f"  {label} config {cfg}: FAILED {type(e).__name__}: {str(e)[:150]}", flush=True)
        table[dp] = base


def kernels(n, causal=False, d=128, B=4, H=32):
    """Device time of each kernel of one fwd+bwd step (torch.profiler): SageBwd, FA2 and cuDNN."""
    from experiments.profile_call import kernel_times

    q, k, v = (t.requires_grad_(True) for t in make_qkv(B, H, n, d, device="cuda", seed=0))
    do = torch.randn_like(q)
    for name, fn in impls(causal).items():
        if name.endswith("atomic dQ"):
            continue
        step = fwd_bwd(fn, q, k, v, do)
        step()  # (compiled and warm)
        print(f"{name}, N={n}, causal={causal}: kernels of one step", flush=True)
        total, _ = kernel_times(step, cpu_ops=False, per_kernel=True)
        print(f"      total {total:.2f} ms", flush=True)


def write(rows, name):
    if not rows:
        return
    RESULTS.mkdir(exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(RESULTS / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    with open(RESULTS / f"{name}.md", "w") as f:
        f.write("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n")
        for r in rows:
            f.write("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |\n")
    print(f"wrote {RESULTS / name}.csv/.md", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-accuracy", action="store_true")
    ap.add_argument("--kernels", type=int, metavar="N", help="only each kernel's device time of one step at N")
    args = ap.parse_args(argv)
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    if args.kernels:
        kernels(args.kernels)
        return
    if args.sweep:
        sweep()
    write(speed(args.seqlens, (False, True)), "sagebwd_speed_h100")
    if not args.no_accuracy:
        write(grad_accuracy(), "sagebwd_grad_accuracy_h100")


if __name__ == "__main__":
    main()
