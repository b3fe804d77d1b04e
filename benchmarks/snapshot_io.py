"""What safetensors snapshots (run format 3) cost against the flat archives of run format 2.

    python benchmarks/snapshot_io.py    # about 4 minutes on 2 cores

Records two epochs of the digits MLP of benchmarks/speed.py (the recorder-overhead setting: 32 steps
of 32 examples per snapshot), takes its last snapshot, and writes and reads that same content in both
formats, interleaved, 2,000 times each. Prints the median time per snapshot of: encode + atomic write
+ SHA-256 (what the recorder pays per snapshot), and checked read + decode (what a replay pays per
snapshot), and the ratio new / old. Format 2's encoder is no longer in the package; the few lines
below rebuild it from ``runs.archive.decode_archive``, which reads what it writes (checked here).

Then the recorder's overhead in the protocol of benchmarks/speed.py, but format against format: the
digits example (20 epochs, a snapshot every epoch) trained with the recorder writing safetensors and
with it writing format-2 archives, the same seed back to back in alternating order, 41 pairs after a
warm-up pair; printed: the quartiles of the paired ratios (safetensors / format 2).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from docs_tables import write_table
from models import QUIET, DigitsMLP, speed_data
from torch.utils.data import DataLoader

from lightning_dtda import TrajectoryRecorder, load_runs

# Internal on purpose: this benchmark times the snapshot file format itself (the writer, the checked reader,
# format 2's archive codec) and swaps the recorder's writer, none of which the public API exposes.
from lightning_dtda._io import atomic_write_bytes, read_checked, save_tree
from lightning_dtda.runs.archive import ARCHIVE_MAGIC, decode_archive
from lightning_dtda.runs.format import SnapshotContent

REPEATS = 2000


def encode_archive(tree: dict[str, Any]) -> bytes:
    """Run format 2's bytes: the magic line, the JSON header's length and the header (each tensor as
    ``{"__tensor__": [dtype, shape, offset, size]}``), then the tensors' raw bytes."""
    chunks: list[bytes] = []
    offset = 0

    def encode(value: Any) -> Any:
        nonlocal offset
        if isinstance(value, torch.Tensor):
            raw = value.contiguous().numpy().tobytes() if value.numel() else b""
            chunks.append(raw)
            entry = {"__tensor__": [str(value.dtype).removeprefix("torch."), list(value.shape), offset, len(raw)]}
            offset += len(raw)
            return entry
        if isinstance(value, dict):
            return {k: encode(v) for k, v in value.items()}
        return value

    header = json.dumps(encode(tree)).encode()
    return ARCHIVE_MAGIC + struct.pack("<Q", len(header)) + header + b"".join(chunks)


def write_archive(tree: dict[str, Any], path: Path, checksum: bool = False) -> str:
    data = encode_archive(tree)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def recorder_format_ratio(repeats: int = 41) -> tuple[float, float, float]:
    """Quartiles of the training time with safetensors snapshots over that with format-2 archives."""
    import lightning_dtda.runs.format as run_format

    train_set = speed_data("mlp")[0]
    writers = {"new": run_format.save_tree, "old": write_archive}
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats + 1):
            seconds = {}
            for kind in ("new", "old") if repeat % 2 else ("old", "new"):
                run_format.save_tree = writers[kind]
                pl.seed_everything(repeat, verbose=False)
                trainer = pl.Trainer(
                    max_epochs=20,
                    **QUIET,
                    callbacks=[TrajectoryRecorder(Path(tmp) / f"{kind}{repeat}")],
                )
                start = time.perf_counter()
                trainer.fit(DigitsMLP(), DataLoader(train_set, batch_size=32, shuffle=True))
                seconds[kind] = time.perf_counter() - start
            if repeat > 0:
                ratios.append(seconds["new"] / seconds["old"])
    run_format.save_tree = writers["new"]
    return tuple(
        torch.tensor(ratios, dtype=torch.float64)
        .quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
        .tolist()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-docs", action="store_true", help="rewrite the table in docs/benchmarks/snapshot_io.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pl.seed_everything(0, verbose=False)
        pl.Trainer(
            max_epochs=2,
            **QUIET,
            callbacks=[TrajectoryRecorder(root / "run")],
        ).fit(DigitsMLP(), DataLoader(speed_data("mlp")[0], batch_size=32, shuffle=True))
        [run] = load_runs(root / "run")
        entry = run.snapshots[-1]
        tree = SnapshotContent.load(run.path / entry.file, entry.sha256).to_tree()
        old_path, new_path = root / "old.snapshot", root / "new.safetensors"
        old_sha, new_sha = write_archive(tree, old_path), save_tree(tree, new_path, checksum=False)
        size = new_path.stat().st_size
        old_back, new_back = decode_archive(read_checked(old_path, old_sha)), SnapshotContent.load(new_path, new_sha)
        for key, value in tree["state_dict"].items():  # both formats give back what was written
            assert torch.equal(old_back["state_dict"][key], value) and torch.equal(new_back.state_dict[key], value)

        operations = {
            ("write", "old"): lambda: write_archive(tree, old_path),
            ("write", "new"): lambda: save_tree(tree, new_path, checksum=False),
            ("read", "old"): lambda: decode_archive(read_checked(old_path, old_sha)),
            ("read", "new"): lambda: SnapshotContent.load(new_path, new_sha),
        }
        seconds: dict[tuple[str, str], list[float]] = {key: [] for key in operations}
        for _ in range(REPEATS):  # interleaved, so a slow spell of the machine hits both formats alike
            for key, operation in operations.items():
                start = time.perf_counter()
                operation()
                seconds[key].append(time.perf_counter() - start)

    print(
        f"digits MLP snapshot: {size} bytes "
        f"({sum(t.numel() for t in tree['state_dict'].values())} parameters, {len(tree['steps']['micro_batch_sizes'])} steps)"
    )
    lines = ["| per snapshot | run format 2 (ms) | safetensors (ms) | ratio |", "|---|---|---|---|"]
    labels = {"write": "encode + atomic write + SHA-256", "read": "checked read + decode"}
    for operation, label in labels.items():
        old = statistics.median(seconds[(operation, "old")]) * 1e3
        new = statistics.median(seconds[(operation, "new")]) * 1e3
        lines.append(f"| {label} | {old:.3f} | {new:.3f} | {new / old:.2f} |")
    print("\n".join(lines))
    if args.write_docs:
        write_table("snapshot_io", "main", "\n".join(lines))
    q1, median, q3 = recorder_format_ratio()
    print(
        f"\nrecorder, digits example (20 epochs, a snapshot each): training time writing safetensors / writing format 2, "
        f"median of 41 pairs {median:.3f} (quartiles {q1:.3f}-{q3:.3f})"
    )


if __name__ == "__main__":
    main()
