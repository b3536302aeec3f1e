"""The project's "paper table": every combiner on three problems, mean ± std over seeds (``netmerge-fast demo``)."""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable

import torch

from netmerge_fast.demo.data import PROBLEMS, Problem, problem
from netmerge_fast.demo.experts import train_expert
from netmerge_fast.nn import HeterogeneousMoE, UniversalGate
from netmerge_fast.nn.augmentations import AUGMENTATIONS
from netmerge_fast.nn.heterogeneous_moe import DATA_FREE_COMBINERS
from netmerge_fast.training import GatingTrainer

# Rows of the table, in order. Names are the API's combiners, plus: the multi-pass augmentation of the naive
# concatenation (all five augmentations, plain pass included) aggregated by mean or vote; the PAN trained from each
# expert's own data only; the bundled pre-trained universal gate; and the oracle upper bound.
ROWS = (
    *DATA_FREE_COMBINERS,
    "naive+augment_mean",
    "naive+augment_vote",
    "pan_logits",
    "pan_features",
    "pan_logits_data_free",
    "universal",
    "universal_bundled",
    "oracle",
)


def _accuracy(moe: HeterogeneousMoE, p: Problem) -> float:
    with torch.no_grad():
        out = moe.eval()(p.x_test, p.owner_test) if moe.combiner == "oracle" else moe.eval()(p.x_test)
    return (out.argmax(1) == p.y_test).float().mean().item()


def run_seed(seed: int, *, epochs: int = 30, expert_epochs: int = 15, problems=PROBLEMS) -> dict[str, dict[str, float]]:
    """Accuracy of every row on every problem for one seed: experts, gates and augmentations all drawn from it."""
    data = {name: problem(name) for name in problems}
    experts = {
        name: [
            train_expert(x, y, c, seed=1000 * seed + 10 * k + i, epochs=expert_epochs)
            for i, ((x, y), c) in enumerate(zip(p.experts_data, p.class_counts, strict=True))
        ]
        for k, (name, p) in enumerate(data.items())
    }
    # The universal gate is trained on problem 1's experts only, then applied to the others with no data from them.
    source = data.get("disjoint_digits") or problem("disjoint_digits")
    source_experts = experts.get("disjoint_digits") or [
        train_expert(x, y, c, seed=1000 * seed + i, epochs=expert_epochs)
        for i, ((x, y), c) in enumerate(zip(source.experts_data, source.class_counts, strict=True))
    ]
    universal = HeterogeneousMoE(source_experts, source.class_counts, "universal", gate=UniversalGate())
    GatingTrainer(universal, seed=seed, progress=False).fit(source.x_train, source.owner_train, epochs)
    bundled = UniversalGate.pretrained()

    results: dict[str, dict[str, float]] = {}
    for name, p in data.items():
        ex, counts = experts[name], p.class_counts
        row: dict[str, float] = {}
        for combiner in DATA_FREE_COMBINERS:
            row[combiner] = _accuracy(HeterogeneousMoE(ex, counts, combiner), p)
        for aggregate in ("mean", "vote"):
            moe = HeterogeneousMoE(ex, counts, "naive", augmentations=list(AUGMENTATIONS), aggregate=aggregate)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                row[f"naive+augment_{aggregate}"] = _accuracy(moe, p)
        for combiner in ("pan_logits", "pan_features"):
            moe = HeterogeneousMoE(ex, counts, combiner, feature_modules=[e.body for e in ex])
            GatingTrainer(moe, seed=seed, progress=False).fit(p.x_train, p.owner_train, epochs)
            row[combiner] = _accuracy(moe, p)
        moe = HeterogeneousMoE(ex, counts, "pan_logits")
        own = [x for x, _ in p.experts_data]
        GatingTrainer(moe, seed=seed, progress=False).fit_data_free(own, epochs)
        row["pan_logits_data_free"] = _accuracy(moe, p)
        row["universal"] = _accuracy(HeterogeneousMoE(ex, counts, "universal", gate=copy.deepcopy(universal.gate)), p)
        row["universal_bundled"] = _accuracy(HeterogeneousMoE(ex, counts, "universal", gate=copy.deepcopy(bundled)), p)
        row["oracle"] = _accuracy(HeterogeneousMoE(ex, counts, "oracle"), p)
        results[name] = row
    return results


def run(
    seeds: int = 5, *, quick: bool = False, progress: Callable[[str], None] | None = None
) -> dict[str, dict[str, dict]]:
    """``{problem: {row: {"mean", "std", "per_seed"}}}`` over ``seeds`` seeds (``quick``: fewer epochs)."""
    epochs, expert_epochs = (5, 5) if quick else (30, 15)
    per_seed = []
    for seed in range(seeds):
        start = time.perf_counter()
        per_seed.append(run_seed(seed, epochs=epochs, expert_epochs=expert_epochs))
        if progress:
            progress(f"seed {seed} done in {time.perf_counter() - start:.1f} s")
    table: dict[str, dict[str, dict]] = {}
    for name in per_seed[0]:
        table[name] = {}
        for row in ROWS:
            values = [r[name][row] for r in per_seed]
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
            table[name][row] = {"mean": mean, "std": std, "per_seed": values}
    return table


def format_table(table: dict[str, dict[str, dict]]) -> str:
    names = list(table)
    lines = ["| combiner | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for row in ROWS:
        cells = [f"{100 * table[n][row]['mean']:.1f} ± {100 * table[n][row]['std']:.1f}" for n in names]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: str, table: dict) -> None:
    with open(path, "w") as f:
        json.dump({"problems": table}, f, indent=2)


def plot(path: str, table: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        xs = [i + k * width for i in range(len(ROWS))]
        means = [100 * table[name][r]["mean"] for r in ROWS]
        stds = [100 * table[name][r]["std"] for r in ROWS]
        ax.bar(xs, means, width, yerr=stds, label=name, capsize=2)
    ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(ROWS))], ROWS, rotation=60, ha="right")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    ax.set_title("Merging heterogeneous experts without joint training data (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
