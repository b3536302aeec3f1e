"""pytest-benchmark: moe_experts and the SparseMoE layer against their baselines, in one process.

    pytest benchmarks/test_bench_dispatch.py --benchmark-enable --benchmark-group-by=group

Each group is one (shape, T, dtype); compare the rows of a group (baseline / ours is the figure that matters).
The same cases, with the ratios and the fraction of the machine's limit computed, print with
``netmerge-fast bench dispatch layer``.
"""

import pytest
import torch

import netmerge_fast as nf
from netmerge_fast import reference
from netmerge_fast.bench.dispatch import (
    SHAPES,
    TOKENS,
    cycle_calls,
    hf_call,
    hf_experts,
    rotating_routings,
    torch_grouped_mm_pipeline,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = ("ours", "ours_int8", "unpacked", "reference", "hf_eager", "hf_grouped_mm", "torch_grouped_mm")
_weights: dict = {}


def weights(shape, dtype):
    key = (shape, dtype)
    if key not in _weights:
        _weights.clear()  # one shape's weights at a time
        g = torch.Generator().manual_seed(0)
        E, H, inter = shape.num_experts, shape.hidden, shape.intermediate
        _weights[key] = (
            (torch.randn(E, 2 * inter, H, generator=g) * H**-0.5).to(dtype).to(DEVICE),
            (torch.randn(E, H, inter, generator=g) * inter**-0.5).to(dtype).to(DEVICE),
        )
    return _weights[key]


def implementation(name, shape, w_gate_up, w_down):
    if name in ("ours", "ours_int8") and DEVICE == "cpu":  # CPU inference runs on weights packed once
        packed = nf.pack_experts(w_gate_up, w_down, quantize="int8" if name == "ours_int8" else None)
        return lambda h, w, i: nf.moe_experts(h, packed, None, w, i)
    if name == "ours_int8":
        pytest.skip("int8 experts run on CPU")
    if name in ("ours", "unpacked"):
        return lambda h, w, i: nf.moe_experts(h, w_gate_up, w_down, w, i)
    if name == "reference":
        return lambda h, w, i: reference.moe_experts(h, w_gate_up, w_down, w, i)
    if name == "torch_grouped_mm":
        if not hasattr(torch, "_grouped_mm"):
            pytest.skip("torch has no _grouped_mm")
        return torch_grouped_mm_pipeline(w_gate_up, w_down)
    experts = hf_experts(shape, w_gate_up, w_down)
    if experts is None:
        pytest.skip("transformers is not installed")
    return hf_call(experts, name.removeprefix("hf_"))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name.replace(" ", "-"))
def test_moe_experts(benchmark, shape, T, dtype, impl):
    w_gate_up, w_down = weights(shape, dtype)
    g = torch.Generator().manual_seed(1)
    count = max(1, -(-2 * shape.num_experts // (T * shape.k))) if T <= 8 else 1
    inputs = [
        (
            torch.randn(T, shape.hidden, generator=g).to(dtype).to(DEVICE),
            torch.softmax(torch.randn(T, shape.k, generator=g), -1).to(DEVICE),
            ids.to(DEVICE),
        )
        for ids in rotating_routings(shape, T, count, g)
    ]
    benchmark.group = f"moe_experts {shape.name} T={T} {dtype}"
    benchmark.extra_info["impl"] = impl
    with torch.no_grad():
        benchmark(cycle_calls(implementation(impl, shape, w_gate_up, w_down), inputs))
