"""MixtureLayer and DeepMoE (Eigen et al. 2013): the dense mixture against explicit loops, top_k=E sparse = dense
with gradients, the balancing constraint on hand-made gate outputs, device-side totals, errors."""

import math

import pytest
import torch
from torch import nn

import netmerge_fast.nn as nfnn
from netmerge_fast import reference
from netmerge_fast.nn import DeepMoE, MixtureLayer
from tests.conftest import available_backends, device_for

BACKENDS = available_backends(["torch", "cpu", "triton"])


def _expert(layer, i, x):
    return reference.linear_activation(layer.activation, x @ layer.expert_weight[i].T + layer.expert_bias[i])


def dense_loop(layer, x):
    """z = sum_i softmax(gate(x))_i * f_i(x), one input and one expert at a time."""
    flat = x.flatten(1)
    rows = []
    for b in range(flat.shape[0]):
        g = torch.softmax(layer.gate(flat[b : b + 1])[0], 0)
        rows.append(sum(g[i] * _expert(layer, i, flat[b]) for i in range(layer.num_experts)))
    return torch.stack(rows) if rows else flat.new_zeros(0, layer.out_features)


def sparse_loop(layer, x, k, renormalize=True):
    """The k largest gate values, renormalised (ties to the lower index) unless told not to; only those experts
    run."""
    flat = x.flatten(1)
    rows = []
    for b in range(flat.shape[0]):
        g = torch.softmax(layer.gate(flat[b : b + 1])[0], 0)
        top = sorted(range(layer.num_experts), key=lambda i: (-float(g[i].detach()), i))[:k]
        total = sum(g[i] for i in top) if renormalize else 1.0
        rows.append(sum(g[i] / total * _expert(layer, i, flat[b]) for i in top))
    return torch.stack(rows)


@pytest.mark.parametrize("activation", ["relu", "none", "gelu"])
@pytest.mark.parametrize("shape", [(0, 12), (1, 12), (9, 3, 4)], ids=lambda s: "x".join(map(str, s)))
def test_dense_mixture_is_the_explicit_loop(shape, activation, gen):
    torch.manual_seed(0)
    layer = MixtureLayer(12, 7, num_experts=3, gate_hidden=5, activation=activation).double()
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    out = layer(x)
    assert out.shape == (shape[0], 7) and out.dtype == torch.float64
    torch.testing.assert_close(out, dense_loop(layer, x))
    assert layer.gate_probs.shape == (shape[0], 3) and layer.topk_ids is None and layer.topk_weights is None
    if shape[0]:
        torch.testing.assert_close(layer.gate_probs.sum(1), torch.ones(shape[0], dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 2])
def test_sparse_mixture_is_the_explicit_loop(k, backend, gen):
    torch.manual_seed(1)
    layer = MixtureLayer(10, 6, num_experts=4, gate_hidden=8, top_k=k, backend=backend)
    x = torch.randn(13, 10, generator=gen)
    out = layer.to(device_for(backend))(x.to(device_for(backend))).cpu()
    layer.cpu()
    torch.testing.assert_close(out, sparse_loop(layer, x, k), rtol=1e-4, atol=1e-5)
    assert layer.topk_ids.shape == (13, k) and layer.topk_ids.dtype == torch.int32
    assert layer.topk_weights.shape == (13, k) and layer.gate_probs.shape == (13, 4)
    torch.testing.assert_close(layer.topk_ids.long().cpu(), layer.gate_probs.cpu().topk(k, 1).indices)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 3])
def test_unrenormalised_sparse_mixture_is_the_explicit_loop_and_trains_the_gate(k, backend, gen):
    torch.manual_seed(2)
    layer = MixtureLayer(10, 6, num_experts=4, gate_hidden=8, top_k=k, backend=backend, renormalize=False)
    x = torch.randn(11, 10, generator=gen)
    out = layer.to(device_for(backend))(x.to(device_for(backend)))
    out.square().sum().backward()
    gate_grad = layer.gate[-1].weight.grad.cpu()
    layer.cpu().zero_grad()
    expected = sparse_loop(layer, x, k, renormalize=False)
    torch.testing.assert_close(out.detach().cpu(), expected, rtol=1e-4, atol=1e-5)
    expected.square().sum().backward()
    torch.testing.assert_close(gate_grad, layer.gate[-1].weight.grad, rtol=1e-4, atol=1e-5)
    assert gate_grad.abs().sum() > 0  # with k = 1 the renormalised weight is 1: no gradient reaches the gate
    torch.testing.assert_close(layer.topk_weights.cpu(), layer.gate_probs.cpu().topk(k, 1).values)


def test_renormalised_top1_gives_the_gate_no_gradient(gen):
    layer = MixtureLayer(10, 6, num_experts=4, gate_hidden=8, top_k=1)
    layer(torch.randn(7, 10, generator=gen)).sum().backward()
    assert layer.gate[-1].weight.grad is None or not layer.gate[-1].weight.grad.any()
    model = DeepMoE(10, [(4, 6), (3, 5)], 2, top_k=1, renormalize=False)
    assert all(not m.renormalize for m in model.layers) and "renormalize=False" in repr(model)


def _dense_and_sparse(seed, dtype, backend, **kwargs):
    torch.manual_seed(seed)
    dense = MixtureLayer(9, 5, num_experts=4, gate_hidden=6, **kwargs).to(dtype)
    sparse = MixtureLayer(9, 5, num_experts=4, gate_hidden=6, top_k=4, backend=backend, **kwargs).to(dtype)
    sparse.load_state_dict(dense.state_dict())
    return dense, sparse.to(device_for(backend))


@pytest.mark.parametrize("backend", [*BACKENDS, "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_top_k_equal_to_e_is_the_dense_layer_with_gradients(dtype, backend, gen):
    if dtype == torch.float64 and backend not in ("torch", "auto"):
        pytest.skip("float64 routing is on the torch backend (auto: torch routing, cpu grouped_linear)")
    dense, sparse = _dense_and_sparse(2, dtype, backend, activation="gelu")
    x = torch.randn(17, 9, generator=gen, dtype=dtype)
    upstream = torch.randn(17, 5, generator=gen, dtype=dtype)
    x_dense, x_sparse = x.clone().requires_grad_(), x.to(device_for(backend)).requires_grad_()
    out_dense, out_sparse = dense(x_dense), sparse(x_sparse)
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(out_sparse.cpu(), out_dense, **tol)
    torch.testing.assert_close(sparse.gate_probs.cpu(), dense.gate_probs, **tol)
    (out_dense * upstream).sum().backward()
    (out_sparse * upstream.to(out_sparse.device)).sum().backward()
    torch.testing.assert_close(x_sparse.grad.cpu(), x_dense.grad, **tol)
    dense_grads = dict(dense.named_parameters())
    for name, p in sparse.named_parameters():
        torch.testing.assert_close(p.grad.cpu(), dense_grads[name].grad, **tol, msg=lambda m, n=name: f"{n}: {m}")


def test_sparse_layer_gradcheck_fp64(gen):
    torch.manual_seed(3)
    layer = MixtureLayer(6, 4, num_experts=3, gate_hidden=5, top_k=2, activation="silu").double()
    x = torch.randn(5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


def test_inputs_are_flattened_from_dim_1(gen):
    layer = MixtureLayer(36, 8, num_experts=2)
    x = torch.randn(5, 1, 6, 6, generator=gen)
    torch.testing.assert_close(layer(x), layer(x.view(5, 36)))


def test_parameters_and_router_rows():
    layer = MixtureLayer(20, 11, num_experts=5, gate_hidden=7, activation="silu")
    assert layer.expert_weight.shape == (5, 11, 20) and layer.expert_bias.shape == (5, 11)
    assert isinstance(layer.gate, nn.Sequential) and len(layer.gate) == 3
    first, act, last = layer.gate
    assert (first.in_features, first.out_features) == (20, 7) and isinstance(act, nn.SiLU)
    assert last.weight.shape == (5, 7) and last.bias.shape == (5,)
    x = torch.randn(3, 20)
    torch.testing.assert_close(layer.gate(x)[:, 2], act(first(x)) @ last.weight[2] + last.bias[2])
    assert "balance_totals" in layer.state_dict()
    bound = 1 / math.sqrt(20)
    assert layer.expert_weight.abs().max() <= bound and layer.expert_weight.std() > bound / 4


class SequenceGate(nn.Module):
    """A gate that returns a given sequence of [B, E] logits, one per call (the hand-made gate outputs)."""

    def __init__(self, logits):
        super().__init__()
        self.logits, self.calls = logits, 0

    def forward(self, x):
        out = self.logits[self.calls]
        self.calls += 1
        return out.to(x.dtype)


def balancing_by_hand(gate_outputs, margin, k=None):
    """Eigen et al.'s rule in plain Python: per batch, experts with G_i - mean(G) > m get 0 and the gate is
    renormalised; then G += the batch's gate values as applied. Per batch: (gate values, applied values, totals,
    which experts were off)."""
    E = len(gate_outputs[0][0])
    totals = [0.0] * E
    history = []
    for batch in gate_outputs:
        mean = sum(totals) / E
        off = [g - mean > margin for g in totals]
        probs, applied = [], []
        for row in batch:
            e = [0.0 if off[i] else math.exp(v) for i, v in enumerate(row)]
            p = [v / sum(e) for v in e]
            probs.append(p)
            if k is None:
                applied.append(p)
            else:
                top = sorted(range(E), key=lambda i: (-p[i], i))[:k]
                total = sum(p[i] for i in top)
                applied.append([p[i] / total if i in top else 0.0 for i in range(E)])
        for row in applied:
            totals = [g + v for g, v in zip(totals, row, strict=True)]
        history.append((probs, applied, list(totals), off))
    return history


def _hand_made_sequence(gen, steps=12, B=5, E=4):
    """Gate outputs that favour expert 0 strongly, then expert 2: the constraint must switch experts off and on."""
    logits = torch.randn(steps, B, E, generator=gen, dtype=torch.float64)
    logits[: steps // 2, :, 0] += 3.0
    logits[steps // 2 :, :, 2] += 3.0
    return logits


@pytest.mark.parametrize("k", [None, 1, 2])
def test_balancing_rule_on_hand_made_gate_outputs(k, gen):
    margin = 1.5
    logits = _hand_made_sequence(gen)
    layer = MixtureLayer(3, 2, num_experts=4, top_k=k, balance_margin=margin, backend="torch").double()
    layer.gate = SequenceGate(logits)
    expected = balancing_by_hand(logits.tolist(), margin, k)
    switched_off = set()
    for step, (probs, applied, totals, off) in enumerate(expected):
        layer(torch.randn(5, 3, dtype=torch.float64))
        torch.testing.assert_close(layer.gate_probs, torch.tensor(probs, dtype=torch.float64))
        if k is not None:
            got = torch.zeros(5, 4, dtype=torch.float64).scatter(1, layer.topk_ids.long(), layer.topk_weights)
            torch.testing.assert_close(got, torch.tensor(applied, dtype=torch.float64))
        torch.testing.assert_close(layer.balance_totals, torch.tensor(totals, dtype=torch.float64))
        switched_off |= {(step, i) for i, o in enumerate(off) if o}
        assert (layer.gate_probs[:, off] == 0).all()
    # The sequence makes the rule bite: expert 0 is switched off in the first half, expert 2 in the second.
    assert any(i == 0 for _, i in switched_off) and any(i == 2 and s >= 6 for s, i in switched_off)


def test_balancing_only_in_training_mode_with_a_margin(gen):
    logits = _hand_made_sequence(gen, steps=4)
    layer = MixtureLayer(3, 2, num_experts=4, balance_margin=0.0).double()
    layer.gate = SequenceGate(logits)
    layer(torch.randn(5, 3, dtype=torch.float64))
    after_one = layer.balance_totals.clone()
    assert after_one.sum() == pytest.approx(5.0)
    layer.eval()  # eval: the plain gate, totals neither read nor updated
    layer(torch.randn(5, 3, dtype=torch.float64))
    torch.testing.assert_close(layer.gate_probs, torch.softmax(logits[1], 1))
    assert torch.equal(layer.balance_totals, after_one)
    layer.train()
    layer.balance_margin = None  # the fine-tuning phase: no constraint, totals left alone
    layer(torch.randn(5, 3, dtype=torch.float64))
    torch.testing.assert_close(layer.gate_probs, torch.softmax(logits[2], 1))
    assert torch.equal(layer.balance_totals, after_one)
    layer.reset_balance()
    assert (layer.balance_totals == 0).all()


def test_balance_totals_stay_wide_under_dtype_conversions():
    layer = MixtureLayer(4, 3, 2, balance_margin=1.0)
    assert layer.balance_totals.dtype == torch.float32
    assert layer.half().balance_totals.dtype == torch.float32
    assert layer.bfloat16().balance_totals.dtype == torch.float32
    assert layer.double().balance_totals.dtype == torch.float64
    assert layer.expert_weight.dtype == torch.float64
    layer.half()(torch.randn(3, 4).half())
    assert layer.balance_totals.sum() == pytest.approx(3.0, rel=1e-3)


def test_balance_totals_live_on_the_device_and_compile_without_graph_breaks(gen):
    torch._dynamo.reset()
    torch.manual_seed(4)
    eager = MixtureLayer(8, 6, num_experts=4, gate_hidden=5, balance_margin=0.5)
    compiled_layer = MixtureLayer(8, 6, num_experts=4, gate_hidden=5, balance_margin=0.5)
    compiled_layer.load_state_dict(eager.state_dict())
    assert eager.balance_totals.device == eager.expert_weight.device
    assert MixtureLayer(8, 6, num_experts=4).to("meta").balance_totals.device.type == "meta"  # moves with .to()
    # fullgraph: a host sync or a data-dependent Python branch in the balancing would break the graph.
    compiled = torch.compile(compiled_layer, fullgraph=True)
    for _ in range(4):
        x = torch.randn(6, 8, generator=gen) * 3
        torch.testing.assert_close(compiled(x), eager(x))
        torch.testing.assert_close(compiled_layer.balance_totals, eager.balance_totals)
    assert eager.balance_totals.sum() == pytest.approx(24.0)


@pytest.mark.cuda
@pytest.mark.parametrize("top_k", [None, 2])
def test_no_host_sync_on_cuda(top_k):
    model = DeepMoE(32, [(4, 16), (4, 16)], 10, top_k=top_k, balance_margin=2.0).cuda()
    x = torch.randn(64, 32, device="cuda")
    model(x).sum().backward()  # warm-up: kernels compiled, backends resolved
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_deep_moe_composes_the_layers(gen):
    torch.manual_seed(5)
    model = DeepMoE(36 * 36, [(4, 100), (4, 100)], 10)
    assert [(layer.in_features, layer.num_experts, layer.out_features) for layer in model.layers] == [
        (1296, 4, 100),
        (100, 4, 100),
    ]
    x = torch.rand(3, 1, 36, 36, generator=gen)
    z1 = model.layers[0](x)
    expected = model.classifier(model.layers[1](z1))
    g1, g2 = (g.clone() for g in model.gate_probs)
    torch.testing.assert_close(model(x), expected)
    # the second layer's gate reads the first layer's output
    torch.testing.assert_close(model.gate_probs[1], torch.softmax(model.layers[1].gate(z1), 1))
    torch.testing.assert_close(model.gate_probs[0], g1)
    torch.testing.assert_close(model.gate_probs[1], g2)


@pytest.mark.parametrize("layers", [[(2, 5)], [(3, 6), (2, 4), (5, 3)]])
def test_deep_moe_any_depth_and_shared_settings(layers, gen):
    model = DeepMoE(7, layers, 4, gate_hidden=3, top_k=2 if min(e for e, _ in layers) >= 2 else None)
    out = model(torch.randn(6, 7, generator=gen))
    assert out.shape == (6, 4)
    assert [g.shape for g in model.gate_probs] == [(6, e) for e, _ in layers]
    assert model.balance_margin is None
    model.balance_margin = 3.0
    assert all(layer.balance_margin == 3.0 for layer in model.layers)
    model(torch.randn(6, 7, generator=gen))
    assert all(layer.balance_totals.sum() > 0 for layer in model.layers)
    model.reset_balance()
    assert all((layer.balance_totals == 0).all() for layer in model.layers)


def test_exported():
    assert {"MixtureLayer", "DeepMoE"} <= set(nfnn.__all__)


@pytest.mark.parametrize(
    "make, exc, needle",
    [
        (lambda: MixtureLayer(0, 4, 2), ValueError, "in_features"),
        (lambda: MixtureLayer(4, 4, 0), ValueError, "num_experts"),
        (lambda: MixtureLayer(4, 4, 2, gate_hidden=0), ValueError, "gate_hidden"),
        (lambda: MixtureLayer(4, 4, 3, top_k=0), ValueError, "top_k"),
        (lambda: MixtureLayer(4, 4, 3, top_k=4), ValueError, "top_k"),
        (lambda: MixtureLayer(4, 4, 3, top_k=1.0), TypeError, "top_k"),
        (lambda: MixtureLayer(4, 4, 3, activation="tanh"), ValueError, "activation"),
        (lambda: MixtureLayer(4, 4, 3, balance_margin=-1.0), ValueError, "balance_margin"),
        (lambda: MixtureLayer(4, 4, 3, balance_margin=float("nan")), ValueError, "balance_margin"),
        (lambda: MixtureLayer(4, 4, 3, balance_margin="1"), TypeError, "balance_margin"),
        (lambda: MixtureLayer(4, 4, 3, top_k=1, renormalize=1), TypeError, "renormalize"),
        (lambda: DeepMoE(4, [], 10), ValueError, "layers"),
        (lambda: DeepMoE(4, (4, 100), 10), TypeError, r"layers\[0\]"),
        (lambda: DeepMoE(4, "4x100", 10), TypeError, "layers"),
        (lambda: DeepMoE(4, [(4, 100, 1)], 10), TypeError, r"layers\[0\]"),
        (lambda: DeepMoE(4, [(4, 100), (0, 100)], 10), ValueError, r"layers\[1\] num_experts"),
        (lambda: DeepMoE(4, [(4, -1)], 10), ValueError, r"layers\[0\] out_features"),
        (lambda: DeepMoE(4, [(4, 10), (2, 10)], 10, top_k=3), ValueError, "top_k"),
        (lambda: DeepMoE(4, [(4, 10)], 0), ValueError, "num_classes"),
        (lambda: DeepMoE(4, [(4, 10)], 10, balance_margin=-0.5), ValueError, "balance_margin"),
    ],
)
def test_bad_construction_names_the_argument(make, exc, needle):
    with pytest.raises(exc, match=needle):
        make()


def test_bad_forward_input_names_x():
    layer = MixtureLayer(6, 4, 2)
    with pytest.raises(ValueError, match="in_features=6"):
        layer(torch.randn(3, 7))
    with pytest.raises(ValueError, match="x must be"):
        layer(torch.randn(6))
    with pytest.raises(TypeError, match="x must be a floating"):
        layer(torch.ones(3, 6, dtype=torch.int64))
    model = DeepMoE(6, [(2, 4)], 3)
    with pytest.raises(ValueError, match="in_features=6"):
        model(torch.randn(2, 2, 4))
    with pytest.raises(ValueError, match="balance_margin"):
        model.balance_margin = -2
