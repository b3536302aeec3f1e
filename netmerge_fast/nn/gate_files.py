"""Trained gates on disk: safetensors (no pickle) with the gates' configuration in the metadata, so loading a
gate into a model of other sizes or statistics is refused with a message instead of a shape error later."""

from __future__ import annotations

import json
import os

import torch

FORMAT = "netmerge-fast-gates/1"


def save_gates(path: str | os.PathLike, state: dict[str, torch.Tensor], config: dict) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    save_file(tensors, os.fspath(path), metadata={"format": FORMAT, "config": json.dumps(config, sort_keys=True)})


def load_gates(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except SafetensorError as error:
        raise ValueError(f"path {path!r} is not a safetensors file: {error}") from error
    if metadata.get("format") != FORMAT:
        raise ValueError(f"path {path!r} is not a netmerge-fast gate file (format {metadata.get('format')!r})")
    return load_file(path), json.loads(metadata["config"])


def check_config(path: str | os.PathLike, found: dict, expected: dict) -> None:
    """Every key of ``expected`` must match the file's configuration; the error names what differs."""
    diffs = [f"{k}: file has {found.get(k)!r}, model needs {v!r}" for k, v in expected.items() if found.get(k) != v]
    if diffs:
        raise ValueError(f"path {os.fspath(path)!r} holds gates for another model: " + "; ".join(diffs))
