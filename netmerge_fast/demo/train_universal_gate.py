"""Rebuilds the bundled universal gates, byte for byte:

    python -m netmerge_fast.demo.train_universal_gate [--version 2|1] [--out PATH]

Experts for problem 1 (digits 0-4 / 5-9) trained from a seed the demo does not use (12345, so the demo's "bundled"
row meets experts the gate never saw), then one universal gate on their logits over the training split. Version 2
(``universal_gate.safetensors``) reads ``CALIBRATED_GATE_FEATURES`` standardised (``standardise=True``), the
experts calibrated on 2,048 Gaussian-noise inputs (no data); version 1 (``universal_gate_v1.safetensors``, the first
bundled gate) reads ``NORMALISED_FEATURES``.

Deterministic: one CPU thread, and torch's, MKL's and oneDNN's kernels pinned to AVX2 (the command re-runs itself
with ``ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2 ONEDNN_MAX_CPU_ISA=AVX2``), so that x86-64 CPUs with AVX2 write the
same bytes (unpinned, an AVX-512 machine rounds differently). The version-1 file predates the pinning: it was
written unpinned on an AVX-512 machine, and on an AVX2 CPU its recipe writes other bytes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from importlib import resources

import torch

from netmerge_fast.nn.universal_gate import (
    CALIBRATED_GATE_FEATURES,
    FIRST_PRETRAINED_FILE,
    NORMALISED_FEATURES,
    PRETRAINED_FILE,
    calibration_bases,
)

BUNDLE_SEED = 12345
# read by torch, MKL and oneDNN when they load: set before the process imports torch
PINNED_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
VERSIONS = {1: (NORMALISED_FEATURES, FIRST_PRETRAINED_FILE), 2: (CALIBRATED_GATE_FEATURES, PRETRAINED_FILE)}


def train(seed: int = BUNDLE_SEED, epochs: int = 30, stats: Sequence[str] = CALIBRATED_GATE_FEATURES):
    """The bundle recipe with the gate on ``stats``: ``(gate, GateEvaluation on problem 1's test split)``."""
    from netmerge_fast.demo.data import problem
    from netmerge_fast.demo.experts import train_expert
    from netmerge_fast.nn import HeterogeneousMoE, UniversalGate
    from netmerge_fast.training import GatingTrainer

    p = problem("disjoint_digits")
    pairs = zip(p.experts_data, p.class_counts, strict=True)
    experts = [train_expert(x, y, c, seed=seed + i) for i, ((x, y), c) in enumerate(pairs)]
    gate = UniversalGate(stats, standardise=bool(calibration_bases(stats)))
    moe = HeterogeneousMoE(experts, p.class_counts, "universal", gate=gate)
    trainer = GatingTrainer(moe, seed=seed, progress=False).fit(p.x_train, p.owner_train, epochs)
    return moe.gate, trainer.evaluate(p.x_test, p.owner_test, p.y_test)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(os.environ.get(k) != v for k, v in PINNED_KERNELS.items()):
        command = [sys.executable, "-m", "netmerge_fast.demo.train_universal_gate", *argv]
        sys.exit(subprocess.call(command, env=os.environ | PINNED_KERNELS))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", type=int, choices=sorted(VERSIONS), default=2, help="which bundled gate")
    parser.add_argument("--out", help="default: the package's file of that version")
    args = parser.parse_args(argv)
    stats, name = VERSIONS[args.version]
    out = args.out or str(resources.files("netmerge_fast.nn") / name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gate, report = train(stats=stats)
    finally:
        torch.set_num_threads(threads)
    gate.save(out)
    print(f"gate accuracy {report.gate_accuracy:.3f}, accuracy {report.accuracy:.3f} on problem 1; wrote {out}")


if __name__ == "__main__":
    main()
