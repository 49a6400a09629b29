"""attn_mask (SDPA semantics) and variable-length batches for sage1 and sage2: the Triton kernel
(interpreter on CPU) agrees with the emulation, the emulation with exact masked attention; fully
masked rows give 0 and an LSE of -inf; the key-padding fast path and varlen skip padded tiles."""

import pytest
import torch

import sage1
import sage2
from common.inputs import make_qkv
from common.masking import MASK_BIAS, MASK_KEEP, MASK_NONE, prepare_mask
from common.metrics import accuracy
from common.reference import attention_reference
from conftest import KERNEL_DEVICE, gpu, kernel_vs_emulation

DEV = KERNEL_DEVICE  # the GPU when there is one (real kernels), else the CPU (interpreter)

GENERATIONS = {  # module, options, cosine bound vs exact, LSE bound vs exact
    "sage1": (sage1, {}, 0.9995, 0.05),
    "sage2_8b": (sage2, {}, 0.998, 0.05),
    "sage2_4b_smooth_v": (sage2, dict(qk_dtype="int4", smooth_v=True), 0.97, 0.6),  # INT4 scores: LSE off by up to ~0.4
}


def masks(B, H, Nq, Nk, seed=0):
    g = torch.Generator().manual_seed(seed)
    key_pad = torch.ones(B, 1, 1, Nk, dtype=torch.bool)
    key_pad[-1, ..., Nk // 2:] = False                        # right padding: the fast path
    keep = torch.rand(B, 1, Nq, Nk, generator=g) > 0.3
    keep[0, 0, 3, :] = False                                  # a fully masked row
    bias = torch.randn(1, H, Nq, Nk, generator=g) * 2
    bias[0, :, :, :5] = float("-inf")
    band = torch.zeros(Nq, Nk)                                 # 2-D, broadcast over B and H
    band[(torch.arange(Nq)[:, None] - torch.arange(Nk)[None, :]).abs() > 40] = float("-inf")
    return {"key_padding": key_pad, "bool": keep, "additive": bias, "additive_2d": band}


@pytest.mark.parametrize("gen", GENERATIONS)
@pytest.mark.parametrize("mask_name", ["key_padding", "bool", "additive", "additive_2d"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_masked_kernel_matches_emulation_and_exact(gen, mask_name, is_causal):
    mod, opts, bound, lse_bound = GENERATIONS[gen]
    B, Hq, Hkv, Nq, Nk, D = 2, 4, 2, 96, 150, 64
    q, k, v = make_qkv(B, Hq, Nq, D, heads_kv=Hkv, seqlen_k=Nk, kind="k_bias", seed=3, device=DEV)
    m = masks(B, Hq, Nq, Nk)[mask_name].to(DEV)
    copies = [t.clone() for t in (q, k, v, m)]
    ke, ee = kernel_vs_emulation(mod.sageattn, q, k, v, tensor_layout="HND", is_causal=is_causal, attn_mask=m, **opts)
    assert ke.cos_sim > 0.99999 and ke.rel_l1 < 2e-3
    out, lse = mod.sageattn(q, k, v, is_causal=is_causal, attn_mask=m, return_lse=True, backend="torch", **opts)
    ref, ref_lse = attention_reference(q, k, v, is_causal=is_causal, attn_mask=m, return_lse=True)
    assert accuracy(ref, out).cos_sim > bound
    dead = torch.isinf(ref_lse)  # rows that see no key: 0 and -inf, never NaN
    assert torch.isfinite(out).all()
    assert torch.equal(torch.isinf(lse), dead) and (out[dead] == 0).all()
    if mask_name == "bool":
        assert dead[0, :, 3].all()
    fin = ~dead
    assert (lse[fin] - ref_lse[fin].float()).abs().max() < lse_bound
    assert all(torch.equal(a, b) for a, b in zip((q, k, v, m), copies))  # inputs untouched


def test_nhd_layout_with_mask():
    q, k, v = make_qkv(2, 2, 70, 64, kind="k_bias", layout="NHD", seed=1, device=DEV)
    m = masks(2, 2, 70, 70)["bool"].to(DEV)
    ref = attention_reference(q, k, v, tensor_layout="NHD", attn_mask=m)
    for be in ("torch", "triton"):
        assert accuracy(ref, sage1.sageattn(q, k, v, tensor_layout="NHD", attn_mask=m, backend=be)).cos_sim > 0.9995


def test_prepare_mask_forms():
    B, H, Nq, Nk = 2, 3, 8, 10
    pad = torch.ones(B, Nk, dtype=torch.bool)
    pad[1, 6:] = False
    spec = prepare_mask(pad[:, None, None, :], B, H, Nq, Nk, torch.device("cpu"))
    assert spec.kind == MASK_NONE and spec.k_lens.tolist() == [10, 6] and spec.q_lens is None
    for heads, n_q in ((H, 1), (1, Nq)):  # a size-1 dim keeps its stride under expand: found by its size
        spec = prepare_mask(pad[:, None, None, :], B, heads, n_q, Nk, torch.device("cpu"))
        assert spec.kind == MASK_NONE and spec.k_lens.tolist() == [10, 6]
    left = pad.flip(-1)[:, None, None, :]                     # left padding: not a prefix -> tile mask
    assert prepare_mask(left, B, H, Nq, Nk, torch.device("cpu")).kind == MASK_KEEP
    spec = prepare_mask(torch.zeros(Nk), B, H, Nq, Nk, torch.device("cpu"))
    assert spec.kind == MASK_BIAS and spec.tensor.shape == (B, H, Nq, Nk) and spec.tensor.stride()[:3] == (0, 0, 0)


def test_decode_step_with_a_padding_mask_runs_the_decode_kernel(monkeypatch):
    """Nq = 1 with a [B, 1, 1, Nk] right-padding mask (batched generation): the call takes the
    split-KV decode path, which reads the mask (it used to run the prefill kernel with a dense mask),
    with the reference's result."""
    import sage1.interface as s1

    calls = []
    real = s1.decode_attention
    monkeypatch.setattr(s1, "decode_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = make_qkv(2, 4, 1, 64, seqlen_k=150, seed=3)
    pad = (torch.arange(150)[None, :] < torch.tensor([150, 70])[:, None])[:, None, None, :]
    for be in ("torch", "triton"):
        out = sage1.sageattn(*(t.to(KERNEL_DEVICE) for t in (q, k, v)), attn_mask=pad.to(KERNEL_DEVICE), backend=be)
        assert accuracy(attention_reference(q, k, v, attn_mask=pad), out.cpu()).cos_sim > 0.999
    assert calls == [1, 1]


@gpu
@pytest.mark.parametrize("fn", [sage1.sageattn, sage2.sageattn], ids=["sage1", "sage2"])
def test_a_decode_step_with_a_padding_mask_never_waits_for_the_gpu(fn):
    """A decode step reads its padding mask in the kernel: no host sync (torch's sync debug mode
    raises on one), so a generation loop's calls queue ahead of the GPU; left and right padding,
    bool and additive."""
    q, k, v = make_qkv(2, 8, 1, 128, heads_kv=2, seqlen_k=700, device="cuda", seed=8)
    lens = torch.tensor([700, 311], device="cuda")
    right = (torch.arange(700, device="cuda")[None, :] < lens[:, None])[:, None, None, :]
    masks = [right, right.flip(-1), torch.where(right.flip(-1), 0.0, torch.finfo(torch.float16).min).half()]
    for mask in masks:
        fn(q, k, v, attn_mask=mask)  # (first calls build and allocate)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [fn(q, k, v, attn_mask=mask) for mask in masks]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for mask, out in zip(masks, outs):
        assert accuracy(attention_reference(q, k, v, attn_mask=mask), out).cos_sim > 0.998


@pytest.mark.parametrize("bad, match", [
    (torch.ones(2, 3, 8, 10, dtype=torch.int32), "boolean mask"),
    (torch.ones(2, 3, 8, 11, dtype=torch.bool), "does not broadcast"),
    (torch.ones(1, 1, 2, 3, 8, 10, dtype=torch.bool), "at most 4 dims"),
    ("mask", "torch.Tensor"),
])
def test_bad_masks(bad, match):
    q, k, v = make_qkv(2, 3, 8, 64, seqlen_k=10)
    with pytest.raises((ValueError, TypeError), match=match):
        sage1.sageattn(q, k, v, attn_mask=bad, backend="torch")
    with pytest.raises((ValueError, TypeError), match=match):
        sage2.sageattn(q, k, v, attn_mask=bad, backend="torch")


# ---- varlen
def packed(lq, lk, Hq=4, Hkv=2, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lq), Hq, D, generator=g).half()
    k = (torch.randn(sum(lk), Hkv, D, generator=g) + 2 * torch.randn(1, Hkv, D, generator=g)).half()
    v = torch.randn(sum(lk), Hkv, D, generator=g).half()
    cq = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32)
    ck = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32)
    return tuple(t.to(DEV) for t in (q, k, v, cq, ck))


def per_sequence_reference(q, k, v, cq, ck, is_causal):
    outs, lses = [], []
    for i in range(len(cq) - 1):
        qi, ki, vi = (t[c[i]:c[i + 1]].transpose(0, 1)[None] for t, c in ((q, cq), (k, ck), (v, ck)))
        o, lse = attention_reference(qi, ki, vi, is_causal=is_causal, return_lse=True)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


@pytest.mark.parametrize("gen", ["sage1", "sage2_8b"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_varlen_matches_per_sequence_attention(gen, is_causal):
    mod, opts, bound, lse_bound = GENERATIONS[gen]
    lq, lk = [37, 128, 5, 90], [50, 128, 200, 90]               # Nq < Nk, equal, Nq << Nk, equal
    q, k, v, cq, ck = packed(lq, lk)
    ref, ref_lse = per_sequence_reference(q, k, v, cq, ck, is_causal)
    res = {}
    for be in ("torch", "triton"):
        out, lse = mod.sageattn_varlen(q, k, v, cq, ck, max(lq), max(lk), is_causal=is_causal, return_lse=True,
                                       backend=be, **opts)
        assert out.shape == q.shape and lse.shape == (q.shape[1], q.shape[0])
        assert accuracy(ref, out).cos_sim > bound
        assert (lse - ref_lse.float()).abs().max() < lse_bound
        res[be] = out
    assert accuracy(res["torch"].double(), res["triton"]).cos_sim > 0.99999
    assert q.shape[0] == sum(lq)


def test_varlen_equal_lengths_is_the_dense_call():
    B, N, H, D = 3, 64, 2, 64
    q, k, v = make_qkv(B, H, N, D, layout="NHD", seed=5)
    cu = torch.arange(B + 1, dtype=torch.int32) * N
    packed_out = sage2.sageattn_varlen(*(t.reshape(B * N, H, D) for t in (q, k, v)), cu, cu, N, N, is_causal=True,
                                       backend="torch")
    dense = sage2.sageattn(q, k, v, tensor_layout="NHD", is_causal=True, backend="torch")
    assert torch.equal(packed_out.view(B, N, H, D), dense)


@pytest.mark.parametrize("gen", ["sage1", "sage2"])
def test_varlen_sequence_is_smoothed_as_its_dense_call(gen):
    """A short sequence beside a long one, K with a large channel bias (what K smoothing removes):
    each sequence's varlen output is its dense call's (K's mean over its own keys; the padding
    once diluted a short sequence's mean toward 0, rel L1 0.074 against 0.0096 here), and keys
    past a key-padding mask's lengths, whatever their K and V hold, change nothing."""
    mod = sage1 if gen == "sage1" else sage2
    g = torch.Generator().manual_seed(0)
    bias = torch.zeros(64)
    bias[:8] = 40.0
    lens = [256, 24]
    q, k, v = (torch.cat([torch.randn(n, 2, 64, generator=g) + (bias if i == 1 else 0) for n in lens]).half()
               for i in range(3))
    cu = torch.tensor([0, 256, 280], dtype=torch.int32)
    for be in ("torch", "triton"):
        out = mod.sageattn_varlen(*(t.to(KERNEL_DEVICE) for t in (q, k, v, cu, cu)), 256, 256, backend=be).cpu()
        for s, e in ((0, 256), (256, 280)):
            dense = mod.sageattn(*(t[None, s:e].to(KERNEL_DEVICE) for t in (q, k, v)), tensor_layout="NHD",
                                 backend=be)[0].cpu()
            assert accuracy(dense.double(), out[s:e]).rel_l1 < 2e-3, (be, s)
        # the same batch padded (NHD [2, 256, H, D]) with garbage past the second sequence's keys
        kp, vp = (torch.zeros(2, 256, 2, 64, dtype=torch.half) for _ in range(2))
        kp[0], vp[0], kp[1, :24], vp[1, :24] = k[:256], v[:256], k[256:], v[256:]
        qp = torch.stack([q[:256], torch.cat([q[256:], torch.zeros(232, 2, 64, dtype=torch.half)])])
        keep = (torch.arange(256)[None, :] < torch.tensor([256, 24])[:, None])[:, None, None, :]
        clean = mod.sageattn(*(t.to(KERNEL_DEVICE) for t in (qp, kp, vp)), tensor_layout="NHD",
                             attn_mask=keep.to(KERNEL_DEVICE), backend=be)
        opts = dict(smooth_v=True) if gen == "sage2" else {}  # (V's mean too, sage2)
        clean = mod.sageattn(*(t.to(KERNEL_DEVICE) for t in (qp, kp, vp)), tensor_layout="NHD",
                             attn_mask=keep.to(KERNEL_DEVICE), backend=be, **opts)
        kp[1, 24:] = 3e4 * torch.randn(232, 2, 64, generator=g).sign().half()
        vp[1, 24:] = 3e4 * torch.randn(232, 2, 64, generator=g).sign().half()  # (V's scales, mean, fp16 guard)
        dirty = mod.sageattn(*(t.to(KERNEL_DEVICE) for t in (qp, kp, vp)), tensor_layout="NHD",
                             attn_mask=keep.to(KERNEL_DEVICE), backend=be, **opts)
        assert torch.equal(clean, dirty), be


def test_varlen_bad_arguments():
    q, k, v, cq, ck = packed([4, 6], [4, 6])
    with pytest.raises(ValueError, match="total_tokens"):
        sage1.sageattn_varlen(q[None], k, v, cq, ck, 6, 6)
    with pytest.raises(ValueError, match="same number of sequences"):
        sage1.sageattn_varlen(q, k, v, cq, ck[:2], 6, 6)
    with pytest.raises(ValueError, match="int32 or int64"):
        sage1.sageattn_varlen(q, k, v, cq.float(), ck, 6, 6)
    with pytest.raises(ValueError, match="max_seqlen_q must be a non-negative int"):
        sage1.sageattn_varlen(q, k, v, cq, ck, -1, 6)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        sage1.sageattn_varlen(q, k, v, cq, ck, 0, 6)
    with pytest.raises(ValueError, match="no attn_mask"):
        sage1.sageattn_varlen(q, k, v, cq, ck, 6, 6, attn_mask=torch.ones(1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"cu_seqlens_q must rise from 0 to the packed tensor's 10 tokens"):
        sage1.sageattn_varlen(q, k, v, cq + 1, ck, 6, 6)
    with pytest.raises(ValueError, match=r"cu_seqlens_k must rise from 0 to the packed tensor's 10 tokens"):
        sage1.sageattn_varlen(q, k, v, cq, torch.tensor([0, 7, 5], dtype=ck.dtype, device=ck.device), 6, 6)
    with pytest.raises(ValueError, match="cu_seqlens_k holds a sequence of 6 tokens, more than max_seqlen_k=5"):
        sage1.sageattn_varlen(q, k, v, cq, ck, 6, 5)


@pytest.mark.parametrize("gen", ["sage1", "sage2_8b", "sage2_4b_smooth_v"])
@pytest.mark.parametrize("head_dim", [128, 256])
def test_masks_at_large_head_dims(gen, head_dim):
    """The mask tile is pipelined beside K and V: the largest tiles must still fit shared memory."""
    mod, opts, bound, _ = GENERATIONS[gen]
    q, k, v = make_qkv(1, 2, 130, head_dim, seqlen_k=200, kind="k_bias", seed=9, device=DEV)
    bias = torch.randn(1, 2, 130, 200, device=DEV)
    out = mod.sageattn(q, k, v, attn_mask=bias, **opts)
    assert accuracy(attention_reference(q, k, v, attn_mask=bias), out).cos_sim > bound


@pytest.mark.parametrize("gen", [sage1, sage2])
def test_mask_edge_cases_from_review(gen):
    """A float mask that requires grad is refused (its gradient would be cut); a bad mask is refused
    where no kernel runs (an empty batch); a row whose every key carries Hugging Face's finite
    finfo(bf16).min bias attends uniformly, as SDPA does (x log2(e) used to make it -inf: zeros)."""
    q, k, v = make_qkv(1, 2, 4, 32, seqlen_k=6, seed=7)
    bias = torch.zeros(1, 1, 4, 6, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        gen.sageattn(q, k, v, attn_mask=bias, backend="torch")
    with pytest.raises((TypeError, ValueError), match="attn_mask"):
        gen.sageattn(q[:0], k[:0], v[:0], attn_mask="not a mask", backend="torch")
    # a key-padding mask with no queries, or no query heads: empty, as SDPA returns (was an IndexError)
    pad = (torch.arange(6) < 4)[None, None, None, :]
    for qq, kk, vv in ((q[:, :, :0], k, v), (q[:, :0], k, v)):
        for be in ("torch", "triton"):
            out = gen.sageattn(*(t.to(KERNEL_DEVICE) for t in (qq, kk, vv)), attn_mask=pad.to(KERNEL_DEVICE), backend=be)
            assert out.shape == qq.shape, be
    hf = torch.zeros(1, 1, 4, 6, dtype=torch.bfloat16)
    hf[..., 2, :] = torch.finfo(torch.bfloat16).min  # every key of row 2
    hf[..., 3, 1:] = torch.finfo(torch.bfloat16).min  # row 3 sees key 0 only
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=hf.float())
    for be in ("torch", "triton"):
        out = gen.sageattn(*(t.to(KERNEL_DEVICE) for t in (q, k, v)), attn_mask=hf.to(KERNEL_DEVICE), backend=be)
        assert accuracy(want.double(), out.cpu()).rel_l1 < 0.03, be


def test_a_mask_read_past_two_to_the_31_bytes():
    """A bool mask whose rows are 2^24 bytes apart (a strided view): rows 128 on lie past 2^31 bytes
    of its storage; the kernel's mask offsets are 64-bit (32-bit ones read out of bounds)."""
    n_q, n_k, row = 130, 16, 2**24
    storage = torch.zeros(n_q * row, dtype=torch.bool)
    mask = storage.as_strided((1, 1, n_q, n_k), (0, 0, row, 1))
    mask.copy_(torch.rand(1, 1, n_q, n_k, generator=torch.Generator().manual_seed(0)) > 0.3)
    mask[..., 0] = True  # (every row keeps a key)
    q, k, v = make_qkv(1, 2, n_q, 32, seqlen_k=n_k, seed=8)
    want = sage1.sageattn(q, k, v, attn_mask=mask, backend="torch")
    got = sage1.sageattn(*(t.to(KERNEL_DEVICE) for t in (q, k, v)), attn_mask=mask.to(KERNEL_DEVICE)
                         if KERNEL_DEVICE == "cpu" else mask.contiguous().to(KERNEL_DEVICE), backend="triton")
    assert accuracy(want.double(), got.cpu()).rel_l1 < 1e-2


def test_varlen_with_nothing_to_attend_returns_empty_or_zero_outputs():
    """FlashAttention-style empty calls: no sequences (cu_seqlens = [0]), every query sequence empty
    (max_seqlen_q = 0), every key sequence empty (zeros, LSE -inf): no kernel, no error."""
    q, k, v = (torch.randn(n, 2, 32, dtype=torch.float16) for n in (0, 0, 0))
    zero = torch.zeros(1, dtype=torch.int32)
    out, lse = sage2.sageattn_varlen(q, k, v, zero, zero, 0, 0, return_lse=True, backend="torch")
    assert out.shape == (0, 2, 32) and lse.shape == (2, 0)
    kv = torch.randn(5, 2, 32, dtype=torch.float16)
    cu0, cu5 = torch.tensor([0, 0], dtype=torch.int32), torch.tensor([0, 5], dtype=torch.int32)
    assert sage1.sageattn_varlen(q, kv, kv, cu0, cu5, 0, 5, backend="torch").shape == (0, 2, 32)
    q3 = torch.randn(3, 2, 32, dtype=torch.float16)
    out, lse = sage1.sageattn_varlen(q3, q[:0], q[:0], torch.tensor([0, 3], dtype=torch.int32), cu0, 3, 0,
                                     return_lse=True, backend="torch")
    assert torch.equal(out, torch.zeros_like(q3)) and torch.isinf(lse).all()


@gpu
@pytest.mark.parametrize("nq", [1, 40])  # decode and prefill
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("fn", [sage1.sageattn, sage2.sageattn], ids=["sage1", "sage2"])
def test_padding_mask_call_captures_in_a_cuda_graph(nq, side, fn, monkeypatch):
    """Under capture the key-padding detection (one host read) is skipped and the mask runs as a
    dense one (decode steps still in the decode kernel): the captured call replays new values of q
    with the reference's accuracy."""
    import sage1.interface
    import sage2.interface
    from common.timing import graph_replay

    q, k, v = make_qkv(2, 4, nq, 64, seqlen_k=300, device="cuda", seed=5)
    pad = (torch.arange(300, device="cuda")[None, :] < torch.tensor([300, 123], device="cuda")[:, None])[:, None, None, :]
    if side == "left":
        pad = pad.flip(-1)
    calls = []
    for mod in (sage1.interface, sage2.interface):
        real = mod.decode_attention
        monkeypatch.setattr(mod, "decode_attention", lambda *a, _real=real, **kw: calls.append(1) or _real(*a, **kw))
    held = {}
    replay = graph_replay(lambda: held.update(out=fn(q, k, v, attn_mask=pad)))
    assert bool(calls) == (nq == 1)
    q.copy_(make_qkv(2, 4, nq, 64, seqlen_k=300, device="cuda", seed=6)[0])
    replay()
    ref = attention_reference(q, k, v, attn_mask=pad)
    assert accuracy(ref, held["out"]).cos_sim > (0.999 if fn is sage1.sageattn else 0.998)
