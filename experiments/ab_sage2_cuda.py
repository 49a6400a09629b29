"""Same-run A/B of the whole sage2 CUDA call against cuDNN SDPA: one line per shape, so that two
checkouts (a worktree of the older commit and this one) can be timed in one device run and their
lines compared. B=4, H=32, fp16, the k_bias inputs of common.inputs.

    python -m experiments.ab_sage2_cuda TAG [--causal-only] [--shapes D:causal:N ...]
"""
import argparse

import torch

import sage2
from common.inputs import make_qkv
from common.timing import attention_flops, bench_ms, tops
from experiments.baselines import sdpa

DEFAULT_SHAPES = [(128, False, 16384), (128, True, 16384), (128, False, 8192), (128, True, 8192), (128, False, 2048),
                  (128, True, 2048), (64, False, 16384), (64, True, 16384)]


def run(tag: str, shapes, *, batch: int = 4, heads: int = 32, rep_ms: float = 80):
    cudnn = sdpa("sdpa_cudnn")
    for d, causal, n in shapes:
        q, k, v = make_qkv(batch, heads, n, d, kind="k_bias", device="cuda", seed=0)
        flops = attention_flops(batch, heads, n, n, d, causal)
        ours = tops(flops, bench_ms(lambda q=q, k=k, v=v: sage2.sageattn(q, k, v, is_causal=causal, backend="cuda"),
                                    rep_ms=rep_ms))
        ref = tops(flops, bench_ms(lambda q=q, k=k, v=v: cudnn(q, k, v, is_causal=causal), rep_ms=rep_ms))
        print(f"{tag} D={d} causal={int(causal)} N={n}: cuda {ours:.0f} cudnn {ref:.0f} ratio {ours / ref:.3f}",
              flush=True)
        del q, k, v
        torch.cuda.empty_cache()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tag")
    ap.add_argument("--causal-only", action="store_true")
    ap.add_argument("--shapes", nargs="*", help="D:causal(0/1):N, e.g. 128:1:16384 (default: eight shapes)")
    args = ap.parse_args(argv)
    shapes = DEFAULT_SHAPES
    if args.shapes:
        shapes = [(int(d), bool(int(c)), int(n)) for d, c, n in (s.split(":") for s in args.shapes)]
    run(args.tag, [s for s in shapes if s[1] or not args.causal_only])


if __name__ == "__main__":
    main()
