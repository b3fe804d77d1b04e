import pytest
import torch

from lightning_dtda import AttributionResult
from lightning_dtda.errors import CorruptFileError


def make_result():
    g = torch.Generator().manual_seed(0)
    return AttributionResult(
        torch.randn(3, 2, 10, generator=g),
        torch.randn(3, 2, generator=g),
        ["seed_0", "seed_1", "seed_2"],
        {"curvature": "ggn", "damping": "auto"},
    )


def test_mean_shift_and_top_k():
    result = make_result()
    assert torch.allclose(result.mean_shift(), result.effects.mean(0))
    values, indices = result.top_k(query=1, k=3)
    order = result.effects.mean(0)[1].argsort(descending=True)
    assert indices.tolist() == order[:3].tolist()
    values, indices = result.top_k(query=1, k=3, largest=False)
    assert indices.tolist() == order.flip(0)[:3].tolist() and (values[:-1] <= values[1:]).all()


def test_shapes_must_agree():
    with pytest.raises(ValueError, match="do not agree on"):
        AttributionResult(torch.zeros(3, 2, 10), torch.zeros(3, 1), ["a", "b", "c"])


def test_save_and_load_round_trip(tmp_path):
    result = make_result()
    result.save(tmp_path / "result.safetensors")
    loaded = AttributionResult.load(tmp_path / "result.safetensors")
    assert torch.equal(loaded.effects, result.effects) and torch.equal(loaded.measurements, result.measurements)
    assert loaded.runs == result.runs and loaded.settings == result.settings
    assert '"curvature": "ggn"' in (tmp_path / "result.json").read_text()
    assert not list(tmp_path.glob(".*.tmp"))


def test_truncated_result_file_is_refused(tmp_path):
    make_result().save(tmp_path / "result.safetensors")
    path = tmp_path / "result.safetensors"
    data = path.read_bytes()
    for damaged in (
        data[:200],
        data[:-4],
        data[:8] + b"[" + data[9:],
    ):  # cut in the header, cut in the tensors, garbled header
        path.write_bytes(damaged)
        with pytest.raises(
            CorruptFileError,
            match="result.safetensors is not a readable lightning-dtda file \\(truncated or corrupt\\)",
        ):
            AttributionResult.load(path)
