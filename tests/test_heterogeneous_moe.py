"""HeterogeneousMoE, PAN, UniversalGate and the augmentations against independent references: combine_logits
called by hand, and plain per-row loops."""

import pytest
import torch
from torch import nn

from netmerge_fast import combine_logits, reference
from netmerge_fast.nn import COMBINERS, PAN, HeterogeneousMoE, UniversalGate
from netmerge_fast.nn.augmentations import AUGMENTATIONS
from netmerge_fast.nn.heterogeneous_moe import DATA_FREE_COMBINERS, aggregate_passes
from netmerge_fast.nn.universal_gate import (
    CALIBRATED_GATE_FEATURES,
    NORMALISED_FEATURES,
    calibration_moments,
    expert_features,
)

COUNTS = [3, 5, 2]


class Counting(nn.Module):
    """A linear expert that counts its calls and can also return its input as the feature."""

    def __init__(self, classes: int, seed: int, with_features: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.Tanh())
        self.head = nn.Linear(6, classes)
        self.calls = 0
        self.with_features = with_features

    def forward(self, x):
        self.calls += 1
        feature = self.body(x)
        logits = self.head(feature) * 3
        return (logits, feature) if self.with_features else logits


def make_experts(with_features=False):
    return [Counting(c, seed=i, with_features=with_features) for i, c in enumerate(COUNTS)]


def by_hand(experts, x):
    return [e(x) for e in experts]


def select_row_loop(logits, winners):
    """Winner takes all, one row at a time: the winner's logits, every other slot its minimum (-1: concatenation)."""
    rows = []
    for b, w in enumerate(winners.tolist()):
        if w < 0:
            rows.append(torch.cat([t[b] for t in logits]))
        else:
            fill = logits[w][b].min()
            rows.append(torch.cat([t[b] if e == w else torch.full_like(t[b], fill) for e, t in enumerate(logits)]))
    return torch.stack(rows)


@pytest.mark.parametrize("combiner", DATA_FREE_COMBINERS)
def test_data_free_combiners_match_combine_logits(combiner, gen):
    experts = make_experts()
    x = torch.randn(17, 1, 4, 4, generator=gen)
    moe = HeterogeneousMoE(experts, COUNTS, combiner).eval()
    with torch.no_grad():
        out, winner = moe(x, return_winner=True)
        want, want_winner = combine_logits(by_hand(experts, x), COUNTS, method=combiner, return_winner=True)
    torch.testing.assert_close(out, want, equal_nan=True)
    torch.testing.assert_close(winner, want_winner)
    assert out.shape == (17, sum(COUNTS))


def test_every_expert_runs_once_per_forward_even_with_augmented_passes(gen):
    experts = make_experts()
    moe = HeterogeneousMoE(experts, COUNTS, "naive", augmentations=list(AUGMENTATIONS))
    moe(torch.randn(4, 1, 4, 4, generator=gen))
    assert [e.calls for e in experts] == [1, 1, 1]


def test_pan_logits_claims_follow_the_seed_rule(gen):
    experts = make_experts()
    moe = HeterogeneousMoE(experts, COUNTS, "pan_logits").eval()
    x = torch.randn(40, 1, 4, 4, generator=gen)
    with torch.no_grad():
        out, winner = moe(x, return_winner=True)
        logits = by_hand(experts, x)
        claims = torch.stack([(p(lg)[:, 1] > p(lg)[:, 0]) for p, lg in zip(moe.pans, logits, strict=True)], 1)
    single = claims.sum(1) == 1
    want_winner = torch.where(single, claims.float().argmax(1), -1)
    torch.testing.assert_close(winner, want_winner)
    torch.testing.assert_close(out, select_row_loop(logits, want_winner))


@pytest.mark.parametrize("hook", ["tuple", "feature_modules"])
def test_pan_features_reads_the_features(hook, gen):
    experts = make_experts(with_features=hook == "tuple")
    modules = [e.body for e in experts] if hook == "feature_modules" else None
    moe = HeterogeneousMoE(experts, COUNTS, "pan_features", feature_modules=modules, feature_dims=[6, 6, 6]).eval()
    x = torch.randn(30, 1, 4, 4, generator=gen)
    with torch.no_grad():
        _, winner = moe(x, return_winner=True)
        feats = [e.body(x) for e in experts]
        claims = torch.stack([p.claims(f) for p, f in zip(moe.pans, feats, strict=True)], 1)
    torch.testing.assert_close(winner, torch.where(claims.sum(1) == 1, claims.float().argmax(1), -1))


def test_pan_features_without_features_is_an_error(gen):
    moe = HeterogeneousMoE(make_experts(), COUNTS, "pan_features", feature_dims=[6, 6, 6])
    with pytest.raises(ValueError, match="feature"):
        moe(torch.randn(2, 1, 4, 4, generator=gen))


def test_universal_gate_scores_match_a_loop_over_experts(gen):
    experts = make_experts()
    gate = UniversalGate(stats=("mean", "std", "max", "min", "median"))
    moe = HeterogeneousMoE(experts, COUNTS, "universal", gate=gate).eval()
    x = torch.randn(25, 1, 4, 4, generator=gen)
    with torch.no_grad():
        out, winner = moe(x, return_winner=True)
        logits = by_hand(experts, x)
        scores = []
        for lg in logits:  # one expert at a time, through the reference statistics
            stats = reference.logit_statistics([lg], [lg.shape[1]], stats=gate.stats)[:, 0]
            o = gate.net(stats)
            scores.append(o[:, 1] - o[:, 0])
        want_winner = torch.stack(scores, 1).argmax(1)
    torch.testing.assert_close(winner, want_winner)
    torch.testing.assert_close(out, select_row_loop(logits, want_winner))


def test_universal_gate_derived_features_match_formulas(gen):
    counts = [1, 2, 5, 10]
    logits = [3 * torch.randn(7, c, generator=gen, dtype=torch.float64) for c in counts]
    gate = UniversalGate(stats=("max_prob_norm", "entropy_norm", "margin", "max_minus_median", "mean"))
    got = gate.statistics(logits)
    assert got.shape == (7, 4, 5)
    for e, (lg, c) in enumerate(zip(logits, counts, strict=True)):
        p = lg.softmax(1)
        entropy = -(p * p.log()).sum(1)
        want_prob = (p.max(1).values - 1 / c) / (1 - 1 / c) if c > 1 else torch.ones(7, dtype=lg.dtype)
        want_entropy = entropy / torch.tensor(float(c)).log() if c > 1 else torch.zeros(7, dtype=lg.dtype)
        torch.testing.assert_close(got[:, e, 0], want_prob)
        torch.testing.assert_close(got[:, e, 1], want_entropy)
        torch.testing.assert_close(got[:, e, 3], lg.max(1).values - lg.quantile(0.5, dim=1))
        torch.testing.assert_close(got[:, e, 4], lg.mean(1))
    # the same from one packed tensor with class_counts; and gradients reach the logits
    packed = torch.cat(logits, 1).requires_grad_(True)
    torch.testing.assert_close(gate.statistics(packed, counts), got)
    packed = torch.cat(logits, 1).float().requires_grad_(True)
    gate.scores(packed[:, 1:], counts[1:]).sum().backward()
    assert torch.isfinite(packed.grad[:, 1:]).all() and packed.grad[:, 1:].abs().sum() > 0


def test_universal_gate_features_are_on_one_scale_for_any_class_count():
    # a certain expert reads (1, 0, ...) and an undecided one (0, 1, ...) whatever its class count
    for c in (2, 3, 10):
        certain = torch.full((1, c), -50.0)
        certain[0, 0] = 50.0
        stats = UniversalGate().statistics([certain, torch.zeros(1, c)])[0]
        torch.testing.assert_close(stats[:, :2], torch.tensor([[1.0, 0.0], [0.0, 1.0]]), atol=1e-5, rtol=0)


def test_universal_uses_the_bundled_gate_by_default():
    moe = HeterogeneousMoE(make_experts(), COUNTS, "universal")
    bundled = UniversalGate.pretrained()
    assert moe.gate.stats == CALIBRATED_GATE_FEATURES == (*NORMALISED_FEATURES, "z_max", "z_margin")
    for a, b in zip(moe.gate.state_dict().values(), bundled.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="stats"):
        UniversalGate.pretrained(stats=("mean", "std", "max", "min"))
    # the first bundled gate keeps loading, on its own features
    assert UniversalGate.pretrained(version=1).stats == NORMALISED_FEATURES
    with pytest.raises(ValueError, match="version"):
        UniversalGate.pretrained(version=3)


def test_oracle_selects_the_true_domain(gen):
    experts = make_experts()
    x = torch.randn(12, 1, 4, 4, generator=gen)
    domain = torch.randint(0, 3, (12,), generator=gen)
    moe = HeterogeneousMoE(experts, COUNTS, "oracle").eval()
    with torch.no_grad():
        out, winner = moe(x, domain, return_winner=True)
        want = select_row_loop(by_hand(experts, x), domain)
    torch.testing.assert_close(winner, domain)
    torch.testing.assert_close(out, want)
    with pytest.raises(ValueError, match="domain"):
        moe(x)
    with pytest.raises(ValueError, match="domain"):
        moe(x, torch.full((12,), 3))
    with pytest.raises(ValueError, match="domain"):
        HeterogeneousMoE(experts, COUNTS, "naive")(x, domain)


@pytest.mark.parametrize("aggregate", ["mean", "vote"])
def test_augmented_passes_aggregate_like_a_loop(aggregate, gen):
    experts = make_experts()
    augs = [lambda x: 2 * x, lambda x: -x, lambda x: x.flip(-1)]
    moe = HeterogeneousMoE(experts, COUNTS, "std", augmentations=augs, aggregate=aggregate).eval()
    x = torch.randn(9, 1, 4, 4, generator=gen)
    with torch.no_grad():
        out = moe(x)
        passes = [combine_logits(by_hand(experts, v), COUNTS, method="std") for v in [x, *(a(x) for a in augs)]]
    if aggregate == "mean":
        torch.testing.assert_close(out, torch.stack(passes).mean(0))
    else:
        answers = torch.stack([p.argmax(1) for p in passes])  # [P, B]
        for b in range(9):
            votes = torch.zeros(sum(COUNTS))
            for p in passes:
                votes[p[b].argmax()] += 1
            torch.testing.assert_close(out[b], votes)
        # the seed's rule: torch.mode of the passes' answers (ties to the lowest class index)
        torch.testing.assert_close(out.argmax(1), torch.mode(answers, 0).values)


def test_vote_ties_go_to_the_lowest_class():
    # 4 passes over 5 classes: row 0 votes 3, 1, 1, 3 (tie 1/3 -> 1); row 1 votes 4, 0, 2, 2 (2 wins)
    answers = torch.tensor([[3, 4], [1, 0], [1, 2], [3, 2]])
    combined = nn.functional.one_hot(answers, 5).float() + 0.1 * torch.rand(4, 2, 5)
    votes = aggregate_passes(combined, "vote")
    assert votes.argmax(1).tolist() == [1, 2] == torch.mode(answers, 0).values.tolist()
    torch.testing.assert_close(aggregate_passes(combined, "mean"), combined.mean(0))
    with pytest.raises(ValueError, match="aggregate"):
        aggregate_passes(combined, "median")


def test_pan_shape_and_claims(gen):
    pan = PAN(7)
    assert [m.out_features for m in pan.net if isinstance(m, nn.Linear)] == [80, 60, 2]
    out = pan(torch.randn(4, 7, generator=gen))
    assert out.shape == (4, 2)
    with pytest.raises(ValueError, match=r"\[B, 7\]"):
        pan(torch.randn(4, 6))


def test_universal_gate_sizes():
    gate = UniversalGate()
    assert [m.out_features for m in gate.net if isinstance(m, nn.Linear)] == [80, 50, 20, 2]
    with pytest.raises(ValueError, match="stats"):
        UniversalGate(stats=("mean", "nope"))
    with pytest.raises(TypeError, match="stats"):
        UniversalGate(stats="mean")
    with pytest.raises(ValueError, match="stats"):
        UniversalGate(stats=("max_prob_norm", "entropy_nrom"))
    assert UniversalGate(stats=("entropy_norm", "std")).net[0].in_features == 2


def test_gradients_reach_the_experts(gen):
    experts = make_experts()
    moe = HeterogeneousMoE(experts, COUNTS, "naive")
    moe(torch.randn(3, 1, 4, 4, generator=gen)).sum().backward()
    assert all(e.head.weight.grad is not None for e in experts)


def test_bad_arguments_name_themselves():
    experts = make_experts()
    with pytest.raises(ValueError, match="class_counts"):
        HeterogeneousMoE(experts, [3, 5])
    with pytest.raises(ValueError, match="experts"):
        HeterogeneousMoE(experts[:1], [3])
    with pytest.raises(TypeError, match="experts"):
        HeterogeneousMoE(experts[0], COUNTS)
    with pytest.raises(TypeError, match=r"experts\[1\]"):
        HeterogeneousMoE([experts[0], "x", experts[2]], COUNTS)
    with pytest.raises(ValueError, match="combiner"):
        HeterogeneousMoE(experts, COUNTS, "gate")
    with pytest.raises(ValueError, match="aggregate"):
        HeterogeneousMoE(experts, COUNTS, aggregate="median")
    with pytest.raises(ValueError, match=r"augmentations\[0\]"):
        HeterogeneousMoE(experts, COUNTS, augmentations=["blur"])
    with pytest.raises(ValueError, match="gate"):
        HeterogeneousMoE(experts, COUNTS, "naive", gate=UniversalGate())
    with pytest.raises(ValueError, match=r"class_counts\[1\]"):
        HeterogeneousMoE(experts, [3, 4, 2])(torch.randn(2, 1, 4, 4))  # expert 1 answers over 5 classes
    with pytest.raises(ValueError, match=r"class_counts\[2\]"):
        HeterogeneousMoE(experts, [3, 5, 0])


def test_experts_on_different_devices_are_an_error():
    meta = nn.Linear(16, 5, device="meta")
    with pytest.raises(ValueError, match=r"experts\[1\] is on meta"):
        HeterogeneousMoE([nn.Linear(16, 3), meta], [3, 5])


def test_combiner_list_is_complete():
    assert set(COMBINERS) >= {"naive", "std", "pan_logits", "pan_features", "universal", "oracle"}


def test_gate_files_are_byte_reproducible_and_old_files_load(tmp_path):
    import json

    from safetensors.torch import save_file

    gate = UniversalGate(stats=("entropy_norm", "mean"))
    blobs = set()
    for i in range(8):  # metadata in several keys would come out in varying (hash) order
        gate.save(tmp_path / f"g{i}.safetensors")
        blobs.add((tmp_path / f"g{i}.safetensors").read_bytes())
    assert len(blobs) == 1
    # a file in the first layout (format and config as two metadata keys) still loads
    config = json.dumps(gate.config(), sort_keys=True)
    state = {k: v.contiguous() for k, v in gate.state_dict().items()}
    save_file(state, tmp_path / "old.safetensors", metadata={"format": "netmerge-fast-gates/1", "config": config})
    loaded = UniversalGate.load(tmp_path / "old.safetensors")
    assert loaded.stats == gate.stats
    for a, b in zip(loaded.state_dict().values(), gate.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    save_file(state, tmp_path / "alien.safetensors", metadata={"format": "other/1"})
    with pytest.raises(ValueError, match="not a netmerge-fast gate file"):
        UniversalGate.load(tmp_path / "alien.safetensors")


def stats_by_hand(row: torch.Tensor) -> torch.Tensor:
    """The seed's compute_agnostic_stats for one row: mean, unbiased std, max."""
    n = row.numel()
    mean = sum(row.tolist()) / n
    std = (sum((v - mean) ** 2 for v in row.tolist()) / (n - 1)) ** 0.5
    return torch.tensor([mean, std, max(row.tolist())])


def test_pan_statistics_matches_a_per_row_loop(gen):
    experts = make_experts()
    moe = HeterogeneousMoE(experts, COUNTS, "pan_statistics").eval()
    assert [[m.out_features for m in p.net if isinstance(m, nn.Linear)] for p in moe.pans] == [[80, 50, 20, 2]] * 3
    x = torch.randn(40, 1, 4, 4, generator=gen)
    with torch.no_grad():
        out, winner = moe(x, return_winner=True)
        logits = by_hand(experts, x)
        want = []
        for b in range(40):  # one row, one expert at a time: statistics, PAN, then the exactly-one-claim rule
            claims = []
            for pan, lg in zip(moe.pans, logits, strict=True):
                o = pan.net(stats_by_hand(lg[b]).unsqueeze(0))[0]
                claims.append(bool(o[1] > o[0]))
            want.append(claims.index(True) if sum(claims) == 1 else -1)
    want = torch.tensor(want)
    assert (want >= 0).any() and (want < 0).any()  # both branches of the rule are exercised
    torch.testing.assert_close(winner, want)
    torch.testing.assert_close(out, select_row_loop(logits, want))


def test_pan_statistics_with_other_features(gen):
    experts = make_experts()
    moe = HeterogeneousMoE(experts, COUNTS, "pan_statistics", pan_stats=("max_prob_norm", "z_margin")).eval()
    assert [p.in_features for p in moe.pans] == [2, 2, 2]
    x = torch.randn(20, 1, 4, 4, generator=gen)
    with torch.no_grad():
        _, winner = moe(x, return_winner=True)  # the first forward calibrates (z_margin)
        feats = expert_features(by_hand(experts, x), COUNTS, moe.pan_stats, moe.calibration)
        claims = torch.stack([p.claims(feats[:, i]) for i, p in enumerate(moe.pans)], 1)
    torch.testing.assert_close(winner, torch.where(claims.sum(1) == 1, claims.float().argmax(1), -1))


def test_calibration_matches_a_direct_computation():
    experts = make_experts()
    moe = HeterogeneousMoE(experts, COUNTS, "universal", gate=UniversalGate(("z_max", "margin", "z_margin")))
    moe.calibrate((1, 4, 4), count=500, seed=7)
    noise = torch.randn(500, 1, 4, 4, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for i, e in enumerate(experts):
            lg = e(noise).double()
            top2 = lg.topk(2, dim=1).values
            for k, values in enumerate([lg.max(1).values, top2[:, 0] - top2[:, 1]]):  # max, then margin
                torch.testing.assert_close(moe.calibration[i, k, 0].double(), values.mean(), rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(moe.calibration[i, k, 1].double(), values.std(), rtol=1e-4, atol=1e-5)
        # the z features are the features standardised by those moments
        x = torch.randn(9, 1, 4, 4)
        feats = moe.gate.statistics(by_hand(experts, x), COUNTS, moe.calibration)
        for i, e in enumerate(experts):
            lg = e(x)
            top2 = lg.topk(2, dim=1).values
            z_max = (lg.max(1).values - moe.calibration[i, 0, 0]) / moe.calibration[i, 0, 1]
            margin = top2[:, 0] - top2[:, 1]
            z_margin = (margin - moe.calibration[i, 1, 0]) / moe.calibration[i, 1, 1]
            torch.testing.assert_close(feats[:, i], torch.stack([z_max, margin, z_margin], 1))


def test_calibrated_features_ignore_an_experts_temperature_and_offset(gen):
    logits = [torch.randn(300, c, generator=gen) for c in COUNTS]
    x = [torch.randn(10, c, generator=gen) for c in COUNTS]
    stats = ("z_max", "z_margin")
    plain = expert_features(x, COUNTS, stats, calibration_moments(logits, COUNTS, stats))
    scaled = [3.0 * t + 5.0 for t in logits]  # another temperature and offset, same expert
    scaled_x = [3.0 * t + 5.0 for t in x]
    again = expert_features(scaled_x, COUNTS, stats, calibration_moments(scaled, COUNTS, stats))
    torch.testing.assert_close(again, plain, rtol=1e-4, atol=1e-4)


def test_the_first_forward_calibrates_on_noise_shaped_like_the_input(gen):
    experts = make_experts()
    moe = HeterogeneousMoE(experts, COUNTS, "universal").eval()  # the bundled gate reads z_ features
    assert moe.needs_calibration and not moe.calibrated
    x = torch.randn(5, 1, 4, 4, generator=gen)
    out = moe(x)
    assert moe.calibrated and moe.calibration.shape == (3, 2, 2)
    explicit = HeterogeneousMoE(experts, COUNTS, "universal").calibrate((1, 4, 4))
    torch.testing.assert_close(moe.calibration, explicit.calibration)
    torch.testing.assert_close(out, explicit.eval()(x))
    # own reference inputs instead of the default noise
    own = HeterogeneousMoE(experts, COUNTS, "universal").calibrate(inputs=2 * torch.rand(64, 1, 4, 4))
    assert not torch.equal(own.calibration, explicit.calibration)
    # experts keep their mode
    experts[0].train()
    HeterogeneousMoE(experts, COUNTS, "universal").calibrate((1, 4, 4))
    assert experts[0].training


def test_calibrated_scores_compile_without_graph_breaks(gen):
    experts = make_experts()
    moe = HeterogeneousMoE(experts, COUNTS, "universal").calibrate((1, 4, 4)).eval()
    logits = [lg.detach() for lg in by_hand(experts, torch.randn(6, 1, 4, 4, generator=gen))]

    def scores(*lg):
        return moe.gate_output(list(lg))

    compiled = torch.compile(scores, fullgraph=True)  # a host sync (.item(), data-dependent branch) would break it
    torch.testing.assert_close(compiled(*logits), scores(*logits))


def test_calibration_errors(gen):
    experts = make_experts()
    moe = HeterogeneousMoE(experts, COUNTS, "universal")
    logits = by_hand(experts, torch.randn(3, 1, 4, 4, generator=gen))
    with pytest.raises(RuntimeError, match="calibrate"):
        moe.gate_output(logits)
    with pytest.raises(ValueError, match="input_shape"):
        moe.calibrate()
    with pytest.raises(ValueError, match="count"):
        moe.calibrate((1, 4, 4), count=1)
    with pytest.raises(ValueError, match=r"input_shape\[1\]"):
        moe.calibrate((1, 0, 4))
    with pytest.raises(ValueError, match="inputs"):
        moe.calibrate(inputs=torch.randn(1, 1, 4, 4))
    with pytest.raises(TypeError, match="inputs"):
        moe.calibrate(inputs=torch.ones(4, 1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="calibration is required"):
        expert_features(logits, COUNTS, ("z_max",))
    with pytest.raises(ValueError, match=r"calibration must be \[E, 1, 2\]"):
        expert_features(logits, COUNTS, ("z_max",), torch.zeros(3, 2, 2))
    with pytest.raises(ValueError, match="2 reference rows"):
        calibration_moments([t[:1] for t in logits], COUNTS, ("z_max",))
    # a gate without z_ features needs none
    plain = HeterogeneousMoE(experts, COUNTS, "universal", gate=UniversalGate(NORMALISED_FEATURES))
    assert not plain.needs_calibration
    plain.gate_output(logits)


def test_pan_stats_errors():
    experts = make_experts()
    with pytest.raises(ValueError, match="pan_stats"):
        HeterogeneousMoE(experts, COUNTS, "pan_statistics", pan_stats=("mean", "nope"))
    with pytest.raises(TypeError, match="pan_stats"):
        HeterogeneousMoE(experts, COUNTS, "pan_statistics", pan_stats="mean")
    with pytest.raises(ValueError, match="pan_stats is only used"):
        HeterogeneousMoE(experts, COUNTS, "pan_logits", pan_stats=("mean",))
    HeterogeneousMoE(experts, COUNTS, "pan_logits", pan_stats=["mean", "std", "max"])  # the default, as a list


def test_standardised_gate_reads_scaled_features_and_round_trips(tmp_path, gen):
    gate = UniversalGate(("margin", "max"), standardise=True)
    features = torch.randn(50, 3, 2, generator=gen) * torch.tensor([10.0, 0.1]) + 4
    gate.fit_standardisation(features)
    rows = features.reshape(-1, 2)
    torch.testing.assert_close(gate.input_mean, rows.mean(0))
    torch.testing.assert_close(gate.input_std, rows.std(0))
    torch.testing.assert_close(gate(features), gate.net((features - rows.mean(0)) / rows.std(0)))
    gate.save(tmp_path / "g.safetensors")
    loaded = UniversalGate.load(tmp_path / "g.safetensors")
    assert loaded.standardise and loaded.config() == gate.config()
    torch.testing.assert_close(loaded(features), gate(features))
    with pytest.raises(ValueError, match="standardise"):
        HeterogeneousMoE(make_experts(), COUNTS, "universal", gate=UniversalGate(("margin", "max"))).load_gates(
            tmp_path / "g.safetensors"
        )
    with pytest.raises(ValueError, match="standardise=True"):
        UniversalGate(("margin",)).fit_standardisation(features[..., :1])
    with pytest.raises(ValueError, match="2 rows"):
        gate.fit_standardisation(torch.full((3, 2), float("nan")))
    with pytest.raises(TypeError, match="standardise"):
        UniversalGate(("margin",), standardise="yes")
