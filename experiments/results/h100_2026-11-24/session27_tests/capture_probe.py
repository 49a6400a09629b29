"""Does capturing a KV-cache step work when the device append kernel was never launched before (a
fresh process: Triton compiles and loads it inside the capture)?"""
import torch

import sage2
from common.inputs import make_qkv

B, Hq, Hkv, D, N0 = 2, 8, 2, 128, 500
q, k, v = make_qkv(B, Hq, 1, D, heads_kv=Hkv, seqlen_k=N0 + 80, kind="k_bias", device="cuda", seed=5)
eager, graphed = (sage2.QuantizedKVCache(B, Hkv, D, N0 + 100, device="cuda") for _ in range(2))
for c in (eager, graphed):
    c.append(k[:, :, :N0], v[:, :, :N0])
sk, sv, sq = k[:, :, N0:N0 + 1].clone(), v[:, :, N0:N0 + 1].clone(), q.clone()
side = torch.cuda.Stream()
side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):  # the README's warm-up: one eager step (host append: the device kernel stays unlaunched)
    w = sage2.QuantizedKVCache(B, Hkv, D, N0 + 100, device="cuda")
    w.append(k[:, :, :N0], v[:, :, :N0]); w.append(sk, sv); sage2.sageattn_kvcache(sq, w)
torch.cuda.current_stream().wait_stream(side)
g = torch.cuda.CUDAGraph()
try:
    with torch.cuda.graph(g):
        graphed.append(sk, sv)
        out = sage2.sageattn_kvcache(sq, graphed)
except Exception as e:
    print("CAPTURE FAILED:", type(e).__name__, str(e)[:400]); raise SystemExit(1)
worst = 0.0
for i in range(70):
    sk.copy_(k[:, :, N0 + i:N0 + i + 1]); sv.copy_(v[:, :, N0 + i:N0 + i + 1])
    g.replay()
    eager.append(sk, sv)
    want = sage2.sageattn_kvcache(sq, eager)
    worst = max(worst, ((out.float() - want.float()).abs().sum() / want.float().abs().sum()).item())
print("replays ok, lengths", graphed.lengths, eager.lengths, "worst rel L1", worst)
