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


def hf_masked_load_balancing_loss(layer_logits, layer_ids, num_experts, attention_mask):
    """Hugging Face's load_balancing_loss_func with an attention mask over several layers, written out
    independently: per layer, each expert's share of the unpadded tokens' slots and its mean probability over
    the unpadded tokens, both averaged over the layers, then E * sum_e f_e * P_e."""
    mask = attention_mask.reshape(-1).float()
    f = sum(F.one_hot(ids.long(), num_experts).float().sum(1).mul(mask[:, None]).sum(0) for ids in layer_ids)
    p = sum(F.softmax(x.float(), dim=-1).mul(mask[:, None]).sum(0) for x in layer_logits)
    rows = len(layer_logits) * mask.sum()
    return num_experts * ((f / rows) * (p / rows)).sum()


@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.bool, torch.float32], ids=str)
def test_load_balancing_loss_with_attention_mask_matches_hugging_face(layers, mask_dtype, gen):
    B, S, E, k = 3, 7, 8, 2
    mask = torch.ones(B, S, dtype=torch.int64)
    mask[0, :3] = 0  # left padding
    mask[2, 5:] = 0  # right padding
    logits = [torch.randn(B * S, E, generator=gen) for _ in range(layers)]
    ids = [nf.topk_gating(x, k)[1] for x in logits]
    ours = nf.load_balancing_loss(torch.cat(logits), torch.cat(ids), E, attention_mask=mask.to(mask_dtype))
    torch.testing.assert_close(ours, hf_masked_load_balancing_loss(logits, ids, E, mask), rtol=1e-5, atol=1e-6)
    # Padding changes the value; an all-ones mask gives the unmasked one.
    unmasked = nf.load_balancing_loss(torch.cat(logits), torch.cat(ids), E)
    assert not torch.allclose(ours, unmasked)
    ones = torch.ones(B, S, dtype=mask_dtype)
    torch.testing.assert_close(
        nf.load_balancing_loss(torch.cat(logits), torch.cat(ids), E, attention_mask=ones), unmasked
    )


def test_load_balancing_loss_with_attention_mask_gradient_and_edge_cases(gen):
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])
    logits = torch.randn(16, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = nf.topk_gating(logits.detach().float(), 2)[1]
    loss = lambda x: nf.load_balancing_loss(x, ids, 6, attention_mask=mask)
    torch.autograd.gradcheck(loss, (logits,))
    # Padded tokens get no gradient.
    (grad,) = torch.autograd.grad(loss(logits), logits)
    padded = (mask.reshape(-1) == 0).repeat(2)
    assert (grad[padded] == 0).all() and (grad[~padded] != 0).any()
    # Nothing unpadded: 0 with zero gradient (Hugging Face's formula gives 0/0).
    none = nf.load_balancing_loss(logits, ids, 6, attention_mask=torch.zeros(2, 4))
    none.backward()
    assert none.item() == 0 and (logits.grad == 0).all()
    with pytest.raises(ValueError, match="attention_mask"):
        nf.load_balancing_loss(logits, ids, 6, attention_mask=torch.ones(3, 2))
    with pytest.raises(TypeError, match="attention_mask"):
        nf.load_balancing_loss(logits, ids, 6, attention_mask=[[1, 1]])


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
