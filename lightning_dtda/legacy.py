"""Files written by earlier versions, and converting them to the current formats.

Runs recorded before safetensors (run format 2) keep their snapshots as flat archives (a magic line,
a JSON header and raw tensor bytes); :func:`decode_archive` reads them, so such runs load unchanged.
The one thing in them it does not read is an entry written with ``torch.save`` (a snapshot's
optimizer state, kept only with ``save_optimizer_state=True``): unpickling is done by :func:`convert`
alone, when asked. Results and ground truths were ``torch.save`` files; :func:`convert` rewrites them
as safetensors. Cached effects and curvatures need no conversion: they are recomputed once.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any

import torch

ARCHIVE_MAGIC = b"lightning-dtda archive 1\n"


class PickledEntryError(ValueError):
    """A format 2 snapshot holds an entry written with ``torch.save``, which only :func:`convert` reads."""


def decode_archive(data: bytes, allow_pickle: bool = False) -> dict[str, Any]:
    """A run format 2 snapshot's tree; raises ``ValueError`` for anything else, and for an entry written
    with ``torch.save`` unless ``allow_pickle`` (then read with ``torch.load(weights_only=True)``)."""
    if not data.startswith(ARCHIVE_MAGIC):
        raise ValueError("not a lightning-dtda archive")
    start = len(ARCHIVE_MAGIC) + 8
    (length,) = struct.unpack_from("<Q", data, len(ARCHIVE_MAGIC))
    tree = json.loads(data[start : start + length])
    body = bytearray(memoryview(data)[start + length :])  # one copy, writable: torch.frombuffer shares it quietly

    def region(offset: int, size: int) -> None:
        if offset < 0 or offset + size > len(body):
            raise ValueError("archive cut short")

    def decode(value: Any, key: str) -> Any:
        if not isinstance(value, dict):
            return value
        if "__tensor__" in value:
            dtype_name, shape, offset, size = value["__tensor__"]
            region(offset, size)
            dtype = getattr(torch, dtype_name)
            if size == 0:
                return torch.empty(shape, dtype=dtype)
            return torch.frombuffer(body, dtype=dtype, count=size // dtype.itemsize, offset=offset).reshape(shape)
        if "__saved__" in value:
            if not allow_pickle:
                raise PickledEntryError(f"its entry {key!r} was written with torch.save (pickle), which is read only when converting")
            offset, size = value["__saved__"]
            region(offset, size)
            return torch.load(io.BytesIO(bytes(body[offset : offset + size])), map_location="cpu", weights_only=True)
        return {k: decode(v, k) for k, v in value.items()}

    return decode(tree, "")


def convert(path: str | Path) -> list[Path]:
    """Rewrite what an earlier version wrote at ``path`` in this version's formats; returns the files written.

    - A run folder, or a folder of them, of run format 2: each snapshot becomes
      ``snapshots/step_XXXXXXXX.safetensors`` (optimizer states included), the manifest lists the new
      files with their checksums and format 3, and the old files are removed after the manifest is.
    - A result (``AttributionResult.save``) or ground truth (``Retraining.save``) written with
      ``torch.save``: read with ``torch.load(weights_only=True)`` and written beside it with the suffix
      ``.safetensors`` (a result's ``.json`` settings file is rewritten too). The old file is kept.

    Raises:
        ValueError: If ``path`` is none of these.
    """
    from lightning_dtda.run_format import MANIFEST

    path = Path(path)
    if path.is_dir():
        folders = [path] if (path / MANIFEST).is_file() else sorted(p for p in path.iterdir() if (p / MANIFEST).is_file())
        if not folders:
            raise ValueError(f"{path} holds no run folder (no {MANIFEST}).")
        return [written for folder in folders for written in _convert_run(folder)]
    return [_convert_torch_file(path)]


def _convert_run(run_dir: Path) -> list[Path]:
    from dataclasses import replace

    from lightning_dtda._io import load_json, read_checked, save_json
    from lightning_dtda.run_format import FORMAT, MANIFEST, Manifest, SnapshotContent, snapshot_file

    manifest = Manifest.from_json(load_json(run_dir / MANIFEST))
    entries, written, old = [], [], []
    for entry in manifest.snapshots:
        data = read_checked(run_dir / entry.file, entry.sha256)
        if not data.startswith(ARCHIVE_MAGIC):  # already converted
            entries.append(entry)
            continue
        content = SnapshotContent.from_tree(decode_archive(data, allow_pickle=True))
        name = snapshot_file(entry.step)
        entries.append(replace(entry, file=name, sha256=content.save(run_dir / name)))
        written.append(run_dir / name)
        old.append(run_dir / entry.file)
    save_json(replace(manifest, snapshots=tuple(entries), format=FORMAT).to_json(), run_dir / MANIFEST)
    for file in old:
        file.unlink()
    return [*written, run_dir / MANIFEST]


def _convert_torch_file(path: Path) -> Path:
    from lightning_dtda.evaluation import Retraining
    from lightning_dtda.result import AttributionResult

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for what is not its zip archive
        raise ValueError(f"{path} is not a file that torch.save wrote: {err}") from err
    target = path.with_suffix(".safetensors")
    if isinstance(payload, dict) and {"effects", "measurements", "runs"} <= payload.keys():
        AttributionResult(payload["effects"], payload["measurements"], list(payload["runs"]), payload.get("settings", {})).save(target)
    elif isinstance(payload, dict) and {"weights", "base", "retrained", "runs"} <= payload.keys():
        Retraining(payload["weights"], payload["base"], payload["retrained"], list(payload["runs"])).save(target)
    else:
        raise ValueError(
            f"{path} is neither an AttributionResult nor a Retraining file. Cached effects and curvatures need no "
            "conversion: delete them, and they are computed again."
        )
    return target
