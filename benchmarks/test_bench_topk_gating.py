"""pytest-benchmark: topk_gating against eager and compiled PyTorch, in one process.

    pytest benchmarks/test_bench_topk_gating.py --benchmark-enable --benchmark-group-by=group

Each group is one (shape, T); compare the rows of a group (baseline / ours is the figure that matters).
The same cases, with the ratios computed, print with ``netmerge-fast bench topk``.
"""

import pytest
import torch

import netmerge_fast as nf
from netmerge_fast import reference
from netmerge_fast.bench.topk import SHAPES, TOKENS, hf_eager

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = ("ours", "reference", "hf_eager", "reference_compiled", "hf_compiled")


_compiled: dict[tuple[str, str], object] = {}


def implementation(shape, impl):
    options = dict(shape.options)
    if impl == "ours":
        return lambda x, bias: nf.topk_gating(x, shape.k, bias=bias, **options)
    eager = (
        hf_eager(shape)
        if impl.startswith("hf")
        else (lambda x, bias: reference.topk_gating(x, shape.k, bias=bias, **options))
    )
    if not impl.endswith("compiled"):
        return eager
    if (shape.name, impl) not in _compiled:  # compile once per shape, not once per T
        _compiled[shape.name, impl] = torch.compile(eager, dynamic=True)
    return _compiled[shape.name, impl]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name.replace(" ", "-"))
def test_topk_gating(benchmark, shape, T, impl):
    torch.manual_seed(0)
    x = torch.randn(T, shape.num_experts, device=DEVICE)
    bias = torch.randn(shape.num_experts, device=DEVICE) * 0.1 if shape.bias else None
    fn = implementation(shape, impl)
    benchmark.group = f"topk {shape.name} T={T}"
    benchmark.extra_info["impl"] = impl
    benchmark(fn, x, bias)
