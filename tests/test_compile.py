"""The public kernels under torch.compile (fullgraph: no graph break) and CUDA-graph capture."""

import pytest
import torch

import sage1
import sage2
import sage3
from common.inputs import make_qkv
from conftest import gpu

CALLS = {
    "sage1": lambda q, k, v: sage1.sageattn(q, k, v, is_causal=True),
    "sage1_mask": lambda q, k, v: sage1.sageattn(q, k, v, attn_mask=torch.ones(q.shape[2], k.shape[2],
                                                                               dtype=torch.bool).tril()),
    "sage2_8b": lambda q, k, v: sage2.sageattn(q, k, v),
    "sage2_4b": lambda q, k, v: sage2.sageattn(q, k, v, qk_dtype="int4", smooth_v=True),
    "sage3": lambda q, k, v: sage3.sageattn(q, k, v, is_causal=True),
}


class TinyAttentionBlock(torch.nn.Module):
    def __init__(self, attend, d=64, heads=2):
        super().__init__()
        torch.manual_seed(0)
        self.qkv, self.heads, self.attend = torch.nn.Linear(d, 3 * d), heads, attend

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4).to(torch.float16)
        return self.attend(q, k, v).float().transpose(1, 2).reshape(B, N, D) + x


@pytest.mark.parametrize("name", CALLS)
def test_fullgraph_compile_matches_eager(name):
    torch._dynamo.reset()
    m = TinyAttentionBlock(CALLS[name])
    x = torch.randn(2, 40, 64)
    with torch.no_grad():
        eager = m(x)
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")(x)  # raises on any graph break
    assert torch.equal(eager, compiled)


def test_inductor_compile_matches_eager(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    m = TinyAttentionBlock(CALLS["sage2_8b"])
    x = torch.randn(2, 40, 64)
    with torch.no_grad():
        assert torch.equal(m(x), torch.compile(m, fullgraph=True)(x))


def test_compiled_call_checks_inputs_at_compile_time():
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v: sage1.sageattn(q, k, v), fullgraph=True, backend="aot_eager")
    q = torch.randn(1, 4, 8, 64, dtype=torch.float16)
    k = torch.randn(1, 3, 8, 64, dtype=torch.float16)
    with pytest.raises(Exception, match="multiple of the number of key/value heads"):
        f(q, k, k)


@pytest.mark.parametrize("name, op_kwargs", [
    ("sage1", dict(attn_mask=None, smooth_k=True, pv_accum="fp16", qk_granularity="per_block")),
    ("sage2", dict(attn_mask=None, qk_dtype="int4", qk_granularity="per_thread", smooth_q=None, smooth_k=True,
                   smooth_v=False, pv_dtype="fp8_e4m3", pv_accum="two_level")),
    ("sage3", dict(scale_format="nvfp4", two_level_p=True, smooth_q=True, smooth_k=True, global_scale=True)),
])
@pytest.mark.parametrize("return_lse", [False, True])
def test_custom_op_fake_and_real_agree(name, op_kwargs, return_lse):
    mod = {"sage1": sage1, "sage2": sage2, "sage3": sage3}[name]
    q, k, v = make_qkv(1, 4, 48, 64, heads_kv=2, seqlen_k=80, layout="NHD")
    args = (q, k, v, "NHD", False, None, return_lse, "torch", *op_kwargs.values())
    torch.library.opcheck(mod.interface._OP.op, args, test_utils=("test_schema", "test_faketensor"))


@gpu
@pytest.mark.parametrize("name", CALLS)
def test_cuda_graph_capture_and_replay(name):
    q, k, v = make_qkv(2, 4, 300, 128, kind="k_bias", device="cuda", seed=1)
    fn = CALLS[name]
    if name == "sage1_mask":
        mask = torch.ones(300, 300, dtype=torch.bool, device="cuda").tril()
        fn = lambda q, k, v: sage1.sageattn(q, k, v, attn_mask=mask)  # noqa: E731
    assert_graph_replay_matches_eager(fn, (q, k, v), make_qkv(2, 4, 300, 128, kind="k_bias", device="cuda", seed=2))


def assert_graph_replay_matches_eager(fn, inputs, new_inputs):
    """Capture fn(*inputs) in a CUDA graph, copy new_inputs into the captured tensors, replay, and
    compare with an eager call on the new inputs."""
    fn(*inputs)  # compile the kernels outside the capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(*inputs)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn(*inputs)
    for t, new in zip(inputs, new_inputs):
        t.copy_(new)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, fn(*new_inputs))


def test_sageattn_train_compiles_fullgraph_with_the_same_gradients():
    """SageBwd under torch.compile: forward and backward are custom ops with a registered autograd
    formula; the compiled training step gives the eager step's loss and gradients exactly."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = torch.nn.Linear(64, 192)

        def forward(self, x):
            q, k, v = self.lin(x).view(2, 40, 3, 2, 32).permute(2, 0, 3, 1, 4).to(torch.bfloat16)
            return sage3.sageattn_train(q, k, v, is_causal=True).float().pow(2).mean()

    x = torch.randn(2, 40, 64)
    m = Block()
    loss = m(x)
    loss.backward()
    grad = m.lin.weight.grad.clone()
    m.zero_grad()
    torch._dynamo.reset()
    loss_c = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    loss_c.backward()
    assert torch.equal(loss, loss_c) and torch.equal(grad, m.lin.weight.grad)


def test_sagebwd_custom_ops_fake_and_real_agree():
    q, k, v = make_qkv(1, 4, 48, 64, heads_kv=2, seqlen_k=80)
    opts = ("HND", True, 0.125, "torch", False, True)
    torch.library.opcheck(torch.ops.sageattn_repro.sagebwd_fwd, (q, k, v, *opts),
                          test_utils=("test_schema", "test_faketensor"))
    out, o_pad, lse2 = torch.ops.sageattn_repro.sagebwd_fwd(q, k, v, *opts)
    torch.library.opcheck(torch.ops.sageattn_repro.sagebwd_bwd, (torch.randn_like(out), q, k, v, o_pad, lse2, *opts),
                          test_utils=("test_schema", "test_faketensor"))


DECODE_CALLS = {"sage1": lambda q, k, v: sage1.sageattn(q, k, v, is_causal=True),
                "sage2_8b": lambda q, k, v: sage2.sageattn(q, k, v, return_lse=True)[0]}


@pytest.mark.parametrize("name", DECODE_CALLS)
def test_decode_compiles_fullgraph(name):
    """The decode path (Nq <= 16, common.decode) behind the same custom ops."""
    torch._dynamo.reset()
    q, k, v = make_qkv(1, 8, 1, 64, heads_kv=2, seqlen_k=200, kind="k_bias", seed=3)
    fn = DECODE_CALLS[name]
    eager = fn(q, k, v)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v)
    assert torch.equal(eager, compiled)


@gpu
@pytest.mark.parametrize("name", DECODE_CALLS)
def test_decode_cuda_graph_capture_and_replay(name):
    """(Deterministic algorithms: the CUDA decode kernel's dynamic tile claims otherwise add a KV
    head's tiles in the order its programs get to them, and replay and eager differ in the last bits.)"""
    shape = dict(heads_kv=8, seqlen_k=3000, kind="k_bias", device="cuda")
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        assert_graph_replay_matches_eager(DECODE_CALLS[name], make_qkv(2, 32, 1, 128, seed=1, **shape),
                                          make_qkv(2, 32, 1, 128, seed=2, **shape))
    finally:
        torch.use_deterministic_algorithms(was)


@pytest.mark.parametrize("gen,backend", [("sage1", "torch"), ("sage1", "triton"), ("sage2", "torch"),
                                         ("sage2", "triton")])
def test_varlen_compiles_fullgraph(gen, backend):
    """sageattn_varlen behind its own custom op: the offsets are read only where the op runs (a
    review: tracing into it failed on a data-dependent guard). Uneven lengths, with the LSE."""
    torch._dynamo.reset()
    mod = sage1 if gen == "sage1" else sage2
    lens = [37, 5, 64]
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(sum(lens), 2, 64, generator=g).half() for _ in range(3))
    cu = torch.tensor([0, 37, 42, 106], dtype=torch.int32)

    def fn(q, k, v, cu):
        out, lse = mod.sageattn_varlen(q, k, v, cu, cu, 64, 64, is_causal=True, return_lse=True, backend=backend)
        return out * 2, lse

    eager = fn(q, k, v, cu)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v, cu)
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])
    # the fake's shapes and strides are the real op's (aot_eager does not compare strides; inductor
    # does, and failed on the LSE, a transposed gather, before it was made contiguous)
    import inspect

    params = inspect.signature(mod.sageattn).parameters
    options = tuple(params[n].default for n, _ in mod.interface._OPTIONS)
    torch.library.opcheck(getattr(torch.ops.sageattn_repro, f"{gen}_varlen").default,
                          (q, k, v, cu, cu, 64, 64, True, None, True, backend) + options,
                          test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(Exception, match="unexpected options"):
        torch.compile(lambda q: mod.sageattn_varlen(q, k, v, cu, cu, 64, 64, tensor_layout="NHD"),
                      fullgraph=True, backend="aot_eager")(q)
