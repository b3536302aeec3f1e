"""logit_statistics and combine_logits against the vectorised reference and the seed's per-row loop, in one process.

Ops timed per (B, E, C) (E experts of C classes each):
  statistics      logit_statistics(stats=("mean", "std", "max")): the universal gate's input
  std             combine_logits(method="std"): the seed's selecting combiner
  third_quartile  combine_logits(method="third_quartile"): the quartile (selection) path
Baselines:
  reference       netmerge_fast.reference (vectorised torch, no Python loop over rows)
  loop            the seed repository's style: a Python loop over rows, torch ops on each row (std and
                  third_quartile; only for B <= LOOP_MAX_ROWS, it takes minutes beyond)
  compiled        torch.compile of the reference (with compile=True), for B >= COMPILED_MIN_ROWS only: it
                  recompiles for every expert layout and batch size, 5-10 s each, which would dominate the
                  smaller cases
The limit is memory: bytes read (logits) + written (outputs) at the rate of a copy_ measured here.
Baselines are skipped above MAX_LOGITS logits (the reference would take minutes, and gigabytes); ours alone runs up
to OURS_MAX_LOGITS (2 GB of float32 logits), and cases beyond are skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import netmerge_fast as nf
from netmerge_fast import reference
from netmerge_fast.bench import copy_rate, time_call

BATCHES = (1, 256, 65536)
EXPERTS = (2, 8, 64)
CLASSES = (5, 10, 1000)
OPS = ("statistics", "std", "third_quartile")
MAX_LOGITS = 1 << 26
OURS_MAX_LOGITS = 1 << 29
LOOP_MAX_ROWS = 256
COMPILED_MIN_ROWS = 65536
QUICK = {"batches": (1, 64), "experts": (2, 8), "classes": (5,), "compile": False}


def cases(
    *, batches: tuple[int, ...] = BATCHES, experts: tuple[int, ...] = EXPERTS, classes: tuple[int, ...] = CLASSES,
    ops: tuple[str, ...] = OPS, **_: Any,
) -> int:  # fmt: skip
    """How many rows ``run`` makes with these arguments (for the progress bar)."""
    return len(batches) * len(experts) * len(classes) * len(ops)


_STATS = ("mean", "std", "max")


def seed_loop(parts: list[torch.Tensor], method: str) -> torch.Tensor:
    """The seed's combiners as its code runs them, generalised to E experts: per row, each expert's criterion
    with torch ops on that row, then winner takes all (its logits, every other slot its minimum)."""
    rows = []
    for i in range(parts[0].shape[0]):
        if method == "std":
            scores = [-p[i].std() for p in parts]
        else:
            scores = [p[i].max() - torch.quantile(p[i], 0.75) for p in parts]
        winner = int(torch.stack(scores).argmax())
        fill = parts[winner][i].min()
        rows.append(torch.cat([p[i] if e == winner else torch.full_like(p[i], fill) for e, p in enumerate(parts)]))
    return torch.stack(rows)


def implementations(op: str, counts: list[int]) -> dict[str, Callable[[torch.Tensor], Any]]:
    """Ours and each baseline for one op, as functions of the packed logits."""
    if op == "statistics":
        return {
            "ours": lambda x: nf.logit_statistics(x, counts, stats=_STATS),
            "reference": lambda x: reference.logit_statistics(x, counts, stats=_STATS),
        }
    return {
        "ours": lambda x: nf.combine_logits(x, counts, method=op),
        "reference": lambda x: reference.combine_logits(x, counts, method=op),
        "loop": lambda x: seed_loop(list(x.split(counts, dim=1)), op),
    }


def _bytes_moved(op: str, x: torch.Tensor, num_experts: int) -> int:
    B = x.shape[0]
    written = B * num_experts * len(_STATS) * 4 if op == "statistics" else x.numel() * x.element_size() + B * 8
    return x.numel() * x.element_size() + written


def run(
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    batches: tuple[int, ...] = BATCHES,
    experts: tuple[int, ...] = EXPERTS,
    classes: tuple[int, ...] = CLASSES,
    ops: tuple[str, ...] = OPS,
    compile: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per (op, B, E, C): microseconds per call of ours and of each baseline, ratios, and bandwidth."""
    torch.manual_seed(0)
    rows = []
    for op in ops:
        for E in experts:
            for C in classes:
                counts = [C] * E
                calls = implementations(op, counts)
                if compile:
                    calls["compiled"] = torch.compile(calls["reference"], dynamic=True)
                for B in batches:
                    row: dict[str, Any] = {"op": op, "B": B, "E": E, "C": C}
                    logits = B * E * C
                    if logits > OURS_MAX_LOGITS:
                        row["note"] = f"skipped: {logits / 1e6:.0f}M logits, more memory than we use here"
                        rows.append(row)
                        continue
                    if logits > MAX_LOGITS:
                        row["note"] = f"baselines skipped: {logits / 1e6:.0f}M logits, minutes for the reference"
                    if progress:
                        progress(f"combine {op} B={B} E={E} C={C}")
                    x = torch.randn(B, E * C, device=device).to(dtype)
                    ours = time_call(lambda fn=calls["ours"], x=x: fn(x), device)
                    row["ours_us"] = ours * 1e6
                    for name, fn in calls.items():
                        if (
                            name == "ours"
                            or logits > MAX_LOGITS
                            or (name == "loop" and B > LOOP_MAX_ROWS)
                            or (name == "compiled" and B < COMPILED_MIN_ROWS)
                        ):
                            continue
                        seconds = time_call(lambda fn=fn, x=x: fn(x), device)
                        row[f"{name}_us"] = seconds * 1e6
                        row[f"x_{name}"] = seconds / ours
                    moved = _bytes_moved(op, x, E)
                    row["GB/s"] = moved / ours / 1e9
                    row["of_copy"] = (moved / ours) / copy_rate(moved // 2, device)
                    rows.append(row)
    return rows


# Printed columns; --json also has every baseline's absolute time (<name>_us).
COLUMNS = ("op", "B", "E", "C", "ours_us", "x_reference", "x_compiled", "x_loop", "GB/s", "of_copy", "note")
