"""The whole MoE layer (router, top-k, experts, shared expert) against Hugging Face transformers 5's MoE blocks,
on identical weights, in one process.

Ours is netmerge_fast.nn.SparseMoE loaded with the HF block's state_dict. Baselines: the HF block with its
`eager` and its `grouped_mm` experts implementation (skipped without transformers). Shapes and limits as in the
dispatch suite (the limit counts the routed experts only). Decode cases rotate through inputs that route to
different experts, as the dispatch suite does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from netmerge_fast.bench import time_call
from netmerge_fast.bench.dispatch import DECODE_MAX_TOKENS, SHAPES, TOKENS, Shape, cycle_calls, limit_seconds
from netmerge_fast.nn import SparseMoE

QUICK = {"tokens": (1, 64), "shapes": (Shape("tiny qwen3 E32 k4", 32, 4, 64, 32),)}
# `netmerge-fast bench` without --full: the many-expert layer at decode and prefill.
DEFAULT = {"tokens": (1, 512), "shapes": (SHAPES[1],)}


def cases(*, shapes: tuple[Shape, ...] = SHAPES, tokens: tuple[int, ...] = TOKENS, **_: Any) -> int:
    """How many rows ``run`` makes with these arguments (for the progress bar)."""
    return len(shapes) * len(tokens)


def hf_block(shape: Shape):
    """(HF MoE block, its config, an equivalent SparseMoE, key renames from the block's state_dict to ours) for
    the model family the shape stands for."""
    import transformers

    E, k, H, inter = shape.num_experts, shape.k, shape.hidden, shape.intermediate
    rename = {}
    if shape.name.startswith("mixtral"):
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        config = transformers.MixtralConfig(
            hidden_size=H, intermediate_size=inter, num_local_experts=E, num_experts_per_tok=k
        )
        block, ours = MixtralSparseMoeBlock(config), SparseMoE(H, inter, E, k)
    elif shape.name.startswith("deepseek"):
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

        config = transformers.DeepseekV3Config(
            hidden_size=H,
            moe_intermediate_size=inter,
            n_routed_experts=E,
            num_experts_per_tok=k,
            n_group=8,
            topk_group=4,
            n_shared_experts=1,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
        )
        block = DeepseekV3MoE(config)
        ours = SparseMoE(
            H,
            inter,
            E,
            k,
            scoring="sigmoid",
            selection_bias=True,
            num_groups=8,
            topk_groups=4,
            group_score="top2_sum",
            scale=2.5,
            shared_expert_size=inter,
        )
        rename = {"shared_experts.": "shared_expert."}
    else:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        config = transformers.Qwen3MoeConfig(
            hidden_size=H, moe_intermediate_size=inter, num_experts=E, num_experts_per_tok=k, norm_topk_prob=True
        )
        block, ours = Qwen3MoeSparseMoeBlock(config), SparseMoE(H, inter, E, k)
    config._experts_implementation = "eager"
    return block, config, ours, rename


def loaded_pair(shape: Shape, device, dtype: torch.dtype):
    """(HF block, its config, SparseMoE) on device in dtype, the block's random weights loaded into ours."""
    torch.manual_seed(0)
    block, config, ours, rename = hf_block(shape)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
        block.to(device=device, dtype=dtype)
        state = {}
        for key, value in block.state_dict().items():
            for old, new in rename.items():
                key = key.replace(old, new)
            state[key] = value
        ours.load_state_dict(state)
        ours.to(device=device, dtype=dtype)
    return block, config, ours


def run(
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    tokens: tuple[int, ...] = TOKENS,
    shapes: tuple[Shape, ...] = SHAPES,
    compile: bool = True,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per (shape, T): microseconds per forward of ours and of each HF implementation, ratios, efficiency."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        if progress:
            progress("layer: transformers is not installed; nothing to compare with")
        return []
    generator = torch.Generator().manual_seed(0)
    rows = []
    for shape in shapes:
        block, config, ours = loaded_pair(shape, device, dtype)

        def hf(x, implementation, block=block, config=config):
            config._experts_implementation = implementation
            return block(x)

        for T in tokens:
            if progress:
                progress(f"layer {shape.name} T={T} {dtype}")
            decode = T <= DECODE_MAX_TOKENS
            count = max(1, -(-2 * shape.num_experts // (T * shape.k))) if decode else 1
            inputs = [
                (torch.randn(1, T, shape.hidden, generator=generator).to(dtype).to(device),) for _ in range(count)
            ]
            with torch.no_grad():
                routings = []
                for (x,) in inputs:
                    ours(x)
                    routings.append(ours.topk_ids)
                seconds = time_call(cycle_calls(ours, inputs), device)
                row: dict[str, Any] = {"shape": shape.name, "T": T, "dtype": str(dtype).removeprefix("torch.")}
                row["ours_us"] = seconds * 1e6
                for implementation in ("eager", "grouped_mm"):
                    base = time_call(cycle_calls(lambda x, i=implementation: hf(x, i), inputs), device)
                    row[f"hf_{implementation}_us"] = base * 1e6
                    row[f"x_hf_{implementation}"] = base / seconds
            row["x_best_hf"] = min(row["hf_eager_us"], row["hf_grouped_mm_us"]) / row["ours_us"]
            row["limit"] = "bandwidth" if decode else "dense mm"
            row["of_limit"] = limit_seconds(shape, T, routings, dtype, device) / seconds
            rows.append(row)
    return rows


COLUMNS = ("shape", "T", "dtype", "ours_us", "x_hf_eager", "x_hf_grouped_mm", "x_best_hf", "limit", "of_limit")
