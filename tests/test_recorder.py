import json
import logging
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from models import TinyClassifier, classification_data, trainer
from torch.utils.data import DataLoader

from lightning_dtda import TrajectoryRecorder, load_runs
from lightning_dtda.errors import UnfinishedRunError
from lightning_dtda.runs.trajectory import Trajectory


def replay_sgd(run, dataset):
    """Plain SGD from the step-0 snapshot with the recorded membership and learning rates."""
    model = TinyClassifier(**run.manifest.hparams)
    model.load_state_dict(run.state_dict(0))
    accumulate = run.manifest.accumulate_grad_batches
    x_all, y_all = dataset.tensors
    for step in run.steps:
        model.zero_grad()
        for idx in step.micro_batches:
            (F.cross_entropy(model(x_all[idx]), y_all[idx]) / accumulate).backward()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(p.grad, alpha=-step.lrs[0])
    return model.state_dict()


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def fit(tmp_path, loader, recorder, seed=0, datamodule=None, **kwargs):
    pl.seed_everything(seed)
    model = TinyClassifier()
    trainer(tmp_path, [recorder], **kwargs).fit(model, loader, datamodule=datamodule)
    return model


@pytest.mark.parametrize("accumulate", [1, 2])
def test_replay_reproduces_final_weights(tmp_path, accumulate):
    data = classification_data(n=37)  # 37 = 4 full batches of 8 and a partial one
    loader = DataLoader(data, batch_size=8, shuffle=True)
    model = fit(
        tmp_path, loader, TrajectoryRecorder(tmp_path / "runs"), max_epochs=3, accumulate_grad_batches=accumulate
    )
    [run] = load_runs(tmp_path / "runs")
    assert run.name == "seed_0" and run.seed == 0
    assert run.final_step == len(run.steps) == 3 * (5 if accumulate == 1 else 3)
    # shuffle=True: every epoch is a permutation of the dataset, and epochs differ
    epochs = torch.cat([m for s in run.steps for m in s.micro_batches]).split(37)
    assert all(sorted(e.tolist()) == list(range(37)) for e in epochs)
    assert not torch.equal(epochs[0], epochs[1])
    # no random op in the forward: no random state kept, one (empty) entry per micro-batch
    assert all(len(s.rng) == len(s.micro_batches) and not any(s.rng) for s in run.steps)
    final = run.state_dict()
    assert max_diff(final, model.state_dict()) == 0
    assert max_diff(replay_sgd(run, data), final) < 1e-6


@pytest.mark.parametrize("workers", [0, 1])
def test_dataloaders_reloaded_every_epoch_are_recorded(tmp_path, workers):
    """reload_dataloaders_every_n_epochs makes a new loader (and sampler) each epoch: each is followed."""
    data = classification_data(n=20)
    datamodule = pl.LightningDataModule.from_datasets(data, batch_size=8, num_workers=workers)
    fit(
        tmp_path,
        None,
        TrajectoryRecorder(tmp_path / "runs"),
        datamodule=datamodule,
        max_epochs=3,
        reload_dataloaders_every_n_epochs=1,
    )
    [run] = load_runs(tmp_path / "runs")
    epochs = torch.cat([m for s in run.steps for m in s.micro_batches]).split(20)
    assert len(epochs) == 3 and all(sorted(e.tolist()) == list(range(20)) for e in epochs)
    assert max_diff(replay_sgd(run, data), run.state_dict()) < 1e-6


def test_replay_with_workers_and_step_snapshots(tmp_path):
    # With workers the loader draws indices before on_train_start; the recorder must see them all.
    data = classification_data(n=32)
    loader = DataLoader(data, batch_size=8, shuffle=True, num_workers=1)
    fit(tmp_path, loader, TrajectoryRecorder(tmp_path / "runs", every_n_train_steps=3), max_epochs=2)
    [run] = load_runs(tmp_path / "runs")
    assert run.snapshot_steps == [0, 3, 6, 8]
    assert max_diff(replay_sgd(run, data), run.state_dict()) < 1e-6


def test_resume_from_checkpoint_continues_the_run(tmp_path):
    data = classification_data(n=32)
    loader = DataLoader(data, batch_size=8, shuffle=True)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    pl.seed_everything(0)
    trainer(tmp_path, [TrajectoryRecorder(tmp_path / "runs"), ckpt], max_epochs=2, enable_checkpointing=True).fit(
        TinyClassifier(), loader
    )
    # the first job's process is gone (a dead pid): the resumed run must read as this process's, in progress
    manifest_path = tmp_path / "runs" / "seed_0" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    manifest["writer"]["pid"] = dead.pid
    manifest.pop("sha256")  # edited by hand: without its checksum, as a manifest before 0.3
    manifest_path.write_text(json.dumps(manifest))
    statuses = []

    class Status(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            statuses.append(Trajectory(tmp_path / "runs" / "seed_0").status)

    pl.seed_everything(1)  # a resumed job need not share the first one's random state
    model = TinyClassifier()
    trainer(
        tmp_path,
        [TrajectoryRecorder(tmp_path / "runs"), ModelCheckpoint(dirpath=tmp_path / "ckpt2"), Status()],
        max_epochs=4,
        enable_checkpointing=True,
    ).fit(model, loader, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert statuses == ["in progress", "in progress"]
    [run] = load_runs(tmp_path / "runs")
    assert run.snapshot_steps == [0, 4, 8, 12, 16]
    assert run.manifest.complete
    assert max_diff(run.state_dict(), model.state_dict()) == 0
    assert max_diff(replay_sgd(run, data), run.state_dict()) < 1e-6


def test_refuses_to_overwrite_a_recorded_run(tmp_path):
    loader = DataLoader(classification_data(n=16), batch_size=8)
    fit(tmp_path, loader, TrajectoryRecorder(tmp_path / "runs"), max_epochs=1)
    with pytest.raises(RuntimeError, match="already holds a recorded run"):
        fit(tmp_path, loader, TrajectoryRecorder(tmp_path / "runs"), max_epochs=1)


def test_manifest_describes_the_run(tmp_path):
    data = classification_data(n=16)
    fit(
        tmp_path, DataLoader(data, batch_size=8, shuffle=True), TrajectoryRecorder(tmp_path / "r"), seed=3, max_epochs=1
    )
    manifest = json.loads((tmp_path / "r" / "seed_3" / "manifest.json").read_text())
    import hashlib
    import inspect

    from models import TinyClassifier

    digest = lambda text: hashlib.sha256(text.encode()).hexdigest()[:16]  # noqa: E731
    assert manifest["module"] == {
        "class": "models.TinyClassifier",
        "hparams": {"d_in": 6, "hidden": 8, "classes": 3, "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0},
        "fingerprint": {
            "structure": digest(repr(TinyClassifier())),
            "source": digest(inspect.getsource(TinyClassifier)),
            "dropout": "{}",  # no dropout layer
        },
    }
    assert manifest["dataset"]["length"] == 16
    assert manifest["optimizer"]["class"] == "torch.optim.sgd.SGD"
    assert manifest["optimizer"]["param_groups"][0]["lr"] == 0.1
    assert manifest["batch_size"] == 8 and manifest["batches_per_epoch"] == 2
    assert [s["step"] for s in manifest["snapshots"]] == [0, 2]


def test_interval_arguments_are_validated():
    with pytest.raises(ValueError, match="not both"):
        TrajectoryRecorder("x", every_n_train_steps=1, every_n_epochs=1)
    with pytest.raises(ValueError, match="every_n_epochs must be a positive integer, got 0"):
        TrajectoryRecorder("x", every_n_epochs=0)


def test_custom_batch_sampler_is_refused_with_advice(tmp_path):
    from torch.utils.data import BatchSampler, SequentialSampler

    class MyBatches(BatchSampler):
        def __iter__(self):
            yield from super().__iter__()

    data = classification_data(n=16)
    loader = DataLoader(data, batch_sampler=MyBatches(SequentialSampler(data), 4, False))
    with pytest.raises(RuntimeError, match="instead of a custom batch_sampler"):
        fit(tmp_path, loader, TrajectoryRecorder(tmp_path / "runs"), max_epochs=1)


def test_a_run_that_raised_is_abandoned_keeps_its_last_step_and_is_refused_with_advice(tmp_path):
    class Crashes(TinyClassifier):
        def training_step(self, batch, batch_idx):
            if self.global_step == 6:
                raise RuntimeError("the job dies")
            return super().training_step(batch, batch_idx)

    data = classification_data(n=16)
    pl.seed_everything(0)
    model = Crashes()
    with pytest.raises(RuntimeError, match="the job dies"):
        # snapshots every 4 steps: steps 5 and 6 are kept by the snapshot the recorder takes when training raises
        trainer(tmp_path, [TrajectoryRecorder(tmp_path / "runs")], max_epochs=2).fit(
            model, DataLoader(data, batch_size=4, shuffle=True)
        )
    assert sorted(p.name for p in (tmp_path / "runs" / "seed_0" / "snapshots").iterdir()) == [
        "step_00000000.safetensors",
        "step_00000004.safetensors",
        "step_00000006.safetensors",
    ]
    with pytest.raises(
        UnfinishedRunError,
        match=r"seed_0: abandoned \(training stopped: RuntimeError: the job dies\), latest listed "
        r"snapshot at step 6\n.*, unfinished=True\) as the Attributor's runs",
    ):
        load_runs(tmp_path / "runs")
    with pytest.warns(
        UserWarning,
        match=r"Pooling runs that have not finished, at their latest snapshot: seed_0 \(step 6, abandoned\)",
    ):
        [run] = load_runs(tmp_path / "runs", unfinished=True)
    assert run.status == "abandoned" and run.snapshot_steps == [0, 4, 6] and len(run.steps) == 6
    assert (
        max_diff(run.state_dict(), model.state_dict()) == 0 and max_diff(replay_sgd(run, data), run.state_dict()) < 1e-6
    )


def test_a_from_datasets_datamodule_fitted_twice_records_two_runs(tmp_path):
    data = classification_data(n=16)
    dm = pl.LightningDataModule.from_datasets(train_dataset=data, batch_size=4)
    for seed in (0, 1):
        fit(tmp_path, None, TrajectoryRecorder(tmp_path / "runs"), seed=seed, max_epochs=1, datamodule=dm)
    assert [run.name for run in load_runs(tmp_path / "runs")] == ["seed_0", "seed_1"]
    assert "train_dataloader" in vars(dm) and not getattr(dm.train_dataloader, "__dtda_recording__", False)


def test_train_seeds_with_a_datamodule(tmp_path):
    from lightning_dtda import train_seeds

    dm = pl.LightningDataModule.from_datasets(train_dataset=classification_data(n=16), batch_size=4)
    train_seeds(
        TinyClassifier,
        dm,
        tmp_path / "runs",
        seeds=[0, 1],
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    assert [(run.name, run.status) for run in load_runs(tmp_path / "runs")] == [
        ("seed_0", "finished"),
        ("seed_1", "finished"),
    ]


def test_state_dict_writes_nothing_and_two_recorders_keep_their_own_state(tmp_path):
    class Probe(pl.Callback):
        """Calls the first recorder's state_dict mid-training and notes whether any file changed."""

        def on_train_epoch_end(self, trainer, pl_module):
            files = {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*")}
            self.state = trainer.callbacks[0].state_dict()
            self.unchanged = files == {p: p.stat().st_mtime_ns for p in (tmp_path / "a").rglob("*")}

    data = classification_data(n=16)
    loader = DataLoader(data, batch_size=4, shuffle=True)
    probe = Probe()
    recorders = [TrajectoryRecorder(tmp_path / "a"), TrajectoryRecorder(tmp_path / "b", every_n_train_steps=2)]
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    pl.seed_everything(0)
    trainer(tmp_path, [*recorders, probe, ckpt], max_epochs=2, enable_checkpointing=True).fit(TinyClassifier(), loader)
    assert probe.unchanged and probe.state["run_dir"] == str(tmp_path / "a" / "seed_0")
    assert recorders[0].state_key != recorders[1].state_key
    [a], [b] = load_runs(tmp_path / "a"), load_runs(tmp_path / "b")
    assert a.snapshot_steps == [0, 4, 8] and b.snapshot_steps == [0, 2, 4, 6, 8]
    assert [m.tolist() for s in a.steps for m in s.micro_batches] == [
        m.tolist() for s in b.steps for m in s.micro_batches
    ]
    # Resuming restores each recorder's own state: both runs continue to step 16.
    model = TinyClassifier()
    resumed = [TrajectoryRecorder(tmp_path / "a"), TrajectoryRecorder(tmp_path / "b", every_n_train_steps=2)]
    trainer(
        tmp_path, [*resumed, ModelCheckpoint(dirpath=tmp_path / "ckpt2")], max_epochs=4, enable_checkpointing=True
    ).fit(model, loader, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    [a], [b] = load_runs(tmp_path / "a"), load_runs(tmp_path / "b")
    assert a.snapshot_steps == [0, 4, 8, 12, 16] and b.snapshot_steps == [0, 2, 4, 6, 8, 10, 12, 14, 16]
    assert (
        max_diff(replay_sgd(a, data), model.state_dict()) < 1e-6 and max_diff(b.state_dict(), model.state_dict()) == 0
    )


def test_a_run_in_progress_is_never_pooled_silently(tmp_path):
    class Loads(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.callbacks[0].write_manifest()
            with pytest.raises(
                UnfinishedRunError,
                match=r"seed_1: in progress \(recorded by process \d+ on .*\), latest listed snapshot at step 4",
            ):
                load_runs(tmp_path / "runs")
            self.pooled = [(run.name, run.status) for run in load_runs(tmp_path / "runs", unfinished=True)]

    loader = DataLoader(classification_data(n=16), batch_size=4, shuffle=True)
    fit(tmp_path, loader, TrajectoryRecorder(tmp_path / "runs"), seed=0, max_epochs=1)
    probe = Loads()
    pl.seed_everything(1)
    trainer(tmp_path, [TrajectoryRecorder(tmp_path / "runs"), probe], max_epochs=1).fit(TinyClassifier(), loader)
    assert probe.pooled == [("seed_0", "finished"), ("seed_1", "in progress")]
    assert [run.status for run in load_runs(tmp_path / "runs")] == ["finished", "finished"]


def test_steps_not_yet_in_a_snapshot_survive_a_checkpoint(tmp_path):
    """The writer's state (in every Lightning checkpoint) keeps the steps since the last snapshot, and a
    resumed writer encodes them as the original would."""
    from lightning_dtda.record.writer import RunWriter
    from lightning_dtda.runs.format import decode_steps, encode_steps

    writer = RunWriter(tmp_path, "run", save_optimizer_state=False)
    writer.run_dir = tmp_path / "run"
    state = torch.get_rng_state()
    writer.add_step([[0, 3], [5]], [{"lr": 0.1, "momentum": 0.9}], [{"cpu": state}, {}], False)
    writer.add_step([[1, 2]], [{"lr": 0.05, "momentum": 0.8}], [{}], True)
    resumed = RunWriter(tmp_path, "run", save_optimizer_state=False)
    assert resumed.load_state_dict(writer.state_dict())
    assert resumed.next_step == writer.next_step == 2
    (first, original), (_, restored) = (decode_steps(encode_steps(0, w.pending_steps, 1)) for w in (writer, resumed))
    assert first == 0 and [s.skipped for s in restored] == [False, True]
    for a, b in zip(original, restored):
        assert a.lrs == b.lrs and a.scheduled == b.scheduled
        assert all(torch.equal(x, y) for x, y in zip(a.micro_batches, b.micro_batches))
    assert torch.equal(restored[0].rng[0]["cpu"], state)


def test_a_failing_disk_stops_recording_but_never_training(tmp_path, monkeypatch):
    """Writing the run is an add-on: an OSError (a full disk) at a snapshot warns once, stops recording and
    marks the run stopped; training runs to its end."""
    import errno

    import lightning_dtda.runs.format as run_format
    from lightning_dtda import load_runs

    save_tree, calls = run_format.save_tree, []

    def disk_fills(tree, path, **kwargs):
        calls.append(path)
        if len(calls) > 2:  # the step-0 snapshot and one more fit
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return save_tree(tree, path, **kwargs)

    monkeypatch.setattr(run_format, "save_tree", disk_fills)
    model = TinyClassifier()
    with pytest.warns(
        UserWarning, match=r"TrajectoryRecorder stopped recording .*No space left on device.*Training goes on"
    ):
        trainer(tmp_path, [TrajectoryRecorder(tmp_path / "runs", every_n_train_steps=2)], max_epochs=4).fit(
            model, DataLoader(classification_data(n=16), batch_size=4)
        )
    assert model.trainer.current_epoch == 4 and model.trainer.global_step == 16  # training was not cut short
    assert len(calls) == 3  # recording stopped at the first failure
    with pytest.raises(
        UnfinishedRunError, match=r"_\d+: abandoned \(recording failed: OSError: \[Errno 28\] No space left"
    ):
        load_runs(tmp_path / "runs")
    [run] = load_runs(tmp_path / "runs", unfinished=True)
    assert run.status == "abandoned" and run.snapshot_steps == [0, 2]


def test_a_sampler_replaced_behind_the_recorders_back_stops_recording_but_never_training(tmp_path):
    """Batches the recorder cannot tell the examples of are never recorded: it warns, stops recording and
    marks the run stopped; training runs to its end."""
    from lightning_dtda import load_runs

    class ReplaceSampler(pl.Callback):  # after the recorder's own epoch-start hook
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                trainer.train_dataloader.batch_sampler.sampler = torch.utils.data.SequentialSampler(range(16))

    model = TinyClassifier()
    with pytest.warns(UserWarning, match=r"stopped recording .*found no sampled indices for batch 0.*Training goes on"):
        trainer(tmp_path, [TrajectoryRecorder(tmp_path / "runs"), ReplaceSampler()], max_epochs=3).fit(
            model, DataLoader(classification_data(n=16), batch_size=4, shuffle=True)
        )
    assert model.trainer.global_step == 12  # training was not cut short
    [run] = load_runs(tmp_path / "runs", unfinished=True)
    assert run.status == "abandoned" and len(run.steps) == 4  # the first epoch, recorded before the sampler changed


def test_a_disk_that_fills_up_stops_recording_but_never_training(tmp_path):
    """The same on a real full disk: a 96 KiB tmpfs (skipped where mounting one is not allowed)."""
    from lightning_dtda import load_runs

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not allowed here")
    try:
        model = TinyClassifier()
        with pytest.warns(UserWarning, match=r"TrajectoryRecorder stopped recording .*No space left on device"):
            trainer(tmp_path, [TrajectoryRecorder(disk / "runs", every_n_train_steps=1)], max_epochs=6).fit(
                model, DataLoader(classification_data(n=40), batch_size=2)
            )
        assert model.trainer.global_step == 120  # every step of every epoch
        # The disk had no room left for the manifest to say so either; the run is still never taken for finished.
        with pytest.raises(UnfinishedRunError, match="holds runs that have not finished"):
            load_runs(disk / "runs")
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_the_checkpoint_a_user_keeps_is_snapshotted_and_attributed(tmp_path, caplog):
    """Every checkpoint ModelCheckpoint saves is snapshotted and its best is noted; Attributor(snapshot="best")
    attributes those weights (against the dense-GGN oracle at the checkpoint's own weights)."""
    from oracles import dense_ggn_effects

    from lightning_dtda import Attributor, Influence, Unrolled, load_runs

    class Validated(TinyClassifier):
        def validation_step(self, batch, batch_idx):  # a score that makes epoch 1 the best, whatever the losses
            self.log("score", float(self.current_epoch == 1))

    data, queries = (
        classification_data(n=24, dtype=torch.float64),
        classification_data(n=3, seed=1, dtype=torch.float64),
    )
    checkpoint = ModelCheckpoint(tmp_path / "checkpoints", monitor="score", mode="max", save_top_k=1)
    pl.seed_everything(0)
    recorder = TrajectoryRecorder(tmp_path / "runs", every_n_epochs=100)  # snapshots at checkpoints only
    trainer(tmp_path, [recorder, checkpoint], max_epochs=4, precision="64-true", enable_checkpointing=True).fit(
        Validated(lr=0.3),
        DataLoader(data, batch_size=6),
        DataLoader(classification_data(n=8, seed=2, dtype=torch.float64)),
    )
    kept = torch.load(checkpoint.best_model_path, weights_only=True)
    [run] = load_runs(tmp_path / "runs")
    # step 0, the checkpoints saved (epochs 0 and 1; later epochs do not improve, so none is saved), the end
    assert run.snapshot_steps == [0, 4, 8, 16]
    assert run.manifest.best_step == kept["global_step"] == 8  # the end of epoch 1, not the final weights
    best = run.snapshot_steps.index(run.manifest.best_step)
    assert all(torch.equal(v, kept["state_dict"][k]) for k, v in run.state_dict(best).items())
    result = Attributor(
        Validated, run.path.parent, data, Influence("ggn", damping=0.1), progress=False, snapshot="best"
    )
    attributed = result.attribute(queries)
    assert attributed.settings["snapshot"] == "best" and attributed.settings["snapshot_steps"] == [8]
    effects = attributed.effects[0]
    model = Validated(lr=0.3).double()
    model.load_state_dict(kept["state_dict"])
    expected = dense_ggn_effects(model, *data.tensors, *queries.tensors, 0.1)[0]
    assert (effects - expected).abs().max() < 1e-6 * expected.abs().max()
    # Unrolled replays the run up to the kept weights, and the result says which snapshots it used.
    unrolled = Attributor(Validated, run.path.parent, data, Unrolled(), progress=False, snapshot=8).attribute(queries)
    assert unrolled.settings["snapshot_steps"] == [8] and torch.isfinite(unrolled.effects).all()
    with pytest.raises(ValueError, match=r"no snapshot at step 5; its snapshots are at steps \[0, 4, 8, 16\]"):
        Attributor(Validated, run.path.parent, data, snapshot=5)
    # The final weights are not the kept ones: attributing them says so, and where the kept ones are.
    with caplog.at_level(logging.INFO):
        Attributor(Validated, run.path.parent, data, progress=False)
    assert "best checkpoint is elsewhere in seed_0 (step 8 of 16). snapshot='best' attributes" in caplog.text


def test_a_checkpoint_saved_inside_an_accumulated_step_is_not_snapshotted(tmp_path):
    """Validation after an odd number of micro-batches with accumulate_grad_batches=2: batch norm already
    holds a forward of the next step, which no snapshot at the current step may hold (its replay refused)."""
    from replay_cases import FeatureModule
    from test_replay_matrix import images

    from lightning_dtda import Attributor, Unrolled, load_runs

    data = images(40, 0)
    checkpoint = ModelCheckpoint(tmp_path / "checkpoints", monitor="val_loss", save_top_k=-1)
    pl.seed_everything(0)
    trainer(
        tmp_path,
        [TrajectoryRecorder(tmp_path / "runs"), checkpoint],
        max_epochs=2,
        accumulate_grad_batches=2,
        val_check_interval=5,  # after micro-batches 5 and 10 of each epoch: 5 is inside a step
        enable_checkpointing=True,
    ).fit(FeatureModule("adamw"), DataLoader(data, batch_size=4), DataLoader(images(8, 1), batch_size=8))
    [run] = load_runs(tmp_path / "runs")
    assert run.snapshot_steps == [0, 5, 10]  # the checkpoints at steps 2.5 and 7.5 have no snapshot
    result = Attributor(FeatureModule, tmp_path / "runs", data, Unrolled(), progress=False).attribute(images(2, 2))
    assert torch.isfinite(result.effects).all()


def test_a_dataloader_given_as_train_data_says_to_pass_its_dataset(tmp_path):
    from lightning_dtda import Attributor

    data = classification_data(n=8)
    pl.seed_everything(0)
    trainer(tmp_path, [TrajectoryRecorder(tmp_path / "runs")], max_epochs=1).fit(
        TinyClassifier(), DataLoader(data, batch_size=4)
    )
    with pytest.raises(TypeError, match=r"train_data is a DataLoader; pass its dataset \(train_loader.dataset\)"):
        Attributor(TinyClassifier, tmp_path / "runs", DataLoader(data, batch_size=4))


def test_a_learning_rate_finder_beside_the_recorder(tmp_path):
    """LearningRateFinder saves and restores its own checkpoint before training begins (the recorder, with no
    run yet, raised there and cost the user their fit); the run recorded is the training after it."""
    from lightning.pytorch.callbacks import LearningRateFinder

    model = TinyClassifier()
    pl.seed_everything(0)
    finder = LearningRateFinder(min_lr=1e-3, max_lr=0.5, num_training_steps=5)
    trainer(tmp_path, [finder, TrajectoryRecorder(tmp_path / "runs")], max_epochs=2).fit(
        model, DataLoader(classification_data(n=16), batch_size=4, shuffle=True)
    )
    [run] = load_runs(tmp_path / "runs")
    assert run.snapshot_steps == [0, 4, 8]
    final = run.state_dict(-1)
    assert all(torch.equal(final[k], v) for k, v in model.state_dict().items())


def test_a_training_set_that_changes_at_a_reload_stops_recording_but_never_training(tmp_path):
    """A DataModule reloaded every epoch whose set shrinks (hard-example mining): the recorded indices would name
    examples of another set (a new-user trial: a bare IndexError in retrain, effects of the wrong shape from
    Influence). The recorder stops and says why; training runs to its end."""
    data = classification_data(n=16)

    class Shrinking(pl.LightningDataModule):
        def train_dataloader(self):
            kept = data if self.trainer.current_epoch == 0 else torch.utils.data.Subset(data, range(8))
            return DataLoader(kept, batch_size=4, shuffle=True)

    model = TinyClassifier()
    with pytest.warns(UserWarning, match=r"stopped recording .*the training set changed from 16 to 8 examples"):
        trainer(
            tmp_path, [TrajectoryRecorder(tmp_path / "runs")], max_epochs=3, reload_dataloaders_every_n_epochs=1
        ).fit(model, datamodule=Shrinking())
    assert model.trainer.global_step == 8  # 4 steps, then 2 and 2
    [run] = load_runs(tmp_path / "runs", unfinished=True)
    assert run.status == "abandoned" and run.snapshot_steps == [0, 4]


class ManualSteps(TinyClassifier):
    """Manual optimization with ``steps`` optimizer steps per batch: 2, or 0.5 (its own accumulation over two)."""

    def __init__(self, steps: float = 1):
        super().__init__()
        self.steps = steps
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        for _ in range(max(1, int(self.steps))):
            self.manual_backward(F.cross_entropy(self(batch[0]), batch[1]) * min(1.0, self.steps))
            if self.steps >= 1 or batch_idx % 2 == 1:
                optimizer.step()
                optimizer.zero_grad()


@pytest.mark.parametrize(
    ("steps", "said", "global_step"),
    [
        (2, r"training_step stepped the optimizer 2 times in one batch \(step 2\) under manual optimization", 8),
        (0.5, r"training_step did not step the optimizer \(batch 0\) under manual optimization", 2),
    ],
)
def test_manual_optimization_other_than_one_step_a_batch_stops_recording_at_once(tmp_path, steps, said, global_step):
    """Two steps in one batch, or the module's own accumulation (whose loss scaling no replay can know; a new-user
    trial: refused only after the first snapshot interval, as a mismatch): the recorder stops at once, saying
    what manual optimization did rather than asking for a bug report; training goes on."""
    model = ManualSteps(steps)
    with pytest.warns(UserWarning, match=said):
        trainer(tmp_path, [TrajectoryRecorder(tmp_path / "runs")], max_epochs=1).fit(
            model, DataLoader(classification_data(n=16), batch_size=4)
        )
    assert model.trainer.global_step == global_step
    [run] = load_runs(tmp_path / "runs", unfinished=True)
    assert run.status == "abandoned"
