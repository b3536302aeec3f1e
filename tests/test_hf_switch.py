"""Switch Transformers through integrations.hf.enable against transformers' own model: tiny random configs built
here (transformers' ModelTester sizes, a capacity that drops tokens), the same weights with and without enable."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

from netmerge_fast.bench.hf import randomize  # noqa: E402
from netmerge_fast.integrations import hf, switch_transformers  # noqa: E402

VOCAB = 99


def tiny_switch(dtype=torch.float32, seed=0, **overrides):
    """SwitchTransformersModelTester's sizes (d_model 32, d_ff 37, 4 heads, 8 buckets), 4 + 4 layers of which every
    second is sparse (transformers adds the router losses only when the sparse step is above 1), 8 experts with a
    capacity of 2 tokens per sequence, so tokens are dropped."""
    options = dict(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=37, num_layers=4, num_decoder_layers=4, num_heads=4,
        relative_attention_num_buckets=8, num_experts=8, expert_capacity=2, num_sparse_encoder_layers=2,
        num_sparse_decoder_layers=2, dropout_rate=0.0, eos_token_id=1, pad_token_id=0, decoder_start_token_id=0,
    )  # fmt: skip
    options.update(overrides)
    torch.manual_seed(seed)
    model = transformers.SwitchTransformersForConditionalGeneration(transformers.SwitchTransformersConfig(**options))
    randomize(model, std=0.1)
    return model.to(dtype).eval()


def tokens(seed=1, batch=3, length=12):
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def routers(model):
    return [m for m in model.modules() if switch_transformers._is(m, switch_transformers._ROUTER)]


def test_every_router_and_sparse_mlp_is_patched():
    model = tiny_switch()
    report = hf.enable(model)
    assert len(report.routers) == len(report.experts) == 4 and not report.skipped
    assert all(name.endswith(".mlp.router") for name in report.routers)
    assert all(name.endswith(".mlp") for name in report.experts)


def test_logits_router_logits_and_losses_match():
    model = tiny_switch()
    ids, labels = tokens(), tokens(seed=2)
    kwargs = dict(input_ids=ids, labels=labels, output_router_logits=True)
    with torch.no_grad():
        expected = model(**kwargs)
        dropped = sum(int((r(torch.randn(3, 12, 32))[0].sum(-1) == 0).sum()) for r in routers(model))
    assert dropped > 0, "the capacity drops tokens in this configuration"
    hf.enable(model)
    with torch.no_grad():
        got = model(**kwargs)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    for key in ("encoder_router_logits", "decoder_router_logits"):
        assert len(got[key]) == len(expected[key]) == 2
        for a, b in zip(got[key], expected[key], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for key in ("loss", "encoder_z_loss", "decoder_z_loss", "encoder_aux_loss", "decoder_aux_loss"):
        assert expected[key] > 0
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_router_outputs_and_dropped_tokens_are_transformers():
    """One router and one sparse MLP on inputs where some experts overflow: the same dispatch mask, probabilities
    and logits, and dropped tokens get exactly 0 from the MLP."""
    model = tiny_switch()
    mlp = model.encoder.block[1].layer[1].mlp
    x = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected_router = mlp.router(x)
        expected = mlp(x)
    hf.enable(model)
    with torch.no_grad():
        got_router = mlp.router(x)
        got = mlp(x)
    assert torch.equal(got_router[0], expected_router[0]) and got_router[0].dtype == torch.int64
    torch.testing.assert_close(got_router[1], expected_router[1], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_router[2], expected_router[2], rtol=0, atol=0)
    dropped = expected_router[0].sum(-1) == 0
    assert dropped.any() and (got[dropped] == 0).all()
    kept_per_sequence = expected_router[0].sum(1)
    assert (kept_per_sequence <= 2).all(), "at most expert_capacity tokens per expert and sequence"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_greedy_generate_identical():
    model = tiny_switch()
    prompt = tokens(seed=4, batch=2, length=8)
    kwargs = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False)
    expected = model.generate(prompt, **kwargs)
    hf.enable(model)
    got = model.generate(prompt, **kwargs)
    assert got.shape == expected.shape == (2, 17)
    assert torch.equal(got, expected)


def _training_step(model, seed):
    torch.manual_seed(seed)  # the router's jitter and the dropouts draw the same numbers on both sides
    out = model(input_ids=tokens(seed=5), labels=tokens(seed=6), output_router_logits=True)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), grads


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["moe_experts", "dropout_falls_back"])
def test_training_step_loss_and_gradients_match(dropout):
    """Training mode with the router's jitter (0.01, transformers' default); with dropout inside the experts the
    sparse MLP runs transformers' own loop (moe_experts has no dropout between its GEMMs)."""
    model = tiny_switch(dropout_rate=dropout).train()
    expected_loss, expected = _training_step(model, seed=7)
    hf.enable(model)
    calls = []
    original = switch_transformers.moe_experts
    switch_transformers.moe_experts = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        loss, got = _training_step(model, seed=7)
    finally:
        switch_transformers.moe_experts = original
    assert len(calls) == (4 if dropout == 0 else 0)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    # An expert that gets no token has no gradient in transformers' loop and a zero one from the stacked weights.
    assert expected.keys() <= got.keys()
    assert all(".experts.expert_" in n and not got[n].any() for n in got.keys() - expected.keys())
    experts = [n for n in got if ".experts.expert_" in n]
    assert experts and any(got[n].abs().sum() > 0 for n in experts)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_enable_touches_no_parameter_and_follows_weight_updates():
    model = tiny_switch()
    before = {name: (p, p.data_ptr(), p.detach().clone()) for name, p in model.named_parameters()}
    state = copy.deepcopy(model.state_dict())
    hf.enable(model)
    for name, p in model.named_parameters():
        param, pointer, value = before[name]
        assert p is param and p.data_ptr() == pointer and torch.equal(p, value)
    assert state.keys() == model.state_dict().keys()
    ids = tokens()
    reference = tiny_switch()
    with torch.no_grad():
        model(input_ids=ids, decoder_input_ids=ids)  # fills the stacked-weights cache
        for m in (model, reference):
            m.encoder.block[1].layer[1].mlp.experts["expert_3"].wi.weight.mul_(-2.0)
            m.decoder.block[3].layer[2].mlp.experts["expert_0"].wo.weight.add_(0.05)
        got = model(input_ids=ids, decoder_input_ids=ids).logits
        torch.testing.assert_close(got, reference(input_ids=ids, decoder_input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_disable_restores_the_model():
    model = tiny_switch()
    ids = tokens()
    with torch.no_grad():
        expected = model(input_ids=ids, decoder_input_ids=ids).logits
    hf.enable(model)
    hf.disable(model)
    assert all("forward" not in m.__dict__ and "_netmerge_switch" not in m.__dict__ for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, decoder_input_ids=ids).logits, expected)


def test_routing_or_experts_alone():
    model = tiny_switch()
    ids = tokens()
    with torch.no_grad():
        expected = model(input_ids=ids, decoder_input_ids=ids).logits
    for routing, experts in ((True, False), (False, True)):
        report = hf.enable(model, routing=routing, experts=experts)
        assert (len(report.routers), len(report.experts)) == (4 * routing, 4 * experts)
        with torch.no_grad():
            got = model(input_ids=ids, decoder_input_ids=ids).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_routes_on_the_rounded_probabilities():
    """bfloat16: transformers ranks the probabilities rounded to bfloat16 (ties to the lower index), and so does
    the patched router; the expert outputs round differently (moe_experts sums in float32)."""
    model = tiny_switch(torch.bfloat16)
    ids = tokens()
    with torch.no_grad():
        expected = model(input_ids=ids, decoder_input_ids=ids).logits.float()
        x = torch.randn(3, 12, 32).to(torch.bfloat16)
        mask = model.encoder.block[1].layer[1].mlp.router(x)[0]
    hf.enable(model)
    with torch.no_grad():
        got = model(input_ids=ids, decoder_input_ids=ids).logits.float()
        assert torch.equal(model.encoder.block[1].layer[1].mlp.router(x)[0], mask)
    scale = expected.abs().max()
    assert (got - expected).abs().max() < 0.05 * scale


def test_unsupported_expert_activation_is_left_alone():
    model = tiny_switch(dense_act_fn="tanh")
    with pytest.warns(UserWarning, match="activation"):
        report = hf.enable(model)
    assert len(report.routers) == 4 and not report.experts
    assert all("activation" in why for why in report.skipped.values())


def test_no_fused_backend_leaves_switch_on_transformers(monkeypatch):
    monkeypatch.setattr(hf, "resolve", lambda op, backend, device, dtype: "torch")
    model = tiny_switch()
    ids = tokens()
    with torch.no_grad():
        expected = model(input_ids=ids, decoder_input_ids=ids).logits
    with pytest.warns(UserWarning, match="auto would pick the slow 'torch' reference"):
        report = hf.enable(model)
    assert not report.changed and len(report.skipped) == 8
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, decoder_input_ids=ids).logits, expected)
