"""Test setup: Triton kernels run in Triton's CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is imported, so this happens at collection time.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The device the kernel-vs-emulation tests run on: the GPU when there is one, else the CPU
# (Triton kernels then run in the interpreter).
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
IS_HOPPER = HAS_CUDA and torch.cuda.get_device_capability()[0] == 9
hopper = pytest.mark.skipif(not IS_HOPPER, reason="needs an sm_90 GPU")


def compile_for_hopper(case: str, *, timeout: int = 900, fp_fusion: bool = False) -> None:
    """Run ``tests/compile_for_hopper.py case`` (Triton's front end and ptxas for sm_90, no GPU) in a
    fresh interpreter: under TRITON_INTERPRET=1 kernels are not compilable objects. The repository
    goes on PYTHONPATH, for machines where it is not pip-installed."""
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if fp_fusion:
        env["TRITON_DEFAULT_FP_FUSION"] = "1"
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else root
    r = subprocess.run([sys.executable, str(Path(__file__).parent / "compile_for_hopper.py"), case],
                       capture_output=True, text=True, env=env, timeout=timeout)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def kernel_vs_emulation(sageattn, q, k, v, *, tensor_layout, is_causal, kernel_backend="triton", **opts):
    """Run a generation's Triton kernel and its emulation on the same inputs, check that their LSEs
    are finite on the same rows and agree within 1e-3 there, and return the output accuracies
    (kernel vs emulation, emulation vs exact attention) for the caller's bound."""
    from common.metrics import accuracy
    from common.reference import attention_reference

    kw = dict(tensor_layout=tensor_layout, is_causal=is_causal, return_lse=True, **opts)
    out_k, lse_k = sageattn(q, k, v, backend=kernel_backend, **kw)
    out_e, lse_e = sageattn(q, k, v, backend="torch", **kw)
    fin = torch.isfinite(lse_e)
    assert torch.equal(torch.isfinite(lse_k), fin)
    assert (lse_k - lse_e)[fin].abs().max() < 1e-3
    ref = attention_reference(q, k, v, tensor_layout=tensor_layout, is_causal=is_causal)
    return accuracy(out_e.double(), out_k), accuracy(ref, out_e)


def check_compile_and_cuda_graph(sageattn, **kw):
    """``torch.compile(fullgraph=True)`` over a function calling ``sageattn(q, k, v, **kw)`` gives the
    eager result, and a CUDA-graph capture of the call replays on new values of q (GPU)."""
    from common.inputs import make_qkv
    from common.timing import graph_replay

    q, k, v = make_qkv(2, 4, 512, 128, device="cuda", seed=2)
    eager = sageattn(q, k, v, **kw)
    compiled = torch.compile(lambda q, k, v: sageattn(q, k, v, **kw) * 2, fullgraph=True)
    assert torch.equal(compiled(q, k, v), eager * 2)
    held = {}
    replay = graph_replay(lambda: held.update(out=sageattn(q, k, v, **kw)))
    q.copy_(make_qkv(2, 4, 512, 128, device="cuda", seed=3)[0])
    replay()
    assert torch.equal(held["out"], sageattn(q, k, v, **kw))


def check_auto_picks_cuda(sageattn, cuda_module, monkeypatch, reason, uncovered_head_dim=64, **uncovered_kw):
    """On Hopper, ``backend="auto"`` launches ``cuda_module`` for a call it covers, and neither for
    one it does not (head dim ``uncovered_head_dim``, options ``uncovered_kw``: Triton runs) nor with
    ``SAGE_DISABLE_CUDA=1``; ``backend="cuda"`` on the uncovered call names ``reason`` (GPU)."""
    from common.inputs import make_qkv

    calls = []
    real = cuda_module.launch
    monkeypatch.setattr(cuda_module, "launch", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = make_qkv(1, 2, 256, 64, device="cuda")
    sageattn(q, k, v)
    assert calls == [1]
    uq, uk, uv = (q, k, v) if uncovered_head_dim == 64 else make_qkv(1, 2, 256, uncovered_head_dim, device="cuda")
    sageattn(uq, uk, uv, **uncovered_kw)  # not covered: Triton
    assert calls == [1]
    monkeypatch.setenv("SAGE_DISABLE_CUDA", "1")
    sageattn(q, k, v)
    assert calls == [1]
    with pytest.raises(ValueError, match=f"backend='cuda' does not support {reason}"):
        sageattn(uq, uk, uv, **uncovered_kw, backend="cuda")


@pytest.fixture
def kernel_device():
    return KERNEL_DEVICE


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
