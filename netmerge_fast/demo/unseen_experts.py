"""How the universal gate transfers to experts it never saw (``netmerge-fast demo universal-transfer``).

Eleven expert sets, none of them seen by any gate: the demo's problems 2 and 3, and experts trained outside the
gates' training set with other architectures and recipes (MLPs of other widths, small CNNs, the seed's LeNet5;
SGD and Adam; 2 to 10 classes each; 2 to 5 experts; digits, mnist1d and real MNIST). On each set every statistic
rule and every universal gate merges the experts with no data from their domains (the calibrated gates see only
Gaussian noise); the table gives the merged test accuracy, mean ± std over seeds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from netmerge_fast.demo import data
from netmerge_fast.demo.experts import MLP, Expert, LeNet5, SmallCNN, fit_classifier, seeded, train_expert
from netmerge_fast.nn import HeterogeneousMoE, UniversalGate
from netmerge_fast.nn.universal_gate import CALIBRATED_GATE_FEATURES, NORMALISED_FEATURES
from netmerge_fast.training import GatingTrainer

RULES = ("naive", "max_prob", "entropy", "margin", "third_quartile", "energy", "range")
GATES = ("universal", "universal_calibrated", "universal_bundled_v1", "universal_bundled")
ROWS = (*RULES, *GATES, "oracle")


@dataclass
class ExpertSet:
    name: str
    experts: list[nn.Module]
    class_counts: list[int]
    x_test: torch.Tensor
    y_test: torch.Tensor  # labels over the union (expert 0's classes first)
    owner_test: torch.Tensor


def _recipe(kind: str, optimizer: str, lr: float, batch: int, *, epochs=None, steps=None, hidden=(128,)):
    def train(x, y, classes, seed):
        shape = tuple(x.shape[1:])
        factory = {
            "demo": lambda: Expert(classes),
            "mlp": lambda: MLP(math.prod(shape), classes, hidden),
            "cnn": lambda: SmallCNN(classes, shape[-2:]),
            "lenet5": lambda: LeNet5(classes),
        }[kind]
        model = seeded(factory, seed)
        return fit_classifier(
            model, x, y, seed, optimizer=optimizer, lr=lr, batch_size=batch, epochs=epochs, steps=steps
        )

    return train


def _grouped(name, seed, dataset, groups, recipes) -> ExpertSet:
    """Experts on disjoint class groups of one dataset; union labels in group order."""
    x_train, y_train, x_test, y_test = dataset()
    recipes = recipes if isinstance(recipes, list) else [recipes] * len(groups)
    experts, xs, ys, owners, offset = [], [], [], [], 0
    for i, (group, train) in enumerate(zip(groups, recipes, strict=True)):
        local = torch.full((10,), -1, dtype=torch.long)
        local[torch.tensor(group)] = torch.arange(len(group))
        mask = torch.isin(y_train, torch.tensor(group))
        experts.append(train(x_train[mask], local[y_train[mask]], len(group), 1000 * seed + 7 * i + 1))
        mask = torch.isin(y_test, torch.tensor(group))
        xs.append(x_test[mask])
        ys.append(local[y_test[mask]] + offset)
        owners.append(torch.full((int(mask.sum()),), i))
        offset += len(group)
    return ExpertSet(name, experts, [len(g) for g in groups], torch.cat(xs), torch.cat(ys), torch.cat(owners))


def _demo_problem(name: str, seed: int, k: int) -> ExpertSet:
    p = data.problem(name)
    pairs = zip(p.experts_data, p.class_counts, strict=True)
    experts = [train_expert(x, y, c, seed=1000 * seed + 10 * k + i) for i, ((x, y), c) in enumerate(pairs)]
    return ExpertSet(name, experts, p.class_counts, p.x_test, p.y_test, p.owner_test)


def _two_domains_mixed(seed: int) -> ExpertSet:
    dx, dy, dx_test, dy_test = data.digits()
    mx, my, mx_test, my_test = data.mnist1d()
    digits_cnn = _recipe("cnn", "adam", 1e-3, 32, steps=300)(dx, dy, 10, 1000 * seed + 3)
    mnist1d_mlp = _recipe("demo", "sgd", 0.01, 32, epochs=15)(mx, my, 10, 1000 * seed + 4)
    owner = torch.cat([torch.zeros(len(dx_test)), torch.ones(len(mx_test))]).long()
    return ExpertSet("two_domains_mixed", [digits_cnn, mnist1d_mlp], [10, 10], torch.cat([dx_test, mx_test]),
                     torch.cat([dy_test, my_test + 10]), owner)  # fmt: skip


FIVE, TEN = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
# name -> builder(seed); each set's experts are drawn from the seed (no gate ever sees them)
SETS: dict[str, Callable[[int], ExpertSet]] = {
    "two_domains": lambda s: _demo_problem("two_domains", s, 1),
    "five_experts": lambda s: _demo_problem("five_experts", s, 2),
    # the probe: two MLPs on digits 0-4 / 5-9 trained with Adam for 150 steps
    "digits_adam150": lambda s: _grouped("digits_adam150", s, data.digits, [FIVE, TEN],
                                         _recipe("mlp", "adam", 1e-3, 64, steps=150)),
    "digits3_cnn": lambda s: _grouped("digits3_cnn", s, data.digits, [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]],
                                      _recipe("cnn", "sgd", 0.01, 32, epochs=15)),
    "digits_7_3_adam": lambda s: _grouped("digits_7_3_adam", s, data.digits, [[0, 1, 2, 3, 4, 5, 6], [7, 8, 9]],
                                          _recipe("mlp", "adam", 3e-3, 32, steps=300, hidden=(256,))),
    "digits4_mixed": lambda s: _grouped("digits4_mixed", s, data.digits, [[0, 1], [2, 3, 4], [5, 6, 7], [8, 9]], [
        _recipe("demo", "sgd", 0.01, 32, epochs=15), _recipe("cnn", "adam", 1e-3, 32, steps=200),
        _recipe("mlp", "adam", 1e-3, 16, steps=400, hidden=(32,)), _recipe("cnn", "sgd", 0.01, 64, epochs=10)]),
    "mnist1d_adam": lambda s: _grouped("mnist1d_adam", s, data.mnist1d, [FIVE, TEN],
                                       _recipe("mlp", "adam", 1e-3, 64, epochs=20, hidden=(256, 128))),
    "two_domains_mixed": _two_domains_mixed,
    "mnist_lenet5": lambda s: _grouped("mnist_lenet5", s, data.mnist32, [FIVE, TEN],
                                       _recipe("lenet5", "sgd", 0.01, 512, epochs=10)),
    "mnist3_adam": lambda s: _grouped("mnist3_adam", s, data.mnist32, [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]],
                                      _recipe("mlp", "adam", 1e-3, 64, steps=300)),
    "mnist5_sgd": lambda s: _grouped("mnist5_sgd", s, data.mnist32, [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]],
                                     _recipe("mlp", "sgd", 0.01, 32, epochs=5)),
}  # fmt: skip


def source_gates(seed: int, epochs: int = 30) -> dict[str, UniversalGate]:
    """The gates under test: trained on this seed's problem-1 experts (as the demo's ``universal`` row), with the
    normalised features and with the calibrated ones, and the two bundled files."""
    p = data.problem("disjoint_digits")
    pairs = zip(p.experts_data, p.class_counts, strict=True)
    experts = [train_expert(x, y, c, seed=1000 * seed + i) for i, ((x, y), c) in enumerate(pairs)]
    gates = {}
    for name, gate in (
        ("universal", UniversalGate(NORMALISED_FEATURES)),
        ("universal_calibrated", UniversalGate(CALIBRATED_GATE_FEATURES, standardise=True)),
    ):
        moe = HeterogeneousMoE(experts, p.class_counts, "universal", gate=gate)
        GatingTrainer(moe, seed=seed, progress=False).fit(p.x_train, p.owner_train, epochs)
        gates[name] = moe.gate
    gates["universal_bundled_v1"] = UniversalGate.pretrained(version=1)
    gates["universal_bundled"] = UniversalGate.pretrained()
    return gates


@torch.no_grad()
def evaluate(s: ExpertSet, gates: dict[str, UniversalGate]) -> dict[str, float]:
    def accuracy(moe, *domain):
        return (moe.eval()(s.x_test, *domain).argmax(1) == s.y_test).float().mean().item()

    row = {rule: accuracy(HeterogeneousMoE(s.experts, s.class_counts, rule)) for rule in RULES}
    for name, gate in gates.items():
        row[name] = accuracy(HeterogeneousMoE(s.experts, s.class_counts, "universal", gate=gate))
    row["oracle"] = accuracy(HeterogeneousMoE(s.experts, s.class_counts, "oracle"), s.owner_test)
    return row


def run(seeds: int = 3, *, quick: bool = False, progress: Callable[[str], None] | None = None) -> dict:
    """``{set: {row: {"mean", "std", "per_seed"}}}``; ``quick``: three sets, one epoch of gate training."""
    names = list(SETS)[:3] if quick else list(SETS)
    per_seed = []
    for seed in range(seeds):
        start = time.perf_counter()
        gates = source_gates(seed, epochs=1 if quick else 30)
        per_seed.append({name: evaluate(SETS[name](seed), gates) for name in names})
        if progress:
            progress(f"seed {seed} done in {time.perf_counter() - start:.1f} s")
    table = {}
    for name in names:
        table[name] = {}
        for row in ROWS:
            values = [r[name][row] for r in per_seed]
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
            table[name][row] = {"mean": mean, "std": std, "per_seed": values}
    return table


def format_table(table: dict) -> str:
    """Rows = combiners, columns = sets, then the mean over sets and on how many sets the row beats ``naive`` and
    the best statistic rule of that set."""
    names = list(table)
    lines = ["| combiner | " + " | ".join(names) + " | mean | > naive | > best rule |",
             "|---|" + "---:|" * (len(names) + 3)]  # fmt: skip
    mean = {n: {r: 100 * table[n][r]["mean"] for r in ROWS} for n in names}
    for row in ROWS:
        values = [mean[n][row] for n in names]
        beats_naive = sum(mean[n][row] > mean[n]["naive"] for n in names)
        beats_best = sum(mean[n][row] > max(mean[n][r] for r in RULES) for n in names)
        cells = [f"{v:.1f}" for v in values]
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {sum(values) / len(values):.1f} | {beats_naive} | "
                     f"{beats_best} |")  # fmt: skip
    return "\n".join(lines)


def cli(args) -> int:
    import json

    seeds = args.seeds or 3
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        table = run(seeds, quick=args.quick, progress=lambda m: print(f"  ... {m}", flush=True))
    finally:
        torch.set_num_threads(threads)
    print(f"# merged test accuracy (%), mean over {seeds} seeds, experts no gate saw\n")
    print(format_table(table))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"sets": table}, f, indent=2)
        print(f"\nwrote {args.json}")
    print(f"\ndone in {time.perf_counter() - start:.0f} s")
    return 0
