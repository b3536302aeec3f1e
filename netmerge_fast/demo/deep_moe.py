"""Eigen, Ranzato & Sutskever (2013) on jittered real MNIST (``netmerge-fast demo deep-moe``).

Every 28x28 digit of ``data.mnist()`` (4,000 train / 1,000 test) is placed on a 36x36 canvas at a uniformly random
offset of up to ±4 pixels in x and y: drawn afresh every epoch for training, fixed for the test set. Every model
gets the same budget (epochs, batch size, optimiser, and the same jittered batches per seed); the mixtures with
the balancing constraint spend the first half of the epochs with it and the second half fine-tuning without it.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

import torch
from torch import nn

from netmerge_fast.demo.data import mnist
from netmerge_fast.nn import DeepMoE

CANVAS, DIGIT = 36, 28
SHIFTS = CANVAS - DIGIT + 1  # 9 offsets per axis: ±4 pixels around the centre
TEST_OFFSET_SEED = 2013  # the test set's offsets: the same for every seed and model


@dataclass(frozen=True)
class Budget:
    epochs: int = 20
    batch_size: int = 100
    lr: float = 2e-3  # Adam, decayed linearly to 0 over the run
    balance_margin: float = 100.0  # in inputs' worth of gate mass
    train_size: int | None = None  # None: all 4,000
    test_size: int | None = None  # None: all 1,000


QUICK = Budget(epochs=2, train_size=300, test_size=100)

# name -> (what it is, how to build it from the input width). "balanced": trained with the constraint first.
MODELS: dict[str, tuple[str, Callable[[int], nn.Module], bool]] = {}


def _dnn(width: int, params: int) -> nn.Module:
    """A two-hidden-layer ReLU net 1296-h-h-10 with h chosen to hold about ``params`` parameters."""
    # params = width*h + h + h*h + h + 10*h + 10  ->  h^2 + (width + 12) h + 10 - params = 0
    b = width + 12
    h = round((-b + math.sqrt(b * b - 4 * (10 - params))) / 2)
    return nn.Sequential(nn.Flatten(), nn.Linear(width, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10))


def _register(name, description, build, balanced):
    MODELS[name] = (description, build, balanced)


_register("dmoe", "DMoE 4x100-4x100 (balanced, then fine-tuned)", lambda w: DeepMoE(w, [(4, 100), (4, 100)], 10), True)
_register("dmoe_no_balancing", "DMoE 4x100-4x100, no balancing", lambda w: DeepMoE(w, [(4, 100), (4, 100)], 10), False)
_register("moe_one_layer", "one-layer mixture 4x100", lambda w: DeepMoE(w, [(4, 100)], 10), True)
_register("dmoe_single_expert_l2", "4x100 - single expert 100", lambda w: DeepMoE(w, [(4, 100), (1, 100)], 10), True)
# The four layer-2 experts concatenated: one ungated 400-wide layer (a single expert's gate is always 1).
_register("dmoe_concat_l2", "4x100 - concatenated 400", lambda w: DeepMoE(w, [(4, 100), (1, 400)], 10), True)
_register(
    "dnn_same_params",
    "fully connected, same parameter count",
    lambda w: _dnn(w, sum(p.numel() for p in DeepMoE(w, [(4, 100), (4, 100)], 10).parameters())),
    False,
)
_register("dmoe_top1", "DMoE top-1 (sparse, balanced)", lambda w: DeepMoE(w, [(4, 100), (4, 100)], 10, top_k=1), True)
_register(
    "dmoe_top1_unnormalised",
    "DMoE top-1, weight = gate probability (sparse, balanced)",
    lambda w: DeepMoE(w, [(4, 100), (4, 100)], 10, top_k=1, renormalize=False),
    True,
)
_register("dmoe_top2", "DMoE top-2 (sparse, balanced)", lambda w: DeepMoE(w, [(4, 100), (4, 100)], 10, top_k=2), True)


def jitter(images: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``[N, 1, 28, 28]`` digits on ``[N, 1, 36, 36]`` canvases, digit n's top-left corner at ``offsets[n]``
    (row, column), each in ``[0, 9)``."""
    n = images.shape[0]
    canvas = images.new_zeros(n, CANVAS, CANVAS)
    rows = offsets[:, 0, None] + torch.arange(DIGIT)
    cols = offsets[:, 1, None] + torch.arange(DIGIT)
    canvas[torch.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]] = images[:, 0]
    return canvas[:, None]


def random_offsets(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, SHIFTS, (n, 2), generator=generator)


def position_bin(offsets: torch.Tensor) -> torch.Tensor:
    """The 9x9 offsets binned into a 3x3 grid: 0..8."""
    return offsets[:, 0] // 3 * 3 + offsets[:, 1] // 3


def _data(budget: Budget):
    x_train, y_train, x_test, y_test = mnist()
    x_train, y_train = x_train[: budget.train_size], y_train[: budget.train_size]
    x_test, y_test = x_test[: budget.test_size], y_test[: budget.test_size]
    test_offsets = random_offsets(len(x_test), torch.Generator().manual_seed(TEST_OFFSET_SEED))
    return x_train, y_train, jitter(x_test, test_offsets), y_test, test_offsets


def train(model: nn.Module, x_train, y_train, *, budget: Budget, balanced: bool, seed: int) -> None:
    """``budget.epochs`` epochs of Adam on freshly jittered digits (the same batches for every model of a seed),
    the learning rate decayed linearly to 0; with ``balanced``, the constraint is on for the first half of them."""
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=budget.lr, fused=True)
    steps = budget.epochs * math.ceil(len(x_train) / budget.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 1 - step / steps)
    balance_epochs = budget.epochs // 2 if balanced else 0
    model.train()
    for epoch in range(budget.epochs):
        if isinstance(model, DeepMoE):
            model.balance_margin = budget.balance_margin if epoch < balance_epochs else None
        x = jitter(x_train, random_offsets(len(x_train), generator))
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), budget.batch_size):
            batch = order[start : start + budget.batch_size]
            loss = nn.functional.cross_entropy(model(x[batch]), y_train[batch])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()


def evaluate(model: nn.Module, x_test, y_test, test_offsets) -> dict:
    """Test error (%); for mixtures also the NMI of each layer's argmax expert with position and class, and the
    fraction of (layer-1, layer-2) expert combinations that get at least 1% of the test inputs."""
    from sklearn.metrics import normalized_mutual_info_score as nmi

    model.eval()
    with torch.no_grad():
        logits = model(x_test)
    result: dict = {"error": 100.0 * (logits.argmax(1) != y_test).float().mean().item()}
    if isinstance(model, DeepMoE):
        experts = [g.argmax(1).numpy() for g in model.gate_probs]
        position = position_bin(test_offsets).numpy()
        result["nmi"] = [{"position": nmi(position, e), "class": nmi(y_test.numpy(), e)} for e in experts]
        if len(experts) == 2:
            e1, e2 = (layer.num_experts for layer in model.layers)
            counts = torch.bincount(torch.from_numpy(experts[0] * e2 + experts[1]), minlength=e1 * e2)
            result["combinations_used"] = (counts >= 0.01 * len(y_test)).float().mean().item()
    return result


_worker_data: tuple | None = None  # a worker process's copy of _data(), sent once by _start_worker


def _start_worker(data: tuple) -> None:
    global _worker_data
    torch.set_num_threads(1)  # one job per core: the models are small, threads would mostly wait on each other
    _worker_data = data


def _train_and_evaluate(name: str, seed: int, budget: Budget, data: tuple | None = None):
    """One model, one seed: (evaluate(), the trained weights if it is the DMoE of seed 0 (for the plot), CPU s)."""
    start = time.process_time()
    x_train, y_train, x_test, y_test, test_offsets = data or _worker_data
    _, build, balanced = MODELS[name]
    torch.manual_seed(seed)
    model = build(CANVAS * CANVAS)
    train(model, x_train, y_train, budget=budget, balanced=balanced, seed=seed)
    result = evaluate(model, x_test, y_test, test_offsets)
    return result, model.state_dict() if (name, seed) == ("dmoe", 0) else None, time.process_time() - start


def run(
    seeds: int = 3,
    *,
    budget: Budget = Budget(),
    workers: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, list[dict]], DeepMoE]:
    """Every model over ``seeds`` seeds: ``({model: [evaluate() per seed]}, the trained DMoE of seed 0)``.

    Jobs (model, seed) run in ``workers`` spawned processes of one thread each (default: one per CPU core), or in
    this process with ``workers=1``; the results do not depend on it. Spawned workers re-import the calling
    script: call ``run`` under ``if __name__ == "__main__":`` there (the ``netmerge-fast`` command does)."""
    jobs = [(name, seed) for seed in range(seeds) for name in MODELS]
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    data = _data(budget)
    results: dict[str, list] = {name: [None] * seeds for name in MODELS}
    weights = None

    def record(name, seed, outcome):
        nonlocal weights
        result, state, cpu_seconds = outcome
        results[name][seed] = result
        weights = state if state is not None else weights
        if progress:
            progress(f"seed {seed} {name}: {result['error']:.2f}% test error ({cpu_seconds:.1f} s CPU)")

    if workers == 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for name, seed in jobs:
                record(name, seed, _train_and_evaluate(name, seed, budget, data))
        finally:
            torch.set_num_threads(threads)
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, context, initializer=_start_worker, initargs=(data,)) as pool:
            futures = {pool.submit(_train_and_evaluate, name, seed, budget): (name, seed) for name, seed in jobs}
            for future in as_completed(futures):
                record(*futures[future], future.result())
    model = MODELS["dmoe"][1](CANVAS * CANVAS)
    model.load_state_dict(weights)
    return results, model


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def summary(results: dict, seconds: float) -> dict:
    """The JSON of ``--json``: errors (%) mean ± std, mean NMIs per layer, mean fraction of combinations used."""

    def mean_nmi(name):
        per_seed = [r["nmi"] for r in results[name]]
        return [
            {kind: _mean_std([s[layer][kind] for s in per_seed])[0] for kind in ("position", "class")}
            for layer in range(len(per_seed[0]))
        ]

    errors = {}
    for name, per_seed in results.items():
        mean, std = _mean_std([r["error"] for r in per_seed])
        errors[name] = {"mean": mean, "std": std}
    return {
        "errors": errors,
        "nmi": {"balanced": mean_nmi("dmoe"), "unbalanced": mean_nmi("dmoe_no_balancing")},
        "combinations_used": _mean_std([r["combinations_used"] for r in results["dmoe"]])[0],
        "seconds": seconds,
    }


def format_table(results: dict) -> str:
    lines = ["| model | test error (%) |", "|---|---|"]
    for name, per_seed in results.items():
        mean, std = _mean_std([r["error"] for r in per_seed])
        lines.append(f"| {MODELS[name][0]} (`{name}`) | {mean:.2f} ± {std:.2f} |")
    lines += ["", "| DMoE | layer | NMI(expert, position) | NMI(expert, class) | combinations used |"]
    lines.append("|---|---|---|---|---|")
    for label, name in (("balanced", "dmoe"), ("unbalanced", "dmoe_no_balancing")):
        used = _mean_std([r["combinations_used"] for r in results[name]])
        for layer in range(len(results[name][0]["nmi"])):
            cells = [_mean_std([r["nmi"][layer][kind] for r in results[name]]) for kind in ("position", "class")]
            combos = f"{used[0]:.2f} ± {used[1]:.2f}" if layer == 0 else ""
            nmis = " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in cells)
            lines.append(f"| {label} | {layer + 1} | {nmis} | {combos} |")
    return "\n".join(lines)


def plot(path: str, model: DeepMoE, budget: Budget) -> None:
    """The paper's figure: the mean gate value of each layer-1 expert at each of the 9x9 offsets, and of each
    layer-2 expert per class, for test digits placed at every offset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, _, x_test, y_test = mnist()
    digits = min(budget.test_size or 200, 200)  # x 81 offsets
    x_test, y_test = x_test[:digits], y_test[:digits]
    grid = torch.cartesian_prod(torch.arange(SHIFTS), torch.arange(SHIFTS))  # [81, 2]
    n = len(x_test)
    offsets = grid.repeat_interleave(n, 0)
    model.eval()
    with torch.no_grad():
        model(jitter(x_test.repeat(len(grid), 1, 1, 1), offsets))
    g1, g2 = model.gate_probs
    where = g1.view(len(grid), n, -1).mean(1).view(SHIFTS, SHIFTS, -1)
    labels = y_test.repeat(len(grid))
    what = torch.stack([g2[labels == c].mean(0) for c in range(10)])  # [10, E2]
    e1, e2 = where.shape[-1], what.shape[-1]
    fig, axes = plt.subplots(2, max(e1, e2), figsize=(2.8 * max(e1, e2), 5.8), squeeze=False, layout="constrained")
    for i in range(e1):
        image = axes[0, i].imshow(where[..., i].numpy(), vmin=0, vmax=1, cmap="viridis")
        axes[0, i].set_title(f"layer 1, expert {i}")
        axes[0, i].set_xlabel("x offset")
        axes[0, i].set_xticks(range(0, SHIFTS, 2))
        axes[0, i].set_yticks(range(0, SHIFTS, 2))
    axes[0, 0].set_ylabel("y offset")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="mean gate value")
    for j in range(e2):
        axes[1, j].bar(range(10), what[:, j].numpy())
        axes[1, j].set_ylim(0, 1)
        axes[1, j].set_xticks(range(10))
        axes[1, j].set_title(f"layer 2, expert {j}")
        axes[1, j].set_xlabel("class")
    axes[1, 0].set_ylabel("mean gate value")
    for ax in [*axes[0, e1:], *axes[1, e2:]]:
        ax.axis("off")
    fig.suptitle("Deep MoE on jittered MNIST: layer-1 gates by offset (where), layer-2 gates by class (what)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cli(args) -> int:
    seeds = args.seeds or 3
    budget = QUICK if args.quick else Budget()
    start = time.perf_counter()
    # --quick (smoke tests) runs in this process: starting worker processes would cost more than its jobs.
    workers = 1 if args.quick else None
    results, dmoe = run(seeds, budget=budget, workers=workers, progress=lambda m: print(f"  ... {m}", flush=True))
    seconds = time.perf_counter() - start
    data = "quick" if args.quick else "4,000 train / 1,000 test"
    print(f"\n# jittered MNIST ({data}), mean ± std over {seeds} seeds\n")
    print(format_table(results), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary(results, seconds), f, indent=2)
        print(f"\nwrote {args.json}")
    if args.plot:
        plot(args.plot, dmoe, budget)
        print(f"wrote {args.plot}")
    print(f"\ndone in {seconds:.0f} s")
    return 0
