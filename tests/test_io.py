"""The files the package writes: safetensors any reader opens, no pickle, refused when damaged, and
the formats of earlier versions read or converted."""

import hashlib
import json
import shutil
import struct
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from models import TinyClassifier, classification_data, trainer
from safetensors import safe_open
from safetensors.torch import load, load_file, save, save_file
from torch.utils.data import DataLoader

from lightning_dtda import AttributionResult, TrajectoryRecorder, load_runs
from lightning_dtda._io import _tensors_in, decode_tree, encode_tree, load_tree, save_tree
from lightning_dtda.errors import CorruptFileError
from lightning_dtda.migrate import convert
from lightning_dtda.runs.archive import ARCHIVE_MAGIC

OLD_RUN = Path(__file__).parent / "data" / "runs_0_1"


def safetensors_header(data: bytes) -> dict:
    """The safetensors layout, read by hand: 8 bytes of little-endian header length, then a JSON header."""
    (length,) = struct.unpack_from("<Q", data)
    return json.loads(data[8 : 8 + length])


def test_tree_round_trip_keeps_every_tensor_value_and_structure(tmp_path):
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.randn(3, 2))])
    optimizer.param_groups[0]["params"][0].grad = torch.ones(3, 2)
    optimizer.step()
    shared = torch.randn(4)
    tree = {
        "format": 3,
        "lrs": [0.1, float("nan"), 1e-300],
        "name": "x",
        "none": None,
        "empty_dict": {},
        "nested": {
            "float32": torch.randn(4, 5),
            "float64": torch.randn(3, dtype=torch.float64),
            "bfloat16": torch.randn(2, 3).to(torch.bfloat16),
            "int64": torch.arange(7),
            "uint8": torch.randint(0, 255, (2, 5), dtype=torch.uint8),
            "bool": torch.tensor([True, False, True]),
            "scalar": torch.tensor(3.5),
            "empty": torch.empty(0, 4),
            "transposed": torch.randn(3, 4).T,
            "tied": shared,
            "tied_again": shared,  # safetensors refuses shared memory: stored twice
        },
        "optimizer_state": optimizer.state_dict(),  # integer keys, tuples
    }
    sha = save_tree(tree, tmp_path / "a.safetensors")
    data = (tmp_path / "a.safetensors").read_bytes()
    assert sha == hashlib.sha256(data).hexdigest()
    tensors, metadata = _tensors_in(bytearray(data))
    assert save(tensors, metadata=metadata) == data  # byte for byte what safetensors' own writer writes
    back = load_tree(tmp_path / "a.safetensors", sha)
    assert back["format"] == 3 and back["name"] == "x" and back["none"] is None and back["empty_dict"] == {}
    assert back["lrs"][0] == 0.1 and back["lrs"][2] == 1e-300 and back["lrs"][1] != back["lrs"][1]
    for key, value in tree["nested"].items():
        assert back["nested"][key].dtype == value.dtype and back["nested"][key].shape == value.shape, key
        assert torch.equal(back["nested"][key], value), key
    state = back["optimizer_state"]
    assert list(state["state"]) == [0]
    assert torch.equal(state["state"][0]["exp_avg"], tree["optimizer_state"]["state"][0]["exp_avg"])
    assert state["param_groups"][0]["betas"] == list(tree["optimizer_state"]["param_groups"][0]["betas"])
    torch.optim.Adam([torch.nn.Parameter(torch.randn(3, 2))]).load_state_dict(state)  # usable as it is


def test_tensors_are_read_as_safetensors_reads_them_and_bad_layouts_are_refused():
    tensors = {
        "f64": torch.randn(3, dtype=torch.float64),
        "f32": torch.randn(2, 3),
        "f16": torch.randn(5).half(),
        "bf16": torch.randn(3).to(torch.bfloat16),
        "i64": torch.arange(4),
        "i32": torch.arange(3, dtype=torch.int32),
        "i16": torch.arange(2, dtype=torch.int16),
        "i8": torch.arange(-3, 3, dtype=torch.int8),
        "u8": torch.arange(9, dtype=torch.uint8).view(3, 3),
        "bool": torch.tensor([True, False]),
        "u16": torch.arange(3).to(torch.uint16),
        "u32": torch.arange(3).to(torch.uint32),
        "u64": torch.arange(3).to(torch.uint64),
        "c64": torch.randn(2, dtype=torch.complex64),
        "f8": torch.randn(4).to(torch.float8_e4m3fn),
        "f8_e5m2": torch.randn(4).to(torch.float8_e5m2),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
    }
    data = bytearray(save(tensors, metadata={"k": "v"}))
    ours, metadata = _tensors_in(data)
    theirs = load(bytes(data))
    assert metadata == {"k": "v"} and set(ours) == set(theirs) == set(tensors)
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and ours[name].shape == tensor.shape, name
        assert torch.equal(ours[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), (
            name
        )  # bitwise (float8 has no ==)
    ours["f32"][0, 0] = 7.0  # views of the bytes, writable
    assert _tensors_in(data)[0]["f32"][0, 0] == 7.0

    def rewritten(change) -> bytes:
        header = safetensors_header(bytes(data))
        change(header)
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)  # padded as safetensors pads it, so tensors stay aligned
        body = data[8 + struct.unpack_from("<Q", data)[0] :]
        return bytearray(struct.pack("<Q", len(text)) + text + body)

    def widen(h):
        h["f32"]["shape"] = [2, 4]

    def overlap(h):
        h["i64"]["data_offsets"] = h["f64"]["data_offsets"]

    def unknown(h):
        h["f32"]["dtype"] = "X99"

    for change, message in (
        (widen, "'f32'.s bytes .* do not follow"),
        (overlap, "do not follow"),
        (unknown, "dtype 'X99'"),
    ):
        with pytest.raises(ValueError, match=message):
            _tensors_in(rewritten(change))
        with pytest.raises(Exception):  # noqa: B017 (safetensors refuses them too, with errors of its own types)
            load(bytes(rewritten(change)))
    with pytest.raises(ValueError, match="incomplete metadata"):
        _tensors_in(data + b"\0" * 8)
    for change, message in (
        (lambda h: h.clear() or h.update({"x": [1]}), "'x' has a malformed entry"),
        (lambda h: h["f32"].update(data_offsets=[0.0, 24.0]), "'f32' has a malformed entry"),
        (lambda h: h["f32"].update(shape=[True, 3]), "'f32' has a malformed entry"),
        (lambda h: h.update(__metadata__="x"), "__metadata__ is not a map of strings"),
    ):
        with pytest.raises(ValueError, match=message):
            _tensors_in(rewritten(change))
    with pytest.raises(ValueError, match="the header is not a JSON object"):
        _tensors_in(bytearray(struct.pack("<Q", 8) + b'"abcdef"'))
    with pytest.raises(TypeError, match="x is a torch.complex128 tensor, which these files do not hold"):
        encode_tree({"x": torch.zeros(2, dtype=torch.complex128)})


def test_trees_refuse_what_only_pickle_could_store():
    with pytest.raises(TypeError, match=r"settings.when is a datetime, which only pickle could store"):
        import datetime

        encode_tree({"settings": {"when": datetime.datetime(2026, 1, 1)}})
    with pytest.raises(TypeError, match=r"x has the key \(1, 2\), which JSON cannot hold"):
        encode_tree({"x": {(1, 2): 3}})


def test_damaged_foreign_and_old_files_are_refused_with_what_to_do(tmp_path):
    data = encode_tree({"w": torch.randn(100)})
    with pytest.raises(ValueError, match="incomplete metadata"):
        decode_tree(data[:-8])
    path = tmp_path / "snap.safetensors"
    path.write_bytes(data[:-8])  # a checksum that matches the cut file: another writer's file
    with pytest.raises(
        CorruptFileError, match="snap.safetensors is not a readable lightning-dtda file \\(truncated or corrupt\\)"
    ):
        load_tree(path, hashlib.sha256(data[:-8]).hexdigest())
    with pytest.raises(CorruptFileError, match="snap.safetensors does not match the checksum recorded for it"):
        load_tree(path, hashlib.sha256(data).hexdigest())
    save_file({"w": torch.zeros(2)}, tmp_path / "model.safetensors")  # somebody's weights, no tree
    with pytest.raises(
        CorruptFileError,
        match="model.safetensors is not a readable .* without lightning-dtda's 'lightning_dtda' metadata",
    ):
        load_tree(tmp_path / "model.safetensors")
    torch.save({"effects": torch.zeros(1, 1, 1)}, tmp_path / "old.pt")  # what earlier versions wrote
    with pytest.raises(ValueError, match=r"old.pt was written with torch.save \(pickle\) .* convert\('.*old.pt'\)"):
        load_tree(tmp_path / "old.pt")
    with pytest.raises(FileNotFoundError, match="gone.safetensors does not exist"):
        load_tree(tmp_path / "gone.safetensors")


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("recorded")
    pl.seed_everything(0)
    model = TinyClassifier(momentum=0.9)
    trainer(
        tmp_path,
        [TrajectoryRecorder(tmp_path / "runs", every_n_train_steps=3, save_optimizer_state=True)],
        max_epochs=1,
    ).fit(model, DataLoader(classification_data(n=20), batch_size=4, shuffle=True))
    return tmp_path / "runs" / "seed_0", model


def test_the_cached_steps_do_not_keep_the_snapshots_weights_in_memory(recorded_run):
    [run] = load_runs(recorded_run[0].parent)
    # Decoded tensors are views of the bytes read (not resizable: torch does not own them), which a
    # view kept in the cache would keep alive whole, weights included; the steps hold copies.
    assert run.snapshot().state_dict["net.0.weight"].untyped_storage().resizable() is False
    assert all(m.untyped_storage().resizable() for step in run.steps for m in step.micro_batches)


def test_a_snapshot_opens_with_safetensors_alone(recorded_run):
    run_dir, model = recorded_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["format"] == 3
    final = manifest["snapshots"][-1]
    assert final["file"] == "snapshots/step_00000005.safetensors"
    tensors = load_file(run_dir / final["file"])
    for key, value in model.state_dict().items():
        assert torch.equal(tensors[f"state_dict.{key}"], value), key
    # the two steps since the snapshot at step 3 (batches of 4 of the 20 examples, shuffled)
    assert tensors["steps.micro_batch_sizes"].tolist() == [4, 4] and tensors[
        "steps.micro_batches_per_step"
    ].tolist() == [1, 1]
    assert tensors["steps.lrs"].tolist() == [[0.1], [0.1]] and tensors["steps.indices"].dtype == torch.int64
    assert set(tensors["optimizer_state.state.0.momentum_buffer"].shape) == {8, 6}
    with safe_open(run_dir / final["file"], framework="pt") as f:
        tree = json.loads(f.metadata()["lightning_dtda"])
    assert tree["step"] == 5 and tree["steps"]["first"] == 4 and tree["lrs"] == [0.1]
    assert tree["optimizer_state"]["param_groups"][0]["momentum"] == 0.9
    # every step's indices, read with safetensors only, cover each epoch's permutation
    indices = torch.cat([load_file(run_dir / s["file"])["steps.indices"] for s in manifest["snapshots"]])
    assert sorted(indices.tolist()) == list(range(20))


def test_a_saved_result_is_safetensors_and_json_only(tmp_path):
    g = torch.Generator().manual_seed(0)
    result = AttributionResult(
        torch.randn(2, 3, 5, generator=g),
        torch.randn(2, 3, generator=g),
        ["seed_0", "seed_1"],
        {"estimator": "Influence", "damping": 0.1, "per_run": [{"damping": 0.1}, {"damping": 0.2}]},
    )
    result.save(tmp_path / "result.safetensors")
    data = (tmp_path / "result.safetensors").read_bytes()
    # The layout itself: a JSON header, then the tensors' bytes and nothing else (no room for a pickle).
    header = safetensors_header(data)
    assert header["effects"]["dtype"] == "F32" and header["effects"]["shape"] == [2, 3, 5]
    (length,) = struct.unpack_from("<Q", data)
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    assert 8 + length + max(ends) == len(data) and sorted(name for name in header if name != "__metadata__") == [
        "effects",
        "measurements",
    ]
    tensors = load_file(tmp_path / "result.safetensors")
    assert torch.equal(tensors["effects"], result.effects) and torch.equal(tensors["measurements"], result.measurements)
    tree = json.loads(header["__metadata__"]["lightning_dtda"])
    assert tree["runs"] == result.runs and tree["settings"] == result.settings
    assert json.loads((tmp_path / "result.json").read_text())["per_run"][1] == {"damping": 0.2}


def test_a_result_written_by_an_earlier_version_is_refused_then_converted(tmp_path):
    g = torch.Generator().manual_seed(0)
    old = {
        "format": 1,
        "effects": torch.randn(1, 2, 4, generator=g),
        "measurements": torch.randn(1, 2, generator=g),
        "runs": ["seed_0"],
        "settings": {"curvature": "ggn"},
    }
    torch.save(old, tmp_path / "attribution.pt")  # as AttributionResult.save wrote it before
    with pytest.raises(
        ValueError, match=r"attribution.pt was written with torch.save .* writes attribution.safetensors beside it"
    ):
        AttributionResult.load(tmp_path / "attribution.pt")
    assert convert(tmp_path / "attribution.pt") == [tmp_path / "attribution.safetensors"]
    result = AttributionResult.load(tmp_path / "attribution.safetensors")
    assert (
        torch.equal(result.effects, old["effects"])
        and result.runs == ["seed_0"]
        and result.settings == {"curvature": "ggn"}
    )


def _add_pickled_entry(snapshot: Path, name: str, value) -> None:
    """Add an entry the way run format 2 stored what JSON could not hold (torch.save bytes)."""
    import io

    data = snapshot.read_bytes()
    start = len(ARCHIVE_MAGIC) + 8
    (length,) = struct.unpack_from("<Q", data, len(ARCHIVE_MAGIC))
    tree, body = json.loads(data[start : start + length]), data[start + length :]
    buffer = io.BytesIO()
    torch.save(value, buffer)
    tree[name] = {"__saved__": [len(body), len(buffer.getvalue())]}
    header = json.dumps(tree).encode()
    snapshot.write_bytes(ARCHIVE_MAGIC + struct.pack("<Q", len(header)) + header + body + buffer.getvalue())


def test_a_run_of_format_2_reads_unchanged_and_converts(tmp_path):
    shutil.copytree(OLD_RUN, tmp_path / "runs")
    run_dir = tmp_path / "runs" / "seed_0"
    [before] = load_runs(tmp_path / "runs")  # format 2 reads as it is (tests/test_estimators.py pins its numbers)
    weights, steps = [before.state_dict(i) for i in range(4)], before.steps

    # An optimizer state, which format 2 kept with torch.save, is read only when converting.
    last = run_dir / before.snapshots[-1].file
    momentum = {"state": {0: {"momentum_buffer": torch.randn(5, 6)}}, "param_groups": [{"lr": 0.2, "params": [0]}]}
    _add_pickled_entry(last, "optimizer_state", momentum)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["snapshots"][-1]["sha256"] = hashlib.sha256(last.read_bytes()).hexdigest()
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    [old] = load_runs(tmp_path / "runs")
    assert torch.equal(old.state_dict(0)["net.0.weight"], weights[0]["net.0.weight"])
    with pytest.raises(
        ValueError, match=r"step_00000012.snapshot: its entry 'optimizer_state' was written with torch.save .*convert\("
    ):
        old.snapshot(-1)

    written = convert(tmp_path / "runs")
    assert sorted(p.name for p in (run_dir / "snapshots").iterdir()) == [
        f"step_{s:08d}.safetensors" for s in (0, 4, 8, 12)
    ]
    assert len(written) == 5 and json.loads((run_dir / "manifest.json").read_text())["format"] == 3
    [new] = load_runs(tmp_path / "runs")
    assert new.status == "finished" and new.snapshot_steps == [0, 4, 8, 12]
    for i in range(4):
        assert all(torch.equal(new.state_dict(i)[k], v) for k, v in weights[i].items())
    for a, b in zip(new.steps, steps):
        assert a.lrs == b.lrs and all(torch.equal(x, y) for x, y in zip(a.micro_batches, b.micro_batches))
    assert torch.equal(
        load_file(run_dir / new.snapshots[-1].file)["optimizer_state.state.0.momentum_buffer"],
        momentum["state"][0]["momentum_buffer"],
    )


def test_converting_a_current_result_says_there_is_nothing_to_convert(tmp_path):
    from lightning_dtda import convert

    AttributionResult(torch.zeros(1, 1, 2), torch.zeros(1, 1), ["seed_0"], {}).save(tmp_path / "r.safetensors")
    with pytest.raises(
        ValueError, match=r"r.safetensors is already in this version's format: there is nothing to convert"
    ):
        convert(tmp_path / "r.safetensors")
