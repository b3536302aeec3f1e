"""The CPU topk_gating kernel's two layouts (blocks of rows across the vector lanes; one row across the lanes with
a threshold selection) on every instruction set this machine runs: every expert count around the vector widths,
ties, large magnitudes, and position independence (a row's result is bit-identical wherever it sits in the batch)."""

import math

import pytest
import torch

import netmerge_fast as nf
from netmerge_fast import _backends
from tests.test_cpu_isa import isa  # noqa: F401  (the fixture)
from tests.test_topk_gating import _loop_routing, check_routing

pytestmark = [
    pytest.mark.skipif(not _backends.native_status().available, reason="the C++ extension is not built"),
    pytest.mark.usefixtures("isa"),  # every test on every ISA build this machine runs (baseline included)
]


# (E, k, options): both layouts (k * E <= 64 * R: blocks; above: rows, R = 8 or 16 lanes), expert counts that
# leave every remainder against the vector width, groups, bias and sigmoid scoring.
LAYOUTS = [
    (8, 2, {}),
    (13, 3, {"renormalize": False}),
    (64, 6, {}),
    (72, 7, {"scoring": "sigmoid"}),
    (128, 8, {}),
    (130, 5, {"renormalize": False}),
    (200, 3, {"softmax_after_topk": True}),
    (203, 8, {"scoring": "sigmoid", "renormalize": False}),
    (256, 8, {"scoring": "sigmoid", "num_groups": 8, "topk_groups": 4, "group_score": "top2_sum", "scale": 2.5}),
    (160, 6, {"num_groups": 8, "topk_groups": 3, "scale": 16.0}),
    (96, 20, {"num_groups": 8, "topk_groups": 1}),  # the chosen groups hold fewer than k experts
    (300, 17, {}),  # k above both vector widths
    # The fused row path (k <= R, whole vectors of experts, groups of whole vectors): every key kind (logit,
    # sigmoid + bias, softmax + bias with the full statistics, logit with the statistics), few picks whose
    # whole-register stores spill over the next rows' slots, groups fewer than R.
    (128, 8, {"renormalize": False}),
    (512, 2, {}),
    (512, 3, {"scoring": "sigmoid"}),
    (128, 8, {"num_groups": 4, "topk_groups": 2}),
    (256, 6, {"num_groups": 8, "topk_groups": 2, "group_score": "top2_sum"}),
    (256, 8, {"scoring": "sigmoid", "num_groups": 2, "topk_groups": 1, "group_score": "top2_sum"}),
]


def _with_bias(E, options, gen):
    if options.get("group_score") == "top2_sum":
        return dict(options, bias=torch.randn(E, generator=gen) * 0.1)
    return options


@pytest.mark.parametrize("E,k,options", LAYOUTS, ids=lambda v: str(v) if not isinstance(v, dict) else "")
def test_a_row_gives_the_same_bits_at_every_position(E, k, options, gen):
    options = _with_bias(E, options, gen)
    x = torch.randn(45, E, generator=gen) * 3
    x[5, ::2] = x[5, 0]  # ties
    w, ids = nf.topk_gating(x, k, backend="cpu", **options)
    for row in (0, 5, 44):
        for T, position in ((1, 0), (3, 2), (17, 16), (33, 9), (64, 63)):
            batch = torch.randn(T, E, generator=gen) * 3
            batch[position] = x[row]
            bw, bids = nf.topk_gating(batch, k, backend="cpu", **options)
            assert torch.equal(bids[position], ids[row]), (row, T, position)
            assert torch.equal(bw[position], w[row]), (row, T, position)


@pytest.mark.parametrize("E", [*range(1, 41), 63, 65, 127, 129, 255, 257])
def test_every_expert_count_against_the_float64_loops(E, gen):
    x = torch.randn(21, E, generator=gen) * 2
    for k in sorted({1, 2, min(E, 5), min(E, 9), E}):
        if k > E:
            continue
        for options in ({}, {"renormalize": False}, {"scoring": "sigmoid"}, {"softmax_after_topk": True}):
            w, ids = nf.topk_gating(x, k, backend="cpu", **options)
            ref_w, ref_ids = _loop_routing(x, k, **options)
            if options.get("scoring") != "sigmoid":  # the logit is the key: the choice is exact
                assert torch.equal(ids, ref_ids), (E, k, options)
            check_routing(x, k, options, "cpu")
            torch.testing.assert_close(w[ids == ref_ids], ref_w[ids == ref_ids], rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("E,k,options", LAYOUTS, ids=lambda v: str(v) if not isinstance(v, dict) else "")
def test_ties_and_large_magnitudes(E, k, options, gen):
    options = _with_bias(E, options, gen)
    if "bias" in options:  # a coarse grid keeps ties exact through score + bias
        options["bias"] = torch.randint(-2, 3, (E,), generator=gen).float() / 4
    x = torch.randint(-3, 3, (40, E), generator=gen).float()  # many exact ties
    x[0] = 1.0  # one value everywhere
    big = torch.finfo(torch.float32).max
    x[1] = torch.where(torch.rand(E, generator=gen) < 0.5, big, -big)
    x[2] = torch.randn(E, generator=gen) * 1e30
    x[3] = torch.randn(E, generator=gen) * 1e-30
    x[4, : E // 2] = -big
    x[5] = torch.arange(E, dtype=torch.float32).flip(0)  # best at the lowest index
    x[6] = torch.arange(E, dtype=torch.float32)
    w, ids = check_routing(x, k, options, "cpu", max_ambiguous=0.3)
    assert torch.isfinite(w).all()
    if "num_groups" not in options:
        assert ids[5].tolist() == list(range(k)), "descending logits: the first k, in order"
        if options.get("scoring") != "sigmoid":  # sigmoid saturates: equal scores, lower index first
            assert ids[6].tolist() == list(range(E - 1, E - 1 - k, -1))
    if "bias" not in options:
        assert ids[0].tolist() == list(range(k)), "equal keys go to the lower index, in order"


def test_the_fallback_build_from_the_environment(gen):
    """NETMERGE_CPU_ISA=baseline in a fresh process routes like the reference (the build a CPU without AVX2 runs)."""
    import subprocess
    import sys

    script = (
        "import torch, netmerge_fast as nf\n"
        "from netmerge_fast import _backends, reference\n"
        "assert _backends.cpu_isa() == 'baseline', _backends.cpu_isa()\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for E, k, o in ((8, 2, {}), (64, 6, {}), (130, 8, {}), (256, 8, {'scoring': 'sigmoid', 'num_groups': 8,\n"
        "        'topk_groups': 4, 'group_score': 'top2_sum', 'bias': torch.randn(256, generator=g) * 0.1})):\n"
        "    x = torch.randn(19, E, generator=g)\n"
        "    w, i = nf.topk_gating(x, k, backend='cpu', **o)\n"
        "    rw, ri = reference.topk_gating(x, k, **o)\n"
        "    assert torch.equal(i.long(), ri.long()), (E, k)\n"
        "    torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6)\n"
        "print('ok')\n"
    )
    env = dict(__import__("os").environ, NETMERGE_CPU_ISA="baseline")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_non_finite_rows_in_both_layouts():
    for E, k in ((8, 3), (130, 6)):
        x = torch.full((4, E), -math.inf)
        x[1] = math.nan
        x[2, 5] = 1.0
        x[2, :5] = math.nan
        x[3, 2] = x[3, 6] = math.inf
        w, ids = nf.topk_gating(x, k, backend="cpu")
        assert ids[0].tolist() == list(range(k)) and w[0].tolist() == [0.0] * k
        assert ids[1].tolist() == list(range(k)) and w[1].tolist() == [0.0] * k
        assert ids[2, 0] == 5 and w[2].tolist() == [1.0] + [0.0] * (k - 1)
        assert ids[3, :2].tolist() == [2, 6] and w[3].tolist() == [0.5, 0.5] + [0.0] * (k - 2)


@pytest.mark.parametrize("E,k,options", LAYOUTS, ids=lambda v: str(v) if not isinstance(v, dict) else "")
def test_threads_and_row_pairs_give_the_same_bits(E, k, options, gen):
    """Rows go in pairs to the fused path and in chunks to threads, whose last rows cannot spill whole-register
    stores into the next chunk: any thread count and any T give every row the bits it gets alone."""
    options = _with_bias(E, options, gen)
    x = torch.randn(203, E, generator=gen) * 2
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        w1, ids1 = nf.topk_gating(x, k, backend="cpu", **options)
        torch.set_num_threads(2)
        w2, ids2 = nf.topk_gating(x, k, backend="cpu", **options)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(ids1, ids2) and torch.equal(w1, w2)
    for row in (0, 101, 202):
        w, ids = nf.topk_gating(x[row : row + 1], k, backend="cpu", **options)
        assert torch.equal(ids[0], ids1[row]) and torch.equal(w[0], w1[row])
    check_routing(x, k, options, "cpu")


@pytest.mark.parametrize(
    "options", [{}, {"renormalize": False}, {"scoring": "sigmoid", "num_groups": 4, "group_score": "top2_sum"}]
)
def test_best_experts_sharing_a_lane_or_tied(options, gen):
    """The fused row path ranks the k best in registers when its threshold finds exactly k distinct candidates;
    rows whose best experts share a vector lane (more than three of them) or tie take the general ranking."""
    E, k = 128, 8
    if "num_groups" in options:
        options = dict(options, topk_groups=2, bias=torch.randn(E, generator=gen) * 0.1)
    x = torch.randn(64, E, generator=gen)
    lane = torch.arange(0, E, 16)[:6]  # the same lane for 8 and 16 lanes
    for r in range(0, 16):
        x[r, lane] = 5.0 + torch.rand(len(lane), generator=gen)  # six of the best in one lane
    for r in range(16, 32):
        x[r, lane[: 2 + r % 4]] = 6.0  # ties among the best
    for r in range(32, 40):
        x[r, torch.randperm(E, generator=gen)[:k]] = 4.0  # the k best all equal
    w, ids = check_routing(x, k, options, "cpu", max_ambiguous=0.3)
    if "num_groups" not in options:
        ref_w, ref_ids = _loop_routing(x, k, **options)
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(w, ref_w, rtol=2e-5, atol=1e-6)


def test_sigmoid_against_float64_over_the_whole_range():
    """The kernels' own sigmoid (a polynomial exp): weights of unrenormalised sigmoid routing against float64 for
    logits across the float range, infinities and NaN (read as -inf), in both row layouts."""
    big = torch.finfo(torch.float32).max
    values = torch.cat(
        [
            torch.linspace(-120, 120, 24001),
            torch.tensor([-big, big, -1e30, 1e30, -87.5, -87.3, -87.0, -1e-30, 1e-30, 0.0, -0.0]),
            torch.tensor([-math.inf, math.inf, math.nan]),
        ]
    )
    for E in (8, 128):  # blocks of rows (k * E <= 64 lanes) and the fused row path
        x = torch.cat([values, values[: (-values.numel()) % E]]).view(-1, E)
        w, ids = nf.topk_gating(x, 8, scoring="sigmoid", renormalize=False, backend="cpu")
        chosen = x.double().gather(1, ids.long()).nan_to_num(nan=-math.inf)
        expected = torch.sigmoid(chosen)
        torch.testing.assert_close(w.double(), expected, rtol=3e-7, atol=1e-7)
        assert (w[chosen == math.inf] == 1.0).all() and (w[chosen == -math.inf] == 0.0).all()
        assert (w[chosen > 17] == 1.0).all(), "exactly 1 where exp(-x) is below float resolution"
