"""SageAttention3 (FP4 inference): exact FP4 formats, the kernel against the emulation, and the
paper's orderings (NVFP4 > MXFP4, two-level P > direct, smoothing helps)."""

import pytest
import torch

import sage3
from common import fp4
from common.inputs import make_qkv
from common.metrics import accuracy
from common.reference import attention_reference
from conftest import KERNEL_DEVICE, gpu, kernel_vs_emulation
from sage3.emulation import quantize_p
from sage3.quant import dequantize, quantize_qkv_fp4

FP16, BF16 = torch.float16, torch.bfloat16


def acc_of(q, k, v, **kw):
    ref = attention_reference(q, k, v, is_causal=kw.get("is_causal", False))
    return accuracy(ref, sage3.sageattn(q, k, v, backend="torch", **kw))


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("smooth", [True, False])
def test_triton_quantization_pass_matches_pytorch_bit_for_bit(fmt, smooth):
    q, k, v = (t.to(KERNEL_DEVICE) for t in make_qkv(2, 4, 200, 96, seqlen_k=150, heads_kv=2, kind="outliers", seed=1))
    a = quantize_qkv_fp4(q, k, v, fmt=fmt, smooth_q=smooth, smooth_k=smooth, backend="triton")
    b = quantize_qkv_fp4(q, k, v, fmt=fmt, smooth_q=smooth, smooth_k=smooth, backend="torch")
    for name in ("k_packed", "k_scales", "v_packed", "v_scales") + (() if smooth else ("q_packed", "q_scales")):
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape and torch.equal(x.view(torch.uint8), y.view(torch.uint8)), name
    if smooth:  # block means are summed in another order: a code may move by one grid step
        torch.testing.assert_close(a.q_block_mean, b.q_block_mean, rtol=1e-5, atol=1e-6)
        da, db = dequantize(a.q_packed, a.q_scales, fmt), dequantize(b.q_packed, b.q_scales, fmt)
        assert (da != db).float().mean() < 2e-3


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_dequantized_operands_are_exact_in_16_bit(fmt):
    q, k, v = make_qkv(1, 2, 300, 128, kind="heavy_tail", seed=2)
    qf = quantize_qkv_fp4(q, k, v, fmt=fmt, smooth_q=True, smooth_k=True, backend="torch")
    for packed, scales in ((qf.q_packed, qf.q_scales), (qf.k_packed, qf.k_scales), (qf.v_packed, qf.v_scales)):
        d = dequantize(packed, scales, fmt)
        for dt in (FP16, BF16):
            assert torch.equal(d.to(dt).float(), d)


def test_quantized_values_lie_on_the_fp4_grid():
    q, k, v = make_qkv(1, 1, 64, 64, seed=3)
    qf = quantize_qkv_fp4(q, k, v, fmt="nvfp4", smooth_q=False, smooth_k=False, backend="torch")
    d = dequantize(qf.q_packed, qf.q_scales, "nvfp4").reshape(1, 1, 64, 4, 16)
    ratio = d / qf.q_scales.float()[..., None]
    assert torch.equal(fp4.e2m1_round(ratio), ratio)
    # the block's largest |x| maps to about 6 (its E4M3 scale is rounded)
    assert (ratio.abs().amax(-1) >= 5).all()


def test_p_quantization_two_level_beats_direct_in_isolation():
    """With exact S, quantize only P: on rows with an attention sink most P values are tiny;
    directly quantized, their block scales (max/6 < 2^-9) underflow E4M3 and the blocks vanish."""
    q, k, v = make_qkv(1, 2, 256, 64, seqlen_k=2048, kind="sink", seed=3)
    s = q.double() @ k.double().transpose(-1, -2) / 8
    p = torch.exp(s - s.amax(-1, keepdim=True)).float()
    exact = p.double() @ v.double() / p.double().sum(-1, keepdim=True)
    err = {}
    for two in (True, False):
        pp = p * 2688 if two else p
        out = quantize_p(pp, "nvfp4").double() @ v.double() / pp.double().sum(-1, keepdim=True)
        err[two] = float((out - exact).abs().sum() / exact.abs().sum())
    assert err[True] < err[False] / 3, err


def test_orderings_of_the_paper_on_realistic_inputs():
    """Table 1: NVFP4 beats MXFP4; two-level P beats direct (sink inputs); smoothing Q and K helps."""
    q, k, v = make_qkv(1, 4, 512, 64, kind="sink", seed=3)
    nv, mx = acc_of(q, k, v), acc_of(q, k, v, scale_format="mxfp4")
    assert nv.rel_l1 < 0.8 * mx.rel_l1 and nv.cos_sim > mx.cos_sim, (nv, mx)
    q, k, v = make_qkv(1, 4, 128, 128, seqlen_k=2048, kind="sink", seed=3)
    two, direct = acc_of(q, k, v), acc_of(q, k, v, two_level_p=False)
    assert two.rel_l1 < 0.95 * direct.rel_l1, (two, direct)
    q, k, v = make_qkv(1, 4, 512, 64, kind="qk_bias", seed=3)
    both, none = acc_of(q, k, v), acc_of(q, k, v, smooth_q=False, smooth_k=False)
    only_k, only_q = acc_of(q, k, v, smooth_q=False), acc_of(q, k, v, smooth_k=False)
    assert both.rel_l1 < min(only_k.rel_l1, only_q.rel_l1) and max(only_k.rel_l1, only_q.rel_l1) < none.rel_l1


# Measured (emulation, N=512, 4 heads; cos / relL1): k_bias 0.9816 / 0.19, qk_bias 0.992 / 0.125,
# sink 0.995 / 0.095. Asserted with a margin as a regression guard.
@pytest.mark.parametrize("kind,cos_min,l1_max", [("k_bias", 0.978, 0.21), ("qk_bias", 0.988, 0.14), ("sink", 0.992, 0.11)])
def test_accuracy_regression_guard(kind, cos_min, l1_max):
    q, k, v = make_qkv(1, 4, 512, 64, kind=kind, seed=3)
    a = acc_of(q, k, v)
    assert a.cos_sim >= cos_min and a.rel_l1 <= l1_max, a


KERNEL_CASES = [
    # (dtype, causal, (hq, hkv), layout, (nq, nk), d, options)
    (FP16, False, (2, 2), "HND", (128, 128), 64, {}),
    (BF16, True, (2, 1), "HND", (77, 300), 96, {}),
    (FP16, True, (2, 2), "NHD", (150, 100), 128, dict(scale_format="mxfp4")),
    (FP16, False, (2, 1), "HND", (100, 130), 64, dict(two_level_p=False, smooth_q=False)),
    (BF16, False, (2, 2), "NHD", (1, 40), 32, dict(smooth_k=False)),
]


@pytest.mark.parametrize("dtype,causal,heads,layout,lens,d,opts", KERNEL_CASES)
def test_triton_kernel_agrees_with_emulation(dtype, causal, heads, layout, lens, d, opts):
    """Both dequantize exactly and quantize P with the same rules from the same KV tiles; only
    fp32 summation order and exp2 differ, which can flip an FP4 rounding of P now and then.
    Under the interpreter they agree to rounding; on the GPU within a small fraction of the error."""
    (hq, hkv), (nq, nk) = heads, lens
    q, k, v = (t.to(KERNEL_DEVICE) for t in make_qkv(1, hq, nq, d, seqlen_k=nk, heads_kv=hkv, dtype=dtype,
                                                      layout=layout, seed=d + nq))
    k_vs_e, e_vs_ref = kernel_vs_emulation(sage3.sageattn, q, k, v, tensor_layout=layout, is_causal=causal, **opts)
    assert k_vs_e.rel_l1 <= 0.1 * e_vs_ref.rel_l1, (k_vs_e, e_vs_ref)


def test_fp4_hardware_and_bad_options():
    assert sage3.fp4_hardware() is (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 10)
    q, k, v = make_qkv(1, 1, 8, 64)
    with pytest.raises(ValueError, match=r"scale_format must be one of \['nvfp4', 'mxfp4'\], got 'fp4'"):
        sage3.sageattn(q, k, v, scale_format="fp4")
    with pytest.raises(TypeError, match="two_level_p must be a bool"):
        sage3.sageattn(q, k, v, two_level_p=1)
    q.requires_grad_(True)
    with pytest.raises(RuntimeError, match="sage3.sageattn_train"):
        sage3.sageattn(q, k, v)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_inputs_unchanged_lse_and_rows_without_keys(backend):
    q, k, v = (t.to(KERNEL_DEVICE) for t in make_qkv(1, 2, 150, 64, seqlen_k=60, seed=6))
    copies = [t.clone() for t in (q, k, v)]
    out, lse = sage3.sageattn(q, k, v, is_causal=True, backend=backend, return_lse=True)
    for a, b in zip((q, k, v), copies):
        assert torch.equal(a, b)
    assert torch.isfinite(out).all() and (out[:, :, :90] == 0).all()
    _, lse_ref = attention_reference(q, k, v, is_causal=True, return_lse=True)
    fin = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), fin) and (lse.double() - lse_ref)[fin].abs().max() < 0.3


@gpu
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_kernel_vs_emulation_at_real_size(d):
    q, k, v = make_qkv(2, 8, 2048, d, device="cuda", seed=1)
    a = sage3.sageattn(q, k, v, is_causal=True, backend="triton")  # (the Hopper kernel: test_sage3_cuda.py)
    b = sage3.sageattn(q, k, v, is_causal=True, backend="torch")
    ref = attention_reference(q, k, v, is_causal=True)
    assert accuracy(b.double(), a).rel_l1 <= 0.1 * accuracy(ref, b).rel_l1


@pytest.mark.parametrize("fmt,dtype,causal", [("nvfp4", FP16, False), ("mxfp4", BF16, True), ("nvfp4", BF16, True)])
def test_kernel_variants_compute_the_same_numbers(fmt, dtype, causal):
    """The speed variants change where the work is done, not the numbers: K and V dequantized to
    16 bits by a pass before the kernel instead of in registers, and the 6-op magic-number E2M1
    rounding of P instead of 7 compare/select pairs."""
    from common.smoothing import q_smoothing_delta_s
    from sage3.kernel import launch

    q, k, v = (t.to(KERNEL_DEVICE) for t in make_qkv(1, 2, 150, 64, seqlen_k=200, dtype=dtype, seed=3))
    qf = quantize_qkv_fp4(q, k, v, fmt=fmt, smooth_q=True, smooth_k=True, backend="triton")
    ds = q_smoothing_delta_s(qf.q_block_mean, k, qf.k_mean, tf32=True)
    outs = []
    for pre, magic in [(False, False), (True, False), (False, True), (True, True)]:
        o = torch.zeros_like(q)
        lse = launch(qf, o, sm_scale=0.125, delta_s=ds, is_causal=causal, two_level_p=True, op_dtype=dtype,
                     return_lse=True, pre_unpack=pre, magic_round=magic)
        outs.append((o, lse))
    for o, lse in outs[1:]:
        assert torch.equal(o, outs[0][0]) and torch.equal(lse, outs[0][1])


@pytest.mark.parametrize("case", ["large_v", "large_q_small_k", "tiny"])
def test_global_scale_keeps_out_of_range_inputs_accurate(case):
    """Without a per-tensor scale (the paper) E4M3 block scales saturate at 448 (|x| > ~2.7e3 is
    clipped) and underflow below 2^-9; global_scale=True fixes both and leaves ordinary inputs alone."""
    q, k, v = make_qkv(1, 2, 160, 64, kind="k_bias", dtype=torch.float32, seed=21)
    base_in = [t.to(torch.bfloat16) for t in (q, k, v)]
    base = accuracy(attention_reference(*base_in), sage3.sageattn(*base_in, backend="torch"))
    if case == "large_v":
        v = v * 1e4
    elif case == "large_q_small_k":
        q, k = q * 3e3, k / 3e3
    else:
        q, k, v = q * 1e-3, k * 1e3, v * 1e-4
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    ref = attention_reference(q, k, v)
    plain = accuracy(ref, sage3.sageattn(q, k, v, backend="torch"))
    scaled = accuracy(ref, sage3.sageattn(q, k, v, backend="torch", global_scale=True))
    # the same accuracy as on the in-range inputs (same scores and weights), where the plain call loses it
    assert scaled.cos_sim > base.cos_sim - 0.003 and plain.cos_sim < base.cos_sim - 0.1, (base, plain, scaled)


@pytest.mark.parametrize("causal", [False, True])
def test_global_scale_kernel_matches_emulation_and_ordinary_inputs_keep_their_accuracy(causal):
    q, k, v = make_qkv(1, 4, 150, 64, heads_kv=2, kind="k_bias", dtype=torch.bfloat16, seed=22)
    k_vs_e, e_vs_ref = kernel_vs_emulation(sage3.sageattn, *(t.to(KERNEL_DEVICE) for t in (q, k, v)),
                                           tensor_layout="HND", is_causal=causal, global_scale=True)
    assert k_vs_e.cos_sim > 0.999, k_vs_e
    plain = accuracy(attention_reference(q, k, v, is_causal=causal), sage3.sageattn(q, k, v, is_causal=causal,
                                                                                    backend="torch"))
    assert e_vs_ref.cos_sim > plain.cos_sim - 0.002, (e_vs_ref, plain)


def test_global_scale_keeps_the_nan_rule():
    """With global_scale the NaN/Inf check comes from the same maxima: NaN only on the rows SDPA makes NaN."""
    q, k, v = make_qkv(1, 2, 100, 64, kind="k_bias", seed=23)
    k[0, 0, 50, 3] = float("nan")
    out = sage3.sageattn(q, k, v, global_scale=True, backend="torch")
    assert torch.isnan(out[0, 0]).all() and torch.isfinite(out[0, 1]).all()
    ref = attention_reference(q[:, 1:], k[:, 1:], v[:, 1:])
    assert accuracy(ref, out[:, 1:]).cos_sim > 0.97
