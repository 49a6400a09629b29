"""K's and Q's INT8 pass launch settings at B=4 H=32 D=128 (kernel alone)."""
import torch
from common.inputs import make_qkv
from common.timing import bench_ms
from common.triton_quant import quantize_int_kernel
for n in (16384, 2048):
    q, k, _ = make_qkv(4, 32, n, 128, kind="k_bias", device="cuda", seed=0)
    B, H, N, D = k.shape
    km = torch.mean(k, dim=-2, keepdim=True, dtype=torch.float32).reshape(B * H, D).contiguous()
    fb = torch.zeros(B * H, dtype=torch.int32, device="cuda")
    qbad = torch.zeros(B * H * N, dtype=torch.uint8, device="cuda")
    codes = torch.empty(B, H, N, 128, dtype=torch.int8, device="cuda")
    scale = torch.empty(B, H, N, dtype=torch.float32, device="cuda")
    mb = k.numel() * 2 / 1e6
    for warps, maxnreg in ((8, None), (8, 96), (8, 80), (8, 64), (4, 128), (16, None)):
        extra = {} if maxnreg is None else dict(maxnreg=maxnreg)
        f = lambda: quantize_int_kernel[(N // 128, B * H)](k, km, codes, scale, scale, fb, fb, k.stride(0), k.stride(1), k.stride(2), H, N, D, 1.0,
                                                           BLOCK=128, DP=128, QMAX=127, GRAN=4, WARP=16, HAS_MEAN=True, SMOOTH_BLOCK=False, ZERO=True, FLAGS=2, INTERPRET=False, num_warps=warps, **extra)
        ms = bench_ms(f, rep_ms=200)
        print(f"N={n} K codes warps={warps} maxnreg={maxnreg}: {ms*1e3:.0f} us ({mb * 1.5 / ms / 1e3:.2f} TB/s)", flush=True)
    for block, warps, maxnreg in ((64, 4, None), (64, 2, None), (64, 8, None), (64, 4, 96), (128, 8, None)):
        extra = {} if maxnreg is None else dict(maxnreg=maxnreg)
        f = lambda: quantize_int_kernel[(N // block, B * H)](q, km, codes, scale, scale, qbad, fb, q.stride(0), q.stride(1), q.stride(2), H, N, D, 0.12,
                                                           BLOCK=block, DP=128, QMAX=127, GRAN=3, WARP=16, HAS_MEAN=False, SMOOTH_BLOCK=False, ZERO=True, FLAGS=1, INTERPRET=False, num_warps=warps, **extra)
        ms = bench_ms(f, rep_ms=200)
        print(f"N={n} Q codes block={block} warps={warps} maxnreg={maxnreg}: {ms*1e3:.0f} us ({mb * 1.5 / ms / 1e3:.2f} TB/s)", flush=True)
    q = k = codes = None  # (released before the next size)
    torch.cuda.empty_cache()
