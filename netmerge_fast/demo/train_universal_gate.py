"""Rebuilds the bundled universal gate (``netmerge_fast/nn/universal_gate.safetensors``):

    python -m netmerge_fast.demo.train_universal_gate [--out PATH]

Experts for problem 1 (digits 0-4 / 5-9) trained from a seed the demo does not use (so the demo's "bundled" row
meets experts the gate never saw), then one universal gate (``UniversalGate()``: the default class-count-normalised
features) on their logits. Deterministic on one CPU thread.
"""

from __future__ import annotations

import argparse
from importlib import resources

import torch

BUNDLE_SEED = 12345


def train(seed: int = BUNDLE_SEED, epochs: int = 30):
    from netmerge_fast.demo.data import problem
    from netmerge_fast.demo.experts import train_expert
    from netmerge_fast.nn import HeterogeneousMoE, UniversalGate
    from netmerge_fast.training import GatingTrainer

    p = problem("disjoint_digits")
    pairs = zip(p.experts_data, p.class_counts, strict=True)
    experts = [train_expert(x, y, c, seed=seed + i) for i, ((x, y), c) in enumerate(pairs)]
    moe = HeterogeneousMoE(experts, p.class_counts, "universal", gate=UniversalGate())
    trainer = GatingTrainer(moe, seed=seed).fit(p.x_train, p.owner_train, epochs)
    return moe.gate, trainer.evaluate(p.x_test, p.owner_test, p.y_test)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = resources.files("netmerge_fast.nn") / "universal_gate.safetensors"
    parser.add_argument("--out", default=str(default), help=f"default: {default}")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    gate, report = train()
    gate.save(args.out)
    print(f"gate accuracy {report.gate_accuracy:.3f}, accuracy {report.accuracy:.3f} on problem 1; wrote {args.out}")


if __name__ == "__main__":
    main()
