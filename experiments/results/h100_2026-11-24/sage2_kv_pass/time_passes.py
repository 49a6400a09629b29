"""The passes over K and V alone: sage2.cuda.quantize_kv (one launch, each read once) against the
Triton passes the CUDA kernel took before (K's torch.mean, K's codes, V's scan, V's codes), as in a
sage2 CUDA call (zero_nonfinite, flags, per-thread INT8 K, E4M3 V in the wgmma key order).
B=4, H=32, fp16. HBM bytes: K and V read once, codes written: 1.5 x 2 x B H N D bytes."""
import sys

import torch

from common.int_qk import padded_head_dim, quantize_qk
from common.nonfinite import NonfiniteFlags
from common.timing import bench_ms
from sage2 import cuda as sc
from sage2.quant_v import quantize_v


def triton_passes(kh, vh, flags, amax):
    flags.first_bad.zero_()
    amax.zero_()
    B, H, N, D = kh.shape
    qk = quantize_qk(kh, kh, sm_scale=1.0, granularity="per_thread", bits=8, k_block=128, backend="triton",
                     zero_nonfinite=True, flags=flags, quantize_q=False)
    qv = quantize_v(vh, "fp8_e4m3", smooth_v=False, backend="triton", dp=padded_head_dim(D), zero_nonfinite=True,
                    flags=flags, amax_bits=amax, wgmma_key_order=True, npad_multiple=128)
    return qk, qv


def one_read(kh, vh, bufs):
    for b in bufs:
        b.zero_()
    return sc.quantize_kv(kh, vh, bits=8, granularity="per_thread", zero_nonfinite=True, first_bad=bufs[2],
                          counters=bufs[0], v_amax=bufs[1])


def main():
    B, H = 4, 32
    print("D N | triton passes us | one-read pass us | speedup | one-read TB/s", flush=True)
    for d, n in [(128, 16384), (128, 8192), (128, 2048), (64, 16384), (64, 2048)]:
        k = torch.randn(B, H, n, d, device="cuda", dtype=torch.float16) + 0.5
        v = torch.randn(B, H, n, d, device="cuda", dtype=torch.float16)
        flags = NonfiniteFlags(None, torch.zeros(B * H, dtype=torch.int32, device="cuda"))
        amax = torch.zeros(B * H * d, dtype=torch.int32, device="cuda")
        bufs = [torch.zeros(x, dtype=torch.int32, device="cuda") for x in (sc.kv_counter_entries(B, H), B * H * d, B * H)]
        t_tri = bench_ms(lambda: triton_passes(k, v, flags, amax), rep_ms=200) * 1e3
        t_one = bench_ms(lambda: one_read(k, v, bufs), rep_ms=200) * 1e3
        zero = bench_ms(lambda: [b.zero_() for b in bufs], rep_ms=100) * 1e3  # the fills the timing includes
        gbytes = 1.5 * 2 * B * H * n * d * 2 / 1e9
        print(f"{d} {n} | {t_tri:.0f} | {t_one:.0f} (fills {zero:.0f}) | {t_tri / t_one:.2f}x | "
              f"{gbytes / ((t_one - zero) * 1e-6) / 1e3:.2f}", flush=True)
        k = v = None  # (released before the next size)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
