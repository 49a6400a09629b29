import sys, torch
sys.path.insert(0, ".")
from experiments.bench_sage2_cuda import kernel_only
B, H, D = 4, 32, 128
for n in (8192, 2048):
    q = torch.randn(B, H, n, D, device="cuda", dtype=torch.float16)
    k = torch.randn(B, H, n, D, device="cuda", dtype=torch.float16) + 3
    v = torch.randn(B, H, n, D, device="cuda", dtype=torch.float16)
    f = kernel_only(q, k, v, False, "cuda")
    f(); torch.cuda.synchronize()
    print(f"=== N={n} second call", flush=True)
    f(); torch.cuda.synchronize()
    print("=== end", flush=True)
