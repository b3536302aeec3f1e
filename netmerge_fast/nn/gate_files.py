"""Trained gates on disk: safetensors (no pickle) with the gates' configuration in the metadata, so loading a
gate into a model of other sizes or statistics is refused with a message instead of a shape error later."""

from __future__ import annotations

import json
import os

import torch

FORMAT = "netmerge-fast-gates/1"
# One metadata key holding format and configuration: safetensors writes its metadata map in hash order, which
# changes run to run, so two keys would make the same gates give different bytes (the bundled gate must not).
META_KEY = "netmerge_fast"


def save_gates(path: str | os.PathLike, state: dict[str, torch.Tensor], config: dict) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    meta = json.dumps({"format": FORMAT, "config": config}, sort_keys=True)
    save_file(tensors, os.fspath(path), metadata={META_KEY: meta})


def load_gates(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except SafetensorError as error:
        raise ValueError(f"path {path!r} is not a safetensors file: {error}") from error
    if META_KEY in metadata:
        try:
            metadata = json.loads(metadata[META_KEY])
        except json.JSONDecodeError as error:
            raise ValueError(f"path {path!r} has unreadable netmerge-fast metadata: {error}") from error
    elif "config" in metadata:  # files written before the single key: format and config as two keys
        metadata = {"format": metadata.get("format"), "config": json.loads(metadata["config"])}
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        found = metadata.get("format") if isinstance(metadata, dict) else None
        raise ValueError(f"path {path!r} is not a netmerge-fast gate file (format {found!r})")
    return load_file(path), metadata["config"]


def check_config(path: str | os.PathLike, found: dict, expected: dict) -> None:
    """Every key of ``expected`` must match the file's configuration; the error names what differs."""
    diffs = [f"{k}: file has {found.get(k)!r}, model needs {v!r}" for k, v in expected.items() if found.get(k) != v]
    if diffs:
        raise ValueError(f"path {os.fspath(path)!r} holds gates for another model: " + "; ".join(diffs))
