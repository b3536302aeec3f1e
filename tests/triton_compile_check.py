"""Compile Triton kernels for NVIDIA targets without a GPU; run as a script, without TRITON_INTERPRET.

Prints one JSON object: {"<kernel>/<case>/sm<arch>": "ok" | "<error>"}. Used by test_triton_compile.py.
"""

import importlib
import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_for(kernel, signature, constexprs, num_warps, arch):
    signature = dict(signature, **dict.fromkeys(constexprs, "constexpr"))
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


TOPK_SIGNATURE = {
    "x_ptr": "*fp32",
    "bias_ptr": "*fp32",
    "w_ptr": "*fp32",
    "ids_ptr": "*i32",
    "T": "i32",
    "E": "i32",
    "stride_t": "i64",
    "stride_e": "i64",
    "scale": "fp32",
}

# (T, E, k, scoring, renormalize, has_bias, num_groups, topk_groups, group_score, softmax_after_topk)
TOPK_CASES = {
    "mixtral": (4096, 8, 2, "softmax", True, False, 1, 1, "max", False),
    "qwen3_decode": (1, 128, 8, "softmax", True, False, 1, 1, "max", False),
    "deepseek_v2": (300, 160, 6, "softmax", False, False, 8, 3, "max", False),
    "deepseek_v3_bf16": (4096, 256, 8, "sigmoid", True, True, 8, 4, "top2_sum", False),
    "gpt_oss": (64, 32, 4, "softmax", True, False, 1, 1, "max", True),
}


def cases():
    topk = importlib.import_module("netmerge_fast.triton_kernels.topk_gating")
    for name, args in TOPK_CASES.items():
        constexprs, num_warps = topk.launch_config(*args)
        signature = dict(TOPK_SIGNATURE, x_ptr="*bf16") if name.endswith("bf16") else TOPK_SIGNATURE
        yield f"topk_gating/{name}", topk._topk_gating_kernel, signature, constexprs, num_warps
    yield from moe_cases()
    yield from capacity_cases()


def _pointers(dtype, *names):
    return {name: dtype for name in names}


ALIGN_SIGNATURE = {
    **_pointers("*i32", "ids_ptr", "counts_ptr", "sorted_ptr", "offsets_ptr", "padded_ptr", "block_expert_ptr"),
    "padded_length_ptr": "*i32",
    "slots": "i32",
    "E": "i32",
    "block_size": "i32",
}
_ROUTING = {"topk_w_ptr": "*fp32", "ids_ptr": "*i32", "work_slot_ptr": "*i32", "block_expert_ptr": "*i32"}
_SIZES = {"slots": "i32", "E": "i32", "H": "i32", "inter": "i32"}
UP_SIGNATURE = {
    **_pointers("*bf16", "hidden_ptr", "w_ptr", "bias_ptr", "act_ptr", "gate_up_ptr"),
    **_ROUTING,
    "dense_row_ptr": "*i32",
    **_SIZES,
    "top_k": "i32",
    **_pointers("i64", "stride_ht", "stride_hh", "stride_we", "stride_wn", "stride_wh"),
}
DOWN_SIGNATURE = {
    **_pointers("*bf16", "act_ptr", "w_ptr", "bias_ptr"),
    **_ROUTING,
    "y_ptr": "*fp32",
    **_SIZES,
    **_pointers("i64", "stride_we", "stride_wn", "stride_wi"),
}
COMBINE_SIGNATURE = {"y_ptr": "*fp32", "ids_ptr": "*i32", "out_ptr": "*bf16", "top_k": "i32", "E": "i32", "H": "i32"}
GROUPED_MM_SIGNATURE = {
    **_pointers("*bf16", "x_ptr", "w_ptr", "out_ptr"),
    **_pointers("*i32", "offsets_ptr", "tile_expert_ptr", "tile_row_ptr"),
    "K": "i32",
    "N": "i32",
    **_pointers("i64", "stride_we", "stride_wk", "stride_wn"),
}
WEIGHT_GRAD_SIGNATURE = {
    **_pointers("*bf16", "a_ptr", "b_ptr", "out_ptr"),
    "offsets_ptr": "*i32",
    "M": "i32",
    "N": "i32",
}

# (slots, E, H, I, activation, gated, has_bias, apply_weights_on_input): the standard shapes, prefill and decode.
MOE_CASES = {
    "mixtral_prefill": (4096 * 2, 8, 4096, 14336, "silu", True, False, False),
    "qwen3_prefill": (4096 * 8, 128, 2048, 768, "silu", True, False, False),
    "qwen3_decode": (8, 128, 2048, 768, "silu", True, False, False),
    "gpt_oss_prefill": (512 * 4, 32, 2880, 2880, "swiglu_oai", True, True, False),
    "gelu_ungated_on_input_decode": (4, 8, 256, 512, "gelu", False, True, True),
    "gelu_tanh_prefill": (1024, 16, 256, 512, "gelu_tanh", True, False, False),
    "relu_ungated_prefill": (1024, 16, 256, 512, "relu", False, False, True),
}


def moe_cases():
    align = importlib.import_module("netmerge_fast.triton_kernels.moe_align")
    moe = importlib.import_module("netmerge_fast.triton_kernels.moe_experts")
    count_signature = {"ids_ptr": "*i32", "counts_ptr": "*i32", "slots": "i32", "E": "i32"}
    yield "moe_align/count", align._count_kernel, count_signature, {"BLOCK": align._BLOCK}, 4
    for padded in (False, True):
        constexprs = {"BLOCK": align._BLOCK, "E_PAD": 256, "PADDED": padded}
        yield f"moe_align/place_padded={padded}", align._place_kernel, ALIGN_SIGNATURE, constexprs, 4
    for name, (slots, E, H, inter, activation, gated, has_bias, on_input) in MOE_CASES.items():
        config = moe.launch_config(slots, E, H, inter)
        tiles = {key: config[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "PER_SLOT")}
        flags = {"HAS_BIAS": has_bias, "ON_INPUT": on_input}
        up = {**tiles, **flags, "GATED": gated, "ACT": moe.ACTIVATION_CODES[activation], "SAVE": True}
        up["INTERLEAVED"] = activation == "swiglu_oai"  # GPT-OSS's own layout
        yield f"moe_experts/up/{name}", moe._up_kernel, UP_SIGNATURE, up, config["num_warps"]
        yield f"moe_experts/down/{name}", moe._down_kernel, DOWN_SIGNATURE, {**tiles, **flags}, config["num_warps"]
    yield "moe_experts/combine", moe._combine_kernel, COMBINE_SIGNATURE, {"BLOCK_H": 1024}, 4
    yield "moe_experts/grouped_mm", moe._grouped_mm_kernel, GROUPED_MM_SIGNATURE, moe._GROUPED_TILE, 4
    tile = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_R": 32}
    yield "moe_experts/weight_grad", moe._weight_grad_kernel, WEIGHT_GRAD_SIGNATURE, tile, 4


def capacity_cases():
    capacity = importlib.import_module("netmerge_fast.triton_kernels.apply_capacity")
    for ids in ("*i32", "*i64"):
        token = {"ids_ptr": ids, "out_ptr": ids, "counts_ptr": "*i32", **_pointers("i32", "slots", "group_slots", "E")}
        token["capacity"] = "i32"
        yield f"apply_capacity/token/{ids}", capacity._token_order_kernel, token, {"BLOCK": capacity._BLOCK}, 4
        score = {
            **_pointers("*i32", "sorted_ptr", "offsets_ptr", "counts_ptr"),
            "priority_ptr": "*fp32",
            "keys_ptr": "*i64",
            "out_ptr": ids,
            "capacity": "i32",
        }
        yield f"apply_capacity/score/{ids}", capacity._score_order_kernel, score, {"BLOCK": capacity._BLOCK}, 4


def main(archs):
    results = {}
    for name, kernel, signature, constexprs, num_warps in cases():
        for arch in archs:
            try:
                compiled = compile_for(kernel, signature, constexprs, num_warps, arch)
                results[f"{name}/sm{arch}"] = "ok" if compiled.asm.get("cubin") else "no cubin"
            except Exception as exc:  # reported per case by the test
                results[f"{name}/sm{arch}"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(results))


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [80, 90])
