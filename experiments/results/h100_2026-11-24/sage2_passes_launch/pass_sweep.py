"""Launch settings of the three Triton passes at B=4 H=32 D=128 (kernel alone, CUDA-event timing)."""
import torch
from common.inputs import make_qkv
from common.timing import bench_ms
from common.triton_quant import quantize_int_kernel, quantize_v_fp8_kernel, scan_v_kernel
for n in (16384, 2048):
    _, k, v = make_qkv(4, 32, n, 128, kind="k_bias", device="cuda", seed=0)
    B, H, N, D = k.shape
    km = torch.mean(k, dim=-2, keepdim=True, dtype=torch.float32).reshape(B * H, D).contiguous()
    fb = torch.zeros(B * H, dtype=torch.int32, device="cuda")
    codes = torch.empty(B, H, N, 128, dtype=torch.int8, device="cuda")
    scale = torch.empty(B, H, N, dtype=torch.float32, device="cuda")
    mb = k.numel() * 2 / 1e6
    for warps in (4, 8, 16):  # (first sweep only)
        f = lambda: quantize_int_kernel[(N // 128, B * H)](k, km, codes, scale, scale, fb, fb, k.stride(0), k.stride(1), k.stride(2), H, N, D, 1.0,
                                                           BLOCK=128, DP=128, QMAX=127, GRAN=4, WARP=16, HAS_MEAN=True, SMOOTH_BLOCK=False, ZERO=True, FLAGS=2, INTERPRET=False, num_warps=warps)
        ms = bench_ms(f, rep_ms=200)
        print(f"N={n} K codes warps={warps}: {ms*1e3:.0f} us ({mb * 1.5 / ms / 1e3:.2f} TB/s)", flush=True)
    amax = torch.zeros(B * H * D, dtype=torch.int32, device="cuda")
    for block, tiles, warps in ((64, 8, 4), (64, 4, 4), (64, 16, 4), (64, 8, 8), (32, 16, 4), (128, 4, 8), (64, 4, 2),  # first sweep
                                (64, 8, 2), (64, 16, 2), (64, 2, 2), (32, 8, 2), (32, 8, 1), (32, 16, 1), (64, 4, 1), (128, 2, 4), (128, 4, 4)):
        f = lambda: scan_v_kernel[(-(-N // (block * tiles)), B * H)](v, v, amax, fb, v.stride(0), v.stride(1), v.stride(2), H, N, D,
                                                                     BLOCK=block, DP=128, HAS_MEAN=False, PER_CHANNEL=True, FLAG=True, TILES=tiles, num_warps=warps)
        ms = bench_ms(f, rep_ms=200)
        print(f"N={n} V scan block={block} tiles={tiles} warps={warps}: {ms*1e3:.0f} us ({mb / ms / 1e3:.2f} TB/s)", flush=True)
    absmax = amax.view(torch.float32)
    vs = torch.empty(B, H, D, dtype=torch.float32, device="cuda")
    out = torch.empty(B, H, 128, N, dtype=torch.float8_e4m3fn, device="cuda")
    for block, warps in ((64, 4), (64, 8), (128, 4), (128, 8), (32, 4), (64, 2), (32, 2), (32, 1), (32, 8)):
        f = lambda: quantize_v_fp8_kernel[(N // block, B * H)](v, vs, absmax, vs, out, v.stride(0), v.stride(1), v.stride(2), H, N, N, D,
                                                               BLOCK=block, DP=128, HAS_MEAN=False, FP8_E5M2=False, FMAX=448.0, INTERPRET=False, ZERO=True, WGMMA_KEY_ORDER=True, num_warps=warps)
        ms = bench_ms(f, rep_ms=200)
        print(f"N={n} V codes block={block} warps={warps}: {ms*1e3:.0f} us ({mb * 1.5 / ms / 1e3:.2f} TB/s)", flush=True)
    f = lambda: torch.mean(k, dim=-2, keepdim=True, dtype=torch.float32)
    ms = bench_ms(f, rep_ms=200)
    print(f"N={n} torch.mean K: {ms*1e3:.0f} us ({mb / ms / 1e3:.2f} TB/s)", flush=True)
    k = v = codes = out = None  # (released before the next size)
    torch.cuda.empty_cache()
