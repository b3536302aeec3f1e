"""GatingTrainer end to end on a slice of problem 1 (digits 0-4 / 5-9), reproducibility, files, bad input."""

import io
import socket
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from netmerge_fast.nn import HeterogeneousMoE, UniversalGate
from netmerge_fast.nn.universal_gate import CALIBRATED_GATE_FEATURES
from netmerge_fast.training import GatingTrainer

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def problem1():
    """Problem 1 with its two experts (few epochs), on one thread: tiny models are slower with thread sync."""
    from netmerge_fast.demo.data import problem
    from netmerge_fast.demo.experts import train_expert

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    p = problem("disjoint_digits")
    experts = [
        train_expert(x, y, c, seed=i, epochs=8)
        for i, ((x, y), c) in enumerate(zip(p.experts_data, [5, 5], strict=True))
    ]
    yield p, experts
    torch.set_num_threads(threads)


def accuracy(moe, p):
    with torch.no_grad():
        return (moe.eval()(p.x_test).argmax(1) == p.y_test).float().mean().item()


def test_gated_combiners_beat_naive_concatenation(problem1):
    p, experts = problem1
    naive = accuracy(HeterogeneousMoE(experts, [5, 5], "naive"), p)
    for combiner in ("pan_logits", "pan_features"):
        moe = HeterogeneousMoE(experts, [5, 5], combiner, feature_modules=[e.body for e in experts])
        report = (
            GatingTrainer(moe, seed=0, progress=False)
            .fit(p.x_train, p.owner_train, epochs=30)
            .evaluate(p.x_test, p.owner_test, p.y_test)
        )
        assert report.accuracy == pytest.approx(accuracy(moe, p))
        assert report.accuracy > naive + 0.02, (combiner, report.accuracy, naive)
        assert report.confusion.sum() == len(p.y_test)


def test_data_free_pan_learns_membership_from_own_data_only(problem1):
    p, experts = problem1
    moe = HeterogeneousMoE(experts, [5, 5], "pan_logits")
    own = [x for x, _ in p.experts_data]
    report = GatingTrainer(moe, seed=0, progress=False).fit_data_free(own, epochs=20).evaluate(p.x_test, p.owner_test)
    # Each expert's own test inputs are mostly claimed by it alone (two experts: chance would be 25%).
    diagonal = report.confusion.diag().sum().item() / report.confusion.sum().item()
    assert diagonal == pytest.approx(report.gate_accuracy)
    assert report.gate_accuracy > 0.6


def test_universal_gate_trains_and_transfers_through_a_file(problem1, tmp_path):
    p, experts = problem1
    moe = HeterogeneousMoE(experts, [5, 5], "universal", gate=UniversalGate())
    trainer = GatingTrainer(moe, seed=3, progress=False).fit(p.x_train, p.owner_train, epochs=10)
    assert trainer.evaluate(p.x_test, p.owner_test).gate_accuracy > 0.75
    trainer.save(tmp_path / "u.safetensors")
    loaded = UniversalGate.load(tmp_path / "u.safetensors")
    fresh = HeterogeneousMoE(experts, [5, 5], "universal", gate=loaded)
    torch.testing.assert_close(fresh.eval()(p.x_test[:50]), moe.eval()(p.x_test[:50]))


def test_universal_gate_from_problem1_routes_five_two_class_experts(problem1, tmp_path):
    # Trained on two 5-class experts only, applied to five 2-class experts it never saw (no data from them):
    # the class-count-normalised features must keep it well above chance (1/5 of the rows routed right).
    from netmerge_fast.demo.data import problem
    from netmerge_fast.demo.experts import train_expert

    p, experts = problem1
    moe = HeterogeneousMoE(experts, [5, 5], "universal", gate=UniversalGate())
    GatingTrainer(moe, seed=0, progress=False).fit(p.x_train, p.owner_train, epochs=10)
    moe.gate.save(tmp_path / "u.safetensors")
    p3 = problem("five_experts")
    five = [train_expert(x, y, 2, seed=20 + i, epochs=8) for i, (x, y) in enumerate(p3.experts_data)]
    target = HeterogeneousMoE(five, [2] * 5, "universal", gate=UniversalGate.load(tmp_path / "u.safetensors"))
    report = GatingTrainer(target, progress=False).evaluate(p3.x_test, p3.owner_test, p3.y_test)
    naive = accuracy(HeterogeneousMoE(five, [2] * 5, "naive"), p3)
    assert report.gate_accuracy > 0.5, report.confusion
    assert report.accuracy > naive - 0.1, (report.accuracy, naive)


def test_fit_is_reproducible_and_accepts_dataloaders(problem1):
    p, experts = problem1
    x, owner = p.x_train[:300], p.owner_train[:300]
    states = []
    for inputs, own in [(x, owner), (x, owner), (DataLoader(TensorDataset(x, owner), batch_size=37), None)]:
        moe = HeterogeneousMoE(experts, [5, 5], "pan_logits")
        GatingTrainer(moe, seed=7, progress=False).fit(inputs, own, epochs=3)
        states.append(moe.pans.state_dict())
    for other in states[1:]:
        for a, b in zip(states[0].values(), other.values(), strict=True):
            torch.testing.assert_close(a, b)


def test_evaluate_confusion_matches_a_loop(problem1):
    p, experts = problem1
    moe = HeterogeneousMoE(experts, [5, 5], "std")
    report = GatingTrainer(moe, progress=False).evaluate(p.x_test, p.owner_test, p.y_test)
    _, winner = moe.eval()(p.x_test, return_winner=True)
    want = torch.zeros(2, 3, dtype=torch.int64)
    for o, w in zip(p.owner_test.tolist(), winner.tolist(), strict=True):
        want[o, w if w >= 0 else 2] += 1
    torch.testing.assert_close(report.confusion, want)
    assert report.gate_accuracy == pytest.approx((want[0, 0] + want[1, 1]).item() / len(winner))


def test_save_load_round_trip_and_refusals(problem1, tmp_path):
    p, experts = problem1
    moe = HeterogeneousMoE(experts, [5, 5], "pan_features", feature_modules=[e.body for e in experts])
    trainer = GatingTrainer(moe, seed=1, progress=False).fit(p.x_train[:200], p.owner_train[:200], epochs=2)
    path = tmp_path / "pans.safetensors"
    trainer.save(path)
    again = HeterogeneousMoE(experts, [5, 5], "pan_features", feature_modules=[e.body for e in experts])
    GatingTrainer(again, progress=False).load(path)
    torch.testing.assert_close(again.eval()(p.x_test), moe.eval()(p.x_test))

    with pytest.raises(ValueError, match="kind"):  # a features PAN file into a logits-PAN model
        HeterogeneousMoE(experts, [5, 5], "pan_logits").load_gates(path)
    wrong_sizes = HeterogeneousMoE(experts, [5, 5], "pan_features", feature_dims=[64, 32])
    with pytest.raises(ValueError, match="in_features"):
        wrong_sizes.load_gates(path)
    UniversalGate(stats=("mean", "std", "max", "min")).save(tmp_path / "u4.safetensors")
    with pytest.raises(ValueError, match="stats"):
        HeterogeneousMoE(experts, [5, 5], "universal").load_gates(tmp_path / "u4.safetensors")
    # the paper's statistics and the normalised features are different gates of the same size
    UniversalGate(stats=("mean", "std", "max", "median")).save(tmp_path / "raw4.safetensors")
    with pytest.raises(ValueError, match=r"stats.*max_prob_norm"):
        HeterogeneousMoE(experts, [5, 5], "universal").load_gates(tmp_path / "raw4.safetensors")
    with pytest.raises(ValueError, match="stats"):
        UniversalGate.load(tmp_path / "raw4.safetensors", stats=UniversalGate().stats)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        HeterogeneousMoE(experts, [5, 5], "universal").load_gates(tmp_path / "junk.safetensors")


def test_bad_trainer_input(problem1):
    p, experts = problem1
    with pytest.raises(TypeError, match="moe"):
        GatingTrainer(experts[0])
    moe = HeterogeneousMoE(experts, [5, 5], "pan_logits")
    trainer = GatingTrainer(moe, progress=False)
    with pytest.raises(ValueError, match="owner"):
        trainer.fit(p.x_train[:10], p.owner_train[:9])
    with pytest.raises(ValueError, match="owner"):
        trainer.fit(p.x_train[:10], torch.full((10,), 2))
    with pytest.raises(ValueError, match="epochs"):
        trainer.fit(p.x_train[:10], p.owner_train[:10], epochs=0)
    with pytest.raises(ValueError, match="val_fraction"):
        GatingTrainer(moe, val_fraction=1.0)
    with pytest.raises(ValueError, match="combiner"):
        GatingTrainer(HeterogeneousMoE(experts, [5, 5], "naive")).fit(p.x_train[:10], p.owner_train[:10])
    with pytest.raises(ValueError, match="own_inputs"):
        trainer.fit_data_free([p.x_train[:10]])
    with pytest.raises(ValueError, match="negatives"):
        trainer.fit_data_free([p.x_train[:10]] * 2, negatives=["blur"])


def test_demo_data_never_touches_the_network(monkeypatch):
    from netmerge_fast.demo import data

    def refuse(*args, **kwargs):
        raise AssertionError("the demo data tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    data.mnist1d.cache_clear()
    x, _, x_test, _ = data.mnist1d()
    assert x.shape == (4000, 1, 8, 8) and x_test.shape == (540, 1, 8, 8)
    data.mnist.cache_clear()
    m, my, m_test, my_test = data.mnist()
    assert m.shape == (4000, 1, 28, 28) and m_test.shape == (1000, 1, 28, 28)
    assert m.min() >= 0.0 and m.max() <= 1.0
    # Stratified: 400 training and 100 test digits of every class.
    assert torch.bincount(my).tolist() == [400] * 10 and torch.bincount(my_test).tolist() == [100] * 10
    # Per-sample standardisation: both domains have zero mean and unit std in every sample.
    for xs in (x, data.digits()[0]):
        flat = xs.flatten(1)
        torch.testing.assert_close(flat.mean(1), torch.zeros(len(flat)), atol=1e-5, rtol=0)
        torch.testing.assert_close(flat.std(1, unbiased=False), torch.ones(len(flat)), atol=1e-3, rtol=0)


def test_pan_statistics_trains_like_the_other_pans(problem1, tmp_path):
    p, experts = problem1
    moe = HeterogeneousMoE(experts, [5, 5], "pan_statistics")
    report = (
        GatingTrainer(moe, seed=0, progress=False)
        .fit(p.x_train, p.owner_train, epochs=20)
        .evaluate(p.x_test, p.owner_test, p.y_test)
    )
    assert report.gate_accuracy > 0.6, report.confusion  # two experts: chance (exactly one right claim) is 25%
    assert report.accuracy == pytest.approx(accuracy(moe, p))
    moe.save_gates(tmp_path / "s.safetensors")
    again = HeterogeneousMoE(experts, [5, 5], "pan_statistics")
    again.load_gates(tmp_path / "s.safetensors")
    torch.testing.assert_close(again.eval()(p.x_test), moe.eval()(p.x_test))
    with pytest.raises(ValueError, match="stats"):
        HeterogeneousMoE(experts, [5, 5], "pan_statistics", pan_stats=("mean", "std", "min")).load_gates(
            tmp_path / "s.safetensors"
        )
    with pytest.raises(ValueError, match="kind"):
        HeterogeneousMoE(experts, [5, 5], "pan_logits").load_gates(tmp_path / "s.safetensors")
    data_free = HeterogeneousMoE(experts, [5, 5], "pan_statistics")
    own = [x for x, _ in p.experts_data]
    GatingTrainer(data_free, seed=0, progress=False).fit_data_free(own, epochs=5)
    assert 0 <= accuracy(data_free, p) <= 1


def test_calibrated_universal_gate_calibrates_and_trains(problem1):
    p, experts = problem1
    moe = HeterogeneousMoE(experts, [5, 5], "universal", gate=UniversalGate(CALIBRATED_GATE_FEATURES))
    assert not moe.calibrated
    trainer = GatingTrainer(moe, seed=0, progress=False).fit(p.x_train, p.owner_train, epochs=10)
    assert moe.calibrated and moe.calibration.shape == (2, 2, 2)
    # the trainer calibrates as the model would: Gaussian noise shaped like one input row
    reference = HeterogeneousMoE(experts, [5, 5], "universal", gate=UniversalGate(CALIBRATED_GATE_FEATURES))
    torch.testing.assert_close(moe.calibration, reference.calibrate(p.x_train.shape[1:]).calibration)
    assert trainer.evaluate(p.x_test, p.owner_test).gate_accuracy > 0.75


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_one_line_per_epoch_in_a_log(problem1, monkeypatch):
    p, experts = problem1
    log = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", log)
    moe = HeterogeneousMoE(experts, [5, 5], "pan_logits")
    GatingTrainer(moe, seed=0, patience=50).fit(p.x_train[:200], p.owner_train[:200], epochs=6)
    lines = log.getvalue().splitlines()
    assert len(lines) == 12 and "\r" not in log.getvalue()  # two PANs, six epochs each
    assert lines[0].startswith("fit pan[0]: epoch 1/6 loss=") and "val_acc=" in lines[0]
    assert lines[-1].startswith("fit pan[1]: epoch 6/6")


def test_progress_bar_on_a_terminal_redraws_a_few_times_a_second(problem1, monkeypatch):
    import time

    p, experts = problem1
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    moe = HeterogeneousMoE(experts, [5, 5], "pan_logits")
    start = time.perf_counter()
    GatingTrainer(moe, seed=0, patience=500, batch_size=512).fit(p.x_train[:400], p.owner_train[:400], epochs=300)
    elapsed = time.perf_counter() - start
    redraws = terminal.getvalue().count("\r")
    # 600 epochs in all; tqdm redraws at most every 0.25 s, plus the opening and closing draw of each bar
    assert redraws <= 4 * elapsed + 8, (redraws, elapsed)
    assert "fit pan[1]" in terminal.getvalue()


def test_the_bundled_gate_rebuilds_byte_for_byte(tmp_path):
    from importlib import resources

    out = tmp_path / "gate.safetensors"
    command = [sys.executable, "-m", "netmerge_fast.demo.train_universal_gate", "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True)
    shipped = resources.files("netmerge_fast.nn") / "universal_gate.safetensors"
    assert out.read_bytes() == shipped.read_bytes()
