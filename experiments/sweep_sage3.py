"""Sweep sage3 (FP4 emulation) kernel configurations on the GPU, kernel only, next to cuDNN.

    python -m experiments.sweep_sage3 --dims 128 64 --configs "64,8,2;128,8,2;64,4,3"
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

import sage3.kernel as kernel_mod
from common.inputs import make_qkv
from common.smoothing import q_smoothing_delta_s
from common.timing import attention_flops, bench_ms, tops
from experiments.baselines import sdpa
from sage3.kernel import dequantize_rows, launch
from sage3.quant import quantize_qkv_fp4


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlen", type=int, default=16384)
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--configs", default="64,8,2;128,8,2;64,4,2;64,8,3")
    ap.add_argument("--variants", default="packed+compare;packed+magic;pre_unpack+compare;pre_unpack+magic",
                    help="where K,V are dequantized (packed: in the kernel; pre_unpack: a pass before it) "
                         "and how P is rounded to E2M1 (compare: 7 compare/selects; magic: fl(a+M)-M)")
    ap.add_argument("--ir-dir", default=None, help="write each variant's TTGIR here")
    args = ap.parse_args(argv)
    configs = [tuple(int(x) for x in c.split(",")) for c in args.configs.split(";")]
    B, H, N = 4, 32, args.seqlen
    for d in args.dims:
        q, k, v = make_qkv(B, H, N, d, device="cuda", seed=0)
        flops = attention_flops(B, H, N, N, d)
        cud = tops(flops, bench_ms(lambda: sdpa("sdpa_cudnn")(q, k, v)))
        qms = bench_ms(lambda: quantize_qkv_fp4(q, k, v, fmt="nvfp4", smooth_q=True, smooth_k=True, backend="triton"))
        qf = quantize_qkv_fp4(q, k, v, fmt="nvfp4", smooth_q=True, smooth_k=True, backend="triton")
        ds = q_smoothing_delta_s(qf.q_block_mean, k, qf.k_mean, tf32=True)
        dms = bench_ms(lambda: q_smoothing_delta_s(qf.q_block_mean, k, qf.k_mean, tf32=True))
        print(f"D={d}: cuDNN {cud:.0f} TOPS; FP4 quantization {qms:.3f} ms, delta_s {dms:.3f} ms", flush=True)
        unpack = lambda: (dequantize_rows(qf.k_packed, qf.k_scales, qf.fmt, q.dtype),  # noqa: E731
                          dequantize_rows(qf.v_packed, qf.v_scales, qf.fmt, q.dtype))
        ums = bench_ms(unpack)
        unpacked = unpack()
        print(f"  K,V dequantization pass (pre_unpack): {ums:.3f} ms", flush=True)
        out = torch.empty_like(q)
        for variant in args.variants.split(";"):
            where, rounding = variant.split("+")
            for cfg in configs:
                try:
                    ms = bench_ms(lambda: launch(qf, out, sm_scale=1 / math.sqrt(d), delta_s=ds, is_causal=False,
                                                 two_level_p=True, op_dtype=q.dtype, return_lse=False, config=cfg,
                                                 pre_unpack=where == "pre_unpack", magic_round=rounding == "magic",
                                                 unpacked=unpacked))
                    ir = kernel_mod.LAST_COMPILED.asm["ttgir"]
                    if args.ir_dir:
                        name = f"d{d}_{variant.replace('+', '_')}_{'_'.join(map(str, cfg))}.ttgir"
                        (Path(args.ir_dir) / name).write_text(ir)
                    print(f"  D={d} {variant:22s} (BLOCK_N, warps, stages)={cfg}: kernel {tops(flops, ms):.0f} TOPS "
                          f"= {tops(flops, ms) / cud:.3f}x cuDNN; TTGIR: {ir.count('convert_layout')} convert_layout, "
                          f"{ir.count('local_alloc')} local_alloc", flush=True)
                except Exception as e:
                    print(f"  D={d} {variant} {cfg}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)


if __name__ == "__main__":
    main()
