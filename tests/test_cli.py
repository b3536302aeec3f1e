"""The command line runs end to end (timings are not asserted: benchmarks stay out of the test suite)."""

import json

import pytest

from netmerge_fast import cli


def test_bench_topk_quick_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "topk", "--quick", "--no-compile", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| shape" in printed and "x_reference" in printed
    data = json.loads(out.read_text())
    rows = data["suites"]["topk"]
    assert {row["shape"] for row in rows} == {"mixtral E8 k2", "E64 k6", "qwen3 E128 k8", "deepseek-v3 E256 k8"}
    for row in rows:
        assert row["ours_us"] > 0 and row["x_reference"] > 0 and row["GB/s"] > 0


def test_bench_dispatch_and_layer_quick(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "dispatch", "layer", "--quick", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "## dispatch" in printed and "of_limit" in printed
    rows = json.loads(out.read_text())["suites"]["dispatch"]
    assert {row["T"] for row in rows} == {1, 64}
    for row in rows:
        assert row["ours_us"] > 0 and row["x_reference"] > 0 and row["of_limit"] > 0
        assert row["limit"] == ("bandwidth" if row["T"] == 1 else "dense mm")


def test_bench_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from netmerge_fast.bench.plot import plot

    rows = [
        {"shape": "a", "T": 1, "x_reference": 3.0, "x_hf_eager": 1.5, "of_limit": 0.8},
        {"shape": "a", "T": 64, "x_reference": 2.0, "x_hf_eager": 0.9, "of_limit": 0.6},
    ]
    png = tmp_path / "bench.png"
    plot({"dispatch": rows, "topk": [{"shape": "b", "T": 1, "x_reference": 4.0}]}, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_combine_quick_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "combine", "--quick", "--json", str(out)]) == 0
    assert "| op" in capsys.readouterr().out
    rows = json.loads(out.read_text())["suites"]["combine"]
    assert {(row["op"], row["B"], row["E"]) for row in rows} == {
        (op, B, E) for op in ("statistics", "std", "third_quartile") for B in (1, 64) for E in (2, 8)
    }
    for row in rows:
        assert row["ours_us"] > 0 and row["x_reference"] > 0 and row["GB/s"] > 0
        assert ("x_loop" in row) == (row["op"] != "statistics")


def test_unknown_suite_is_an_error(capsys):
    assert cli.main(["bench", "nope"]) == 2
    assert "unknown suite" in capsys.readouterr().err


def test_backends_command(capsys):
    assert cli.main(["backends"]) == 0
    assert "torch" in capsys.readouterr().out


def test_demo_quick_writes_json_and_plot(tmp_path, capsys):
    import pytest

    pytest.importorskip("sklearn")
    from netmerge_fast.demo.reproduction import ROWS

    out, png = tmp_path / "demo.json", tmp_path / "demo.png"
    assert cli.main(["demo", "--quick", "--seeds", "2", "--json", str(out), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "| combiner | disjoint_digits | two_domains | five_experts | disjoint_mnist |" in printed
    problems = json.loads(out.read_text())["problems"]
    assert set(problems) == {"disjoint_digits", "two_domains", "five_experts", "disjoint_mnist"}
    for name, table in problems.items():
        # quick: MNIST's LeNet5s on the first seed only, without the data-free PAN (--full runs it)
        skipped = {"pan_logits_data_free"} if name == "disjoint_mnist" else set()
        assert tuple(table) == tuple(r for r in ROWS if r not in skipped)
        seeds = 1 if name == "disjoint_mnist" else 2
        for cell in table.values():
            assert len(cell["per_seed"]) == seeds and all(0 <= v <= 1 for v in cell["per_seed"])
            assert cell["mean"] == pytest.approx(sum(cell["per_seed"]) / seeds) and cell["std"] >= 0
    assert table["oracle"]["mean"] >= table["naive"]["mean"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_universal_stats_flag(capsys, monkeypatch):
    pytest.importorskip("sklearn")
    from netmerge_fast.demo import reproduction

    seen = {}

    def fake_run(seeds, *, quick, settings, progress, workers):
        seen.update(seeds=seeds, quick=quick, stats=settings.universal_stats, lenet5=settings.lenet5_epochs,
                    mnist=settings.mnist_seeds)  # fmt: skip
        return {"disjoint_digits": {row: {"mean": 0.5, "std": 0.0, "per_seed": [0.5]} for row in reproduction.ROWS}}

    assert reproduction.FULL.mnist_data_free and not reproduction.Settings().mnist_data_free

    monkeypatch.setattr(reproduction, "run", fake_run)
    assert cli.main(["demo", "--universal-stats", "mean,std,max", "--seeds", "1"]) == 0
    assert seen == {"seeds": 1, "quick": False, "stats": ("mean", "std", "max"), "lenet5": 10, "mnist": 2}
    assert cli.main(["demo", "--full"]) == 0
    assert seen["seeds"] == 10 and seen["lenet5"] == reproduction.FULL_LENET5_EPOCHS and seen["stats"] is None
    assert seen["mnist"] is None
    capsys.readouterr()
    assert cli.main(["demo", "--universal-stats", "mean,nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_demo_universal_stats_rebuilds_the_first_bundle_recipe():
    pytest.importorskip("sklearn")
    from netmerge_fast.demo.reproduction import Settings, _bundled_gate
    from netmerge_fast.nn import UniversalGate

    assert _bundled_gate(Settings()).stats == UniversalGate.pretrained().stats
    gate = _bundled_gate(Settings(epochs=1, universal_stats=("mean", "std", "max")))
    assert gate.stats == ("mean", "std", "max")


def test_demo_universal_transfer_quick(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from netmerge_fast.demo.unseen_experts import ROWS

    out = tmp_path / "transfer.json"
    assert cli.main(["demo", "universal-transfer", "--quick", "--seeds", "1", "--json", str(out)]) == 0
    assert "| combiner | two_domains | five_experts | digits_adam150 |" in capsys.readouterr().out
    sets = json.loads(out.read_text())["sets"]
    assert list(sets) == ["two_domains", "five_experts", "digits_adam150"]
    for table in sets.values():
        assert tuple(table) == ROWS and all(0 <= cell["mean"] <= 1 for cell in table.values())


def test_bench_hf_quick(tmp_path, capsys):
    pytest.importorskip("transformers", minversion="5.0")
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "hf", "--quick", "--json", str(out)]) == 0
    assert "## hf" in capsys.readouterr().out
    rows = json.loads(out.read_text())["suites"]["hf"]
    assert {(row["case"], row["T"]) for row in rows} == {("block", 1), ("prefill", 32), ("decode", 4)}
    for row in rows:
        assert row["ours_us"] > 0 and row["ours_tok_s"] > 0
        assert all(row[f"x_hf_{i}"] > 0 for i in ("grouped_mm", "eager", "batched_mm"))


def test_bench_hf_layout_quick(tmp_path, capsys):
    pytest.importorskip("transformers", minversion="5.0")
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "hf_layout", "--quick", "--json", str(out)]) == 0
    assert "## hf_layout" in capsys.readouterr().out
    rows = json.loads(out.read_text())["suites"]["hf_layout"]
    assert {(row["case"], row["T"]) for row in rows} == {("block", 1), ("train", 32)}
    for row in rows:
        assert row["direct_us"] > 0 and row["relaid_us"] > 0
        assert row["x_relaid"] == pytest.approx(row["relaid_us"] / row["direct_us"])


def test_demo_results_do_not_depend_on_the_worker_processes():
    pytest.importorskip("sklearn")
    from netmerge_fast.demo import reproduction

    problems = ("disjoint_digits", "disjoint_mnist")
    here = reproduction.run(2, quick=True, problems=problems, workers=1)
    spawned = reproduction.run(2, quick=True, problems=problems, workers=2)
    assert here == spawned and here["disjoint_mnist"]["naive"]["per_seed"]
