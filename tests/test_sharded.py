import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_dtda import AttributionResult, TrajectoryRecorder
from models import TinyClassifier, classification_data, trainer
from oracles import relative_error
from sharded_attribute import CASES, SELF_CASES, attribute, self_influence


def test_two_process_attribution_equals_one_process(tmp_path):
    pl.seed_everything(0)
    # 41 examples: shards of 21 and 20, so the last one is shorter
    trainer(tmp_path, [TrajectoryRecorder(tmp_path / "runs")], max_epochs=4, precision="64-true").fit(
        TinyClassifier(), DataLoader(classification_data(n=41, dtype=torch.float64), batch_size=8, shuffle=True))
    script = Path(__file__).parent / "sharded_attribute.py"
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), str(tmp_path / "runs"), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for case in CASES:
        sharded = AttributionResult.load(tmp_path / f"{case}.safetensors")
        single = attribute(tmp_path / "runs", case)
        assert relative_error(sharded.effects, single.effects) < 1e-8, case
    for case in SELF_CASES:  # self-influence is sharded like the effects
        assert relative_error(torch.load(tmp_path / f"self-{case}.pt"), self_influence(tmp_path / "runs", case).effects) < 1e-8, case
