"""netmerge_fast.integrations.hf against the Hugging Face models themselves: tiny random configs built here (no
downloads), the same weights with and without ``enable``."""

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

import netmerge_fast as nf  # noqa: E402
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

# The small configurations of transformers' own model tests (their ModelTester classes), in our words: the
# common causal-LM tester (vocab 99, hidden 32, 2 layers, 2 heads, intermediate 37, gelu, 8 experts, top-2) and
# DeepSeek-V3's own tester, whose routing keeps 1 group of 2 (4 experts) while k = 8 = E.
TESTER = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    intermediate_size=37,
    hidden_act="gelu",
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
TESTER_MOE = dict(moe_intermediate_size=12, shared_expert_intermediate_size=36, num_experts=8, num_experts_per_tok=2)
TESTER_CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(**TESTER, num_experts_per_tok=2),  # 8 local experts (default)
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**TESTER, **TESTER_MOE),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**TESTER, head_dim=16, **TESTER_MOE),
    "olmoe": lambda: transformers.OlmoeConfig(**TESTER, num_experts=8, num_experts_per_tok=2),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=37,
        moe_intermediate_size=12,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=8,
        routed_scaling_factor=2.5,
        kv_lora_rank=16,
        q_lora_rank=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        qk_nope_head_dim=32,
        n_group=2,
        topk_group=1,
        num_experts_per_tok=8,
        first_k_dense_replace=1,
        norm_topk_prob=True,
        pad_token_id=0,
    ),
    # 128 local experts (the default), sliding-window layers alternating with full ones (the default layer types)
    "gpt_oss": lambda: transformers.GptOssConfig(**TESTER, head_dim=16, num_experts_per_tok=2),
}
# (family, configuration): today's tiny configs and transformers' test configs, with the same checks.
MODELS = [(f, "ours") for f in FAMILIES] + [(f, "tester") for f in FAMILIES]
MODEL_IDS = [f"{f}-{c}" for f, c in MODELS]
# Families whose CausalLM adds a load-balancing aux loss with output_router_logits=True.
AUX_LOSS = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss"}
# bfloat16 logits: max |enabled - HF| over the logits' scale. Both sides round the same bf16 GEMMs; the
# differences come from where each rounds (HF sums the k expert outputs in bf16, moe_experts in fp32) and
# they pass through every later layer.
BF16_TOLERANCE = 0.05


def tiny_model(family: str, dtype=torch.float32, seed: int = 0, configs: str = "ours"):
    torch.manual_seed(seed)
    config = (CONFIGS if configs == "ours" else TESTER_CONFIGS)[family]()
    config.output_router_logits = family in AUX_LOSS
    model = transformers.AutoModelForCausalLM.from_config(config)
    randomize(model, std=0.1)
    if configs == "tester":
        # transformers' default (grouped_mm, torch._grouped_mm) fails on CPU for the testers' odd sizes (strides
        # must be multiples of 16 bytes): the baseline is its eager implementation.
        model.set_experts_implementation("eager")
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


@pytest.mark.parametrize(("family", "configs"), MODELS, ids=MODEL_IDS)
def test_forward_router_logits_and_aux_loss_match(family, configs, monkeypatch):
    model = tiny_model(family, configs=configs)
    ids = input_ids()
    with torch.no_grad():
        expected = model(ids, output_router_logits=True)
    report = hf.enable(model)
    calls = Calls(monkeypatch)
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


@pytest.mark.parametrize(("family", "configs"), MODELS, ids=MODEL_IDS)
def test_greedy_generate_identical(family, configs):
    model = tiny_model(family, configs=configs)
    prompt = input_ids(seed=2, batch=1, length=6)
    kwargs = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    expected = model.generate(prompt, **kwargs)
    hf.enable(model)
    got = model.generate(prompt, **kwargs)
    assert got.shape == expected.shape == (1, 6 + 32)
    assert torch.equal(got, expected)


@pytest.mark.parametrize(("family", "configs"), MODELS, ids=MODEL_IDS)
def test_training_step_gradients_match(family, configs):
    model = tiny_model(family, configs=configs).train()
    ids = input_ids(seed=3)
    loss = model(ids, labels=ids).loss  # includes the aux loss where the family has one
    loss.backward()
    expected = {name: p.grad for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    hf.enable(model)
    got_loss = model(ids, labels=ids).loss
    got_loss.backward()
    got = {name: p.grad for name, p in model.named_parameters()}
    torch.testing.assert_close(got_loss, loss, rtol=1e-5, atol=1e-5)
    assert got.keys() == expected.keys()
    routed = [n for n in got if ".experts." in n or ".gate." in n or ".router." in n]
    assert routed and all(got[n] is not None and got[n].abs().sum() > 0 for n in routed)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize(("family", "configs"), MODELS, ids=MODEL_IDS)
def test_bfloat16_logits_within_tolerance(family, configs):
    model = tiny_model(family, torch.bfloat16, configs=configs)
    ids = input_ids(seed=4)
    with torch.no_grad():
        tied = _rows_with_tied_routing(model, ids)
        expected = model(ids).logits.float()
        hf.enable(model)
        got = model(ids).logits.float()
    # Sequences where a router met an exact tie at its k-th choice are left out: torch.topk picks among ties in
    # no defined order (here it took the higher index), ours takes the lower one, and the other expert's output
    # then flows through every later token.
    keep = [b for b in range(ids.shape[0]) if b not in tied]
    assert keep, "every sequence met a tie: the test would say nothing"
    got, expected = got[keep], expected[keep]
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= BF16_TOLERANCE * scale
    # Most logits agree far better than the bound; a broken path would not.
    assert (got - expected).abs().mean() <= 0.01 * scale


def _rows_with_tied_routing(model, ids) -> set[int]:
    """Batch rows with a token where torch.topk and topk_gating choose different experts from the same router
    logits (on transformers' own forward), each of which must be an exact tie at the k-th choice. DeepSeek-V3 ranks
    float32 sigmoid scores plus a bias, where exact ties do not occur: not checked."""
    captured = []
    routers = [m for m in model.modules() if hf._router_key(m) in hf._ROUTERS and m.top_k < m.weight.shape[0]]
    routers = [r for r in routers if hf._router_key(r)[0] != "deepseek_v3"]
    hooks = [r.register_forward_hook(lambda mod, _, out: captured.append((out[0], mod.top_k))) for r in routers]
    model(ids)
    for h in hooks:
        h.remove()
    rows = set()
    for logits, k in captured:
        top = logits.float().topk(k + 1, dim=-1)
        ours = nf.topk_gating(logits, k)[1].long().sort(-1).values
        differ = (top.indices[:, :k].sort(-1).values != ours).any(-1)
        assert (top.values[differ, k - 1] == top.values[differ, k]).all(), "a choice differs without a tie"
        rows |= {int(t) // ids.shape[1] for t in differ.nonzero().flatten()}
    return rows


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


def _hooks(model):
    return [
        (name, len(m._state_dict_hooks), len(m._state_dict_pre_hooks), len(m._load_state_dict_pre_hooks))
        for name, m in model.named_modules()
    ]


@pytest.mark.parametrize(("family", "configs"), MODELS, ids=MODEL_IDS)
def test_parameters_and_optimizer_state_stay_the_models_own(family, configs):
    model = tiny_model(family, configs=configs).train()
    twin = copy.deepcopy(model)  # the same training without enable
    ids = input_ids(seed=7)
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in (model, twin)]
    for m, opt in zip((model, twin), optimizers, strict=True):  # one step before enable: Adam holds state
        m(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    params = {n: (p, p.data_ptr(), p.shape, p.stride()) for n, p in model.named_parameters()}
    vector = torch.nn.utils.parameters_to_vector(model.parameters())
    hooks = _hooks(model)
    assert hf.enable(model).experts
    for name, p in model.named_parameters():
        assert (p, p.data_ptr(), p.shape, p.stride()) == params[name], name
        assert p.is_contiguous(), name
    assert torch.equal(torch.nn.utils.parameters_to_vector(model.parameters()), vector)
    assert _hooks(model) == hooks  # no state_dict hook is needed
    for m, opt in zip((model, twin), optimizers, strict=True):  # the optimizer made before enable goes on
        m(ids, labels=ids).loss.backward()
        opt.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(("family", "configs"), MODELS, ids=MODEL_IDS)
def test_checkpoint_saved_while_enabled_loads_in_plain_transformers(family, configs, tmp_path):
    model = tiny_model(family, configs=configs)
    ids = input_ids(seed=8)
    hf.enable(model)
    with torch.no_grad():
        enabled = model(ids).logits
    model.save_pretrained(tmp_path)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert getattr(plain, "_netmerge_report", None) is None
    implementations = ("eager", "grouped_mm") if configs == "ours" else ("eager",)  # see tiny_model
    plain.set_experts_implementation(implementations[-1])
    for key, value in plain.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, enabled, rtol=1e-5, atol=1e-5)
    # and transformers' own experts implementations, switched to while enabled, still compute the same
    with torch.no_grad():
        for implementation in implementations:
            model.set_experts_implementation(implementation)
            torch.testing.assert_close(model(ids).logits, enabled, rtol=1e-5, atol=1e-5)


def _deepseek_router(k: int, n_group: int, topk_group: int, E: int = 8, seed: int = 0):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    config = transformers.DeepseekV3Config(
        hidden_size=16, n_routed_experts=E, num_experts_per_tok=k, n_group=n_group, topk_group=topk_group,
        routed_scaling_factor=2.5, norm_topk_prob=True,
    )  # fmt: skip
    torch.manual_seed(seed)
    router = DeepseekV3TopkRouter(config)
    with torch.no_grad():
        router.weight.normal_(0, 1)
        router.e_score_correction_bias.normal_(0, 0.1)
    ours = copy.deepcopy(router)
    ours.forward = hf._deepseek_v3_router.__get__(ours)
    return router, ours


@pytest.mark.parametrize(("k", "n_group", "topk_group"), [(8, 2, 1), (8, 4, 1), (4, 2, 1), (6, 4, 2), (6, 2, 1)])
def test_deepseek_v3_router_against_transformers_router(k, n_group, topk_group, gen):
    """Against transformers' own DeepseekV3TopkRouter. Where the chosen groups hold at least k experts, or k = E,
    its choice is defined and both must agree expert for expert (slots compared sorted by id: its top-k is
    unsorted). Otherwise it masks the other groups' scores to -inf and torch.topk picks among those ties in no
    defined order: there the allowed experts must agree, and each side's weights must be its own choice's
    scores, renormalised and scaled (ours fill the remaining slots in index order)."""
    E = 8
    router, ours = _deepseek_router(k, n_group, topk_group, E)
    hidden = torch.randn(64, 16, generator=gen)
    with torch.no_grad():
        logits_hf, w_hf, ids_hf = router(hidden)
        logits, w, ids = ours(hidden)
    torch.testing.assert_close(logits, logits_hf, rtol=0, atol=0)
    assert w.dtype == w_hf.dtype and ids.dtype == ids_hf.dtype and ids.shape == ids_hf.shape
    allowed = topk_group * E // n_group
    if k <= allowed or k == E:
        order_hf, order = ids_hf.argsort(-1), ids.argsort(-1)
        assert torch.equal(ids.gather(1, order), ids_hf.gather(1, order_hf))
        torch.testing.assert_close(w.gather(1, order), w_hf.gather(1, order_hf), rtol=1e-6, atol=1e-6)
        return
    scores = logits.sigmoid()
    for chosen, weights in ((ids, w), (ids_hf, w_hf)):
        picked = scores.gather(1, chosen)
        torch.testing.assert_close(weights, 2.5 * picked / (picked.sum(-1, keepdim=True) + 1e-20))
    # Our first `allowed` slots are the allowed experts: the same set transformers takes from those groups.
    group_of = torch.arange(E) // (E // n_group)
    first = ids[:, :allowed]
    in_first = torch.zeros(64, E, dtype=torch.bool).scatter(1, first, True)
    assert (in_first.gather(1, ids_hf).sum(-1) == allowed).all()
    assert (group_of[first].sort(-1).values == group_of[first][:, :1]).all() or topk_group > 1
    # The rest: the lowest-index experts of the other groups.
    rest = ids[:, allowed:].sort(-1).values
    expected = torch.stack([torch.arange(E)[~in_first[t]][: k - allowed] for t in range(64)])
    assert torch.equal(rest, expected)


def test_deepseek_v3_tester_config_enables_and_runs():
    """The configuration of the issue (transformers' DeepSeek-V3 test model) patches and runs: no router reported
    as patched that then fails."""
    model = tiny_model("deepseek_v3", configs="tester")
    report = hf.enable(model)
    assert report.routers == ["model.layers.1.mlp.gate"] and report.experts and not report.skipped
    with torch.no_grad():
        assert torch.isfinite(model(input_ids(seed=9)).logits).all()


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


def test_a_router_configuration_topk_gating_rejects_is_left_on_transformers():
    """transformers runs a NaN routed_scaling_factor (NaN weights); topk_gating refuses it: never reported patched."""
    model = tiny_model("deepseek_v3")
    for m in model.modules():
        if hasattr(m, "routed_scaling_factor") and hf._router_key(m) in hf._ROUTERS:
            m.routed_scaling_factor = float("nan")
    with pytest.warns(UserWarning, match="topk_gating does not accept its configuration: scale"):
        report = hf.enable(model)
    assert not report.routers and report.experts
    assert all("scale" in why for why in report.skipped.values()) and len(report.skipped) == moe_layers(model)
    with torch.no_grad():
        model(input_ids(seed=10))  # runs (on transformers' routers)


def test_float64_routers_stay_on_transformers_experts_run_fused():
    """topk_gating has no fused float64 backend (and transformers' softmax routers rank in float32 anyway): those
    routers keep transformers' code; moe_experts' cpu kernel serves float64."""
    model = tiny_model("qwen3_moe", torch.float64)
    model.set_experts_implementation("eager")  # torch._grouped_mm (transformers' default) has no float64
    ids = input_ids(seed=11)
    with torch.no_grad():
        expected = model(ids).logits
    with pytest.warns(UserWarning, match="no fused netmerge-fast backend runs topk_gating on cpu float64"):
        report = hf.enable(model)
    assert not report.routers and len(report.experts) == moe_layers(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-10, atol=1e-10)


def test_no_fused_backend_leaves_experts_and_routers_on_transformers(monkeypatch):
    """Where only the torch reference would serve (no extension, or a device without Triton), nothing is switched
    to it: it is slower than transformers' own code."""
    monkeypatch.setattr(hf, "resolve", lambda op, backend, device, dtype: "torch")
    model = tiny_model("mixtral")
    ids = input_ids(seed=12)
    with torch.no_grad():
        expected = model(ids).logits
    with pytest.warns(UserWarning, match="auto would pick the slow 'torch' reference"):
        report = hf.enable(model)
    assert not report.changed and len(report.skipped) == 2 * moe_layers(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)


def test_mixtral_router_jitter_in_training_mode_is_served_exactly():
    """Mixtral's router_jitter_noise multiplies the block's input before the router, in training mode: the patched
    router sees the same jittered input, so the same seed gives the same loss and gradients."""
    config = CONFIGS["mixtral"]()
    config.router_jitter_noise = 0.1
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).train()
    randomize(model, std=0.1)
    ids = input_ids(seed=13)

    def step():
        torch.manual_seed(1)
        loss = model(ids, labels=ids).loss
        grads = torch.autograd.grad(loss, [p for p in model.parameters()], allow_unused=True)
        return loss, grads

    expected = step()
    assert hf.enable(model).routers
    got = step()
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    for g, e in zip(got[1], expected[1], strict=True):
        if e is not None:
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_loss_equals_transformers(masked):
    """Against transformers' own load_balancing_loss_func, several layers, with and without padding; and the aux
    loss a padded batch gives inside the model."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    model = tiny_model("mixtral")
    ids = input_ids(seed=14, batch=3)
    mask = torch.ones_like(ids)
    if masked:
        mask[0, :5] = 0
        mask[2, 9:] = 0
    hf.enable(model)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_router_logits=True)
    E, k = model.config.num_local_experts, model.config.num_experts_per_tok
    logits = torch.cat(out.router_logits)
    chosen = nf.topk_gating(logits, k)[1]
    ours = nf.load_balancing_loss(logits, chosen, E, attention_mask=mask if masked else None)
    theirs = load_balancing_loss_func(out.router_logits, E, k, mask if masked else None)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours, out.aux_loss, rtol=1e-6, atol=1e-6)


def test_enable_under_a_float16_default_dtype_patches_the_experts():
    """transformers' test_keep_in_fp32_modules_strict_also_hardcode_fp32 builds its model under a float16 default
    dtype (``local_torch_dtype``): enable's check of the experts made its routing weights in that default dtype,
    which moe_experts refuses, and left every experts module on transformers' code."""
    from transformers.modeling_utils import local_torch_dtype

    config = TESTER_CONFIGS["mixtral"]()
    ids = input_ids(seed=15)
    with local_torch_dtype(torch.float16, "MixtralForCausalLM"):
        torch.manual_seed(0)
        model = transformers.MixtralForCausalLM(config).eval()
        model.set_experts_implementation("eager")
        with torch.no_grad():
            expected = model(ids).logits
        report = hf.enable(model)
    assert not report.skipped and len(report.experts) == len(report.routers) == moe_layers(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-2, atol=1e-3)
