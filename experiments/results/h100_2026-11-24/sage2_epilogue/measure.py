"""One variant: kernel alone at (Nq, Nk) and the whole call vs cuDNN (D=128, B=4 H=32, k_bias-like inputs
drawn on the GPU)."""
import sys, math
import torch
sys.path.insert(0, ".")
import sage2
from common.timing import attention_flops, bench_ms, tops
from experiments.bench_sage2_cuda import kernel_only, sdpa

tag = sys.argv[1]
B, H, D = 4, 32, 128
g = torch.Generator(device="cuda").manual_seed(0)
def qkv(nq, nk):
    q = torch.randn(B, H, nq, D, device="cuda", generator=g, dtype=torch.float16)
    k = (torch.randn(B, H, nk, D, device="cuda", generator=g) + 3 * torch.randn(1, H, 1, D, device="cuda", generator=g)).half()
    v = torch.randn(B, H, nk, D, device="cuda", generator=g, dtype=torch.float16)
    return q, k, v
cudnn = sdpa("sdpa_cudnn")
for nq, nk in [(16384, 16384), (8192, 8192), (2048, 2048)]:
    q, k, v = qkv(nq, nk)
    ms = bench_ms(kernel_only(q, k, v, False, "cuda"), rep_ms=120)
    rounds = B * H * math.ceil(nq / 128) / 132
    f = attention_flops(B, H, nq, nk, D, False)
    print(f"{tag} kernel Nq={nq} Nk={nk}: {tops(f, ms):.0f} TOPS, per work tile {ms * 1e3 / rounds:.2f} us", flush=True)
for d, c, n in [(128, False, 16384), (128, False, 8192), (128, False, 2048), (128, True, 16384), (128, True, 8192)]:
    q, k, v = qkv(n, n)
    f = attention_flops(B, H, n, n, D, c)
    ours = tops(f, bench_ms(lambda: sage2.sageattn(q, k, v, is_causal=c, backend="cuda"), rep_ms=80))
    ref = tops(f, bench_ms(lambda: cudnn(q, k, v, is_causal=c), rep_ms=80))
    print(f"{tag} whole D={d} causal={int(c)} N={n}: cuda {ours:.0f} cudnn {ref:.0f} ratio {ours / ref:.3f}", flush=True)
