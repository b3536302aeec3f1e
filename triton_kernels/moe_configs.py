"""Tile configurations of the Triton moe_experts kernels: a table keyed by (E, N, K, dtype, device capability,
rows-per-expert bucket), a default for shapes the table does not hold, and an opt-in tuner that fills the table.

A layer is identified by its first GEMM: N = 2I (I when not gated) output columns, K = H. Each entry holds one
config per rows-per-expert bucket (1, 2, 4, ..., 4096; the nearest bucket serves), each with the BLOCK_M both
GEMMs share (the rows of one expert block) and per-GEMM tiles:

    {"E=8,N=28672,K=4096,dtype=bfloat16": {"16": {"BLOCK_M": 16, "up": {...}, "down": {...}}, ...}}

with ``{"BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"}`` per GEMM. Tables are JSON files, one per
device capability: ``sm90.json`` in $NETMERGE_TRITON_CONFIGS (if set), then in ``configs/`` beside this file.
The shipped directory holds none yet: no GPU has tuned them. ``python -m netmerge_fast.triton_kernels.moe_configs
--help`` runs the tuner (``triton.autotune`` over candidate tiles) on the current GPU and writes a table.

SPLIT_K is chosen per call, from the number of programs and of SMs, unless an entry's GEMM pins it.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
from pathlib import Path

import torch
import triton

CONFIG_DIR = Path(__file__).with_name("configs")
BUCKETS = tuple(2**i for i in range(13))  # rows per expert: 1 .. 4096
_TILE_KEYS = ("BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")


def layer_key(E: int, N: int, K: int, dtype: torch.dtype) -> str:
    return f"E={E},N={N},K={K},dtype={str(dtype).removeprefix('torch.')}"


@functools.cache
def device_properties(device: torch.device) -> tuple[tuple[int, int], int]:
    """(compute capability, SM count). Without a GPU (the interpreter) a small stand-in: (8, 0) with 4 SMs."""
    if device.type != "cuda":
        return (8, 0), 4
    props = torch.cuda.get_device_properties(device)
    return (props.major, props.minor), props.multi_processor_count


def table_path(capability: tuple[int, int], directory: Path | None = None) -> Path:
    return (directory or CONFIG_DIR) / f"sm{capability[0]}{capability[1]}.json"


@functools.cache
def _table(capability: tuple[int, int], override: str | None) -> dict:
    for directory in ([Path(override)] if override else []) + [CONFIG_DIR]:
        path = table_path(capability, directory)
        if path.is_file():
            return json.loads(path.read_text())
    return {}


def lookup(E: int, N: int, K: int, dtype: torch.dtype, capability: tuple[int, int], rows_per_expert: float):
    """The table's config for the nearest rows-per-expert bucket, or None."""
    entry = _table(capability, os.environ.get("NETMERGE_TRITON_CONFIGS")).get(layer_key(E, N, K, dtype))
    if not entry:
        return None
    log_rows = math.log2(max(rows_per_expert, 1.0))
    nearest = min(entry, key=lambda bucket: abs(math.log2(int(bucket)) - log_rows))
    return entry[nearest]


def _pow2_at_most(value: int, cap: int, low: int = 16) -> int:
    return max(low, min(cap, triton.next_power_of_2(max(value, 1))))


def default_config(rows_per_expert: float, N: int, K: int, H: int, dtype: torch.dtype, capability, gated: bool):
    """Tiles by reasoning, not tuned: rows of one expert per block as few as tl.dot allows when experts get few
    rows (the GEMMs then stream weights), larger square-ish tiles as rows grow (reuse); float32 multiplies in
    IEEE precision on FMAs, so its tiles stay small. The gated first GEMM keeps two accumulators (gate, up)."""
    fp32 = dtype == torch.float32
    block_m = 16 if rows_per_expert <= 16 else 32 if rows_per_expert <= 32 else 64 if rows_per_expert <= 96 else 128
    if fp32:
        block_m = min(block_m, 64)
    stages = 2 if fp32 else 4 if capability[0] >= 9 else 3

    def tiles(n, k, accumulators):
        block_n = 64 if fp32 or accumulators == 2 or block_m < 64 else 128
        block_k = 32 if fp32 else 128 if block_m == 16 else 64
        block_n, block_k = _pow2_at_most(n, block_n), _pow2_at_most(k, block_k)
        warps = 8 if block_m * block_n * accumulators >= 128 * 128 else 4
        return {"BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8, "num_warps": warps, "num_stages": stages}

    return {"BLOCK_M": block_m, "up": tiles(N // (2 if gated else 1), K, 2 if gated else 1), "down": tiles(H, N, 1)}


def decode_tiles(n: int, k: int, dtype: torch.dtype) -> dict:
    """One slot per program: a [1, BLOCK_K] row against a [BLOCK_K, BLOCK_N] weight tile on FMAs."""
    return {
        "BLOCK_N": _pow2_at_most(n, 64),
        "BLOCK_K": _pow2_at_most(k, 64 if dtype == torch.float32 else 128),
        "GROUP_M": 1,
        "num_warps": 4,
        "num_stages": 3,
    }


def split_k(programs: int, k: int, block_k: int, sm_count: int) -> int:
    """Splits of the K loop when the grid would leave SMs idle: enough for two programs per SM, each split
    keeping at least two K blocks, at most 8. Partial sums are reduced in a fixed order (deterministic)."""
    if programs >= sm_count:
        return 1
    wanted = triton.next_power_of_2(triton.cdiv(2 * sm_count, max(programs, 1)))
    return max(1, min(wanted, 8, triton.cdiv(k, block_k) // 2))


# ---- the tuner (opt-in, on a GPU) ----

_CANDIDATES_M = (16, 32, 64, 128)
_CANDIDATES_TILES = [
    {"BLOCK_N": n, "BLOCK_K": k, "GROUP_M": g, "num_warps": w, "num_stages": s}
    for n in (32, 64, 128, 256)
    for k in (32, 64, 128, 256)
    for g in (1, 8)
    for w in (4, 8)
    for s in (2, 3, 4, 5)
]


def tune(
    E: int,
    H: int,
    inter: int,
    dtype: torch.dtype,
    *,
    gated: bool = True,
    top_k: int = 2,
    buckets=BUCKETS,
    block_ms=_CANDIDATES_M,
    candidates=_CANDIDATES_TILES,
    device: torch.device | None = None,
    do_bench=None,
) -> dict:
    """Measure candidate tiles for one layer and return its table entry (see the module docstring).

    For each rows-per-expert bucket and BLOCK_M, ``triton.autotune`` picks the fastest tiles of each GEMM (its
    own timer, or ``do_bench``); the BLOCK_M whose two GEMMs take least wins. On the current GPU by default.
    """
    from netmerge_fast.triton_kernels import moe_experts as kernels

    device = device or torch.device("cuda", torch.cuda.current_device())
    width = 2 * inter if gated else inter
    w_gate_up = torch.randn(E, width, H, device=device).to(dtype) * H**-0.5
    w_down = torch.randn(E, H, inter, device=device).to(dtype) * inter**-0.5
    entry = {}
    for rows in buckets:
        T = max(1, rows * E // top_k)
        if T * top_k <= E:
            continue  # served by the per-slot path
        hidden = torch.randn(T, H, device=device).to(dtype)
        ids = torch.stack([torch.randperm(E, device=device)[:top_k] for _ in range(T)]).int()
        weights = torch.rand(T, top_k, device=device)
        best = None
        for block_m in block_ms:
            seconds, tiles = kernels.tune_block_m(
                hidden, w_gate_up, w_down, weights, ids, gated, block_m, candidates, do_bench=do_bench
            )
            if best is None or seconds < best[0]:
                best = (seconds, {"BLOCK_M": block_m, **tiles})
        entry[str(rows)] = best[1]
    return entry


def save(entry: dict, E: int, N: int, K: int, dtype: torch.dtype, capability, directory: Path) -> Path:
    """Adds one layer's entry to the table of a device capability in ``directory``; returns the file."""
    path = table_path(capability, directory)
    table = json.loads(path.read_text()) if path.is_file() else {}
    table[layer_key(E, N, K, dtype)] = entry
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    _table.cache_clear()
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Tune the Triton moe_experts tiles on this GPU; writes a table.")
    parser.add_argument("--experts", type=int, required=True)
    parser.add_argument("--hidden", type=int, required=True)
    parser.add_argument("--intermediate", type=int, required=True)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--ungated", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="directory (default: $NETMERGE_TRITON_CONFIGS)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("tuning needs a CUDA GPU")
    dtype = getattr(torch, args.dtype)
    directory = args.out or Path(os.environ.get("NETMERGE_TRITON_CONFIGS", CONFIG_DIR))
    capability, _ = device_properties(torch.device("cuda", torch.cuda.current_device()))
    gated = not args.ungated
    entry = tune(args.experts, args.hidden, args.intermediate, dtype, gated=gated, top_k=args.top_k)
    N = args.intermediate * (2 if gated else 1)
    path = save(entry, args.experts, N, args.hidden, dtype, capability, directory)
    print(f"wrote {path} ({torch.cuda.get_device_name()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
