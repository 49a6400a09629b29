"""sage3 backend="cuda": the Hopper wgmma kernel (csrc/sage3_sm90), still an exact FP4 emulation.

CPU (CI): the kernel compiles (test_sage2_cuda's build check covers every source); bad requests get
clear errors naming the argument. GPU (H100): the kernel against the emulation run with the
kernel's 128-key tile (P's quantization depends on the tile) and against exact attention, every
option, both formats, causal/GQA/layouts/odd lengths, torch.compile and CUDA graphs.
"""

import pytest
import torch

import sage3
from common.inputs import make_qkv
from common.metrics import accuracy
from common.reference import attention_reference
from conftest import check_auto_picks_cuda, check_compile_and_cuda_graph, gpu, hopper, kernel_vs_emulation

FP16, BF16 = torch.float16, torch.bfloat16


def test_unsupported_head_dims_are_named():
    from sage3.cuda import unsupported

    assert unsupported(128) is None and unsupported(40) is None and unsupported(64) is None
    assert "head_dim=256" in unsupported(256) and "head_dim=32" in unsupported(32)


def test_the_kernel_op_names_a_bad_argument():
    from sage3.cuda import sage3_sm90_fwd

    q = torch.zeros(1, 2, 64, 64, dtype=FP16)
    vt = torch.zeros(1, 2, 64, 128, dtype=FP16)
    out = torch.empty(1, 2, 64, 64, dtype=FP16)
    ds = torch.zeros(1, 2, 1, 64)
    with pytest.raises(ValueError, match=r"k must be a contiguous 4-D torch.float16 tensor, got torch.float16"):
        sage3_sm90_fwd(q, q.transpose(-1, -2), vt, ds, out, 1.0, 0.0, False, False, False)
    with pytest.raises(ValueError, match=r"vt must be a contiguous 4-D torch.float16 tensor, got torch.bfloat16"):
        sage3_sm90_fwd(q, q, vt.bfloat16(), ds, out, 1.0, 0.0, False, False, False)
    with pytest.raises(ValueError, match=r"delta_s must be a contiguous float32 tensor of shape \(1, 2, 1, 64\)"):
        sage3_sm90_fwd(q, q, vt, ds[..., :32], out, 1.0, 0.0, False, False, False)
    with pytest.raises(ValueError, match="out must be fp16 or bf16 with a contiguous last dim"):
        sage3_sm90_fwd(q.float(), q.float(), vt.float(), ds, out.float(), 1.0, 0.0, False, False, False)
    # sizes that disagree with q's, k's and out's (the kernel reads and writes by those alone)
    with pytest.raises(ValueError, match=r"k must be \[1, 2, 64, 64\]"):
        sage3_sm90_fwd(q, torch.zeros(1, 2, 64, 128, dtype=FP16), vt, ds, out, 1.0, 0.0, False, False, False)
    with pytest.raises(ValueError, match=r"vt must be \[1, 2, 64, 128\]"):
        sage3_sm90_fwd(q, q, torch.zeros(1, 1, 8, 128, dtype=FP16), ds, out, 1.0, 0.0, False, False, False)
    with pytest.raises(ValueError, match=r"out must be \[1, 2, 64, 64\]"):
        sage3_sm90_fwd(q, q, vt, ds, torch.empty(1, 1, 1, 64, dtype=FP16), 1.0, 0.0, False, False, False)
    with pytest.raises(ValueError, match="vt's keys 256 = 64 keys rounded up to 128"):
        sage3_sm90_fwd(q, q, torch.zeros(1, 2, 64, 256, dtype=FP16), ds, out, 1.0, 0.0, False, False, False)


# ---------------------------------------------------------------------------------------------
# GPU (run on the device)
# ---------------------------------------------------------------------------------------------

CASES = [
    # (dtype, causal, (hq, hkv), layout, (nq, nk), d, options)
    (FP16, False, (4, 4), "HND", (128, 128), 64, {}),
    (FP16, False, (4, 2), "HND", (1000, 1000), 128, {}),
    (FP16, True, (4, 2), "NHD", (300, 300), 128, {}),
    (BF16, False, (4, 1), "HND", (77, 300), 96, {}),
    (FP16, True, (2, 2), "HND", (300, 77), 64, dict(scale_format="mxfp4")),
    (BF16, True, (2, 1), "NHD", (129, 129), 128, dict(scale_format="mxfp4")),
    (FP16, False, (2, 2), "HND", (200, 260), 40, dict(two_level_p=False)),
    (FP16, True, (2, 2), "HND", (77, 300), 128, dict(smooth_q=False, smooth_k=False)),
    (BF16, False, (2, 2), "NHD", (100, 700), 128, dict(smooth_q=False)),
    (FP16, True, (2, 2), "HND", (17, 2000), 128, {}),
    (FP16, False, (2, 2), "HND", (256, 1), 64, {}),
    (FP16, False, (2, 2), "HND", (300, 500), 128, dict(global_scale=True)),
]


@pytest.fixture
def emulation_with_the_cuda_tile(monkeypatch):
    """backend="torch" quantizes P on the kernel's 128-key tiles (the Triton kernel's are 64)."""
    import sage3.kernel
    from sage3.cuda import KV_TILE

    monkeypatch.setattr(sage3.kernel, "kv_tile_for", lambda dp: KV_TILE)


@gpu
@hopper
@pytest.mark.parametrize("dtype,causal,heads,layout,lens,d,opts", CASES)
def test_cuda_kernel_agrees_with_emulation(dtype, causal, heads, layout, lens, d, opts, emulation_with_the_cuda_tile):
    """The same FP4 values and the same P quantization from the same tiles; fp32 summation order
    and ex2.approx differ, which can flip an FP4 rounding of P now and then."""
    (hq, hkv), (nq, nk) = heads, lens
    q, k, v = make_qkv(2, hq, nq, d, seqlen_k=nk, heads_kv=hkv, dtype=dtype, layout=layout, seed=d + nq,
                       device="cuda")
    c_vs_e, e_vs_ref = kernel_vs_emulation(sage3.sageattn, q, k, v, tensor_layout=layout, is_causal=causal,
                                           kernel_backend="cuda", **opts)
    assert c_vs_e.rel_l1 <= 0.1 * e_vs_ref.rel_l1, (c_vs_e, e_vs_ref)


@gpu
@hopper
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_accuracy_at_real_size_is_the_triton_kernels(d, causal):
    q, k, v = make_qkv(2, 8, 4096, d, device="cuda", seed=1)
    ref = attention_reference(q, k, v, is_causal=causal)
    c = accuracy(ref, sage3.sageattn(q, k, v, is_causal=causal, backend="cuda"))
    t = accuracy(ref, sage3.sageattn(q, k, v, is_causal=causal, backend="triton"))
    assert c.rel_l1 <= 1.05 * t.rel_l1 and c.cos_sim >= t.cos_sim - 2e-4, (c, t)


@gpu
@hopper
def test_auto_picks_cuda_on_hopper_and_triton_where_it_cannot(monkeypatch):
    from sage3 import cuda as cuda_kernel

    check_auto_picks_cuda(sage3.sageattn, cuda_kernel, monkeypatch, "head_dim=256", uncovered_head_dim=256)


@gpu
@hopper
def test_cuda_inputs_unchanged_and_nan_rows_follow_sdpa():
    q, k, v = make_qkv(1, 4, 300, 128, heads_kv=2, device="cuda", seed=5)
    copies = [t.clone() for t in (q, k, v)]
    sage3.sageattn(q, k, v, backend="cuda")
    assert all(torch.equal(a, b) for a, b in zip(copies, (q, k, v)))
    q[0, 1, 7, 3] = float("nan")
    out = sage3.sageattn(q, k, v, backend="cuda")
    exp = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    assert torch.equal(out.isnan().any(-1), exp.isnan().any(-1))


@gpu
@hopper
def test_cuda_under_torch_compile_and_cuda_graphs():
    check_compile_and_cuda_graph(sage3.sageattn, backend="cuda")


@gpu
@hopper
def test_the_kernel_op_has_a_fake_for_compile():
    from common.smoothing import q_smoothing_delta_s
    from sage3.cuda import dequantized, sage3_sm90_fwd
    from sage3.quant import quantize_qkv_fp4

    q, k, v = make_qkv(1, 2, 256, 128, device="cuda")
    qf = quantize_qkv_fp4(q, k, v, fmt="nvfp4", smooth_q=True, smooth_k=True, backend="triton")
    ds = q_smoothing_delta_s(qf.q_block_mean, k, qf.k_mean, tf32=True)
    q16, k16, vt16 = dequantized(qf, q.dtype)
    args = (q16, k16, vt16, ds, torch.empty_like(q), 0.1, 11.4, False, False, True)
    torch.library.opcheck(sage3_sm90_fwd, args, test_utils=("test_schema", "test_faketensor"))


@gpu
@hopper
def test_branch_free_p_scales_are_exact_for_every_block_max():
    """The kernel's NVFP4 scales of P (s = max/6, its E4M3 rounding, 1/s) without div.rn/rcp.rn's
    slow-path branches equal theirs for every fp32 block max in (0, 2688] (two-level P's range)."""
    import struct

    from common import build

    hi = struct.unpack("<I", struct.pack("<f", 2688.0))[0]
    found = build.load().sage3_p_scale_mismatches(1, hi, build.current_stream_handle(0))
    assert all(count == 0 for count, _ in found.values()), found
