"""moe_experts against the expert implementations users run today, on identical weights, in one process.

Ours is moe_experts on the weights packed once by pack_experts (as SparseMoE and integrations.hf run CPU
inference; on GPU the weight tensors themselves). Baselines:
  unpacked          moe_experts on the weight tensors as they are (CPU: it repacks what it reads, every call)
  reference         netmerge_fast.reference.moe_experts (the plain loop over experts, computed in float32)
  hf_eager          Hugging Face transformers 5's experts module, its `eager` implementation (loop over hit
                    experts, index_add_) -- when transformers is installed
  hf_grouped_mm     the same module with its `grouped_mm` implementation (sort, gather, torch grouped GEMM)
  torch_grouped_mm  the shortest pipeline around torch._grouped_mm (sort, gather, two grouped GEMMs, unsort,
                    sum) -- where torch has it
The limit, measured here too:
  prefill (T > 8)   the expert GEMM FLOPs at the rate of one dense matmul of the same FLOPs, [T*k, H] @ [H, 3I],
                    in the run's dtype or in float32, whichever the machine does faster (CPUs without native
                    bfloat16 run torch's bfloat16 matmul far below their float32 rate); of_peak: the same FLOPs at
                    the register-only float32 FMA rate of every thread (netmerge_fast._C.fma_peak), the
                    arithmetic ceiling when the library's matmul is below it
  decode (T <= 8)   the bytes of the expert weights a call touches, at the read rate of `sum` over 512 MB
Decode cases rotate through routings that touch different experts, so that together they cover every expert
and each call reads its weights from memory, not from the last-level cache (every implementation gets the same
rotation). of_limit = limit time / our time; x_best_hf = the faster HF implementation's time / ours; x_int8 = our
time / ours on int8 experts (pack_experts(..., quantize="int8"), CPU).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import netmerge_fast as nf
from netmerge_fast import reference
from netmerge_fast.bench import read_rate, time_call

DECODE_MAX_TOKENS = 8


@dataclass(frozen=True)
class Shape:
    name: str
    num_experts: int
    k: int
    hidden: int
    intermediate: int


# The standard shapes (DESIGN.md) with H and I scaled down for a 2-core CPU; E and k as in the models.
SHAPES = (
    Shape("mixtral E8 k2 /8", 8, 2, 4096 // 8, 14336 // 8),
    Shape("qwen3 E128 k8 /4", 128, 8, 2048 // 4, 768 // 4),
    Shape("deepseek-v3 E256 k8 /8", 256, 8, 7168 // 8, 2048 // 8),
)
TOKENS = (1, 8, 512, 2048)
QUICK = {"tokens": (1, 64), "shapes": (Shape("tiny E8 k2", 8, 2, 64, 96), Shape("tiny E32 k4", 32, 4, 64, 32))}
# `netmerge-fast bench` without --full: decode and prefill, one few-expert and one many-expert shape.
DEFAULT = {"tokens": (1, 512), "shapes": (SHAPES[0], SHAPES[1])}


def cases(*, shapes: tuple[Shape, ...] = SHAPES, tokens: tuple[int, ...] = TOKENS, **_: Any) -> int:
    """How many rows ``run`` makes with these arguments (for the progress bar)."""
    return len(shapes) * len(tokens)


def hf_experts(shape: Shape, w_gate_up: torch.Tensor, w_down: torch.Tensor):
    """transformers 5's experts module (the class every HF MoE model's routed experts share) on our weights, or
    None without transformers."""
    try:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts
    except ImportError:
        return None
    config = Qwen3MoeConfig(
        hidden_size=shape.hidden,
        moe_intermediate_size=shape.intermediate,
        num_experts=shape.num_experts,
        num_experts_per_tok=shape.k,
    )
    config._experts_implementation = "eager"
    with torch.device("meta"):
        experts = Qwen3MoeExperts(config)
    experts.gate_up_proj = torch.nn.Parameter(w_gate_up, requires_grad=False)
    experts.down_proj = torch.nn.Parameter(w_down, requires_grad=False)
    return experts


def hf_call(experts, implementation: str) -> Callable:
    def call(hidden, weights, ids):
        experts.config._experts_implementation = implementation
        # HF routers hand the experts int64 ids and weights in the hidden dtype.
        return experts(hidden, ids.long(), weights.to(hidden.dtype))

    return call


def torch_grouped_mm_pipeline(w_gate_up: torch.Tensor, w_down: torch.Tensor) -> Callable:
    """The minimal grouped-GEMM MoE in plain torch: what any torch._grouped_mm user would write."""
    E = w_gate_up.shape[0]
    inter = w_down.shape[2]
    up_t, down_t = w_gate_up.transpose(1, 2), w_down.transpose(1, 2)

    def call(hidden, weights, ids):
        T, k = ids.shape
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        ends = torch.cumsum(torch.bincount(flat, minlength=E), 0).to(torch.int32)
        rows = hidden[order // k]
        gate_up = torch._grouped_mm(rows, up_t, offs=ends)
        act = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        y = torch._grouped_mm(act, down_t, offs=ends) * weights.reshape(-1)[order, None].to(hidden.dtype)
        out = torch.empty_like(y).index_copy_(0, order, y)
        return out.view(T, k, -1).sum(1)

    return call


def rotating_routings(shape: Shape, T: int, count: int, generator: torch.Generator) -> list[torch.Tensor]:
    """`count` routings of T tokens; consecutive ones touch disjoint experts as far as E allows."""
    E, k = shape.num_experts, shape.k
    experts = torch.randperm(E, generator=generator)
    routings, at = [], 0
    for _ in range(count):
        picks = []
        for _ in range(T):
            if at + k > E:
                experts, at = torch.randperm(E, generator=generator), 0
            picks.append(experts[at : at + k])
            at += k
        routings.append(torch.stack(picks).to(torch.int32))
    return routings


def cycle_calls(fn: Callable, inputs: list[tuple]) -> Callable[[], Any]:
    rotation = itertools.cycle(inputs)
    return lambda: fn(*next(rotation))


def limit_seconds(shape: Shape, T: int, routings: list[torch.Tensor], dtype: torch.dtype, device: str) -> float:
    """The time the machine needs at least: the faster dense-matmul rate (dtype or float32) for prefill, memory
    read rate for decode."""
    H, inter = shape.hidden, shape.intermediate
    if T <= DECODE_MAX_TOKENS:
        element = torch.empty(0, dtype=dtype).element_size()
        touched = sum(torch.unique(r).numel() for r in routings) / len(routings)
        return touched * 3 * H * inter * element / read_rate(device)
    a = torch.randn(T * shape.k, H, device=device)
    b = torch.randn(H, 3 * inter, device=device)
    seconds = time_call(lambda: torch.mm(a, b), device)
    if dtype != torch.float32:
        a, b = a.to(dtype), b.to(dtype)
        seconds = min(seconds, time_call(lambda: torch.mm(a, b), device))
    return seconds


_peaks: dict[int, float] = {}


def fma_peak() -> float:
    """FLOP/s of register-only float32 FMA chains on every thread, measured once per thread count (nan without
    the C++ extension)."""
    threads = torch.get_num_threads()
    if threads not in _peaks:
        from netmerge_fast._backends import native_status

        if not native_status().available:
            return float("nan")
        from netmerge_fast import _C

        _peaks[threads] = _C.fma_peak(0.3)
    return _peaks[threads]


def run(
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    tokens: tuple[int, ...] = TOKENS,
    shapes: tuple[Shape, ...] = SHAPES,
    compile: bool = True,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per (shape, T): microseconds per call of ours and of each baseline, ratios, efficiency."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for shape in shapes:
        E, H, inter = shape.num_experts, shape.hidden, shape.intermediate
        w_gate_up = (torch.randn(E, 2 * inter, H, generator=generator) * H**-0.5).to(dtype).to(device)
        w_down = (torch.randn(E, H, inter, generator=generator) * inter**-0.5).to(dtype).to(device)
        packed = nf.pack_experts(w_gate_up, w_down) if device == "cpu" else None
        int8 = nf.pack_experts(w_gate_up, w_down, quantize="int8") if device == "cpu" else None
        baselines: dict[str, Callable] = {
            "unpacked": lambda h, w, i, up=w_gate_up, down=w_down: nf.moe_experts(h, up, down, w, i),
            "reference": lambda h, w, i, up=w_gate_up, down=w_down: reference.moe_experts(h, up, down, w, i),
        }
        if packed is None:
            del baselines["unpacked"]
        hf = hf_experts(shape, w_gate_up, w_down)
        if hf is not None:
            baselines["hf_eager"] = hf_call(hf, "eager")
            baselines["hf_grouped_mm"] = hf_call(hf, "grouped_mm")
        if hasattr(torch, "_grouped_mm"):
            baselines["torch_grouped_mm"] = torch_grouped_mm_pipeline(w_gate_up, w_down)
        for T in tokens:
            if progress:
                progress(f"dispatch {shape.name} T={T} {dtype}")
            decode = T <= DECODE_MAX_TOKENS
            count = max(1, -(-2 * E // (T * shape.k))) if decode else 1
            routings = rotating_routings(shape, T, count, generator)
            inputs = [
                (
                    torch.randn(T, H, generator=generator).to(dtype).to(device),
                    torch.softmax(torch.randn(T, shape.k, generator=generator), -1).to(device),
                    ids.to(device),
                )
                for ids in routings
            ]
            with torch.no_grad():
                weights = (packed, None) if packed is not None else (w_gate_up, w_down)
                experts = lambda h, w, i, weights=weights: nf.moe_experts(h, *weights, w, i)
                ours = time_call(cycle_calls(experts, inputs), device)
                row: dict[str, Any] = {"shape": shape.name, "T": T, "dtype": str(dtype).removeprefix("torch.")}
                row["ours_us"] = ours * 1e6
                if int8 is not None:
                    quantized = time_call(cycle_calls(lambda h, w, i, q=int8: nf.moe_experts(h, q, None, w, i), inputs))
                    row["int8_us"] = quantized * 1e6
                    row["x_int8"] = ours / quantized
                for name, fn in baselines.items():
                    seconds = time_call(cycle_calls(fn, inputs), device)
                    row[f"{name}_us"] = seconds * 1e6
                    row[f"x_{name}"] = seconds / ours
            hf_times = [row[f"{n}_us"] for n in ("hf_eager", "hf_grouped_mm") if f"{n}_us" in row]
            if hf_times:
                row["x_best_hf"] = min(hf_times) / row["ours_us"]
            row["limit"] = "bandwidth" if decode else "dense mm"
            row["of_limit"] = limit_seconds(shape, T, routings, dtype, device) / ours
            if not decode and device == "cpu":
                row["of_peak"] = 2 * T * shape.k * 3 * H * inter / fma_peak() / ours
            rows.append(row)
    return rows


# Printed columns; --json also has every baseline's absolute time (<name>_us).
COLUMNS = (
    "shape",
    "T",
    "dtype",
    "ours_us",
    "x_unpacked",
    "x_reference",
    "x_hf_eager",
    "x_hf_grouped_mm",
    "x_torch_grouped_mm",
    "x_best_hf",
    "x_int8",
    "limit",
    "of_limit",
    "of_peak",
)
