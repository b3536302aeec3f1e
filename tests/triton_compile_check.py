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
