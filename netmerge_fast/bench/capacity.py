"""apply_capacity against the ways PyTorch code drops tokens, in one process.

Baselines:
  reference   netmerge_fast.reference.apply_capacity: two stable sorts and a scatter (sync-free, any E)
  cumsum      the one-hot cumulative sum of Switch Transformers / Tutel / GShard code: position of every slot in
              its expert's queue from cumsum over a [T*k, E] one-hot (after sorting the slots by priority for
              order="score")
  compiled    torch.compile of each of the two above
All at capacity factor 1.0 on router choices of random logits (so some experts overflow).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import netmerge_fast as nf
from netmerge_fast import reference
from netmerge_fast.bench import time_call

# (name, E, k): the standard routing shapes (DESIGN.md).
SHAPES = (("mixtral E8 k2", 8, 2), ("qwen3 E128 k8", 128, 8), ("deepseek-v3 E256 k8", 256, 8))
TOKENS = (256, 4096, 16384)
ORDERS = ("token", "score")
QUICK = {"tokens": (64,), "compile": False, "rounds": 1}


def one_hot_cumsum(ids: torch.Tensor, weights: torch.Tensor, E: int, capacity: int, order: str):
    """The usual PyTorch formulation: each slot's place in its expert's queue from a cumsum over a one-hot."""
    flat = ids.reshape(-1)
    if order == "score":
        visit = torch.sort(weights.reshape(-1), descending=True, stable=True).indices
    else:
        visit = torch.arange(flat.numel(), device=ids.device)
    routed = flat[visit].long()
    one_hot = torch.nn.functional.one_hot(routed.clamp_min(0), E) * (routed >= 0)[:, None]
    place = (one_hot.cumsum(0) * one_hot).sum(1)
    drop = torch.zeros_like(flat, dtype=torch.bool).index_copy(0, visit, place > capacity).view(ids.shape)
    return ids.masked_fill(drop, -1), weights.masked_fill(drop, 0)


def run(
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    tokens: tuple[int, ...] = TOKENS,
    shapes: tuple = SHAPES,
    compile: bool = True,
    rounds: int = 5,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per (shape, T, order): median microseconds per call of ours and each baseline, and the ratios."""
    with torch._dynamo.config.patch(recompile_limit=64):  # the compiled baselines see every (E, order)
        return _run(device, dtype, tokens, shapes, compile, rounds, progress)


def _run(device, dtype, tokens, shapes, compile, rounds, progress) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    rows = []
    baselines: dict[str, Callable] = {
        "reference": lambda i, w, E, c, o: reference.apply_capacity(i, w, E, c, o, w if o == "score" else None),
        "cumsum": one_hot_cumsum,
    }
    if compile:
        baselines["reference_compiled"] = torch.compile(baselines["reference"], dynamic=True)
        baselines["cumsum_compiled"] = torch.compile(baselines["cumsum"], dynamic=True)
    for name, E, k in shapes:
        for T in tokens:
            logits = torch.randn(T, E, device=device) + torch.linspace(0, 1, E, device=device)
            weights, ids = nf.topk_gating(logits.to(dtype), k)
            capacity = nf.expert_capacity(T, k, E, 1.0)
            for order in ORDERS:
                if progress:
                    progress(f"capacity {name} T={T} {order}")
                got = nf.apply_capacity(ids, weights, E, capacity, order)
                for base in ("reference", "cumsum"):
                    assert torch.equal(baselines[base](ids, weights, E, capacity, order)[0], got[0]), base
                ours = time_call(
                    lambda i=ids, w=weights, e=E, c=capacity, o=order: nf.apply_capacity(i, w, e, c, o), device
                )
                dropped = int((got[0] < 0).sum())
                row: dict[str, Any] = {
                    "shape": name,
                    "T": T,
                    "order": order,
                    "dropped": f"{dropped / ids.numel():.1%}",
                    "ours_us": ours * 1e6,
                }
                for base, fn in baselines.items():
                    seconds = time_call(
                        lambda fn=fn, i=ids, w=weights, e=E, c=capacity, o=order: fn(i, w, e, c, o), device
                    )
                    row[f"{base}_us"] = seconds * 1e6
                    row[f"x_{base}"] = seconds / ours
                rows.append(row)
    return rows


COLUMNS = (
    "shape",
    "T",
    "order",
    "dropped",
    "ours_us",
    "x_reference",
    "x_reference_compiled",
    "x_cumsum",
    "x_cumsum_compiled",
)
