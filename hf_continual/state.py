"""Continual state saved beside the model: ``continual_state.safetensors`` + ``continual_state.json``.

The tensors (anchors, curvature, masks, ...) go to safetensors; the JSON holds the method name, its metadata
(task history, curvature kinds) and the continual config, plus the SHA-256 of the tensor file so a truncated or
corrupted pair is detected. Both files are written to temporary names and renamed (atomic on POSIX).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

STATE_TENSORS = "continual_state.safetensors"
STATE_META = "continual_state.json"
FORMAT_VERSION = 1


class ContinualStateError(RuntimeError):
    """The continual state is missing, corrupted or does not match the model."""


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and a rename (no half-written files)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    _atomic_write(Path(path), write)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """JSON variant of :func:`atomic_write_text` (indented, keys in insertion order)."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_state(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write the state pair into ``directory``; the tensor file first, then the JSON that vouches for it."""
    directory = Path(directory)
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    tensor_path = directory / STATE_TENSORS
    _atomic_write(tensor_path, lambda tmp: save_file(flat, tmp, metadata={"format": "hf_continual"}))
    record = {"format_version": FORMAT_VERSION, "tensors_sha256": _sha256(tensor_path), **meta}
    atomic_write_json(directory / STATE_META, record)


def has_state(directory: str | os.PathLike) -> bool:
    """True when ``directory`` holds a continual state (its JSON record)."""
    return (Path(directory) / STATE_META).is_file()


def read_state_record(directory: str | os.PathLike) -> dict[str, Any]:
    """The JSON record of a continual state (method, tasks seen, settings) without reading its tensors: what a
    recipe checks before anything runs. Raises :class:`ContinualStateError` naming the file."""
    meta_path = Path(directory) / STATE_META
    if not meta_path.is_file():
        raise ContinualStateError(f"{meta_path}: no continual state here (missing {STATE_META})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ContinualStateError(f"{meta_path}: corrupted continual state record ({err})") from err
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise ContinualStateError(f"{meta_path}: unsupported continual state format {meta!r:.80}")
    return meta


def load_state(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify the state pair; any inconsistency raises :class:`ContinualStateError` naming the file."""
    directory = Path(directory)
    meta_path, tensor_path = directory / STATE_META, directory / STATE_TENSORS
    meta = read_state_record(directory)
    if not tensor_path.is_file():
        raise ContinualStateError(f"{tensor_path}: missing (the record {meta_path} refers to it)")
    digest = _sha256(tensor_path)
    if digest != meta.get("tensors_sha256"):
        raise ContinualStateError(
            f"{tensor_path}: checksum mismatch (file is truncated or corrupted; expected "
            f"{meta.get('tensors_sha256')}, got {digest})"
        )
    try:
        tensors = load_file(tensor_path)
    except (SafetensorError, OSError) as err:
        raise ContinualStateError(f"{tensor_path}: cannot be read ({err})") from err
    return tensors, meta


def check_parameters_match(
    model: torch.nn.Module, shapes: dict[str, list[int]], source: str | os.PathLike
) -> None:
    """Raise naming every parameter whose name or shape differs between ``model`` and a saved state."""
    have = {n: list(p.shape) for n, p in model.named_parameters()}
    missing = sorted(set(shapes) - set(have))
    wrong = sorted(n for n in set(shapes) & set(have) if have[n] != list(shapes[n]))
    if missing or wrong:
        parts = []
        if missing:
            parts.append(
                f"parameters not in the model: {', '.join(missing[:10])}"
                + (" ..." if len(missing) > 10 else "")
            )
        if wrong:
            parts.append(
                "shape mismatch: "
                + ", ".join(f"{n} saved {shapes[n]} vs model {have[n]}" for n in wrong[:10])
                + (" ..." if len(wrong) > 10 else "")
            )
        raise ContinualStateError(f"{source}: continual state does not match the model; " + "; ".join(parts))
