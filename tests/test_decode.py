"""The decode path (common.decode): few queries, split-KV, K and V quantized per tile in the kernel.

Kernel (GPU, or Triton's interpreter) against the emulation of the same algorithm (same split
points), the emulation against exact attention, and the edge cases every path must handle:
GQA, causal with Nq > 1, key lengths (padding mask, varlen), both layouts, bf16, odd head dims,
NaN/Inf, large |V|, empty sequences, and that the prefill path still serves the options that have
no decode form."""

import pytest
import torch

import sage1
import sage2
from common import decode
from common.inputs import make_qkv
from common.masking import MaskSpec
from common.metrics import accuracy
from common.nonfinite import nan_rows
from common.reference import attention_reference
from conftest import KERNEL_DEVICE, kernel_vs_emulation

# (function, options, bound on cosine vs exact, bound on kernel-vs-emulation relative L1)
OPTIONS = {
    "sage1": (sage1.sageattn, {}, 0.9995, 2e-3),
    "sage1_fp32acc": (sage1.sageattn, dict(pv_accum="fp32"), 0.9995, 2e-3),
    "sage1_nosmooth": (sage1.sageattn, dict(smooth_k=False), 0.999, 2e-3),
    "sage2_8b": (sage2.sageattn, {}, 0.998, 2e-3),
    "sage2_4b": (sage2.sageattn, dict(qk_dtype="int4"), 0.98, 2e-3),
    "sage2_per_block": (sage2.sageattn, dict(qk_granularity="per_block"), 0.998, 2e-3),
    "sage2_fp16pv": (sage2.sageattn, dict(pv_dtype="fp16"), 0.999, 2e-3),
    "sage2_e5m2": (sage2.sageattn, dict(pv_dtype="fp8_e5m2"), 0.99, 2e-3),
    "sage2_smooth_q_int8": (sage2.sageattn, dict(smooth_q=True), 0.998, 2e-3),
}


def _to(dev, *ts):
    return tuple(t.to(dev) for t in ts)


@pytest.mark.parametrize("name", OPTIONS)
@pytest.mark.parametrize("n_q,heads,heads_kv,n_k,causal", [
    (1, 8, 2, 333, False), (1, 8, 2, 333, True), (5, 4, 4, 200, True), (16, 8, 1, 130, False), (3, 32, 1, 97, True)])
def test_decode_kernel_matches_emulation_and_exact(name, n_q, heads, heads_kv, n_k, causal, monkeypatch):
    fn, opts, cos_bound, kernel_bound = OPTIONS[name]
    q, k, v = make_qkv(2, heads, n_q, 64, heads_kv=heads_kv, seqlen_k=n_k, kind="k_bias", seed=n_q + n_k)
    k_vs_e, e_vs_ref = kernel_vs_emulation(fn, *_to(KERNEL_DEVICE, q, k, v), tensor_layout="HND", is_causal=causal,
                                           **opts)
    assert k_vs_e.rel_l1 < kernel_bound, k_vs_e
    assert e_vs_ref.cos_sim > cos_bound, e_vs_ref
    # per-tile statistics are at least as accurate as the prefill path's on the same inputs
    monkeypatch.setattr(decode, "DECODE_MAX_QUERIES", 0)
    prefill = accuracy(attention_reference(q, k, v, is_causal=causal), fn(q, k, v, is_causal=causal, backend="torch",
                                                                           **opts))
    assert e_vs_ref.cos_sim > prefill.cos_sim - 1e-4, (e_vs_ref, prefill)


@pytest.mark.parametrize("name", ["sage1", "sage2_8b", "sage2_4b", "sage2_e5m2"])
@pytest.mark.parametrize("n_q,causal", [(1, False), (5, True)])
def test_decode_kernel_matches_emulation_over_many_tiles_per_split(name, n_q, causal, monkeypatch):
    """The shapes above give one tile per split (small B * Hkv, short Nk: up to 264 programs), where
    the running state over tiles (P after each tile's own row max, rescaled into l and acc) is never
    exercised; here the split plan is made to give every KV head one split of all its 11 tiles, then
    splits of 3 tiles (the last one of 2)."""
    fn, opts, _, kernel_bound = OPTIONS[name]
    q, k, v = make_qkv(1, 8, n_q, 64, heads_kv=2, seqlen_k=700, kind="k_bias", seed=23 + n_q)
    for tiles_per_split in (11, 3):
        monkeypatch.setattr(decode, "split_tiles", lambda *args: tiles_per_split)
        k_vs_e, _ = kernel_vs_emulation(fn, *_to(KERNEL_DEVICE, q, k, v), tensor_layout="HND", is_causal=causal,
                                        **opts)
        assert k_vs_e.rel_l1 < kernel_bound, (tiles_per_split, k_vs_e)


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [80, 128])
def test_decode_layouts_dtypes_head_dims(layout, dtype, head_dim):
    q, k, v = make_qkv(1, 4, 2, head_dim, heads_kv=2, seqlen_k=150, kind="outliers", dtype=dtype, layout=layout, seed=3)
    for fn in (sage1.sageattn, sage2.sageattn):
        k_vs_e, e_vs_ref = kernel_vs_emulation(fn, *_to(KERNEL_DEVICE, q, k, v), tensor_layout=layout, is_causal=True)
        assert k_vs_e.rel_l1 < 3e-3 and e_vs_ref.cos_sim > 0.998, (k_vs_e, e_vs_ref)


def test_decode_emulation_is_the_dispatched_algorithm():
    """Nq <= 16 runs common.decode (the prefill path would give other numbers); Nq = 17 does not."""
    q, k, v = make_qkv(1, 4, 16, 64, heads_kv=2, seqlen_k=300, kind="k_bias", seed=5)
    spec = decode.DecodeSpec(127, k_per_token=False, smooth_k=True, smooth_q=False, pv="fp16_acc16")
    tps = decode.split_tiles(2, 1, 300, q.device)
    want, want_lse = decode.decode_emulated(q, k, v, spec, sm_scale=64 ** -0.5, is_causal=False, mask=MaskSpec(),
                                            tiles_per_split=tps)
    out, lse = sage1.sageattn(q, k, v, backend="torch", return_lse=True)
    assert torch.equal(out, want.half()) and torch.equal(lse, want_lse)
    q17 = make_qkv(1, 4, 17, 64, heads_kv=2, seqlen_k=300, seed=5)[0]
    out17 = sage1.sageattn(q17, k, v, backend="torch")
    assert not torch.equal(out17[:, :, :16], out)


def test_decode_key_lengths_and_varlen():
    q, k, v = make_qkv(3, 8, 1, 64, heads_kv=2, seqlen_k=260, kind="k_bias", seed=7)
    keep = torch.ones(3, 1, 1, 260, dtype=torch.bool)
    keep[0, ..., 100:] = False
    keep[2, ..., 1:] = False
    ref = attention_reference(q, k, v, attn_mask=keep)
    for fn in (sage1.sageattn, sage2.sageattn):
        for backend in ("torch", "triton"):
            out = fn(*_to(KERNEL_DEVICE, q, k, v), attn_mask=keep.to(KERNEL_DEVICE), backend=backend).cpu()
            assert accuracy(ref, out).cos_sim > 0.998
    # varlen decode: one query per sequence against 50, 260, 7 keys (bottom-right causal)
    lens = [50, 260, 7]
    ks = torch.cat([k[i, :, :n].transpose(0, 1) for i, n in enumerate(lens)])
    vs = torch.cat([v[i, :, :n].transpose(0, 1) for i, n in enumerate(lens)])
    qs = q[:, :, 0].contiguous()                                           # [3, Hq, D]
    cu_q = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    cu_k = torch.tensor([0, 50, 310, 317], dtype=torch.int32)
    for fn in (sage1.sageattn_varlen, sage2.sageattn_varlen):
        out = fn(*_to(KERNEL_DEVICE, qs, ks, vs, cu_q, cu_k), 1, 260, is_causal=True).cpu()
        for i, n in enumerate(lens):
            r = attention_reference(q[i:i + 1], k[i:i + 1, :, :n], v[i:i + 1, :, :n], is_causal=True)
            assert accuracy(r[0, :, 0], out[i]).cos_sim > 0.998


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("where,causal,value", [("q", False, "nan"), ("k", True, "nan"), ("v", False, "inf"),
                                                ("v", True, "inf"), ("v", False, "nan"), ("v", True, "-inf")])
def test_decode_nonfinite_rows_follow_the_rule(backend, where, causal, value):
    # (a NaN in V once vanished in sage2's FP8 V under the CPU interpreter: found by test_properties)
    q, k, v = make_qkv(1, 4, 4, 64, heads_kv=2, seqlen_k=200, kind="k_bias", seed=11)
    t = {"q": q, "k": k, "v": v}[where]
    t[0, 1, 2 if where == "q" else 198, 5] = float(value)
    from common.masking import NO_MASK

    want = nan_rows(q, k, v, is_causal=causal, mask=NO_MASK)
    assert want.any() and not want.all()
    copies = [x.clone() for x in (q, k, v)]
    for fn in (sage1.sageattn, sage2.sageattn):
        out, lse = fn(*_to(KERNEL_DEVICE, q, k, v), is_causal=causal, return_lse=True, backend=backend)
        out, lse = out.cpu(), lse.cpu()
        assert torch.equal(torch.isnan(out).any(-1), want) and torch.equal(torch.isnan(lse), want)
        assert torch.isfinite(out[~want]).all()
        clean = [torch.nan_to_num(x, nan=0.0, posinf=0.0) for x in (q, k, v)]
        ref = attention_reference(*clean, is_causal=causal)
        assert accuracy(ref[~want], out[~want]).cos_sim > 0.998
    assert all(torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)) for a, b in zip((q, k, v), copies))


@pytest.mark.parametrize("dtype,scale", [(torch.float16, 6e4), (torch.bfloat16, 1e30)])
def test_decode_large_values_stay_finite_and_accurate(dtype, scale):
    q, k, v = make_qkv(1, 4, 1, 64, heads_kv=1, seqlen_k=300, kind="k_bias", dtype=torch.float32, seed=13)
    v = (v / v.abs().amax() * scale).to(dtype)
    q, k = q.to(dtype), k.to(dtype)
    ref = attention_reference(q, k, v)
    for fn, opts in ((sage1.sageattn, {}), (sage1.sageattn, dict(pv_accum="fp32")), (sage2.sageattn, {}),
                     (sage2.sageattn, dict(pv_dtype="fp16"))):
        for backend in ("torch", "triton"):
            out = fn(*_to(KERNEL_DEVICE, q, k, v), backend=backend, **opts).cpu()
            assert torch.isfinite(out).all()
            assert accuracy(ref.double(), out.double()).cos_sim > 0.998


def test_decode_empty_key_sequences_give_zeros():
    q, k, v = make_qkv(2, 4, 1, 64, heads_kv=2, seqlen_k=70, seed=17)
    keep = torch.ones(2, 1, 1, 70, dtype=torch.bool)
    keep[1] = False
    for fn in (sage1.sageattn, sage2.sageattn):
        for backend in ("torch", "triton"):
            out, lse = fn(*_to(KERNEL_DEVICE, q, k, v), attn_mask=keep.to(KERNEL_DEVICE), return_lse=True,
                          backend=backend)
            assert torch.equal(out[1].cpu(), torch.zeros_like(out[1].cpu()))
            assert (lse[1] == float("-inf")).all() and torch.isfinite(lse[0]).all()


def test_options_without_a_decode_form_use_the_prefill_path():
    q, k, v = make_qkv(1, 4, 1, 64, heads_kv=2, seqlen_k=300, kind="k_bias", seed=19)
    ref = attention_reference(q, k, v)
    for fn, opts in ((sage1.sageattn, dict(qk_granularity="per_token")), (sage2.sageattn, dict(smooth_v=True)),
                     (sage2.sageattn, dict(pv_accum="single")), (sage2.sageattn, dict(qk_granularity="per_tensor"))):
        out = fn(q, k, v, backend="torch", **opts)
        assert accuracy(ref, out).cos_sim > 0.99
        # with a right-padding mask they still find key lengths (the decode path does not look for
        # them): padded slots holding garbage, as a stale cache may, count for nothing
        k2, v2 = k.repeat(2, 1, 1, 1), v.repeat(2, 1, 1, 1)
        k2[1, :, 120:], v2[1, :, 120:] = 300.0, 1000.0
        pad = (torch.arange(300)[None, :] < torch.tensor([300, 120])[:, None])[:, None, None, :]
        out = fn(q.repeat(2, 1, 1, 1), k2, v2, attn_mask=pad, backend="torch", **opts)
        assert accuracy(attention_reference(q.repeat(2, 1, 1, 1), k2, v2, attn_mask=pad), out).cos_sim > 0.99


def _masks(batch, heads, n_q, n_k):
    """attn_masks as models pass them: left padding (Hugging Face's default for generation) as a
    boolean [B, 1, 1, Nk] and as its additive form (finfo.min where masked), a static cache's
    unfilled tail besides, and a per-head, per-query float bias with -inf holes."""
    j = torch.arange(n_k)
    first = torch.tensor([0, 37, 150])[:batch]
    end = torch.tensor([n_k, n_k, n_k - 9])[:batch]
    keep = ((j >= first[:, None]) & (j < end[:, None]))[:, None, None, :]
    g = torch.Generator().manual_seed(n_k)
    bias = torch.randn(batch, heads, n_q, n_k, generator=g)
    bias[torch.rand(bias.shape, generator=g) < 0.3] = float("-inf")
    additive = torch.where(keep, 0.0, torch.finfo(torch.float16).min).half()
    return {"left_padding": keep, "left_padding_additive": additive, "per_head_bias": bias}


@pytest.mark.parametrize("name", ["sage1", "sage2_8b", "sage2_4b", "sage2_fp16pv"])
@pytest.mark.parametrize("mask_name", ["left_padding", "left_padding_additive", "per_head_bias"])
@pytest.mark.parametrize("n_q,causal", [(1, False), (4, False), (3, True)])  # (3: a padding row per head)
def test_decode_with_attn_mask(name, mask_name, n_q, causal, monkeypatch):
    """A dense attn_mask runs the decode kernel (read tile by tile through its broadcast strides,
    as the prefill kernels read it; no host sync, so also under CUDA-graph capture), not the prefill
    path: kernel against emulation, emulation against exact attention."""
    import sage1.interface
    import sage2.interface

    fn, opts, cos_bound, kernel_bound = OPTIONS[name]
    q, k, v = make_qkv(3, 8, n_q, 64, heads_kv=2, seqlen_k=333, kind="k_bias", seed=n_q)
    mask = _masks(3, 8, n_q, 333)[mask_name]
    calls = []
    for mod in (sage1.interface, sage2.interface):
        real = mod.decode_attention
        monkeypatch.setattr(mod, "decode_attention", lambda *a, _real=real, **kw: calls.append(1) or _real(*a, **kw))
    out_k, lse_k = fn(*_to(KERNEL_DEVICE, q, k, v), attn_mask=mask.to(KERNEL_DEVICE), is_causal=causal,
                      return_lse=True, backend="triton", **opts)
    out_e, lse_e = fn(q, k, v, attn_mask=mask, is_causal=causal, return_lse=True, backend="torch", **opts)
    assert len(calls) == 2
    assert torch.equal(torch.isfinite(lse_k.cpu()), torch.isfinite(lse_e))
    assert (lse_k.cpu() - lse_e)[torch.isfinite(lse_e)].abs().max() < 1e-3
    assert accuracy(out_e.double(), out_k.cpu()).rel_l1 < kernel_bound
    ref = attention_reference(q, k, v, attn_mask=mask, is_causal=causal)
    kept = torch.isfinite(lse_e)  # (rows whose every key the mask and the diagonal drop give 0)
    assert accuracy(ref[kept], out_e[kept]).cos_sim > cos_bound


def test_decode_attn_mask_rows_and_nonfinite_keys():
    check_attn_mask_rows_and_nonfinite_keys(KERNEL_DEVICE, ("torch", "triton"))


def test_decode_nan_in_an_additive_mask_gives_a_nan_row():
    check_nan_in_an_additive_mask(KERNEL_DEVICE, ("torch", "triton"))


def check_nan_in_an_additive_mask(device, backends, head_dim=64):
    """A NaN in an additive mask makes its row NaN (SDPA's result, the prefill path's), and no other."""
    q, k, v = make_qkv(2, 4, 1, head_dim, heads_kv=2, seqlen_k=150, kind="k_bias", seed=29)
    bias = torch.zeros(2, 4, 1, 150)
    bias[1, 3, 0, 77] = float("nan")
    bias[0, :, :, :10] = float("-inf")
    for fn in (sage1.sageattn, sage2.sageattn):
        for backend in backends:
            out, lse = fn(*_to(device, q, k, v), attn_mask=bias.to(device), return_lse=True, backend=backend)
            out, lse = out.cpu(), lse.cpu()
            assert torch.isnan(lse[1, 3]).all() and torch.isnan(out[1, 3]).all(), backend
            lse[1, 3], out[1, 3] = 0.0, 0.0
            assert torch.isfinite(lse).all() and torch.isfinite(out).all(), backend


def check_attn_mask_rows_and_nonfinite_keys(device, backends, head_dim=64):
    """Under a dense mask: a row that keeps no key gives zeros and an LSE of -inf (the documented
    rule), and a NaN in a key the mask drops reaches no row, one in a kept key only the rows that keep it."""
    q, k, v = make_qkv(2, 4, 2, head_dim, heads_kv=2, seqlen_k=150, kind="k_bias", seed=23)
    keep = torch.rand(2, 4, 2, 150, generator=torch.Generator().manual_seed(1)) < 0.5
    keep[1, 2, 0] = False                    # a row that keeps nothing
    keep[:, :, :, 7] = False                 # key 7: dropped everywhere
    keep[0, 0, 1, 90], keep[0, 1, :, 90] = True, False  # key 90: kept by one row of sequence 0's first KV head only
    k[:, :, 7, 3] = float("nan")
    k[0, 0, 90, 3] = float("nan")
    want = torch.zeros(2, 4, 2, dtype=torch.bool)
    want[0, 0, 1] = True
    for fn in (sage1.sageattn, sage2.sageattn):
        for backend in backends:
            out, lse = fn(*_to(device, q, k, v), attn_mask=keep.to(device), return_lse=True, backend=backend)
            out, lse = out.cpu(), lse.cpu()
            assert torch.equal(torch.isnan(lse), want) and torch.equal(torch.isnan(out).any(-1), want)
            assert torch.equal(out[1, 2, 0], torch.zeros(head_dim, dtype=out.dtype)) and lse[1, 2, 0] == float("-inf")
            clean = torch.nan_to_num(k, nan=0.0)
            ok = ~want & keep.any(-1)
            ref = attention_reference(q, clean, v, attn_mask=keep)
            assert accuracy(ref[ok], out[ok]).cos_sim > 0.998


@pytest.mark.parametrize("head_dim", [8, 16])
@pytest.mark.parametrize("n_q", [1, 40])
def test_small_head_dims_pad_to_an_int8_dot(head_dim, n_q):
    """Head dims <= 16 pad to 32 channels (an INT8 tl.dot needs a reduction of >= 32 on the GPU),
    on both the decode (n_q=1) and the prefill path."""
    q, k, v = make_qkv(1, 4, n_q, head_dim, heads_kv=2, seqlen_k=150, kind="k_bias", seed=head_dim)
    for fn in (sage1.sageattn, sage2.sageattn):
        k_vs_e, e_vs_ref = kernel_vs_emulation(fn, *_to(KERNEL_DEVICE, q, k, v), tensor_layout="HND", is_causal=True)
        assert k_vs_e.rel_l1 < 3e-3 and e_vs_ref.cos_sim > 0.995, (k_vs_e, e_vs_ref)


# Compile the decode kernels for Hopper (sm_90) without a GPU: Triton's front end and ptxas catch
# what the CPU interpreter does not (dot shape limits, layouts, register pressure).
HOPPER_CASES = [  # DP, PV, K_PER_TOKEN, SMOOTH_Q, IS_CAUSAL, HAS_LENS, EVEN_D, QMAX, NQP[, MASK_KIND]
    (32, 0, False, False, False, False, True, 127, 1), (64, 3, True, True, True, True, False, 7, 2),
    (128, 2, True, False, True, True, True, 127, 16), (256, 1, False, False, False, False, True, 127, 1),
    (128, 2, True, False, False, False, True, 127, 1, 1), (128, 0, False, False, True, False, True, 127, 4, 2)]


@pytest.mark.slow
@pytest.mark.parametrize("case", HOPPER_CASES)
def test_decode_kernels_compile_for_hopper(case):
    # in a fresh interpreter: under TRITON_INTERPRET=1 (the CPU tests) kernels are not compilable objects
    import json

    from conftest import compile_for_hopper

    compile_for_hopper(json.dumps(case), timeout=600, fp_fusion=True)
