"""Decode's CUDA sweep (common.cuda_decode, csrc/decode/split_kv.cu).

CPU (CI): which calls it covers, that its op names a bad argument before the kernel reads it, and
that experiments/copy_floor builds (the kernel's source compiles for sm_90a in test_sage2_cuda).
GPU (H100): the CUDA sweep, picked by ``backend="auto"``, against the emulation of the same
algorithm and against the Triton sweep, over GQA, causal with Nq > 1, odd lengths (fewer keys than
one tile included), head dims 64/128, fp16/bf16, both layouts and every option it covers; the
NaN/Inf rule and large |V| (flagged programs redone by the careful sweep); dynamic tiles against
the static split (and a flagged program's replay of the tiles it claimed, and a graph replay); a
real decode size; the scratch kept per stream between calls.
"""

import subprocess

import pytest
import torch

import sage1
import sage2
from common import build, cuda_decode, decode
from common.decode import DecodeSpec
from common.inputs import make_qkv
from common.masking import NO_MASK, MaskSpec
from common.metrics import accuracy
from common.nonfinite import nan_rows
from common.reference import attention_reference
from conftest import gpu, hopper, kernel_vs_emulation


# (function, options): every option set the CUDA sweep covers
COVERED = {
    "sage1": (sage1.sageattn, {}),
    "sage1_fp32acc": (sage1.sageattn, dict(pv_accum="fp32")),
    "sage1_nosmooth": (sage1.sageattn, dict(smooth_k=False)),
    "sage2_8b": (sage2.sageattn, {}),
    "sage2_4b_nosmooth_q": (sage2.sageattn, dict(qk_dtype="int4", smooth_q=False)),
    "sage2_4b": (sage2.sageattn, dict(qk_dtype="int4")),  # Q smoothing: mean_q . (k - mean_k) in fp32
    "sage2_8b_smooth_q": (sage2.sageattn, dict(smooth_q=True)),
    "sage2_per_block": (sage2.sageattn, dict(qk_granularity="per_block")),
    "sage2_fp16pv": (sage2.sageattn, dict(pv_dtype="fp16")),
}
SPEC = DecodeSpec(127, k_per_token=True, smooth_k=True, smooth_q=False, pv="fp8_e4m3")


def test_unsupported_names_what_the_cuda_sweep_does_not_cover(monkeypatch):
    q, k, v = make_qkv(1, 8, 1, 128, heads_kv=2, seqlen_k=100)
    assert cuda_decode.unsupported(SPEC, q, k, v, NO_MASK, 4) is None
    spec = DecodeSpec(7, k_per_token=True, smooth_k=True, smooth_q=True, pv="fp8_e4m3")
    assert cuda_decode.unsupported(spec, q, k, v, NO_MASK, 4) is None
    monkeypatch.setattr(decode, "DELTA_PRECISION", "tf32")  # the emulation's one-pass TF32 ablation
    assert cuda_decode.unsupported(spec, q, k, v, NO_MASK, 4) == "smooth_q=True with DELTA_PRECISION='tf32'"
    monkeypatch.undo()
    spec = DecodeSpec(7, k_per_token=False, smooth_k=True, smooth_q=True, pv="fp8_e4m3")
    assert cuda_decode.unsupported(spec, q, k, v, NO_MASK, 4) == "smooth_q=True with per-block K scales"
    spec = DecodeSpec(127, k_per_token=True, smooth_k=True, smooth_q=False, pv="fp8_e5m2")
    assert "fp8_e5m2" in cuda_decode.unsupported(spec, q, k, v, NO_MASK, 4)
    assert "head_dim=80" in cuda_decode.unsupported(SPEC, q[..., :80], k[..., :80], v[..., :80], NO_MASK, 4)
    assert "32 query rows" in cuda_decode.unsupported(SPEC, q, k, v, NO_MASK, 32)
    lens = MaskSpec(kind=NO_MASK.kind, k_lens=torch.tensor([50]))
    assert cuda_decode.unsupported(SPEC, q, k, v, lens, 4) == "sequence lengths"
    odd = torch.empty(1, 2, 100, 130, dtype=q.dtype)[..., 1:129]  # rows start 2 bytes off 16
    assert "k's rows" in cuda_decode.unsupported(SPEC, q, odd, v, NO_MASK, 4)
    heads_apart = torch.zeros(2 * 12804, dtype=q.dtype).as_strided((1, 2, 100, 128), (2 * 12804, 12804, 128, 1))
    assert heads_apart.stride(1) == 12804  # heads 12804 elements apart: not a multiple of 16 bytes
    assert "v's rows" in cuda_decode.unsupported(SPEC, q, k, heads_apart, NO_MASK, 4)


@pytest.mark.skipif(build.find_nvcc() is None, reason="needs nvcc")
def test_the_copy_floor_experiment_compiles_for_sm90a(tmp_path):
    """experiments/copy_floor/copy_floor.cu includes csrc/common's headers: keep it building."""
    proc = subprocess.run([build.find_nvcc(), "-std=c++17", "-O1", *build.ARCH_FLAGS, f"-I{build.CSRC}",
                           str(build.ROOT / "experiments" / "copy_floor" / "copy_floor.cu"), "-o",
                           str(tmp_path / "floor")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_decode_backend_is_cuda_only_for_auto_on_hopper():
    q, k, v = make_qkv(1, 8, 1, 128, heads_kv=2, seqlen_k=100)
    for requested in ("auto", "triton"):  # CPU tensors: never the CUDA sweep
        assert decode.resolve_decode_backend(requested, "triton", q, k, v, SPEC, NO_MASK, "sage2") == "triton"
    assert decode.resolve_decode_backend("torch", "torch", q, k, v, SPEC, NO_MASK, "sage2") == "torch"
    # sage2's explicit "cuda": the CUDA sweep or an error naming what is missing, never Triton
    with pytest.raises(ValueError, match="backend='cuda' needs tensors on an sm_90 GPU, got cpu"):
        decode.resolve_decode_backend("cuda", "triton", q, k, v, SPEC, NO_MASK, "sage2")
    e5m2 = DecodeSpec(127, k_per_token=True, smooth_k=True, smooth_q=False, pv="fp8_e5m2")
    with pytest.raises(ValueError, match=r"backend='cuda' does not support P V as fp8_e5m2 in decode \(Nq <= 16\)"):
        decode.resolve_decode_backend("cuda", "triton", q, k, v, e5m2, NO_MASK, "sage2")


def test_decode_op_names_a_bad_argument():
    q, k, v = make_qkv(1, 8, 1, 64, heads_kv=2, seqlen_k=100)
    out = torch.empty_like(q)
    lse = torch.empty(0)
    part_o = torch.empty(3, 2, 16, 64)
    part_l = torch.empty(3, 2, 16)
    counters = torch.zeros(5, dtype=torch.int32)  # 2 x B * Hkv + 1
    link = torch.empty(2 * 2, dtype=torch.int32)  # B * Hkv x tiles
    args = (True, 0, 1, 1, 0.1, 0.0, 127, True, True, False, False, 2, torch.empty(0), 0)
    with pytest.raises(ValueError, match="decode: mask_kind must be 0, 1 \\(a uint8 mask\\) or 2"):
        cuda_decode.decode(q, k, v, out, lse, part_o, part_l, counters, link, *args[:-2],
                           torch.ones(1, 8, 1, 99, dtype=torch.uint8), 1)  # one key short
    with pytest.raises(ValueError, match="decode: mask_kind must be 0, 1 \\(a uint8 mask\\) or 2"):
        cuda_decode.decode(q, k, v, out, lse, part_o, part_l, counters, link, *args[:-2],
                           torch.zeros(1, 8, 1, 100), 1)  # a bias given as a keep mask
    with pytest.raises(ValueError, match="decode: k must be a 4-D fp16 or bf16"):
        cuda_decode.decode(q, k.float(), v, out, lse, part_o, part_l, counters, link, *args)
    with pytest.raises(ValueError, match="decode: out must have q's shape"):
        cuda_decode.decode(q, k, v, out[:, :1], lse, part_o, part_l, counters, link, *args)
    with pytest.raises(ValueError, match="decode: counters must be a contiguous 1-D torch.int32"):
        cuda_decode.decode(q, k, v, out, lse, part_o, part_l, counters.long(), link, *args)
    with pytest.raises(ValueError, match=r"decode: lse must be empty or \[B, Hq, Nq\]"):
        cuda_decode.decode(q, k, v, out, torch.empty(1, 8, 2), part_o, part_l, counters, link, *args)
    with pytest.raises(ValueError, match=r"must be \[splits, B\*Hkv, 16, D\]"):
        cuda_decode.decode(q, k, v, out, lse, part_o[:, :1].clone(), part_l, counters, link, *args)
    with pytest.raises(ValueError, match=r"\[2\*B\*Hkv \+ 1\] and \[B\*Hkv\*ceil\(Nk/64\)\]"):
        cuda_decode.decode(q, k, v, out, lse, part_o, part_l, counters[:2], link, *args)
    with pytest.raises(ValueError, match=r"\[2\*B\*Hkv \+ 1\] and \[B\*Hkv\*ceil\(Nk/64\)\]"):
        cuda_decode.decode(q, k, v, out, lse, part_o, part_l, counters, link[:3], *args)
    # q, k and v whose sizes disagree (the kernel maps them by k's and q's sizes alone)
    for qq, kk, vv in ((q, k, v[:, :, :50]), (q[:, :5], k, v), (q, k[..., :32], v[..., :32])):
        with pytest.raises(ValueError, match=r"decode: q \[B, Hq, Nq, D\], k and v \[B, Hkv, Nk, D\]"):
            cuda_decode.decode(qq, kk, vv, torch.empty_like(qq), lse, part_o, part_l, counters, link, *args)


def _spy(monkeypatch):
    calls = []
    real = cuda_decode.run_decode
    monkeypatch.setattr(cuda_decode, "run_decode", lambda *a: calls.append(1) or real(*a))
    return calls


def _cuda_against_triton_and_emulation(fn, q, k, v, monkeypatch, **kw):
    """``fn`` with ``return_lse=True`` on the CUDA sweep (asserted to run it), the Triton sweep and
    the emulation: the CUDA output as close to the emulation's as the Triton one (both differ from it
    in summation order only). Returns (CUDA output, CUDA LSE, emulated LSE)."""
    calls = _spy(monkeypatch)
    out_c, lse_c = fn(q, k, v, backend="auto", return_lse=True, **kw)
    assert calls == [1], "backend='auto' did not run the CUDA sweep"
    out_t, _ = fn(q, k, v, backend="triton", return_lse=True, **kw)
    out_e, lse_e = fn(q, k, v, backend="torch", return_lse=True, **kw)
    c_vs_e, t_vs_e = accuracy(out_e.double(), out_c), accuracy(out_e.double(), out_t)
    assert c_vs_e.rel_l1 < max(2e-3, 1.5 * t_vs_e.rel_l1), (c_vs_e, t_vs_e)
    return out_c, lse_c, lse_e


@gpu
@hopper
@pytest.mark.parametrize("name", COVERED)
@pytest.mark.parametrize("n_q,heads,heads_kv,n_k,causal,head_dim", [
    (1, 8, 2, 333, False, 128), (1, 8, 2, 4000, False, 64), (4, 8, 2, 1000, True, 128), (5, 4, 4, 200, True, 64),
    (1, 16, 1, 130, False, 128), (2, 8, 1, 97, True, 128), (1, 4, 4, 5000, False, 128),
    (1, 8, 2, 37, False, 128), (3, 4, 1, 3, True, 64),  # fewer keys than one tile (TMA's box: zeros past Nk)
    (1, 12, 1, 500, False, 128), (1, 18, 2, 700, True, 64)])  # groups 12 and 9: rows 9-16 of the fragments
def test_cuda_sweep_matches_emulation_and_triton(name, n_q, heads, heads_kv, n_k, causal, head_dim, monkeypatch):
    fn, opts = COVERED[name]
    q, k, v = make_qkv(2, heads, n_q, head_dim, heads_kv=heads_kv, seqlen_k=n_k, kind="k_bias", seed=n_q + n_k,
                       device="cuda")
    calls = _spy(monkeypatch)
    k_vs_e, e_vs_ref = kernel_vs_emulation(fn, q, k, v, tensor_layout="HND", is_causal=causal,
                                           kernel_backend="auto", **opts)
    assert calls == [1], "backend='auto' did not run the CUDA sweep"
    t_vs_e, _ = kernel_vs_emulation(fn, q, k, v, tensor_layout="HND", is_causal=causal, **opts)
    # as close to the emulation as the Triton sweep (both differ from it in summation order only)
    assert k_vs_e.rel_l1 < max(2e-3, 1.5 * t_vs_e.rel_l1), (k_vs_e, t_vs_e)
    assert e_vs_ref.cos_sim > 0.98, e_vs_ref


@gpu
@hopper
@pytest.mark.parametrize("name", ["sage1", "sage2_8b", "sage2_4b", "sage2_fp16pv"])
@pytest.mark.parametrize("mask_name", ["left_padding", "left_padding_additive", "per_head_bias"])
@pytest.mark.parametrize("n_q,head_dim,causal", [(1, 128, False), (4, 64, False), (3, 128, True)])
def test_cuda_sweep_with_attn_mask(name, mask_name, n_q, head_dim, causal, monkeypatch):
    """A dense attn_mask (Hugging Face's left padding, bool or additive; a per-head, per-query
    bias) runs the CUDA sweep, which reads it per score: against the emulation, the Triton sweep
    and exact attention."""
    from test_decode import _masks

    fn, opts = COVERED[name]
    q, k, v = make_qkv(3, 8, n_q, head_dim, heads_kv=2, seqlen_k=1333, kind="k_bias", seed=n_q, device="cuda")
    mask = _masks(3, 8, n_q, 1333)[mask_name].cuda()
    out_c, lse_c, lse_e = _cuda_against_triton_and_emulation(fn, q, k, v, monkeypatch, attn_mask=mask,
                                                            is_causal=causal, **opts)
    fin = torch.isfinite(lse_e)
    assert torch.equal(torch.isfinite(lse_c), fin) and (lse_c - lse_e)[fin].abs().max() < 1e-3
    ref = attention_reference(q, k, v, attn_mask=mask, is_causal=causal)
    assert accuracy(ref[fin], out_c[fin]).cos_sim > 0.98


@gpu
@hopper
@pytest.mark.parametrize("name", ["sage1", "sage2_8b"])
@pytest.mark.parametrize("heads,heads_kv,n_q,mask_shape", [
    (8, 8, 1, "b h 1 k"),  # one query head per program: its rows read one mask row (shared memory)
    (8, 2, 4, "b 1 1 k"),  # four queries, one mask row for all of them (shared memory)
    (8, 2, 3, "b 1 q k"),  # a row per query: each thread loads its own scores' entries
    (8, 2, 1, "b h 1 k"),  # a row per head of the group: likewise
])
def test_cuda_sweep_mask_rows_alike_or_not(name, heads, heads_kv, n_q, mask_shape, monkeypatch):
    """The CUDA sweep reads a mask whose rows are alike within a program (every query head and query
    of a KV head reads one row) through shared memory, and any other per thread: both against the
    emulation, on full tiles and the last partial one (1333 keys)."""
    fn, opts = COVERED[name]
    batch, n_k = 2, 1333
    q, k, v = make_qkv(batch, heads, n_q, 128, heads_kv=heads_kv, seqlen_k=n_k, kind="k_bias", seed=7, device="cuda")
    shape = [batch if d == "b" else heads if d == "h" else n_q if d == "q" else n_k if d == "k" else 1
             for d in mask_shape.split()]
    g = torch.Generator(device="cuda").manual_seed(1)
    mask = torch.randn(shape, generator=g, device="cuda")
    mask[torch.rand(shape, generator=g, device="cuda") < 0.3] = float("-inf")
    out_c, lse_c, lse_e = _cuda_against_triton_and_emulation(fn, q, k, v, monkeypatch, attn_mask=mask, **opts)
    assert (lse_c - lse_e).abs().max() < 1e-3
    assert accuracy(attention_reference(q, k, v, attn_mask=mask), out_c).cos_sim > 0.99


@gpu
@hopper
@pytest.mark.parametrize("name", ["sage1", "sage2_8b", "sage2_4b"])
@pytest.mark.parametrize("heads,heads_kv,n_q,deterministic", [(8, 2, 1, False), (4, 4, 4, False), (8, 2, 1, True)])
def test_cuda_sweep_padding_mask_that_drops_whole_tiles(name, heads, heads_kv, n_q, deterministic, monkeypatch):
    """A padding mask that drops whole tiles, and all of a sequence: that sequence gives zeros and
    an LSE of -inf, NaN and Inf in dropped keys' K and V reach no row, and the rest matches the
    emulation (left padding of 0, 200 and 1300 keys of 1333: no tile, three tiles and a part, all
    but 33 keys), with dynamic tiles and with torch's deterministic mode (static splits)."""
    fn, opts = COVERED[name]
    batch, n_k = 4, 1333
    q, k, v = make_qkv(batch, heads, n_q, 128, heads_kv=heads_kv, seqlen_k=n_k, kind="k_bias", seed=3, device="cuda")
    first = torch.tensor([0, 200, n_k, 1300], device="cuda")  # sequence 2 keeps nothing
    keep = (torch.arange(n_k, device="cuda")[None, :] >= first[:, None])[:, None, None, :]
    k[1, :, 5, 7], v[1, :, 130, 0], k[2, :, 64:70, 1], v[3, :, 1299, 3] = float("nan"), float("inf"), float("nan"), float("-inf")
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: deterministic)
    out_c, lse_c, lse_e = _cuda_against_triton_and_emulation(fn, q, k, v, monkeypatch, attn_mask=keep, **opts)
    assert torch.isfinite(out_c).all() and torch.equal(out_c[2], torch.zeros_like(out_c[2]))
    assert (lse_c[2] == float("-inf")).all() and torch.isfinite(lse_c[[0, 1, 3]]).all()
    assert (lse_c - lse_e)[[0, 1, 3]].abs().max() < 1e-3
    clean_k, clean_v = (torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0) for x in (k, v))
    ref = attention_reference(q, clean_k, clean_v, attn_mask=keep)
    assert accuracy(ref[[0, 1, 3]], out_c[[0, 1, 3]]).cos_sim > 0.98


@gpu
@hopper
@pytest.mark.parametrize("name", ["sage1", "sage2_per_block", "sage2_8b", "sage2_4b"])
@pytest.mark.parametrize("n_k", [8000, 8001])  # 8001: rows of the mask start off 16-byte chunks
def test_cuda_sweep_claims_only_the_tiles_a_padding_mask_keeps(name, n_k, monkeypatch):
    """With a keep mask whose rows are alike (a padding mask) the kernels with one K scale per tile
    go through the tiles it keeps alone: a tile the mask drops is never taken (its link in the
    scratch is never written), every other one is (a sequence that keeps nothing: its first tile
    alone, all of its scores dropped). Those with per-token K scales (sage2's default) take every
    tile (their loop was 5-11% slower with the list's code in it). Either way the result is the
    emulation's, and that of fixed splits (torch's deterministic mode)."""
    fn, opts = COVERED[name]
    B, Hq, Hkv = 4, 32, 8
    q, k, v = make_qkv(B, Hq, 1, 128, heads_kv=Hkv, seqlen_k=n_k, kind="k_bias", seed=5, device="cuda")
    j = torch.arange(n_k, device="cuda")
    keep = torch.stack([j >= 0, j >= 3000, j >= n_k, (j // 64) % 3 != 1])  # all, a prefix, none, holes
    keep[3, 64 * 40 + 5] = True  # one key of a tile otherwise dropped
    keep = keep[:, None, None, :]
    splits = []
    real = cuda_decode.run_decode
    monkeypatch.setattr(cuda_decode, "run_decode", lambda *a: splits.append(a[5]) or real(*a))
    fn(q, k, v, attn_mask=keep, **opts)  # the stream's scratch, then its tile links marked unwritten
    n_tiles, bh = -(-n_k // 64), B * Hkv
    scratch, _ = cuda_decode._WORKSPACES[(q.device.index, build.current_stream_handle(q.device.index))]
    at = splits[-1] * bh * 16 * (128 + 1)  # past the partial outputs and LSEs
    links = scratch[at:at + bh * n_tiles].view(torch.int32).view(B, Hkv, n_tiles)
    links.fill_(-7)
    out, lse = fn(q, k, v, attn_mask=keep, return_lse=True, **opts)
    taken = links != -7
    assert n_tiles > 2 * splits[-1]  # claims past the programs' first tiles
    want = torch.nn.functional.pad(keep[:, 0, 0], (0, n_tiles * 64 - n_k)).view(B, n_tiles, 64).any(-1)
    want[2, 0] = True
    if name in ("sage2_8b", "sage2_4b"):
        want[:] = True
    assert torch.equal(taken, want[:, None, :].expand(B, Hkv, n_tiles))
    assert torch.equal(out[2], torch.zeros_like(out[2])) and (lse[2] == float("-inf")).all()
    emulated, emulated_lse = fn(q, k, v, attn_mask=keep, return_lse=True, backend="torch", **opts)
    assert accuracy(emulated.double(), out.double()).rel_l1 < 2e-3
    ok = torch.isfinite(emulated_lse)
    assert torch.equal(torch.isfinite(lse), ok) and (lse - emulated_lse)[ok].abs().max() < 1e-3
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    static, static_lse = fn(q, k, v, attn_mask=keep, return_lse=True, **opts)
    assert accuracy(static.double(), out.double()).rel_l1 < 1e-4
    torch.testing.assert_close(lse, static_lse, rtol=1e-5, atol=1e-5)


@gpu
@hopper
def test_cuda_sweep_attn_mask_rows_and_nonfinite_keys(monkeypatch):
    """test_decode's mask rule test, on the CUDA sweep (a NaN in a dropped key reaches no row)."""
    from test_decode import check_attn_mask_rows_and_nonfinite_keys, check_nan_in_an_additive_mask

    calls = _spy(monkeypatch)
    check_attn_mask_rows_and_nonfinite_keys("cuda", ("auto",), head_dim=128)
    assert len(calls) == 2, "the CUDA sweep did not run"
    calls.clear()
    check_nan_in_an_additive_mask("cuda", ("auto",), head_dim=128)
    assert len(calls) == 2, "the CUDA sweep did not run"


@gpu
@hopper
def test_sage2_backend_cuda_runs_the_cuda_sweep_or_says_why_not(monkeypatch):
    q, k, v = make_qkv(1, 8, 1, 128, heads_kv=2, seqlen_k=500, kind="k_bias", seed=5, device="cuda")
    calls = _spy(monkeypatch)
    out = sage2.sageattn(q, k, v, qk_dtype="int4", backend="cuda")  # Q smoothing: decode covers it, prefill not
    assert calls == [1]
    emulated = sage2.sageattn(q, k, v, qk_dtype="int4", backend="torch")
    assert accuracy(emulated, out).rel_l1 < 2e-3
    with pytest.raises(ValueError, match=r"backend='cuda' does not support P V as fp8_e5m2 in decode"):
        sage2.sageattn(q, k, v, pv_dtype="fp8_e5m2", backend="cuda")


@gpu
@hopper
@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["sage1", "sage2_8b", "sage2_4b"])  # sage2_4b: Q smoothing's mean q in 2 or 3 parts
@pytest.mark.parametrize("batch,heads_kv,n_k,head_dim", [(2, 2, 777, 128), (1, 1, 1, 128), (2, 2, 2, 128),
                                                      (2, 2, 777, 64)])  # one key: a stride of no use
def test_cuda_sweep_layouts_and_dtypes(layout, dtype, name, batch, heads_kv, n_k, head_dim, monkeypatch):
    fn, opts = COVERED[name]
    q, k, v = make_qkv(batch, 4 * heads_kv, 1, head_dim, heads_kv=heads_kv, seqlen_k=n_k, kind="k_bias", dtype=dtype,
                       layout=layout, device="cuda", seed=3)
    calls = _spy(monkeypatch)
    k_vs_e, e_vs_ref = kernel_vs_emulation(fn, q, k, v, tensor_layout=layout, is_causal=False, kernel_backend="auto",
                                           **opts)
    assert calls == [1]
    assert k_vs_e.rel_l1 < 3e-3 and e_vs_ref.cos_sim > 0.998, (k_vs_e, e_vs_ref)


@gpu
@hopper
@pytest.mark.parametrize("where,causal,value", [("q", False, "nan"), ("k", True, "nan"), ("v", False, "inf"),
                                                ("v", True, "-inf"), ("v", False, "nan")])
def test_cuda_sweep_nonfinite_rows_follow_the_rule(where, causal, value, monkeypatch):
    q, k, v = make_qkv(1, 4, 4, 64, heads_kv=2, seqlen_k=200, kind="k_bias", seed=11, device="cuda")
    t = {"q": q, "k": k, "v": v}[where]
    t[0, 1, 2 if where == "q" else 198, 5] = float(value)
    want = nan_rows(q, k, v, is_causal=causal, mask=NO_MASK)
    assert want.any() and not want.all()
    copies = [x.clone() for x in (q, k, v)]
    calls = _spy(monkeypatch)
    # (INT4: Q smoothing, in the careful sweep too; its own accuracy floor, as in the emulation sweep)
    for fn, opts, floor in ((sage1.sageattn, {}, 0.998), (sage2.sageattn, {}, 0.998),
                            (sage2.sageattn, dict(qk_dtype="int4"), 0.98)):
        out, lse = fn(q, k, v, is_causal=causal, return_lse=True, **opts)
        assert torch.equal(torch.isnan(out).any(-1), want) and torch.equal(torch.isnan(lse), want)
        clean = [torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0) for x in (q, k, v)]
        ref = attention_reference(*clean, is_causal=causal)
        assert accuracy(ref[~want], out[~want]).cos_sim > floor
        emulated = fn(q, k, v, is_causal=causal, backend="torch", **opts)
        assert accuracy(emulated[~want].double(), out[~want].double()).rel_l1 < 2e-3
    assert len(calls) == 3
    assert all(torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)) for a, b in zip((q, k, v), copies))


@gpu
@hopper
@pytest.mark.parametrize("dtype,scale", [(torch.float16, 6e4), (torch.bfloat16, 1e30)])
def test_cuda_sweep_large_values_stay_finite(dtype, scale, monkeypatch):
    # fp16 P V overflows in the fast sweep: the split is flagged and the combine redoes it carefully
    q, k, v = make_qkv(1, 4, 1, 64, heads_kv=1, seqlen_k=300, kind="k_bias", dtype=torch.float32, seed=13)
    v = (v / v.abs().amax() * scale).to(dtype)
    q, k = q.to(dtype), k.to(dtype)
    ref = attention_reference(q, k, v)
    calls = _spy(monkeypatch)
    for fn, opts in ((sage1.sageattn, {}), (sage1.sageattn, dict(pv_accum="fp32")), (sage2.sageattn, {}),
                     (sage2.sageattn, dict(pv_dtype="fp16")), (sage2.sageattn, dict(qk_dtype="int4", pv_dtype="fp16"))):
        out = fn(q.cuda(), k.cuda(), v.cuda(), **opts).cpu()  # (the last: Q smoothing in the careful sweep)
        assert torch.isfinite(out).all()
        assert accuracy(ref.double(), out.double()).cos_sim > 0.998
    assert len(calls) == 5


@gpu
@hopper
@pytest.mark.parametrize("fn", [sage1.sageattn, sage2.sageattn])
def test_cuda_sweep_at_a_real_decode_size(fn, monkeypatch):
    q, k, v = make_qkv(2, 32, 1, 128, heads_kv=8, seqlen_k=16384 + 37, kind="k_bias", device="cuda", seed=7)
    calls = _spy(monkeypatch)
    k_vs_e, e_vs_ref = kernel_vs_emulation(fn, q, k, v, tensor_layout="HND", is_causal=False, kernel_backend="auto")
    assert calls == [1]
    assert k_vs_e.rel_l1 < 2e-3 and e_vs_ref.cos_sim > 0.998, (k_vs_e, e_vs_ref)


@gpu
@hopper
def test_cuda_decode_op_and_graph_capture(monkeypatch):
    q, k, v = make_qkv(2, 8, 1, 128, heads_kv=2, seqlen_k=3000, kind="k_bias", device="cuda", seed=9)
    eager, lse = sage1.sageattn(q, k, v, return_lse=True)
    pool, first = cuda_decode._CAPTURE_COUNTERS[q.device.index]  # zeroed by the eager call, before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured, captured_lse = sage1.sageattn(q, k, v, return_lse=True)
    assert cuda_decode._CAPTURE_COUNTERS[q.device.index][1] == first + 2 * 2 * 2 + 1  # its own 2 x B * Hkv + 1
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        graph.replay()
        graph.replay()  # the per-KV-head counters start at zero again on every replay
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 2 and all("decode_kernel" in name for name in kernels), kernels  # no fill captured
    assert torch.equal(captured, eager) and torch.equal(captured_lse, lse)
    assert int(pool[first:first + 9].abs().sum()) == 0
    B, Hkv, splits = 2, 2, 3
    args = (q, k, v, torch.empty_like(q), torch.empty(2, 8, 1, device="cuda"),
            torch.empty(splits, B * Hkv, 16, 128, device="cuda"), torch.empty(splits, B * Hkv, 16, device="cuda"),
            torch.zeros(2 * B * Hkv + 1, dtype=torch.int32, device="cuda"),
            torch.empty(B * Hkv * 47, dtype=torch.int32, device="cuda"), True, 0, 1, 16, 0.127, 0.0, 127, False, True,
            False, False, 0, torch.ones(2, 1, 1, 3000, dtype=torch.uint8, device="cuda").expand(2, 8, 1, 3000), 1)
    torch.library.opcheck(cuda_decode.decode, args, test_utils=("test_schema", "test_faketensor"))


def _tile_links(q, k, dynamic=True):
    """The tile links in the scratch of the last eager call on the current stream ([B*Hkv, tiles] int32
    on the GPU: per tile, the tile its program took before it, -1 for a program's first) and the
    number of partial slots per KV head (programs per KV head, or with helpers 1 +
    HELPERS_PER_KV_HEAD). ``dynamic``: whether that call claimed tiles (not in deterministic mode)."""
    B, Hkv, Nk, D = k.shape
    bh, tiles = B * Hkv, -(-Nk // 64)
    splits, _ = decode.cuda_plan(bh, tiles, decode.split_tiles(bh, 1, Nk, q.device), dynamic, q.device)
    scratch, _ = cuda_decode._WORKSPACES[(q.device.index, build.current_stream_handle(q.device.index))]
    start = splits * bh * 16 * (D + 1)  # after the partial outputs and LSEs
    return scratch[start:start + bh * tiles].view(torch.int32).view(bh, tiles), splits


def _static_links(k, device):
    """The links a static split leaves on every KV head: per tile, the tile before it in its split
    (-1 at a split's start)."""
    B, Hkv, Nk, _ = k.shape
    tps = decode.split_tiles(B * Hkv, 1, Nk, device)
    return torch.tensor([-1 if t % tps == 0 else t - 1 for t in range(-(-Nk // 64))], dtype=torch.int32)


def _check_partition(links, chains):
    """Every tile of every KV head was taken exactly once: the links form `chains` chains per KV head,
    an int or a (least, most) range (helpers join some KV heads) (the links were filled with -2
    before the call: none is left). Returns the number of chains per KV head."""
    least, most = (chains, chains) if isinstance(chains, int) else chains
    counts = (links == -1).sum(1)
    assert int((links < -1).sum()) == 0 and int(counts.min()) >= least and int(counts.max()) <= most
    for row in links:
        prev = row[row >= 0]
        assert prev.unique().numel() == prev.numel() and int(prev.max()) < row.numel()
    return counts


# 8 KV heads x 626 tiles: 33 programs per KV head take 2 tiles each, then claim the other 560
DYNAMIC_SHAPE = dict(batch=2, heads=16, heads_kv=4, seqlen_k=40000 + 5)


def _dynamic_inputs(seed):
    s = DYNAMIC_SHAPE
    return make_qkv(s["batch"], s["heads"], 1, 128, heads_kv=s["heads_kv"], seqlen_k=s["seqlen_k"], kind="k_bias",
                    seed=seed, device="cuda")


@gpu
@hopper
@pytest.mark.parametrize("name", ["sage1", "sage2_8b", "sage2_4b_nosmooth_q", "sage2_4b"])
def test_cuda_dynamic_tiles_agree_with_the_static_split(name, monkeypatch):
    """The programs of a KV head claim its tiles dynamically (csrc/decode/split_kv.cu): in whatever
    order they take them the result is the static split's up to fp32 rounding (each tile's P is
    quantized after its own row max), every tile is taken once, and under torch's deterministic mode
    the kernel runs the static split, the same bits on every call. (Q smoothing with several queries
    per head runs static splits by default; the knob set here makes it dynamic there too, as
    decode_variants' `q` builds time it. These inputs have one query per head.)"""
    fn, opts = COVERED[name]
    q, k, v = _dynamic_inputs(31)
    calls = _spy(monkeypatch)
    monkeypatch.setattr(decode, "DYNAMIC_TILES_SMOOTH_Q", True)
    dynamic = [fn(q, k, v, return_lse=True, **opts) for _ in range(3)]
    links, splits = _tile_links(q, k)
    links.fill_(-2)
    dynamic.append(fn(q, k, v, return_lse=True, **opts))
    links = links.cpu()
    _check_partition(links, splits)
    static_links = _static_links(k, q.device)
    assert not torch.equal(links[0], static_links)  # program p took tiles p and p + splits first
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    static = [fn(q, k, v, return_lse=True, **opts) for _ in range(3)]
    links, _ = _tile_links(q, k, dynamic=False)
    assert all(torch.equal(row, static_links) for row in links.cpu())
    monkeypatch.undo()
    assert len(calls) == 7
    assert all(torch.equal(out, static[0][0]) and torch.equal(lse, static[0][1]) for out, lse in static)
    for out, lse in dynamic:
        assert accuracy(static[0][0].double(), out.double()).rel_l1 < 1e-4
        torch.testing.assert_close(lse, static[0][1], rtol=1e-5, atol=1e-5)
    emulated = fn(q, k, v, backend="torch", **opts)
    assert accuracy(emulated.double(), dynamic[0][0].double()).rel_l1 < 2e-3


@gpu
@hopper
@pytest.mark.parametrize("n_q,dynamic", [(1, True), (2, False)])
def test_cuda_q_smoothing_claims_tiles_only_with_one_query_per_head(n_q, dynamic, monkeypatch):
    """By default Q smoothing (sage2 INT4) runs dynamic tiles with one query per head, where it
    quantizes nothing and is as memory-bound as the 8-bit kernel, and static splits with several
    (compute-bound, where claiming measured slower): common.decode.DYNAMIC_TILES_SMOOTH_Q."""
    s = DYNAMIC_SHAPE
    q, k, v = make_qkv(s["batch"], s["heads"], n_q, 128, heads_kv=s["heads_kv"], seqlen_k=s["seqlen_k"],
                       kind="k_bias", seed=33, device="cuda")
    calls = _spy(monkeypatch)
    sage2.sageattn(q, k, v, qk_dtype="int4")  # a first call makes the scratch
    links, splits = _tile_links(q, k)
    links.fill_(-2)
    out = sage2.sageattn(q, k, v, qk_dtype="int4")
    links = links.cpu()
    assert calls == [1, 1]
    _check_partition(links, splits)
    static_links = _static_links(k, q.device)
    assert all(torch.equal(row, static_links) for row in links) != dynamic
    emulated = sage2.sageattn(q, k, v, qk_dtype="int4", backend="torch")
    assert accuracy(emulated.double(), out.double()).rel_l1 < 2e-3


@gpu
@hopper
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_q", [1, 3])
def test_cuda_q_smoothing_with_large_scaled_queries(dtype, n_q, monkeypatch):
    """Q smoothing's mean q enters the tensor cores as 16-bit parts. With sm_scale = 1 and |q| up to 6e4,
    q's log2 scaling (1.44) takes the mean past fp16's range: the fp16 parts hold it divided by a power
    of two. bf16 takes three parts; with several queries per head its INT codes are not zero."""
    gen = torch.Generator(device="cuda").manual_seed(7)
    q = (torch.randn(2, 8, n_q, 128, device="cuda", generator=gen) * 2e4).clamp(-6e4, 6e4).to(dtype)
    k = (torch.randn(2, 2, 700, 128, device="cuda", generator=gen) * 2e-4 + 1e-4).to(dtype)
    v = torch.randn(2, 2, 700, 128, device="cuda", generator=gen).to(dtype)
    calls = _spy(monkeypatch)
    out = sage2.sageattn(q, k, v, qk_dtype="int4", sm_scale=1.0)
    assert calls == [1]
    assert torch.isfinite(out).all()
    emulated = sage2.sageattn(q, k, v, qk_dtype="int4", sm_scale=1.0, backend="torch")
    assert accuracy(emulated.double(), out.double()).rel_l1 < 2e-3


@gpu
@hopper
@pytest.mark.parametrize("fn", [sage1.sageattn, sage2.sageattn])
def test_cuda_dynamic_tiles_careful_sweep_replays_its_own_tiles(fn, monkeypatch):
    """A program flagged by a NaN or an fp16 overflow sweeps again, carefully, exactly the tiles it
    claimed (through their links). Here the scores are nearly flat and V is large and positive, so
    every tile's fp16 P V sum overflows and flags every program of sage1 (sage2's FP8 P V has per-channel
    scales and does not overflow); a NaN in one key's K flags one program of either. Both match the
    emulation."""
    q, k, v = _dynamic_inputs(32)
    q = q * 0.05  # nearly flat scores: p ~ 1 on every key
    v = v.abs() + 1.0
    v = v * (3e4 / v.abs().amax())  # >= ~5e3 everywhere: 64 keys' fp16 sum overflows
    k[1, 2, 31111, 7] = float("nan")  # KV head 6: its query heads' rows are NaN
    calls = _spy(monkeypatch)
    out = fn(q, k, v)
    emulated = fn(q, k, v, backend="torch")
    assert calls == [1]
    want = nan_rows(q, k, v, is_causal=False, mask=NO_MASK)
    assert torch.equal(torch.isnan(out).any(-1), want) and int(want.sum()) == 4
    assert torch.isfinite(out[~want]).all()
    assert accuracy(emulated[~want].double(), out[~want].double()).rel_l1 < 2e-3


@gpu
@hopper
def test_cuda_dynamic_tiles_replay_from_a_cuda_graph():
    """A captured call with claimed tiles replays correctly again and again: the merging programs
    leave both counters of every KV head (programs done, tiles claimed) at zero."""
    _check_graph_replays(sage1.sageattn, *_dynamic_inputs(33))


def _check_graph_replays(fn, q, k, v):
    """fn(q, k, v) captured into a CUDA graph replays three times, each within fp32 rounding of an
    eager call, with its own 2 B*Hkv + 1 counters from the capture pool back at zero after each."""
    eager = fn(q, k, v)
    pool, first = cuda_decode._CAPTURE_COUNTERS[q.device.index]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn(q, k, v)
    n = 2 * q.shape[0] * k.shape[1] + 1
    assert cuda_decode._CAPTURE_COUNTERS[q.device.index][1] == first + n
    for _ in range(3):
        captured.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert accuracy(eager.double(), captured.double()).rel_l1 < 1e-4
        assert int(pool[first:first + n].abs().sum()) == 0


# more KV heads than two programs per SM (on the H100's 132 SMs): one owner program per KV head and
# 264 helpers, which join KV heads from the start (8 programs fit beside the owners) and in the tail
HELPER_SHAPE = dict(batch=9, heads=32, heads_kv=32, seqlen_k=4000 + 5)


def _helper_inputs(seed, n_q=1, kind="k_bias"):
    s = HELPER_SHAPE
    return make_qkv(s["batch"], s["heads"], n_q, 128, heads_kv=s["heads_kv"], seqlen_k=s["seqlen_k"], kind=kind,
                    seed=seed, device="cuda")


def _counters_are_zero():
    return all(int(counters.abs().sum()) == 0 for _, counters in cuda_decode._WORKSPACES.values())


@gpu
@hopper
@pytest.mark.parametrize("name", ["sage1", "sage2_8b", "sage2_4b"])
def test_cuda_helpers_share_the_tiles_of_many_kv_heads(name, monkeypatch):
    """With one program per KV head the kernel appends helper programs that join the KV heads with the
    most tiles left (common.decode.cuda_plan): every tile is still taken once (each KV head's links
    form one chain per program: its owner's and one per helper that joined, at most
    HELPERS_PER_KV_HEAD), helpers did join, the result is the static split's up to fp32 rounding, and
    every counter is back at zero after each call."""
    fn, opts = COVERED[name]
    q, k, v = _helper_inputs(41)
    bh, tiles = q.shape[0] * k.shape[1], -(-k.shape[2] // 64)
    assert decode.split_tiles(bh, 1, k.shape[2], q.device) == tiles  # one program per KV head
    slots, helpers = decode.cuda_plan(bh, tiles, tiles, True, q.device)
    assert slots == 1 + decode.HELPERS_PER_KV_HEAD and helpers == 2 * torch.cuda.get_device_properties(0).multi_processor_count
    calls = _spy(monkeypatch)
    fn(q, k, v, **opts)  # makes the scratch
    links, _ = _tile_links(q, k)
    links.fill_(-2)
    out, lse = fn(q, k, v, return_lse=True, **opts)
    links = links.cpu()
    chains = _check_partition(links, (1, slots))
    assert int((chains > 1).sum()) > 0  # helpers joined some KV heads
    assert _counters_are_zero()
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    static, static_lse = fn(q, k, v, return_lse=True, **opts)
    links, _ = _tile_links(q, k, dynamic=False)
    assert int((links == -1).sum()) == bh  # no helpers in deterministic mode: one chain per KV head
    monkeypatch.undo()
    assert len(calls) == 3
    assert accuracy(static.double(), out.double()).rel_l1 < 1e-4
    torch.testing.assert_close(lse, static_lse, rtol=1e-5, atol=1e-5)
    emulated = fn(q, k, v, backend="torch", **opts)
    assert accuracy(emulated.double(), out.double()).rel_l1 < 2e-3


@gpu
@hopper
@pytest.mark.parametrize("name,n_q", [("sage1", 1), ("sage2_8b", 1), ("sage2_4b", 2)])
def test_cuda_masked_helpers_and_fixed_splits(name, n_q, monkeypatch):
    """A left-padding mask with helper programs (one owner per KV head; helpers' tiles and their
    mask entries read one tile ahead along chains they join midway) and with fixed splits (torch's
    deterministic mode; Q smoothing with two queries per head runs them by default): the emulation's
    result, and the same as each other to fp32 rounding."""
    fn, opts = COVERED[name]
    q, k, v = _helper_inputs(43, n_q=n_q)
    n_k = k.shape[2]
    first = torch.arange(q.shape[0], device="cuda") * 97 % 1500  # per sequence: keys [first, Nk)
    mask = (torch.arange(n_k, device="cuda")[None, :] >= first[:, None])[:, None, None, :]
    calls = _spy(monkeypatch)
    out, lse = fn(q, k, v, attn_mask=mask, return_lse=True, **opts)
    assert _counters_are_zero()
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    static, static_lse = fn(q, k, v, attn_mask=mask, return_lse=True, **opts)
    monkeypatch.undo()
    assert len(calls) == 2
    assert accuracy(static.double(), out.double()).rel_l1 < 1e-4
    torch.testing.assert_close(lse, static_lse, rtol=1e-5, atol=1e-5)
    emulated, emulated_lse = fn(q, k, v, attn_mask=mask, return_lse=True, backend="torch", **opts)
    assert accuracy(emulated.double(), out.double()).rel_l1 < 2e-3
    assert (lse - emulated_lse).abs().max() < 1e-3


@gpu
@hopper
@pytest.mark.parametrize("fn", [sage1.sageattn, sage2.sageattn])
def test_cuda_helpers_careful_sweep_and_graph_replay(fn, monkeypatch):
    """Helpers flagged by an fp16 overflow (sage1: V large and positive, scores nearly flat) or a NaN
    in one key's K replay exactly their own tiles carefully; the NaN rows are SDPA's; a captured call
    with helpers replays again and again, its counters back at zero after each replay."""
    q, k, v = _helper_inputs(42)
    q = q * 0.05
    v = v.abs() + 1.0
    v = v * (3e4 / v.abs().amax())
    k[3, 5, 3999, 7] = float("nan")  # KV head 3 * 32 + 5 (its tile 62, claimed late): one query head's row
    calls = _spy(monkeypatch)
    out = fn(q, k, v)
    want = nan_rows(q, k, v, is_causal=False, mask=NO_MASK)
    assert torch.equal(torch.isnan(out).any(-1), want) and int(want.sum()) == 1
    emulated = fn(q, k, v, backend="torch")
    assert accuracy(emulated[~want].double(), out[~want].double()).rel_l1 < 2e-3
    assert _counters_are_zero()
    _check_graph_replays(fn, *_helper_inputs(43))
    assert len(calls) == 3  # (the emulation and the replays do not launch through run_decode)


@gpu
@hopper
def test_cuda_sweep_reuses_its_scratch_across_calls_and_streams(monkeypatch):
    """Eager calls keep their scratch per stream (common.cuda_decode._eager_scratch): calls with different
    split plans one after another, on the default stream and on a second one, each match their
    emulation, and every counter is back at zero (one left over would skip or repeat a merge)."""
    calls = _spy(monkeypatch)
    cuda_decode.clear_workspaces()
    side = torch.cuda.Stream()
    # (batch, heads, heads_kv, keys); 9 x 32 KV heads: with helpers
    shapes = [(2, 8, 2, 5000), (2, 8, 2, 333), (9, 32, 32, 1000), (2, 16, 4, 2000), (9, 32, 32, 1000),
              (2, 8, 2, 5000), (2, 4, 4, 70)]
    for i, (batch, heads, heads_kv, n_k) in enumerate(shapes):
        q, k, v = make_qkv(batch, heads, 1, 128, heads_kv=heads_kv, seqlen_k=n_k, kind="k_bias", seed=20 + i,
                           device="cuda")
        stream = side if i % 2 else torch.cuda.current_stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            out = sage2.sageattn(q, k, v)
        torch.cuda.current_stream().wait_stream(stream)
        emulated = sage2.sageattn(q, k, v, backend="torch")
        assert accuracy(emulated.double(), out.double()).rel_l1 < 2e-3, (i, accuracy(emulated.double(), out.double()))
    torch.cuda.synchronize()
    assert calls == [1] * len(shapes)
    assert len(cuda_decode._WORKSPACES) == 2  # one per stream
    assert _counters_are_zero()


@gpu
@hopper
def test_branch_free_divisions_are_exact_over_their_domains():
    """csrc/common/exact_div.cuh (the decode sweep's K and V scales, sage3's P scales): x / c and
    1 / x without div.rn/rcp.rn's slow-path branches equal theirs for every positive fp32 x and
    +inf, within each form's stated domain (the kernel checks the domain: x / 6 where the quotient
    is normal, x / 448 of 16-bit values, rcp_rn up to 2^126, rcp_rn_normal from 2^-126)."""
    inf_bits = 0x7F800000
    found = build.load().exact_div_mismatches(1, inf_bits, build.current_stream_handle(0))
    assert set(found) == {"div6", "div7", "div127", "div448", "rcp", "rcp_normal"}
    assert all(count == 0 for count, _ in found.values()), {k: (c, hex(f)) for k, (c, f) in found.items()}
