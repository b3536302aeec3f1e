"""Argument checks shared by the ops' validators: each error names the argument and what it expected."""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection

import torch


def _shape(t: torch.Tensor) -> str:
    return f"[{', '.join(str(s) for s in t.shape)}]"


def tensor(
    name: str, value: object, *, dim: int | None = None, floating: bool = False, integer: bool = False
) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dim is not None and value.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {_shape(value)}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, float16 or bfloat16), got {value.dtype}")
    if integer and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
    return value


def same_device(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if value.device != ref.device:
        raise ValueError(f"{name} is on {value.device} but {ref_name} is on {ref.device}")


def integer(name: str, value: object, *, low: int | None = None, high: int | None = None) -> int:
    if type(value) is not int and (isinstance(value, bool) or not isinstance(value, numbers.Integral | torch.SymInt)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ValueError(f"{name} must be in {bounds}, got {value}")
    return value  # type: ignore[return-value]


def choice(name: str, value: object, options: Collection[str]) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(repr(o) for o in options)}; got {value!r}")
    return value  # type: ignore[return-value]


def boolean(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def finite_real(name: str, value: object) -> float:
    if type(value) is not float and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


MAX_SLOTS = 2**31 - 1  # slot numbers and sorted positions are int32


def routing(
    topk_weights: object,
    topk_ids: object,
    *,
    tokens: int,
    num_experts: int,
    like: torch.Tensor,
    like_name: str,
    check_values: bool = True,
) -> None:
    """Routing weights ``[T, k]`` float32 (or float64) and ids ``[T, k]`` in ``[-1, E)`` for the
    ``tokens`` rows of ``like``, on its device. The id range is checked on CPU tensors in eager mode only (anywhere
    else it would cost a host sync), and not with ``check_values=False`` (for a caller whose kernel checks it and
    raises the same ValueError)."""
    tensor("topk_weights", topk_weights, dim=2, floating=True)
    tensor("topk_ids", topk_ids, dim=2, integer=True)
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_weights and topk_ids must have the same shape [T, k], got {list(topk_weights.shape)} and "
            f"{list(topk_ids.shape)}"
        )
    if topk_ids.shape[0] != tokens:
        raise ValueError(f"topk_ids must have one row per token of {like_name} (T={tokens}), got {topk_ids.shape[0]}")
    if topk_weights.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"topk_weights must be float32 (float64 with float64 {like_name}), got {topk_weights.dtype}")
    if topk_ids.numel() > MAX_SLOTS:
        raise ValueError(f"T * k must be below 2^31, got {topk_ids.numel()}")
    same_device("topk_weights", topk_weights, like_name, like)
    same_device("topk_ids", topk_ids, like_name, like)
    if check_values and topk_ids.device.type == "cpu" and topk_ids.numel() and not torch.compiler.is_compiling():
        low, high = (v.item() for v in torch.aminmax(topk_ids))
        if low < -1 or high >= num_experts:
            raise ValueError(
                f"topk_ids must be in [-1, E={num_experts}) (-1: routed nowhere), got values in [{low}, {high}]"
            )
