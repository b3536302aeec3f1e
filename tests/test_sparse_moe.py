"""SparseMoE: shapes, Hugging Face weights load as they are and give the same output, training, aux loss."""

import pytest
import torch

import netmerge_fast as nf
from netmerge_fast.nn import SparseMoE
from tests.conftest import available_backends

BACKENDS = available_backends(["torch", "cpu"])


def test_accepts_any_leading_shape_and_keeps_it(gen):
    moe = SparseMoE(16, 8, 4, 2)
    for shape in ((16,), (3, 16), (2, 5, 16), (0, 16)):
        x = torch.randn(*shape, generator=gen)
        assert moe(x).shape == x.shape
    assert moe.router_logits.shape == (0, 4) and moe.topk_ids.shape == (0, 2)


def test_state_dict_keys_follow_hugging_face():
    moe = SparseMoE(16, 8, 4, 2, bias=True, shared_expert_size=12, shared_expert_gate=True, selection_bias=True)
    shapes = {k: tuple(v.shape) for k, v in moe.state_dict().items()}
    assert shapes == {
        "gate.weight": (4, 16),
        "gate.e_score_correction_bias": (4,),
        "experts.gate_up_proj": (4, 16, 16),
        "experts.down_proj": (4, 16, 8),
        "experts.gate_up_proj_bias": (4, 16),
        "experts.down_proj_bias": (4, 16),
        "shared_expert.gate_proj.weight": (12, 16),
        "shared_expert.up_proj.weight": (12, 16),
        "shared_expert.down_proj.weight": (16, 12),
        "shared_expert_gate.weight": (1, 16),
    }


def _hf_block(family):
    transformers = pytest.importorskip("transformers")
    if family == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        config = transformers.Qwen3MoeConfig(
            hidden_size=32, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True
        )
        return Qwen3MoeSparseMoeBlock(config), SparseMoE(32, 16, 8, 2)
    if family == "qwen2_moe":
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

        config = transformers.Qwen2MoeConfig(
            hidden_size=32,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=24,
            num_experts=6,
            num_experts_per_tok=4,
            norm_topk_prob=False,
        )
        ours = SparseMoE(32, 16, 6, 4, renormalize=False, shared_expert_size=24, shared_expert_gate=True)
        return Qwen2MoeSparseMoeBlock(config), ours
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = transformers.MixtralConfig(
        hidden_size=32, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2
    )
    return MixtralSparseMoeBlock(config), SparseMoE(32, 16, 8, 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral"])
def test_hugging_face_weights_load_as_they_are(family, backend, gen):
    hf, ours = _hf_block(family)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    ours.load_state_dict(hf.state_dict(), strict=True)
    for module in (ours, ours.experts):
        module.backend = backend
    x = torch.randn(2, 7, 32, generator=gen)
    with torch.no_grad():
        expected = hf(x)
        expected = expected[0] if isinstance(expected, tuple) else expected
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)


def test_aux_loss_is_the_weighted_router_losses(gen):
    moe = SparseMoE(16, 8, 4, 2, aux_loss_coef=0.02, z_loss_coef=0.001)
    with pytest.raises(RuntimeError, match="forward"):
        moe.aux_loss()
    moe(torch.randn(10, 16, generator=gen))
    expected = 0.02 * nf.load_balancing_loss(moe.router_logits, moe.topk_ids, 4) + 0.001 * nf.router_z_loss(
        moe.router_logits
    )
    torch.testing.assert_close(moe.aux_loss(), expected)
    moe.aux_loss().backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the cpu backend")
@pytest.mark.parametrize(
    "options",
    [{}, {"bias": True, "shared_expert_size": 8, "shared_expert_gate": True}, {"activation": "gelu", "gated": False}],
    ids=["plain", "bias_shared", "ungated"],
)
def test_training_matches_the_reference_path(options):
    """Same init, same data: the fused path's losses follow the reference path's, step for step."""
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    target = torch.sin(x @ torch.randn(16, 16))
    losses = {}
    for backend in ("torch", "cpu"):
        torch.manual_seed(1)
        moe = SparseMoE(16, 12, 6, 2, backend=backend, **options)
        opt = torch.optim.Adam(moe.parameters(), lr=3e-3)
        trace = []
        for _ in range(40):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(moe(x), target) + moe.aux_loss()
            loss.backward()
            opt.step()
            trace.append(loss.item())
        losses[backend] = torch.tensor(trace)
    assert losses["cpu"][-1] < 0.7 * losses["cpu"][0], "it learns"
    torch.testing.assert_close(losses["cpu"], losses["torch"], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, exc, needle",
    [
        ({"top_k": 5}, ValueError, "top_k"),
        ({"num_experts": 0}, ValueError, "num_experts"),
        ({"activation": "tanh"}, ValueError, "activation"),
        ({"shared_expert_gate": True}, ValueError, "shared_expert_size"),
        ({"num_groups": 3}, ValueError, "num_groups"),
        ({"aux_loss_coef": float("nan")}, ValueError, "aux_loss_coef"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, exc, needle):
    args = {"hidden_size": 16, "intermediate_size": 8, "num_experts": 4, "top_k": 2}
    args.update(kwargs)
    with pytest.raises(exc, match=needle):
        SparseMoE(
            args.pop("hidden_size"), args.pop("intermediate_size"), args.pop("num_experts"), args.pop("top_k"), **args
        )
