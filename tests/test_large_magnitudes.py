"""Inputs whose |V| would overflow an fp16 accumulator, and bf16 inputs beyond fp16's range (above
it, or so small that fp16 would flush them), give finite, accurate outputs (common.range_guard), in
the kernel and the emulation alike."""

import pytest
import torch
import triton
import triton.language as tl

import sage1
import sage2
from common.inputs import make_qkv
from common.metrics import accuracy
from common.range_guard import fp16_pv_guard, guard_scales, guard_scales_tl
from common.reference import attention_reference
from conftest import IS_HOPPER, KERNEL_DEVICE

CASES = {  # name: (dtype, V multiplier)
    "fp16, 64*|V| > 65504": (torch.float16, 2e4),
    "bf16, |V| ~ 1e6": (torch.bfloat16, 1e6),
    "bf16, |V| ~ 1e30": (torch.bfloat16, 1e30),
    "bf16, |V| ~ 1e-8 (below fp16's range)": (torch.bfloat16, 1e-8),
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


@pytest.mark.parametrize("mag", [1e33, 1e37])
def test_huge_v_under_uniform_attention_stays_finite(mag):
    """q = 0: every key alike, so l (the row sum, up to P's scale times Nk) is as large as it gets.
    The output is about mag / 2; the FP8 paths once multiplied acc ~ l |V's codes| by V's scales
    before dividing by l, which overflowed from |V| ~ 1e33 (e5m2) and 1e37 (e4m3, fp16)."""
    q = torch.zeros(1, 1, 64, 64, dtype=torch.bfloat16)
    k = torch.randn(1, 1, 256, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    v = (torch.rand(1, 1, 256, 64, generator=torch.Generator().manual_seed(1)) * mag).to(torch.bfloat16)
    ref = attention_reference(q, k, v)
    calls = {"sage1": lambda be: sage1.sageattn(*(t.to(KERNEL_DEVICE) for t in (q, k, v)), backend=be)}
    for pv in ("fp8_e4m3", "fp8_e5m2", "fp16"):
        calls[f"sage2 {pv}"] = lambda be, pv=pv: sage2.sageattn(*(t.to(KERNEL_DEVICE) for t in (q, k, v)), backend=be,
                                                                 pv_dtype=pv)
    backends = ("torch", "triton") + (("cuda",) if IS_HOPPER else ())
    for name, call in calls.items():
        for be in backends:
            if be == "cuda" and name != "sage2 fp8_e4m3":
                continue
            out = call(be)
            assert torch.isfinite(out).all(), (name, be)
            assert accuracy(ref, out.cpu()).rel_l1 < 0.05, (name, be)


def test_guard_leaves_ordinary_inputs_alone():
    v = torch.randn(1, 2, 64, 64, dtype=torch.float16) * 100
    v16, scales = fp16_pv_guard(v, fp16_accumulation=True)
    assert v16 is v or torch.equal(v16, v)
    assert scales.tolist() == [1.0, 1.0]
    big = torch.full((1, 1, 4, 4), 3e4, dtype=torch.float16)
    _, scales = fp16_pv_guard(big, fp16_accumulation=True)
    assert scales[0].item() == 2.0 ** -5 and scales[1].item() == 2.0 ** 5  # 3e4 * 2^-5 <= 960


@pytest.mark.parametrize("value,dtype", [(1024.0, torch.float16), (2048.0, torch.float16), (32768.0, torch.float16),
                                         (60000.0, torch.float16), (2.0 ** 20, torch.bfloat16)])
def test_fp16_accumulation_at_powers_of_two_stays_finite(value, dtype):
    """Every key alike (P = 1 across each 64-key tile) and V constant: each tile's fp16 sum is 64
    |V| s_p, which at a power-of-two |V| of 1024 or more once came to exactly 65536 (inf). The
    output is V itself."""
    q = torch.randn(1, 1, 80, 64, generator=torch.Generator().manual_seed(0)).to(dtype)
    k = torch.randn(1, 1, 1, 64, generator=torch.Generator().manual_seed(1)).to(dtype).expand(1, 1, 128, 64)
    v = torch.full((1, 1, 128, 64), value, dtype=dtype)
    for be in ("torch", "triton"):
        out = sage1.sageattn(*(t.to(KERNEL_DEVICE) for t in (q, k, v)), backend=be, pv_accum="fp16")
        assert torch.equal(out.cpu(), v[:, :, :80]), be


@triton.jit
def _guard_scales_kernel(M, OUT, N, RESCALE_V: tl.constexpr, FP16_ACC: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = tl.load(M + i, mask=i < N, other=0.0)
    s_v, s_p = guard_scales_tl(m, RESCALE_V, FP16_ACC)
    tl.store(OUT + i, s_v, mask=i < N)
    tl.store(OUT + N + i, s_p, mask=i < N)


def test_kernel_guard_scales_equal_the_emulations_bit_for_bit():
    """The kernels derive the guard's powers of two from max|V| themselves (range_guard.guard_scales_tl);
    they must equal the emulation's (guard_scales) exactly, at and around every power of two and at
    the ends of the range (0, fp32 subnormals, 3e38)."""
    pow2 = torch.tensor([2.0 ** e for e in range(-20, 120)], dtype=torch.float32)
    m = torch.cat([pow2, torch.nextafter(pow2, torch.zeros(())), torch.nextafter(pow2, torch.full((), float("inf"))),
                   torch.tensor([0.0, 1e-45, 1e-40, 1.0, 1023.9, 1024.0, 1024.1, 32767.0, 32768.0, 65504.0, 3.0e38,
                                 3.4028235e38]),
                   torch.rand(2000, generator=torch.Generator().manual_seed(0)) * 1e6]).to(KERNEL_DEVICE)
    for rescale_v in (False, True):
        for fp16_acc in (False, True):
            out = torch.empty(2 * m.numel(), device=KERNEL_DEVICE)
            _guard_scales_kernel[(triton.cdiv(m.numel(), 256),)](m, out, m.numel(), RESCALE_V=rescale_v, FP16_ACC=fp16_acc,
                                                           BLOCK=256)
            want = [torch.stack([guard_scales(x, rescale_v=rescale_v, fp16_accumulation=fp16_acc)[i]
                                 for x in m.cpu()]) for i in (0, 1)]
            assert torch.equal(out[:m.numel()].cpu(), want[0]) and torch.equal(out[m.numel():].cpu(), want[1])
