"""Packed-expert prefill with fewer or more weight bytes per FLOP: one shape, the same slots spread over more and
more experts, against the dense-matmul limit of `netmerge-fast bench dispatch` (same FLOPs, same process).

    python benchmarks/prefill_spread.py [--shape deepseek-v3] [--tokens 512] [--dtype float32] [--repeats 2]

Each token picks k distinct experts among the first N. With few experts each one's weights serve many rows and the
call is bound by the micro-kernel; with all of them (DeepSeek-V3 /8: 16 rows each, 705 MB of float32 weights read
from memory) by the weight stream.
"""

from __future__ import annotations

import argparse

import torch

import netmerge_fast as nf
from netmerge_fast.bench import time_call
from netmerge_fast.bench.dispatch import DECODE_MAX_TOKENS, SHAPES, limit_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="deepseek-v3", help="prefix of a standard shape's name")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.tokens <= DECODE_MAX_TOKENS:
        parser.error(f"--tokens must be above {DECODE_MAX_TOKENS} (prefill)")
    shape = next(s for s in SHAPES if s.name.startswith(args.shape))
    dtype = getattr(torch, args.dtype)
    E, k, H, inter, T = shape.num_experts, shape.k, shape.hidden, shape.intermediate, args.tokens
    gen = torch.Generator().manual_seed(0)
    w_gate_up = (torch.randn(E, 2 * inter, H, generator=gen) * H**-0.5).to(dtype)
    w_down = (torch.randn(E, H, inter, generator=gen) * inter**-0.5).to(dtype)
    packed = nf.pack_experts(w_gate_up, w_down)
    hidden = torch.randn(T, H, generator=gen).to(dtype)
    weights = torch.softmax(torch.randn(T, k, generator=gen), -1)
    flops = 2 * T * k * 3 * H * inter
    spreads = [n for n in (8, 16, 32, 64, 128, 256) if k <= n <= E] or [E]
    print(f"{shape.name} T={T} {args.dtype}")
    print("| experts | rows per expert | ms | GFLOP/s | of_dense |")
    print("|--:|--:|--:|--:|--:|")
    with torch.no_grad():
        for _ in range(args.repeats):
            dense = limit_seconds(shape, T, [], dtype, "cpu")
            for n in spreads:
                ids = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(T)])
                seconds = time_call(lambda ids=ids: nf.moe_experts(hidden, packed, None, weights, ids))
                rate = flops / seconds / 1e9
                print(f"| {n} | {T * k // n} | {seconds * 1e3:.1f} | {rate:.0f} | {dense / seconds:.2f} |")


if __name__ == "__main__":
    main()
