"""Input checking shared by every generation: each bad input gets the documented error."""

import pytest
import torch

from common.checks import check_attention_inputs, resolve_backend, resolve_sm_scale


def qkv(shape_q=(1, 2, 8, 64), shape_k=(1, 2, 8, 64), dtype=torch.float16):
    return torch.randn(shape_q).to(dtype), torch.randn(shape_k).to(dtype), torch.randn(shape_k).to(dtype)


def test_valid_shapes_hnd_and_nhd():
    s = check_attention_inputs(*qkv((2, 8, 5, 64), (2, 2, 7, 64)))
    assert (s.batch, s.heads_q, s.heads_kv, s.seqlen_q, s.seqlen_k, s.head_dim, s.gqa_group) == (2, 8, 2, 5, 7, 64, 4)
    s = check_attention_inputs(*qkv((2, 5, 8, 64), (2, 7, 2, 64)), tensor_layout="NHD")
    assert (s.heads_q, s.heads_kv, s.seqlen_q, s.seqlen_k) == (8, 2, 5, 7)


@pytest.mark.parametrize("args,match", [
    (qkv((1, 8, 64), (1, 2, 8, 64)), r"q must have rank 4 \(\[B, H, N, D\] for tensor_layout='HND'\)"),
    (qkv(dtype=torch.float32), r"q.dtype must be torch.float16 or torch.bfloat16, got torch.float32"),
    ((torch.zeros(1, 2, 8, 64, dtype=torch.int8),) + qkv()[1:], "q.dtype must be torch.float16 or torch.bfloat16"),
    (qkv((2, 2, 8, 64), (1, 2, 8, 64)), "q and k must have the same batch size, got 2 and 1"),
    (qkv((1, 3, 8, 64), (1, 2, 8, 64)), r"number of query heads \(3\) must be a multiple of the number of key/value heads \(2\)"),
    (qkv((1, 2, 8, 64), (1, 2, 8, 128)), "q and k must have the same head_dim, got 64 and 128"),
    ((qkv()[0], qkv()[1], torch.randn(1, 2, 9, 64).half()), "k and v must have the same shape"),
    ((qkv()[0], qkv()[1].bfloat16(), qkv()[2]), "q, k and v must have the same dtype"),
    ((qkv()[0].numpy(),) + qkv()[1:], "q must be a torch.Tensor, got ndarray"),
])
def test_bad_inputs(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        check_attention_inputs(*args)


def test_bad_layout_and_sm_scale_and_backend():
    with pytest.raises(ValueError, match=r"tensor_layout must be one of \['HND', 'NHD'\], got 'hnd'"):
        check_attention_inputs(*qkv(), tensor_layout="hnd")
    assert resolve_sm_scale(None, 64) == 0.125
    for bad in (0.0, float("inf"), float("nan"), -1):
        with pytest.raises(ValueError, match="sm_scale must be a finite positive number"):
            resolve_sm_scale(bad, 64)
    with pytest.raises(TypeError, match="sm_scale must be a float or None, got str"):
        resolve_sm_scale("0.1", 64)
    with pytest.raises(ValueError, match=r"backend must be one of \['auto', 'triton', 'torch'\]"):
        resolve_backend("xla", torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


@pytest.mark.skipif(not hasattr(torch, "device") or torch.device("meta").type != "meta", reason="no meta device")
def test_tensors_on_different_devices():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="q, k and v must be on the same device"):
        check_attention_inputs(q, k.to("meta"), v)


def test_cpu_tensors_with_the_triton_backend_outside_the_interpreter(monkeypatch):
    """What a GPU machine says to CPU tensors with backend='triton' (the interpreter is off there)."""
    import sage1

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors, got tensors on cpu; use backend='torch'"):
        sage1.sageattn(*qkv(), backend="triton")


@pytest.mark.parametrize("gen", ["sage1", "sage2", "sage3"])
def test_empty_batch_heads_and_sequences(gen):
    import importlib

    fn = importlib.import_module(gen).sageattn
    for shape_q, shape_k in [((0, 2, 8, 64), (0, 2, 8, 64)), ((1, 2, 0, 64), (1, 2, 8, 64)),
                             ((1, 2, 8, 64), (1, 2, 0, 64))]:
        out, lse = fn(*qkv(shape_q, shape_k), return_lse=True, backend="torch")
        assert out.shape == shape_q and (out == 0).all() and torch.isinf(lse).all()


def test_varlen_with_empty_sequences():
    import sage1

    q, k, v = (torch.randn(n, 2, 64).half() for n in (7, 9, 9))
    cu_q = torch.tensor([0, 0, 7], dtype=torch.int32)   # the first sequence has no queries
    cu_k = torch.tensor([0, 4, 9], dtype=torch.int32)
    out = sage1.sageattn_varlen(q, k, v, cu_q, cu_k, 7, 5, backend="torch")
    assert out.shape == q.shape and torch.isfinite(out).all()
    cu_k0 = torch.tensor([0, 9, 9], dtype=torch.int32)  # the second sequence has no keys: zeros
    out = sage1.sageattn_varlen(q, k, v, cu_q, cu_k0, 7, 9, backend="torch")
    assert (out == 0).all()


def test_device_properties_are_queried_once_per_device(monkeypatch):
    """common.checks.device_capability / sm_count: torch's query costs host time on every attention
    call, so they are cached per device index (a device without an index means the current one)."""
    from types import SimpleNamespace

    from common import checks

    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: asked.append(i) or SimpleNamespace(major=9, minor=i, multi_processor_count=100 + i))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    checks._properties.cache_clear()
    try:
        assert checks.device_capability(torch.device("cuda", 1)) == (9, 1)
        assert checks.sm_count("cuda:1") == 101
        assert checks.device_capability("cuda") == (9, 2) and checks.sm_count(torch.device("cuda")) == 102
        assert asked == [1, 2]
    finally:
        checks._properties.cache_clear()


def test_pick_cuda_follows_the_request_and_the_kernels_cover(monkeypatch):
    """common.build.pick_cuda: "cuda" asked for a call the kernel does not cover names why; "auto"
    (resolved to Triton on a GPU) becomes "cuda" only where the kernel covers the call and builds;
    everything else is left as it was, without asking what the kernel covers."""
    from common import build

    usable = []
    monkeypatch.setattr(build, "usable_for_auto", lambda device, who: usable.append(who) or True)
    dev = torch.device("cpu")
    never = lambda: pytest.fail("asked what the kernel covers")  # noqa: E731
    assert build.pick_cuda("triton", "triton", dev, never, "x") == "triton"
    assert build.pick_cuda("auto", "torch", dev, never, "x") == "torch"
    assert build.pick_cuda("cuda", "cuda", dev, lambda: None, "x") == "cuda"
    with pytest.raises(ValueError, match="backend='cuda' does not support head_dim=256; use backend='triton'"):
        build.pick_cuda("cuda", "cuda", dev, lambda: "head_dim=256", "x")
    assert build.pick_cuda("auto", "triton", dev, lambda: "head_dim=256", "x") == "triton" and usable == []
    assert build.pick_cuda("auto", "triton", dev, lambda: None, "sage3") == "cuda" and usable == ["sage3"]
    monkeypatch.setattr(build, "usable_for_auto", lambda device, who: False)
    assert build.pick_cuda("auto", "triton", dev, lambda: None, "sage3") == "triton"


@pytest.mark.parametrize("generation", ["sage2", "sage3"])
def test_cuda_backend_errors(generation):
    """The generations with a Hopper kernel name what backend='cuda' needs, and every backend."""
    import importlib

    from common.inputs import make_qkv

    sageattn = importlib.import_module(generation).sageattn
    q, k, v = make_qkv(1, 2, 8, 64)
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors, got tensors on cpu"):
        sageattn(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match=r"backend must be one of \['auto', 'cuda', 'triton', 'torch'\]"):
        sageattn(q, k, v, backend="cutlass")
