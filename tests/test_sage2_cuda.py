"""sage2 backend="cuda": the Hopper wgmma kernel (csrc/sage2_sm90) and its build.

CPU (CI): every CUDA source compiles for sm_90a (``python -m common.build --check``); V's wgmma key
order is a permutation within each 32 keys that puts key n where lane t's P lands; bad requests get
clear errors; where the one-read K/V pass runs. GPU (H100): the kernel against the emulation and the
Triton kernel on the same inputs, against exact attention, the NaN rule, torch.compile and CUDA
graphs; the K/V pass (csrc/sage2_sm90/kv_pass.cu) against the Triton passes, bit for bit.
"""

import subprocess

import pytest
import torch

import sage2
import sage2.emulation
from common import build
from common.inputs import make_qkv
from common.metrics import accuracy
from common.reference import attention_reference
from conftest import KERNEL_DEVICE, check_auto_picks_cuda, check_compile_and_cuda_graph, gpu, hopper
from sage2.quant_v import quantize_v, wgmma_key_position

FP16, BF16 = torch.float16, torch.bfloat16


@pytest.mark.skipif(build.missing_tools() != [], reason="needs nvcc, ninja and pybind11")
def test_every_cuda_source_compiles_for_sm90a(capsys):
    assert build.check(verbose=False) == 0


@pytest.mark.skipif(build.missing_tools() != [], reason="needs nvcc, ninja and pybind11")
def test_the_profiling_build_of_the_kernel_compiles(tmp_path):
    """-DSAGE2_TRACE (experiments/sage2_tile_cost.py --trace) compiles, and without a call in the
    kernel: ptxas would serialize the wgmma around one (C7510), and the trace would time another kernel."""
    cmd = [build.find_nvcc(), *build.unit_flags("sage2_sm90/attention.cu"), *build._includes(), "-DSAGE2_TRACE",
           "-cubin", str(build.CSRC / "sage2_sm90" / "attention.cu"), "-o", str(tmp_path / "trace.cubin")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "C7510" not in done.stderr


def test_a_machine_without_nvcc_gets_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setattr(build, "find_nvcc", lambda: None)
    monkeypatch.setattr(build, "_loaded", None)
    monkeypatch.setenv("SAGE_CACHE_DIR", str(tmp_path))
    with pytest.raises(build.CudaBuildUnavailable, match=r"missing: nvcc \(install the CUDA toolkit, or set CUDA_HOME\)"):
        build.load()
    assert build.check(verbose=False) == 2


def test_tuning_flags_reach_nvcc_and_get_their_own_cache_entry(monkeypatch, tmp_path):
    monkeypatch.delenv("SAGE_NVCC_FLAGS", raising=False)
    base_flags, base_key = build.nvcc_flags(), build._fingerprint("nvcc")
    monkeypatch.setenv("SAGE_NVCC_FLAGS", "-DSAGE_DECODE_STAGES=3  -DSAGE_DECODE_MIN_BLOCKS=2")
    assert build.nvcc_flags() == base_flags + ["-DSAGE_DECODE_STAGES=3", "-DSAGE_DECODE_MIN_BLOCKS=2"]
    assert build._fingerprint("nvcc") != base_key
    build._write_ninja(tmp_path, "nvcc")
    assert "-DSAGE_DECODE_STAGES=3 -DSAGE_DECODE_MIN_BLOCKS=2" in (tmp_path / "build.ninja").read_text()
    # a unit's own flags (SOURCE_FLAGS) come first, so that a tuning build can override them
    unit = build.unit_flags("sage2_sm90/attention.cu")
    assert unit.index("--register-usage-level=2") < unit.index("-DSAGE_DECODE_STAGES=3")
    assert "$unit_flags $tuning" in (tmp_path / "build.ninja").read_text()


def test_wgmma_key_position_is_the_lane_order_of_the_s_fragment():
    n = torch.arange(64)
    pos = wgmma_key_position(n)
    assert sorted(pos.tolist()) == list(range(64)) and (pos // 32 == n // 32).all()
    # slot 4t + j (and 16 + 4t + j) of each 32 holds lane t's j-th key: 2t, 2t+1, 2t+8, 2t+9
    for t in range(4):
        for j, key in enumerate((2 * t, 2 * t + 1, 2 * t + 8, 2 * t + 9)):
            assert pos[key] == 4 * t + j and pos[16 + key] == 16 + 4 * t + j


def test_v_pass_in_wgmma_key_order_is_the_natural_pass_permuted():
    v = make_qkv(2, 3, 1, 64, seqlen_k=200, kind="v_bias", seed=3)[2].to(KERNEL_DEVICE)
    natural = quantize_v(v, "fp8_e4m3", smooth_v=False, backend="triton", dp=64, npad_multiple=128)
    permuted = quantize_v(v, "fp8_e4m3", smooth_v=False, backend="triton", dp=64, npad_multiple=128,
                          wgmma_key_order=True)
    assert torch.equal(natural.scale, permuted.scale)
    npad = natural.codes.shape[-1]
    expect = torch.empty_like(natural.codes.view(torch.uint8))
    expect[..., wgmma_key_position(torch.arange(npad)).to(v.device)] = natural.codes.view(torch.uint8)
    assert torch.equal(permuted.codes.view(torch.uint8), expect)


def test_the_kernel_op_names_a_bad_argument():
    from sage2.cuda import sage2_sm90_fwd

    q = torch.zeros(1, 2, 64, 64, dtype=torch.float16)
    kc = torch.zeros(1, 2, 64, 64, dtype=torch.int8)
    s = torch.ones(1, 2, 64)
    v = torch.zeros(1, 2, 64, 128, dtype=torch.uint8)
    vs = torch.ones(1, 2, 64)
    out = torch.empty(1, 2, 64, 64, dtype=torch.float16)

    def call(q=q, q_codes=None, q_scale=None, kc=kc, v=v, out=out, q_max=127, pairs=1):
        sage2_sm90_fwd(q, q_codes, q_scale, None, kc, v, s, vs, out, None, 0.18, q_max, pairs, False, False, None)

    with pytest.raises(ValueError, match=r"k_codes must be a contiguous torch.int8 tensor, got torch.int8 with strides"):
        call(kc=kc.transpose(-1, -2))
    with pytest.raises(ValueError, match=r"v_codes must be a contiguous torch.uint8 tensor, got torch.float8_e4m3fn"):
        call(v=v.view(torch.float8_e4m3fn))
    with pytest.raises(ValueError, match="out must be fp16 or bf16 with a contiguous last dim"):
        call(out=out.float())
    with pytest.raises(ValueError, match=r"q must have out's dtype \(torch.float16\)"):
        call(q=q.bfloat16())
    with pytest.raises(ValueError, match=r"other strides that are multiples of 8 \(sage2.cuda.q_for_kernel"):
        call(q=torch.zeros(1, 2, 64, 68, dtype=torch.float16)[..., :64])
    with pytest.raises(ValueError, match="at most DP = 64 channels"):
        call(q=torch.zeros(1, 2, 64, 72, dtype=torch.float16))
    with pytest.raises(ValueError, match="q_codes and q_scale come together"):
        call(q_codes=kc)
    with pytest.raises(ValueError, match=r"q_codes must be a contiguous torch.int8 tensor, got torch.int8 with strides"):
        call(q_codes=kc.transpose(-1, -2), q_scale=s)
    with pytest.raises(ValueError, match="q_max must be 127 or 7 and q_group_pairs 1, 8 or 32, got 127, 4"):
        call(pairs=4)
    # sizes that disagree with q's, k_codes' and out's (the kernel reads and writes by those alone)
    with pytest.raises(ValueError, match=r"out must be \[1, 2, 64, 64\]"):
        call(out=torch.empty(1, 1, 1, 64, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"k_scale must be \[1, 2, 64\]"):
        sage2_sm90_fwd(q, None, None, None, kc, v, torch.ones(1, 2, 8), vs, out, None, 0.18, 127, 1, False, False, None)
    with pytest.raises(ValueError, match=r"v_codes must be \[1, 2, 64, 128\]"):
        call(v=torch.zeros(1, 2, 128, 128, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"0 < head dim 128 <= DP = 64"):
        sage2_sm90_fwd(q, None, None, None, kc, v, s, torch.ones(1, 2, 128), torch.empty(1, 2, 64, 128, dtype=torch.float16),
                       None, 0.18, 127, 1, False, False, None)
    with pytest.raises(ValueError, match=r"V's keys 0 = 64 keys rounded up to 128"):
        call(v=torch.zeros(1, 2, 64, 0, dtype=torch.uint8))
    with pytest.raises(ValueError, match="a multiple of KV heads 2"):
        sage2_sm90_fwd(torch.zeros(1, 3, 64, 64, dtype=torch.float16), None, None, None, kc, v, s, vs,
                       torch.empty(1, 3, 64, 64, dtype=torch.float16), None, 0.18, 127, 1, False, False, None)
    with pytest.raises(ValueError, match="q_bad must be a contiguous torch.uint8 of at least 128 values"):
        sage2_sm90_fwd(q, kc, s, torch.zeros(3, dtype=torch.uint8), kc, v, s, vs, out, None, 0.18, 127, 1, False,
                       False, None)


def test_q_for_kernel_keeps_a_readable_view_and_copies_others():
    from sage2.cuda import _tma_ready, q_for_kernel

    nhd = torch.randn(2, 100, 4, 64, dtype=torch.float16)
    view = nhd.transpose(1, 2)  # HND view of an NHD tensor: strides are multiples of 8
    assert q_for_kernel(view, 64) is view
    odd = torch.randn(2, 4, 100, 36, dtype=torch.float16)  # 36 channels: rows of 72 bytes
    fixed = q_for_kernel(odd, 64)
    assert fixed.shape == (2, 4, 100, 64) and _tma_ready(fixed)
    assert torch.equal(fixed[..., :36], odd) and not fixed[..., 36:].any()
    sliced = torch.randn(2, 4, 101, 64, dtype=torch.float16)[:, :, 1:]  # offset of 64 elements: aligned
    assert q_for_kernel(sliced, 64) is sliced
    unaligned = torch.randn(2 * 4 * 100 * 64 + 1, dtype=torch.float16)[1:].view(2, 4, 100, 64)
    assert q_for_kernel(unaligned, 64) is not unaligned and _tma_ready(q_for_kernel(unaligned, 64))
    # 100 of 128 stored channels: strides are multiples of 8, but a head of size 1 gets the packed
    # stride (200 bytes per row) in the tensor map, which is not a multiple of 16
    narrow = torch.randn(2, 1, 101, 128, dtype=torch.float16)[..., :100]
    assert q_for_kernel(narrow, 128).shape == (2, 1, 101, 128) and _tma_ready(q_for_kernel(narrow, 128))


def test_unsupported_options_are_named():
    from common.masking import NO_MASK
    from sage2.cuda import unsupported

    ok = dict(qk_granularity="per_thread", smooth_q=False, smooth_v=False, pv_dtype="fp8_e4m3",
              pv_accum="two_level", mask=NO_MASK, head_dim=128)
    assert unsupported(**ok) is None and unsupported(**{**ok, "head_dim": 40}) is None
    for change, words in [({"qk_granularity": "per_token"}, "per_token"), ({"smooth_q": True}, "smooth_q"),
                          ({"pv_dtype": "fp16"}, "pv_dtype='fp16'"), ({"pv_accum": "single"}, "pv_accum"),
                          ({"head_dim": 256}, "head_dim=256"), ({"head_dim": 32}, "head_dim=32")]:
        assert words in unsupported(**{**ok, **change})


# ---------------------------------------------------------------------------------------------
# GPU (run on the device)
# ---------------------------------------------------------------------------------------------

CASES = [
    # (dtype, causal, (hq, hkv), layout, (nq, nk), d, options)
    (FP16, False, (4, 4), "HND", (128, 128), 64, {}),
    (FP16, False, (4, 2), "HND", (1000, 1000), 128, {}),
    (FP16, True, (4, 2), "NHD", (300, 300), 128, {}),
    (BF16, False, (4, 1), "HND", (77, 300), 96, {}),
    (FP16, True, (4, 2), "HND", (300, 77), 64, dict(qk_dtype="int4", smooth_q=False)),
    (FP16, True, (2, 2), "HND", (77, 300), 128, {}),
    (BF16, True, (2, 1), "NHD", (129, 129), 64, dict(qk_granularity="per_block")),
    (FP16, False, (2, 2), "NHD", (200, 260), 40, dict(qk_granularity="per_warp")),
    (FP16, False, (2, 2), "HND", (100, 300), 128, dict(qk_granularity="per_tensor")),
    (FP16, True, (2, 2), "HND", (17, 2000), 128, {}),
    # a head dim whose V-scale rows are not a multiple of 16 bytes: the causal epilogue loads them
    # itself (no bulk copy with Q)
    (FP16, True, (4, 2), "NHD", (300, 300), 50, {}),
]


@gpu
@hopper
@pytest.mark.parametrize("grid", ["", "2"])
@pytest.mark.parametrize("dtype,causal,heads,layout,lens,d,opts", [c for c in CASES if "per_tensor" not in str(c[-1])])
def test_q_quantized_in_the_kernel_gives_the_passs_output_bit_for_bit(dtype, causal, heads, layout, lens, d, opts,
                                                                      grid, monkeypatch):
    """SAGE2_SM90_Q=kernel (Q quantized by the consumers) and =pass (the Triton pass's codes): the same
    codes, so the same output and LSE, also for rows with a NaN or an Inf and (bf16) for a head of tiny
    values, whose scales are below 2^-60 (divided with the 2^64 factor). grid "2": two CTAs, so that
    each runs many work tiles (the codes, scales and per-block maxima reused across tiles)."""
    monkeypatch.setenv("SAGE2_SM90_GRID", grid)
    (hq, hkv), (nq, nk) = heads, lens
    q, k, v = make_qkv(2, hq, nq, d, seqlen_k=nk, heads_kv=hkv, dtype=dtype, layout=layout, seed=d + nq + 1,
                       device="cuda")
    qh = q if layout == "HND" else q.transpose(1, 2)
    qh[0, 1, 3, 5] = float("nan")
    qh[1, 0, nq - 1, 0] = float("inf")
    qh[1, hq - 1, nq // 2] *= 300  # a row far above its group's others
    if dtype == BF16:  # one head's Q scales below 2^-60 (the division's 2^64 factor), its K as large,
        qh[0, 0] *= 2.0 ** -110  # so that its scores, and so its codes, count
        (k if layout == "HND" else k.transpose(1, 2))[0, 0] *= 2.0 ** 110
    kw = dict(tensor_layout=layout, is_causal=causal, return_lse=True, **opts)
    results = {}
    for mode in ("kernel", "pass"):
        monkeypatch.setenv("SAGE2_SM90_Q", mode)
        results[mode] = sage2.sageattn(q, k, v, backend="cuda", **kw)
    (out_k, lse_k), (out_p, lse_p) = results["kernel"], results["pass"]
    assert torch.equal(out_k.isnan(), out_p.isnan()) and out_k.isnan().any()
    assert torch.equal(out_k.nan_to_num(), out_p.nan_to_num())
    assert torch.equal(lse_k.nan_to_num(), lse_p.nan_to_num())
    monkeypatch.setenv("SAGE2_SM90_Q", "both")
    with pytest.raises(ValueError, match="SAGE2_SM90_Q must be 'kernel' or 'pass'"):
        sage2.sageattn(q, k, v, backend="cuda", **kw)


def test_q_in_kernel_where_it_measured_faster(monkeypatch):
    from sage2.cuda import q_in_kernel

    monkeypatch.delenv("SAGE2_SM90_Q", raising=False)
    assert q_in_kernel(is_causal=False, head_dim=128, seqlen_q=1) and q_in_kernel(is_causal=False, head_dim=100, seqlen_q=1)
    assert not q_in_kernel(is_causal=True, head_dim=128, seqlen_q=8191)
    assert q_in_kernel(is_causal=True, head_dim=128, seqlen_q=8192)
    assert not q_in_kernel(is_causal=False, head_dim=64, seqlen_q=16384)
    assert not q_in_kernel(is_causal=True, head_dim=64, seqlen_q=16384)
    assert not q_in_kernel(is_causal=False, head_dim=128, seqlen_q=1, granularity="per_tensor")
    monkeypatch.setenv("SAGE2_SM90_Q", "kernel")
    assert q_in_kernel(is_causal=True, head_dim=64, seqlen_q=1)
    assert not q_in_kernel(is_causal=True, head_dim=64, seqlen_q=1, granularity="per_tensor")
    monkeypatch.setenv("SAGE2_SM90_Q", "pass")
    assert not q_in_kernel(is_causal=False, head_dim=128, seqlen_q=16384)


@pytest.fixture
def cuda_arithmetic(monkeypatch):
    """The emulation with the CUDA kernel's softmax arithmetic (sage2.emulation.ARITHMETIC): the
    exponent by one FMA, l from fp8(P) in the MMA."""
    monkeypatch.setattr(sage2.emulation, "ARITHMETIC", "cuda_sm90")


@gpu
@hopper
@pytest.mark.parametrize("dtype,causal,heads,layout,lens,d,opts", CASES)
def test_cuda_kernel_agrees_with_emulation_and_triton(dtype, causal, heads, layout, lens, d, opts, monkeypatch):
    """The kernel on the Triton passes' K and V (the emulation's K mean, bit for bit): the one-read K/V
    pass, whose mean differs by ulps, is checked against those passes on its own (below)."""
    monkeypatch.setenv("SAGE2_SM90_KV", "triton")
    (hq, hkv), (nq, nk) = heads, lens
    q, k, v = make_qkv(2, hq, nq, d, seqlen_k=nk, heads_kv=hkv, dtype=dtype, layout=layout, seed=d + nq,
                       device="cuda")
    kw = dict(tensor_layout=layout, is_causal=causal, return_lse=True, **opts)
    out_c, lse_c = sage2.sageattn(q, k, v, backend="cuda", **kw)
    out_t, lse_t = sage2.sageattn(q, k, v, backend="triton", **kw)
    out_te, _ = sage2.sageattn(q, k, v, backend="torch", **kw)  # the Triton kernel's arithmetic (the paper's)
    monkeypatch.setattr(sage2.emulation, "ARITHMETIC", "cuda_sm90")  # the CUDA kernel's
    out_e, lse_e = sage2.sageattn(q, k, v, backend="torch", **kw)
    fin = torch.isfinite(lse_e)
    assert torch.equal(torch.isfinite(lse_c), fin)
    assert (lse_c - lse_e)[fin].abs().max() < 1e-3
    ref = attention_reference(q, k, v, tensor_layout=layout, is_causal=causal)
    c_vs_e, e_vs_ref, t_vs_e = accuracy(out_e.double(), out_c), accuracy(ref, out_e), accuracy(out_te.double(), out_t)
    assert c_vs_e.rel_l1 <= max(0.1 * e_vs_ref.rel_l1, 1e-6) and c_vs_e.rel_l1 <= 3e-3, (c_vs_e, e_vs_ref)
    assert c_vs_e.rel_l1 <= 2 * t_vs_e.rel_l1 + 1e-4, (c_vs_e, t_vs_e)  # as close as the Triton kernel is


@gpu
@hopper
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_accuracy_at_real_size(d, causal):
    q, k, v = make_qkv(2, 8, 4096, d, device="cuda", seed=1)
    ref = attention_reference(q, k, v, is_causal=causal)
    a = accuracy(ref, sage2.sageattn(q, k, v, is_causal=causal, backend="cuda"))
    t = accuracy(ref, sage2.sageattn(q, k, v, is_causal=causal, backend="triton"))
    assert a.cos_sim >= 0.9992 and a.rel_l1 <= 0.04, a
    assert a.rel_l1 <= 1.05 * t.rel_l1, (a, t)


def _kv_by_both_passes(k, v, *, granularity, bits, layout, zero=True):
    """sage2.cuda.quantize_kv on HND views of k, v; and the Triton passes given its K mean."""
    from common.int_qk import padded_head_dim, quantize_qk
    from common.nonfinite import NonfiniteFlags
    from sage2 import cuda as sc

    kh, vh = (k, v) if layout == "HND" else (k.transpose(1, 2), v.transpose(1, 2))
    B, H, N, D = kh.shape
    bufs = [torch.zeros(n, dtype=torch.int32, device="cuda") for n in (sc.kv_counter_entries(B, H), B * H * D, B * H)]
    (kc, ks, km), qv = sc.quantize_kv(kh, vh, bits=bits, granularity=granularity, zero_nonfinite=zero,
                                      first_bad=bufs[2], counters=bufs[0], v_amax=bufs[1])
    flags = NonfiniteFlags(None, torch.zeros(B * H, dtype=torch.int32, device="cuda"))
    tri = quantize_qk(kh, kh, sm_scale=1.0, granularity=granularity, bits=bits, k_block=128, backend="triton",
                      zero_nonfinite=zero, flags=flags, quantize_q=False, k_mean_override=km)
    tri_v = quantize_v(vh, "fp8_e4m3", smooth_v=False, backend="triton", dp=padded_head_dim(D), zero_nonfinite=zero,
                       flags=flags, wgmma_key_order=True, npad_multiple=128)
    return (kc, ks, km, qv, bufs[2]), (tri.k_codes, tri.k_scale_per_token(), tri_v, flags.first_bad)


@gpu
@hopper
@pytest.mark.parametrize("dtype,heads,n,d,layout,granularity,bits,special", [
    (FP16, (2, 3), 1000, 128, "HND", "per_thread", 8, ""),
    (BF16, (1, 2), 77, 64, "NHD", "per_block", 8, ""),
    (FP16, (2, 1), 4097, 40, "HND", "per_warp", 4, ""),
    (FP16, (1, 2), 300, 96, "NHD", "per_thread", 4, ""),
    (BF16, (2, 2), 20000, 128, "HND", "per_thread", 8, ""),  # 157 chunks per head, the CTAs waiting on each other
    (FP16, (1, 1), 1, 64, "HND", "per_thread", 8, ""),
    # bf16 values near 2^-130: subnormal K and V scales (K's codes through the clamped form)
    (BF16, (1, 2), 1000, 128, "HND", "per_thread", 8, "tiny"),
    (BF16, (1, 2), 700, 64, "NHD", "per_block", 4, "tiny"),
    # zero_nonfinite=False (CHECK_NONFINITE off: the clamped codes), finite inputs
    (FP16, (2, 2), 1000, 128, "HND", "per_thread", 8, "no_zero"),
])
def test_kv_pass_gives_the_triton_passes_codes_bit_for_bit(dtype, heads, n, d, layout, granularity, bits, special):
    """The one-read K/V pass (csrc/sage2_sm90/kv_pass.cu) against the Triton passes given its K mean:
    the same K codes and per-key scales, V^T's E4M3 bytes (wgmma key order) and scales, and the first
    key with a NaN/Inf per head, bit for bit, with keys that hold a NaN or an Inf, a key far above
    the others and a constant channel. Its mean is torch.mean's to a few ulps, and runs give the same
    bits (a fixed summation order)."""
    from common.nonfinite import NO_BAD_KEY, finite_mean
    from common.smoothing import k_mean

    b, h = heads
    _, k, v = make_qkv(b, h, n, d, dtype=dtype, layout=layout, device="cuda", seed=n + d)
    kh, vh = (k, v) if layout == "HND" else (k.transpose(1, 2), v.transpose(1, 2))
    kh[0, 0, n // 2] *= 500
    vh[0, h - 1, :, 1] = 0.25
    if special == "tiny":
        kh[0, 0] *= 2.0 ** -130
        vh[0, 0, :, 2] *= 2.0 ** -130
    if n > 10 and special != "no_zero":
        kh[0, 0, n - 3, 2] = float("nan")
        kh[b - 1, h - 1, 5, 0] = float("inf")
        vh[0, 0, 7, d - 1] = float("-inf")
        vh[b - 1, h - 1, n - 1, 3] = float("nan")
    zero = special != "no_zero"
    (kc, ks, km, qv, bad), (tkc, tks, tqv, tbad) = _kv_by_both_passes(k, v, granularity=granularity, bits=bits,
                                                                      layout=layout, zero=zero)
    assert torch.equal(kc, tkc) and torch.equal(ks, tks)
    assert torch.equal(qv.codes.view(torch.uint8), tqv.codes.view(torch.uint8)) and torch.equal(qv.scale, tqv.scale)
    assert torch.equal(bad, tbad)
    if special == "tiny":
        sub = (ks[0, 0] > 0) & (ks[0, 0] < 2.0 ** -126)
        assert sub.any() and 0 < qv.scale[0, 0, 2] < 2.0 ** -126  # subnormal scales
    if n > 10 and zero:
        assert bad[0] == NO_BAD_KEY - 7 and bad[b * h - 1] == NO_BAD_KEY - 5  # V's key 7 before K's n - 3
    torch.testing.assert_close(km, finite_mean(k_mean(kh)), rtol=2e-6, atol=1e-6)
    (kc2, ks2, km2, qv2, _), _ = _kv_by_both_passes(k, v, granularity=granularity, bits=bits, layout=layout,
                                                    zero=zero)
    assert torch.equal(km2, km) and torch.equal(kc2, kc) and torch.equal(qv2.codes.view(torch.uint8),
                                                                            qv.codes.view(torch.uint8))


@gpu
@hopper
@pytest.mark.parametrize("causal", [False, True])
def test_sageattn_with_the_kv_pass_matches_the_triton_passes(causal, monkeypatch):
    """The whole call on the one-read K/V pass (the default) and on the Triton passes: their K means
    differ by ulps, so a code may move by one; the outputs agree far inside either's error."""
    q, k, v = make_qkv(2, 4, 3000, 128, heads_kv=2, device="cuda", seed=11)
    outs = {}
    for mode in ("cuda", "triton"):
        monkeypatch.setenv("SAGE2_SM90_KV", mode)
        outs[mode] = sage2.sageattn(q, k, v, is_causal=causal, backend="cuda")
    ref = attention_reference(q, k, v, is_causal=causal)
    between, err = accuracy(outs["triton"].double(), outs["cuda"]), accuracy(ref, outs["triton"])
    assert between.rel_l1 < 0.05 * err.rel_l1, (between, err)
    monkeypatch.setenv("SAGE2_SM90_KV", "cuda")
    with pytest.raises(ValueError, match="SAGE2_SM90_KV=cuda, but the K/V pass cannot run: smooth_k=False"):
        sage2.sageattn(q, k, v, is_causal=causal, backend="cuda", smooth_k=False)


def test_kv_pass_covers_names_what_it_cannot_run(monkeypatch):
    """Where the one-read K/V pass runs, and the Triton passes otherwise (CPU tensors stand in: the
    choice reads only shapes, strides and dtypes; the device's chunk limit is set here)."""
    from sage2 import cuda as sc

    monkeypatch.delenv("SAGE2_SM90_KV", raising=False)
    monkeypatch.setattr(sc, "_KV_MAX_CHUNKS", {(None, 128): (128, 4), (None, 64): (256, 4)})
    k = torch.zeros(1, 2, 512, 128, dtype=FP16)
    covers = sc.kv_pass_covers
    assert covers(k, k, smooth_k=True, granularity="per_thread") and covers(k, k, smooth_k=True, granularity="per_warp")
    assert not covers(k, k, smooth_k=False, granularity="per_thread")
    assert not covers(k, k, smooth_k=True, granularity="per_tensor")
    assert not covers(k, k.float(), smooth_k=True, granularity="per_thread")
    assert not covers(k[..., :100], k[..., :100], smooth_k=True, granularity="per_thread")  # strides of 128, D 100
    wide = torch.zeros(1, 1, 512, 128, dtype=FP16).expand(1, 2, 512, 128)
    assert not covers(wide, wide, smooth_k=True, granularity="per_thread")  # broadcast heads: stride 0
    off = torch.zeros(1 + k.numel(), dtype=FP16)[1:].view(k.shape)
    assert not covers(off, off, smooth_k=True, granularity="per_thread")  # 2 bytes past 16-byte alignment
    long = torch.zeros(1, 1, 513, 128, dtype=FP16)
    assert not covers(long, long, smooth_k=True, granularity="per_thread")  # 5 chunks of 128
    assert covers(long[..., :64], long[..., :64], smooth_k=True, granularity="per_thread")  # head dim 64: 256 a chunk
    monkeypatch.setenv("SAGE2_SM90_KV", "triton")
    assert not covers(k, k, smooth_k=True, granularity="per_thread")
    monkeypatch.setenv("SAGE2_SM90_KV", "cuda")
    with pytest.raises(ValueError, match="513 keys: more than 512 in one launch"):
        covers(long, long, smooth_k=True, granularity="per_thread")
    monkeypatch.setenv("SAGE2_SM90_KV", "yes")
    with pytest.raises(ValueError, match="SAGE2_SM90_KV must be 'cuda' or 'triton'"):
        covers(k, k, smooth_k=True, granularity="per_thread")


@gpu
@hopper
@pytest.mark.parametrize("d,causal,heads,lens", [
    (128, False, (4, 2), (1000, 1000)),
    (128, True, (4, 2), (700, 900)),
    (64, True, (3, 1), (1000, 333)),  # rows before the first key's diagonal: work tiles with no KV tile
    (128, True, (4, 2), (1000, 333)),
    (64, False, (2, 2), (450, 2000)),
])
def test_cuda_persistent_grid_gives_what_one_cta_per_work_tile_gives(d, causal, heads, lens, monkeypatch):
    """Each CTA loops over work tiles (its K/V ring, Q buffers and turn-taking carried across them;
    causal: claimed on a tile counter as CTAs finish theirs); with 1, 2 or 5 CTAs for many work
    tiles, and on the default grid (one CTA per SM, or fewer where there are fewer work tiles), the
    output and LSE are the one-CTA-per-tile kernel's, bit for bit (each work tile's arithmetic is the
    same). (That the variable shrinks the grid is not checked here.)"""
    (hq, hkv), (nq, nk) = heads, lens
    q, k, v = make_qkv(2, hq, nq, d, seqlen_k=nk, heads_kv=hkv, kind="k_bias", device="cuda", seed=nq + d)
    kw = dict(is_causal=causal, return_lse=True, backend="cuda")
    monkeypatch.setenv("SAGE2_SM90_GRID", "tiles")
    out_t, lse_t = sage2.sageattn(q, k, v, **kw)
    for ctas in ("1", "2", "5", ""):
        monkeypatch.setenv("SAGE2_SM90_GRID", ctas)
        out_p, lse_p = sage2.sageattn(q, k, v, **kw)
        assert torch.equal(out_p, out_t) and torch.equal(lse_p, lse_t), ctas
    monkeypatch.setenv("SAGE2_SM90_GRID", "0")
    with pytest.raises(ValueError, match="SAGE2_SM90_GRID must be 'tiles' or a positive CTA count"):
        sage2.sageattn(q, k, v, **kw)


@gpu
@hopper
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("q_in_kernel", [False, True])
def test_cuda_tile_counter_claims_every_work_tile_once_and_is_zero_after(causal, q_in_kernel, monkeypatch):
    """The op with a tile counter: CTAs claim work tiles on it (any grid, causal or not) and the
    last claim puts it back to zero, so that the next call on the same counter claims from zero
    again: three calls in a row on one counter give the one-CTA-per-tile output, bit for bit, at
    grids of 1 and 7 CTAs and the default (one per SM; 144 work tiles, more than the H100's 132
    SMs). The output is filled with NaN first, so a work tile never run fails the comparison; the
    claims hand out exactly as many tiles as there are, so one run twice would leave another out."""
    from sage2 import cuda as cuda_kernel

    B, hq, hkv, n, d = 2, 4, 2, 2200, 128  # 18 row blocks of 128: 144 work tiles
    q, k, v = make_qkv(B, hq, n, d, heads_kv=hkv, kind="k_bias", device="cuda", seed=11)
    qk, qv = _kernel_inputs(q, k, v, quantize_q=not q_in_kernel)

    def run(counter):
        out = torch.full_like(q, float("nan"))
        cuda_kernel.launch(q, qk, qv, out, granularity="per_thread", bits=8, is_causal=causal, return_lse=False,
                           tile_counter=counter)
        return out

    monkeypatch.setenv("SAGE2_SM90_GRID", "tiles")
    expected = run(None)
    assert not expected.isnan().any()
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    for ctas in ("1", "7", ""):
        monkeypatch.setenv("SAGE2_SM90_GRID", ctas)
        for _ in range(3):
            out = torch.full_like(q, float("nan"))
            lse = cuda_kernel.sage2_sm90_fwd(
                q, qk.q_codes,
                None if q_in_kernel else qk.q_scale_per_token().contiguous(), None, qk.k_codes,
                qv.codes.view(torch.uint8), qk.k_scale_per_token().contiguous(), qv.scale, out, None,
                qk.q_multiplier, 127, 1, causal, False, counter)
            assert lse.numel() == 0
            assert torch.equal(out, expected), ctas
            assert counter.item() == 0
    with pytest.raises(ValueError, match="tile_counter must be one int32"):
        cuda_kernel.sage2_sm90_fwd(q, None, None, None, qk.k_codes, qv.codes.view(torch.uint8),
                                   qk.k_scale_per_token().contiguous(), qv.scale, torch.empty_like(q), None,
                                   qk.q_multiplier, 127, 1, causal, False, torch.zeros(2, dtype=torch.int32,
                                                                                        device="cuda"))


@gpu
@hopper
def test_auto_picks_cuda_on_hopper_and_triton_where_it_cannot(monkeypatch):
    from sage2 import cuda as cuda_kernel

    check_auto_picks_cuda(sage2.sageattn, cuda_kernel, monkeypatch, "pv_dtype='fp16'", pv_dtype="fp16")


@gpu
@hopper
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_nan_rows_follow_sdpa(causal, cuda_arithmetic):
    q, k, v = make_qkv(1, 4, 300, 128, heads_kv=2, device="cuda", seed=5)
    q[0, 1, 7, 3] = float("nan")
    k[0, 0, 200, 5] = float("inf")
    v[0, 1, 10, 0] = float("-inf")
    out = sage2.sageattn(q, k, v, is_causal=causal, backend="cuda")
    exp = sage2.sageattn(q, k, v, is_causal=causal, backend="torch")
    assert torch.equal(out.isnan().any(-1), exp.isnan().any(-1))
    fin = ~exp.isnan().any(-1)
    assert accuracy(exp[fin].double(), out[fin]).rel_l1 < 3e-3
    copies = [t.clone() for t in (q, k, v)]
    sage2.sageattn(q, k, v, is_causal=causal, backend="cuda")
    assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(copies, (q, k, v)))  # unchanged


@gpu
@hopper
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_under_torch_compile_and_cuda_graphs(causal):
    """(causal: the work tiles are claimed on a counter from the call's zeroed buffer, whose fill
    the graph captures; the kernel leaves it at zero again)"""
    check_compile_and_cuda_graph(sage2.sageattn, backend="cuda", is_causal=causal)


@gpu
@hopper
def test_the_kernel_op_has_a_fake_for_compile():
    from sage2.cuda import sage2_sm90_fwd

    torch.library.opcheck(sage2_sm90_fwd, _op_args(), test_utils=("test_schema", "test_faketensor"))


def _kernel_inputs(q, k, v, *, quantize_q):
    """sage2's Triton passes as sage2.sageattn runs them for the CUDA kernel (per-thread INT8 Q, K;
    V to E4M3 in the wgmma key order): (QuantizedQK, QuantizedV); Q's codes only if ``quantize_q``."""
    from common.int_qk import padded_head_dim, quantize_qk
    from sage2.interface import K_BLOCK, Q_BLOCK, WARP_Q

    d = q.shape[-1]
    qk = quantize_qk(q, k, sm_scale=d ** -0.5, granularity="per_thread", q_block=Q_BLOCK, k_block=K_BLOCK,
                     warp_rows=WARP_Q, backend="triton", quantize_q=quantize_q)
    qv = quantize_v(v, "fp8_e4m3", smooth_v=False, backend="triton", dp=padded_head_dim(d), npad_multiple=128,
                    wgmma_key_order=True)
    return qk, qv


def _op_args():
    q, k, v = make_qkv(1, 2, 256, 128, device="cuda")
    qk, qv = _kernel_inputs(q, k, v, quantize_q=False)
    out = torch.empty_like(q)
    return (q, None, None, None, qk.k_codes, qv.codes.view(torch.uint8), qk.k_scale_per_token().contiguous(), qv.scale,
            out, None, qk.q_multiplier, 127, 1, False, True, torch.zeros(1, dtype=torch.int32, device="cuda"))