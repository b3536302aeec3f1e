"""The GPU hot paths under CUDA-graph capture and without host synchronisation (skipped without a GPU).

Each captured graph is replayed on new inputs (copied into its static inputs) and compared with the same ops run
eagerly on those inputs: a graph that baked in the first inputs, or a path that synchronised during capture (which
fails capture), shows up here.
"""

import pytest
import torch

import netmerge_fast as nf
from netmerge_fast.nn import SparseMoE

pytestmark = pytest.mark.cuda


def _capture(fn, *static_inputs):
    """(graph, static outputs) of fn after a warm-up on a side stream, as torch.cuda.graphs recommends."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(*static_inputs)  # compiles the kernels and fills the caches outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn(*static_inputs)
    return graph, outputs


def _replay_matches_eager(fn, make_inputs, *, exact=True):
    static = make_inputs()
    graph, outputs = _capture(fn, *static)
    for _ in range(2):
        fresh = make_inputs()
        for s, f in zip(static, fresh, strict=True):
            s.copy_(f)
        graph.replay()
        expected = fn(*fresh)
        for got, want in zip(outputs, expected, strict=True):
            if exact:  # the same deterministic kernels, replayed
                assert torch.equal(got, want)
            else:
                torch.testing.assert_close(got, want)


@pytest.mark.parametrize("T", [1, 8, 300])  # per-slot decode, small blocks, prefill
def test_topk_gating_and_moe_experts_capture(T):
    E, k, H, inter = 16, 2, 256, 128
    g = torch.Generator(device="cuda").manual_seed(T)
    w_gate_up = torch.randn(E, 2 * inter, H, device="cuda", generator=g).bfloat16() * H**-0.5
    w_down = torch.randn(E, H, inter, device="cuda", generator=g).bfloat16() * inter**-0.5

    def layer(logits, hidden):
        weights, ids = nf.topk_gating(logits, k)
        return (nf.moe_experts(hidden, w_gate_up, w_down, weights, ids),)

    inputs = lambda: (
        torch.randn(T, E, device="cuda", generator=g),
        torch.randn(T, H, device="cuda", generator=g).bfloat16(),
    )
    _replay_matches_eager(layer, inputs)


@pytest.mark.parametrize("shared", [False, True])
def test_sparse_moe_forward_capture(shared):
    moe = SparseMoE(256, 128, num_experts=8, top_k=2, shared_expert_size=64 if shared else None)
    moe = moe.cuda().bfloat16().eval()
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        _replay_matches_eager(
            lambda x: (moe(x),), lambda: (torch.randn(4, 37, 256, device="cuda", generator=g).bfloat16(),)
        )


def test_combine_logits_capture():
    counts = [5, 300, 7]
    g = torch.Generator(device="cuda").manual_seed(0)

    def merge(x):
        stats = nf.logit_statistics(x, counts, stats=("mean", "std", "median", "q3"))
        merged, winner = nf.combine_logits(x, counts, method="third_quartile", return_winner=True)
        return stats, merged, winner

    _replay_matches_eager(merge, lambda: (torch.randn(64, sum(counts), device="cuda", generator=g),))


def _no_sync(fn):
    """Runs fn (after a warm-up) with CUDA's sync debug mode raising on any host synchronisation."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("T", [1, 300])
def test_moe_layer_without_host_sync(backend, T):
    """topk_gating + moe_experts forward and backward; the torch backend on its grouped-GEMM path (bfloat16,
    16-byte-aligned rows), where torch's grouped GEMM has a native kernel for this GPU."""
    E, k, H, inter = 8, 2, 128, 64
    g = torch.Generator(device="cuda").manual_seed(T)
    logits = torch.randn(T, E, device="cuda", generator=g, requires_grad=True)
    hidden = torch.randn(T, H, device="cuda", generator=g).bfloat16().requires_grad_()
    w_gate_up = (torch.randn(E, 2 * inter, H, device="cuda", generator=g) * H**-0.5).bfloat16().requires_grad_()
    w_down = (torch.randn(E, H, inter, device="cuda", generator=g) * inter**-0.5).bfloat16().requires_grad_()

    def step():
        weights, ids = nf.topk_gating(logits, k, backend="triton")
        out = nf.moe_experts(hidden, w_gate_up, w_down, weights, ids, backend=backend)
        out.float().square().sum().backward()

    if backend == "torch":
        major = torch.cuda.get_device_capability()[0]
        if major not in (9, 10):
            pytest.skip("torch's grouped GEMM has its sync-free kernel on sm90/sm100 (torch 2.10)")
    _no_sync(step)


def test_combine_logits_without_host_sync():
    counts = [5, 300, 7]
    x = torch.randn(64, sum(counts), device="cuda", requires_grad=True)

    def step():
        stats = nf.logit_statistics(x, counts, stats=("mean", "std", "median", "entropy"))
        merged = nf.combine_logits(x, counts, method="entropy")
        (stats.nan_to_num().sum() + merged.sum()).backward()

    _no_sync(step)
