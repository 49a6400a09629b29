"""common.sdpa_patch: the calls it serves give what SDPA gives, the rest fall back, and the patch
is undone on exit."""

import pytest
import torch
import torch.nn.functional as F

from common.reference import attention_reference
from common.sdpa_patch import patch_sdpa

ORIGINAL = F.scaled_dot_product_attention


def exact(q, k, v, is_causal, sm_scale):
    return attention_reference(q, k, v, is_causal=is_causal, sm_scale=sm_scale).to(q.dtype)


def qkv(b=3, h=2, n=12, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).to(dtype) for _ in range(3)]


def test_no_mask_and_causal_served():
    q, k, v = qkv()
    for causal in (False, True):
        want = ORIGINAL(q, k, v, is_causal=causal)
        with patch_sdpa(exact) as stats:
            got = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        assert stats.served == 1 and not stats.fallbacks
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)  # fp32 in, fp16 compute by default
    assert F.scaled_dot_product_attention is ORIGINAL


@pytest.mark.parametrize("kind", ["bool", "additive_min", "additive_inf"])
def test_right_padding_mask_served_exactly_as_sdpa(kind):
    q, k, v = qkv(b=3, n=10)
    lengths = torch.tensor([10, 7, 3])
    keep = torch.arange(10)[None, :] < lengths[:, None]            # [B, Nk]
    mask = keep[:, None, None, :]                                   # [B, 1, 1, Nk]
    if kind != "bool":
        neg = torch.finfo(torch.float32).min if kind == "additive_min" else float("-inf")
        mask = torch.zeros(mask.shape).masked_fill(~mask, neg)
    want = ORIGINAL(q, k, v, attn_mask=mask)
    calls = []

    def recording(q_, k_, v_, is_causal, sm_scale):
        calls.append(k_.shape[2])
        return exact(q_, k_, v_, is_causal, sm_scale)

    with patch_sdpa(recording, compute_dtype=torch.float32) as stats:
        got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert stats.served == 1 and calls == [10, 7, 3]  # each sequence on its own kept keys
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_other_masks_dropout_and_extra_args_fall_back():
    q, k, v = qkv()
    left_padding = torch.ones(3, 1, 1, 12, dtype=torch.bool)
    left_padding[1, ..., :4] = False
    bias = torch.randn(1, 1, 12, 12)
    fully_masked = torch.zeros(3, 1, 1, 12, dtype=torch.bool)
    with patch_sdpa(exact) as stats:
        for m in (left_padding, bias, fully_masked):
            F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
        F.scaled_dot_product_attention(q, k, v, attn_mask=left_padding, is_causal=False)
        F.scaled_dot_product_attention(q[0], k[0], v[0])  # 3-D
    assert stats.served == 0
    assert sum(stats.fallbacks.values()) == 6
    assert any("dropout" in r for r in stats.fallbacks) and any("not right key padding" in r for r in stats.fallbacks)
    assert F.scaled_dot_product_attention is ORIGINAL


def test_patch_undone_after_an_exception():
    with pytest.raises(RuntimeError):
        with patch_sdpa(exact):
            raise RuntimeError("boom")
    assert F.scaled_dot_product_attention is ORIGINAL


def test_sage_attention_through_the_patch_keeps_dtype_and_accuracy():
    import sage1

    q, k, v = qkv(b=2, h=2, n=40, d=32)
    want = ORIGINAL(q, k, v)

    def fn(q_, k_, v_, is_causal, sm_scale):
        assert q_.dtype == torch.float16  # fp32 inputs reach the kernel as fp16
        return sage1.sageattn(q_, k_, v_, is_causal=is_causal, sm_scale=sm_scale, backend="torch")

    with patch_sdpa(fn):
        got = F.scaled_dot_product_attention(q, k, v)
    assert got.dtype == torch.float32
    assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.999
