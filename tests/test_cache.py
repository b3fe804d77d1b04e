import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from attribute_with_cache import attribute
from models import TinyClassifier, classification_data, trainer
from torch.utils.data import DataLoader

from lightning_dtda import Influence, TrajectoryRecorder


def test_a_killed_attribution_resumes_without_recomputing_finished_runs(tmp_path):
    data = classification_data(n=48, dtype=torch.float64)
    for seed in range(4):
        pl.seed_everything(seed)
        trainer(tmp_path, [TrajectoryRecorder(tmp_path / "runs")], max_epochs=25, precision="64-true").fit(
            TinyClassifier(), DataLoader(data, batch_size=4, shuffle=True)
        )
    cache = tmp_path / "cache"
    script = Path(__file__).parent / "attribute_with_cache.py"
    job = subprocess.Popen([sys.executable, str(script), str(tmp_path / "runs"), str(cache)])
    deadline = time.monotonic() + 240
    while not list(cache.glob("seed_*.safetensors")) and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.01)
    job.send_signal(signal.SIGKILL)
    job.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in cache.glob("seed_*.safetensors")}
    assert 1 <= len(finished) < 4, "the job should be killed after its first run and before its last"

    resumed = attribute(tmp_path / "runs", cache)
    for name, stamp in finished.items():
        assert (cache / name).stat().st_mtime_ns == stamp  # loaded, not recomputed
    assert len(list(cache.glob("seed_*.safetensors"))) == 4
    fresh = attribute(tmp_path / "runs", None)
    assert torch.allclose(resumed.effects, fresh.effects, rtol=0, atol=1e-12)
    assert resumed.runs == fresh.runs


def test_the_cache_key_changes_with_the_settings_and_queries(tmp_path):
    from lightning_dtda import Attributor

    data = classification_data(n=16, dtype=torch.float64)
    pl.seed_everything(0)
    trainer(tmp_path, [TrajectoryRecorder(tmp_path / "runs")], max_epochs=1, precision="64-true").fit(
        TinyClassifier(), DataLoader(data, batch_size=4)
    )
    queries = classification_data(n=2, seed=1, dtype=torch.float64)
    for damping in (0.1, 0.2):
        Attributor(
            TinyClassifier,
            tmp_path / "runs",
            data,
            estimator=Influence(curvature="ggn", damping=damping),
            progress=False,
            cache_dir=tmp_path / "cache",
        ).attribute(queries)
    Attributor(
        TinyClassifier,
        tmp_path / "runs",
        data,
        estimator=Influence(curvature="ggn", damping=0.1),
        progress=False,
        cache_dir=tmp_path / "cache",
    ).attribute(classification_data(n=2, seed=2, dtype=torch.float64))
    assert len(list((tmp_path / "cache").glob("seed_0-influence-ggn-*.safetensors"))) == 3
    assert len(list((tmp_path / "cache").glob("seed_0-curvature-ggn-*.safetensors"))) == 1  # shared by all three


@pytest.mark.parametrize("curvature", ["ggn", "ekfac"])
def test_fitted_curvature_is_reused_for_new_queries_and_damping(tmp_path, monkeypatch, curvature):
    from curvlinops import EKFACLinearOperator, GGNLinearOperator

    from lightning_dtda import Attributor

    data = classification_data(n=16, dtype=torch.float64)
    pl.seed_everything(0)
    trainer(tmp_path, [TrajectoryRecorder(tmp_path / "runs")], max_epochs=2, precision="64-true").fit(
        TinyClassifier(), DataLoader(data, batch_size=4)
    )
    cache = tmp_path / "cache"

    def attribute(queries, damping, cache_dir):
        return Attributor(
            TinyClassifier,
            tmp_path / "runs",
            data,
            estimator=Influence(curvature=curvature, damping=damping),
            progress=False,
            cache_dir=cache_dir,
        ).attribute(queries)

    attribute(classification_data(n=2, seed=1, dtype=torch.float64), 0.1, cache)
    assert len(list(cache.glob(f"seed_0-curvature-{curvature}-*.safetensors"))) == 1

    def no_fitting(*args, **kwargs):
        raise AssertionError("the curvature was fitted again")

    new_queries = classification_data(n=3, seed=2, dtype=torch.float64)
    with monkeypatch.context() as patch:
        patch.setattr(GGNLinearOperator, "__init__", no_fitting)
        patch.setattr(EKFACLinearOperator, "compute_kronecker_factors", no_fitting)
        cached = attribute(new_queries, 0.3, cache)
    assert torch.allclose(cached.effects, attribute(new_queries, 0.3, None).effects, rtol=0, atol=1e-12)


def test_a_cached_dense_ggn_does_not_answer_a_krylov_request(tmp_path):
    from lightning_dtda import Attributor

    data = classification_data(n=16)
    pl.seed_everything(0)
    trainer(tmp_path, [TrajectoryRecorder(tmp_path / "runs")], max_epochs=1).fit(
        TinyClassifier(), DataLoader(data, batch_size=8)
    )
    for solver in ("dense", "krylov"):
        result = Attributor(
            TinyClassifier,
            tmp_path / "runs",
            data,
            Influence(curvature="ggn", damping=0.1, solver=solver),
            cache_dir=tmp_path / "cache",
            progress=False,
        ).attribute(data)
        assert ("cg_products" in result.settings["per_run"][0]) == (solver == "krylov")
