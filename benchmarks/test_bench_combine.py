"""pytest-benchmark: logit_statistics and combine_logits against the vectorised reference and the seed's per-row
loop, in one process.

    pytest benchmarks/test_bench_combine.py --benchmark-enable --benchmark-group-by=group

Each group is one (op, B, E, C); compare the rows of a group (baseline / ours is the figure that matters). The same
cases, with the ratios computed, print with ``netmerge-fast bench combine``.
"""

import pytest
import torch

from netmerge_fast.bench.combine import BATCHES, CLASSES, EXPERTS, LOOP_MAX_ROWS, MAX_LOGITS, OPS, implementations

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("impl", ["ours", "reference", "loop"])
@pytest.mark.parametrize("C", CLASSES)
@pytest.mark.parametrize("E", EXPERTS)
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("op", OPS)
def test_combine(benchmark, op, B, E, C, impl):
    if B * E * C > MAX_LOGITS:
        pytest.skip(f"{B * E * C / 1e6:.0f}M logits: the reference would take minutes")
    calls = implementations(op, [C] * E)
    if impl not in calls:
        pytest.skip(f"no per-row loop for {op}")
    if impl == "loop" and B > LOOP_MAX_ROWS:
        pytest.skip(f"the per-row loop takes minutes beyond {LOOP_MAX_ROWS} rows")
    torch.manual_seed(0)
    x = torch.randn(B, E * C, device=DEVICE)
    benchmark.group = f"combine {op} B={B} E={E} C={C}"
    benchmark.extra_info["impl"] = impl
    benchmark(calls[impl], x)
