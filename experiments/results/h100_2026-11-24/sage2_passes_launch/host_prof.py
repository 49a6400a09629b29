"""Where the host time of an eager sage2 CUDA call goes (cProfile, tiny inputs so the GPU never waits)."""
import cProfile, pstats, time, io
import torch
import sage2
from common.inputs import make_qkv
for d, causal in ((128, True), (128, False), (64, False)):
    q, k, v = make_qkv(1, 2, 256, d, device="cuda", seed=1)
    f = lambda: sage2.sageattn(q, k, v, is_causal=causal, backend="cuda")
    for _ in range(50):
        f()
    torch.cuda.synchronize()
    n = 400
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    torch.cuda.synchronize()
    print(f"D={d} causal={causal}: {(time.perf_counter() - t0) / n * 1e6:.0f} us per call (no profiler)")
    if d == 128 and causal:
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(n):
            f()
        pr.disable()
        torch.cuda.synchronize()
        s = io.StringIO()
        ps = pstats.Stats(pr, stream=s).sort_stats("tottime")
        ps.print_stats(40)
        print(s.getvalue()[-9000:])
        s = io.StringIO()
        ps = pstats.Stats(pr, stream=s).sort_stats("cumulative")
        ps.print_stats(45)
        print(s.getvalue()[-9000:])
