"""Benchmark harness shared by ``netmerge-fast bench`` and the pytest-benchmark suites in benchmarks/.

Every suite times our op and its baselines in the same process and reports ratios (baseline time / ours);
absolute times are only meaningful on a quiet machine, ratios survive noise better. Times are medians.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["copy_rate", "format_table", "read_rate", "time_call", "write_json"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], Any],
    device: torch.device | str = "cpu",
    *,
    min_run_s: float = 0.02,
    repeats: int = 7,
    max_calls: int = 1 << 16,
) -> float:
    """Median seconds per call of ``fn()``.

    One warm-up call, then the number of calls per run is doubled until a run lasts ``min_run_s`` (so timer
    resolution and launch overhead are amortised), then ``repeats`` runs are timed and the median taken.
    """
    device = torch.device(device)
    fn()
    _sync(device)
    calls = 1
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= min_run_s or calls >= max_calls:
            break
        calls *= 2
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        runs.append((time.perf_counter() - start) / calls)
    return statistics.median(runs)


_copy_rates: dict[tuple[int, str], float] = {}


def copy_rate(nbytes: int, device: torch.device | str = "cpu") -> float:
    """Bytes per second moved (read + written) by ``copy_`` of a buffer of ``nbytes``, measured here."""
    device = torch.device(device)
    key = (nbytes, str(device))
    if key not in _copy_rates:
        src = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device).random_()
        dst = torch.empty_like(src)
        seconds = time_call(lambda: dst.copy_(src), device)
        _copy_rates[key] = 2 * src.numel() / seconds
    return _copy_rates[key]


_read_rates: dict[str, float] = {}

# Larger than any last-level cache we run on (32 MB here), so the rate is that of memory.
READ_BYTES = 512 << 20


def read_rate(device: torch.device | str = "cpu") -> float:
    """Bytes per second read by ``sum`` over a buffer of READ_BYTES, measured here (filled with data: untouched
    memory maps to one shared zero page and reads at cache speed)."""
    device = torch.device(device)
    if str(device) not in _read_rates:
        buffer = torch.randn(READ_BYTES // 4, device=device)
        seconds = time_call(buffer.sum, device)
        _read_rates[str(device)] = READ_BYTES / seconds
    return _read_rates[str(device)]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "-"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain aligned text table (numbers right-aligned), also valid Markdown."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())
    cells = [[_cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    numeric = [all(isinstance(row.get(c), int | float) for row in rows) for c in columns]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "| " + " | ".join(parts) + " |"

    dashes = [("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric, strict=True)]
    rule = "|" + "|".join(dashes) + "|"
    return "\n".join([line(columns), rule, *(line(r) for r in cells)])


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    device = torch.device(device)
    info = {"torch": torch.__version__, "device": device.type, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_json(path: str, suites: dict[str, list[dict[str, Any]]], device: torch.device | str = "cpu") -> None:
    with open(path, "w") as f:
        json.dump({"machine": machine_info(device), "suites": suites}, f, indent=2, default=float)
