import torch
from sage2 import cuda as sc
from common.nonfinite import NO_BAD_KEY
for (B, H, n, d, dt) in [(1, 2, 1000, 128, torch.float16), (2, 1, 700, 64, torch.bfloat16)]:
    k = torch.randn(B, H, n, d, device="cuda", dtype=dt) + 0.5
    v = torch.randn(B, H, n, d, device="cuda", dtype=dt)
    k[0, 0, 5, 3] = float("nan"); v[0, H - 1, 9, 1] = float("inf")
    bufs = [torch.zeros(x, dtype=torch.int32, device="cuda") for x in (sc.kv_counter_entries(B, H), B * H * d, B * H)]
    (kc, ks, km), qv = sc.quantize_kv(k, v, bits=8, granularity="per_thread", zero_nonfinite=True, first_bad=bufs[2], counters=bufs[0], v_amax=bufs[1])
    torch.cuda.synchronize()
    print(d, "first_bad", (NO_BAD_KEY - bufs[2]).tolist(), "mean finite", bool(km.isfinite().all()))
