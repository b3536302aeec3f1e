"""Compile the Triton kernels for NVIDIA targets without a GPU, exactly as their launchers would launch them; run
as a script, without TRITON_INTERPRET.

Each case calls a launcher (the Python body of a ``triton_op``) on meta tensors of a real model's shapes, with
``torch.library.wrap_triton`` replaced by a recorder, so every kernel launch the launcher makes is captured with
its real arguments. Each captured launch is then specialised the way Triton's runtime does it at launch time
(pointer dtypes, int32 or int64 by value, integers equal to 1 folded to constants, 16-divisible integers and
16-aligned pointers marked; meta tensors sit at address 0, and the CUDA caching allocator aligns real ones to
512 bytes) and compiled for each architecture. Launches that specialise identically are compiled once.

Tiles are chosen for a GPU of each architecture (an A100's and an H100's SM counts), so the split-K and
per-slot variants a real call would take are among those compiled; each must fit the architecture's shared
memory.

Prints one JSON object: {"<kernel>/<case>/sm<arch>": "ok" | "<error>"}. Used by test_triton_compile.py.
"""

import importlib
import json
import multiprocessing
import os
import pkgutil
import sys
from contextlib import contextmanager

import torch
import triton
from netmerge_fast.triton_kernels import apply_capacity, moe_align, moe_configs, moe_experts, topk_gating
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.runtime.jit import create_function_from_signature

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@contextmanager
def recording(launches):
    """Replaces torch.library.wrap_triton: kernel[grid](*args, **kwargs) appends (kernel, args, kwargs)."""

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    real = torch.library.wrap_triton
    torch.library.wrap_triton = Recorder
    try:
        yield
    finally:
        torch.library.wrap_triton = real


def meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def topk_cases():
    # (T, E, k, scoring, renormalize, has_bias, num_groups, topk_groups, group_score, softmax_after_topk)
    routings = {
        "mixtral": (4096, 8, 2, "softmax", True, False, 1, 1, "max", False),
        "qwen3_decode": (1, 128, 8, "softmax", True, False, 1, 1, "max", False),
        "deepseek_v2": (300, 160, 6, "softmax", False, False, 8, 3, "max", False),
        "deepseek_v3": (4096, 256, 8, "sigmoid", True, True, 8, 4, "top2_sum", False),
        "gpt_oss": (64, 32, 4, "softmax", True, False, 1, 1, "max", True),
    }
    # Every routing in bfloat16; the other dtypes and a transposed (column-strided) input on Mixtral's.
    variants = [(name, "bf16", "contiguous") for name in routings]
    variants += [
        ("mixtral", "fp32", "contiguous"),
        ("mixtral", "fp16", "contiguous"),
        ("mixtral", "bf16", "transposed"),
    ]
    for name, dtype_name, layout in variants:
        T, E, k, scoring, renorm, has_bias, groups, topk_groups, score, after = routings[name]
        dtype = DTYPES[dtype_name]
        logits = meta(T, E, dtype=dtype) if layout == "contiguous" else meta(E, T, dtype=dtype).t()
        call = (logits, k, scoring, renorm, meta(E) if has_bias else None, groups, topk_groups, score, after, 1.0)
        yield f"topk_gating/{name}/{dtype_name}/{layout}", topk_gating.topk_gating_triton, call


# (T, k, E, H, I, activation, gated, has_bias, apply_weights_on_input): the standard shapes, prefill and decode.
MOE_SHAPES = {
    "mixtral_prefill": (4096, 2, 8, 4096, 14336, "silu", True, False, False),
    "mixtral_batch32": (32, 2, 8, 4096, 14336, "silu", True, False, False),
    "qwen3_prefill": (4096, 8, 128, 2048, 768, "silu", True, False, False),
    "qwen3_decode": (1, 8, 128, 2048, 768, "silu", True, False, False),
    "gpt_oss_native_prefill": (512, 4, 32, 2880, 2880, "swiglu_oai", True, True, False),
    "gpt_oss_native_decode": (4, 4, 32, 2880, 2880, "swiglu_oai", True, True, False),
    "gelu_ungated_on_input_decode": (1, 4, 8, 256, 512, "gelu", False, True, True),
    "relu_ungated_on_input_prefill": (512, 2, 16, 256, 512, "relu", False, False, True),
}
# (shape, dtype, save for the backward, the backward's grouped GEMMs): each kernel in each dtype, each path
# (per slot with split K, small and large row blocks, the layouts, SAVE), within a few minutes of compiling.
# moe_align's kernels come with them: one chunk and many, dense, padded and both, as moe_experts launches them.
MOE_CASES = [
    *(("qwen3_prefill", dtype, False, True) for dtype in DTYPES),
    ("qwen3_prefill", "bf16", True, False),
    *(("qwen3_decode", dtype, False, False) for dtype in DTYPES),
    ("qwen3_decode", "bf16", True, False),
    ("mixtral_batch32", "bf16", False, False),
    ("mixtral_prefill", "bf16", False, False),
    ("gpt_oss_native_prefill", "bf16", True, False),
    ("gpt_oss_native_decode", "bf16", False, False),
    ("gelu_ungated_on_input_decode", "bf16", False, False),
    ("relu_ungated_on_input_prefill", "bf16", True, False),
]


def moe_cases():
    for name, dtype_name, save, backward in MOE_CASES:
        T, k, E, H, inter, activation, gated, has_bias, on_input = MOE_SHAPES[name]
        dtype = DTYPES[dtype_name]
        width = 2 * inter if gated else inter
        native = "native" in name  # GPT-OSS's own layout: [E, H, 2I] and [E, I, H] read transposed, interleaved
        if native:
            w_gate_up = meta(E, H, width, dtype=dtype).transpose(1, 2)
            w_down = meta(E, inter, H, dtype=dtype).transpose(1, 2)
        else:
            w_gate_up, w_down = meta(E, width, H, dtype=dtype), meta(E, H, inter, dtype=dtype)
        b_gate_up, b_down = (meta(E, width, dtype=dtype), meta(E, H, dtype=dtype)) if has_bias else (None, None)
        call = (meta(T, H, dtype=dtype), w_gate_up, w_down, meta(T, k), meta(T, k, dtype=torch.int32), activation,
                gated, b_gate_up, b_down, on_input, save, native)  # fmt: skip
        yield f"moe_experts/{name}/{dtype_name}/save={save}", moe_experts.moe_experts_triton, call
        if not backward:
            continue
        S = T * k
        offsets = meta(E + 1, dtype=torch.int32)
        grouped = (
            ("down_grad", (meta(S, H, dtype=dtype), w_down, offsets)),
            ("up_grad", (meta(S, width, dtype=dtype), w_gate_up, offsets)),
        )
        for what, call in grouped:
            yield f"grouped_mm/{name}/{what}/{dtype_name}", moe_experts.grouped_mm_triton, call
        weight_grads = (
            ("w_down", (meta(S, H, dtype=dtype), meta(S, inter, dtype=dtype), offsets)),
            ("w_gate_up", (meta(S, width, dtype=dtype), meta(S, H, dtype=dtype), offsets)),
            ("bias", (meta(S, 1, dtype=dtype), meta(S, H, dtype=dtype), offsets)),
        )
        for what, call in weight_grads:
            yield f"weight_grad/{name}/{what}/{dtype_name}", moe_experts.grouped_mm_weight_grad_triton, call
    # The public moe_align on int64 ids (routers' default; moe_experts' cases above pass int32).
    yield "moe_align/int64/block=64", moe_align.moe_align_triton, (meta(4096, 8, dtype=torch.int64), 128, 64)


def capacity_cases():
    # Mixtral's prefill routing: int32 and int64 ids (routers' default), token order per sequence, score order.
    for ids_name, ids_dtype in (("i32", torch.int32), ("i64", torch.int64)):
        ids, priority = meta(4096, 2, dtype=ids_dtype), meta(4096, 2, dtype=torch.bfloat16)
        for order, group_size in (("token", 512), ("score", 4096)):
            call = (ids, priority if order == "score" else None, 8, 1280, order, group_size)
            yield f"apply_capacity/{order}/{ids_name}", apply_capacity.apply_capacity_triton, call


def cases():
    yield from topk_cases()
    yield from moe_cases()
    yield from capacity_cases()


# Per architecture: a GPU of it (compute capability, SM count) for the launchers' tile choices, and the shared
# memory one block may use.
GPUS = {80: ((8, 0), 108), 90: ((9, 0), 132)}
SHARED_MEMORY = {80: 166912, 90: 232448}


def launches_of(op, call, arch):
    launches = []
    real = moe_configs.device_properties
    moe_configs.device_properties = lambda device: GPUS[arch]
    try:
        with recording(launches), torch.no_grad():
            op._init_fn(*call)
    finally:
        moe_configs.device_properties = real
    return launches


def specialise(kernel, args, kwargs, target):
    """(signature, constexprs, attrs, options) as JITFunction.run would derive them for this launch."""
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options


_JOBS = []  # (label, kernel, arch, signature, constexprs, attrs, options): read by the forked workers


def compile_job(index: int) -> tuple[str, str]:
    label, kernel, arch, signature, constexprs, attrs, options = _JOBS[index]
    try:
        target = GPUTarget("cuda", arch, 32)
        binary = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options)
    except Exception as exc:  # reported per case by the test
        return label, f"{type(exc).__name__}: {exc}"
    if not binary.asm.get("cubin"):
        return label, "no cubin"
    if binary.metadata.shared > SHARED_MEMORY[arch]:
        return label, f"needs {binary.metadata.shared} bytes of shared memory, sm{arch} has {SHARED_MEMORY[arch]}"
    return label, "ok"


def main(archs):
    results, seen = {}, set()
    for name, op, call in cases():
        for arch in archs:
            try:
                launches = launches_of(op, call, arch)
            except Exception as exc:  # reported per case by the test
                results[f"{name}/launcher/sm{arch}"] = f"{type(exc).__name__}: {exc}"
                continue
            for kernel, args, kwargs in launches:
                label = f"{kernel.fn.__name__}/{name}/sm{arch}"
                try:
                    signature, constexprs, attrs, options = specialise(
                        kernel, args, kwargs, GPUTarget("cuda", arch, 32)
                    )
                except Exception as exc:  # reported per case by the test
                    results[label] = f"{type(exc).__name__}: {exc}"
                    continue
                key = (id(kernel), arch, repr(signature), repr(constexprs), repr(attrs), repr(options))
                if key not in seen:
                    seen.add(key)
                    _JOBS.append((label, kernel, arch, signature, constexprs, attrs, options.__dict__))
    # A kernel no case launches would go unchecked: every ``*_kernel`` of the Triton modules must be compiled.
    launched = {label.split("/", 1)[0] for label, *_ in _JOBS}
    package = importlib.import_module("netmerge_fast.triton_kernels")
    for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if name.endswith("_kernel") and isinstance(value, triton.JITFunction) and name not in launched:
                results[f"{name}/{module.__name__}"] = "no case launches this kernel"
    # Compiling is the slow part (seconds per GEMM kernel): one forked worker per CPU this process may use.
    workers = min(len(os.sched_getaffinity(0)), 4)
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        results.update(pool.map(compile_job, range(len(_JOBS)), chunksize=1))
    print(json.dumps(results))


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [80, 90])
