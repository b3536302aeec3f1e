"""Whole Hugging Face MoE models with ``netmerge_fast.integrations.hf.enable`` against the same models on
transformers' own experts implementations, in one process.

For each family a small random model (2 MoE layers; DeepSeek-V3 with a dense first layer) whose E, k and H:I ratio
follow the real model, with H scaled down so a case runs in seconds on 2 CPU cores. Cases:
  block T=...     the last decoder layer's MoE block alone (router, top-k, experts, shared expert), on [1, T, H]
  prefill T=...   model(input_ids) on one sequence of T tokens (logits included)
  decode N        model.generate: a 16-token prompt, N new tokens (greedy, KV cache); tokens/s = N / time
Implementations: ours (``enable``: routers on topk_gating, experts on moe_experts), and transformers' experts
implementations with transformers' routers: ``grouped_mm`` (its default), ``eager`` and ``batched_mm``. They are
timed in turn, round after round (medians of 7 rounds), so a change of the machine's load reaches all of them.
x_<impl> = that implementation's time / ours; x_best_hf uses the fastest of the three.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from netmerge_fast.bench import _sync
from netmerge_fast.bench.dispatch import cycle_calls

HF_IMPLEMENTATIONS = ("grouped_mm", "eager", "batched_mm")
PROMPT = 16


@dataclass(frozen=True)
class Model:
    name: str
    family: str
    config: dict = field(hash=False)


_COMMON = dict(vocab_size=2048, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)

# E, k and H:I as in the named model; H = 256.
MODELS = (
    Model(
        "mixtral-8x7b E8 k2 H256 I896",
        "mixtral",
        dict(_COMMON, hidden_size=256, intermediate_size=896, num_local_experts=8, num_experts_per_tok=2),
    ),
    Model(
        "qwen1.5-moe E60 k4 H256 I176 +shared",
        "qwen2_moe",
        dict(
            _COMMON,
            hidden_size=256,
            intermediate_size=704,
            moe_intermediate_size=176,
            shared_expert_intermediate_size=704,
            num_experts=60,
            num_experts_per_tok=4,
            norm_topk_prob=False,
        ),
    ),
    Model(
        "qwen3-30b-a3b E128 k8 H256 I96",
        "qwen3_moe",
        dict(
            _COMMON,
            hidden_size=256,
            head_dim=64,
            intermediate_size=768,
            moe_intermediate_size=96,
            num_experts=128,
            num_experts_per_tok=8,
        ),
    ),
    Model(
        "olmoe-1b-7b E64 k8 H256 I128",
        "olmoe",
        dict(_COMMON, hidden_size=256, intermediate_size=128, num_experts=64, num_experts_per_tok=8),
    ),
    Model(
        "deepseek-v3 E256 k8 H256 I72 +shared",
        "deepseek_v3",
        dict(
            _COMMON,
            num_hidden_layers=3,
            num_key_value_heads=4,
            first_k_dense_replace=1,
            hidden_size=256,
            intermediate_size=512,
            moe_intermediate_size=72,
            n_routed_experts=256,
            num_experts_per_tok=8,
            n_group=8,
            topk_group=4,
            n_shared_experts=1,
            routed_scaling_factor=2.5,
            q_lora_rank=64,
            kv_lora_rank=64,
            qk_rope_head_dim=32,
            qk_nope_head_dim=32,
            v_head_dim=32,
        ),
    ),
    Model(
        "gpt-oss-20b E32 k4 H256 I256",
        "gpt_oss",
        dict(
            _COMMON,
            hidden_size=256,
            head_dim=64,
            intermediate_size=256,
            num_local_experts=32,
            num_experts_per_tok=4,
            sliding_window=128,
        ),
    ),
)
CASES = (("block", 1), ("block", 256), ("prefill", 256), ("decode", 16))
QUICK = {
    "models": tuple(
        Model(
            f"tiny {m.family}",
            m.family,
            {
                **m.config,
                "hidden_size": 64,
                **{k: 32 for k in ("intermediate_size", "moe_intermediate_size") if k in m.config},
            },
        )
        for m in MODELS
        if m.family == "gpt_oss"
    ),
    "cases": (("block", 1), ("prefill", 32), ("decode", 4)),
    "rounds": 1,
    "min_run_s": 0.002,
}


def cases(*, models: tuple[Model, ...] = MODELS, cases: tuple[tuple[str, int], ...] = CASES, **_: Any) -> int:
    """How many rows ``run`` makes with these arguments (for the progress bar)."""
    return len(models) * len(cases)


_CONFIGS = {
    "mixtral": "MixtralConfig",
    "qwen2_moe": "Qwen2MoeConfig",
    "qwen3_moe": "Qwen3MoeConfig",
    "olmoe": "OlmoeConfig",
    "deepseek_v3": "DeepseekV3Config",
    "gpt_oss": "GptOssConfig",
}


def build(spec: Model, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """The family's CausalLM with the spec's config and random weights (std 0.02; seeded)."""
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, _CONFIGS[spec.family])(**spec.config)
    model = transformers.AutoModelForCausalLM.from_config(config)
    randomize(model, std=0.02)
    return model.to(device=device, dtype=dtype).eval()


@torch.no_grad()
def randomize(model: torch.nn.Module, std: float) -> None:
    """Draw every weight but the norms, and DeepSeek-V3's selection bias, from N(0, std^2) (torch's global RNG)."""
    for name, p in model.named_parameters():
        if "norm" not in name:
            p.normal_(0, std)
    for name, b in model.named_buffers():
        if "e_score_correction_bias" in name:
            b.normal_(0, std)


def select(model, implementation: str) -> None:
    """Run ``model`` on our drop-in (``"ours"``) or on one of transformers' experts implementations."""
    from netmerge_fast.integrations import hf

    if implementation == "ours":
        if getattr(model, "_netmerge_report", None) is None:
            hf.enable(model)
        return
    hf.disable(model)
    model.set_experts_implementation(implementation)


def _moe_block(model):
    return model.model.layers[-1].mlp


def _callable(model, case: str, T: int, device: str, dtype: torch.dtype, generator: torch.Generator):
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    if case == "block":
        block = _moe_block(model)
        # Decode-sized blocks rotate through inputs so their routings cover the experts (weights from memory).
        count = 8 if T == 1 else 1
        shape = (1, T, hidden)
        inputs = [(torch.randn(shape, generator=generator).to(device=device, dtype=dtype),) for _ in range(count)]
        return cycle_calls(block, inputs)
    if case == "prefill":
        ids = torch.randint(0, vocab, (1, T), generator=generator).to(device)
        return lambda: model(ids, use_cache=False)
    prompt = torch.randint(0, vocab, (1, PROMPT), generator=generator).to(device)
    kwargs = dict(max_new_tokens=T, min_new_tokens=T, do_sample=False, pad_token_id=0)
    return lambda: model.generate(prompt, **kwargs)


def time_interleaved(
    fns: dict[str, tuple[Callable[[], None], Callable[[], Any]]],
    device: str = "cpu",
    *,
    rounds: int = 7,
    min_run_s: float = 0.05,
) -> dict[str, float]:
    """Median seconds per call of each ``(setup, fn)``, timed round-robin: on a shared machine a change of load
    then hits every implementation alike instead of whichever ran at the time. ``setup`` runs before each run
    (it switches the model's implementation), followed by one untimed call."""
    device = torch.device(device)
    calls, samples = {}, {name: [] for name in fns}
    for name, (setup, fn) in fns.items():
        setup()
        fn()
        calls[name] = 1
        while True:
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            _sync(device)
            if time.perf_counter() - start >= min_run_s or calls[name] >= 1 << 12:
                break
            calls[name] *= 2
    for _ in range(rounds):
        for name, (setup, fn) in fns.items():
            setup()
            fn()
            _sync(device)
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - start) / calls[name])
    return {name: statistics.median(values) for name, values in samples.items()}


def have_transformers(suite: str, progress: Callable[[str], None] | None) -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        if progress:
            progress(f"{suite}: transformers is not installed; nothing to run")
        return False
    return True


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
    """One row per (model, case): our time and tokens/s, each HF implementation's time / ours."""
    if not have_transformers("hf", progress):
        return []
    rows = []
    for spec in models:
        model = build(spec, dtype, device)
        for case, T in cases:
            if progress:
                progress(f"hf {spec.name} {case} {T} {dtype}")
            row: dict[str, Any] = {"model": spec.name, "case": case, "T": T, "dtype": str(dtype).removeprefix("torch.")}
            fns = {
                implementation: (
                    lambda i=implementation, m=model: select(m, i),
                    _callable(model, case, T, device, dtype, torch.Generator().manual_seed(T)),
                )
                for implementation in ("ours", *HF_IMPLEMENTATIONS)
            }
            with torch.no_grad():
                times = time_interleaved(fns, device, rounds=rounds, min_run_s=min_run_s)
            ours = times["ours"]
            row["ours_us"] = ours * 1e6
            row["ours_tok_s"] = T / ours
            for implementation in HF_IMPLEMENTATIONS:
                row[f"x_hf_{implementation}"] = times[implementation] / ours
            row["x_best_hf"] = min(times[i] for i in HF_IMPLEMENTATIONS) / ours
            rows.append(row)
        select(model, "grouped_mm")
        del model
    return rows


COLUMNS = (
    "model",
    "case",
    "T",
    "dtype",
    "ours_us",
    "ours_tok_s",
    "x_hf_grouped_mm",
    "x_hf_eager",
    "x_hf_batched_mm",
    "x_best_hf",
)
