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


@pytest.fixture
def kernel_device():
    return KERNEL_DEVICE


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
