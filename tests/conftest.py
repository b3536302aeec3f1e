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


ROUTING_EDGE_CASES = [
    "all_to_one_expert",
    "experts_without_tokens",
    "routed_nowhere",
    "row_routed_nowhere",
    "repeated_id",
]


def routing_edge_case_ids(case, gen, T, k, E):
    """[T, k] expert ids for one of ROUTING_EDGE_CASES (E >= 6)."""
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    if case == "all_to_one_expert":
        ids = torch.full((T, k), 3)
    elif case == "experts_without_tokens":
        ids = torch.where(ids < 4, 0, 5)
    elif case == "routed_nowhere":
        ids[::3, 1] = -1
    elif case == "row_routed_nowhere":
        ids[4] = -1
    else:
        ids[:, 1] = ids[:, 0]  # the same expert twice for a token: both slots count
    return ids
