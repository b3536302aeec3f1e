"""logit_statistics and combine_logits on every backend, against netmerge_fast.reference, against torch's own
functions, and against per-row loops that follow the seed repository's code (tests/seed_combiners.py)."""

import math

import pytest
import torch

import netmerge_fast as nf
from netmerge_fast import reference
from netmerge_fast.combine import METHODS, STATISTICS
from tests import seed_combiners as seed
from tests.conftest import available_backends, device_for

BACKENDS = available_backends(["torch", "cpu", "cuda"])
FUSED = [b for b in BACKENDS if b != "torch"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SELECTING = tuple(reference.SELECTION_CRITERIA)
FORMS = ("packed", "list")

# Class counts per expert. 37 rows = two blocks of 16 rows in vector lanes and a tail of 5 rows handled one by one
# on the CPU; "wide" mixes experts in the lane layout with long ones handled row by row.
LAYOUTS = {
    "seed_2x5": [5, 5],
    "ragged": [1, 7, 3, 64, 2],
    "wide": [1000, 10, 300],
    "many": [3, 1, 4, 1, 5, 9, 2, 6] * 8,
}


def make_logits(gen, B, counts, dtype=torch.float32, device="cpu", scale=2.0):
    return (torch.randn(B, sum(counts), generator=gen) * scale).to(dtype).to(device)


def as_input(x, counts, form):
    """The op's arguments for one packed tensor: itself with class_counts, or separate per-expert tensors."""
    if form == "packed":
        return x, counts
    return [part.clone() for part in x.split(counts, dim=1)], None


def statistics_tolerance(x, counts):
    """Different summation orders: error ~ eps * C * magnitude for sums, relative elsewhere."""
    finite = x[torch.isfinite(x)].abs()
    magnitude = max(1.0, finite.max().item()) if finite.numel() else 1.0
    return {"rtol": 2e-5, "atol": 2e-6 * max(counts) * magnitude}


def check_statistics(x, counts, stats, backend, form="packed"):
    got = nf.logit_statistics(*as_input(x, counts, form), stats=stats, backend=backend)
    assert got.dtype == torch.float32 and got.shape == (x.shape[0], len(counts), len(stats))
    ref = reference.logit_statistics(x.cpu(), counts, stats=stats)
    torch.testing.assert_close(got.cpu(), ref, equal_nan=True, **statistics_tolerance(x, counts))
    return got.cpu()


# ---- logit_statistics ----


# The torch backend is reference.py itself: it is checked against torch's own functions and the seed's per-row
# loops below, not against itself.
@pytest.mark.parametrize("B", [1, 37])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_statistics_match_reference(layout, dtype, backend, form, B, gen):
    counts = LAYOUTS[layout]
    x = make_logits(gen, B, counts, dtype, device_for(backend))
    check_statistics(x, counts, STATISTICS, backend, form)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_statistics_match_torch_functions(dtype, backend, gen):
    """Each statistic as torch defines it, expert by expert (independent of reference.py)."""
    counts = [6, 2, 40, 17, 1000]
    x = make_logits(gen, 21, counts, dtype, device=device_for(backend))
    got = nf.logit_statistics(x, counts, stats=STATISTICS, backend=backend).cpu()
    for e, part in enumerate(x.cpu().float().split(counts, dim=1)):
        top2 = part.topk(2, dim=1).values
        expected = {
            "mean": part.mean(1),
            "std": part.std(1),
            "var": part.var(1),
            "min": part.amin(1),
            "max": part.amax(1),
            "sum": part.sum(1),
            "median": part.quantile(0.5, dim=1),
            "q1": part.quantile(0.25, dim=1),
            "q3": part.quantile(0.75, dim=1),
            "range": part.amax(1) - part.amin(1),
            "entropy": -(part.softmax(1) * part.log_softmax(1)).sum(1),
            "max_prob": part.softmax(1).amax(1),
            "margin": top2[:, 0] - top2[:, 1],
            "logsumexp": part.logsumexp(1),
        }
        for s, name in enumerate(STATISTICS):
            torch.testing.assert_close(got[:, e, s], expected[name], rtol=2e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "B, counts",
    [(0, [5, 5]), (3, [7]), (2, [100_000, 3]), (20, [2] * 1024), (17, [33] * 3), (16, [129, 128])],
    ids=["empty", "one_expert", "100k_classes", "1024_experts", "lane_limit", "piece_limit"],
)
def test_statistics_shapes(B, counts, backend, gen):
    x = make_logits(gen, B, counts, device=device_for(backend))
    check_statistics(x, counts, STATISTICS, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "B, counts",
    [(0, [5, 5]), (3, [7]), (2, [100_000, 3]), (20, [2] * 1024), (16, [129, 128])],
    ids=["empty", "one_expert", "100k_classes", "1024_experts", "piece_limit"],
)
def test_combine_shapes(B, counts, backend, gen):
    x = make_logits(gen, B, counts, device=device_for(backend))
    for method in ("naive", "std", "third_quartile", "overall_ratio"):
        check_combine(x, counts, method, backend)


def adversarial_logits(gen, B, counts):
    """Exact ties, constant experts, infinities, NaN, huge magnitudes, signed zeros and negative sums, mixed with
    ordinary rows; counts[0] == counts[2] so expert 2 can copy expert 0."""
    assert counts[0] == counts[2]
    N = sum(counts)
    x = torch.randint(-3, 4, (B, N), generator=gen).float()
    c0 = counts[0]
    s2 = sum(counts[:2])
    x[0] = 0.0
    x[1, s2 : s2 + c0] = x[1, :c0]  # expert 2 copies expert 0
    x[2, 1] = math.nan
    x[3, c0] = math.inf
    x[4, :c0] = -math.inf
    x[5, 0], x[5, 1] = math.inf, -math.inf
    x[6] -= 5.0  # every sum negative
    x[7] = torch.where(torch.rand(N, generator=gen) < 0.5, 1e18, -1e18)  # float16: infinities
    x[8] = torch.repeat_interleave(torch.arange(len(counts)).float(), torch.tensor(counts))  # constant experts
    x[9, ::2], x[9, 1::2] = -0.0, 0.0
    x[10] = math.nan
    x[11] = math.inf
    x[12, :] = -math.inf
    x[13, s2 : s2 + c0] = math.inf
    x[13, :c0] = math.inf
    x[14] *= 1e-40  # float32 subnormals (zeros in float16)
    return x


ADVERSARIAL_COUNTS = [4, 1, 4, 3, 70]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adversarial_statistics(dtype, backend, gen):
    x = adversarial_logits(gen, 40, ADVERSARIAL_COUNTS).to(dtype).to(device_for(backend))
    for rows in (x, x[:5], x[5:21]):  # lanes and row-by-row layouts
        check_statistics(rows, ADVERSARIAL_COUNTS, STATISTICS, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_documented_edge_cases(backend):
    inf, nan = math.inf, math.nan
    rows = [
        [2.0, 2.0, 2.0, 7.0],  # constant expert; one class
        [1.0, nan, 3.0, -1.0],  # NaN poisons its expert only
        [inf, 0.0, inf, 5.0],  # two +inf logits share the softmax mass
        [-inf, -inf, -inf, -inf],  # all -inf: the limit of equal logits
        [-inf, inf, 1.0, 0.0],  # quartiles next to infinite order statistics
    ]
    x = torch.tensor(rows).to(device_for(backend))
    names = ("mean", "std", "var", "range", "margin", "max_prob", "entropy", "logsumexp", "q1", "median", "q3")
    got = nf.logit_statistics(x, [3, 1], stats=names, backend=backend).cpu()
    value = {name: got[..., i] for i, name in enumerate(names)}
    assert value["mean"][0].tolist() == [2.0, 7.0] and value["std"][0, 0] == 0 and value["range"][0, 0] == 0
    assert math.isnan(value["std"][0, 1]) and math.isnan(value["var"][0, 1])  # one class: no unbiased spread
    assert value["margin"][0].tolist() == [0.0, inf]  # repeated maximum; no runner-up
    assert value["max_prob"][0, 1] == 1.0 and value["entropy"][0, 1] == 0.0
    assert value["entropy"][0, 0].item() == pytest.approx(math.log(3))
    assert torch.isnan(got[1, 0]).all() and torch.equal(torch.isnan(got[1, 1]), torch.isnan(got[0, 1]))
    assert value["max_prob"][2, 0] == 0.5 and value["entropy"][2, 0].item() == pytest.approx(math.log(2))
    assert value["logsumexp"][2, 0] == inf and value["mean"][2, 0] == inf and math.isnan(value["std"][2, 0])
    assert value["max_prob"][3, 0].item() == pytest.approx(1 / 3) and value["logsumexp"][3, 0] == -inf
    assert value["std"][3, 0] == 0 and value["mean"][3, 0] == -inf and value["range"][3, 0] == 0
    # Sorted [-inf, 1, inf]: the median is 1; q1 and q3 interpolate towards the infinities and take them.
    assert [value[q][4, 0].item() for q in ("q1", "median", "q3")] == [-inf, 1.0, inf]
    between = nf.logit_statistics(torch.tensor([[-inf, inf]]).to(x.device), [2], stats=("median",), backend=backend)
    assert math.isnan(between.item())


# ---- combine_logits ----


def _criteria(x, counts, method):
    name, _ = reference.SELECTION_CRITERIA[method]
    return reference.logit_statistics(x.cpu().double(), counts, stats=(name,))[..., 0]


def ambiguous_rows(x, counts, method):
    """Rows whose winner hangs on rounding: the two best criteria (float64) are within 1e-5 of each other, unless
    the tie is exact by construction (identical experts, or constant experts of one size for the criteria that
    only see the shape of the logits)."""
    B = x.shape[0]
    if method not in SELECTING:
        return torch.zeros(B, dtype=torch.bool)
    _, lower_wins = reference.SELECTION_CRITERIA[method]
    crit = _criteria(x, counts, method)
    key = -crit if lower_wins else crit
    parts = x.cpu().double().split(counts, dim=1)
    ambiguous = torch.zeros(B, dtype=torch.bool)
    for i in range(B):
        valid = [e for e in range(len(counts)) if not math.isnan(key[i, e])]
        if len(valid) < 2:
            continue
        ranked = sorted(valid, key=lambda e: -key[i, e].item())
        a, b = ranked[0], ranked[1]
        ka, kb = key[i, a].item(), key[i, b].item()
        close = ka == kb or (math.isfinite(ka) and abs(ka - kb) <= 1e-5 * max(1.0, abs(ka)))
        if not close:
            continue
        pa, pb = parts[a][i], parts[b][i]
        same = pa.shape == pb.shape and torch.equal(pa, pb)
        constant = pa.shape == pb.shape and pa.min() == pa.max() and pb.min() == pb.max()
        exact_method = method in ("range", "third_quartile", "margin")
        ambiguous[i] = not (same or (constant and method != "energy") or (ka == kb and exact_method))
    return ambiguous


def assert_ratios_close(got, x, counts, method):
    """Ratios divide by a float32 sum, and a sum near 0 amplifies its rounding: against the float64 truth, the
    tolerance is the output dtype's epsilon plus a worst-case summation error bound over |sum|."""
    x64 = x.cpu().double()
    seg = reference.segment_ids(counts, x64.device)
    if method == "ratio":
        spread = lambda v: v.index_select(1, seg)
        sums = spread(reference.segment_sum(x64, seg, len(counts)))
        abs_sums = spread(reference.segment_sum(x64.abs(), seg, len(counts)))
        sizes = torch.tensor(counts, dtype=torch.float64)[seg]
    else:
        sums, abs_sums, sizes = x64.sum(1, keepdim=True), x64.abs().sum(1, keepdim=True), float(sum(counts))
    expected = x64 / sums
    rtol = torch.finfo(got.dtype).eps + 1.2e-7 * sizes * abs_sums / sums.abs()
    got64 = got.cpu().double()
    subnormal_step = torch.finfo(got.dtype).tiny * torch.finfo(got.dtype).eps
    close = ((got64 - expected).abs() <= rtol * expected.abs() + subnormal_step) | (got64 == expected)
    close |= torch.isnan(got64) & torch.isnan(expected)
    assert close.all(), f"{(~close).sum().item()} ratios off, e.g. {got64[~close][:3]} vs {expected[~close][:3]}"


def check_combine(x, counts, method, backend, form="packed", gate=None, max_ambiguous=1.0):
    combined, winner = nf.combine_logits(
        *as_input(x, counts, form), method=method, gate=gate, return_winner=True, backend=backend
    )
    assert combined.dtype == x.dtype and combined.shape == (x.shape[0], sum(counts))
    assert winner.dtype == torch.int64 and winner.shape == (x.shape[0],)
    combined, winner = combined.cpu(), winner.cpu()
    ref_combined, ref_winner = reference.combine_logits(
        x.cpu(), counts, method=method, gate=None if gate is None else gate.cpu()
    )
    amb = ambiguous_rows(x, counts, method)
    assert amb.sum() <= max_ambiguous * len(amb), "too many near-ties: the test would say little"
    sure = ~amb
    assert torch.equal(winner[sure], ref_winner[sure])
    if "ratio" in method:
        assert_ratios_close(combined, x, counts, method)
    else:
        torch.testing.assert_close(combined[sure], ref_combined[sure], rtol=0, atol=0, equal_nan=True)
    # Where rounding decides, the answer must still be a near-best expert, assembled by the documented rule.
    mine = reference.combine_with_winner(x.cpu(), counts, method, winner)
    torch.testing.assert_close(combined[amb], mine[amb], rtol=0, atol=0, equal_nan=True)
    return combined, winner


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("backend", FUSED)  # torch: against the seed's per-row loops below
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", [m for m in METHODS if m != "gate"])
@pytest.mark.parametrize("layout", ["seed_2x5", "ragged", "wide", "many"])
def test_combine_matches_reference(layout, method, dtype, backend, form, gen):
    counts = LAYOUTS[layout]
    x = make_logits(gen, 37, counts, dtype, device_for(backend))
    check_combine(x, counts, method, backend, form, max_ambiguous=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", [m for m in METHODS if m != "gate"])
def test_combine_follows_the_rules_row_by_row(method, backend, gen):
    """Adversarial rows against the per-row loop of the documented rules (tests/seed_combiners.py)."""
    x = adversarial_logits(gen, 40, ADVERSARIAL_COUNTS)
    combined, winner = check_combine(x.to(device_for(backend)), ADVERSARIAL_COUNTS, method, backend)
    expected, expected_winner = seed.per_row_combine(list(x.split(ADVERSARIAL_COUNTS, 1)), method)
    sure = ~ambiguous_rows(x, ADVERSARIAL_COUNTS, method)
    assert winner[sure].tolist() == torch.tensor(expected_winner)[sure].tolist()
    if "ratio" in method:
        assert_ratios_close(expected, x, ADVERSARIAL_COUNTS, method)  # the loop and check_combine agree
    else:
        torch.testing.assert_close(combined.double()[sure], expected[sure], rtol=0, atol=0, equal_nan=True)


SEED_METHODS = {
    "naive": seed.seed_naive,
    "std": seed.seed_std,
    "ratio": seed.seed_ratio,
    "overall_ratio": seed.seed_overall_ratio,
    "range": seed.seed_third_q,  # the seed's thirdQ is max - min below 68 classes
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("classes", [5, 10, 67])
@pytest.mark.parametrize("method", list(SEED_METHODS))
def test_seed_methods_match_the_seed_code(method, classes, backend, gen):
    """The seed's setting (two experts with as many classes) on tie-free logits, row by row as its code does."""
    x = make_logits(gen, 50, [classes, classes])
    out1, out2 = x[:, :classes], x[:, classes:]
    expected = SEED_METHODS[method](out1, out2)
    got = nf.combine_logits(
        [out1.to(device_for(backend)), out2.to(device_for(backend))], method=method, backend=backend
    )
    if "ratio" in method:  # the seed sums in float32 too, in its own order: both within the rounding bound
        assert_ratios_close(got, x, [classes, classes], method)
        assert_ratios_close(expected, x, [classes, classes], method)
    else:
        torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=0)


def test_seed_third_q_differs_from_the_quartile_from_68_classes(gen):
    """The seed's percentile(t, 0.75) picks the minimum below 68 classes and an order statistic near 1% above."""
    for classes, is_min in ((67, True), (68, False)):
        t = torch.randn(classes, generator=gen)
        assert (seed._seed_percentile(t, 0.75) == t.min().item()) == is_min


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_lower_expert(backend):
    device = device_for(backend)
    a, b = [3.0, 1.0, 0.0, 0.5], [2.0, 1.5, -0.25, 0.0]  # no criterion ties between a and b
    for method in SELECTING:
        # Experts 1 and 2 are identical: whichever of a and b is better, expert 2 never wins.
        better_a = (seed.row_criterion(a, method) < seed.row_criterion(b, method)) == (method in seed.LOWER_WINS)
        x = torch.tensor([a + b + b, b + b + a]).to(device)
        _, winner = nf.combine_logits(x, [4, 4, 4], method=method, return_winner=True, backend=backend)
        assert winner.tolist() == ([0, 2] if better_a else [1, 0]), method
    constant = torch.tensor([[2.0, 2.0, 2.0, 5.0, 5.0, 5.0, 1.0, 1.0, 1.0]]).to(device)  # std 0, max_prob 1/3, ...
    for method in ("std", "entropy", "max_prob", "range", "margin", "third_quartile"):
        _, winner = nf.combine_logits(constant, [3, 3, 3], method=method, return_winner=True, backend=backend)
        assert winner.item() == 0, method


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_never_wins_and_all_nan_falls_back_to_concatenation(backend):
    device = device_for(backend)
    x = torch.tensor([[math.nan, 0.0, 1.0, 1.0, 5.0], [math.nan, 0.0, math.nan, 1.0, 5.0]]).to(device)
    combined, winner = nf.combine_logits(x, [2, 3], method="std", return_winner=True, backend=backend)
    assert winner.tolist() == [1, -1]
    assert combined.cpu()[0].tolist() == [1.0, 1.0, 1.0, 1.0, 5.0]
    torch.testing.assert_close(combined.cpu()[1], x.cpu()[1], equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gate(dtype, backend, gen):
    device = device_for(backend)
    counts = [3, 1, 4, 2]
    x = make_logits(gen, 37, counts, dtype, device)
    scores = torch.randn(37, 4, generator=gen)
    scores[0] = 1.0  # tie: expert 0
    scores[1, :2] = math.nan  # NaN never wins
    scores[2] = math.nan  # nobody: concatenation
    claims = torch.rand(37, 4, generator=gen) < 0.3
    claims[0] = torch.tensor([False, False, True, False])  # exactly one claim: expert 2
    claims[1] = torch.tensor([True, False, True, False])  # two claims: concatenation
    claims[2] = False  # none: concatenation
    for gate in (scores, scores.double(), scores.half(), claims):
        combined, winner = check_combine(x, counts, "gate", backend, gate=gate.to(device))
        expected, expected_winner = seed.per_row_combine(list(x.cpu().split(counts, 1)), "gate", gate)
        assert winner.tolist() == expected_winner
        torch.testing.assert_close(combined.double(), expected, rtol=0, atol=0)
    assert check_combine(x, counts, "gate", backend, gate=claims.to(device))[1][:3].tolist() == [2, -1, -1]
    winner = check_combine(x, counts, "gate", backend, gate=scores.to(device))[1]
    assert winner[0] == 0 and winner[1] in (2, 3) and winner[2] == -1


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend, gen):
    device = device_for(backend)
    counts = [5, 3, 8]
    base = make_logits(gen, 48, [64], device=device)
    packed_views = (base[:, ::4], base.t().contiguous().t()[:, :16], base[::3, 1:17])
    for x in packed_views:
        check_statistics(x, counts, STATISTICS, backend)
        for method in ("std", "third_quartile", "ratio", "naive"):
            check_combine(x, counts, method, backend, max_ambiguous=0.1)
        parts = [x[:, :5], x[:, 5:8], x[:, 8:]]  # strided views, one per expert
        got = nf.logit_statistics(parts, stats=STATISTICS, backend=backend)
        torch.testing.assert_close(
            got.cpu(),
            reference.logit_statistics(x.cpu(), counts, stats=STATISTICS),
            equal_nan=True,
            **statistics_tolerance(x, counts),
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x = torch.empty(0, 7, device=device_for(backend))
    assert nf.logit_statistics(x, [3, 4], backend=backend).shape == (0, 2, 3)
    combined, winner = nf.combine_logits(x, [3, 4], method="std", return_winner=True, backend=backend)
    assert combined.shape == (0, 7) and winner.shape == (0,)


@pytest.mark.parametrize("backend", FUSED)
def test_repeatable(backend, gen):
    """Repeated calls agree bit for bit, and with the reference (so they are not merely equally wrong)."""
    x = make_logits(gen, 300, LAYOUTS["wide"], device=device_for(backend))
    a = check_statistics(x, LAYOUTS["wide"], STATISTICS, backend)
    b = nf.logit_statistics(x, LAYOUTS["wide"], stats=STATISTICS, backend=backend)
    assert torch.equal(a.nan_to_num(), b.cpu().nan_to_num())


# ---- gradients ----


def test_gradcheck_fp64_every_statistic(gen):
    counts = [4, 1, 6, 2]
    x = torch.randn(3, sum(counts), generator=gen, dtype=torch.float64, requires_grad=True)
    for name in STATISTICS:
        fn = lambda t, name=name: nf.logit_statistics(t, counts, stats=(name,), backend="torch").nan_to_num(0.0)
        torch.autograd.gradcheck(fn, (x,))
    parts = [p.detach().clone().requires_grad_() for p in x.split(counts, dim=1)]
    torch.autograd.gradcheck(
        lambda *p: nf.logit_statistics(list(p), stats=STATISTICS, backend="torch").nan_to_num(0.0), parts
    )


def _tied_logits(gen, B, counts):
    x = torch.randint(-2, 3, (B, sum(counts)), generator=gen).double()  # repeated extremes and order statistics
    x[0] = 1.0
    return x


@pytest.mark.parametrize("ties", [False, True])
def test_backward_matches_autograd_of_the_reference(ties, gen):
    """The one backward (written by hand) against torch autograd through reference.py, ties included."""
    counts = [5, 1, 7, 3, 2]
    x = _tied_logits(gen, 9, counts) if ties else torch.randn(9, sum(counts), generator=gen, dtype=torch.float64)
    upstream = torch.randn(9, len(counts), len(STATISTICS), generator=gen, dtype=torch.float64)
    ours = x.clone().requires_grad_()
    ref = x.clone().requires_grad_()
    (nf.logit_statistics(ours, counts, stats=STATISTICS, backend="torch") * upstream).nan_to_num(0.0).sum().backward()
    (reference.logit_statistics(ref, counts, stats=STATISTICS) * upstream).nan_to_num(0.0).sum().backward()
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradients_match_between_backends(dtype, backend, form, gen):
    counts = LAYOUTS["ragged"]
    x = make_logits(gen, 37, counts, dtype)
    x[0, 3] = math.nan  # no gradient through NaN statistics, on every backend
    x[1, 9] = math.inf
    upstream = torch.randn(37, len(counts), len(STATISTICS), generator=gen)
    grads = []
    for b, device in (("torch", "cpu"), (backend, device_for(backend))):
        inputs, class_counts = as_input(x.to(device).clone(), counts, form)
        leaves = inputs if form == "list" else [inputs]
        for leaf in leaves:
            leaf.requires_grad_()
        out = nf.logit_statistics(inputs, class_counts, stats=STATISTICS, backend=b)
        (out * upstream.to(device)).nan_to_num(0.0).sum().backward()
        grads.append(torch.cat([leaf.grad.cpu() for leaf in leaves], dim=1))
    assert grads[1].dtype == dtype and not torch.isnan(grads[1]).any()
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-3}
    torch.testing.assert_close(grads[1], grads[0], **tol)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("method", ["naive", "std", "third_quartile", "ratio", "overall_ratio", "gate"])
def test_combine_gradients_match_between_backends(method, backend, gen):
    counts = [4, 1, 6]
    x = make_logits(gen, 20, counts)
    gate = torch.randn(20, 3, generator=gen) if method == "gate" else None
    upstream = torch.randn(20, sum(counts), generator=gen)
    grads = []
    for b, device in (("torch", "cpu"), (backend, device_for(backend))):
        parts = [p.clone().to(device).requires_grad_() for p in x.split(counts, dim=1)]
        out = nf.combine_logits(parts, method=method, gate=None if gate is None else gate.to(device), backend=b)
        (out * upstream.to(device)).sum().backward()
        grads.append(torch.cat([p.grad.cpu() for p in parts], dim=1))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", [b for b in ("cpu", "torch") if b in BACKENDS])
def test_torch_compile_fullgraph(backend, gen):
    torch._dynamo.reset()
    counts = [3, 5, 2]

    def gate_and_merge(logits):
        feats = nf.logit_statistics(logits, counts, stats=("mean", "std", "max", "median"), backend=backend)
        scores = feats.sum(-1)
        merged = nf.combine_logits(logits, counts, method="gate", gate=scores, backend=backend)
        return merged, feats

    compiled = torch.compile(gate_and_merge, fullgraph=True)
    x = make_logits(gen, 33, counts)
    for a, b in zip(compiled(x), gate_and_merge(x), strict=True):
        torch.testing.assert_close(a, b)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    gate_and_merge(x1)[1].sum().backward()
    compiled(x2)[1].sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_class_counts_reach_the_device_once(backend, gen, monkeypatch):
    """Forward and backward build their index tensors once per (class_counts, device): no host-to-device copy
    per call (it blocks, and is illegal during CUDA-graph capture). Also under inference mode first."""
    counts = [4, 1, 6, 2, 9]
    x = make_logits(gen, 5, counts, device=device_for(backend))

    def step():
        leaf = x.clone().requires_grad_()
        stats = nf.logit_statistics(leaf, counts, stats=STATISTICS, backend=backend)
        merged = nf.combine_logits(leaf, counts, method="third_quartile", backend=backend)
        (stats.nan_to_num(0.0).sum() + merged.sum()).backward()
        return leaf.grad

    with torch.inference_mode():
        nf.logit_statistics(x, counts, stats=STATISTICS, backend=backend)
    first = step()
    made = []
    real_tensor = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or real_tensor(*a, **k))
    torch.testing.assert_close(step(), first, rtol=0, atol=0)
    assert made == [], f"torch.tensor called per step with {made}"


# ---- backends and errors ----


def test_auto_backend_on_cpu_picks_the_native_kernel():
    from netmerge_fast._backends import resolve

    expected = "cpu" if nf.backends()["cpu"].available else "torch"
    for op in ("logit_statistics", "combine_logits"):
        assert resolve(op, "auto", torch.device("cpu"), torch.float32) == expected
        assert resolve(op, "auto", torch.device("cpu"), torch.float64) == "torch"


@pytest.mark.parametrize(
    "kwargs, exc, needle",
    [
        ({"logits": torch.randn(4, 8), "class_counts": None}, ValueError, "class_counts"),
        ({"class_counts": [3, 4]}, ValueError, "class_counts"),
        ({"class_counts": [3, 0, 5]}, ValueError, r"class_counts\[1\]"),
        ({"class_counts": [3, 5.0]}, TypeError, r"class_counts\[1\]"),
        ({"class_counts": "35"}, TypeError, "class_counts"),
        ({"class_counts": torch.tensor([3.0, 5.0])}, TypeError, "class_counts"),
        ({"logits": [], "class_counts": None}, ValueError, "logits"),
        ({"logits": [torch.randn(4, 3), torch.randn(5, 5)], "class_counts": None}, ValueError, r"logits\[1\]"),
        ({"logits": [torch.randn(4, 3), torch.randn(4, 5).double()], "class_counts": None}, TypeError, r"logits\[1\]"),
        ({"logits": [torch.randn(4, 3), torch.randn(4, 5)], "class_counts": [3, 4]}, ValueError, "class_counts"),
        ({"logits": [torch.randn(4, 3), torch.randn(4, 0)], "class_counts": None}, ValueError, "class_counts"),
        ({"logits": torch.randn(8)}, ValueError, "logits"),
        ({"logits": torch.ones(4, 8, dtype=torch.int64)}, TypeError, "logits"),
        ({"logits": [[1.0, 2.0]], "class_counts": None}, TypeError, r"logits\[0\]"),
        ({"stats": ("mean", "mode")}, ValueError, "stats"),
        ({"stats": ()}, TypeError, "stats"),
        ({"backend": "gpu"}, ValueError, "backend"),
        ({"logits": torch.randn(4, 8, dtype=torch.float64), "backend": "cpu"}, TypeError, "float64"),
    ],
)
def test_statistics_bad_input_names_the_argument(kwargs, exc, needle):
    args = {"logits": torch.randn(4, 8), "class_counts": [3, 5]}
    args.update(kwargs)
    if args.get("backend") == "cpu" and not nf.backends()["cpu"].available:
        pytest.skip("needs the cpu backend")
    with pytest.raises(exc, match=needle):
        nf.logit_statistics(args.pop("logits"), args.pop("class_counts"), **args)


@pytest.mark.parametrize(
    "kwargs, exc, needle",
    [
        ({"method": "vote"}, ValueError, "method"),
        ({"method": "gate"}, ValueError, "gate"),
        ({"method": "std", "gate": torch.randn(4, 2)}, ValueError, "gate"),
        ({"method": "gate", "gate": torch.randn(4, 3)}, ValueError, "gate"),
        ({"method": "gate", "gate": torch.randn(2)}, ValueError, "gate"),
        ({"method": "gate", "gate": torch.ones(4, 2, dtype=torch.int64)}, TypeError, "gate"),
        ({"method": "gate", "gate": [[1.0, 0.0]] * 4}, TypeError, "gate"),
        ({"return_winner": 1}, TypeError, "return_winner"),
        ({"class_counts": [4, 5]}, ValueError, "class_counts"),
        ({"backend": "triton"}, ValueError, "backend"),
    ],
)
def test_combine_bad_input_names_the_argument(kwargs, exc, needle):
    args = {"logits": torch.randn(4, 8), "class_counts": [3, 5]}
    args.update(kwargs)
    with pytest.raises(exc, match=needle):
        nf.combine_logits(args.pop("logits"), args.pop("class_counts"), **args)


# ---- CUDA (skipped without a GPU) ----


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cuda_matches_cpu_and_reference(layout, dtype, gen):
    counts = LAYOUTS[layout]
    x = make_logits(gen, 300, counts, dtype)
    for form in FORMS:
        got = check_statistics(x.cuda(), counts, STATISTICS, "cuda", form)
        torch.testing.assert_close(
            got,
            nf.logit_statistics(x, counts, stats=STATISTICS, backend="cpu"),
            equal_nan=True,
            **statistics_tolerance(x, counts),
        )
    for method in [m for m in METHODS if m != "gate"]:
        check_combine(x.cuda(), counts, method, "cuda", max_ambiguous=0.1)


@pytest.mark.cuda
def test_cuda_adversarial_and_large(gen):
    for dtype in DTYPES:
        x = adversarial_logits(gen, 40, ADVERSARIAL_COUNTS).to(dtype).cuda()
        check_statistics(x, ADVERSARIAL_COUNTS, STATISTICS, "cuda")
        for method in [m for m in METHODS if m != "gate"]:
            check_combine(x, ADVERSARIAL_COUNTS, method, "cuda")
    check_statistics(make_logits(gen, 3, [100_000, 7], device="cuda"), [100_000, 7], STATISTICS, "cuda")
    check_statistics(make_logits(gen, 5, [3] * 1024, device="cuda"), [3] * 1024, STATISTICS, "cuda")
