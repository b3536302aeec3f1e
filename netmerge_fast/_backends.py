"""Which backends exist on this machine, and which one serves a call.

One table (``_OPS``) says, per op, which backends implement it and in what order ``"auto"`` prefers
them. ``resolve`` applies it; nothing else in the package decides backends.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from functools import cache

import torch

__all__ = ["BackendStatus", "backends", "cpu_isa", "cpu_isas", "native_status", "resolve", "set_cpu_isa"]

FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class BackendStatus:
    available: bool
    reason: str

    def __str__(self) -> str:
        return f"{'yes' if self.available else 'no '}  {self.reason}"


@dataclass(frozen=True)
class _Impl:
    backend: str
    dtypes: tuple[torch.dtype, ...] | None = FUSED_DTYPES  # None: any floating dtype


# Per op, in the order "auto" prefers them. The torch backend (reference.py) is always last and always there.
_OPS: dict[str, tuple[_Impl, ...]] = {
    "topk_gating": (_Impl("triton"), _Impl("cpu"), _Impl("torch", None)),
    "moe_align": (_Impl("triton"), _Impl("cpu"), _Impl("torch", None)),
    # Keyed by the weights' dtype, which the kernels never read.
    "apply_capacity": (_Impl("triton", None), _Impl("cpu", None), _Impl("torch", None)),
    # float64 on cpu: gradcheck of the fused path.
    "moe_experts": (_Impl("triton"), _Impl("cpu", (*FUSED_DTYPES, torch.float64)), _Impl("torch", None)),
    # Weights packed by pack_experts; the torch backend unpacks them (the oracle, and any device).
    "moe_experts_packed": (_Impl("cpu"), _Impl("torch", None)),
    "grouped_linear": (_Impl("triton"), _Impl("cpu", (*FUSED_DTYPES, torch.float64)), _Impl("torch", None)),
    "logit_statistics": (_Impl("cuda"), _Impl("cpu"), _Impl("torch", None)),
    "combine_logits": (_Impl("cuda"), _Impl("cpu"), _Impl("torch", None)),
}


@cache
def native_status() -> BackendStatus:
    """Whether netmerge_fast._C loaded (cheap: does not probe Triton or CUDA)."""
    try:
        importlib.import_module("netmerge_fast._C")
    except ImportError as exc:
        return BackendStatus(
            False,
            f"netmerge_fast._C is not built ({exc}); reinstall with `pip install --no-build-isolation .` to build it",
        )
    return BackendStatus(True, "C++ extension netmerge_fast._C")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@cache
def _triton() -> BackendStatus:
    try:
        import triton
    except ImportError:
        return BackendStatus(False, "triton is not installed (pip install 'netmerge-fast[triton]')")
    if torch.cuda.is_available():
        return BackendStatus(True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}")
    if _interpreting():
        return BackendStatus(True, f"triton {triton.__version__} under TRITON_INTERPRET=1 (CPU tensors, slow)")
    return BackendStatus(
        False,
        f"triton {triton.__version__} is installed but there is no GPU "
        "(set TRITON_INTERPRET=1 to run its kernels on CPU tensors)",
    )


@cache
def _cuda() -> BackendStatus:
    native = native_status()
    if not native.available:
        return native
    if not torch.cuda.is_available():
        return BackendStatus(False, "no CUDA device")
    if not getattr(importlib.import_module("netmerge_fast._C"), "cuda_built", False):
        return BackendStatus(False, "netmerge_fast._C was built without CUDA (torch without CUDA, or no nvcc)")
    return BackendStatus(True, f"CUDA kernels in netmerge_fast._C on {torch.cuda.get_device_name()}")


# The CPU kernels' instruction sets, lowest first: each one's build is compiled into netmerge_fast._C and the best
# one this CPU supports is chosen at load (NETMERGE_CPU_ISA=<name> caps it).
CPU_ISAS = ("baseline", "avx2", "avx512", "avx512_bf16")


_active_isa: str | None = None  # cpu_isa(), kept until set_cpu_isa changes it (read on every packed call)


def cpu_isa() -> str:
    """The instruction set the CPU kernels run with now (one of ``CPU_ISAS``; "" without the extension)."""
    global _active_isa
    if _active_isa is None:
        _active_isa = importlib.import_module("netmerge_fast._C").cpu_isa() if native_status().available else ""
    return _active_isa


def cpu_isas() -> list[str]:
    """The instruction sets this machine can run the CPU kernels with, lowest first."""
    if not native_status().available:
        return []
    best = importlib.import_module("netmerge_fast._C").detected_cpu_isa()
    return list(CPU_ISAS[: CPU_ISAS.index(best) + 1])


def set_cpu_isa(name: str) -> None:
    """Run the CPU kernels with instruction set ``name`` ("auto" or one of ``cpu_isas()``) from now on: for tests
    and diagnostics (the baseline build is what runs on a CPU without AVX2)."""
    if name != "auto" and name not in cpu_isas():
        raise ValueError(f"name must be 'auto' or one of {cpu_isas()} on this machine, got {name!r}")
    global _active_isa
    importlib.import_module("netmerge_fast._C").set_cpu_isa(name)
    _active_isa = None


def backends() -> dict[str, BackendStatus]:
    """What each backend needs and whether this machine has it, e.g. ``backends()["cpu"].available``."""
    native = native_status()
    cpu = BackendStatus(True, f"{native.reason} (CPU kernels: {cpu_isa()})") if native.available else native
    return {
        "triton": _triton(),
        "cuda": _cuda(),
        "cpu": cpu,
        "torch": BackendStatus(True, "plain PyTorch (netmerge_fast.reference), always available"),
    }


def _runs_on(backend: str, device: torch.device) -> bool:
    if backend == "cpu":
        return device.type == "cpu"
    if backend == "cuda":
        return device.type == "cuda"
    if backend == "triton":
        return device.type == "cuda" or (device.type == "cpu" and _interpreting())
    return True


def direct_entry(op: str, *tensors: torch.Tensor | None):
    """``netmerge_fast._C.<op>`` (csrc/python_calls.cpp) when this call of the CPU op may take it, else None.

    The entry calls the registered op without torch.ops' per-call parsing of the arguments (~3 us), through the
    same dispatcher. It is taken in eager mode only (dynamo cannot trace it) and for plain tensors: torch.ops
    also honours ``__torch_function__`` overrides, which a subclass may define.
    """
    if torch.compiler.is_compiling():
        return None
    for t in tensors:
        if t is not None and type(t) is not torch.Tensor:
            return None
    return _direct_entries()[op]


@cache
def _direct_entries() -> dict:
    native = importlib.import_module("netmerge_fast._C")
    return {op: getattr(native, op) for op in ("topk_gating", "moe_experts", "moe_experts_packed")}


_resolved: dict[tuple, str] = {}


def _constant_for_compile(fn):
    """What ``torch.compiler.assume_constant_result`` does, without its import of torch._dynamo (~2 s at our
    import time): torch.compile then calls ``fn`` once at trace time instead of tracing into it.
    tests/test_topk_gating.py::test_torch_compile_fullgraph fails if dynamo stops reading this marker."""
    fn._dynamo_marked_constant = True
    return fn


# A pure function of its arguments and of the machine: memoised, and a constant for torch.compile.
@_constant_for_compile
def resolve(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that serves ``op`` for a tensor on ``device`` of ``dtype``; errors name the fix."""
    key = (op, backend, device, dtype)
    if key not in _resolved:
        _resolved[key] = _resolve(op, backend, device, dtype)
    return _resolved[key]


def _resolve(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> str:
    impls = _OPS[op]
    if backend == "auto":
        for impl in impls:
            # The interpreter is for tests; auto never picks it for CPU tensors.
            if impl.backend == "triton" and device.type != "cuda":
                continue
            if (
                (impl.dtypes is None or dtype in impl.dtypes)
                and _runs_on(impl.backend, device)
                and (impl.backend == "torch" or backends()[impl.backend].available)
            ):
                return impl.backend
        raise AssertionError("unreachable: the torch backend serves every op")
    by_name = {impl.backend: impl for impl in impls}
    if backend not in by_name:
        raise ValueError(f"backend must be 'auto' or one of {sorted(by_name)} for {op}, got {backend!r}")
    status = backends()[backend]
    if not status.available:
        raise RuntimeError(f"{op}: backend {backend!r} is not available: {status.reason}")
    impl = by_name[backend]
    if not _runs_on(backend, device):
        raise ValueError(f"{op}: backend {backend!r} cannot run on {device.type} tensors")
    if impl.dtypes is not None and dtype not in impl.dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in impl.dtypes)
        raise TypeError(
            f"{op}: backend {backend!r} takes {names} inputs, got {dtype}; use backend='torch' for other dtypes"
        )
    return backend
