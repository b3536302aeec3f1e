"""netmerge_fast.integrations.hf against the Hugging Face models themselves: tiny random configs built here (no
downloads), the same weights with and without ``enable``."""

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

from netmerge_fast.bench.hf import randomize  # noqa: E402
from netmerge_fast.integrations import hf  # noqa: E402

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)

CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(
        **COMMON, intermediate_size=48, num_local_experts=6, num_experts_per_tok=2
    ),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **COMMON,
        intermediate_size=64,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        num_experts=8,
        num_experts_per_tok=3,
        norm_topk_prob=False,
    ),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **COMMON, head_dim=8, intermediate_size=64, moe_intermediate_size=24, num_experts=16, num_experts_per_tok=4
    ),
    "olmoe": lambda: transformers.OlmoeConfig(**COMMON, intermediate_size=24, num_experts=12, num_experts_per_tok=4),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        **{**COMMON, "num_hidden_layers": 3, "num_key_value_heads": 4},
        first_k_dense_replace=1,  # a dense first layer
        intermediate_size=64,
        moe_intermediate_size=24,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
    ),
    "gpt_oss": lambda: transformers.GptOssConfig(
        **COMMON, head_dim=8, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2, sliding_window=8
    ),
}
FAMILIES = list(CONFIGS)
# Families whose CausalLM adds a load-balancing aux loss with output_router_logits=True.
AUX_LOSS = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss"}
# bfloat16 logits: max |enabled - HF| over the logits' scale. Both sides round the same bf16 GEMMs; the
# differences come from where each rounds (HF sums the k expert outputs in bf16, moe_experts in fp32) and
# they pass through every later layer.
BF16_TOLERANCE = 0.05


def tiny_model(family: str, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    config = CONFIGS[family]()
    config.output_router_logits = family in AUX_LOSS
    model = transformers.AutoModelForCausalLM.from_config(config)
    randomize(model, std=0.1)
    return model.to(dtype).eval()


def input_ids(seed: int = 1, batch: int = 2, length: int = 12):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


class Calls:
    """Counts the calls into netmerge-fast's ops made through the integration (so a pass cannot be vacuous)."""

    def __init__(self, monkeypatch):
        self.topk = self.experts = 0
        topk, experts = hf.topk_gating, hf.run_validated

        def counted_topk(*a, **k):
            self.topk += 1
            return topk(*a, **k)

        def counted_experts(*a, **k):
            self.experts += 1
            return experts(*a, **k)

        monkeypatch.setattr(hf, "topk_gating", counted_topk)
        monkeypatch.setattr(hf, "run_validated", counted_experts)


def moe_layers(model) -> int:
    return sum(1 for m in model.modules() if hf._is_experts_module(m))


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_router_logits_and_aux_loss_match(family, monkeypatch):
    model = tiny_model(family)
    ids = input_ids()
    with torch.no_grad():
        expected = model(ids, output_router_logits=True)
    calls = Calls(monkeypatch)
    report = hf.enable(model)
    layers = moe_layers(model)
    assert len(report.routers) == len(report.experts) == layers > 0
    assert not report.skipped
    assert model.config._experts_implementation == hf.EXPERTS_IMPLEMENTATION
    with torch.no_grad():
        got = model(ids, output_router_logits=True)
    assert (calls.topk, calls.experts) == (layers, layers)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    assert len(got.router_logits) == len(expected.router_logits) == layers
    for a, b in zip(got.router_logits, expected.router_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if family in AUX_LOSS:
        torch.testing.assert_close(got.aux_loss, expected.aux_loss, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_identical(family):
    model = tiny_model(family)
    prompt = input_ids(seed=2, batch=1, length=6)
    kwargs = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    expected = model.generate(prompt, **kwargs)
    hf.enable(model)
    got = model.generate(prompt, **kwargs)
    assert got.shape == expected.shape == (1, 6 + 32)
    assert torch.equal(got, expected)


def _grads(model, family):
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        if family == "gpt_oss" and name.endswith(("experts.gate_up_proj", "experts.gate_up_proj_bias")):
            g = hf._to_interleaved(g) if getattr(model, "_netmerge_report", None) else g
        grads[name] = g
    return grads


@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_gradients_match(family):
    model = tiny_model(family).train()
    ids = input_ids(seed=3)
    loss = model(ids, labels=ids).loss  # includes the aux loss where the family has one
    loss.backward()
    expected = _grads(model, family)
    model.zero_grad(set_to_none=True)
    hf.enable(model)
    got_loss = model(ids, labels=ids).loss
    got_loss.backward()
    got = _grads(model, family)
    torch.testing.assert_close(got_loss, loss, rtol=1e-5, atol=1e-5)
    assert got.keys() == expected.keys()
    routed = [n for n in got if ".experts." in n or ".gate." in n or ".router." in n]
    assert routed and all(got[n] is not None and got[n].abs().sum() > 0 for n in routed)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_logits_within_tolerance(family):
    model = tiny_model(family, torch.bfloat16)
    ids = input_ids(seed=4)
    with torch.no_grad():
        expected = model(ids).logits.float()
        hf.enable(model)
        got = model(ids).logits.float()
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= BF16_TOLERANCE * scale
    # Most logits agree far better than the bound; a broken path would not.
    assert (got - expected).abs().mean() <= 0.01 * scale


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize(("routing", "experts"), [(True, False), (False, True)])
def test_routing_or_experts_alone(family, routing, experts):
    model = tiny_model(family)
    ids = input_ids(seed=5)
    with torch.no_grad():
        expected = model(ids).logits
        report = hf.enable(model, routing=routing, experts=experts)
        got = model(ids).logits
    assert bool(report.routers) == routing and bool(report.experts) == experts
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_disable_restores_the_model(family):
    model = tiny_model(family)
    ids = input_ids(seed=6)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: p for n, p in model.named_parameters()}
    with torch.no_grad():
        expected = model(ids).logits
    hf.enable(model)
    hf.enable(model)  # enabling again undoes the first call first
    hf.disable(model)
    hf.disable(model)  # a second disable does nothing
    assert model.config._experts_implementation == "grouped_mm"
    assert all(p is params[n] and p.is_contiguous() for n, p in model.named_parameters())
    assert all("forward" not in m.__dict__ and "_apply_gate" not in m.__dict__ for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)


def test_gpt_oss_layout_is_converted_once_and_checkpoints_keep_hf_order():
    model = tiny_model("gpt_oss")
    experts = model.model.layers[0].mlp.experts
    hf_state = copy.deepcopy(model.state_dict())
    gate_up, down = experts.gate_up_proj, experts.down_proj
    report = hf.enable(model)
    assert "model.layers.0.mlp.experts" in report.relayout
    # Same Parameter objects and shapes, storage in moe_experts' layout: no per-call conversion.
    assert experts.gate_up_proj is gate_up and experts.down_proj is down
    assert gate_up.shape == (8, 32, 48) and gate_up.transpose(1, 2).is_contiguous()
    assert down.shape == (8, 24, 32) and down.transpose(1, 2).is_contiguous()
    for key, value in model.state_dict().items():
        assert torch.equal(value, hf_state[key]), key
    # Loading an HF checkpoint while enabled, and HF's own implementations while enabled, stay correct.
    ids = input_ids(seed=7)
    with torch.no_grad():
        before = model(ids).logits
        model.load_state_dict(hf_state)
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
        for implementation in ("eager", "grouped_mm"):
            model.set_experts_implementation(implementation)
            torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)


def test_a_model_without_moe_is_left_alone_with_a_warning():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.warns(UserWarning, match="no MoE router or experts"):
        report = hf.enable(model)
    assert not report.changed


def test_unknown_experts_activation_falls_back_with_a_warning():
    config = CONFIGS["qwen3_moe"]()
    config.hidden_act = "quick_gelu"
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = input_ids(seed=9)
    with torch.no_grad():
        expected = model(ids).logits
    with pytest.warns(UserWarning, match="QuickGELUActivation is not supported"):
        report = hf.enable(model)
    assert report.routers and not report.experts and len(report.skipped) == moe_layers(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    model = tiny_model("mixtral")
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        hf.enable("mixtral")
    with pytest.raises(TypeError, match="routing must be a bool"):
        hf.enable(model, routing=1)
    with pytest.raises(TypeError, match="experts must be a bool"):
        hf.enable(model, experts=None)
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        hf.disable(None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hf.enable(model).changed
