"""The quantized KV cache (common.kv_cache, sage2.sageattn_kvcache): K and V quantized once per
64-key tile, decoded by a split-KV kernel that reads the codes.

The cache stores what the decode path computes in registers for each tile, so decoding from it is
the decode path's algorithm: its emulation must equal ``sage2.sageattn(q, k, v)``'s decode emulation
exactly, the Triton kernel (GPU, or the interpreter) must agree with it to fp32 rounding, and both
must stay as close to exact attention as the decode path. Then the cases: appends of any size in any
order, GQA, causal with Nq > 1, both layouts, bf16, E5M2, odd head dims, NaN/Inf (the rows that see
a bad key are NaN, in a quantized tile or in the partial one), an empty cache and bad arguments."""

import pytest
import torch

import sage2
from common.inputs import make_qkv
from common.kv_cache import NO_BAD_KEY, QuantizedKVCache, bytes_per_key
from common.masking import NO_MASK
from common.metrics import accuracy
from common.nonfinite import nan_rows
from common.reference import attention_reference
from conftest import KERNEL_DEVICE, gpu


def _cache_of(k, v, *, chunks=(None,), pv_dtype="fp8_e4m3", layout="HND", max_seqlen=None):
    """A cache holding k and v ([B, Hkv, N, D] HND, or NHD), appended in pieces of the given sizes
    (None: the rest)."""
    n_axis = 2 if layout == "HND" else 1
    B, N = k.shape[0], k.shape[n_axis]
    Hkv, D = (k.shape[1], k.shape[3]) if layout == "HND" else (k.shape[2], k.shape[3])
    cache = QuantizedKVCache(B, Hkv, D, max_seqlen or N + 5, dtype=k.dtype, device=k.device, pv_dtype=pv_dtype)
    at = 0
    for size in chunks:
        size = N - at if size is None else size
        cache.append(k.narrow(n_axis, at, size), v.narrow(n_axis, at, size), tensor_layout=layout)
        at += size
    assert cache.length == N
    return cache


def _plain(q, k, v, pv_dtype="fp8_e4m3", **kw):
    return sage2.sageattn(q, k, v, backend="torch", pv_dtype=pv_dtype, return_lse=True, **kw)


@pytest.mark.parametrize("n_q,heads,heads_kv,n_k,causal,d", [
    (1, 8, 2, 333, False, 64), (1, 8, 2, 333, True, 128), (4, 4, 4, 200, True, 64), (16, 8, 1, 130, False, 64),
    (3, 32, 1, 97, True, 80), (1, 2, 2, 64, False, 40), (2, 4, 2, 63, True, 64)])
def test_cache_emulation_is_the_decode_paths_emulation(n_q, heads, heads_kv, n_k, causal, d):
    # (bit for bit where both split plans give one tile per split, as at these sizes: the cache plans
    # three programs per SM, the dense path two, and the merge order is fp32 rounding)
    q, k, v = make_qkv(2, heads, n_q, d, heads_kv=heads_kv, seqlen_k=n_k, kind="k_bias", seed=n_q + n_k)
    cache = _cache_of(k, v, chunks=(n_k // 3, 1, None))
    out_c, lse_c = sage2.sageattn_kvcache(q, cache, is_causal=causal, return_lse=True, backend="torch")
    out_p, lse_p = _plain(q, k, v, is_causal=causal)
    assert torch.equal(out_c, out_p)
    assert torch.equal(lse_c, lse_p)
    e = accuracy(attention_reference(q, k, v, is_causal=causal), out_c)
    assert e.cos_sim > 0.998, e


@pytest.mark.parametrize("pv_dtype", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("n_q,heads,heads_kv,n_k,causal,d,layout", [
    (1, 8, 2, 333, False, 64, "HND"), (1, 8, 2, 333, True, 128, "NHD"), (5, 4, 4, 200, True, 64, "HND"),
    (16, 8, 1, 130, False, 64, "NHD"), (3, 32, 1, 97, True, 80, "HND"), (1, 4, 4, 64 * 5, False, 64, "HND")])
def test_kernel_matches_emulation(pv_dtype, n_q, heads, heads_kv, n_k, causal, d, layout):
    q, k, v = make_qkv(2, heads, n_q, d, heads_kv=heads_kv, seqlen_k=n_k, kind="k_bias", seed=n_k, layout=layout)
    q, k, v = (t.to(KERNEL_DEVICE) for t in (q, k, v))
    cache = _cache_of(k, v, chunks=(70, None), pv_dtype=pv_dtype, layout=layout)
    kw = dict(tensor_layout=layout, is_causal=causal, return_lse=True)
    out_k, lse_k = sage2.sageattn_kvcache(q, cache, backend="triton", **kw)
    out_e, lse_e = sage2.sageattn_kvcache(q, cache, backend="torch", **kw)
    assert out_k.shape == q.shape and out_k.dtype == q.dtype
    # the merge counters are back at zero: the same call again merges again
    assert torch.equal(sage2.sageattn_kvcache(q, cache, backend="triton", **kw)[0], out_k)
    assert torch.isfinite(lse_e).all() and (lse_k - lse_e).abs().max() < 1e-3
    assert accuracy(out_e.double(), out_k).rel_l1 < 2e-3
    ref = attention_reference(q, k, v, tensor_layout=layout, is_causal=causal)
    assert accuracy(ref, out_k).cos_sim > (0.998 if pv_dtype == "fp8_e4m3" else 0.99)


@pytest.mark.parametrize("tiles_per_split", [2, 3])
@pytest.mark.parametrize("n_q,n_k,causal", [(1, 333, False), (4, 333, True), (5, 200, True), (16, 320, False)])
def test_kernel_matches_emulation_over_many_tiles_per_split(tiles_per_split, n_q, n_k, causal, monkeypatch):
    """Small shapes give one tile per split (the GPU's worth of programs): here splits of 2 and 3
    tiles, so that one program runs unmasked tiles, masked ones and the partial tile in turn."""
    from common import kv_cache

    monkeypatch.setattr(kv_cache, "split_tiles", lambda *a, **kw: tiles_per_split)
    q, k, v = make_qkv(2, 4, n_q, 64, heads_kv=2, seqlen_k=n_k, kind="k_bias", seed=n_k + n_q)
    q, k, v = (t.to(KERNEL_DEVICE) for t in (q, k, v))
    k[1, 0, 70, 3] = float("nan")
    cache = _cache_of(k, v)
    out_k, lse_k = sage2.sageattn_kvcache(q, cache, backend="triton", is_causal=causal, return_lse=True)
    out_e, lse_e = sage2.sageattn_kvcache(q, cache, backend="torch", is_causal=causal, return_lse=True)
    assert torch.equal(lse_k.isnan(), lse_e.isnan()) and lse_e.isnan().any()
    fin = ~lse_e.isnan()
    assert (lse_k - lse_e)[fin].abs().max() < 1e-3
    assert accuracy(out_e[fin].double(), out_k[fin]).rel_l1 < 2e-3


def test_appends_of_any_size_give_the_same_cache(monkeypatch):
    """One append, one key at a time, and uneven pieces, and a long append quantized a chunk of
    tiles at a time: the same codes, scales and tail."""
    from common import kv_cache

    _, k, v = make_qkv(2, 4, 1, 64, heads_kv=2, seqlen_k=200, seed=3)
    whole = _cache_of(k, v)
    monkeypatch.setattr(kv_cache, "QUANTIZE_CHUNK", 64)
    for chunks in ([1] * 200, [63, 1, 64, 7, 65], [10, 0, 150, 40], [None]):  # (150 from mid-tile: two boundaries)
        other = _cache_of(k, v, chunks=chunks)
        for name in ("k_codes", "k_scale", "k_mean", "v_codes", "v_scale", "tail_k", "tail_v", "first_bad"):
            a, b = getattr(whole, name), getattr(other, name)
            if name.startswith("tail"):  # past the tile being filled: whatever an earlier tile left
                a, b = a[:, :, :8], b[:, :, :8]
            assert torch.equal(a.view(torch.uint8) if a.element_size() == 1 else a,
                               b.view(torch.uint8) if b.element_size() == 1 else b), name
    assert whole.quantized_keys == 192 and whole.length == 200


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_cache_does_not_modify_its_inputs_and_is_smaller(layout, backend):
    q, k, v = make_qkv(1, 4, 1, 128, heads_kv=2, seqlen_k=256 + 9, seed=4, layout=layout)
    q, k, v = (t.to(KERNEL_DEVICE) for t in (q, k, v))
    (k[0, 0, 5, 3] if layout == "HND" else k[0, 5, 0, 3]).fill_(float("nan"))  # (codes: zeroed)
    (v[0, 1, 260, 3] if layout == "HND" else v[0, 260, 1, 3]).fill_(float("inf"))  # (the partial tile)
    before = [t.clone() for t in (q, k, v)]
    cache = _cache_of(k, v, chunks=(100, None), layout=layout)
    sage2.sageattn_kvcache(q, cache, backend=backend, tensor_layout=layout)
    for a, b in zip(before, (q, k, v)):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))
    assert bytes_per_key(128) == 276.0  # against 512 in fp16
    with pytest.raises(ValueError, match="32-bit offsets"):
        QuantizedKVCache(64, 8, 128, 65536, device="meta")


@pytest.mark.parametrize("where", ["quantized", "tail"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nonfinite_keys_make_exactly_the_rows_that_see_them_nan(where, causal, backend):
    q, k, v = make_qkv(2, 4, 4, 64, heads_kv=2, seqlen_k=150, seed=5)
    q, k, v = (t.to(KERNEL_DEVICE) for t in (q, k, v))
    bad_key = 20 if where == "quantized" else 148  # (keys 128-149 are the partial tile)
    k[0, 1, bad_key, 7] = float("inf")
    v[1, 0, bad_key - 1, 2] = float("nan")
    q[1, 3, 0, 0] = float("nan")
    cache = _cache_of(k, v, chunks=(100, None))
    if where == "quantized":
        assert cache.first_bad[0, 1] == bad_key and cache.first_bad[1, 0] == bad_key - 1
        assert cache.first_bad[0, 0] == NO_BAD_KEY
    out, lse = sage2.sageattn_kvcache(q, cache, is_causal=causal, return_lse=True, backend=backend)
    # the other rows: as accurate as on the inputs with the bad values zeroed (SDPA's math backend
    # would spread V's NaN through masked keys as 0 * NaN; common.nonfinite)
    ref = attention_reference(*(torch.nan_to_num(t.cpu(), nan=0.0, posinf=0.0, neginf=0.0) for t in (q, k, v)),
                              is_causal=causal)
    want = nan_rows(q.cpu(), k.cpu(), v.cpu(), is_causal=causal, mask=NO_MASK)  # the rule (Inf as NaN)
    assert want.any() and not want.all()
    assert torch.equal(out.float().cpu().isnan().any(-1), want)
    assert torch.equal(lse.cpu().isnan(), want)
    fin = ~want
    assert accuracy(ref[fin], out.float().cpu()[fin]).cos_sim > 0.998


def test_empty_cache_and_zero_queries():
    cache = QuantizedKVCache(2, 2, 64, 100, device="cpu")
    q = torch.randn(2, 4, 1, 64, dtype=torch.float16)
    out, lse = sage2.sageattn_kvcache(q, cache, return_lse=True)
    assert torch.equal(out, torch.zeros_like(q)) and torch.equal(lse, torch.full((2, 4, 1), float("-inf")))
    q_nan = q.clone()
    q_nan[1, 2, 0, 5] = float("nan")  # a non-finite query row is NaN, keys or not (as beside longer sequences)
    out, lse = sage2.sageattn_kvcache(q_nan, cache, return_lse=True)
    assert out[1, 2].isnan().all() and lse[1, 2].isnan().all() and (out[0] == 0).all() and (lse[0] == float("-inf")).all()
    cache.append(*make_qkv(2, 2, 1, 64, seqlen_k=10)[1:])
    assert sage2.sageattn_kvcache(q[:, :, :0], cache).shape == (2, 4, 0, 64)
    cache.reset()
    assert cache.length == 0 and sage2.sageattn_kvcache(q, cache).abs().max() == 0


def test_bad_arguments_name_the_argument():
    cache = QuantizedKVCache(2, 2, 64, 100, device="cpu")
    k = torch.randn(2, 2, 10, 64, dtype=torch.float16)
    q = torch.randn(2, 4, 1, 64, dtype=torch.float16)
    cases = [
        (lambda: QuantizedKVCache(0, 2, 64, 100, device="cpu"), "batch must be a positive int"),
        (lambda: QuantizedKVCache(2, 2, 64, 100, device="cpu", dtype=torch.float32), "dtype must be"),
        (lambda: QuantizedKVCache(2, 2, 64, 100, device="cpu", pv_dtype="fp16"), "pv_dtype must be one of"),
        (lambda: QuantizedKVCache(2, 2, 512, 100, device="cpu"), "head_dim must be at most 256"),
        (lambda: cache.append(k.float(), k.float()), r"k.dtype must be the cache's dtype"),
        (lambda: cache.append(k[:1], k[:1]), "must have batch 2, 2 KV heads and head_dim 64"),
        (lambda: cache.append(k, k[:, :, :5]), "k and v must have the same shape"),
        (lambda: cache.append(k[0], k[0]), "k must have rank 4"),
        (lambda: cache.append(k, k, tensor_layout="BHSD"), "tensor_layout"),
        (lambda: cache.append(torch.randn(2, 2, 101, 64, dtype=torch.float16),
                              torch.randn(2, 2, 101, 64, dtype=torch.float16)), "at most max_seqlen=100"),
        (lambda: sage2.sageattn_kvcache(q.float(), cache), "q.dtype must be the cache's dtype"),
        (lambda: sage2.sageattn_kvcache(q[:1], cache), "batch size 2"),
        (lambda: sage2.sageattn_kvcache(q[:, :3], cache), "positive multiple of the cache's 2 KV heads"),
        (lambda: sage2.sageattn_kvcache(q[..., :32], cache), "head_dim 64"),
        (lambda: sage2.sageattn_kvcache(torch.randn(2, 4, 17, 64, dtype=torch.float16), cache), "at most 16 queries"),
        (lambda: sage2.sageattn_kvcache(q, cache, backend="cuda"), "backend must be one of"),
        (lambda: sage2.sageattn_kvcache(q, cache, sm_scale=-1.0), "sm_scale must be a finite positive number"),
        (lambda: sage2.sageattn_kvcache(q, cache, is_causal=1), "is_causal must be a bool"),
        (lambda: sage2.sageattn_kvcache(q, k), "cache must be a QuantizedKVCache"),
    ]
    for fn, msg in cases:
        with pytest.raises((ValueError, TypeError), match=msg):
            fn()
    assert cache.length == 0  # a refused append changes nothing


@gpu
@pytest.mark.parametrize("n_k,heads_kv,n_q,causal", [(16384, 8, 1, False), (4097, 32, 1, False), (8191, 8, 4, True)])
def test_gpu_cache_agrees_with_the_dense_decode_call(n_k, heads_kv, n_q, causal):
    """At serving sizes on the GPU: the cache's kernel against sage2.sageattn on the same keys (the
    CUDA or Triton decode sweep, same per-tile codes up to rounding) and against exact attention."""
    q, k, v = make_qkv(4, 32, n_q, 128, heads_kv=heads_kv, seqlen_k=n_k, kind="k_bias", device="cuda", seed=n_k)
    cache = _cache_of(k, v, chunks=(n_k - 3, 1, None))
    out = sage2.sageattn_kvcache(q, cache, is_causal=causal)
    dense = sage2.sageattn(q, k, v, is_causal=causal)
    ref = attention_reference(q, k, v, is_causal=causal)
    a_dense, a_cache = accuracy(ref, dense), accuracy(ref, out)
    assert accuracy(dense.double(), out).rel_l1 < 5e-3
    assert a_cache.cos_sim > 0.9985 and a_cache.rel_l1 < a_dense.rel_l1 * 1.05 + 1e-4, (a_cache, a_dense)


@pytest.mark.slow
def test_cache_kernel_compiles_for_hopper():
    """Triton's front end and ptxas for sm_90 (no GPU needed), the device append included."""
    from conftest import compile_for_hopper

    compile_for_hopper("kvcache", timeout=600)


def test_launch_residency_takes_the_fuller_last_wave():
    from common.kv_cache import CACHE_PROGRAMS_PER_SM, launch_residency

    cpu = torch.device("cpu")  # (132 SMs assumed)
    assert launch_residency(32, 16357, cpu) == (CACHE_PROGRAMS_PER_SM, True)   # 12 splits per KV head
    assert launch_residency(512, 4069, cpu) == (2, False)    # one each: 1.94 waves at 2 per SM, 1.3 at 3
    assert launch_residency(288, 4000, cpu) == (CACHE_PROGRAMS_PER_SM, True)  # one wave at 3 per SM


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_compiled_decode_step_has_no_graph_break_and_no_recompile_per_token(backend):
    """torch.compile(fullgraph=True) over a decode step (append one key, attend): the append and the
    call are opaque custom ops that take the cache's tensors, so the cache's length is no guard; the
    steps cross a tile boundary (a tile quantized inside the compiled step) and give the eager
    cache's outputs."""
    torch._dynamo.reset()
    q, k, v = make_qkv(2, 4, 1, 64, heads_kv=2, seqlen_k=140, kind="k_bias", seed=8)
    q, k, v = (t.to(KERNEL_DEVICE) for t in (q, k, v))
    compiled_cache, eager_cache = (_cache_of(k[:, :, :120], v[:, :, :120], max_seqlen=200) for _ in range(2))

    def step(cache, q, k1, v1):
        cache.append(k1, v1)
        return sage2.sageattn_kvcache(q, cache, backend=backend) * 2

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    from torch._dynamo.utils import counters

    counters.clear()
    for i in range(120, 140):  # (the step of i = 127 fills tile 64-127: quantized inside the compiled step)
        out = compiled(compiled_cache, q, k[:, :, i:i + 1], v[:, :, i:i + 1])
        assert torch.equal(out, step(eager_cache, q, k[:, :, i:i + 1], v[:, :, i:i + 1]))
    assert compiled_cache.length == 140 and counters["stats"]["unique_graphs"] <= 2


@pytest.mark.parametrize("causal,n_q", [(False, 1), (True, 1), (True, 4)])
def test_sequences_of_different_lengths(causal, n_q):
    """A right-padded prefill (``lengths``), then decode steps of one key per sequence: steps that
    fill no tile (one indexed copy for the batch) and steps that fill one in some sequences. Each
    sequence's rows equal those of a cache holding that sequence alone (same codes; the split plans
    differ, so to fp32 rounding), in the emulation and in the kernel; a sequence with no keys gives
    zeros and an LSE of -inf; a NaN in one sequence reaches only its rows."""
    lens = [200, 61, 0]
    q, k, v = make_qkv(3, 4, n_q, 64, heads_kv=2, seqlen_k=210, kind="k_bias", seed=11)
    q, k, v = (t.to(KERNEL_DEVICE) for t in (q, k, v))
    k[1, 0, 30, 5] = float("nan")
    cache = QuantizedKVCache(3, 2, 64, 300, device=KERNEL_DEVICE)
    cache.append(k[:, :, :200], v[:, :, :200], lengths=torch.tensor(lens))
    for step in range(3):  # sequence 1 fills its tile 0-63 at the third step (61 + 3 = 64)
        cache.append(k[:, :, 200 + step:201 + step], v[:, :, 200 + step:201 + step])
    assert cache.lengths == (203, 64, 3) and cache.seqlens.tolist() == [203, 64, 3] and cache.quantized == [192, 64, 0]
    outs = {be: sage2.sageattn_kvcache(q, cache, is_causal=causal, return_lse=True, backend=be)
            for be in ("torch", "triton")}
    for b, n in enumerate(cache.lengths):
        alone = QuantizedKVCache(1, 2, 64, 300, device=KERNEL_DEVICE)
        idx = list(range(lens[b])) + list(range(200, 203))
        alone.append(k[b:b + 1, :, idx], v[b:b + 1, :, idx])
        want, want_lse = sage2.sageattn_kvcache(q[b:b + 1], alone, is_causal=causal, return_lse=True, backend="torch")
        for be, (out, lse) in outs.items():
            assert torch.equal(lse[b:b + 1].isnan(), want_lse.isnan()), (be, b)
            assert torch.equal(lse[b:b + 1].isinf(), want_lse.isinf()), (be, b)  # (rows that see no key)
            fin = torch.isfinite(want_lse)
            assert (lse[b:b + 1] - want_lse)[fin].abs().max() < 1e-3, (be, b)
            assert accuracy(want[fin].double(), out[b:b + 1][fin]).rel_l1 < (1e-5 if be == "torch" else 2e-3), (be, b)
    assert outs["torch"][1][1].isnan().any() and not outs["torch"][1][0].isnan().any()
    with pytest.raises(ValueError, match=r"lengths must hold 3 ints in \[0, 1\]"):
        cache.append(k[:, :, :1], v[:, :, :1], lengths=[1, 2, 0])
    with pytest.raises(ValueError, match="length can be set to 0, or back to"):
        cache.length = 3  # (sequences of several lengths: no common point to roll back to)
    assert cache.lengths == (203, 64, 3)


def test_an_empty_sequence_beside_others_gives_zeros():
    q, k, v = make_qkv(2, 2, 1, 64, seqlen_k=100, seed=12)
    q, k, v = (t.to(KERNEL_DEVICE) for t in (q, k, v))
    cache = QuantizedKVCache(2, 2, 64, 200, device=KERNEL_DEVICE)
    cache.append(k, v, lengths=[100, 0])
    for be in ("torch", "triton"):
        out, lse = sage2.sageattn_kvcache(q, cache, return_lse=True, backend=be)
        assert out[1].abs().max() == 0 and torch.isinf(lse[1]).all() and torch.isfinite(lse[0]).all()


def test_a_compiled_step_over_sequences_of_several_lengths_takes_lengths_as_a_tensor():
    """Under torch.compile, per-sequence counts as a tensor (read when the op runs): idle sequences
    (count 0) in any pattern, no recompile; a list is refused there (its values would be guards)."""
    torch._dynamo.reset()
    q, k, v = make_qkv(4, 4, 1, 64, heads_kv=2, seqlen_k=100, kind="k_bias", seed=13)
    q, k, v = (t.to(KERNEL_DEVICE) for t in (q, k, v))
    caches = [QuantizedKVCache(4, 2, 64, 200, device=KERNEL_DEVICE) for _ in range(2)]
    for c in caches:
        c.append(k[:, :, :60], v[:, :, :60], lengths=torch.tensor([60, 10, 0, 59]))

    def step(cache, q, k1, v1, counts):
        cache.append(k1, v1, lengths=counts)
        return sage2.sageattn_kvcache(q, cache, backend="torch")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    from torch._dynamo.utils import counters

    counters.clear()
    g = torch.Generator().manual_seed(0)
    for i in range(60, 72):
        counts = torch.randint(0, 2, (4,), generator=g)
        out = compiled(caches[0], q, k[:, :, i:i + 1], v[:, :, i:i + 1], counts)
        assert torch.equal(out, step(caches[1], q, k[:, :, i:i + 1], v[:, :, i:i + 1], counts))
    assert caches[0].lengths == caches[1].lengths and counters["stats"]["unique_graphs"] <= 2
    with pytest.raises(Exception, match="lengths must be a tensor"):
        torch.compile(step, fullgraph=True, backend="aot_eager")(caches[0], q, k[:, :, :1], v[:, :, :1], [1, 1, 1, 1])


def test_one_key_steps_take_the_short_path_and_give_the_same_cache():
    """The decode step's short append (one key per sequence, no tile fills): the same state as the
    general path, in both layouts; what it does not cover (a key that requires grad, a wrong shape,
    a tile that fills, a bad layout) takes the general path, with its checks."""
    from common import kv_cache

    _, k, v = make_qkv(2, 4, 1, 64, heads_kv=2, seqlen_k=70, seed=5)
    whole = _cache_of(k, v)
    calls = []
    general = kv_cache.QuantizedKVCache._append
    for layout in ("HND", "NHD"):
        kl, vl = (k, v) if layout == "HND" else (k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous())
        cache = QuantizedKVCache(2, 2, 64, 80, dtype=k.dtype, device=k.device)
        cache._append = lambda *a, cache=cache: calls.append(a[-1]) or general(cache, *a)  # (counts the general path)
        calls.clear()
        for i in range(70):
            cache.append(kl.narrow(2 if layout == "HND" else 1, i, 1), vl.narrow(2 if layout == "HND" else 1, i, 1),
                         tensor_layout=layout)
        assert len(calls) == 1  # key 63, which fills tile 0
        for name in ("k_codes", "k_scale", "k_mean", "v_codes", "v_scale", "first_bad", "seqlens"):
            assert torch.equal(getattr(whole, name).view(torch.uint8) if name.endswith("codes") else getattr(whole, name),
                               getattr(cache, name).view(torch.uint8) if name.endswith("codes") else getattr(cache, name)), name
        assert torch.equal(whole.tail_k[:, :, :6], cache.tail_k[:, :, :6]) and cache.lengths == (70, 70)
    cache = _cache_of(k[:, :, :5], v[:, :, :5], max_seqlen=10)
    with torch.enable_grad():
        kg = k[:, :, 5:6].clone().requires_grad_()
        cache.append(kg, v[:, :, 5:6])
    assert not cache.tail_k.requires_grad and torch.equal(cache.tail_k[:, :, 5], k[:, :, 5]) and cache.length == 6
    with pytest.raises(ValueError, match="must have batch 2, 2 KV heads and head_dim 64"):
        cache.append(k[:, :1, 6:7], v[:, :1, 6:7])
    with pytest.raises(ValueError, match="tensor_layout"):
        cache.append(k[:, :, 6:7], v[:, :, 6:7], tensor_layout="BHND")
    assert cache.length == 6 and cache.seqlens.tolist() == [6, 6]


def test_fast_launcher_keys_on_what_triton_specializes(monkeypatch):
    """common.triton_launch.FastLauncher with a stand-in for a JIT function: the first launch of a
    specialization goes through the JIT, the next ones through the compiled kernel's launcher with
    every parameter in order (keywords and defaults included); another int value, dtype, tensor
    alignment, constexpr (a float one by value), launch option or device is another
    specialization; a runtime argument by keyword or of a type without a rule goes through the JIT
    every time; a launcher that fails sends every later launch through the JIT, with one warning."""
    from types import SimpleNamespace

    from common import triton_launch

    log = []
    device = [0]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: device[0])

    def kernel_fn(X, n, scale, BLOCK: int, C: float, FLAG: bool = True):
        pass

    class Compiled:
        def __getitem__(self, grid):
            return lambda *args: log.append(("fast", grid, args))

    class Jit:
        fn = staticmethod(kernel_fn)  # (an attribute of the JIT function, not a method)
        params = [SimpleNamespace(name=n_, is_constexpr=c) for n_, c in
                  (("X", False), ("n", False), ("scale", False), ("BLOCK", True), ("C", True), ("FLAG", True))]

        def __getitem__(self, grid):
            return lambda *args, **kw: log.append(("jit", grid, args, tuple(sorted(kw)))) or Compiled()

    monkeypatch.setattr(triton_launch, "interpreter_enabled", lambda: False)  # (CPU tests run under it)
    launcher = triton_launch.FastLauncher(Jit())
    x = torch.zeros(64)
    kw = {"BLOCK": 32, "C": 0.5, "num_warps": 4}
    launcher((1,), x, 16, 0.5, **kw)
    launcher((2, 3), x, 16, 0.25, **kw)
    assert [e[0] for e in log] == ["jit", "fast"] and log[1] == ("fast", (2, 3, 1), (x, 16, 0.25, 32, 0.5, True))
    for args, kw_ in (((x, 17, 0.5), kw), ((x[1:], 16, 0.5), kw), ((x.double(), 16, 0.5), kw),
                      ((x, 16, 0.5), {**kw, "BLOCK": 64}), ((x, 16, 0.5), {**kw, "C": 0.75}),
                      ((x, 16, 0.5), {**kw, "num_warps": 8}), ((x, 16, 0.5), {**kw, "FLAG": False})):
        log.clear()
        launcher((1,), *args, **kw_)
        launcher((1,), *args, **kw_)
        assert [e[0] for e in log] == ["jit", "fast"], (args, kw_)
    log.clear()
    device[0] = 1
    launcher((1,), x, 16, 0.5, **kw)
    launcher((1,), x, 16, 0.5, **kw)
    device[0] = 0
    launcher((1,), x, 16, BLOCK=32, C=0.5, num_warps=4, scale=0.5)  # (a runtime argument by keyword)
    launcher((1,), x, 16, BLOCK=32, C=0.5, num_warps=4, scale=0.25)
    launcher((1,), x, 16.0, 0.5, **kw)  # (a float where an int was: no rule here, Triton's dispatch)
    assert [e[0] for e in log] == ["jit", "fast", "jit", "jit", "jit"]

    class BadCompiled:
        def __getitem__(self, grid):
            raise AttributeError("moved")

    launcher.compiled = {k_: BadCompiled() for k_ in launcher.compiled}
    log.clear()
    with pytest.warns(RuntimeWarning, match="launching through the JIT from now on"):
        launcher((1,), x, 16, 0.5, **kw)
    launcher((1,), x, 16, 0.5, **kw)
    assert [e[0] for e in log] == ["jit", "jit"] and launcher.broken


@gpu
def test_gpu_fast_launches_give_the_jit_launch_outputs():
    """On the GPU the cache's kernel is launched through the compiled kernel's launcher after its
    first launch: outputs bit-identical to a fresh launch through the JIT, across a new tile plan
    and a query that is a strided view."""
    from common import kv_cache

    q, k, v = make_qkv(4, 32, 1, 128, heads_kv=8, seqlen_k=4100, kind="k_bias", device="cuda", seed=6)
    cache = _cache_of(k[:, :, :4000], v[:, :, :4000], max_seqlen=4200)
    outs = [sage2.sageattn_kvcache(q, cache) for _ in range(3)]
    qs = torch.cat([q, q], dim=-1)[..., ::2]  # (a strided view: other strides, another specialization)
    outs.append(sage2.sageattn_kvcache(qs, cache))
    cache.append(k[:, :, 4000:4100], v[:, :, 4000:4100])
    outs.append(sage2.sageattn_kvcache(q, cache))
    assert kv_cache._launcher is not None and not kv_cache._launcher.broken and kv_cache._launcher.compiled
    jit = kv_cache._launcher
    kv_cache._launcher = type(jit)(jit.kernel)
    kv_cache._launcher.broken = True  # every launch through the JIT
    try:
        fresh = _cache_of(k[:, :, :4000], v[:, :, :4000], max_seqlen=4200)
        ref = [sage2.sageattn_kvcache(q, fresh), sage2.sageattn_kvcache(qs, fresh)]
        fresh.append(k[:, :, 4000:4100], v[:, :, 4000:4100])
        ref.append(sage2.sageattn_kvcache(q, fresh))
    finally:
        kv_cache._launcher = jit
    for a, b in zip([outs[0], outs[3], outs[4]], ref):
        assert torch.equal(a, b)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_rollback_drops_keys_exactly(backend):
    """length = n (speculative decoding's rejected drafts): within the tile being filled, to a tile
    boundary, and back into the last tile quantized (its keys as given come back into the tail) the
    cache equals one that never held the dropped keys, then and after more appends; a NaN key that
    is dropped no longer makes rows NaN; further back than the last tile quantized is refused."""
    q, k, v = make_qkv(2, 4, 1, 64, heads_kv=2, seqlen_k=200, kind="k_bias", seed=9)
    q, k, v = (t.to(KERNEL_DEVICE) for t in (q, k, v))
    k[1, 0, 110, 5] = float("nan")  # (in tile 1: quantized by the appends below, dropped by the rollbacks)

    def same(a, b):
        n = a.length
        assert a.lengths == b.lengths and torch.equal(a.seqlens, b.seqlens) and torch.equal(a.first_bad, b.first_bad)
        for name in ("k_codes", "v_codes", "k_scale"):
            x, y = getattr(a, name)[:, :, :n // 64 * 64], getattr(b, name)[:, :, :n // 64 * 64]
            assert torch.equal(x.view(torch.uint8) if x.element_size() == 1 else x,
                               y.view(torch.uint8) if y.element_size() == 1 else y), name
        assert torch.equal(a.tail_k[:, :, :n % 64], b.tail_k[:, :, :n % 64])
        assert torch.equal(a.tail_v[:, :, :n % 64], b.tail_v[:, :, :n % 64])
        for name in ("k_mean", "v_scale"):
            assert torch.equal(getattr(a, name)[:, :, :n // 64], getattr(b, name)[:, :, :n // 64]), name
        out_a, out_b = (sage2.sageattn_kvcache(q, c, backend=backend) for c in (a, b))
        assert torch.equal(out_a.nan_to_num(), out_b.nan_to_num()) and torch.equal(out_a.isnan(), out_b.isnan())
        # (query heads 0 and 1 of sequence 1 see KV head 0, which holds the NaN key 110 or not)
        assert out_a[1, :2].isnan().all() == (n > 110) and out_a.isnan().sum() == out_a[1, :2].isnan().sum()

    for held, n in ((130, 129), (130, 128), (130, 100), (140, 70), (127, 64), (68, 5)):
        cache = _cache_of(k[:, :, :held], v[:, :, :held], chunks=[60, 1, 2, None], max_seqlen=200)
        cache.length = n
        same(cache, _cache_of(k[:, :, :n], v[:, :, :n], max_seqlen=200))
        cache.append(k[:, :, n:n + 70], v[:, :, n:n + 70])  # (past the next tile boundary)
        same(cache, _cache_of(k[:, :, :n + 70], v[:, :, :n + 70], max_seqlen=200))
    cache = _cache_of(k[:, :, :150], v[:, :, :150], max_seqlen=200)
    with pytest.raises(ValueError, match=r"cannot roll back from 150 to 60 keys: the keys of tile 0 .* only as codes"):
        cache.length = 60
    cache.length = 100  # (tile 1 back in the tail: tile 0's keys are held as codes only)
    cache.length = 90
    with pytest.raises(ValueError, match="cannot roll back from 90 to 30 keys"):
        cache.length = 30
    cache.length = 64
    assert cache.length == 64 and cache.quantized_keys == 64
    ragged = QuantizedKVCache(2, 2, 64, 200, device=KERNEL_DEVICE)  # (emptied with a NaN key in the longer one)
    kr = k[:, :, :100].clone()
    kr[1, 0, 10, 3] = float("nan")
    ragged.append(kr, v[:, :, :100], lengths=[0, 100])
    assert ragged.first_bad[1, 0] == 10
    ragged.length = 0
    ragged.append(k[:, :, :70].nan_to_num(), v[:, :, :70])
    assert (ragged.first_bad == NO_BAD_KEY).all() and not sage2.sageattn_kvcache(q, ragged, backend=backend).isnan().any()


def test_short_contexts_take_few_splits_per_kv_head():
    """The launch plan over few tiles per KV head: at most CACHE_SHORT_SPLITS splits (or a sixth of
    the tiles), not the one- or two-tile splits that fill the GPU (measured slower at 1k-2k keys);
    long contexts keep the plan's splits."""
    from common import kv_cache

    cpu = torch.device("cpu")  # (132 SMs assumed)
    cache = QuantizedKVCache(4, 8, 128, 40000, device="cpu")
    plans = {n_k: kv_cache.launch_plan(cache, 1, -(-n_k // 64), cpu)[2:] for n_k in (997, 2021, 4069, 16357, 32741)}
    assert plans == {997: (3, 6), 2021: (6, 6), 4069: (7, 10), 16357: (22, 12), 32741: (43, 12)}


def _same_cache_state(a, b, *, codes_differ_by=0):
    """Two caches' state: tails, lengths, marks and scales' positions exactly; codes equal, or within
    ``codes_differ_by`` (a tile mean summed in another order can move a code on a rounding tie)."""
    assert torch.equal(a.seqlens, b.seqlens) and a.lengths == b.lengths and torch.equal(a.first_bad, b.first_bad)
    for b_, n in enumerate(a.lengths):
        n0 = n // 64 * 64
        assert torch.equal(a.tail_k[b_, :, :n - n0], b.tail_k[b_, :, :n - n0])
        assert torch.equal(a.tail_v[b_, :, :n - n0], b.tail_v[b_, :, :n - n0])
        assert (a.k_codes[b_, :, :n0].int() - b.k_codes[b_, :, :n0].int()).abs().max() <= codes_differ_by
        assert torch.allclose(a.k_scale[b_, :, :n0], b.k_scale[b_, :, :n0], rtol=1e-6, atol=0)
        assert torch.allclose(a.k_mean[b_, :, :n0 // 64], b.k_mean[b_, :, :n0 // 64], rtol=1e-6, atol=1e-7)
        assert torch.equal(a.v_codes[b_, :, :n0].view(torch.uint8), b.v_codes[b_, :, :n0].view(torch.uint8))
        assert torch.equal(a.v_scale[b_, :, :n0 // 64], b.v_scale[b_, :, :n0 // 64])


def test_the_device_append_gives_the_host_appends_cache():
    """The append a CUDA graph records (common.triton_kv_append: positions read from ``seqlens``, a
    filled tile quantized on the device) against the host's append, step by step from sequences of
    different lengths across tile boundaries, with a NaN key in a tile that fills, a head dim below
    its padding, and a sequence that reaches max_seqlen (which then drops further keys). Same tails,
    lengths, marks, scales and V codes; K codes within one (the tile mean's summation order)."""
    from common.kv_cache import QuantizedKVCache as Cache

    q, k, v = make_qkv(3, 4, 1, 40, heads_kv=2, seqlen_k=200, kind="k_bias", seed=21)
    q, k, v = (t.to(KERNEL_DEVICE) for t in (q, k, v))
    k[1, 0, 70, 3] = float("nan")
    lens = torch.tensor([60, 2, 63])
    host, dev = (Cache(3, 2, 40, 130, device=KERNEL_DEVICE) for _ in range(2))
    for c in (host, dev):
        c.append(k[:, :, :63], v[:, :, :63], lengths=lens)
    for i in range(70):
        k1, v1 = k[:, :, 63 + i:64 + i], v[:, :, 63 + i:64 + i]
        counts = [int(n < 130) for n in host.lengths]
        host.append(k1, v1, lengths=counts)
        dev._append_on_device(k1, v1, "HND")
    assert host.lengths == (130, 72, 130) and host.first_bad[1, 0] == 9  # (key 70 went to sequence 1's 9)
    _same_cache_state(host, dev, codes_differ_by=1)
    assert dev.lengths == (130, 72, 130)  # (read back from seqlens)
    for be in ("torch", "triton"):
        a, b = (sage2.sageattn_kvcache(q, c, is_causal=True, backend=be) for c in (host, dev))
        assert torch.equal(a.isnan(), b.isnan()) and a[1].isnan().any()  # (sequence 1 sees its NaN key)
        assert accuracy(a[0].double(), b[0]).rel_l1 < 2e-3, be
    k[1, 1, 161, 0] = float("inf")  # sequence 1's key 100: in tile 1, which fills at its key 127
    for i in range(58):
        k1, v1 = k[:, :, 133 + i:134 + i], v[:, :, 133 + i:134 + i]
        host.append(k1, v1, lengths=[0, 1, 0])
        dev._append_on_device(k1, v1, "HND")  # (sequences 0 and 2 are full: their keys are dropped)
    with pytest.raises(ValueError, match="an append recorded in a CUDA graph takes one key per sequence"):
        dev._append_on_device(k[:, :, :2], v[:, :, :2], "HND")
    assert host.lengths == (130, 130, 130) == dev.lengths and host.first_bad[1, 1] == 100
    _same_cache_state(host, dev, codes_differ_by=1)


@gpu
def test_gpu_a_decode_step_captured_in_a_cuda_graph_replays_at_the_right_positions():
    """One decode step (append one key per sequence, attend) captured once with torch.cuda.graph
    and replayed for 150 steps (crossing tile boundaries, one sequence filling the cache) agrees
    with the same steps run eagerly; the host reads the lengths back from the device afterwards."""
    B, Hq, Hkv, D, N0 = 2, 8, 2, 128, 1000
    q, k, v = make_qkv(B, Hq, 1, D, heads_kv=Hkv, seqlen_k=N0 + 160, kind="k_bias", device="cuda", seed=22)
    lens = torch.tensor([N0, 900])
    eager, graphed = (QuantizedKVCache(B, Hkv, D, N0 + 120, device="cuda") for _ in range(2))
    for c in (eager, graphed):
        c.append(k[:, :, :N0], v[:, :, :N0], lengths=lens)
    static_q, static_k, static_v = q.clone(), k[:, :, :1].clone(), v[:, :, :1].clone()

    def step(cache):
        cache.append(static_k, static_v)
        return sage2.sageattn_kvcache(static_q, cache, is_causal=True, return_lse=True)

    side = torch.cuda.Stream()  # (warm up the kernels off the capture, as torch.cuda.graph wants)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        warm = QuantizedKVCache(B, Hkv, D, N0 + 120, device="cuda")
        warm.append(k[:, :, :N0], v[:, :, :N0], lengths=lens)
        step(warm)
        warm._append_on_device(static_k, static_v, "HND")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_g, lse_g = step(graphed)
    for i in range(150):
        static_k.copy_(k[:, :, N0 + i % 160:N0 + i % 160 + 1])
        static_v.copy_(v[:, :, N0 + i % 160:N0 + i % 160 + 1])
        static_q.copy_(q * (1 + i / 150))
        graph.replay()
        counts = [int(n < N0 + 120) for n in eager.lengths]
        eager.append(static_k, static_v, lengths=counts)
        want, want_lse = sage2.sageattn_kvcache(static_q, eager, is_causal=True, return_lse=True)
        assert accuracy(want.double(), out_g).rel_l1 < 3e-3 and (lse_g - want_lse).abs().max() < 2e-3, i
    assert graphed.lengths == eager.lengths == (N0 + 120, 1050)
    _same_cache_state(eager, graphed, codes_differ_by=1)


def test_a_cache_past_the_kernels_grid_is_refused():
    with pytest.raises(ValueError, match="batch \\* kv_heads must be at most 65535"):
        QuantizedKVCache(8193, 8, 64, 64, device="meta")


def test_host_and_device_appends_mixed_keep_lengths_and_rollbacks_exact(monkeypatch):
    """Device appends (what a CUDA graph replays), then host appends, rollbacks into the last tile
    either one quantized, and a compiled step recorded during a capture (the capture faked: it
    must take the device append too, or its replays would write one position). The state always
    equals a cache fed by host appends alone, and the host's lengths equal seqlens."""
    from common import kv_cache

    q, k, v = make_qkv(2, 4, 1, 64, heads_kv=2, seqlen_k=200, kind="k_bias", seed=23)
    q, k, v = (t.to(KERNEL_DEVICE) for t in (q, k, v))
    host, mixed = (QuantizedKVCache(2, 2, 64, 200, device=KERNEL_DEVICE) for _ in range(2))
    for c in (host, mixed):
        c.append(k[:, :, :60], v[:, :, :60])
    for i in range(60, 66):  # the device fills tile 0 at key 63
        host.append(k[:, :, i:i + 1], v[:, :, i:i + 1])
        mixed._append_on_device(k[:, :, i:i + 1], v[:, :, i:i + 1], "HND")
    assert mixed.lengths == (66, 66) and mixed._host_lengths == tuple(mixed.seqlens.tolist())
    for c in (host, mixed):
        c.length = 62  # back into tile 0, which the device quantized: its keys come back as given
        c.append(k[:, :, 62:130], v[:, :, 62:130], lengths=[68, 67])  # host appends: tile 1 fills
        assert c._host_lengths == tuple(c.seqlens.tolist()) == (130, 129)
    _same_cache_state(host, mixed, codes_differ_by=1)
    for c in (host, mixed):
        c.append(k[:, :, 130:131], v[:, :, 130:131], lengths=[0, 1])  # (both at 130)
        c.length = 100  # back into tile 1, quantized by the host path
    _same_cache_state(host, mixed, codes_differ_by=1)

    def step(cache, k1, v1):
        cache.append(k1, v1)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    monkeypatch.setattr(kv_cache, "capturing", lambda device: True)
    torch._dynamo.reset()
    compiled(mixed, k[:, :, 100:101], v[:, :, 100:101])
    assert mixed._device_appends
    monkeypatch.setattr(kv_cache, "capturing", lambda device: False)
    host.append(k[:, :, 100:101], v[:, :, 100:101])
    assert mixed.lengths == host.lengths == (101, 101)
    _same_cache_state(host, mixed, codes_differ_by=1)
