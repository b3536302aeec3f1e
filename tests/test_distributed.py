"""Expert parallelism: 2 and 4 CPU processes on Gloo against one process with the same weights.

Each spawned run checks many cases (spawning costs seconds; CI has two cores), every rank computing the
single-process reference itself from the same seeds. The cpu topk_gating kernel gives a row the same result at
any position in a batch, so the forwards must be bit-identical to the single-process one.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from netmerge_fast import moe_experts, topk_gating
from netmerge_fast.nn import SparseMoE

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with Gloo"
)

TIMEOUT_S = 240  # a hang fails instead of blocking CI
TOLERANCE = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
H, INTER, E = 32, 24, 8


def _close(name, got, want, dtype):
    assert got is not None, f"{name}: no gradient"
    assert got.shape == want.shape, f"{name}: shape {list(got.shape)}, want {list(want.shape)}"
    if not want.numel():
        return
    scale = want.abs().max().item() + 1e-6
    err = (got.double() - want.double()).abs().max().item()
    assert err <= TOLERANCE[dtype] * scale, f"{name}: max error {err:.3g} for max magnitude {scale:.3g}"


def _moe(seed, dtype=torch.float32, **kwargs):
    torch.manual_seed(seed)
    moe = SparseMoE(H, INTER, E, kwargs.pop("top_k", 2), **kwargs)
    if moe.gate.bias is not None:
        torch.nn.init.normal_(moe.gate.bias)
    if hasattr(moe.gate, "e_score_correction_bias"):
        moe.gate.e_score_correction_bias.normal_()
    return moe.to(dtype)


def _check_layer(moe, sizes, group_ranks, *, exact=False, group=None, layers=1):
    """``layers`` x ExpertParallelMoE on this rank's tokens against the single-process SparseMoE on every group
    rank's tokens: outputs, input gradients, replicated gradients (after the all-reduce) and this rank's expert
    gradients. Returns the layer (for the caller's further checks)."""
    from netmerge_fast.distributed import ExpertParallelMoE

    dtype = moe.gate.weight.dtype
    me = group_ranks.index(dist.get_rank())
    gen = torch.Generator().manual_seed(sum(sizes) + 7)
    X = torch.randn(sum(sizes), H, generator=gen).to(dtype)
    G = torch.randn(sum(sizes), H, generator=gen).to(dtype)
    ref = copy.deepcopy(moe)
    x_ref = X.clone().requires_grad_()
    out_ref = x_ref
    for _ in range(layers):
        out_ref = ref(out_ref)
    (out_ref.float() * G.float()).sum().backward()

    layer = ExpertParallelMoE(copy.deepcopy(moe), group)
    rows = slice(sum(sizes[:me]), sum(sizes[: me + 1]))
    x = X[rows].clone().requires_grad_()
    out = x
    for _ in range(layers):
        out = layer(out)
    (out.float() * G[rows].float()).sum().backward()
    layer.all_reduce_replicated_grads()

    if exact:
        assert torch.equal(out, out_ref[rows]), f"forward not bit-identical: {(out - out_ref[rows]).abs().max()}"
    _close("output", out, out_ref[rows], dtype)
    _close("input grad", x.grad, x_ref.grad[rows], dtype)
    local = slice(layer.first_expert, layer.first_expert + layer.num_local_experts)
    ref_params = dict(ref.named_parameters())
    for name, p in layer.named_parameters():
        want = ref_params[name].grad
        _close(name, p.grad, want[local] if name.startswith("experts.") else want, dtype)
    return layer


def _cases(rank, world):
    from netmerge_fast.distributed import (
        ExpertParallelMoE,
        expert_parallel_experts,
        gather_state_dict,
        shard_state_dict,
    )

    ranks = list(range(world))
    even = [16] * world
    done = []
    El = E // world

    # Forward bit-identical in float32 (expert biases included) and in bfloat16 without expert biases.
    _check_layer(_moe(0), even, ranks, exact=True)
    _check_layer(_moe(1, torch.bfloat16), even, ranks, exact=True)
    _check_layer(_moe(1, torch.float16), even, ranks, exact=True)
    _check_layer(_moe(2, torch.bfloat16, bias=True, shared_expert_size=16), even, ranks)
    done.append("bit-identical forward")

    # Every routing option: DeepSeek-V3 (sigmoid, selection bias, groups, scale, shared expert), Qwen2-MoE (no
    # renormalisation, gated shared expert, router bias), GPT-OSS (softmax after top-k, expert biases, clamped
    # SwiGLU), an ungated gelu MLP with k = E.
    deepseek = dict(scoring="sigmoid", selection_bias=True, num_groups=4, topk_groups=2, group_score="top2_sum")
    _check_layer(_moe(3, top_k=3, scale=2.5, shared_expert_size=16, **deepseek), even, ranks, exact=True)
    qwen2 = dict(renormalize=False, shared_expert_size=16, shared_expert_gate=True, router_bias=True)
    _check_layer(_moe(4, top_k=4, **qwen2), even, ranks, exact=True)
    gpt_oss = dict(softmax_after_topk=True, bias=True, activation="swiglu_oai", router_bias=True)
    _check_layer(_moe(5, **gpt_oss), even, ranks, exact=True)
    _check_layer(_moe(6, top_k=E, gated=False, activation="gelu"), even, ranks, exact=True)
    done.append("routing options")

    # Uneven batches (rank 0 sends nothing), two layers in a row (the collectives of both backwards pair up).
    _check_layer(_moe(7, shared_expert_size=8), [0, 5, 37, 3][:world], ranks, layers=2)
    done.append("uneven batches")

    # A rank whose experts no token picks receives nothing; its expert gradients are zeros, not missing.
    starved = _moe(8, router_bias=True)
    with torch.no_grad():
        starved.gate.bias[E - El :] = -1e4
        starved.gate.bias[0] = -1e4  # and an expert with no tokens on rank 0
    layer = _check_layer(starved, even, ranks)
    if rank == world - 1:
        assert layer.stats.received == 0 and layer.stats.received_per_expert == (0,) * El
        assert all(not p.grad.any() for p in layer.experts.parameters())
    assert layer.stats.sent_per_rank[-1] == 0
    if rank == 0:
        assert layer.stats.received_per_expert[0] == 0 and layer.stats.received > 0
    done.append("rank and expert without tokens")

    # Every token to rank 0's experts.
    crowded = _moe(9, router_bias=True)
    with torch.no_grad():
        crowded.gate.bias[:El] = 1e4
    layer = _check_layer(crowded, even, ranks, exact=True)
    assert layer.stats.sent_per_rank == (16 * 2,) + (0,) * (world - 1)
    assert layer.stats.received == (16 * 2 * world if rank == 0 else 0)
    everyone = layer.stats.gather()
    assert [s.rank for s in everyone] == ranks
    for r in ranks:
        assert sum(s.sent_per_rank[r] for s in everyone) == everyone[r].received
    done.append("all tokens to one rank, stats")

    # The functional form with ids of -1 (and a whole row of them), bit-identical to moe_experts in one process.
    gen = torch.Generator().manual_seed(10)
    T = 16
    X = torch.randn(world * T, H, generator=gen)
    w_gate_up, w_down = torch.randn(E, 2 * INTER, H, generator=gen) / 6, torch.randn(E, H, INTER, generator=gen) / 5
    weights, ids = topk_gating(torch.randn(world * T, E, generator=gen), 3)
    ids[::3, 1] = -1
    ids[5] = -1
    want = moe_experts(X, w_gate_up, w_down, weights, ids)
    mine, local = slice(rank * T, (rank + 1) * T), slice(rank * El, (rank + 1) * El)
    out, stats = expert_parallel_experts(X[mine], w_gate_up[local], w_down[local], weights[mine], ids[mine])
    assert torch.equal(out, want[mine])
    assert stats.sent == int((ids[mine] >= 0).sum())
    bad = ids[mine].clone()
    bad[0, 0] = E
    with pytest.raises(ValueError, match=r"topk_ids must be in \[-1, E=8\)"):
        expert_parallel_experts(X[mine], w_gate_up[local], w_down[local], weights[mine], bad)
    done.append("ids of -1")

    # No tokens on any rank; inference mode.
    layer = ExpertParallelMoE(_moe(11))
    assert layer(torch.randn(0, H)).shape == (0, H)
    reference, xs = _moe(11), torch.randn(world * 16, H, generator=gen)
    with torch.inference_mode():
        # SparseMoE infers on packed CPU weights, whose sums round differently from moe_experts on the tensors.
        torch.testing.assert_close(layer(xs[rank * 16 : (rank + 1) * 16]), reference(xs)[rank * 16 : (rank + 1) * 16])
    done.append("empty and inference")

    # Checkpoints: a full state dict sharded onto the ranks gives the full model's output, and gathers back.
    full = _moe(12, bias=True, shared_expert_size=8, selection_bias=True)
    layer = ExpertParallelMoE(_moe(13, bias=True, shared_expert_size=8, selection_bias=True))
    layer.load_state_dict(shard_state_dict(full.state_dict(), rank, world))
    with torch.no_grad():
        assert torch.equal(layer(xs[rank * 16 : (rank + 1) * 16]), full(xs)[rank * 16 : (rank + 1) * 16])
    gathered = gather_state_dict(torch.nn.Sequential(layer))
    assert gathered.keys() == {f"0.{k}" for k in full.state_dict()}
    assert all(torch.equal(gathered[f"0.{k}"], v) for k, v in full.state_dict().items())
    done.append("state dicts")

    # average=True: the gradients of the mean of the ranks' losses.
    layer = ExpertParallelMoE(_moe(14))
    layer(xs[rank * 16 : (rank + 1) * 16]).sum().backward()
    before = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.all_reduce_replicated_grads(average=True)
    summed = before["gate.weight"].clone()
    dist.all_reduce(summed)
    assert torch.allclose(layer.gate.weight.grad, summed / world)
    assert torch.equal(layer.experts.down_proj.grad, before["experts.down_proj"] / world)
    # DDP, on its own process group, with the experts kept out of its all-reduce: the same replicated gradients.
    from torch.nn.parallel import DistributedDataParallel

    ddp_layer = ExpertParallelMoE(_moe(14))
    experts = [f"experts.{name}" for name, _ in ddp_layer.experts.named_parameters()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(ddp_layer, experts)
    ddp = DistributedDataParallel(ddp_layer, process_group=dist.new_group(ranks))
    ddp(xs[rank * 16 : (rank + 1) * 16]).sum().backward()
    assert torch.allclose(ddp_layer.gate.weight.grad, layer.gate.weight.grad, rtol=1e-5, atol=1e-7)
    assert torch.equal(ddp_layer.experts.down_proj.grad, before["experts.down_proj"])
    done.append("average, DDP")

    # Errors: E not a multiple of the group's size, ranks that wrap different layers, a process outside the group.
    with pytest.raises(ValueError, match="multiple of the expert-parallel group's size"):
        ExpertParallelMoE(SparseMoE(H, INTER, world + 1, 2))
    with pytest.raises(ValueError, match="the ranks' layers differ"):
        ExpertParallelMoE(SparseMoE(H, INTER, E, 1 + rank % 2))
    solo = dist.new_group([0])
    if rank == 0:
        _check_layer(_moe(15), [16], [0], exact=True, group=solo)  # a group of one: the plain SparseMoE
    else:
        with pytest.raises(ValueError, match="not a member of the group"):
            ExpertParallelMoE(_moe(15), solo)
    done.append("errors")

    if world == 4:
        # Expert parallelism inside pairs of ranks (e.g. within a node), pairs holding different batches.
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        mine = [0, 1] if rank < 2 else [2, 3]
        _check_layer(_moe(16), [16, 16], mine, exact=True, group=pairs[rank // 2])
        done.append("subgroups")
    return done


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_matches_one_process(world):
    from netmerge_fast.distributed import spawn

    done = spawn(_cases, world, timeout_s=TIMEOUT_S)
    assert all(d == done[0] for d in done) and done[0][-1] == ("subgroups" if world == 4 else "errors")


def test_spawn_reports_a_failing_rank_and_times_out_a_hang():
    from netmerge_fast.distributed import spawn

    with pytest.raises(RuntimeError, match=r"(?s)^rank 1 of 2 failed:.*ValueError: boom"):
        spawn(_fail_on_rank_1, 2, timeout_s=TIMEOUT_S)
    with pytest.raises(TimeoutError, match="did not finish"):
        spawn(_hang, 1, timeout_s=3)


def _fail_on_rank_1(rank, world):
    if rank == 1:
        raise ValueError("boom")
    dist.barrier()


def _hang(rank, world):
    import time

    time.sleep(60)


def test_shard_state_dict_keys_and_errors():
    from netmerge_fast.distributed import is_expert_key, shard_state_dict

    full = {
        "model.layers.0.mlp.gate.weight": torch.randn(8, 4),
        "model.layers.0.mlp.experts.gate_up_proj": torch.arange(8.0)[:, None, None].expand(8, 6, 4).clone(),
        "model.layers.0.mlp.experts.down_proj": torch.randn(8, 4, 3),
        "model.layers.0.mlp.experts.gate_up_proj_bias": torch.randn(8, 6),
        "model.layers.0.mlp.experts.down_proj_bias": torch.randn(8, 4),
        "model.layers.0.mlp.shared_experts.down_proj.weight": torch.randn(4, 3),
    }
    shards = [shard_state_dict(full, r, 4) for r in range(4)]
    for key, value in full.items():
        if is_expert_key(key):
            assert torch.equal(torch.cat([s[key] for s in shards]), value)
            assert all(s[key].shape[0] == 2 and s[key].data_ptr() != value.data_ptr() for s in shards)
        else:
            assert all(s[key] is value for s in shards)
    assert shards[3]["model.layers.0.mlp.experts.gate_up_proj"][:, 0, 0].tolist() == [6.0, 7.0]
    assert not is_expert_key("shared_experts.down_proj") and is_expert_key("experts.down_proj")
    with pytest.raises(ValueError, match=r"experts.gate_up_proj: 8 experts .* world_size=3"):
        shard_state_dict(full, 0, 3)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 3\]"):
        shard_state_dict(full, 4, 4)
    with pytest.raises(TypeError, match="full_state_dict must be a mapping"):
        shard_state_dict([1], 0, 1)


def test_needs_an_initialised_process_group():
    from netmerge_fast.distributed import ExpertParallelMoE

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        ExpertParallelMoE(SparseMoE(H, INTER, E, 2))
    with pytest.raises(TypeError, match=r"moe must be a netmerge_fast\.nn\.SparseMoE"):
        ExpertParallelMoE(torch.nn.Linear(2, 2))


def test_bench_ep_quick_writes_json(tmp_path, capsys):
    import json

    from netmerge_fast import cli

    out = tmp_path / "bench.json"
    assert cli.main(["bench", "ep", "--quick", "--json", str(out)]) == 0
    assert "## ep" in capsys.readouterr().out
    rows = json.loads(out.read_text())["suites"]["ep"]
    assert [row["world"] for row in rows] == [1, 2]
    assert rows[0]["tokens/s vs world 1"] == 1.0
    for row in rows:
        assert row["EP ms"] > 0 and row["comm ms"] > 0 and row["comm share"] > 0 and row["replicated ms"] > 0
        assert row["expert MB/rank"] == rows[0]["expert MB/rank"] / row["world"]
