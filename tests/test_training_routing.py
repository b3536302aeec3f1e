"""Routing for training: topk_gating with capacity and replay, and SparseMoE's capacity factor, router statistics,
aux-loss-free balancing and routing replay."""

import json
import math

import pytest
import torch

import netmerge_fast as nf
from netmerge_fast import reference
from netmerge_fast.nn import SparseMoE
from tests.conftest import available_backends, device_for
from tests.test_apply_capacity import _per_slot_loop
from tests.test_topk_gating import ROUTINGS, _options

BACKENDS = available_backends(["torch", "cpu", "triton"])
LAYER_BACKENDS = available_backends(["torch", "cpu"])


def _probabilities(x, ids, scoring):
    """Each chosen expert's router probability, computed here with plain torch (not the package's helpers)."""
    chosen = x.float().gather(1, ids.long())
    return torch.sigmoid(chosen) if scoring == "sigmoid" else chosen.exp() / x.float().exp().sum(1, keepdim=True)


# ---- topk_gating(..., capacity=) -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", ["token", "score"])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_capacity_drops_what_the_per_slot_loop_drops(scoring, order, backend, gen):
    T, E, k = (48 if backend == "triton" else 120), 8, 2
    x = (torch.randn(T, E, generator=gen) + torch.linspace(0, 1.5, E)).to(device_for(backend))
    weights, ids = nf.topk_gating(x, k, scoring=scoring, backend=backend)
    for capacity in (0, 12, nf.expert_capacity(T, k, E, 1.0), T * k):
        got_w, got_ids = nf.topk_gating(x, k, scoring=scoring, backend=backend, capacity=capacity, capacity_order=order)
        priority = _probabilities(x, ids, scoring).cpu() if order == "score" else None
        want_ids, want_w, _ = _per_slot_loop(ids.cpu(), weights.cpu(), E, capacity, order, priority)
        assert torch.equal(got_ids.cpu(), want_ids)
        torch.testing.assert_close(got_w.cpu(), want_w, rtol=0, atol=0)


def test_score_order_ranks_by_probability_not_by_renormalised_weight():
    """Token 0: 0.5 / 0.3 of the mass on experts 0 / 1; token 1: 0.4 / 0.2. Renormalised, token 1's expert-0 weight
    (0.67) beats token 0's (0.625); by router probability token 0 (0.5) wins the single place."""
    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.4, 0.2, 0.2, 0.2]])
    x = probs.clamp_min(1e-9).log()
    _, ids = nf.topk_gating(x, 2)
    assert ids[:, 0].tolist() == [0, 0]
    _, kept = nf.topk_gating(x, 2, capacity=1, capacity_order="score")
    assert kept[:, 0].tolist() == [0, -1]
    kept, _ = nf.apply_capacity(*reversed(nf.topk_gating(x, 2)), 4, 1, "score")
    assert kept[:, 0].tolist() == [-1, 0], "apply_capacity's default priority is the (renormalised) weight"


@pytest.mark.parametrize("backend", BACKENDS)
def test_capacity_gradients_are_those_of_the_kept_slots(backend, gen):
    x = torch.randn(40, 6, generator=gen, dtype=torch.float32).to(device_for(backend))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    w, ids = nf.topk_gating(x1, 2, backend=backend, capacity=10)
    upstream = torch.randn(40, 2, generator=gen).to(x.device)
    (w * upstream).sum().backward()
    w_full, ids_full = nf.topk_gating(x2, 2, backend=backend)
    kept = (ids == ids_full).float()
    (w_full * upstream * kept).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the cpu backend")
def test_capacity_under_torch_compile(gen):
    torch._dynamo.reset()

    def route(logits):
        return nf.topk_gating(logits, 2, backend="cpu", capacity=9, capacity_order="score")

    x = torch.randn(30, 8, generator=gen)
    compiled = torch.compile(route, fullgraph=True, backend="inductor")
    for got, want in zip(compiled(x), route(x), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


# ---- topk_gating(..., replay_ids=) ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(ROUTINGS))
def test_replaying_the_chosen_ids_gives_the_same_weights_and_gradients(name, backend, gen):
    E, k, _ = ROUTINGS[name]
    device = device_for(backend)
    options = _options(name, E, gen, device)
    x = torch.randn(37, E, generator=gen).to(device)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    weights, ids = nf.topk_gating(x1, k, **options, backend=backend)
    replayed, replay_ids = nf.topk_gating(x2, k, **options, backend=backend, replay_ids=ids)
    assert torch.equal(replay_ids, ids) and replayed.dtype == torch.float32
    torch.testing.assert_close(replayed, weights, rtol=1e-5, atol=1e-6)
    upstream = torch.randn(37, k, generator=gen).to(device)
    (weights * upstream).sum().backward()
    (replayed * upstream).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_replay_of_any_ids_against_float64(scoring, renormalize, gen):
    T, E, k = 25, 10, 3
    x = torch.randn(T, E, generator=gen, dtype=torch.float64)
    ids = torch.randint(-1, E, (T, k), generator=gen)
    w, out_ids = nf.topk_gating(
        x.float(), k, scoring=scoring, renormalize=renormalize, scale=2.5, replay_ids=ids, backend="cpu"
    )
    probs = torch.sigmoid(x) if scoring == "sigmoid" else torch.softmax(x, -1)
    want = probs.gather(1, ids.clamp_min(0)) * (ids >= 0)
    if renormalize:
        want = want / want.sum(-1, keepdim=True)
    torch.testing.assert_close(w.double(), 2.5 * want, rtol=1e-5, atol=1e-7)
    assert torch.equal(out_ids.long(), ids), "ids come back as given, -1 included"


def test_replay_softmax_after_topk_and_gradcheck(gen):
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[4, 0], [1, -1], [2, 3], [0, 1], [3, 4], [2, 2]])
    w, _ = nf.topk_gating(x, 2, softmax_after_topk=True, replay_ids=ids, backend="torch")
    chosen = x.detach().gather(1, ids.clamp_min(0)).masked_fill(ids < 0, -math.inf)
    torch.testing.assert_close(w, torch.softmax(chosen, -1))
    for options in ({"softmax_after_topk": True}, {"scoring": "sigmoid"}, {}):
        fn = lambda t, o=options: nf.topk_gating(t, 2, replay_ids=ids, backend="torch", **o)[0]
        assert torch.autograd.gradcheck(fn, (x,))


@pytest.mark.parametrize(
    "kwargs, exc, needle",
    [
        ({"replay_ids": torch.zeros(4, 2)}, TypeError, "replay_ids"),
        ({"replay_ids": torch.zeros(4, 3, dtype=torch.int64)}, ValueError, r"replay_ids must have shape \[T, k\]"),
        ({"replay_ids": torch.full((4, 2), 6)}, ValueError, r"\[-1, E=6\)"),
        ({"capacity": -1}, ValueError, "capacity"),
        ({"capacity": 1.5}, TypeError, "capacity"),
        ({"capacity_order": "random"}, ValueError, "capacity_order"),
    ],
)
def test_bad_training_arguments_name_themselves(kwargs, exc, needle):
    with pytest.raises(exc, match=needle):
        nf.topk_gating(torch.randn(4, 6), 2, **kwargs)


# ---- SparseMoE -----------------------------------------------------------------------------------------------


def _layer(backend="auto", **options):
    torch.manual_seed(0)
    return SparseMoE(16, 12, 6, 2, backend=backend, **options)


@pytest.mark.parametrize("backend", LAYER_BACKENDS)
@pytest.mark.parametrize("order", ["token", "score"])
def test_capacity_factor_is_the_composition_of_the_ops(order, backend, gen):
    moe = _layer(backend, capacity_factor=0.75, capacity_order=order)
    x = torch.randn(3, 11, 16, generator=gen)
    out = moe(x)
    flat = x.reshape(-1, 16)
    N, k, E = flat.shape[0], 2, 6
    capacity = math.ceil(0.75 * N * k / E)
    logits = moe.gate(flat)
    weights, ids = nf.topk_gating(logits, k, backend="torch")
    priority = _probabilities(logits, ids, "softmax") if order == "score" else None
    kept_ids, kept_w, dropped = _per_slot_loop(ids, weights.detach(), E, capacity, order, priority)
    assert torch.equal(moe.topk_ids, ids) and torch.equal(moe.dispatched_ids.long(), kept_ids.long())
    assert torch.equal(moe.router_stats.dropped, dropped) and dropped.sum() > 0, "the factor binds here"
    assert (moe.router_stats.dispatched <= capacity).all()
    experts = moe.experts
    want = reference.moe_experts(flat, experts.gate_up_proj, experts.down_proj, kept_w, kept_ids)
    torch.testing.assert_close(out.reshape(-1, 16), want, rtol=1e-5, atol=1e-6)
    assert (out.reshape(-1, 16)[(kept_ids < 0).all(1)] == 0).all(), "fully dropped tokens give 0"


def test_switch_top1_drops_the_later_tokens_to_zero(gen):
    moe = SparseMoE(16, 12, 4, 1, renormalize=False, capacity_factor=1.0)
    x = torch.randn(40, 16, generator=gen)
    out = moe(x)
    ids = moe.topk_ids[:, 0].long()
    position = torch.stack([(ids[: t + 1] == ids[t]).sum() for t in range(40)])
    dropped = position > 10  # capacity ceil(1.0 * 40 * 1 / 4)
    assert dropped.any() and torch.equal(moe.dispatched_ids[:, 0] < 0, dropped)
    assert (out[dropped] == 0).all() and (out[~dropped] != 0).all()


@pytest.mark.parametrize("factor", [None, 0, 0.0])
def test_no_capacity_factor_is_dropless(factor, gen):
    moe = _layer(capacity_factor=factor)
    moe(torch.randn(50, 16, generator=gen))
    assert torch.equal(moe.dispatched_ids, moe.topk_ids) and moe.router_stats.dropped.sum() == 0


def test_router_stats(gen):
    moe = _layer()
    moe(torch.randn(40, 16, generator=gen))
    stats = moe.router_stats
    counts = torch.bincount(moe.topk_ids.flatten().long(), minlength=6)
    assert torch.equal(stats.tokens_per_expert, counts) and stats.tokens_per_expert.sum() == 80
    assert stats.dropped.tolist() == [0] * 6 and torch.equal(stats.dispatched, counts)
    c = counts.double()
    torch.testing.assert_close(stats.load_cv, (c.std(correction=0) / c.mean()).float())
    moe(torch.randn(0, 16))
    assert moe.router_stats.load_cv.item() == 0.0 and moe.router_stats.tokens_per_expert.sum() == 0


def test_selection_bias_update_moves_towards_balance(gen):
    moe = _layer(selection_bias=True, bias_update_rate=0.01, scoring="sigmoid")
    bias = moe.gate.e_score_correction_bias
    assert not bias.requires_grad
    x = torch.randn(30, 16, generator=gen)
    moe.train()
    moe(x)
    first = moe.router_stats.tokens_per_expert.clone()
    moe(x[:20])
    total = first + moe.router_stats.tokens_per_expert
    moe.eval()
    moe(torch.randn(30, 16, generator=gen))  # eval forwards do not count
    assert torch.equal(moe.expert_load, total)
    moe.update_selection_bias()
    step = 0.01 * torch.sign(total.double().mean() - total.double()).float()
    torch.testing.assert_close(bias, step, rtol=0, atol=0)
    assert moe.expert_load.sum() == 0, "the loads are cleared"
    moe.update_selection_bias()
    torch.testing.assert_close(bias, step, rtol=0, atol=0), "nothing accumulated: no move"


def test_selection_bias_balances_a_skewed_router(gen):
    """A router frozen towards experts 0 and 1: the bias steps alone bring the load's coefficient of variation down."""
    moe = _layer(selection_bias=True, bias_update_rate=0.005, scoring="sigmoid", router_bias=True)
    with torch.no_grad():
        moe.gate.bias.copy_(torch.tensor([2.0, 1.0, 0.0, 0.0, 0.0, -1.0]))
    x = torch.randn(256, 16, generator=gen)
    cvs = []
    for _ in range(200):
        moe(x)
        cvs.append(moe.router_stats.load_cv.item())
        moe.update_selection_bias()
    assert cvs[0] > 0.8 and max(cvs[-20:]) < 0.15, (cvs[0], cvs[-20:])


def test_selection_bias_state_dict_keeps_hugging_faces_keys():
    moe = _layer(selection_bias=True)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.copy_(torch.arange(6.0))
    state = moe.state_dict()
    assert "gate.e_score_correction_bias" in state and "expert_load" not in state
    fresh = _layer(selection_bias=True)
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(fresh.gate.e_score_correction_bias, torch.arange(6.0))
    with pytest.raises(RuntimeError, match="selection_bias=True"):
        _layer().update_selection_bias()


@pytest.mark.parametrize("backend", LAYER_BACKENDS)
def test_replay_reproduces_the_recorded_routing(backend, gen):
    moe = _layer(backend, capacity_factor=1.25)
    xs = [torch.randn(2, 9, 16, generator=gen) for _ in range(3)]
    with torch.no_grad(), moe.record_routing() as calls:
        outs = [moe(x) for x in xs]
    assert len(calls) == 3 and all(c.shape == (18, 2) for c in calls)
    with torch.no_grad():
        moe.gate.weight.add_(torch.randn(moe.gate.weight.shape, generator=gen))  # routing would change now
    with moe.replay(calls):
        replayed = [moe(x) for x in xs]
        assert torch.equal(moe.topk_ids, calls[-1])
        with pytest.raises(RuntimeError, match="more forward calls"):
            moe(xs[0])
    changed = moe(xs[0])
    assert not torch.equal(moe.topk_ids, calls[0]), "outside the block the router selects again"
    assert not torch.allclose(changed, outs[0])
    replayed[0].sum().backward()
    assert moe.gate.weight.grad.abs().sum() > 0, "gradients reach the router through the replayed weights"
    with torch.no_grad():
        by_argument = moe(xs[1], replay_ids=calls[1])
        with moe.replay(calls[1]):
            by_context = [moe(xs[1]), moe(xs[1])]
    assert torch.equal(moe.topk_ids, calls[1])
    # No gradient: the CPU experts run on packed weights, whose sums round differently from the training path's.
    torch.testing.assert_close(by_argument, replayed[1])
    assert all(torch.equal(c, by_argument) for c in by_context), "one tensor replays every call"


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the cpu backend")
def test_layer_with_capacity_and_selection_bias_compiles_fullgraph(gen):
    torch._dynamo.reset()
    moe = _layer("cpu", capacity_factor=1.0, capacity_order="score", selection_bias=True)
    compiled = torch.compile(moe, fullgraph=True)
    for T in (40, 33):  # a second size: the capacity follows the token count
        x = torch.randn(T, 16, generator=gen)
        eager = moe(x)
        eager_stats, load_before = moe.router_stats, moe.expert_load.clone()
        got = compiled(x)
        torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-6)
        assert all(torch.equal(a, b) for a, b in zip(moe.router_stats[:2], eager_stats[:2], strict=True))
        assert torch.equal(moe.expert_load, load_before + eager_stats.tokens_per_expert), "the buffer is updated"


@pytest.mark.parametrize(
    "kwargs, exc, needle",
    [
        ({"capacity_factor": -1.0}, ValueError, "capacity_factor"),
        ({"capacity_factor": float("nan")}, ValueError, "capacity_factor"),
        ({"capacity_order": "random"}, ValueError, "capacity_order"),
        ({"bias_update_rate": -0.1}, ValueError, "bias_update_rate"),
        ({"bias_update_rate": "fast"}, TypeError, "bias_update_rate"),
    ],
)
def test_bad_layer_arguments_name_themselves(kwargs, exc, needle):
    with pytest.raises(exc, match=needle):
        SparseMoE(16, 8, 4, 2, **kwargs)


# ---- the command line ----------------------------------------------------------------------------------------


def test_bench_capacity_quick(tmp_path, capsys):
    from netmerge_fast import cli

    out = tmp_path / "bench.json"
    assert cli.main(["bench", "capacity", "--quick", "--json", str(out)]) == 0
    assert "x_cumsum" in capsys.readouterr().out
    rows = json.loads(out.read_text())["suites"]["capacity"]
    assert {(row["T"], row["order"]) for row in rows} == {(64, "token"), (64, "score")}
    assert all(row["ours_us"] > 0 and row["x_reference"] > 0 for row in rows)


def test_demo_load_balance_quick(tmp_path, capsys):
    pytest.importorskip("mlxtend")
    from netmerge_fast import cli

    out = tmp_path / "table.json"
    assert cli.main(["demo", "load-balance", "--seeds", "1", "--quick", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| neither |" in printed and "| aux loss |" in printed and "| bias |" in printed
    table = json.loads(out.read_text())
    for runs in table.values():
        (run,) = runs
        assert len(run["cv"]) == 40 and all(cv >= 0 for cv in run["cv"])
        assert 0.5 < run["accuracy"] <= 1.0 and 0 <= run["dropped_at_1.25"] <= 1
