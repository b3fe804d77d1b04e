import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from models import TinyClassifier, TokenBag, classification_data, token_regression_data, trainer
from oracles import relative_error
from sharded_attribute import CASES, SELF_CASES, TOKEN_CASES, attribute, attribute_tokens, self_influence
from torch.utils.data import DataLoader

from lightning_dtda import AttributionResult, TrajectoryRecorder


def test_two_process_attribution_equals_one_process(tmp_path):
    pl.seed_everything(0)
    # 41 examples: shards of 21 and 20, so the last one is shorter
    trainer(tmp_path, [TrajectoryRecorder(tmp_path / "runs")], max_epochs=4, precision="64-true").fit(
        TinyClassifier(), DataLoader(classification_data(n=41, dtype=torch.float64), batch_size=8, shuffle=True)
    )
    pl.seed_everything(0)
    trainer(tmp_path, [TrajectoryRecorder(tmp_path / "token-runs")], max_epochs=2, precision="64-true").fit(
        TokenBag(), DataLoader(token_regression_data(n=41, dtype=torch.float64), batch_size=8, shuffle=True)
    )
    script = Path(__file__).parent / "sharded_attribute.py"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(script),
            str(tmp_path / "runs"),
            str(tmp_path),
            str(tmp_path / "token-runs"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for case in CASES:
        sharded = AttributionResult.load(tmp_path / f"{case}.safetensors")
        single = attribute(tmp_path / "runs", case)
        assert relative_error(sharded.effects, single.effects) < 1e-8, case
    for case in TOKEN_CASES:  # embedding blocks
        single = attribute_tokens(tmp_path / "token-runs", case)
        assert single.settings["per_run"][0]["parameters"] == ["embed.weight", "head.weight", "head.bias"]
        assert (
            relative_error(AttributionResult.load(tmp_path / f"token-{case}.safetensors").effects, single.effects)
            < 1e-8
        ), case
    for case in SELF_CASES:  # self-influence is sharded like the effects
        assert (
            relative_error(torch.load(tmp_path / f"self-{case}.pt"), self_influence(tmp_path / "runs", case).effects)
            < 1e-8
        ), case
