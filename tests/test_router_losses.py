"""load_balancing_loss, router_z_loss and expert_counts against independent formulas."""

import pytest
import torch
import torch.nn.functional as F

import netmerge_fast as nf


def hf_load_balancing_loss(logits, top_k, num_experts, selected=None):
    """Hugging Face's load_balancing_loss_func (no attention mask), written out independently."""
    probs = F.softmax(logits.float(), dim=-1)
    if selected is None:
        _, selected = torch.topk(probs, top_k, dim=-1)
    expert_mask = F.one_hot(selected.long(), num_experts)
    tokens_per_expert = expert_mask.float().mean(0)
    router_prob_per_expert = probs.mean(0)
    return (tokens_per_expert * router_prob_per_expert.unsqueeze(0)).sum() * num_experts


@pytest.mark.parametrize("T,E,k", [(1, 4, 1), (37, 8, 2), (128, 60, 4), (64, 128, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_load_balancing_loss_matches_hugging_face(T, E, k, dtype, gen):
    logits = torch.randn(T, E, generator=gen).to(dtype)
    _, ids = nf.topk_gating(logits, k)
    ours = nf.load_balancing_loss(logits, ids, E)
    # bf16 logits tie often and torch.topk breaks ties its own way, so compare on the same choice.
    torch.testing.assert_close(ours, hf_load_balancing_loss(logits, k, E, ids), rtol=1e-5, atol=1e-6)
    if dtype == torch.float32:  # continuous logits: Hugging Face's own top-k picks the same experts
        torch.testing.assert_close(ours, hf_load_balancing_loss(logits, k, E), rtol=1e-5, atol=1e-6)


def test_load_balancing_loss_uniform_routing_is_k():
    E, k = 8, 2
    logits = torch.zeros(E * 4, E)
    ids = torch.arange(E * 4 * k).remainder(E).view(-1, k)
    assert nf.load_balancing_loss(logits, ids, E).item() == pytest.approx(k)


def test_load_balancing_loss_gradient_flows_to_logits(gen):
    logits = torch.randn(16, 8, generator=gen, requires_grad=True)
    _, ids = nf.topk_gating(logits.detach(), 2)
    nf.load_balancing_loss(logits, ids, 8).backward()
    reference = logits.detach().clone().requires_grad_()
    hf_load_balancing_loss(reference, 2, 8).backward()
    torch.testing.assert_close(logits.grad, reference.grad)


def test_router_z_loss(gen):
    logits = torch.randn(20, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    expected = (logits.exp().sum(-1).log() ** 2).mean()
    torch.testing.assert_close(nf.router_z_loss(logits), expected)
    torch.testing.assert_close(nf.router_z_loss(logits.float()), expected.float())
    torch.autograd.gradcheck(nf.router_z_loss, (logits,))


def test_expert_counts_ignores_out_of_range_slots():
    ids = torch.tensor([[0, 2], [2, -1], [3, 9], [0, 2]], dtype=torch.int32)
    assert nf.expert_counts(ids, 4).tolist() == [2, 0, 3, 1]
    assert nf.expert_counts(ids, 4).dtype == torch.int64
    assert nf.expert_counts(torch.empty(0, 2, dtype=torch.int64), 3).tolist() == [0, 0, 0]


def test_empty_batches_give_zero_losses():
    logits = torch.empty(0, 8)
    ids = torch.empty(0, 2, dtype=torch.int32)
    assert nf.load_balancing_loss(logits, ids, 8).item() == 0.0
    assert nf.router_z_loss(logits).item() == 0.0


@pytest.mark.parametrize(
    "call, exc, needle",
    [
        (lambda: nf.load_balancing_loss(torch.randn(4, 8), torch.zeros(4, 2).long(), 6), ValueError, "num_experts"),
        (lambda: nf.load_balancing_loss(torch.randn(4, 8), torch.zeros(3, 2).long(), 8), ValueError, "ids"),
        (lambda: nf.load_balancing_loss(torch.randn(4, 8), torch.zeros(4, 2), 8), TypeError, "ids"),
        (lambda: nf.router_z_loss(torch.randn(8)), ValueError, "router_logits"),
        (lambda: nf.expert_counts(torch.zeros(3), 4), TypeError, "ids"),
        (lambda: nf.expert_counts(torch.zeros(3).long(), 0), ValueError, "num_experts"),
    ],
)
def test_bad_input(call, exc, needle):
    with pytest.raises(exc, match=needle):
        call()
