"""Inputs that are small views into a buffer of more than 2^31 elements: a slice of a preallocated
KV cache, or q, k, v taken from one packed QKV tensor. The view passes every size check, but an
element's offset from the buffer's start does not fit in 32 bits; every kernel that reads the
caller's tensors computes it in 64 bits. Each call must give exactly what the same values give
contiguous.

The buffer is 4 GiB of virtual memory of which only the touched pages become real (on the GPU the
test allocates it for real, 4 GiB of the device's memory)."""

import pytest
import torch

import sage1
import sage2
from conftest import KERNEL_DEVICE

SB = 1 << 30  # batch stride in elements: b = 2 starts at 2^31


@pytest.fixture(scope="module")
def flat():
    buf = torch.empty(2 * SB + (1 << 20), dtype=torch.float16, device=KERNEL_DEVICE)
    yield buf
    del buf


def views(flat, nq, nk, d, *, layout):
    """q, k, v of batch 3 and one head, batch b at b * SB: HND [3, 1, N, D] or NHD [3, N, 1, D]
    (k and v interleaved per token, as in a packed KV tensor), filled with fresh values."""
    g = torch.Generator().manual_seed(nq * 7 + nk)
    out = []
    for i, n in enumerate((nq, nk, nk)):
        if layout == "HND":
            t = flat.as_strided((3, 1, n, d), (SB, n * d, d, 1), storage_offset=i * (1 << 18))
        else:  # tokens three heads' worth apart, as q, k, v of one [B, N, 3, 1, D] tensor
            t = flat.as_strided((3, n, 1, d), (SB, 3 * d, d, 1), storage_offset=i * d)
        for b in range(3):
            t[b].copy_(torch.randn(t[b].shape, generator=g).to(t.dtype))
        out.append(t)
    return out


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("nq", [1, 40])  # decode (Nq <= 16) and prefill
@pytest.mark.parametrize("call", [
    lambda q, k, v, **kw: sage1.sageattn(q, k, v, backend="triton", **kw),
    lambda q, k, v, **kw: sage2.sageattn(q, k, v, backend="triton", **kw),
    lambda q, k, v, **kw: sage2.sageattn(q, k, v, backend="triton", smooth_q=True, qk_dtype="int4", **kw),
], ids=["sage1", "sage2_int8", "sage2_int4_smooth_q"])
def test_views_past_2_to_the_31_give_the_contiguous_result(flat, call, nq, layout):
    q, k, v = views(flat, nq, 70, 64, layout=layout)
    assert max(t.storage_offset() + sum((s - 1) * st for s, st in zip(t.shape, t.stride())) for t in (q, k, v)) >= 2 ** 31
    got = call(q, k, v, tensor_layout=layout)
    want = call(q.contiguous(), k.contiguous(), v.contiguous(), tensor_layout=layout)
    assert torch.isfinite(want).all()
    assert torch.equal(got, want)
