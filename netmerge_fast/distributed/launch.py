"""``spawn``: run a function on N local processes joined in one torch.distributed group (tests, benchmarks, trying
expert parallelism on one machine). Production jobs launch with ``torchrun`` instead."""

from __future__ import annotations

import datetime
import os
import queue
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from netmerge_fast import _checks

__all__ = ["spawn"]


def _worker(rank, world_size, fn, args, backend, init_method, timeout_s, threads, results) -> None:
    try:
        torch.set_num_threads(threads)
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        report = (rank, True, fn(rank, world_size, *args))
    except BaseException:
        report = (rank, False, traceback.format_exc())
    # Reported before the group closes, so a failing rank's error arrives before its peers' "connection closed".
    results.put(report)
    if dist.is_initialized():
        dist.destroy_process_group()


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout_s: float = 120.0,
    threads: int = 1,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes that form the default process group
    (rendezvous through a file store in a temporary folder: no port to pick) and return their results by rank.

    ``fn`` and ``args`` must be picklable (``fn`` a module-level function). Each process runs with ``threads``
    intra-op threads; with ``backend="nccl"`` rank r uses GPU ``r % device_count``.

    Errors: a rank's exception is raised here as a RuntimeError carrying its traceback (with those of the ranks
    that failed within the next 0.2 s, first come first), and the other ranks are killed (they may be blocked in
    a collective); a run longer than ``timeout_s`` seconds, or a
    process that dies without reporting, terminates all and raises TimeoutError / RuntimeError, so a hang fails
    instead of blocking. Collectives inside time out after ``timeout_s`` too.
    """
    _checks.integer("world_size", world_size, low=1)
    _checks.integer("threads", threads, low=1)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store = tempfile.mkdtemp(prefix="netmerge-spawn-")
    init_method = "file://" + os.path.join(store, "rendezvous")
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, world_size, fn, args, backend, init_method, timeout_s, threads, results),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    deadline = time.monotonic() + timeout_s
    outputs: dict[int, Any] = {}
    failures: list[str] = []
    try:
        for p in procs:
            p.start()
        while len(outputs) + len(failures) < world_size:
            try:
                rank, ok, value = results.get(timeout=0.2)
            except queue.Empty:
                if failures:
                    break
                dead = [i for i, p in enumerate(procs) if i not in outputs and p.exitcode is not None]
                if dead:
                    code = procs[dead[0]].exitcode
                    raise RuntimeError(f"rank(s) {dead} exited (code {code}) without a result") from None
                if time.monotonic() > deadline:
                    missing = sorted(set(range(world_size)) - set(outputs))
                    raise TimeoutError(f"spawn: ranks {missing} did not finish within {timeout_s} s") from None
                continue
            if ok:
                outputs[rank] = value
            else:
                failures.append(f"rank {rank} of {world_size} failed:\n{value}")
        if failures:  # the first is the likeliest cause; peers then fail in their collectives
            raise RuntimeError("\n".join(failures))
        for p in procs:
            p.join(max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(store, ignore_errors=True)
    return [outputs[r] for r in range(world_size)]
