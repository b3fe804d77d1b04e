import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import TinyClassifier, classification_data

from lightning_dtda import load_runs
from lightning_dtda.model.instantiate import instantiate
from lightning_dtda.replay.engine import replay


@pytest.mark.parametrize("workers", [0, 1])
def test_ddp_recording_replays_on_one_process(tmp_path, workers):
    script = Path(__file__).parent / "ddp_record.py"
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(workers)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    [run] = load_runs(tmp_path / "runs")
    assert run.manifest.world_size == 2
    # 36 examples on 2 ranks: 18 per rank, batches of 5 -> 4 steps per epoch, each with 2 micro-batches
    assert len(run.steps) == 12 and all(len(s.micro_batches) == 2 for s in run.steps)
    epoch = torch.cat([m for s in run.steps[:4] for m in s.micro_batches])
    assert sorted(epoch.tolist()) == list(range(36))  # the global batches cover the dataset once
    model = instantiate(TinyClassifier, run, 0)
    final = replay(model, run, classification_data(n=36), torch.ones(1, 36))
    recorded = run.state_dict()
    assert max((t[0] - recorded[n]).abs().max().item() for n, t in final.items()) < 1e-6


def test_attributing_right_after_a_ddp_fit_on_every_rank_reads_the_finished_run(tmp_path):
    """Rank one used to read the run before rank zero had marked it finished (rank zero is made late in the
    script, so that would happen every time); the recorder now holds every rank in fit until it has. The
    sharded attribution equals one process's."""
    from lightning_dtda import AttributionResult, Attributor, Influence

    script, out = Path(__file__).parent / "ddp_attribute_after_fit.py", tmp_path
    done = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = AttributionResult.load(out / "result.safetensors")
    data = classification_data(n=36, dtype=torch.float64)
    alone = Attributor(TinyClassifier, out / "runs", data, Influence("ggn", damping=0.1), progress=False).attribute(
        classification_data(n=3, seed=1, dtype=torch.float64)
    )
    assert (result.effects - alone.effects).abs().max() <= 1e-9 * alone.effects.abs().max()
