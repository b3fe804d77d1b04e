"""Converting files written by earlier versions to the current formats, run only when asked.

Results and ground truths were ``torch.save`` files, and run format 2's snapshots may hold
``torch.save`` entries; ``convert`` rewrites them as safetensors. Cached effects and curvatures
need no conversion: they are computed again once.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_dtda._io import load_tree
from lightning_dtda.results.result import AttributionResult
from lightning_dtda.results.retraining import Retraining
from lightning_dtda.runs.archive import ARCHIVE_MAGIC, decode_archive


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
    from lightning_dtda.runs.format import MANIFEST

    path = Path(path)
    if path.is_dir():
        folders = (
            [path] if (path / MANIFEST).is_file() else sorted(p for p in path.iterdir() if (p / MANIFEST).is_file())
        )
        if not folders:
            raise ValueError(f"{path} holds no run folder (no {MANIFEST}).")
        return [written for folder in folders for written in _convert_run(folder)]
    return [_convert_torch_file(path)]


def _convert_run(run_dir: Path) -> list[Path]:
    from dataclasses import replace

    from lightning_dtda._io import load_json, read_checked, save_json
    from lightning_dtda.runs.format import FORMAT, MANIFEST, Manifest, SnapshotContent, snapshot_file

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
    if path.is_file() and path.read_bytes()[:4] != b"PK\x03\x04":  # not torch.save's zip archive
        try:
            load_tree(path)
        except (ValueError, OSError):
            pass  # neither: torch.load below says what it is not
        else:
            raise ValueError(f"{path} is already in this version's format: there is nothing to convert.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for what is not its zip archive
        raise ValueError(f"{path} is not a file that torch.save wrote: {err}") from err
    target = path.with_suffix(".safetensors")
    if isinstance(payload, dict) and {"effects", "measurements", "runs"} <= payload.keys():
        AttributionResult(
            payload["effects"], payload["measurements"], list(payload["runs"]), payload.get("settings", {})
        ).save(target)
    elif isinstance(payload, dict) and {"weights", "base", "retrained", "runs"} <= payload.keys():
        Retraining(payload["weights"], payload["base"], payload["retrained"], list(payload["runs"])).save(target)
    else:
        raise ValueError(
            f"{path} is neither an AttributionResult nor a Retraining file. Cached effects and curvatures need no "
            "conversion: delete them, and they are computed again."
        )
    return target
