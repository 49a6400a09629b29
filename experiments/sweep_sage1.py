"""Sweep sage1 kernel configurations on the GPU (kernel only, quantized inputs prepared once),
next to cuDNN and FA2 in the same run, plus the quantization pass against the copy bandwidth.

    python -m experiments.sweep_sage1 --seqlen 16384
"""

from __future__ import annotations

import argparse
import itertools
import math

import torch

from common.inputs import make_qkv
from common.int_qk import quantize_qk
from common.smoothing import k_mean
from common.timing import attention_flops, bench_ms
from experiments.baselines import SweepLog
from sage1.kernel import launch

DEFAULT_CONFIGS = [(128, 64, 4, 3), (128, 64, 4, 4), (128, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 3),
                   (128, 128, 8, 2), (128, 128, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3)]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlen", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--causal", choices=["no", "yes", "both"], default="both")
    ap.add_argument("--pv", nargs="+", default=["fp16", "fp32"])
    ap.add_argument("--desc", nargs="+", default=["1", "0"])
    ap.add_argument("--configs", default=None, help="semicolon-separated BM,BN,W,S tuples")
    args = ap.parse_args(argv)
    configs = [tuple(int(x) for x in c.split(",")) for c in args.configs.split(";")] if args.configs else DEFAULT_CONFIGS
    causals = {"no": [False], "yes": [True], "both": [False, True]}[args.causal]
    B, H, N = args.batch, args.heads, args.seqlen
    log = SweepLog()
    for d in args.dims:
        q, k, v = make_qkv(B, H, N, d, dtype=torch.float16, device="cuda", seed=0)
        scale = 1 / math.sqrt(d)
        qk = quantize_qk(q, k, sm_scale=scale, backend="triton")
        qms = bench_ms(lambda: quantize_qk(q, k, sm_scale=scale, backend="triton"))
        mean_ms = bench_ms(lambda: k_mean(k))
        # bytes that must move: read q and k (fp16), k again for its mean, write int8 q and k
        nbytes = q.numel() * (2 + 2 + 2 + 1 + 1)
        print(f"D={d}: quantization {qms:.3f} ms (k mean {mean_ms:.3f} ms) = {nbytes / qms / 1e6:.0f} GB/s "
              f"of 3000 measured copy bandwidth; {qms / (attention_flops(B, H, N, N, d) / 620e12 * 1e3) * 100:.1f}% "
              f"of a 620-TOPS attention", flush=True)
        for causal in causals:
            flops = attention_flops(B, H, N, N, d, causal)
            log.time_baselines(q, k, v, d, causal, flops)
            out = torch.empty_like(q)
            for cfg, pv, desc in itertools.product(configs, args.pv, args.desc):
                run = lambda: launch(qk, v, out, is_causal=causal, pv_fp16_acc=pv == "fp16", return_lse=False,
                                     config=cfg, use_desc=desc == "1")
                log.bench(d, causal, "sage1-kernel", f"{cfg} pv={pv} desc={desc}", run, flops)
    log.print_best("sage1-kernel")


if __name__ == "__main__":
    main()
