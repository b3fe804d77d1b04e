"""Atomic, checked files: every artefact is written to a temporary name and renamed."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import torch


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    # A temporary file in the same folder, so os.replace is a rename on one file system: a reader
    # sees the old file or the new one, never half of either, even if this process is killed. No
    # fsync: it guards against power loss, not a killed job, and cost the recorder 5% of training time.
    # Each artefact has a single writer (rank zero of one run), so a fixed temporary name is safe and
    # cheaper than mkstemp's.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_torch(obj: Any, path: str | Path) -> str:
    """Write ``obj`` with ``torch.save`` atomically and return the SHA-256 of the file."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    atomic_write_bytes(Path(path), data)
    return hashlib.sha256(data).hexdigest()


def load_torch(path: str | Path, sha256: str | None = None) -> Any:
    """Read a file written by :func:`save_torch`, refusing it if it is missing, altered or cut short."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; was the run recorded to completion?")
    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(
            f"{path} does not match the checksum recorded for it: the file was truncated or altered "
            "after it was written. Record the run again or restore the file."
        )
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a damaged zip archive
        raise ValueError(f"{path} is not a readable snapshot file (truncated or corrupt): {err}") from err


def save_json(obj: Any, path: str | Path) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=1) + "\n").encode())


def load_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON (truncated or corrupt): {err}") from err
