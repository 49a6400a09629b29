"""SageAttention2: the emulation against exact attention (and the paper's orderings), the Triton
kernel against the emulation, the FP8 accumulator model, options and invariants."""

import itertools
import math
from fractions import Fraction

import pytest
import torch

import sage2
import sage2.emulation
import sage2.quant_v
from common import quant
from common.inputs import make_qkv
from common.int_qk import quantize_qk
from common.metrics import accuracy
from common.reference import attention_reference
from conftest import KERNEL_DEVICE, gpu, kernel_vs_emulation
from sage2.emulation import fp8_mma, truncate_to_fp22

FP16, BF16 = torch.float16, torch.bfloat16


def acc_of(q, k, v, layout="HND", causal=False, **kw):
    ref = attention_reference(q, k, v, tensor_layout=layout, is_causal=causal)
    out = sage2.sageattn(q, k, v, tensor_layout=layout, is_causal=causal, backend="torch", **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    return accuracy(ref, out)


MATRIX = list(itertools.product([FP16, BF16], [False, True], [(4, 4), (4, 2), (4, 1)], ["HND", "NHD"],
                                [(1, 1), (77, 77), (300, 300), (77, 300), (300, 77)], [64, 96, 128]))


@pytest.mark.parametrize("dtype,causal,heads,layout,lens,d", MATRIX[::5] + MATRIX[2::11])
def test_int8_defaults_vs_exact_on_k_bias_inputs(dtype, causal, heads, layout, lens, d):
    """SageAttn2-8b (INT8 per-thread, K smoothing, FP8 E4M3 PV, two-level): the bar's accuracy
    (cos >= 0.9992, relL1 <= 0.04) at small sizes, with a little room for short rows."""
    (hq, hkv), (nq, nk) = heads, lens
    q, k, v = make_qkv(1, hq, nq, d, seqlen_k=nk, heads_kv=hkv, dtype=dtype, layout=layout, seed=nq * 3 + d)
    a = acc_of(q, k, v, layout, causal)
    assert a.cos_sim >= 0.999 and a.rel_l1 <= 0.045, a


def test_smoothing_ordering_matches_the_paper_int4():
    """Table 4 ordering on inputs with per-channel bias in Q and K: no smoothing < K only < Q+K."""
    q, k, v = make_qkv(1, 4, 512, 128, kind="qk_bias", seed=3)
    none = acc_of(q, k, v, qk_dtype="int4", smooth_q=False, smooth_k=False)
    k_only = acc_of(q, k, v, qk_dtype="int4", smooth_q=False)
    both = acc_of(q, k, v, qk_dtype="int4")  # smooth_q defaults to on for int4
    assert none.rel_l1 > 1.5 * k_only.rel_l1 > 1.5 * 1.5 * both.rel_l1, (none, k_only, both)
    assert none.cos_sim < k_only.cos_sim < both.cos_sim


def test_granularity_ordering_matches_the_paper_int4():
    """Table 6: per-token ~ per-thread, better than per-warp/per-block, better than per-tensor."""
    q, k, v = make_qkv(1, 4, 512, 64, kind="qk_bias", seed=3)
    l1 = {g: acc_of(q, k, v, qk_dtype="int4", qk_granularity=g).rel_l1
          for g in ("per_token", "per_thread", "per_warp", "per_block", "per_tensor")}
    assert l1["per_token"] < l1["per_thread"] < l1["per_warp"] < l1["per_tensor"], l1
    assert l1["per_thread"] < l1["per_block"] < l1["per_tensor"], l1


def test_int8_beats_int4():
    q, k, v = make_qkv(1, 4, 256, 128, kind="qk_bias", seed=2)
    assert acc_of(q, k, v).rel_l1 < 0.5 * acc_of(q, k, v, qk_dtype="int4").rel_l1


def test_pv_dtype_ordering_e4m3_beats_e5m2():
    """Table 7: FP16 > E4M3 > E5M2 for P and V."""
    q, k, v = make_qkv(1, 4, 512, 64, kind="k_bias", seed=4)
    l1 = {p: acc_of(q, k, v, pv_dtype=p).rel_l1 for p in ("fp16", "fp8_e4m3", "fp8_e5m2")}
    assert l1["fp16"] < l1["fp8_e4m3"] < 0.8 * l1["fp8_e5m2"], l1


def test_two_level_accumulation_beats_single_accumulator():
    """Long rows and V with channel bias (large accumulator values): one running FP8-MMA
    accumulator (13 mantissa bits, truncated at every k32 MMA) loses to two-level; smoothing V
    removes most of the problem (Table 10)."""
    q, k, v = make_qkv(1, 2, 128, 64, seqlen_k=8192, kind="v_bias", seed=5)
    two = acc_of(q, k, v)
    single = acc_of(q, k, v, pv_accum="single")
    smooth = acc_of(q, k, v, pv_accum="single", smooth_v=True)
    assert single.rel_l1 > 3 * two.rel_l1, (single, two)
    assert smooth.rel_l1 < 0.5 * two.rel_l1


@pytest.mark.parametrize("kind", ["k_bias", "v_bias", "sink"])
def test_cuda_kernel_arithmetic_is_as_accurate_as_the_papers(kind, monkeypatch):
    """The CUDA kernel's softmax arithmetic (sage2.emulation.ARITHMETIC = "cuda_sm90": the exponent
    by one FMA on MAGIC + S, l summing fp8(P) in the PV MMA, so out is a weighted mean of V's rows
    with the weights fp8(P)) against the paper's (l sums the fp32 p): as accurate within 2% (sink: 1.1% worse here,
    equal at 1024 queries), and clearly more accurate where V has a large per-channel mean (v_bias:
    the weights' FP8 rounding errors no longer leak the mean into the output)."""
    q, k, v = make_qkv(1, 4, 512, 128, kind=kind, seed=7)
    ref = attention_reference(q, k, v)
    out_p, lse_p = sage2.sageattn(q, k, v, backend="torch", return_lse=True)
    monkeypatch.setattr(sage2.emulation, "ARITHMETIC", "cuda_sm90")
    out_m, lse_m = sage2.sageattn(q, k, v, backend="torch", return_lse=True)
    a_p, a_m = accuracy(ref, out_p), accuracy(ref, out_m)
    assert a_m.rel_l1 <= 1.02 * a_p.rel_l1 and a_m.cos_sim >= a_p.cos_sim - 1e-6, (a_m, a_p)
    if kind == "v_bias":
        assert a_m.rel_l1 <= 0.85 * a_p.rel_l1, (a_m, a_p)
    assert 0 < (lse_m - lse_p).abs().max() < 0.02  # a sum of fp8(p), not of p: close, not equal


def round_to_fp32(q: Fraction) -> float:
    """The fp32 nearest to the rational q, ties to even (normal range)."""
    if q == 0:
        return 0.0
    a = abs(q)
    e = a.numerator.bit_length() - a.denominator.bit_length()  # 2^e <= a < 2^(e+1), after the fix-ups
    while Fraction(2) ** e > a:
        e -= 1
    while Fraction(2) ** (e + 1) <= a:
        e += 1
    quantum = Fraction(2) ** (max(e, -126) - 23)
    n, rem = divmod(a, quantum)
    if rem > quantum / 2 or (rem == quantum / 2 and n % 2 == 1):
        n += 1
    return math.copysign(float(n * quantum), q)


def test_cuda_arithmetic_computes_the_exponent_as_the_kernels_fma():
    """Sm90Softmax.exponent_argument is the kernel's fmaf(MAGIC + S, sc, -fmaf(MAGIC, sc, shift)) bit
    for bit, against exact rational arithmetic rounded once per fmaf; and it is not the paper's
    fp32(S * sc) - shift (which differs from it here and there)."""
    from sage2.emulation import MAGIC, Sm90Softmax

    g = torch.Generator().manual_seed(3)
    n = 400
    s_int = torch.randint(-2 ** 21, 2 ** 21, (n,), generator=g).float()
    sc = (torch.rand(n, generator=g) * 1e-4 + 1e-8).float()
    shift = (torch.rand(n, generator=g) * 40 - 20).float()
    x = Sm90Softmax.exponent_argument(s_int, sc, shift)
    for i in range(n):
        S, c, h = Fraction(int(s_int[i])), Fraction(float(sc[i])), Fraction(float(shift[i]))
        bias = -Fraction(round_to_fp32(Fraction(MAGIC) * c + h))
        assert float(x[i]) == round_to_fp32((Fraction(MAGIC) + S) * c + bias), i
    paper = s_int * sc - shift
    assert (paper != x).any() and torch.allclose(paper, x, rtol=0, atol=1e-3)


@pytest.mark.parametrize("kind", ["k_bias", "sink", "heavy_tail"])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_arithmetic_lse_within_one_fp8_rounding_of_the_papers(kind, causal, monkeypatch):
    """With l summing fp8(p) (round to nearest: each within 2^-4 of p), every row's LSE is within
    log(1 + 2^-4) of the paper's (l summing p), plus a little for the FMA's exponent argument and the
    MMA's truncation; on average far closer (rounding errors cancel in the sum). With the GPU test of
    the kernel against this emulation (LSE within 1e-3), this bounds the CUDA kernel's LSE."""
    q, k, v = make_qkv(1, 4, 300, 128, kind=kind, seed=2)
    _, lse_p = sage2.sageattn(q, k, v, is_causal=causal, backend="torch", return_lse=True)
    monkeypatch.setattr(sage2.emulation, "ARITHMETIC", "cuda_sm90")
    _, lse_c = sage2.sageattn(q, k, v, is_causal=causal, backend="torch", return_lse=True)
    d = (lse_c - lse_p).abs()
    assert d.max() <= math.log1p(2 ** -4) + 1e-3 and d.mean() < 0.005, (d.max(), d.mean())


def test_arithmetic_option_is_checked():
    from sage2.emulation import attention_emulated

    q, k, v = make_qkv(1, 2, 64, 64, seed=1)
    qk = quantize_qk(q, k, sm_scale=0.125, granularity="per_thread", q_block=64, k_block=128, warp_rows=16,
                     backend="torch")
    qv = sage2.quant_v.quantize_v(v, "fp8_e4m3", smooth_v=False, backend="torch", dp=64)
    with pytest.raises(ValueError, match=r"arithmetic must be one of \('paper', 'cuda_sm90'\), got 'cuda'"):
        attention_emulated(qk, qv, delta_s=None, is_causal=False, pv_dtype="fp8_e4m3", pv_accum="two_level",
                           arithmetic="cuda")
    with pytest.raises(ValueError, match="FP8 P V with two-level accumulation, no Q smoothing, no attn_mask"):
        attention_emulated(qk, qv, delta_s=None, is_causal=False, pv_dtype="fp8_e4m3", pv_accum="single",
                           arithmetic="cuda_sm90")


def test_fp22_accumulator_model():
    """The probe of sage2.md: an addend with <= 13 mantissa bits passes, else its low 10 bits go."""
    x = torch.tensor([1.0, 1.0 + 2.0 ** -13, 1.0 + 2.0 ** -14, 3.0 + 2.0 ** -20, -1.0 - 2.0 ** -12 - 2.0 ** -20])
    assert truncate_to_fp22(x).tolist() == [1.0, 1.0 + 2.0 ** -13, 1.0, 3.0, -1.0 - 2.0 ** -12]
    p8 = torch.zeros(1, 64).to(torch.float8_e4m3fn)
    v8 = torch.zeros(64, 2).to(torch.float8_e4m3fn)
    acc = torch.tensor([[1.0 + 2.0 ** -20, 5.0]])
    assert fp8_mma(p8, v8, acc, model_fp22=True).tolist() == [[1.0, 5.0]]
    assert fp8_mma(p8, v8, acc, model_fp22=False).tolist() == acc.tolist()


def _wide_range(shape, seed, dtype=torch.bfloat16):
    """Tokens whose magnitudes span bf16's range (2^-120 .. 2^100 by row and channel), with
    values on and beside the INT8 rounding boundaries (k + 1/2) * absmax / 127 of their row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.rand(shape, generator=g)
    *lead, n, d = shape
    row_exp = torch.randint(-120, 100, (*lead, n, 1), generator=g).float()
    x = x * torch.exp2(row_exp + torch.randint(-4, 4, (*lead, 1, d), generator=g).float())
    absmax = x.abs().amax(-1, keepdim=True)
    k = torch.randint(0, 127, x.shape, generator=g).float() + 0.5
    near = torch.rand(x.shape, generator=g) < 0.3
    x = torch.where(near, torch.sign(x) * k * absmax / 127, x)
    return x.to(dtype)


@pytest.mark.parametrize("gran", ["per_thread", "per_token", "per_block"])
def test_quantization_passes_divide_exactly_over_the_whole_range(gran):
    """The passes divide by their scales with a reciprocal and FMA corrections on the GPU
    (common.triton_quant.div_by_scale): the codes are still the correctly rounded quotient's,
    as PyTorch's division gives them, for values from 2^-120 to 2^100 and on rounding boundaries."""
    q = _wide_range((1, 2, 512, 128), seed=1).to(KERNEL_DEVICE)
    k = _wide_range((1, 2, 512, 128), seed=2).to(KERNEL_DEVICE)
    kw = dict(sm_scale=1.0, granularity=gran, smooth_k=False, q_block=64, k_block=128, warp_rows=16)
    a = quantize_qk(q, k, backend="triton", **kw)
    b = quantize_qk(q, k, backend="torch", **kw)
    assert torch.equal(a.q_scale_per_token(), b.q_scale_per_token())
    assert torch.equal(a.k_scale_per_token(), b.k_scale_per_token())
    assert torch.equal(a.q_codes, b.q_codes) and torch.equal(a.k_codes, b.k_codes)
    assert (a.q_codes.abs() == 127).any()
    if gran != "per_block":  # (a block's scale follows its largest row)
        assert (a.q_scale_per_token() < 2.0 ** -60).any()  # the tiny-scale path ran
    from sage2.quant_v import quantize_v

    v = _wide_range((1, 2, 512, 128), seed=3)
    v[0, 0, :7] = -0.0
    v = v.to(KERNEL_DEVICE)
    a = quantize_v(v, "fp8_e4m3", smooth_v=False, backend="triton", dp=128)
    b = quantize_v(v, "fp8_e4m3", smooth_v=False, backend="torch")
    assert torch.equal(a.scale, b.scale)
    # (as values: the interpreter's FP8 rounding turns -0 into +0, the GPU's keeps it)
    assert torch.equal(a.codes[..., :512].transpose(-1, -2).float(), b.codes.float())


def test_int4_codes_are_in_range_and_smooth_q_default():
    q, k, _ = make_qkv(1, 2, 100, 64, kind="qk_bias")
    qk = quantize_qk(q, k, sm_scale=0.125, granularity="per_thread", bits=4, q_block=64, k_block=128, warp_rows=16)
    assert qk.q_codes.abs().max() == 7 and qk.k_codes.abs().max() == 7


@pytest.mark.parametrize("gran", ["per_thread", "per_warp", "per_block", "per_token"])
@pytest.mark.parametrize("bits", [8, 4])
def test_triton_quantization_matches_pytorch_bit_for_bit(gran, bits):
    q, k, _ = (t.to(KERNEL_DEVICE) for t in make_qkv(2, 4, 300, 96, seqlen_k=200, heads_kv=2, layout="NHD", seed=2))
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    kw = dict(sm_scale=0.1, granularity=gran, bits=bits, q_block=64, k_block=128, warp_rows=16)
    a = quantize_qk(q, k, backend="triton", **kw)
    b = quantize_qk(q, k, backend="torch", **kw)
    for x, y in ((a.q_codes, b.q_codes), (a.k_codes, b.k_codes)):
        assert torch.equal(x, y)
    assert torch.equal(a.q_scale_per_token(), b.q_scale_per_token())
    assert torch.equal(a.k_scale_per_token(), b.k_scale_per_token())


def test_triton_quantization_with_q_smoothing_matches_up_to_summation_order():
    q, k, _ = (t.to(KERNEL_DEVICE) for t in make_qkv(2, 4, 300, 64, kind="qk_bias", seed=2))
    kw = dict(sm_scale=0.125, granularity="per_thread", bits=4, q_block=64, k_block=128, warp_rows=16, smooth_q=True)
    a = quantize_qk(q, k, backend="triton", **kw)
    b = quantize_qk(q, k, backend="torch", **kw)
    torch.testing.assert_close(a.q_block_mean, b.q_block_mean, rtol=1e-5, atol=1e-6)
    diff = (a.q_codes.int() - b.q_codes.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


def test_per_thread_scales_follow_the_documented_mapping():
    q, k, _ = make_qkv(1, 1, 128, 64, seed=1)
    qk = quantize_qk(q, k, sm_scale=0.125, granularity="per_thread", q_block=64, k_block=128, warp_rows=16,
                     smooth_k=False)
    qs, ks = qk.q_scale_per_token()[0, 0], qk.k_scale_per_token()[0, 0]
    qf = q[0, 0].float() * qk.q_multiplier
    for tok in range(128):  # Q: rows {g, g+8} of each 16-row slice share a scale
        base = tok - tok % 16 + tok % 8
        assert qs[tok] == torch.maximum(qf[base].abs().max(), qf[base + 8].abs().max()) / 127
    kf = k[0, 0].float()
    for t in range(4):  # K: tokens {8m+2t, 8m+2t+1} share a scale
        toks = [8 * m + 2 * t + j for m in range(16) for j in range(2)]
        assert (ks[toks] == kf[toks].abs().max() / 127).all()
    g = quant.groups_per_thread_q(128, 64, 16)
    assert torch.equal(qs, quant.token_scales(torch.zeros(int(g.max()) + 1).scatter_reduce(0, g, qs, "amax"), g))


KERNEL_CASES = [
    # (dtype, causal, (hq, hkv), layout, (nq, nk), d, options)
    (FP16, False, (4, 4), "HND", (128, 128), 64, {}),
    (FP16, True, (4, 2), "NHD", (300, 300), 128, {}),
    (BF16, False, (4, 1), "HND", (77, 300), 96, {}),
    (FP16, True, (4, 2), "HND", (300, 77), 64, dict(qk_dtype="int4")),
    (FP16, False, (2, 2), "NHD", (200, 260), 128, dict(qk_dtype="int4", qk_granularity="per_warp", smooth_v=True)),
    (BF16, True, (2, 1), "HND", (129, 129), 64, dict(pv_dtype="fp8_e5m2", qk_granularity="per_block")),
    (FP16, False, (2, 2), "HND", (65, 200), 64, dict(pv_dtype="fp16", qk_granularity="per_token")),
    (FP16, False, (2, 2), "HND", (100, 300), 64, dict(pv_accum="single", qk_granularity="per_tensor")),
    (FP16, True, (2, 2), "HND", (1, 50), 32, dict(smooth_q=True)),
]


@pytest.mark.parametrize("dtype,causal,heads,layout,lens,d,opts", KERNEL_CASES)
def test_triton_kernel_agrees_with_emulation(dtype, causal, heads, layout, lens, d, opts):
    """Same quantized inputs and arithmetic; they differ in exp2 (approximate on GPU), summation
    order within MMAs and so rare rounding flips of P's FP8 codes. Agreement must be far closer
    than either's error against exact attention."""
    (hq, hkv), (nq, nk) = heads, lens
    q, k, v = (t.to(KERNEL_DEVICE) for t in make_qkv(2, hq, nq, d, seqlen_k=nk, heads_kv=hkv, dtype=dtype,
                                                      layout=layout, seed=d + nq))
    k_vs_e, e_vs_ref = kernel_vs_emulation(sage2.sageattn, q, k, v, tensor_layout=layout, is_causal=causal, **opts)
    assert k_vs_e.rel_l1 <= max(0.1 * e_vs_ref.rel_l1, 1e-6) and k_vs_e.rel_l1 <= 3e-3, (k_vs_e, e_vs_ref)


def test_lse_matches_exact_with_q_and_k_smoothing():
    q, k, v = make_qkv(2, 4, 150, 64, seqlen_k=100, heads_kv=2, kind="qk_bias", seed=1)
    _, lse_ref = attention_reference(q, k, v, is_causal=True, return_lse=True)
    for opts in ({}, dict(qk_dtype="int4"), dict(pv_dtype="fp16"), dict(smooth_v=True)):
        _, lse = sage2.sageattn(q, k, v, is_causal=True, return_lse=True, backend="torch", **opts)
        fin = torch.isfinite(lse_ref)
        assert torch.equal(torch.isfinite(lse), fin)
        tol = 0.6 if opts.get("qk_dtype") == "int4" else 0.1
        assert (lse.double() - lse_ref)[fin].abs().max() < tol, opts


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_inputs_unchanged_and_rows_without_keys_are_zero(backend):
    q, k, v = (t.to(KERNEL_DEVICE) for t in make_qkv(1, 2, 200, 64, seqlen_k=50, kind="v_bias", seed=6))
    copies = [t.clone() for t in (q, k, v)]
    out = sage2.sageattn(q, k, v, is_causal=True, backend=backend, qk_dtype="int4", smooth_v=True)
    for a, b in zip((q, k, v), copies):
        assert torch.equal(a, b)
    assert torch.isfinite(out).all() and (out[:, :, :150] == 0).all()


def test_requires_grad_and_bad_options():
    q, k, v = make_qkv(1, 1, 8, 64)
    with pytest.raises(ValueError, match=r"qk_dtype must be one of \['int8', 'int4'\], got 'int2'"):
        sage2.sageattn(q, k, v, qk_dtype="int2")
    with pytest.raises(ValueError, match=r"pv_dtype must be one of \['fp8_e4m3', 'fp8_e5m2', 'fp16'\]"):
        sage2.sageattn(q, k, v, pv_dtype="int8")
    with pytest.raises(ValueError, match=r"pv_accum must be one of \['two_level', 'single'\]"):
        sage2.sageattn(q, k, v, pv_accum="fp32")
    with pytest.raises(ValueError, match=r"qk_granularity must be one of \['per_thread', 'per_warp'"):
        sage2.sageattn(q, k, v, qk_granularity="per_channel")
    with pytest.raises(TypeError, match="smooth_q must be a bool"):
        sage2.sageattn(q, k, v, smooth_q="yes")
    q.requires_grad_(True)
    with pytest.raises(RuntimeError, match="sage3.sageattn_train"):
        sage2.sageattn(q, k, v)


def test_empty_inputs():
    q, k, v = make_qkv(1, 2, 8, 64)
    assert sage2.sageattn(q[:, :, :0], k, v).shape == (1, 2, 0, 64)
    out, lse = sage2.sageattn(q, k[:, :, :0], v[:, :, :0], return_lse=True)
    assert (out == 0).all() and torch.isinf(lse).all()


# ---------------------------------------------------------------------------------------------
# GPU (run on the device)
# ---------------------------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_accuracy_at_real_size(d, causal):
    q, k, v = make_qkv(2, 8, 4096, d, device="cuda", seed=1)
    a = accuracy(attention_reference(q, k, v, is_causal=causal), sage2.sageattn(q, k, v, is_causal=causal))
    assert a.cos_sim >= 0.9992 and a.rel_l1 <= 0.04, a


@gpu
@pytest.mark.parametrize("pv_accum", ["two_level", "single"])
def test_gpu_kernel_matches_the_fp22_accumulator_model(pv_accum, capsys):
    """On Hopper the kernel's FP8 accumulation behaves as the emulation's FP22 model says. Other
    candidate models are scored too and printed, so a mismatch says which behaviour the GPU has."""
    import sage2.emulation as emu
    from sage2.kernel import PV_SINGLE, PV_TWO_LEVEL, launch
    from sage2.quant_v import quantize_v

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the FP22 accumulator model is for Hopper")
    q, k, v = make_qkv(1, 4, 256, 64, seqlen_k=8192, kind="v_bias", device="cuda", seed=3)
    qk = quantize_qk(q, k, sm_scale=0.125, granularity="per_thread", q_block=64, k_block=128, warp_rows=16, backend="triton")
    out = torch.empty(q.shape, dtype=torch.float32, device="cuda")
    launch(qk, quantize_v(v, "fp8_e4m3", smooth_v=False, backend="triton", dp=64), out, delta_s=None, is_causal=False,
           pv_dtype="fp8_e4m3", pv_mode=PV_SINGLE if pv_accum == "single" else PV_TWO_LEVEL, log2_pscale=8.807354922057604,
           return_lse=False, config=(128, 128, 8, 3), k_per_thread=True)
    qv = quantize_v(v, "fp8_e4m3", smooth_v=False, backend="torch")

    def run(model_fp22=True):
        return emu.attention_emulated(qk, qv, delta_s=None, is_causal=False, pv_dtype="fp8_e4m3", pv_accum=pv_accum,
                                      hopper_fp8_accumulator=model_fp22)[0]

    scores = {"model (emulation default)": accuracy(run().double(), out).rel_l1,
              "fp32 accumulation": accuracy(run(False).double(), out).rel_l1}
    for bits in (12, 13, 14):
        emu.FP8_ACCUMULATOR_MODEL, saved = "aligned", emu.FP8_ACCUMULATOR_MODEL
        old_sum = emu.aligned_truncation_sum
        emu.aligned_truncation_sum = lambda t, mant_bits=13, b=bits, f=old_sum: f(t, b)
        try:
            scores[f"aligned truncation, {bits} bits"] = accuracy(run().double(), out).rel_l1
        finally:
            emu.FP8_ACCUMULATOR_MODEL, emu.aligned_truncation_sum = saved, old_sum
    original = emu.fp8_mma
    for name, chunk, where in (("result truncated per k32 MMA", 32, "result"), ("addend truncated per k64", 64, "addend"),
                               ("addend truncated per k16", 16, "addend")):
        def alt(p8, v8, acc, model_fp22, chunk=chunk, where=where):
            pf, vf = p8.float(), v8.float()
            for k0 in range(0, pf.shape[-1], chunk):
                part = pf[..., k0:k0 + chunk] @ vf[..., k0:k0 + chunk, :]
                if acc is None:
                    acc = emu.truncate_to_fp22(part) if where == "result" else part
                else:
                    acc = emu.truncate_to_fp22(acc + part) if where == "result" else emu.truncate_to_fp22(acc) + part
            return acc
        emu.fp8_mma = alt
        try:
            scores[name] = accuracy(run().double(), out).rel_l1
        finally:
            emu.fp8_mma = original
    with capsys.disabled():
        print(f"\n[{pv_accum}] kernel vs candidate accumulator models (relL1):", scores)
    d_model, d_exact = scores["model (emulation default)"], scores["fp32 accumulation"]
    if pv_accum == "single":
        assert d_model == min(scores.values()) and d_model < 0.5 * d_exact, scores
    else:
        assert d_model < 2e-3 and d_exact < 2e-3, scores


@gpu
def test_gpu_probe_how_triton_accumulates_fp8_dots():
    from sage2.probe import probe_fp8_accumulator

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the FP22 accumulator is Hopper's")
    r = probe_fp8_accumulator()
    assert r["default (imprecise)"] == 10 and r["max_num_imprecise_acc=K (promoted)"] == 0, r


@pytest.mark.parametrize("smooth_v", [False, True])
def test_v_scan_and_fp8_pass_with_nonfinite_values_match_pytorch(smooth_v):
    """V's Triton scan: max |V - mean| over finite values per channel (and of the whole tensor) and
    V's first bad key per (batch, head); then the FP8 pass's codes and scales equal the PyTorch
    quantizer's on the zeroed values."""
    from common.nonfinite import NO_BAD_KEY, NonfiniteFlags, finite_mean, zeroed
    from common.range_guard import finite_absmax
    from common.smoothing import v_channel_mean
    from sage2.quant_v import channel_absmax, quantize_v

    v = make_qkv(2, 2, 150, 64, kind="v_bias", seed=9)[2]
    v[0, 1, 90, 7] = float("nan")
    v[0, 1, 30, 2] = float("-inf")                                # first bad key of (0, 1): 30
    v[1, 0, 149, 63] = float("inf")
    dv = v.to(KERNEL_DEVICE)
    mean = finite_mean(v_channel_mean(dv)) if smooth_v else None
    want = channel_absmax(zeroed(v) - (mean.cpu() if smooth_v else 0))
    flags = NonfiniteFlags(torch.zeros(1, dtype=torch.uint8, device=KERNEL_DEVICE),
                           torch.zeros(4, dtype=torch.int32, device=KERNEL_DEVICE))
    got = finite_absmax(dv, torch.zeros(2 * 2 * 64, dtype=torch.int32, device=KERNEL_DEVICE), per_channel=True,
                        mean=mean, flags=flags)
    assert torch.equal(got.cpu(), want)
    assert torch.equal(flags.first_bad.cpu(), torch.tensor([0, NO_BAD_KEY - 30, NO_BAD_KEY - 149, 0], dtype=torch.int32))
    whole = finite_absmax(dv, torch.zeros(1, dtype=torch.int32, device=KERNEL_DEVICE), per_channel=False)
    assert whole.item() == channel_absmax(zeroed(v)).max().item()      # sage1's fp16 guard: no mean
    a = quantize_v(dv, "fp8_e4m3", smooth_v=smooth_v, backend="triton", dp=64, zero_nonfinite=True)
    # (on the same device: V's mean is a reduction whose rounding differs between CPU and GPU)
    b = quantize_v(dv, "fp8_e4m3", smooth_v=smooth_v, backend="torch", zero_nonfinite=True)
    assert torch.equal(a.scale.cpu(), b.scale.cpu())
    n = v.shape[2]
    codes = a.codes.cpu()[..., :n].transpose(-1, -2)              # the pass writes V^T
    assert torch.equal(codes.float(), b.codes.cpu().float())
