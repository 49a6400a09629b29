import torch
from sage2 import cuda as sc
B, H, n, d = 4, 32, 16384, 128
k = torch.randn(B, H, n, d, device="cuda", dtype=torch.float16) + 0.5
v = torch.randn(B, H, n, d, device="cuda", dtype=torch.float16)
for _ in range(3):
    bufs = [torch.zeros(x, dtype=torch.int32, device="cuda") for x in (sc.kv_counter_entries(B, H), B * H * d, B * H)]
    sc.quantize_kv(k, v, bits=8, granularity="per_thread", zero_nonfinite=True, first_bad=bufs[2], counters=bufs[0], v_amax=bufs[1])
torch.cuda.synchronize()
