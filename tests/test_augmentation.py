"""Replayable augmentation: torchvision's random crops and flips on 8x8 digits, recorded through
``ReplayableAugmentation``, replay exactly (also with DataLoader workers), and the ground truth and
``Unrolled`` agree with Lightning's own retraining of the same seed."""

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from models import WeightedCNN, trainer
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision.transforms import v2

from lightning_dtda import (
    Attributor,
    Influence,
    ReplayableAugmentation,
    TrajectoryRecorder,
    Unrolled,
    UnsupportedTrainingError,
    leave_one_out_weights,
    load_runs,
    retrain,
)


class AugmentedDigits(Dataset):
    """``(crop [1, 6, 6], label, index)``: a random resized crop and a random flip of an 8x8 digit (0, 1 or 2)."""

    def __init__(self, n: int, offset: int = 0) -> None:
        digits = load_digits(n_class=3)
        self.x = torch.tensor(digits.images[offset : offset + n], dtype=torch.float64).unsqueeze(1) / 16
        self.y = torch.tensor(digits.target[offset : offset + n])
        self.transform = v2.Compose(
            [v2.RandomResizedCrop(6, scale=(0.5, 1.0), antialias=True), v2.RandomHorizontalFlip()]
        )

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.transform(self.x[i]), self.y[i], i


def queries() -> TensorDataset:
    digits = load_digits(n_class=3)
    x = torch.tensor(digits.images[100:106], dtype=torch.float64).unsqueeze(1)[..., 1:7, 1:7] / 16
    return TensorDataset(x, torch.tensor(digits.target[100:106]), torch.arange(6))


def fit(dirpath, data, workers=0, **hparams):
    pl.seed_everything(0)
    model = WeightedCNN(lr=0.1, **hparams)
    loader = DataLoader(data, batch_size=6, shuffle=True, num_workers=workers)
    trainer(
        dirpath, [TrajectoryRecorder(dirpath / "runs", every_n_train_steps=3)], max_epochs=2, precision="64-true"
    ).fit(model, loader)
    return model.eval()


def losses(model, data):
    x, y, _ = data.tensors
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("augmentation")
    data = ReplayableAugmentation(AugmentedDigits(24))
    return data, fit(tmp_path / "workers", data, workers=2), tmp_path


def test_the_views_training_drew_depend_on_the_seed_and_epoch_not_on_workers(recorded):
    data, with_workers, tmp_path = recorded
    [run] = load_runs(tmp_path / "workers" / "runs")
    assert run.manifest.augmentation == "replayable"
    keys = [step.augmentation for step in run.steps]
    assert all(k is not None and len(set(k)) == 1 for k in keys)  # one key per pass, on every micro-batch
    assert keys[0] != keys[-1]  # a new key in the second epoch: new views
    # The same seed without workers: the same keys, the same views, the same weights.
    in_process = fit(tmp_path / "in_process", data)
    for name, value in with_workers.state_dict().items():
        torch.testing.assert_close(in_process.state_dict()[name], value, rtol=1e-12, atol=1e-12)
    # Read without a key (training without a recorder), an item augments at random, as unwrapped.
    assert not torch.equal(data[3][0], data[3][0])


def test_retrain_replays_the_augmented_run_and_equals_lightning_retraining_of_the_same_seed(recorded):
    data, model, tmp_path = recorded
    truth = retrain(WeightedCNN, tmp_path / "workers" / "runs", data, queries(), leave_one_out_weights(24, [5, 18]))
    base = losses(model, queries())
    assert (truth.base[0] - base).abs().max() < 1e-10  # the replay lands on the recorded run
    for column, removed in enumerate((5, 18)):
        # Lightning's own retraining, same seed (recorded too: the recorder sends the augmentation keys).
        effect = losses(fit(tmp_path / f"loo_{removed}", data, removed=removed, weight=0.0), queries()) - base
        assert effect.abs().max() > 1e-3
        assert (truth.effects[0, :, column] - effect).abs().max() < 1e-10


def test_unrolled_is_the_derivative_of_the_augmented_ground_truth(recorded):
    data, _, tmp_path = recorded
    runs = tmp_path / "workers" / "runs"
    unrolled = Attributor(WeightedCNN, runs, data, Unrolled(), progress=False).attribute(queries())
    eps = 1e-6
    weights = torch.ones(2, 24, dtype=torch.float64)
    weights[0, 5] = weights[1, 18] = 1 - eps
    finite = retrain(WeightedCNN, runs, data, queries(), weights, progress=False).effects[0] / eps
    predicted = unrolled.effects[0][:, [5, 18]]
    assert predicted.abs().max() > 1e-3
    assert (predicted - finite).abs().max() / predicted.abs().max() < 1e-4
    # Influence reads the fixed views (no key): it attributes the same run as well.
    assert torch.isfinite(
        Attributor(WeightedCNN, runs, data, Influence("ggn"), progress=False).attribute(queries()).effects
    ).all()


def test_a_replay_without_the_wrapper_or_with_the_wrapper_inside_is_refused(recorded, tmp_path):
    data, _, recorded_path = recorded
    with pytest.raises(UnsupportedTrainingError, match="trained on a ReplayableAugmentation, and train_data"):
        retrain(
            WeightedCNN, recorded_path / "workers" / "runs", data.dataset, queries(), leave_one_out_weights(24, [1])
        )
    with pytest.raises(RuntimeError, match="Make the ReplayableAugmentation the DataLoader's dataset itself"):
        fit(tmp_path, Subset(data, range(12)))


def test_the_recorder_does_not_shift_the_random_numbers_training_draws(tmp_path):
    """Unwrapped augmentation draws from the global generators; the recorder's probe of the dataset (is it
    random?) puts them back, so training draws what it would draw without the recorder."""
    weights = []
    for recorder in ([TrajectoryRecorder(tmp_path / "runs")], []):
        pl.seed_everything(0)
        model = WeightedCNN(lr=0.1)
        trainer(tmp_path, recorder, max_epochs=1, precision="64-true").fit(
            model, DataLoader(AugmentedDigits(24), batch_size=6, shuffle=True)
        )
        weights.append(model.state_dict())
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=1e-12, atol=1e-12)


def test_every_pass_draws_new_views_also_when_lightning_reloads_the_loader(tmp_path):
    """reload_dataloaders_every_n_epochs makes a new loader (and sampler) each epoch: the run's pass count,
    not the sampler's, keys the views, so no two epochs repeat them."""
    data = ReplayableAugmentation(AugmentedDigits(12))
    datamodule = pl.LightningDataModule.from_datasets(data, batch_size=6)
    pl.seed_everything(0)
    recorder = [TrajectoryRecorder(tmp_path / "runs")]
    trainer(tmp_path, recorder, max_epochs=3, reload_dataloaders_every_n_epochs=1, precision="64-true").fit(
        WeightedCNN(lr=0.1), datamodule=datamodule
    )
    [run] = load_runs(tmp_path / "runs")
    keys = [step.augmentation[0] for step in run.steps]
    assert len(set(keys)) == 3  # one key per epoch, all different


def test_self_influence_on_augmented_runs_warns_that_an_unlucky_view_ranks_high(recorded):
    """Self-influence reads one fixed view per example: a new-user trial's top five were badly shifted views."""
    data, _, recorded_path = recorded
    attributor = Attributor(WeightedCNN, recorded_path / "workers" / "runs", data, progress=False)
    with pytest.warns(UserWarning, match="one fixed view: an example whose view is an unlucky one"):
        values = attributor.self_influence()
    assert values.effects.shape == (1, 24) and torch.isfinite(values.effects).all()
