"""Quantizers of common/: exact grids, rounding, groupings, round-trip bounds, packing."""

import itertools

import pytest
import torch

from common import fp4, quant


def test_round_half_away_from_zero():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49, -0.49, 0.0])
    assert quant.round_half_away(x).tolist() == [1, 2, 3, -1, -2, -3, 0, 0, 0]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("gran", ["tensor", "token", "block", "warp", "thread_q", "thread_k"])
def test_int_quantizer_round_trip_and_range(bits, gran):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 200, 64) * torch.rand(1, 1, 200, 1) * 5
    qmax = quant.INT_QMAX[bits]
    fn = {
        "tensor": lambda: (quant.int_per_tensor(x, bits), None),
        "token": lambda: (quant.int_per_token(x, bits), quant.groups_per_block(200, 1)),
        "block": lambda: (quant.int_per_block(x, bits, 64), quant.groups_per_block(200, 64)),
        "warp": lambda: (quant.int_per_warp(x, bits, 16), quant.groups_per_block(200, 16)),
        "thread_q": lambda: (quant.int_per_thread_q(x, bits, 64, 16), quant.groups_per_thread_q(200, 64, 16)),
        "thread_k": lambda: (quant.int_per_thread_k(x, bits, 128), quant.groups_per_thread_k(200, 128)),
    }[gran]
    (codes, scale), groups = fn()
    assert codes.dtype == torch.int8 and codes.shape == x.shape
    assert int(codes.abs().max()) == qmax  # every group's absmax element hits qmax exactly
    tok_scale = scale.expand(2, 3, 200) if groups is None else quant.token_scales(scale, groups)
    deq = quant.dequantize_int(codes, tok_scale)
    # round to nearest: error at most half a step of the token's group
    assert ((deq - x).abs() <= tok_scale[..., None] * 0.5 + 1e-6).all()


def test_per_block_scale_is_absmax_over_qmax_and_short_last_block():
    x = torch.randn(1, 1, 130, 16)
    codes, scale = quant.int_per_block(x, 8, 64)
    assert scale.shape == (1, 1, 3)
    for i, (a, b) in enumerate([(0, 64), (64, 128), (128, 130)]):
        assert scale[0, 0, i] == x[0, 0, a:b].abs().max() / 127


def test_zero_group_gives_zero_scale_and_codes():
    x = torch.zeros(1, 1, 64, 32)
    x[..., 32:, :] = torch.randn(32, 32)
    codes, scale = quant.int_per_block(x, 8, 32)
    assert scale[0, 0, 0] == 0 and (codes[..., :32, :] == 0).all()
    assert torch.isfinite(quant.dequantize_int(codes, quant.token_scales(scale, quant.groups_per_block(64, 32)))).all()


def test_per_thread_q_grouping_follows_the_mma_fragment():
    # Hopper tiles: 64-row CTA, 16 rows per warp -> rows g and g+8 of a warp share a scale.
    g = quant.groups_per_thread_q(128, 64, 16)
    for tok in range(128):
        blk, r = divmod(tok, 64)
        warp, row = divmod(r, 16)
        assert g[tok] == blk * 32 + warp * 8 + row % 8
    assert (g[0] == g[8]) and (g[0] != g[1]) and (g[0] != g[16])
    # Ada tiles: 128-row block, 32 rows per warp -> tokens i, i+8, i+16, i+24 share a scale.
    g = quant.groups_per_thread_q(128, 128, 32)
    assert g[3] == g[11] == g[19] == g[27] and g[3] != g[35]
    assert int(g.max()) + 1 == 32  # 32 scales per 128-row block


def test_per_thread_k_grouping_follows_the_mma_fragment():
    # lane t = l & 3 owns columns 2t, 2t+1 of every 8-column slice: tokens {8m+2t, 8m+2t+1}.
    g = quant.groups_per_thread_k(256, 128)
    for tok in range(256):
        blk, r = divmod(tok, 128)
        assert g[tok] == blk * 4 + (r % 8) // 2
    assert g[0] == g[1] == g[8] == g[9] == g[120] and g[2] != g[0]
    assert torch.bincount(g[:128]).tolist() == [32, 32, 32, 32]  # 32 tokens per scale on sm90


def test_fp8_quantizers():
    torch.manual_seed(0)
    x = torch.randn(2, 100, 16) * torch.linspace(0.1, 30, 16)
    for fmt, (dtype, fmax) in quant.FP8_FORMATS.items():
        codes, scale = quant.fp8_per_channel(x, fmt)
        assert codes.dtype == dtype and scale.shape == (2, 16)
        assert torch.allclose(codes.float().abs().amax(dim=-2), torch.full((2, 16), fmax))
        deq = quant.dequantize_fp8(codes, scale[:, None, :])
        rel = 2.0 ** -(4 if fmt == "e4m3" else 3)  # half a step of a 3 / 2 bit mantissa
        assert ((deq - x).abs() <= rel * x.abs() + scale[:, None, :] * 2.0 ** -9).all()
        codes_t, s_t = quant.fp8_per_tensor(x, fmt)
        assert codes_t.float().abs().max() == fmax and s_t.dim() == 0
    # static scale saturates instead of producing NaN/Inf
    c = quant.fp8_static(torch.tensor([1e6, -1e6]), "e4m3", 1.0)
    assert c.float().tolist() == [448.0, -448.0]


def test_e2m1_grid_and_round_to_nearest_even():
    codes = torch.arange(16, dtype=torch.uint8)
    vals = fp4.e2m1_decode(codes)
    assert vals[:8].tolist() == list(fp4.E2M1_VALUES)
    assert vals[8:].tolist() == [-v for v in fp4.E2M1_VALUES]
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0, -0.75, -5.0])
    assert fp4.e2m1_round(ties).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, -1.0, -4.0]
    # every grid value is a fixed point; nearest for random values
    x = torch.randn(10000) * 3
    r = fp4.e2m1_round(x)
    grid = torch.tensor(fp4.E2M1_VALUES)
    best = (x.abs()[:, None].clamp(max=6) - grid[None, :]).abs().min(dim=1).values
    assert torch.allclose((r.abs() - x.abs().clamp(max=6)).abs(), best)


def test_nvfp4_scales_are_e4m3_and_blocks_of_16():
    torch.manual_seed(0)
    x = torch.randn(4, 64) * torch.logspace(-3, 2, 64)
    codes, s = fp4.nvfp4_quantize(x)
    assert codes.shape == x.shape and s.shape == (4, 4) and s.dtype == torch.float8_e4m3fn
    amax = x.reshape(4, 4, 16).abs().amax(-1)
    assert torch.equal(s.float(), (amax / 6).to(torch.float8_e4m3fn).float())
    deq = fp4.nvfp4_dequantize(codes, s)
    # each element is on its block's grid: value / scale is an E2M1 value
    on_grid = deq.reshape(4, 4, 16) / s.float()[..., None]
    assert torch.equal(fp4.e2m1_round(on_grid), on_grid)
    assert (deq - x).abs().max() <= 6 * s.float().max()


def test_nvfp4_zero_scale_block_is_zero_and_unrounded_scale_option():
    x = torch.zeros(1, 32)
    x[0, 16:] = torch.randn(16)
    x[0, :16] = 1e-5  # absmax/6 underflows E4M3 -> scale 0 -> block 0
    codes, s = fp4.nvfp4_quantize(x)
    assert s.float()[0, 0] == 0 and (fp4.nvfp4_dequantize(codes, s)[0, :16] == 0).all()
    p = torch.rand(2, 16)
    c1, _ = fp4.nvfp4_quantize(p, divide_by_rounded_scale=False)
    assert (fp4.e2m1_decode(c1).abs().amax(-1) == 6).all()  # unrounded scale maps absmax to 6 exactly


def test_mxfp4_power_of_two_scales_blocks_of_32():
    torch.manual_seed(0)
    x = torch.randn(3, 96) * 10
    codes, e = fp4.mxfp4_quantize(x)
    assert e.shape == (3, 3) and e.dtype == torch.uint8
    amax = x.reshape(3, 3, 32).abs().amax(-1)
    assert torch.equal(e.float() - 127, torch.floor(torch.log2(amax)) - 2)
    deq = fp4.mxfp4_dequantize(codes, e)
    scale = torch.exp2(e.float() - 127)
    assert ((deq - x).reshape(3, 3, 32).abs() <= scale[..., None] * 2 + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_fp4_value_times_every_e4m3_scale_is_exact_in_16_bit(dtype):
    """Exhaustive: 16 E2M1 codes x all 256 E4M3 bit patterns (NaN excluded)."""
    vals = fp4.e2m1_decode(torch.arange(16, dtype=torch.uint8)).double()
    scales = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    scales = scales[torch.isfinite(scales)]
    prod = vals[:, None] * scales[None, :]
    assert torch.equal(prod.to(dtype).double(), prod)
    # and MXFP4 with the E8M0 scales of fp16-range blocks (absmax up to 65504: exponents <= 13)
    e = torch.arange(-13, 14, dtype=torch.float64)
    prod = vals[:, None] * torch.exp2(e)[None, :]
    assert torch.equal(prod.to(dtype).double(), prod)


def test_pack_unpack_round_trip_and_nibble_order():
    codes = torch.randint(0, 16, (3, 5, 64), dtype=torch.uint8)
    packed = fp4.pack_fp4(codes)
    assert packed.shape == (3, 5, 32) and packed.dtype == torch.uint8
    assert torch.equal(fp4.unpack_fp4(packed), codes)
    assert fp4.pack_fp4(torch.tensor([0x3, 0xA], dtype=torch.uint8)).item() == 0xA3
    for a, b in itertools.product(range(16), repeat=2):
        assert fp4.unpack_fp4(fp4.pack_fp4(torch.tensor([a, b], dtype=torch.uint8))).tolist() == [a, b]


@pytest.mark.parametrize("layout,heads,with_mean", [("HND", (4, 2), True), ("NHD", (2, 2), False)])
def test_delta_s_triton_pass_equals_the_pytorch_form(layout, heads, with_mean):
    """Q smoothing's q_mean . (K - k_mean)^T: the one-pass Triton kernel (CUDA tensors) against the
    PyTorch form (fp32), GQA, strided K, a short last query block, under the interpreter on CPU."""
    from common import smoothing
    from common.inputs import make_qkv
    from conftest import KERNEL_DEVICE

    q, k, _ = (t.to(KERNEL_DEVICE) for t in make_qkv(2, heads[0], 300, 80, heads_kv=heads[1], layout=layout, seed=3))
    qh, kh = (t.transpose(1, 2) if layout == "NHD" else t for t in (q, k))
    qm = smoothing.q_block_means(qh.float(), 128)
    km = smoothing.k_mean(kh) if with_mean else None
    got = smoothing._delta_s_triton(qm, kh, km, "ieee")
    ref = smoothing.q_smoothing_delta_s(qm.cpu(), kh.cpu(), km.cpu() if km is not None else None)
    assert got.shape == ref.shape == (2, heads[0], 3, 300)
    assert (got.cpu() - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory < 20e9,
                    reason="needs a CUDA GPU with 20 GB")
def test_gpu_delta_s_past_two_to_the_31_values():
    """delta_s holds B Hq NB Nk fp32 values (9.2 GB at B=4, Hq=32, 48k tokens): past 2^31 the Triton
    pass's offsets must be 64-bit (32-bit ones wrote out of bounds)."""
    from common import smoothing

    g = torch.Generator(device="cuda").manual_seed(0)
    qm = torch.randn(1, 66, 1024, 32, device="cuda", generator=g)
    k = torch.randn(1, 1, 32768, 32, device="cuda", generator=g, dtype=torch.float16)
    got = smoothing._delta_s_triton(qm, k, None, "ieee")  # 66 x 2^25 values: heads 64 and 65 past 2^31
    for h, i in ((0, 0), (65, 1023), (64, 0), (40, 7)):
        want = qm[0, h, i].double() @ k[0, 0].double().T
        assert (got[0, h, i].double() - want).abs().max() < 1e-4, (h, i)
    del got
    torch.cuda.empty_cache()


def test_gpu_kernels_refuse_tensors_past_32_bit_offsets():
    """Where a GPU backend would address q or k/v past 2^31 values, or launch more than 65535
    (batch, head) programs on a grid's second axis, a clear error names the batch that fits; the
    emulation takes any size."""
    from common.api import check_kernel_sizes
    from common.checks import AttentionShape

    big = AttentionShape(64, 32, 8, 1, 32768, 128, "HND")  # k: 64 x 8 x 32768 x 128 = 2^31
    with pytest.raises(ValueError, match=r"k and v of batch 64, 8 heads, 32768 tokens .* calls of at most 63 sequences"):
        check_kernel_sizes(big, "triton")
    check_kernel_sizes(big, "torch")
    check_kernel_sizes(big._replace(batch=63), "cuda")
    with pytest.raises(ValueError, match=r"65600 \(batch, head\) pairs.* calls of at most 2047 sequences"):
        check_kernel_sizes(AttentionShape(2050, 32, 8, 64, 64, 64, "HND"), "triton")
    check_kernel_sizes(AttentionShape(2047, 32, 8, 64, 64, 64, "HND"), "triton")
    with pytest.raises(ValueError, match="one sequence alone is too long"):
        check_kernel_sizes(AttentionShape(1, 4096, 4096, 8, 8, 128, "HND")._replace(seqlen_q=2**22), "triton")
