"""pytest-benchmark: whole Hugging Face MoE models with integrations.hf.enable against transformers' own experts
implementations, in one process.

    pytest benchmarks/test_bench_hf.py --benchmark-enable --benchmark-group-by=group

Each group is one (model, case); compare its rows (an HF implementation's time / ours is the figure that matters).
The same cases, with the ratios computed, print with ``netmerge-fast bench hf``.
"""

import pytest
import torch

from netmerge_fast.bench.hf import CASES, HF_IMPLEMENTATIONS, MODELS, _callable, build, select

pytest.importorskip("transformers", minversion="5.0")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_models: dict = {}


def model_for(spec):
    if spec not in _models:
        _models.clear()  # one model at a time
        _models[spec] = build(spec, torch.float32, DEVICE)
    return _models[spec]


@pytest.mark.parametrize("impl", ("ours", *HF_IMPLEMENTATIONS))
@pytest.mark.parametrize(("case", "T"), CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("spec", MODELS, ids=lambda s: s.family)
def test_hf_model(benchmark, spec, case, T, impl):
    model = model_for(spec)
    select(model, impl)
    fn = _callable(model, case, T, DEVICE, torch.float32, torch.Generator().manual_seed(T))
    benchmark.group = f"hf {spec.name} {case} T={T}"
    benchmark.extra_info["impl"] = impl
    with torch.no_grad():
        benchmark(fn)
