"""pytest-benchmark: grouped_linear and the MixtureLayer against their baselines, in one process, forward and
backward (a training step's work).

    pytest benchmarks/test_bench_grouped_linear.py --benchmark-enable --benchmark-group-by=group

Each group is one case; compare the rows of a group (baseline / ours is the figure that matters). Shapes: the
Deep MoE paper's first layer (1296 -> 4 x 100, batch 100) and a wider one (1024 -> 16 x 512, batch 512).
"""

import pytest
import torch
from torch import nn

import netmerge_fast as nf
from netmerge_fast import reference
from netmerge_fast.nn import MixtureLayer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (name, T, in, out, E)
SHAPES = [("deep-moe-layer1", 100, 1296, 100, 4), ("wide", 512, 1024, 512, 16)]


def _inputs(T, n_in, n_out, E, k):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, n_in, generator=g).to(DEVICE)
    weight = (torch.randn(E, n_out, n_in, generator=g) * n_in**-0.5).to(DEVICE).requires_grad_()
    bias = torch.zeros(E, n_out, device=DEVICE, requires_grad=True)
    weights, ids = nf.topk_gating(torch.randn(T, E, generator=g).to(DEVICE), k)
    return x, weight, bias, weights, ids


def _step(fn):
    def run():
        fn().sum().backward()

    return run


@pytest.mark.parametrize("impl", ["ours", "reference"])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s[0])
def test_grouped_linear_forward_backward(benchmark, shape, k, impl):
    name, T, n_in, n_out, E = shape
    x, weight, bias, weights, ids = _inputs(T, n_in, n_out, E, k)
    op = nf.grouped_linear if impl == "ours" else reference.grouped_linear
    benchmark.group = f"grouped_linear {name} k={k}"
    benchmark(_step(lambda: op(x, weight, bias, weights, ids, activation="relu")))


class _ExpertLoop(nn.Module):
    """The dense mixture written the obvious way: one nn.Linear per expert, a Python loop over them."""

    def __init__(self, layer: MixtureLayer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        layer = self.layer
        probs = torch.softmax(layer.gate(x), -1)
        pairs = zip(layer.expert_weight, layer.expert_bias, strict=True)
        experts = [torch.relu(nn.functional.linear(x, w, b)) for w, b in pairs]
        return sum(probs[:, i, None] * e for i, e in enumerate(experts))


@pytest.mark.parametrize("impl", ["ours", "expert_loop"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s[0])
def test_dense_mixture_layer_forward_backward(benchmark, shape, impl):
    name, T, n_in, n_out, E = shape
    layer = MixtureLayer(n_in, n_out, E).to(DEVICE)
    module = layer if impl == "ours" else _ExpertLoop(layer)
    x = torch.randn(T, n_in, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    torch.testing.assert_close(module(x), layer(x))
    benchmark.group = f"MixtureLayer dense {name}"
    benchmark(_step(lambda: module(x)))
