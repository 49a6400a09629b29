"""The fused K/V pass alone vs the separate passes (B=4, H=32, D=128), over its launch settings."""
import sys, torch
from common.inputs import make_qkv
from common.int_qk import quantize_qk
from common.nonfinite import NonfiniteFlags
from common.timing import bench_ms
from sage2 import kv_pass
from sage2.quant_v import quantize_v

configs = [(8, 64, None), (8, 32, None), (8, 64, 80), (4, 64, None), (8, 128, None)]
if len(sys.argv) > 1:
    configs = configs[:int(sys.argv[1])]
for n in (16384, 8192, 2048):
    _, k, v = make_qkv(4, 32, n, 128, kind="k_bias", device="cuda", seed=0)
    B, H, N, D = k.shape
    nbytes = k.numel() * 2 * 2
    def separate():
        buf = torch.zeros(B * H + B * H * D, dtype=torch.int32, device="cuda")
        flags = NonfiniteFlags(None, buf[:B * H])
        quantize_qk(k, k, sm_scale=0.1, granularity="per_thread", bits=8, k_block=128, warp_rows=16, backend="triton",
                    zero_nonfinite=True, flags=flags, quantize_q=False)
        quantize_v(v, "fp8_e4m3", smooth_v=False, backend="triton", dp=128, npad_multiple=128, zero_nonfinite=True,
                   flags=flags, amax_bits=buf[B * H:], wgmma_key_order=True)
    def fused():
        buf = torch.zeros(B * H + B * H * D + kv_pass.counter_entries(B, H), dtype=torch.int32, device="cuda")
        flags = NonfiniteFlags(None, buf[:B * H])
        kv_pass.quantize_kv(k, v, buf[B * H + B * H * D:], granularity="per_thread", bits=8, smooth_k=True,
                            pv_dtype="fp8_e4m3", k_block=128, dp=128, npad_multiple=128, zero_nonfinite=True,
                            flags=flags, amax_bits=buf[B * H:B * H + B * H * D], wgmma_key_order=True)
    ms = bench_ms(separate, rep_ms=300)
    print(f"N={n} separate passes: {ms * 1e3:7.1f} us  ({nbytes / ms / 1e9:.2f} TB/s of K+V read once)", flush=True)
    for warps, stat, maxnreg in configs:
        kv_pass.NUM_WARPS, kv_pass.STAT_BLOCK, kv_pass.MAXNREG = warps, stat, maxnreg
        ms = bench_ms(fused, rep_ms=300)
        print(f"N={n} fused warps={warps} stat_block={stat} maxnreg={maxnreg}: {ms * 1e3:7.1f} us  ({nbytes / ms / 1e9:.2f} TB/s)", flush=True)
    k = v = None  # (released before the next size)
    torch.cuda.empty_cache()
