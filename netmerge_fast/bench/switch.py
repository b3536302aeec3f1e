"""Switch Transformers with integrations.hf.enable against transformers' own code, same weights, same process.

Random weights (N(0, 0.05^2)), float32, eval. Switch-Base's E = 8 / 32 / 128 and d_ff = 4 * d_model at d_model =
256, capacity factor 1.25 per sequence (``expert_capacity = ceil(1.25 * S / E)``). Cases: ``block``: one
``SwitchTransformersSparseMLP`` on ``[B, S, d_model]``; ``forward``: the whole encoder-decoder (4 + 4 layers, every
second one sparse) on B sequences of S tokens, decoder inputs of the same length. Implementations are timed in
alternating rounds (medians), so a change of load reaches both.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from netmerge_fast.bench import time_call

EXPERTS = (8, 32, 128)
QUICK = {"experts": (8,), "batch": 2, "length": 16, "rounds": 1}


def _model(num_experts: int, length: int, d_model: int = 256):
    import transformers

    from netmerge_fast.bench.hf import randomize

    config = transformers.SwitchTransformersConfig(
        vocab_size=2048, d_model=d_model, d_kv=d_model // 4, d_ff=4 * d_model, num_layers=4, num_decoder_layers=4,
        num_heads=4, num_experts=num_experts, expert_capacity=math.ceil(1.25 * length / num_experts),
        num_sparse_encoder_layers=2, num_sparse_decoder_layers=2, dropout_rate=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.SwitchTransformersForConditionalGeneration(config)
    with torch.no_grad():
        randomize(model, std=0.05)
    return model.eval()


def run(
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    experts: tuple[int, ...] = EXPERTS,
    batch: int = 8,
    length: int = 128,
    rounds: int = 5,
    compile: bool = True,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per (E, case): microseconds of ours and of transformers, and the ratio."""
    from netmerge_fast.integrations import hf

    rows = []
    for E in experts:
        model = _model(E, length).to(device=device, dtype=dtype)
        ids = torch.randint(0, 2048, (batch, length), generator=torch.Generator().manual_seed(1)).to(device)
        mlp = model.encoder.block[1].layer[1].mlp
        x = torch.randn(batch, length, model.config.d_model, generator=torch.Generator().manual_seed(2))
        x = x.to(device=device, dtype=dtype)
        cases = {
            "block": lambda mlp=mlp, x=x: mlp(x),
            "forward": lambda model=model, ids=ids: model(input_ids=ids, decoder_input_ids=ids).logits,
        }
        with torch.no_grad():
            expected = {name: fn() for name, fn in cases.items()}
            hf.enable(model)
            for name, fn in cases.items():
                torch.testing.assert_close(fn(), expected[name], rtol=1e-4, atol=1e-4)
            for name, fn in cases.items():
                if progress:
                    progress(f"switch E={E} {name}")
                times: dict[str, list[float]] = {"ours": [], "hf": []}
                for _ in range(rounds):
                    hf.enable(model)
                    times["ours"].append(time_call(fn, device, repeats=3))
                    hf.disable(model)
                    times["hf"].append(time_call(fn, device, repeats=3))
                ours, theirs = (sorted(t)[len(t) // 2] for t in (times["ours"], times["hf"]))
                rows.append(
                    {
                        "model": f"switch E{E} d{model.config.d_model}",
                        "case": name,
                        "tokens": batch * length,
                        "capacity": model.config.expert_capacity,
                        "ours_us": ours * 1e6,
                        "hf_us": theirs * 1e6,
                        "x_hf": theirs / ours,
                    }
                )
    return rows


COLUMNS = ("model", "case", "tokens", "capacity", "ours_us", "hf_us", "x_hf")
