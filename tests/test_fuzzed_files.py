"""Every file lightning-dtda reads, flipped, cut short or extended at random: reading it raises a
``ValueError`` naming the file, or gives back exactly what was written, never other data."""

import json
import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import TinyClassifier, classification_data, trainer
from torch.utils.data import DataLoader

from lightning_dtda import AttributionResult, Trajectory, TrajectoryRecorder
from lightning_dtda._io import load_tree, save_tree


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """One of each: a run (manifest and snapshots), a result and a curvature-cache-like tree."""
    root = tmp_path_factory.mktemp("fuzz")
    pl.seed_everything(0)
    trainer(root, [TrajectoryRecorder(root / "runs")], max_epochs=1).fit(
        TinyClassifier(), DataLoader(classification_data(n=8), batch_size=4)
    )
    result = AttributionResult(torch.randn(2, 3, 8), torch.randn(2, 3), ["seed_0", "seed_1"], {"damping": 0.1})
    result.save(root / "result.safetensors")
    save_tree({"factors": {"net.0": torch.randn(6, 6)}, "kind": "ekfac"}, root / "cache.safetensors")
    return {"run": root / "runs" / "seed_0", "result": root / "result.safetensors", "cache": root / "cache.safetensors"}


def read(kind: str, path: Path):
    """What a user's call reads from the file, as plain data to compare."""
    if kind == "result":
        result = AttributionResult.load(path)
        return result.effects, result.measurements, result.runs, result.settings
    if kind == "cache":
        return load_tree(path)
    run = Trajectory(path)
    return run.manifest, [run.state_dict(i) for i in range(len(run.snapshots))], run.steps


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if hasattr(a, "__dataclass_fields__"):
        return type(a) is type(b) and all(same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    return a == b or (a != a and b != b)  # NaN equals NaN here


def mutate(data: bytes, how: str, position: int, value: int) -> bytes:
    position %= max(len(data), 1)
    if how == "flip":
        return data[:position] + bytes([data[position] ^ (value % 255 + 1)]) + data[position + 1 :]
    if how == "truncate":
        return data[:position]
    return data + bytes([value]) * (position % 64 + 1)  # extend


@pytest.mark.parametrize(
    "kind, file", [("result", None), ("cache", None), ("run", "manifest.json"), ("run", "snapshot")]
)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(how=st.sampled_from(["flip", "truncate", "extend"]), position=st.integers(0, 1 << 20), value=st.integers(0, 255))
def test_a_damaged_file_is_refused_or_read_unchanged(files, tmp_path, kind, file, how, position, value):
    source = files[kind]
    original = read(kind, source)
    target = tmp_path / "copy"
    shutil.rmtree(target, ignore_errors=True)
    if source.is_dir():
        shutil.copytree(source, target)
        victim = target / "manifest.json" if file == "manifest.json" else sorted((target / "snapshots").iterdir())[-1]
    else:
        target.mkdir()
        victim = target / source.name
        shutil.copy(source, victim)
    victim.write_bytes(mutate(victim.read_bytes(), how, position, value))
    path = target if source.is_dir() else victim
    try:
        damaged = read(kind, path)
    except ValueError as error:  # the package's CorruptFileError and the like are ValueErrors
        assert str(target) in str(error) or victim.name in str(error), str(error)
        return
    assert same(original, damaged), f"{how} at {position} gave other data"


def test_the_manifest_checksum_ignores_layout_and_catches_content(files, tmp_path):
    run = shutil.copytree(files["run"], tmp_path / "run")
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps(manifest, indent=4))  # another layout: the same content
    assert Trajectory(run).manifest == Trajectory(files["run"]).manifest
    manifest["optimizer"]["param_groups"][0]["lr"] *= 3
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="manifest.json: its content does not match its checksum"):
        Trajectory(run)
