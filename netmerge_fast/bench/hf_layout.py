"""GPT-OSS MoE blocks on their own layout (``moe_experts(..., transposed=True, gate_up_interleaved=True)``, what
``integrations.hf.enable`` runs) against the layout ``enable`` used to convert them to in place (gate and up
concatenated, ``[E, 2I, H]`` / ``[E, H, I]`` contiguous), in one process on the same weights and routings.

Cases, on GPT-OSS-20B's E=32, k=4 with H = I scaled down:
  block T=...   the MoE block (router, top-k, experts) on [1, T, H]; decode-sized blocks rotate through 8 inputs
  train T=...   the block's forward and backward (gradients to the input and every weight)
x_relaid = time on the converted layout / time on GPT-OSS's own (>= 1: the direct path is no slower).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from netmerge_fast.bench.dispatch import cycle_calls
from netmerge_fast.bench.hf import _COMMON, Model, build, have_transformers, time_interleaved
from netmerge_fast.dispatch import moe_experts

MODELS = tuple(
    Model(
        f"gpt-oss-20b E32 k4 H{h} I{h}",
        "gpt_oss",
        dict(
            _COMMON,
            hidden_size=h,
            head_dim=64,
            intermediate_size=h,
            num_local_experts=32,
            num_experts_per_tok=4,
            sliding_window=128,
        ),
    )
    for h in (256, 512)
)
CASES = (("block", 1), ("block", 16), ("block", 256), ("train", 256))
QUICK = {"models": MODELS[:1], "cases": (("block", 1), ("train", 32)), "rounds": 1, "min_run_s": 0.002}
COLUMNS = ("model", "case", "T", "dtype", "direct_us", "relaid_us", "x_relaid")


def _relaid(experts: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The converted copy ``enable`` used to make: gate columns then up columns, nn.Linear layout, contiguous."""

    def concatenated(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t[..., ::2], t[..., 1::2]], dim=-1)

    with torch.no_grad():
        tensors = {
            "w_gate_up": concatenated(experts.gate_up_proj).transpose(1, 2).contiguous(),
            "w_down": experts.down_proj.transpose(1, 2).contiguous(),
            "b_gate_up": concatenated(experts.gate_up_proj_bias).contiguous(),
            "b_down": experts.down_proj_bias.clone(),
        }
    return {name: t.requires_grad_() for name, t in tensors.items()}


def _own(experts: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        "w_gate_up": experts.gate_up_proj,
        "w_down": experts.down_proj,
        "b_gate_up": experts.gate_up_proj_bias,
        "b_down": experts.down_proj_bias,
    }


def _block(mlp: torch.nn.Module, w: dict[str, torch.Tensor], **layout) -> Callable[[torch.Tensor], Any]:
    """GPT-OSS's MoE block: its router, then the experts on the weights ``w`` in the given layout."""

    def block(x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(-1, x.shape[-1])
        _, scores, ids = mlp.router(h)
        return moe_experts(
            h, w["w_gate_up"], w["w_down"], scores.float(), ids, activation="swiglu_oai", b_gate_up=w["b_gate_up"],
            b_down=w["b_down"], **layout,
        )  # fmt: skip

    return block


def _train_step(block: Callable, x: torch.Tensor, params: list[torch.Tensor]) -> Callable[[], Any]:
    return lambda: torch.autograd.grad(block(x).square().mean(), [x, *params])


def run(
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    models: tuple[Model, ...] = MODELS,
    cases: tuple[tuple[str, int], ...] = CASES,
    rounds: int = 7,
    min_run_s: float = 0.05,
    compile: bool = True,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per (model, case): the time on GPT-OSS's own layout, on the converted one, and their ratio."""
    if not have_transformers("hf_layout", progress):
        return []
    rows = []
    for spec in models:
        model = build(spec, dtype, device)
        mlp = model.model.layers[-1].mlp
        relaid = _relaid(mlp.experts)
        for case, T in cases:
            if progress:
                progress(f"hf_layout {spec.name} {case} {T} {dtype}")
            gen = torch.Generator().manual_seed(T)
            hidden = spec.config["hidden_size"]
            count = 8 if T == 1 else 1
            inputs = [torch.randn(1, T, hidden, generator=gen).to(device=device, dtype=dtype) for _ in range(count)]
            variants = {
                "direct": (_own(mlp.experts), {"transposed": True, "gate_up_interleaved": True}),
                "relaid": (relaid, {}),
            }
            fns = {}
            for name, (weights, layout) in variants.items():
                block = _block(mlp, weights, **layout)
                if case == "block":
                    fn = cycle_calls(block, [(x,) for x in inputs])
                else:
                    fn = _train_step(block, inputs[0].clone().requires_grad_(), list(weights.values()))
                fns[name] = (lambda: None, fn)
            grad = case == "train"
            with torch.set_grad_enabled(grad), torch.inference_mode(not grad):
                times = time_interleaved(fns, device, rounds=rounds, min_run_s=min_run_s)
            rows.append(
                {
                    "model": spec.name,
                    "case": case,
                    "T": T,
                    "dtype": str(dtype).removeprefix("torch."),
                    "direct_us": times["direct"] * 1e6,
                    "relaid_us": times["relaid"] * 1e6,
                    "x_relaid": times["relaid"] / times["direct"],
                }
            )
        del model
    return rows
