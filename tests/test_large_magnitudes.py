"""Inputs whose |V| would overflow an fp16 accumulator, and bf16 inputs beyond fp16's range, give
finite, accurate outputs (common.range_guard), in the kernel and the emulation alike."""

import pytest
import torch

import sage1
import sage2
from common.inputs import make_qkv
from common.metrics import accuracy
from common.range_guard import fp16_pv_guard
from common.reference import attention_reference
from conftest import KERNEL_DEVICE

CASES = {  # name: (dtype, V multiplier)
    "fp16, 64*|V| > 65504": (torch.float16, 2e4),
    "bf16, |V| ~ 1e6": (torch.bfloat16, 1e6),
    "bf16, |V| ~ 1e30": (torch.bfloat16, 1e30),
}
CALLS = {
    "sage1": lambda q, k, v, be: sage1.sageattn(q, k, v, backend=be),
    "sage1 fp32 acc": lambda q, k, v, be: sage1.sageattn(q, k, v, backend=be, pv_accum="fp32"),
    "sage2 fp16 PV": lambda q, k, v, be: sage2.sageattn(q, k, v, backend=be, pv_dtype="fp16"),
    "sage2 fp16 PV smooth_v": lambda q, k, v, be: sage2.sageattn(q, k, v, backend=be, pv_dtype="fp16", smooth_v=True),
    "sage2 fp8 PV": lambda q, k, v, be: sage2.sageattn(q, k, v, backend=be),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("call", CALLS)
def test_large_v_is_finite_and_accurate(case, call):
    dtype, mult = CASES[case]
    q, k, v = make_qkv(1, 2, 200, 64, kind="k_bias", dtype=torch.float32, seed=4)
    q, k, v = q.to(dtype), k.to(dtype), (v * mult).clamp(-6e4, 6e4).to(dtype) if dtype == torch.float16 \
        else (v * mult).to(dtype)
    ref = attention_reference(q, k, v)
    for be in ("torch", "triton"):
        out = CALLS[call](*(t.to(KERNEL_DEVICE) for t in (q, k, v)), be)
        assert torch.isfinite(out).all(), (call, be)
        assert accuracy(ref, out.cpu()).cos_sim > 0.999, (call, be)


def test_guard_leaves_ordinary_inputs_alone():
    v = torch.randn(1, 2, 64, 64, dtype=torch.float16) * 100
    v16, scales = fp16_pv_guard(v, fp16_accumulation=True)
    assert v16 is v or torch.equal(v16, v)
    assert scales.tolist() == [1.0, 1.0]
    big = torch.full((1, 1, 4, 4), 3e4, dtype=torch.float16)
    _, scales = fp16_pv_guard(big, fp16_accumulation=True)
    assert scales[0].item() == 2.0 ** -5 and scales[1].item() == 2.0 ** 5  # 3e4 * 2^-5 < 2^10
