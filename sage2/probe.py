"""How does Triton accumulate FP8 dots on this GPU? A direct probe (sage2.md section 8.1).

``tl.dot(A, B, acc)`` with A = B = 0 returns the accumulator after it passed through the FP8
MMA. On Hopper the MMA keeps ~13 mantissa bits of its accumulator input, and Triton's default
for fp8 dots on sm_90 is ``max_num_imprecise_acc = 2**30`` (never promote to fp32), so an addend
with more than 13 mantissa bits comes back with its low 10 bits zeroed. With
``max_num_imprecise_acc = K`` Triton accumulates each K-slice in a fresh MMA accumulator and
adds it to ``acc`` in fp32: the addend survives. Run: ``python -m sage2.probe``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _fp8_dot_addend(A, B, ACC, OUT, PROMOTE: tl.constexpr):
    r = tl.arange(0, 64)
    c = tl.arange(0, 32)
    a = tl.load(A + r[:, None] * 32 + c[None, :])
    b = tl.load(B + c[:, None] * 64 + r[None, :])
    acc = tl.load(ACC + r[:, None] * 64 + r[None, :])
    if PROMOTE:
        acc = tl.dot(a, b, acc, max_num_imprecise_acc=32)
    else:
        acc = tl.dot(a, b, acc)
    tl.store(OUT + r[:, None] * 64 + r[None, :], acc)


def probe_fp8_accumulator(device="cuda") -> dict:
    """Returns, per mode, the number of low mantissa bits of the addend that were zeroed."""
    a = torch.zeros(64, 32, device=device).to(torch.float8_e4m3fn)
    b = torch.zeros(32, 64, device=device).to(torch.float8_e4m3fn)
    acc = (1.0 + torch.arange(1, 64 * 64 + 1, device=device, dtype=torch.float32) * 2.0 ** -23).reshape(64, 64)
    result = {}
    for name, promote in (("default (imprecise)", False), ("max_num_imprecise_acc=K (promoted)", True)):
        out = torch.empty_like(acc)
        _fp8_dot_addend[(1,)](a, b, acc, out, PROMOTE=promote)
        diff = (acc.view(torch.int32) ^ out.view(torch.int32))
        result[name] = int(diff.max().item()).bit_length()  # highest changed bit + 1
    return result


if __name__ == "__main__":
    print(f"GPU: {torch.cuda.get_device_name()}, triton {triton.__version__}")
    for mode, bits in probe_fp8_accumulator().items():
        print(f"  tl.dot(fp8 0, fp8 0, acc) {mode}: low {bits} mantissa bits of the fp32 addend lost")
