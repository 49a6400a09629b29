"""The GPU timeline of one whole ``sage2.sageattn(..., backend="cuda")`` call: every kernel (and
memset/copy) with its start from the call's first kernel, its duration and the gap before it
(negative: it started before the one before it ended, as the attention kernel does after the K/V
pass under programmatic dependent launch). B=4, H=32, fp16, k_bias inputs.

    python -m experiments.call_timeline [--seqlens 2048 8192] [--dim 128] [--causal both]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

import sage2
from common.inputs import make_qkv


def timeline(fn, calls: int = 3):
    """[(name, start us from the last call's first kernel, duration us)] of fn's last call."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        ev = [e for e in json.load(f)["traceEvents"] if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")]
    ev.sort(key=lambda e: e["ts"])
    call = ev[-(len(ev) // calls):]
    return [(e["name"], e["ts"] - call[0]["ts"], e["dur"]) for e in call]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--causal", choices=["no", "yes", "both"], default="both")
    args = ap.parse_args(argv)
    for n in args.seqlens:
        q, k, v = make_qkv(4, 32, n, args.dim, kind="k_bias", device="cuda", seed=0)
        for causal in {"no": [False], "yes": [True], "both": [False, True]}[args.causal]:
            rows = timeline(lambda q=q, k=k, v=v, c=causal: sage2.sageattn(q, k, v, is_causal=c, backend="cuda"))
            end = max(s + d for _, s, d in rows)
            print(f"N={n} D={args.dim} causal={int(causal)}: {len(rows)} GPU ops, call span {end:.1f} us", flush=True)
            prev_end = None
            for name, start, dur in rows:
                gap = "" if prev_end is None else f"gap {start - prev_end:7.1f}"
                print(f"   start {start:8.1f} dur {dur:8.1f} {gap:>12}  {name[:70]}")
                prev_end = start + dur
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
