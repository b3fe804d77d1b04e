import hashlib

import pytest
import torch

from lightning_dtda._io import decode_archive, encode_archive, load_archive, save_archive


def test_archive_round_trip_keeps_every_tensor_value_and_structure(tmp_path):
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.randn(3, 2))])
    optimizer.param_groups[0]["params"][0].grad = torch.ones(3, 2)
    optimizer.step()
    tree = {
        "format": 2,
        "lrs": [0.1, float("nan"), 1e-300],
        "name": "x",
        "none": None,
        "nested": {
            "float32": torch.randn(4, 5),
            "float64": torch.randn(3, dtype=torch.float64),
            "bfloat16": torch.randn(2, 3).to(torch.bfloat16),
            "int64": torch.arange(7),
            "bool": torch.tensor([True, False, True]),
            "scalar": torch.tensor(3.5),
            "empty": torch.empty(0, 4),
            "transposed": torch.randn(3, 4).T,
        },
        "optimizer_state": optimizer.state_dict(),  # integer keys: stored with torch.save
    }
    sha = save_archive(tree, tmp_path / "a.bin")
    assert sha == hashlib.sha256((tmp_path / "a.bin").read_bytes()).hexdigest()
    back = load_archive(tmp_path / "a.bin", sha)
    assert back["format"] == 2 and back["name"] == "x" and back["none"] is None
    assert back["lrs"][0] == 0.1 and back["lrs"][2] == 1e-300 and back["lrs"][1] != back["lrs"][1]
    for key, value in tree["nested"].items():
        assert back["nested"][key].dtype == value.dtype and back["nested"][key].shape == value.shape, key
        assert torch.equal(back["nested"][key], value), key
    state = back["optimizer_state"]
    assert torch.equal(state["state"][0]["exp_avg"], tree["optimizer_state"]["state"][0]["exp_avg"])
    assert state["param_groups"][0]["lr"] == tree["optimizer_state"]["param_groups"][0]["lr"]


def test_archive_refuses_foreign_and_cut_files(tmp_path):
    data = encode_archive({"w": torch.randn(100)})
    with pytest.raises(ValueError, match="cut short"):
        decode_archive(data[:-8])
    with pytest.raises(ValueError, match="not a lightning-dtda archive"):
        decode_archive(b"PK\x03\x04" + data)
    path = tmp_path / "snap.bin"
    path.write_bytes(data[:-8])  # a checksum that matches the cut file: another writer's file
    with pytest.raises(ValueError, match="snap.bin is not a readable snapshot file: archive cut short"):
        load_archive(path, hashlib.sha256(data[:-8]).hexdigest())
    with pytest.raises(ValueError, match="snap.bin does not match the checksum recorded for it"):
        load_archive(path, hashlib.sha256(data).hexdigest())
