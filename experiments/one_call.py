"""One attention call (for profilers: ncu, nsys, compute-sanitizer), after one warm-up call.

    python -m experiments.one_call --gen sage2 --backend cuda --seqlen 4096 [--dim 128] [--causal]
    python -m experiments.one_call --gen sage1 --seqlen 1 --seqlen-k 16384 --heads-kv 8   # decode
"""

from __future__ import annotations

import argparse

import torch

import sage1
import sage2
from common.inputs import make_qkv


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--gen", choices=["sage1", "sage2"], default="sage2")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--heads-kv", type=int, default=None, help="default: --heads")
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--seqlen-k", type=int, default=None, help="default: --seqlen")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--causal", action="store_true")
    args = ap.parse_args(argv)
    fn = {"sage1": sage1.sageattn, "sage2": sage2.sageattn}[args.gen]
    q, k, v = make_qkv(args.batch, args.heads, args.seqlen, args.dim, heads_kv=args.heads_kv, seqlen_k=args.seqlen_k,
                       device="cuda")
    for _ in range(2):
        fn(q, k, v, is_causal=args.causal, backend=args.backend)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
