import os
import zlib

import pytest
import torch

# Without a GPU, Triton kernels run on CPU tensors through the interpreter; this must be set before any
# Triton kernel module is imported (netmerge_fast imports them lazily).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import netmerge_fast


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture
def gen(request):
    """A generator seeded from the test's id: fresh inputs per case, reproducible run to run."""
    g = torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
    return g


def available_backends(op_backends):
    status = netmerge_fast.backends()
    return [b for b in op_backends if b == "torch" or status[b].available]


def device_for(backend):
    if backend in ("triton", "cuda") and torch.cuda.is_available():
        return "cuda"
    return "cpu"
