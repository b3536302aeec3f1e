"""The error int8 experts add to a MoE layer's output, on the standard dispatch shapes (README: "int8 experts").

Run: python benchmarks/int8_accuracy.py. Relative error ||out - exact|| / ||exact|| against the float32 reference on
the float32 weights, for int8 with one scale per output channel and per 32 inputs, in float32 and bfloat16
activations, next to the error of plain bfloat16 (no quantisation) for scale. Gaussian weights scaled by
1/sqrt(fan-in), 256 tokens routed by topk_gating over random logits.
"""

import torch

import netmerge_fast as nf
from netmerge_fast import reference
from netmerge_fast.bench.dispatch import SHAPES


def relative_error(out: torch.Tensor, exact: torch.Tensor) -> float:
    return ((out.float() - exact).norm() / exact.norm()).item()


def main() -> None:
    torch.manual_seed(0)
    print("| shape | dtype | int8 per channel | int8 per 32 inputs | unquantised |")
    print("|---|---|---:|---:|---:|")
    for s in SHAPES:
        E, k, H, inter = s.num_experts, s.k, s.hidden, s.intermediate
        x = torch.randn(256, H)
        w_gate_up = torch.randn(E, 2 * inter, H) / H**0.5
        w_down = torch.randn(E, H, inter) / inter**0.5
        weights, ids = nf.topk_gating(torch.randn(256, E), k)
        exact = reference.moe_experts(x, w_gate_up, w_down, weights, ids)
        for dtype in (torch.float32, torch.bfloat16):
            errors = []
            for group_size in (None, 32):
                packed = nf.pack_experts(w_gate_up, w_down, dtype, quantize="int8", group_size=group_size)
                with torch.no_grad():
                    errors.append(relative_error(nf.moe_experts(x.to(dtype), packed, None, weights, ids), exact))
            plain = reference.moe_experts(x.to(dtype), w_gate_up.to(dtype), w_down.to(dtype), weights, ids)
            errors.append(relative_error(plain, exact))
            cells = " | ".join(f"{e:.4f}" for e in errors)
            print(f"| {s.name} | {str(dtype).removeprefix('torch.')} | {cells} |")


if __name__ == "__main__":
    main()
