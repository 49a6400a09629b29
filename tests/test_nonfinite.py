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
from conftest import KERNEL_DEVICE

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
    """sage3.sageattn_train: NaN output rows as in inference; dQ NaN on those rows, dK and dV NaN on
    the keys they see (SDPA's arithmetic: a NaN row of dS), finite and accurate everywhere else."""
    from common.masking import NO_MASK
    from common.nonfinite import nan_rows
    from sage3.train import _keys_seen_by

    q, k, v = make_qkv(1, 4, 96, 64, heads_kv=2, seqlen_k=96, kind="k_bias", seed=7)
    {"q": q, "k": k, "v": v}[where][0, 1, 60, 3] = float("nan")
    rows = nan_rows(q, k, v, is_causal=causal, mask=NO_MASK)
    keys = _keys_seen_by(rows, 96, 2, causal)
    assert rows.any() and (~rows).any() and keys.any() and (~keys).any()
    dev = KERNEL_DEVICE
    leaves = [t.detach().clone().to(dev).requires_grad_() for t in (q, k, v)]
    out = sage3.sageattn_train(*leaves, is_causal=causal, backend=backend)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(dev, out.dtype)
    out.backward(w)
    dq, dk, dv = (t.grad.cpu() for t in leaves)
    assert torch.equal(torch.isnan(out.detach().cpu()).any(-1), rows)
    assert torch.equal(torch.isnan(dq).any(-1), rows) and torch.isfinite(dq[~rows]).all()
    for g in (dk, dv):
        assert torch.equal(torch.isnan(g).any(-1), keys) and torch.isfinite(g[~keys]).all()
    # the finite parts are those of exact attention on the zeroed inputs
    ref_in = [torch.nan_to_num(t.detach()).double().requires_grad_() for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*ref_in, is_causal=causal, enable_gqa=True)
    ref.backward(w.cpu().double())
    assert accuracy(ref.detach()[~rows], out.detach().cpu()[~rows]).cos_sim > 0.998
    assert accuracy(ref_in[0].grad[~rows], dq[~rows]).cos_sim > 0.99
    for r, g in ((ref_in[1].grad, dk), (ref_in[2].grad, dv)):
        assert accuracy(r[~keys], g[~keys]).cos_sim > 0.99
