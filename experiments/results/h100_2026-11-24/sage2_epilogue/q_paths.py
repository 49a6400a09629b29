"""Whole call with Q quantized in the kernel vs by the pass (SAGE2_SM90_Q), alternating, vs cuDNN."""
import os, sys
import torch
sys.path.insert(0, ".")
import sage2
from common.timing import attention_flops, bench_ms, tops
from experiments.baselines import sdpa
B, H, D = 4, 32, 128
g = torch.Generator(device="cuda").manual_seed(0)
cudnn = sdpa("sdpa_cudnn")
for c, n in [(False, 16384), (False, 8192), (False, 4096), (False, 2048), (True, 16384), (True, 8192)]:
    q = torch.randn(B, H, n, D, device="cuda", generator=g, dtype=torch.float16)
    k = (torch.randn(B, H, n, D, device="cuda", generator=g) + 3 * torch.randn(1, H, 1, D, device="cuda", generator=g)).half()
    v = torch.randn(B, H, n, D, device="cuda", generator=g, dtype=torch.float16)
    f = attention_flops(B, H, n, n, D, c)
    res = {"kernel": [], "pass": []}
    for rnd in range(2):
        for path in (("kernel", "pass") if rnd == 0 else ("pass", "kernel")):
            os.environ["SAGE2_SM90_Q"] = path
            res[path].append(tops(f, bench_ms(lambda: sage2.sageattn(q, k, v, is_causal=c, backend="cuda"), rep_ms=80)))
    ref = tops(f, bench_ms(lambda: cudnn(q, k, v, is_causal=c), rep_ms=80))
    print(f"causal={int(c)} N={n}: Q in kernel {res['kernel'][0]:.0f}/{res['kernel'][1]:.0f}  Q by pass {res['pass'][0]:.0f}/{res['pass'][1]:.0f}  cudnn {ref:.0f}", flush=True)
os.environ.pop("SAGE2_SM90_Q")
