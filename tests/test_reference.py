"""The exact reference attention and the metrics."""

import math

import pytest
import torch

from common import metrics
from common.inputs import make_qkv
from common.reference import attention_reference


def naive_attention(q, k, v, causal, scale):
    """Direct float64 softmax(QK^T)V in HND, loops for the causal mask (independent of the code under test)."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) * scale
    nq, nk = s.shape[-2:]
    if causal:
        for i in range(nq):
            for j in range(nk):
                if j > i + nk - nq:
                    s[..., i, j] = -math.inf
    out = torch.zeros(*s.shape[:-1], v.shape[-1], dtype=torch.float64)
    lse = torch.full(s.shape[:-1], -math.inf, dtype=torch.float64)
    rows = torch.isfinite(s).any(-1)
    lse[rows] = torch.logsumexp(s[rows], -1)
    p = torch.softmax(s, -1)
    out[rows] = (p @ v)[rows]
    return out, lse


@pytest.mark.parametrize("nq,nk", [(16, 16), (7, 20), (20, 7), (1, 33)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_reference_matches_naive(nq, nk, causal, layout):
    q, k, v = make_qkv(2, 4, nq, 16, seqlen_k=nk, heads_kv=2, dtype=torch.float16, layout=layout, seed=3)
    out, lse = attention_reference(q, k, v, tensor_layout=layout, is_causal=causal, return_lse=True, sm_scale=0.3)
    t = (lambda x: x) if layout == "HND" else (lambda x: x.transpose(1, 2))
    ref, ref_lse = naive_attention(t(q), t(k), t(v), causal, 0.3)
    assert out.dtype == torch.float64
    torch.testing.assert_close(t(out), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)


def test_reference_rows_without_keys_are_zero_with_lse_minus_inf():
    q, k, v = make_qkv(1, 1, 10, 8, seqlen_k=4, dtype=torch.float16)
    out, lse = attention_reference(q, k, v, is_causal=True, return_lse=True)
    assert (out[0, 0, :6] == 0).all() and torch.isinf(lse[0, 0, :6]).all() and torch.isfinite(lse[0, 0, 6:]).all()
    assert torch.isfinite(out).all()


def test_reference_chunking_does_not_change_the_result():
    q, k, v = make_qkv(2, 2, 50, 16, seqlen_k=40, dtype=torch.float16)
    a = attention_reference(q, k, v, is_causal=True)
    b = attention_reference(q, k, v, is_causal=True, max_chunk_elems=64)
    # to float64 rounding: a BLAS may block a matmul differently by shape (torch 2.14.1's CUDA
    # build on the CPU: one unit in the last place, 2.2e-16, where other builds gave equal bits)
    torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)


def test_reference_masks_follow_sdpa():
    q, k, v = make_qkv(1, 2, 9, 16, seqlen_k=11, dtype=torch.float16, seed=5)
    keep = torch.rand(1, 1, 9, 11) > 0.3
    keep[..., 0] = True
    add = torch.randn(1, 2, 9, 11)
    for mask in (keep, add, torch.tensor(True), torch.tensor(0.5), torch.randn(11)):  # (0-d and 1-d broadcast)
        sdpa_mask = mask.expand(1, 2, 9, 11)  # (SDPA itself takes no 0-d mask)
        ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=sdpa_mask if mask.dtype == torch.bool else sdpa_mask.double())
        torch.testing.assert_close(attention_reference(q, k, v, attn_mask=mask), ref)


def test_metrics_definitions():
    ref = torch.tensor([1.0, -2.0, 3.0, 0.5])
    out = torch.tensor([1.1, -2.0, 2.5, 0.5])
    assert metrics.cosine_similarity(ref, out) == pytest.approx(float(ref @ out / (ref.norm() * out.norm())))
    assert metrics.relative_l1(ref, out) == pytest.approx(0.6 / 6.5)
    assert metrics.rmse(ref, out) == pytest.approx(math.sqrt((0.01 + 0.25) / 4))
    assert metrics.max_abs_error(ref, out) == pytest.approx(0.5)
    acc = metrics.accuracy(ref, ref)
    assert acc.cos_sim == pytest.approx(1.0) and acc.rel_l1 == 0 and acc.rmse == 0
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.accuracy(ref, out[:3])
