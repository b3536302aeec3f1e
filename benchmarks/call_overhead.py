"""Per-call cost of a decode step on CPU: the direct entries of netmerge_fast._C against torch.ops, in one process,
and the packed experts op's fixed cost against its per-expert work.

    python benchmarks/call_overhead.py [--repeats 5]

First table: alternates the two paths (the direct entries switched off by emptying netmerge_fast._backends' table
of them, which makes every wrapper call torch.ops) over calls whose work is small next to their overhead:
topk_gating at T = 1 on the standard routing shapes (with the HF-style eager router as the baseline), moe_experts
on packed experts with every slot routed nowhere, and a tiny SparseMoE layer (H = 64, E = 32, k = 4) at T = 1.
Medians of the repeats (microseconds per call, netmerge_fast.bench.time_call) and their ratios.

Second table: the packed op alone on one thread, T = 1, eight experts of the Qwen3 /4 shape in the cache, with 0,
1 and 8 of the 8 slots routed to an expert: the fixed cost of a call (0), what routing anything adds (1), and the
per-expert rate ((8 - 1) experts' bytes over the time difference), per weight format.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import netmerge_fast as nf
import netmerge_fast._backends as backends
from netmerge_fast.bench import format_table, time_call, topk
from netmerge_fast.nn import SparseMoE


def cases() -> dict:
    """name -> (call, baseline call or None)."""
    torch.manual_seed(0)
    out = {}
    for shape in topk.SHAPES:
        bias = torch.randn(shape.num_experts) * 0.1 if shape.bias else None
        options = dict(shape.options, bias=bias)
        x = torch.randn(1, shape.num_experts)
        hf = topk.hf_eager(shape)
        out[f"topk_gating {shape.name} T=1"] = (
            lambda x=x, o=options, k=shape.k: nf.topk_gating(x, k, **o),
            lambda x=x, b=bias, hf=hf: hf(x, b),
        )
    E, H, inter = 128, 512, 192
    for dtype in (torch.float32, torch.bfloat16):
        packed = nf.pack_experts(torch.randn(E, 2 * inter, H).to(dtype), torch.randn(E, H, inter).to(dtype))
        hidden, weights = torch.randn(1, H, dtype=dtype), torch.rand(1, 8)
        nowhere = torch.full((1, 8), -1, dtype=torch.int32)
        name = f"moe_experts packed {str(dtype).removeprefix('torch.')}, routed nowhere"
        out[name] = (lambda h=hidden, p=packed, w=weights, i=nowhere: nf.moe_experts(h, p, None, w, i), None)
    layer = SparseMoE(64, 32, 32, 4).eval()
    tokens = [torch.randn(1, 64) for _ in range(16)]
    count = [0]

    def tiny_layer():
        count[0] += 1
        return layer(tokens[count[0] % len(tokens)])

    out["SparseMoE tiny (H64 E32 k4) T=1"] = (tiny_layer, None)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not backends.native_status().available:
        raise SystemExit("netmerge_fast._C is not built: nothing to compare")
    direct = backends._direct_entries
    off = {op: None for op in direct()}
    runs = {name: {"direct": [], "torch_ops": [], "baseline": []} for name in cases()}
    with torch.no_grad():
        calls = cases()
        for _ in range(args.repeats):
            for path in ("direct", "torch_ops"):
                backends._direct_entries = direct if path == "direct" else lambda: off
                for name, (call, baseline) in calls.items():
                    runs[name][path].append(time_call(call) * 1e6)
                    if baseline is not None and path == "direct":
                        runs[name]["baseline"].append(time_call(baseline) * 1e6)
        backends._direct_entries = direct
    rows = []
    for name, r in runs.items():
        ours, ops = statistics.median(r["direct"]), statistics.median(r["torch_ops"])
        row = {"call": name, "direct_us": ours, "torch_ops_us": ops, "x_torch_ops": ops / ours}
        if r["baseline"]:
            base = statistics.median(r["baseline"])
            row |= {"x_hf_eager": base / ours, "x_hf_eager_via_torch_ops": base / ops}
        rows.append(row)
    columns = ("call", "direct_us", "torch_ops_us", "x_torch_ops", "x_hf_eager", "x_hf_eager_via_torch_ops")
    print(format_table(rows, columns))
    print()
    print(format_table(packed_fixed_cost(args.repeats)))


def packed_fixed_cost(repeats: int) -> list[dict]:
    """The second table (see the module docstring)."""
    torch.manual_seed(0)
    E, H, inter, k = 8, 512, 192, 8
    w_gate_up, w_down = torch.randn(E, 2 * inter, H) * 0.05, torch.randn(E, H, inter) * 0.05
    formats = {
        "float32": (nf.pack_experts(w_gate_up, w_down), torch.float32),
        "bfloat16": (nf.pack_experts(w_gate_up.bfloat16(), w_down.bfloat16()), torch.bfloat16),
        "int8": (nf.pack_experts(w_gate_up, w_down, quantize="int8"), torch.float32),
    }
    routings = {n: torch.tensor([list(range(n)) + [-1] * (k - n)], dtype=torch.int32) for n in (0, 1, 8)}
    weights = torch.full((1, k), 1.0 / k)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    with torch.no_grad():
        for name, (packed, dtype) in formats.items():
            hidden = torch.randn(1, H, dtype=dtype)
            us = {}
            for n, ids in routings.items():
                call = lambda h=hidden, p=packed, ids=ids: nf.moe_experts(h, p, None, weights, ids)
                us[n] = statistics.median(time_call(call) for _ in range(repeats)) * 1e6
            per_expert = (us[8] - us[1]) / 7
            rows.append({
                "weights": name, "routed_0_us": us[0], "routed_1_us": us[1], "routed_8_us": us[8],
                "per_expert_us": per_expert, "per_expert_GB/s": packed.nbytes / E / per_expert / 1e3,
            })  # fmt: skip
    torch.set_num_threads(threads)
    return rows


if __name__ == "__main__":
    main()
