"""Sweep sage2 kernel configurations and PV accumulation modes on the GPU (kernel only, quantized
inputs prepared once), next to cuDNN and FA2 in the same run, plus the quantization passes.

    python -m experiments.sweep_sage2 --dims 128 --configs "128,128,8,3;128,64,4,3" --modes 1 2
"""

from __future__ import annotations

import argparse
import itertools
import math

import torch

from common.inputs import make_qkv
from common.int_qk import padded_head_dim, quantize_qk
from common.timing import attention_flops, bench_ms
from experiments.baselines import SweepLog
from sage2.interface import K_BLOCK, Q_BLOCK, WARP_Q
from sage2.kernel import launch
from sage2.quant_v import quantize_v

MODES = {0: "single", 1: "two-level(fresh+add)", 2: "two-level(promote)"}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlen", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--causal", choices=["no", "yes", "both"], default="no")
    ap.add_argument("--modes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--gran", nargs="+", default=["per_thread"])
    ap.add_argument("--configs", default="128,128,8,3;128,128,8,4;128,64,4,3")
    args = ap.parse_args(argv)
    configs = [tuple(int(x) for x in c.split(",")) for c in args.configs.split(";")]
    causals = {"no": [False], "yes": [True], "both": [False, True]}[args.causal]
    B, H, N = args.batch, args.heads, args.seqlen
    log = SweepLog()
    for d in args.dims:
        q, k, v = make_qkv(B, H, N, d, dtype=torch.float16, device="cuda", seed=0)
        scale, dp = 1 / math.sqrt(d), padded_head_dim(d)
        qkw = dict(sm_scale=scale, q_block=Q_BLOCK, k_block=K_BLOCK, warp_rows=WARP_Q, backend="triton")
        qv = quantize_v(v, "fp8_e4m3", smooth_v=False, backend="triton", dp=dp)
        ms_qk = bench_ms(lambda: quantize_qk(q, k, granularity="per_thread", **qkw))
        ms_v = bench_ms(lambda: quantize_v(v, "fp8_e4m3", smooth_v=False, backend="triton", dp=dp))
        attn_ms = attention_flops(B, H, N, N, d) / 700e12 * 1e3
        print(f"D={d}: Q,K quantization {ms_qk:.3f} ms ({q.numel() * 8 / ms_qk / 1e6:.0f} GB/s), V {ms_v:.3f} ms "
              f"({v.numel() * 5 / ms_v / 1e6:.0f} GB/s); together {(ms_qk + ms_v) / attn_ms * 100:.1f}% of a 700-TOPS attention",
              flush=True)
        for causal in causals:
            flops = attention_flops(B, H, N, N, d, causal)
            log.time_baselines(q, k, v, d, causal, flops)
            out = torch.empty_like(q)
            for gran in args.gran:
                qk = quantize_qk(q, k, granularity=gran, **qkw)
                for cfg, mode in itertools.product(configs, args.modes):
                    run = lambda: launch(qk, qv, out, delta_s=None, is_causal=causal, pv_dtype="fp8_e4m3",
                                         pv_mode=mode, log2_pscale=math.log2(448.0), return_lse=False, config=cfg,
                                         k_per_thread=gran == "per_thread")
                    log.bench(d, causal, "sage2-kernel", f"{cfg} {MODES[mode]} {gran}", run, flops)
    log.print_best("sage2-kernel")


if __name__ == "__main__":
    main()
