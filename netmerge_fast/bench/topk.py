"""topk_gating against eager and compiled PyTorch, in one process.

Baselines:
  reference   netmerge_fast.reference.topk_gating (the oracle; sort-based, deliberately plain)
  hf_eager    the router as Hugging Face models write it: softmax (or sigmoid + grouped top-k for DeepSeek-V3),
              torch.topk, renormalise -- the code users replace
  compiled    torch.compile of each of the two above
The limit is memory: bytes read (logits) + written (weights, ids) at the rate of a copy_ measured here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import netmerge_fast as nf
from netmerge_fast import reference
from netmerge_fast.bench import copy_rate, time_call


@dataclass(frozen=True)
class Shape:
    name: str
    num_experts: int
    k: int
    options: dict[str, Any] = field(default_factory=dict)
    bias: bool = False


# The standard routing shapes (DESIGN.md): Mixtral, DeepSeek-V2-Lite-like, Qwen3-30B-A3B, DeepSeek-V3.
SHAPES = (
    Shape("mixtral E8 k2", 8, 2),
    Shape("E64 k6", 64, 6),
    Shape("qwen3 E128 k8", 128, 8),
    Shape(
        "deepseek-v3 E256 k8",
        256,
        8,
        {"scoring": "sigmoid", "num_groups": 8, "topk_groups": 4, "group_score": "top2_sum", "scale": 2.5},
        bias=True,
    ),
)
TOKENS = (1, 32, 2048, 16384)
QUICK = {"tokens": (1, 256), "compile": False}
# `netmerge-fast bench` without --full: decode and prefill on the many-expert shapes, eager baselines only.
DEFAULT = {"shapes": (SHAPES[2], SHAPES[3]), "tokens": (1, 2048), "compile": False}


def cases(*, shapes: tuple[Shape, ...] = SHAPES, tokens: tuple[int, ...] = TOKENS, **_: Any) -> int:
    """How many rows ``run`` makes with these arguments (for the progress bar)."""
    return len(shapes) * len(tokens)


def hf_eager(shape: Shape) -> Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]:
    """The routing code of the Hugging Face model family this shape stands for."""
    k = shape.k
    o = shape.options
    if o.get("scoring") == "sigmoid":  # DeepSeek-V3 (transformers' DeepseekV3TopkRouter + MoE.route_tokens_to_experts)
        G, topk_groups, scale = o["num_groups"], o["topk_groups"], o["scale"]

        def route(logits, bias):
            scores = logits.float().sigmoid()
            choice = scores + bias
            E = choice.shape[-1]
            group_scores = choice.view(-1, G, E // G).topk(2, dim=-1)[0].sum(dim=-1)
            group_idx = torch.topk(group_scores, k=topk_groups, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
            score_mask = group_mask.unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E)
            idx = torch.topk(choice.masked_fill(~score_mask.bool(), 0.0), k=k, dim=-1, sorted=False)[1]
            weights = scores.gather(1, idx)
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
            return weights * scale, idx

        return route

    def route(logits, bias):  # Mixtral / Qwen-MoE with norm_topk_prob
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        weights, idx = torch.topk(probs, k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), idx

    return route


def run(
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    tokens: tuple[int, ...] = TOKENS,
    shapes: tuple[Shape, ...] = SHAPES,
    compile: bool = True,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per (shape, T): microseconds per call of ours and of each baseline, ratios, and bandwidth."""
    torch.manual_seed(0)
    rows = []
    for shape in shapes:
        bias = (torch.randn(shape.num_experts, device=device) * 0.1) if shape.bias else None
        options = dict(shape.options, bias=bias)
        baselines: dict[str, Callable] = {
            "reference": lambda x, b, o=options, k=shape.k: reference.topk_gating(x, k, **o),
            "hf_eager": hf_eager(shape),
        }
        if compile:
            baselines["reference_compiled"] = torch.compile(baselines["reference"], dynamic=True)
            baselines["hf_compiled"] = torch.compile(baselines["hf_eager"], dynamic=True)
        for T in tokens:
            if progress:
                progress(f"topk {shape.name} T={T}")
            x = torch.randn(T, shape.num_experts, device=device).to(dtype)
            ours = time_call(lambda x=x, s=shape, o=options: nf.topk_gating(x, s.k, **o), device)
            row: dict[str, Any] = {"shape": shape.name, "T": T, "ours_us": ours * 1e6}
            for name, fn in baselines.items():
                seconds = time_call(lambda fn=fn, x=x, b=bias: fn(x, b), device)
                row[f"{name}_us"] = seconds * 1e6
                row[f"x_{name}"] = seconds / ours
            moved = x.numel() * x.element_size() + T * shape.k * 8
            row["GB/s"] = moved / ours / 1e9
            row["of_copy"] = (moved / ours) / copy_rate(moved // 2, device)
            rows.append(row)
    return rows


# Printed columns; --json also has every baseline's absolute time (<name>_us).
COLUMNS = (
    "shape",
    "T",
    "ours_us",
    "x_reference",
    "x_reference_compiled",
    "x_hf_eager",
    "x_hf_compiled",
    "GB/s",
    "of_copy",
)
