"""Inputs on a GPU other than the current one (a model spread over GPUs, e.g. ``device_map="auto"``):
Triton and the CUDA extension launch on the current device, so every public function makes its
inputs' device current for the call (common.api.runs_on_input_device). Each call on cuda:1 while
cuda:0 is current gives what it gives with cuda:1 current, bit for bit. Needs two GPUs."""

import pytest
import torch

import sage1
import sage2
import sage3
from common.inputs import make_qkv

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                reason="needs two CUDA GPUs")

CALLS = {
    "sage1": lambda q, k, v: sage1.sageattn(q, k, v),
    "sage2 (auto: the Hopper kernel there)": lambda q, k, v: sage2.sageattn(q, k, v, is_causal=True),
    "sage2 triton": lambda q, k, v: sage2.sageattn(q, k, v, backend="triton"),
    "sage2 decode": lambda q, k, v: sage2.sageattn(q[:, :, :1], k, v),
    "sage3": lambda q, k, v: sage3.sageattn(q, k, v),
}


@pytest.mark.parametrize("name", CALLS)
def test_inputs_on_another_gpu(name):
    q, k, v = (t.to("cuda:1") for t in make_qkv(2, 4, 300, 128, heads_kv=2, kind="k_bias", seed=3))
    with torch.cuda.device(1):
        want = CALLS[name](q, k, v)
        torch.cuda.synchronize()
    with torch.cuda.device(0):
        got = CALLS[name](q, k, v)
        assert torch.cuda.current_device() == 0
    torch.cuda.synchronize(1)
    assert got.device == torch.device("cuda:1") and torch.equal(got, want), name


def test_training_and_the_kv_cache_on_another_gpu():
    q, k, v = (t.to("cuda:1") for t in make_qkv(1, 4, 256, 64, heads_kv=2, seed=4))
    results = []
    for current in (1, 0):
        with torch.cuda.device(current):
            qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
            out = sage3.sageattn_train(qg, kg, vg, is_causal=True)
            out.float().square().sum().backward()
            cache = sage2.QuantizedKVCache(1, 2, 64, 400, device="cuda:1")
            cache.append(k, v)
            cache.append(k[:, :, :1], v[:, :, :1])
            dec = sage2.sageattn_kvcache(q[:, :, :1], cache)
            results.append((out, qg.grad, kg.grad, vg.grad, dec))
    torch.cuda.synchronize(1)
    for a, b in zip(*results):
        assert a.device == torch.device("cuda:1") and torch.equal(a, b)
