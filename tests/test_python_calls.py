"""The CPU ops' direct Python entries (csrc/python_calls.cpp): the same op through the same dispatcher, so
dispatch modes still see it, results equal torch.ops', and a tensor subclass's __torch_function__ still runs."""

from typing import ClassVar

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import netmerge_fast as nf
from tests.conftest import available_backends

pytestmark = pytest.mark.skipif("cpu" not in available_backends(["cpu"]), reason="the C++ extension is not built")


class SeenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def calls():
    """(name of the op, a public call that reaches it on CPU, the same through torch.ops)."""
    gen = torch.Generator().manual_seed(0)
    T, E, H, inter, k = 5, 16, 32, 24, 4
    logits = torch.randn(T, E, generator=gen)
    hidden = torch.randn(T, H, generator=gen)
    w_gate_up = torch.randn(E, 2 * inter, H, generator=gen) * 0.1
    w_down = torch.randn(E, H, inter, generator=gen) * 0.1
    weights, ids = nf.topk_gating(logits, k, backend="cpu")
    packed = nf.pack_experts(w_gate_up, w_down)
    ops = torch.ops.netmerge
    return [
        (
            "netmerge.topk_gating.default",
            lambda: nf.topk_gating(logits, k, backend="cpu"),
            lambda: ops.topk_gating.default(logits, k, "softmax", True, None, 1, 1, "max", False, 1.0),
        ),
        (
            "netmerge.moe_experts.default",
            lambda: nf.moe_experts(hidden, w_gate_up, w_down, weights, ids, backend="cpu"),
            lambda: ops.moe_experts.default(
                hidden, w_gate_up, w_down, weights, ids, "silu", True, None, None, False, False, False
            )[0],
        ),
        (
            "netmerge.moe_experts_packed.default",
            lambda: nf.moe_experts(hidden, packed, None, weights, ids, backend="cpu"),
            lambda: ops.moe_experts_packed.default(
                hidden, packed.gate_up, packed.down, None, None, inter, 0, weights, ids, "silu", True, None, None, False
            ),
        ),
    ]


@pytest.mark.parametrize("case", range(3))
def test_direct_entry_equals_torch_ops_and_dispatch_modes_see_it(case):
    name, public, through_torch_ops = calls()[case]
    with torch.no_grad():
        expected = through_torch_ops()
        with SeenOps() as mode:
            got = public()
    assert name in mode.seen
    got, expected = (got, expected) if isinstance(got, tuple) else ((got,), (expected,))
    assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


class Tagged(torch.Tensor):
    """A subclass whose __torch_function__ records the functions it sees."""

    seen: ClassVar[list] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(str(func))
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


def test_tensor_subclass_takes_torch_ops_and_its_torch_function_runs():
    logits = torch.randn(4, 16).as_subclass(Tagged)
    Tagged.seen.clear()
    weights, ids = nf.topk_gating(logits, 2, backend="cpu")
    assert "netmerge.topk_gating.default" in Tagged.seen
    expected = nf.topk_gating(logits.as_subclass(torch.Tensor), 2, backend="cpu")
    assert torch.equal(weights, expected[0]) and torch.equal(ids, expected[1])
