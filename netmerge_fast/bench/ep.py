"""Expert parallelism: tokens/s of ExpertParallelMoE against the world size, and the share of its time spent in
communication, each world size in its own group of processes (Gloo on CPU, NCCL on GPUs).

Weak scaling: every rank routes the same number of its own tokens through the same layer (E experts in all,
E / world on each rank), forward only (inference). Per world size:

  EP ms          median time of one ExpertParallelMoE forward, the slowest rank's (ranks run in lock step)
  tokens/s       world * tokens per rank / EP time
  comm ms        the same call's communication alone, replayed with its split sizes: the count exchange with
                 its host synchronisation, the rows' all-to-all and the results' all-to-all
  comm share     comm ms / EP ms (the layer overlaps the count exchange with the rows' gather, and the shared
                 expert, if any, with the rows' transfer; the experts' compute is not overlapped)
  replicated ms  SparseMoE with all E experts on the same rank's tokens, no communication (data parallelism with
                 the experts replicated: the alternative when they fit), run in lock step too
  x_replicated   replicated ms / EP ms

On one CPU the ranks share its cores (threads per rank = cores / world), so tokens/s cannot grow past what the
cores give, and Gloo's all-to-all is memory copies through loopback TCP: the figures show the overhead of the
exchange and how it scales with the world, not what a GPU cluster does. On a multi-GPU host:
``torchrun --nproc-per-node N -m netmerge_fast.bench.ep`` (NCCL).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from netmerge_fast.bench.dispatch import Shape

COLUMNS = (
    "case",
    "world",
    "tokens/rank",
    "threads/rank",
    "expert MB/rank",
    "EP ms",
    "tokens/s",
    "tokens/s vs world 1",
    "comm ms",
    "comm share",
    "replicated ms",
    "x_replicated",
)
SHAPE = Shape("qwen3 E128 k8 /4", 128, 8, 2048 // 4, 768 // 4)
WORLDS = (1, 2, 4)
TOKENS = 512
QUICK = {"worlds": (1, 2), "tokens": 64, "shape": Shape("tiny E32 k4", 32, 4, 64, 32), "calls": 2, "repeats": 3}


def _lockstep(fn: Callable[[], Any], device: torch.device, calls: int, repeats: int) -> float:
    """Median seconds per call of ``fn`` over ``repeats`` runs of ``calls`` calls, every rank starting each run
    together, the slowest rank's (a fixed count: every rank must make the same collectives)."""
    fn()
    runs = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        runs.append((time.perf_counter() - start) / calls)
    mine = statistics.median(runs)
    everyone: list[float | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return max(everyone)  # type: ignore[type-var]


def measure(rank: int, world: int, shape: Shape, tokens: int, dtype: str, calls: int, repeats: int) -> dict:
    """One row, on every rank (call it on all ranks of an initialised default group)."""
    from netmerge_fast.distributed import ExpertParallelMoE
    from netmerge_fast.nn import SparseMoE

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    torch.manual_seed(0)
    moe = SparseMoE(shape.hidden, shape.intermediate, shape.num_experts, shape.k)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.02)
    moe = moe.to(device=device, dtype=getattr(torch, dtype))
    layer = ExpertParallelMoE(moe)
    x = torch.randn(tokens, shape.hidden, generator=torch.Generator().manual_seed(1 + rank))
    x = x.to(device=device, dtype=moe.gate.weight.dtype)
    with torch.inference_mode():
        ep_s = _lockstep(lambda: layer(x), device, calls, repeats)
        stats = layer.stats
        comm_s = _lockstep(_communication(stats, shape, x), device, calls, repeats)
        replicated_s = _lockstep(lambda: moe(x), device, calls, repeats)
    expert_bytes = sum(p.numel() * p.element_size() for p in layer.experts.parameters())
    return {
        "case": shape.name,
        "world": world,
        "tokens/rank": tokens,
        "threads/rank": torch.get_num_threads() if device.type == "cpu" else "-",
        "expert MB/rank": expert_bytes / 2**20,
        "EP ms": ep_s * 1e3,
        "tokens/s": world * tokens / ep_s,
        "comm ms": comm_s * 1e3,
        "comm share": comm_s / ep_s,
        "replicated ms": replicated_s * 1e3,
        "x_replicated": replicated_s / ep_s,
    }


def _communication(stats, shape: Shape, x: torch.Tensor) -> Callable[[], None]:
    """The exchanges of one layer call with the split sizes it had: counts (and their host sync), rows, results."""
    counts = torch.zeros(shape.num_experts, dtype=torch.int64, device=x.device)
    counts_in = torch.empty_like(counts)
    rows = x.new_empty(stats.sent, shape.hidden)
    received = x.new_empty(stats.received, shape.hidden)
    sent, got = list(stats.sent_per_rank), list(stats.received_per_rank)

    def exchange() -> None:
        dist.all_to_all_single(counts_in, counts)
        counts_in.tolist()
        dist.all_to_all_single(received, rows, got, sent)
        dist.all_to_all_single(rows, received, sent, got)

    return exchange


def run(
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    worlds: tuple[int, ...] = WORLDS,
    tokens: int = TOKENS,
    shape: Shape = SHAPE,
    calls: int = 5,
    repeats: int = 5,
    compile: bool = True,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per world size, each measured in a fresh group of ``world`` local processes (``compile`` is
    ignored). On CUDA, world sizes above the number of GPUs are skipped."""
    from netmerge_fast.distributed import spawn

    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    rows: list[dict[str, Any]] = []
    for world in worlds:
        if device.type == "cuda" and world > torch.cuda.device_count():
            if progress:
                progress(f"ep: skipping world {world}: {torch.cuda.device_count()} GPU(s)")
            continue
        if progress:
            progress(f"ep: world {world}")
        dtype_name = str(dtype).removeprefix("torch.")
        row = spawn(
            measure,
            world,
            shape,
            tokens,
            dtype_name,
            calls,
            repeats,
            backend=backend,
            threads=max(1, cores // world),
            timeout_s=600,
        )[0]
        rows.append(row)
    base = next((r["tokens/s"] for r in rows if r["world"] == 1), None)
    for row in rows:
        row["tokens/s vs world 1"] = row["tokens/s"] / base if base else float("nan")
    return rows


def main(argv: list[str] | None = None) -> int:
    """Under torchrun: one row for the launched world (NCCL when GPUs are visible, else Gloo), printed by rank 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=TOKENS, help="tokens per rank")
    parser.add_argument("--experts", type=int, default=SHAPE.num_experts)
    parser.add_argument("--top-k", type=int, default=SHAPE.k)
    parser.add_argument("--hidden", type=int, default=SHAPE.hidden)
    parser.add_argument("--intermediate", type=int, default=SHAPE.intermediate)
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    args = parser.parse_args(argv)
    if "RANK" not in os.environ:
        print("run under torchrun: torchrun --nproc-per-node N -m netmerge_fast.bench.ep", file=sys.stderr)
        return 2
    from netmerge_fast.bench import format_table

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        name = f"E{args.experts} k{args.top_k} H{args.hidden} I{args.intermediate}"
        shape = Shape(name, args.experts, args.top_k, args.hidden, args.intermediate)
        row = measure(dist.get_rank(), dist.get_world_size(), shape, args.tokens, args.dtype, 10, 7)
        if dist.get_rank() == 0:
            print(format_table([row], [c for c in COLUMNS if c in row]))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
