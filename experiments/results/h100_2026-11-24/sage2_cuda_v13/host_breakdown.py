"""Host time of one sage2.sageattn(backend="cuda") call, by stage: each stage of sage2.interface
wrapped in a wall-clock timer, on tiny inputs (the GPU never holds the host back), 300 calls.

    python host_breakdown.py
"""
import collections
import time

import torch

import common.int_qk
import sage2
import sage2.cuda
import sage2.interface as itf
import sage2.quant_v
from common.inputs import make_qkv

spent = collections.Counter()


def timed(module, name, label=None):
    fn = getattr(module, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[label or name] += time.perf_counter() - t0

    setattr(module, name, wrapper)


for name in ("validate_call", "start_call", "resolve_mask", "kernel_buffers", "quantize_qk", "quantize_v"):
    timed(itf, name)
timed(itf.build, "pick_cuda")
timed(itf.cuda_kernel, "launch", "cuda launch (all)")
timed(sage2.cuda, "sage2_sm90_fwd", "  the custom op")
timed(sage2.cuda, "_forward", "  the kernel call (no custom-op dispatch)")
timed(sage2.cuda, "q_for_kernel", "  q_for_kernel")
timed(sage2.cuda, "_check_op_inputs", "    its input checks")
timed(common.int_qk, "_quantize_triton", "  K (and Q) pass, Triton")
timed(sage2.quant_v, "finite_absmax", "  V scan, Triton")

for causal in (False, True):
    q, k, v = make_qkv(1, 2, 256, 128, device="cuda", seed=1)
    for _ in range(30):
        sage2.sageattn(q, k, v, is_causal=causal, backend="cuda")
    torch.cuda.synchronize()
    spent.clear()
    n = 300
    t0 = time.perf_counter()
    for _ in range(n):
        sage2.sageattn(q, k, v, is_causal=causal, backend="cuda")
    total = time.perf_counter() - t0
    torch.cuda.synchronize()
    print(f"causal={int(causal)}: {total / n * 1e6:.0f} us per call")
    for label, s in spent.items():
        print(f"  {label:28s} {s / n * 1e6:7.1f} us")
