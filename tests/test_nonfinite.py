"""NaN and Inf inputs (common.nonfinite): NaN exactly on the rows SDPA makes NaN, finite and
accurate everywhere else, for every generation, kernel and emulation; never a crash."""

import pytest
import torch

import sage1
import sage2
import sage3
from common.inputs import make_qkv
from common.metrics import accuracy
from common.reference import attention_reference
from common.timing import graph_replay
from conftest import KERNEL_DEVICE, gpu

GENS = {"sage1": (sage1.sageattn, 0.999), "sage2": (sage2.sageattn, 0.995), "sage3": (sage3.sageattn, 0.95)}


def poisoned(where, causal, value=float("nan")):
    q, k, v = make_qkv(1, 2, 200, 64, heads_kv=1, kind="k_bias", seed=2)
    t = {"q": q, "k": k, "v": v}[where]
    t[0, 0, 150, 3] = value
    return q, k, v


@pytest.mark.parametrize("gen", GENS)
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_follows_exact_attention(gen, where, causal, backend):
    fn, bound = GENS[gen]
    q, k, v = poisoned(where, causal)
    ref, ref_lse = attention_reference(q, k, v, is_causal=causal, return_lse=True)
    want = torch.isnan(ref).any(-1)
    if where == "v" and causal:
        # a key a row does not see never affects it: the exact reference (like SDPA's math backend)
        # spreads a NaN of V through masked keys as 0 * NaN; the fused backends do not
        want = torch.zeros_like(want)
        want[..., 150:] = True
        ref = attention_reference(q, k, torch.nan_to_num(v), is_causal=causal)
    copies = [t.clone() for t in (q, k, v)]
    out, lse = fn(*(t.to(KERNEL_DEVICE) for t in (q, k, v)), is_causal=causal, return_lse=True, backend=backend)
    out, lse = out.cpu(), lse.cpu()
    got = torch.isnan(out).any(-1)
    assert torch.equal(got, want) and torch.equal(torch.isnan(lse), want)
    assert torch.isfinite(out[~want]).all()
    if (~want).any():
        assert accuracy(ref[~want], out[~want]).cos_sim > bound
    assert all(torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)) for a, b in zip((q, k, v), copies))  # untouched


def test_inf_is_treated_like_nan_and_masked_keys_do_not_spread():
    q, k, v = poisoned("v", False, float("inf"))
    out = sage1.sageattn(q, k, v, backend="torch")
    assert torch.isnan(out[0, :]).all()                       # every row sees key 150 (both query heads: GQA)
    pad = torch.ones(1, 1, 1, 200, dtype=torch.bool)
    pad[..., 150:] = False                                    # key 150 is padding: nobody sees it
    out = sage2.sageattn(q, k, v, attn_mask=pad, backend="torch")
    assert torch.isfinite(out).all()
    bias = torch.zeros(200, 200)
    bias[:100, 150] = float("-inf")                           # rows < 100 do not see key 150
    out = sage2.sageattn(q, k, v, attn_mask=bias, backend="torch")
    assert torch.isfinite(out[0, :, :100]).all() and torch.isnan(out[0, :, 100:]).all()


def test_varlen_nan_stays_in_its_sequence():
    q, k, v = (torch.randn(n, 2, 64).half() for n in (10, 12, 12))
    k[8, 0, 0] = float("nan")                                 # a key of the second sequence (keys 5..11)
    cu_q = torch.tensor([0, 4, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 12], dtype=torch.int32)
    out = sage1.sageattn_varlen(q, k, v, cu_q, cu_k, 6, 7, backend="torch")
    assert torch.isfinite(out[:4]).all()                      # the first sequence is untouched
    assert torch.isnan(out[4:, 0]).all() and torch.isfinite(out[4:, 1]).all()  # head 0 only (no GQA here)


@pytest.mark.parametrize("where,causal", [("q", True), ("k", True), ("v", False), ("k", False)])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_training_follows_the_rule_forward_and_backward(where, causal, backend):
    """sage3.sageattn_train: NaN output rows as in inference; dQ NaN on those rows and dK NaN on the
    keys they see (SDPA's arithmetic: a NaN row of dS); dV = P^T dO NaN on the keys seen by rows whose
    P is NaN (a bad q or k: a bad value alone leaves dV finite, as in SDPA, which is checked too);
    finite and accurate everywhere else."""
    from common.masking import NO_MASK
    from common.nonfinite import nan_rows
    from sage3.train import _keys_seen_by

    q, k, v = make_qkv(1, 4, 96, 64, heads_kv=2, seqlen_k=96, kind="k_bias", seed=7)
    {"q": q, "k": k, "v": v}[where][0, 1, 60, 3] = float("nan")
    rows = nan_rows(q, k, v, is_causal=causal, mask=NO_MASK)
    keys = _keys_seen_by(rows, 96, 2, causal)
    v_keys = keys if where != "v" else torch.zeros_like(keys)
    assert rows.any() and (~rows).any() and keys.any() and (~keys).any()
    dev = KERNEL_DEVICE
    leaves = [t.detach().clone().to(dev).requires_grad_() for t in (q, k, v)]
    out = sage3.sageattn_train(*leaves, is_causal=causal, backend=backend)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(dev, out.dtype)
    out.backward(w)
    dq, dk, dv = (t.grad.cpu() for t in leaves)
    assert torch.equal(torch.isnan(out.detach().cpu()).any(-1), rows)
    assert torch.equal(torch.isnan(dq).any(-1), rows) and torch.isfinite(dq[~rows]).all()
    for g, seen in ((dk, keys), (dv, v_keys)):
        assert torch.equal(torch.isnan(g).any(-1), seen) and torch.isfinite(g[~seen]).all()
    if where == "v":  # SDPA's own dV stays finite (dV = P^T dO), and so does ours
        sdpa_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
        torch.nn.functional.scaled_dot_product_attention(*sdpa_in, is_causal=causal, enable_gqa=True).backward(
            w.cpu().double())
        assert torch.isfinite(sdpa_in[2].grad).all() and torch.isfinite(dv).all()
    # the finite parts are those of exact attention on the zeroed inputs
    ref_in = [torch.nan_to_num(t.detach()).double().requires_grad_() for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*ref_in, is_causal=causal, enable_gqa=True)
    ref.backward(w.cpu().double())
    assert accuracy(ref.detach()[~rows], out.detach().cpu()[~rows]).cos_sim > 0.998
    assert accuracy(ref_in[0].grad[~rows], dq[~rows]).cos_sim > 0.99
    for r, g, seen in ((ref_in[1].grad, dk, keys), (ref_in[2].grad, dv, v_keys)):
        assert accuracy(r[~seen], g[~seen]).cos_sim > 0.99


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_training_nan_in_the_output_gradient_follows_sdpa(causal, backend):
    """A NaN in grad_out: NaN dQ on its row, NaN dK and dV on the keys that row sees (without a
    mask: SDPA's pattern, checked against SDPA itself; causal: the keys up to the row's diagonal,
    where SDPA's math backend also spreads 0 * NaN onto the masked keys), the rest finite and
    accurate. (The NaN used to be dropped by dO's quantization, or spread over a block.)"""
    q, k, v = make_qkv(1, 2, 80, 64, seqlen_k=80, kind="k_bias", seed=9)
    leaves = [t.detach().clone().to(KERNEL_DEVICE).requires_grad_() for t in (q, k, v)]
    out = sage3.sageattn_train(*leaves, is_causal=causal, backend=backend)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    w[0, 1, 30, 5] = float("nan")
    out.backward(w.to(KERNEL_DEVICE))
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    torch.nn.functional.scaled_dot_product_attention(*ref_in, is_causal=causal).backward(torch.nan_to_num(w).double())
    sdpa_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    torch.nn.functional.scaled_dot_product_attention(*sdpa_in, is_causal=causal).backward(w.double())
    row = torch.zeros(1, 2, 80, dtype=torch.bool)
    row[0, 1, 30] = True
    keys = torch.zeros(1, 2, 80, dtype=torch.bool)
    keys[0, 1, :31 if causal else 80] = True
    for i, (t, r, leaf) in enumerate(zip(sdpa_in, ref_in, leaves)):
        g = leaf.grad.cpu()
        bad = row if i == 0 else keys
        assert torch.equal(torch.isnan(g).any(-1), bad)
        if not causal:
            assert torch.equal(~torch.isfinite(t.grad).all(-1), bad)
        assert accuracy(r.grad[~bad], g[~bad]).cos_sim > 0.99


def test_training_edge_cases_double_backward_and_no_keys():
    """A second backward through SageBwd is refused (it is not differentiable twice; it used to give
    wrong numbers); no keys give zeros and zero gradients, also where q's fp16 sum overflows."""
    q, k, v = make_qkv(1, 2, 64, 64, seed=10)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = sage3.sageattn_train(*leaves, backend="torch")
    (g,) = torch.autograd.grad(out.float().square().sum(), leaves[0], create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()
    q = (torch.randn(1, 8, 1024, 64) + 1).half().requires_grad_()  # its fp16 sum is inf
    k = torch.randn(1, 8, 0, 64).half().requires_grad_()
    out = sage3.sageattn_train(q, k, k.detach().clone().requires_grad_(), backend="torch")
    assert torch.equal(out, torch.zeros_like(out))
    out.float().sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q))


# --- The kernels' own rule (no host wait): the passes zero and record, the epilogue sets rows ---

OPTION_CASES = [
    ("sage1", dict()),
    ("sage1", dict(pv_accum="fp32", qk_granularity="per_token")),
    ("sage2", dict()),
    ("sage2", dict(qk_dtype="int4")),                              # Q smoothing: delta_s from raw K
    ("sage2", dict(smooth_v=True, qk_granularity="per_block")),
    ("sage2", dict(pv_dtype="fp16")),
    ("sage2", dict(qk_granularity="per_tensor")),                  # the PyTorch quantizer records the flags
]
MASK_CASES = ["none", "causal", "key_padding", "key_padding_causal", "dense"]


def _masked_call(fn, q, k, v, mask_case, backend, **opts):
    causal = mask_case in ("causal", "key_padding_causal", "dense")
    if mask_case.startswith("key_padding"):
        keep = torch.ones(2, 1, 1, k.shape[2], dtype=torch.bool)
        keep[0, ..., 150:] = False                                # batch 0: keys >= 150 are padding
        opts["attn_mask"] = keep.to(q.device)
    elif mask_case == "dense":
        bias = torch.zeros(q.shape[2], k.shape[2])
        bias[:120, 60:90] = float("-inf")                         # rows < 120 do not see keys 60..89
        opts["attn_mask"] = bias.to(q.device)
    return fn(q, k, v, is_causal=causal, return_lse=True, backend=backend, **opts), causal, opts.get("attn_mask")


@pytest.mark.parametrize("gen,opts", OPTION_CASES)
@pytest.mark.parametrize("mask_case", MASK_CASES)
def test_kernel_and_emulation_agree_on_nonfinite_inputs(gen, opts, mask_case):
    """NaN and Inf in q, k and v at once, one of them in a padding key (seen by nobody) and one in a
    key some rows do not see: both backends give NaN on exactly SDPA's rows, and the same finite
    numbers elsewhere (kernel vs emulation as close as on finite inputs)."""
    from common.masking import prepare_mask
    from common.nonfinite import nan_rows

    fn = GENS[gen][0]
    q, k, v = make_qkv(2, 4, 200, 64, heads_kv=2, kind="k_bias", seed=11)
    q[1, 3, 7, 5] = float("nan")
    k[0, 1, 170, 2] = float("inf")        # batch 0: a padding key in the key-padding cases
    v[1, 0, 75, 9] = float("-inf")        # batch 1: causal rows < 75 and dense-masked rows < 120 do not see it
    k[1, 1, 180, 0] = float("nan")
    res = {}
    for backend in ("torch", "triton"):
        (out, lse), causal, mask = _masked_call(fn, *(t.to(KERNEL_DEVICE) for t in (q, k, v)), mask_case, backend, **opts)
        res[backend] = out.cpu(), lse.cpu()
    spec = prepare_mask(mask.cpu() if mask is not None else None, 2, 4, 200, 200, torch.device("cpu"))
    rows = nan_rows(q, k, v, is_causal=causal, mask=spec)
    assert rows.any() and (~rows).any()
    for out, lse in res.values():
        assert torch.equal(torch.isnan(out).any(-1), rows) and torch.equal(torch.isnan(lse), rows)
        assert torch.isfinite(out[~rows]).all()
    (ok, lk), (oe, le) = res["triton"], res["torch"]
    fin = torch.isfinite(le)
    assert (lk - le)[fin].abs().max() < 1e-3
    assert accuracy(oe[~rows].double(), ok[~rows]).rel_l1 <= 3e-3


@pytest.mark.parametrize("gen", ["sage1", "sage2"])
def test_finite_inputs_give_the_same_numbers_with_the_check_on_or_off(gen, monkeypatch):
    """The rule costs nothing in numbers: on finite inputs the output is bit-identical with the check off."""
    import common.nonfinite as nf

    fn = GENS[gen][0]
    q, k, v = (t.to(KERNEL_DEVICE) for t in make_qkv(1, 2, 150, 64, kind="k_bias", seed=3))
    on = fn(q, k, v, is_causal=True, backend="triton")
    monkeypatch.setattr(nf, "CHECK_NONFINITE", False)
    off = fn(q, k, v, is_causal=True, backend="triton")
    assert torch.equal(on, off)


@gpu
@pytest.mark.parametrize("gen", ["sage1", "sage2"])
def test_the_check_never_waits_for_the_gpu_and_holds_inside_a_cuda_graph(gen):
    """No host synchronization in a call without a dense mask (torch's sync debug mode raises on
    one), so calls queue ahead of the GPU; and the rule works in a captured CUDA graph, whose
    inputs are poisoned only before a replay."""
    fn = GENS[gen][0]
    q, k, v = (t.cuda() for t in make_qkv(2, 4, 256, 64, heads_kv=2, kind="k_bias", seed=4))
    fn(q, k, v, is_causal=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn(q, k, v, is_causal=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    out = None

    def call():
        nonlocal out
        out = fn(q, k, v, is_causal=True)

    replay = graph_replay(call)                                   # out: the graph's output buffer
    clean = fn(q, k, v, is_causal=True)
    replay()
    assert torch.equal(out, clean)
    v[1, 0, 100, 3] = float("nan")
    replay()
    want = torch.zeros(2, 4, 256, dtype=torch.bool, device="cuda")
    want[1, :2, 100:] = True                                      # query heads 0, 1 share kv head 0
    assert torch.equal(torch.isnan(out).any(-1), want)
    assert torch.equal(out[~want], fn(q, k, v, is_causal=True)[~want])


def test_kernel_buffers_are_zeroed_and_skip_q_rows_where_no_pass_reads_q():
    """The buffers the passes fill: all zero (the passes write only where they find a NaN/Inf, and
    V's atomic max starts from 0); without a pass over Q (the CUDA kernel quantizes Q itself) there
    is no per-query flag buffer, and without the in-kernel rule no flags at all."""
    from common.checks import AttentionShape
    from common.nonfinite import kernel_buffers

    shape = AttentionShape(batch=2, heads_q=4, heads_kv=2, seqlen_q=5, seqlen_k=7, head_dim=16, layout="HND")
    flags, amax = kernel_buffers(shape, "cpu", rows_in_kernel=True, amax_entries=2 * 2 * 16 + 1)
    assert flags.q_bad.shape == (2, 4, 5) and not flags.q_bad.any()
    assert flags.first_bad.shape == (4,) and not flags.first_bad.any()
    assert amax.shape == (65,) and amax.dtype == torch.int32 and not amax.any()
    flags, amax = kernel_buffers(shape, "cpu", rows_in_kernel=True, amax_entries=64, q_rows=False)
    assert flags.q_bad is None and flags.first_bad.shape == (4,) and amax.shape == (64,)
    flags, amax = kernel_buffers(shape, "cpu", rows_in_kernel=False, amax_entries=64)
    assert flags is None and amax.shape == (64,)
