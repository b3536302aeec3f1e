"""The project's "paper table": every combiner on four problems, mean ± std over seeds (``netmerge-fast demo``)."""

from __future__ import annotations

import copy
import json
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

import torch

from netmerge_fast import combine_logits
from netmerge_fast.demo.data import PROBLEMS, Problem, problem
from netmerge_fast.demo.experts import train_expert, train_lenet5
from netmerge_fast.nn import HeterogeneousMoE, UniversalGate
from netmerge_fast.nn.augmentations import SEED_CONFIGURATIONS
from netmerge_fast.nn.heterogeneous_moe import DATA_FREE_COMBINERS, aggregate_passes
from netmerge_fast.nn.universal_gate import NORMALISED_FEATURES
from netmerge_fast.training import GatingTrainer

# The seed's experts took 600 SGD steps (30,596 MNIST digits 0-4, batch 512, 10 epochs); 2,000 digits per expert take
# 4 steps an epoch, so 150 epochs match the seed's steps (--full) and 10 its epochs (the default).
FULL_LENET5_EPOCHS = 150
AUGMENT_ROWS = tuple(f"naive+{config}_{how}" for config in SEED_CONFIGURATIONS for how in ("mean", "vote"))
# Rows of the table, in order. Names are the API's combiners, plus: the seed's ten multi-pass configurations of the
# naive concatenation (plain pass included) aggregated by mean or vote; the PAN trained from each expert's own data
# only; the universal gate trained on the seed's problem-1 experts (default: the class-count-normalised features)
# and transferred; the bundled pre-trained universal gate; and the oracle upper bound.
ROWS = (
    *DATA_FREE_COMBINERS,
    *AUGMENT_ROWS,
    "pan_logits",
    "pan_features",
    "pan_statistics",
    "pan_logits_data_free",
    "universal",
    "universal_bundled",
    "oracle",
)


@dataclass
class Settings:
    """``epochs``: gate training; ``expert_epochs``: the digits MLPs; ``lenet5_epochs``: the MNIST LeNet5s (the
    seed's 10); ``mnist_seeds``: how many of the seeds run ``disjoint_mnist`` (None: all; LeNet5 on 32x32 costs
    most of the time); ``mnist_data_free``: also the data-free PAN on ``disjoint_mnist`` (its "dream" negatives are
    gradient ascents through the LeNet5s, the costliest row); ``universal_stats``: the features of the
    ``universal`` row's gate (and, if given, of a ``universal_bundled`` gate rebuilt by the bundle recipe instead
    of the shipped file); ``max_rows``: training, test and own inputs per problem cut to this many (smoke tests)."""

    epochs: int = 30
    expert_epochs: int = 15
    lenet5_epochs: int = 10
    mnist_seeds: int | None = 2
    mnist_data_free: bool = False
    universal_stats: Sequence[str] | None = None
    max_rows: int | None = None


QUICK = Settings(epochs=5, expert_epochs=5, lenet5_epochs=2, mnist_seeds=1, max_rows=200)
FULL = Settings(lenet5_epochs=FULL_LENET5_EPOCHS, mnist_seeds=None, mnist_data_free=True)


def _accuracy(moe: HeterogeneousMoE, p: Problem) -> float:
    with torch.no_grad():
        out = moe.eval()(p.x_test, p.owner_test) if moe.combiner == "oracle" else moe.eval()(p.x_test)
    return (out.argmax(1) == p.y_test).float().mean().item()


def _train_experts(p: Problem, seeds: list[int], s: Settings) -> list[torch.nn.Module]:
    if p.name == "disjoint_mnist":
        return [train_lenet5(x, y, c, seed=k, epochs=s.lenet5_epochs)
                for (x, y), c, k in zip(p.experts_data, p.class_counts, seeds, strict=True)]  # fmt: skip
    return [train_expert(x, y, c, seed=k, epochs=s.expert_epochs)
            for (x, y), c, k in zip(p.experts_data, p.class_counts, seeds, strict=True)]  # fmt: skip


def _augmented_rows(ex, counts, p: Problem, seed: int) -> dict[str, float]:
    """The seed's configurations, each on its own: one set of passes, aggregated by mean and by vote."""
    row = {}
    for config, augmentations in SEED_CONFIGURATIONS.items():
        moe = HeterogeneousMoE(ex, counts, "naive", augmentations=augmentations).eval()
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            passes, _ = moe.combined_passes(p.x_test)
        for how in ("mean", "vote"):
            predictions = aggregate_passes(passes, how).argmax(1)
            row[f"naive+{config}_{how}"] = (predictions == p.y_test).float().mean().item()
    return row


def _bundled_gate(s: Settings) -> UniversalGate:
    if s.universal_stats is None:
        return UniversalGate.pretrained()
    from netmerge_fast.demo.train_universal_gate import train

    return train(epochs=s.epochs, stats=s.universal_stats)[0]


def run_seed(seed: int, settings: Settings | None = None, problems=PROBLEMS) -> dict[str, dict[str, float]]:
    """Accuracy of every row on every problem for one seed: experts, gates and augmentations all drawn from it."""
    s = settings or Settings()
    data = {name: _cut(problem(name), s.max_rows) for name in problems}
    experts = {
        name: _train_experts(p, [1000 * seed + 10 * k + i for i in range(len(p.class_counts))], s)
        for k, (name, p) in enumerate(data.items())
    }
    # The universal gate is trained on problem 1's experts only, then applied to the others with no data from them.
    source = data.get("disjoint_digits") or problem("disjoint_digits")
    source_experts = experts.get("disjoint_digits") or _train_experts(source, [1000 * seed, 1000 * seed + 1], s)
    stats = tuple(s.universal_stats) if s.universal_stats is not None else NORMALISED_FEATURES
    universal = HeterogeneousMoE(source_experts, source.class_counts, "universal", gate=UniversalGate(stats))
    GatingTrainer(universal, seed=seed, progress=False).fit(source.x_train, source.owner_train, s.epochs)
    bundled = _bundled_gate(s)

    results: dict[str, dict[str, float]] = {}
    for name, p in data.items():
        ex, counts = experts[name], p.class_counts
        with torch.no_grad():
            logits, _ = HeterogeneousMoE(ex, counts).expert_outputs(p.x_test)
        row: dict[str, float] = {}
        for combiner in DATA_FREE_COMBINERS:
            predictions = combine_logits(logits, counts, method=combiner).argmax(1)
            row[combiner] = (predictions == p.y_test).float().mean().item()
        row |= _augmented_rows(ex, counts, p, seed)
        for combiner in ("pan_logits", "pan_features", "pan_statistics"):
            moe = HeterogeneousMoE(ex, counts, combiner, feature_modules=[e.body for e in ex])
            GatingTrainer(moe, seed=seed, progress=False).fit(p.x_train, p.owner_train, s.epochs)
            row[combiner] = _accuracy(moe, p)
        if name != "disjoint_mnist" or s.mnist_data_free:
            moe = HeterogeneousMoE(ex, counts, "pan_logits")
            own = [x for x, _ in p.experts_data]
            GatingTrainer(moe, seed=seed, progress=False).fit_data_free(own, s.epochs)
            row["pan_logits_data_free"] = _accuracy(moe, p)
        row["universal"] = _accuracy(HeterogeneousMoE(ex, counts, "universal", gate=copy.deepcopy(universal.gate)), p)
        row["universal_bundled"] = _accuracy(HeterogeneousMoE(ex, counts, "universal", gate=copy.deepcopy(bundled)), p)
        row["oracle"] = _accuracy(HeterogeneousMoE(ex, counts, "oracle"), p)
        results[name] = row
    return results


def _timed_seed(seed: int, s: Settings, names: list[str]) -> tuple[dict, float]:
    torch.set_num_threads(1)  # tiny models: one thread per job beats paying for thread sync on every small op
    start = time.process_time()
    return run_seed(seed, s, names), time.process_time() - start


def run(
    seeds: int = 5,
    *,
    quick: bool = False,
    settings: Settings | None = None,
    problems: Sequence[str] = PROBLEMS,
    progress: Callable[[str], None] | None = None,
    workers: int | None = 1,
) -> dict[str, dict[str, dict]]:
    """``{problem: {row: {"mean", "std", "per_seed"}}}`` over ``seeds`` seeds (``disjoint_mnist`` over the first
    ``settings.mnist_seeds``, without the rows it skips; ``quick``: ``QUICK``'s few epochs and rows).

    Seeds run in this process (``workers=1``) or in ``workers`` spawned processes of one thread each (``None``: one
    per CPU core); every seed draws only from its own generators, so the results do not depend on it (tested).
    Spawned workers re-import the calling script: call ``run`` under ``if __name__ == "__main__":`` there."""
    s = settings or Settings()
    if quick:
        s = Settings(**(vars(QUICK) | {"universal_stats": s.universal_stats}))
    jobs = {
        seed: [n for n in problems if n != "disjoint_mnist" or s.mnist_seeds is None or seed < s.mnist_seeds]
        for seed in range(seeds)
    }
    workers = min(workers or os.cpu_count() or 1, max(seeds, 1))
    results: dict[int, dict] = {}

    def record(seed: int, outcome: tuple[dict, float]) -> None:
        results[seed] = outcome[0]
        if progress:
            progress(f"seed {seed} done in {outcome[1]:.1f} s of CPU")

    if workers == 1:
        threads = torch.get_num_threads()
        try:
            for seed, names in jobs.items():
                record(seed, _timed_seed(seed, s, names))
        finally:
            torch.set_num_threads(threads)
    else:
        # The seeds with the MNIST LeNet5s cost most: they are submitted first (lowest seeds), the rest fill in.
        with ProcessPoolExecutor(workers, multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_timed_seed, seed, s, names): seed for seed, names in jobs.items()}
            for future in as_completed(futures):
                record(futures[future], future.result())
    per_seed = [results[seed] for seed in range(seeds)]
    table: dict[str, dict[str, dict]] = {}
    for name in problems:
        table[name] = {}
        for row in ROWS:
            values = [r[name][row] for r in per_seed if row in r.get(name, {})]
            if not values:
                continue
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
            table[name][row] = {"mean": mean, "std": std, "per_seed": values}
    return table


def _cut(p: Problem, rows: int | None) -> Problem:
    """The problem with its training, test and each expert's own inputs cut to ``rows`` (spread over each set)."""
    if rows is None:
        return p

    def spread(n):
        return torch.linspace(0, n - 1, min(rows, n)).long()

    own = [(x[spread(len(x))], y[spread(len(x))]) for x, y in p.experts_data]
    train, test = spread(len(p.x_train)), spread(len(p.x_test))
    return Problem(p.name, p.class_counts, own, p.x_train[train], p.owner_train[train], p.x_test[test],
                   p.owner_test[test], p.y_test[test])  # fmt: skip


def format_table(table: dict[str, dict[str, dict]]) -> str:
    names = list(table)
    lines = ["| combiner | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for row in ROWS:
        cells = [f"{100 * table[n][row]['mean']:.1f} ± {100 * table[n][row]['std']:.1f}" if row in table[n] else "-"
                 for n in names]  # fmt: skip
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
    fig, ax = plt.subplots(figsize=(16, 4.5))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        xs = [i + k * width for i in range(len(ROWS))]
        means = [100 * table[name][r]["mean"] if r in table[name] else 0.0 for r in ROWS]
        stds = [100 * table[name][r]["std"] if r in table[name] else 0.0 for r in ROWS]
        ax.bar(xs, means, width, yerr=stds, label=name, capsize=2)
    ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(ROWS))], ROWS, rotation=70, ha="right")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    ax.set_title("Merging heterogeneous experts without joint training data (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
