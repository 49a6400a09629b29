"""Per-kernel GPU time of one whole sage2 CUDA call (torch.profiler), and the span of the call."""
import sys, torch
from torch.profiler import profile, ProfilerActivity
from common.inputs import make_qkv
from sage2 import sageattn

for D, causal, N in [(128, True, 16384), (128, False, 16384), (128, False, 8192), (128, True, 8192), (64, False, 16384), (128, False, 2048)]:
    q, k, v = make_qkv(4, 32, N, D, kind="k_bias", device="cuda", seed=0)
    f = lambda: sageattn(q, k, v, is_causal=causal, backend="cuda")
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            f()
        torch.cuda.synchronize()
    evs = [e for e in prof.events() if e.device_type.name == "CUDA"]
    tot = {}
    for e in evs:
        name = e.name[:60]
        tot.setdefault(name, [0.0, 0])
        tot[name][0] += e.device_time
        tot[name][1] += 1
    start = min(e.time_range.start for e in evs); end = max(e.time_range.end for e in evs)
    print(f"D={D} causal={causal} N={N}: span per call {(end - start) / 5:.0f} us, sum of kernels {sum(t for t, _ in tot.values()) / 5:.0f} us")
    for name, (t, c) in sorted(tot.items(), key=lambda x: -x[1][0]):
        print(f"   {t / 5:9.1f} us  x{c // 5}  {name}")
    sys.stdout.flush()
