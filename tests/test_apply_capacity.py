"""apply_capacity on every backend against an independent per-slot loop, and the reference against it too."""

import math

import pytest
import torch

import netmerge_fast as nf
from netmerge_fast import reference
from tests.conftest import available_backends, device_for

BACKENDS = available_backends(["torch", "cpu", "triton"])
ORDERS = ["token", "score"]


def _per_slot_loop(ids, weights, E, capacity, order, priority=None, group_size=None):
    """The definition, one slot at a time: in each group of ``group_size`` tokens, visit the slots in the order's
    sequence; an expert takes a slot while it has room."""
    T, k = ids.shape
    flat_ids = ids.reshape(-1).tolist()
    flat_w = weights.reshape(-1).tolist()
    p = (weights if priority is None else priority).float().reshape(-1).tolist()
    p = [-math.inf if math.isnan(v) else v for v in p]
    rows = group_size or max(T, 1)
    dropped = [0] * E
    for start in range(0, T, rows):
        slots = list(range(start * k, min(T, start + rows) * k))
        if order == "score":
            slots.sort(key=lambda s: (-p[s], s))
        taken = [0] * E
        for s in slots:
            e = flat_ids[s]
            if 0 <= e < E:
                taken[e] += 1
                if taken[e] > capacity:
                    flat_ids[s], flat_w[s] = -1, 0.0
                    dropped[e] += 1
    return (
        torch.tensor(flat_ids, dtype=ids.dtype).view(ids.shape),
        torch.tensor(flat_w, dtype=weights.dtype).view(weights.shape),
        torch.tensor(dropped, dtype=torch.int64),
    )


def _routing(gen, T, k, E, routed_nowhere=0.1, weight_dtype=torch.float32):
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]) if T else torch.zeros(0, k)
    ids = torch.where(torch.rand(T, k, generator=gen) < routed_nowhere, -1, ids.long())
    weights = torch.rand(T, k, generator=gen).to(weight_dtype)
    return ids, weights


def _check(backend, ids, weights, E, capacity, order, priority=None, group_size=None):
    device = device_for(backend)
    want = _per_slot_loop(ids, weights, E, capacity, order, priority, group_size)
    got = nf.apply_capacity(
        ids.to(device),
        weights.to(device),
        E,
        capacity,
        order,
        backend,
        priority=None if priority is None else priority.to(device),
        group_size=group_size,
        return_dropped=True,
    )
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g.cpu(), w, rtol=0, atol=0)


def test_reference_matches_the_per_slot_loop(gen):
    ids, weights = _routing(gen, 300, 3, 11)
    for order in ORDERS:
        for capacity in (0, 1, 40, 81, 900):
            want = _per_slot_loop(ids, weights, 11, capacity, order)
            got = reference.apply_capacity(ids, weights, 11, capacity, order, weights if order == "score" else None)
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", ORDERS)
def test_capacity_per_group_of_tokens(order, backend, gen):
    """Switch's per-sequence capacity: [batch * sequence, k] with group_size = sequence; the last group shorter."""
    ids, weights = _routing(gen, 4 * 7 + 3, 2, 5)
    for group_size in (1, 7, 31, 100):
        for capacity in (0, 1, 3):
            _check(backend, ids, weights, 5, capacity, order, group_size=group_size)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("T,k,E", [(0, 2, 4), (1, 1, 1), (1, 4, 4), (7, 2, 3), (64, 2, 8), (129, 4, 60), (40, 8, 8)])
def test_matches_the_per_slot_loop(T, k, E, order, backend, gen):
    ids, weights = _routing(gen, T, k, E)
    mean_load = T * k / E
    capacities = {0, 1, math.ceil(mean_load), math.ceil(1.25 * mean_load), T * k, 2**40}
    if backend == "triton":  # the interpreter runs score order's bisection slowly: the cases that differ most
        capacities = {0, math.ceil(1.25 * mean_load), 2**40}
    for capacity in sorted(capacities):
        _check(backend, ids, weights, E, capacity, order)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_dtypes_are_kept(backend, id_dtype, weight_dtype, gen):
    ids, weights = _routing(gen, 50, 2, 6, weight_dtype=weight_dtype)
    for order in ORDERS:
        _check(backend, ids.to(id_dtype), weights, 6, 9, order)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adversarial_priorities(backend, gen):
    """Ties (few distinct values), ±0, ±inf and NaN priorities: the order is total, the answer the loop's."""
    T, k, E = 97, 3, 5
    ids, weights = _routing(gen, T, k, E, routed_nowhere=0.3)
    levels = torch.tensor([0.0, -0.0, 0.5, 0.5, float("inf"), float("-inf"), float("nan"), 1.0])
    priority = levels[torch.randint(0, len(levels), (T, k), generator=gen)]
    for capacity in (0, 3, 20, 60):
        _check(backend, ids, weights, E, capacity, "score", priority)
        _check(backend, ids, priority.nan_to_num(0.0), E, capacity, "score")  # ties in the weights themselves


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", ORDERS)
def test_everything_to_one_expert_and_nothing_routed(backend, order):
    device = device_for(backend)
    ids = torch.full((6, 2), 2, device=device)
    weights = torch.ones(6, 2, device=device)
    out, w, dropped = nf.apply_capacity(ids, weights, 4, 5, order, backend, return_dropped=True)
    assert out.cpu().flatten().tolist() == [2] * 5 + [-1] * 7 and dropped.tolist() == [0, 0, 7, 0]
    assert w.cpu().flatten().tolist() == [1.0] * 5 + [0.0] * 7
    nowhere = torch.full((3, 2), -1, device=device)
    out, w, dropped = nf.apply_capacity(nowhere, weights[:3] * 0.5, 4, 0, order, backend, return_dropped=True)
    assert (out == -1).all() and (w == 0.5).all() and dropped.tolist() == [0] * 4, "routed nowhere stays as it was"


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("order", ORDERS)
def test_large_batch(backend, order, gen):
    """Past the CPU kernel's parallel chunk size (2^16 slots), and capacities that bind for some experts only."""
    T, k, E = 33_000, 2, 16
    logits = torch.randn(T, E, generator=gen) + torch.linspace(0, 2, E)
    weights, ids = nf.topk_gating(logits, k, backend="torch")
    for capacity in (0, nf.expert_capacity(T, k, E, 1.0), nf.expert_capacity(T, k, E, 2.0)):
        _check(backend, ids, weights, E, capacity, order)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b == "triton"])
def test_triton_past_one_block(backend, gen):
    ids, weights = _routing(gen, 1500, 2, 3)
    for order in ORDERS:
        for capacity in (0, 700, 999):
            _check(backend, ids, weights, 3, capacity, order)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend, gen):
    ids, weights = _routing(gen, 40, 6, 8)
    device = device_for(backend)
    strided_ids, strided_w = ids.to(device)[:, ::2], weights.to(device)[:, ::2]
    for order in ORDERS:
        got = nf.apply_capacity(strided_ids, strided_w, 8, 4, order, backend, return_dropped=True)
        want = _per_slot_loop(ids[:, ::2], weights[:, ::2], 8, 4, order)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g.cpu(), w, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_flows_through_the_kept_slots(backend, gen):
    ids, weights = _routing(gen, 30, 2, 4)
    w = weights.to(device_for(backend)).requires_grad_()
    out_ids, out_w = nf.apply_capacity(ids.to(w.device), w, 4, 6, "score", backend)
    out_w.sum().backward()
    assert torch.equal(w.grad.cpu(), (out_ids.cpu() == ids).float())


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the cpu backend")
@pytest.mark.parametrize("order", ORDERS)
def test_torch_compile_fullgraph(order, gen):
    torch._dynamo.reset()

    def route(ids, weights):
        ids, weights, dropped = nf.apply_capacity(ids, weights, 8, 5, order, "cpu", return_dropped=True)
        return ids, weights * 2, dropped

    ids, weights = _routing(gen, 33, 2, 8)
    compiled = torch.compile(route, fullgraph=True, backend="inductor")
    for got, want in zip(compiled(ids, weights), route(ids, weights), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeatable(backend, gen):
    ids, weights = _routing(gen, 200, 4, 16)
    device = device_for(backend)
    first = nf.apply_capacity(ids.to(device), weights.to(device), 16, 100, "score", backend)
    second = nf.apply_capacity(ids.to(device), weights.to(device), 16, 100, "score", backend)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    # and right: the per-slot loop's answer
    for got, want in zip(first, _per_slot_loop(ids, weights, 16, 100, "score")[:2], strict=True):
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)


def test_expert_capacity_is_switchs_formula():
    assert nf.expert_capacity(1024, 2, 8, 1.25) == 320
    assert nf.expert_capacity(10, 1, 4, 1.0) == 3
    assert nf.expert_capacity(10, 1, 4, 0) is None and nf.expert_capacity(10, 1, 4, None) is None


@pytest.mark.parametrize(
    "kwargs, exc, needle",
    [
        ({"topk_ids": torch.zeros(4, 2)}, TypeError, "topk_ids"),
        ({"topk_ids": torch.zeros(4, 2, dtype=torch.int16)}, TypeError, "int32 or int64"),
        ({"topk_ids": torch.zeros(8, dtype=torch.int64)}, ValueError, "topk_ids"),
        ({"topk_ids": torch.full((4, 2), 3)}, ValueError, r"\[-1, E=3\)"),
        ({"topk_ids": torch.full((4, 2), -2)}, ValueError, "topk_ids"),
        ({"topk_weights": torch.ones(4, 3)}, ValueError, "topk_weights"),
        ({"topk_weights": torch.ones(4, 2, dtype=torch.int64)}, TypeError, "topk_weights"),
        ({"num_experts": 0}, ValueError, "num_experts"),
        ({"capacity": -1}, ValueError, "capacity"),
        ({"capacity": 2.5}, TypeError, "capacity"),
        ({"order": "random"}, ValueError, "order"),
        ({"priority": torch.ones(4, 2)}, ValueError, "priority"),
        ({"order": "score", "priority": torch.ones(4, 1)}, ValueError, "priority"),
        ({"return_dropped": 1}, TypeError, "return_dropped"),
        ({"group_size": 0}, ValueError, "group_size"),
        ({"backend": "cuda"}, ValueError, "backend"),
    ],
)
def test_bad_input_names_the_argument(kwargs, exc, needle):
    args = {"topk_ids": torch.zeros(4, 2, dtype=torch.int64), "topk_weights": torch.ones(4, 2), "num_experts": 3}
    args.update({"capacity": 2, **kwargs})
    with pytest.raises(exc, match=needle):
        nf.apply_capacity(**args)
