import re
import shutil
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from models import RecipeCNN, TinyClassifier, WeightedCNN, classification_data, fit_weighted_cnn, image_data, trainer
from scipy.stats import spearmanr
from torch.utils.data import DataLoader, TensorDataset

from lightning_dtda import (
    AttributionResult,
    Attributor,
    Influence,
    QuerySpearman,
    UnsupportedTrainingError,
    leave_one_out_weights,
    load_runs,
    random_subset_weights,
    retrain,
    train_seeds,
)
from lightning_dtda.model.instantiate import instantiate
from lightning_dtda.replay.engine import replay
from lightning_dtda.results.retraining import Retraining


class WeightedClassifier(TinyClassifier):
    """Trains on (x, y, index) batches with a per-example loss weight: Lightning's own leave-one-out."""

    def __init__(self, removed: int = -1, **hparams):
        super().__init__(**hparams)
        self.removed = removed

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        weight = (index != self.removed).to(x.dtype)
        return (F.cross_entropy(self(x), y, reduction="none") * weight).mean()

    def attribution_inputs_targets(self, batch):
        return batch[0], batch[1]


HPARAMS = dict(hidden=5, lr=0.2, momentum=0.9, weight_decay=1e-2)


def indexed_data(n=24):
    x, y = classification_data(n=n, dtype=torch.float64).tensors
    return TensorDataset(x, y, torch.arange(n))


def fit(tmp_path, make_module, data, seed, recorder=True, epochs=3):
    from lightning_dtda import TrajectoryRecorder

    pl.seed_everything(seed)  # before building the module: the seed fixes the initialisation too
    module = make_module()
    callbacks = [TrajectoryRecorder(tmp_path / "runs")] if recorder else []
    trainer(tmp_path, callbacks, max_epochs=epochs, precision="64-true").fit(
        module, DataLoader(data, batch_size=5, shuffle=True)
    )
    return module


def lightning_leave_one_out(tmp_path, data, removed, epochs=3):
    """Lightning's own retraining of seed 3 with example ``removed``'s loss weighted 0."""
    return fit(
        tmp_path, lambda: WeightedClassifier(removed=removed, **HPARAMS), data, seed=3, recorder=False, epochs=epochs
    )


def test_replay_leave_one_out_equals_lightning_retraining_with_the_same_seed(tmp_path):
    data = indexed_data()
    fit(tmp_path, lambda: WeightedClassifier(**HPARAMS), data, seed=3)
    [run] = load_runs(tmp_path / "runs")
    model = instantiate(WeightedClassifier, run, 0)
    weights = torch.cat([torch.ones(1, 24), leave_one_out_weights(24, [7, 11])])
    replayed = replay(model, run, data, weights)
    final = run.state_dict()
    # weight 1 everywhere is exactly the recorded run
    assert max((t[0] - final[n]).abs().max().item() for n, t in replayed.items()) < 1e-12
    for row, removed in ((1, 7), (2, 11)):
        lightning_loo = lightning_leave_one_out(tmp_path, data, removed)
        expected = dict(lightning_loo.named_parameters())
        assert max((t[row] - expected[n]).abs().max().item() for n, t in replayed.items()) < 1e-12
        assert max((t[row] - final[n]).abs().max().item() for n, t in replayed.items()) > 1e-4


def test_retrain_at_a_snapshot_equals_lightning_retraining_stopped_there(tmp_path):
    """retrain(snapshot=step) is the ground truth for Attributor(snapshot=step): Lightning's own leave-one-out
    retraining with the same seed, stopped at that step (here the second of three epochs)."""
    data, queries = indexed_data(), classification_data(n=3, seed=1, dtype=torch.float64)
    fit(tmp_path, lambda: WeightedClassifier(**HPARAMS), data, seed=3)
    [run] = load_runs(tmp_path / "runs")
    assert run.snapshot_steps == [0, 5, 10, 15]
    weights = leave_one_out_weights(24, [7, 11])
    truth = retrain(WeightedClassifier, [run], data, queries, weights, snapshot=10, progress=False)
    final = retrain(WeightedClassifier, [run], data, queries, weights, progress=False)
    for column, removed in enumerate((7, 11)):
        lightning = lightning_leave_one_out(tmp_path, data, removed, epochs=2).eval()
        with torch.no_grad():
            expected = F.cross_entropy(lightning(queries.tensors[0]), queries.tensors[1], reduction="none")
        assert (truth.retrained[0, :, column] - expected).abs().max() < 1e-12
        assert (final.retrained[0, :, column] - expected).abs().max() > 1e-4  # the step matters
    with pytest.raises(ValueError, match=r"no snapshot at step 7; its snapshots are at steps \[0, 5, 10, 15\]"):
        retrain(WeightedClassifier, [run], data, queries, weights, snapshot=7, progress=False)


def test_retraining_a_cnn_with_dropout_batch_norm_and_clipping_equals_lightning_retraining(tmp_path):
    data, queries = image_data(24, dtype=torch.float64), image_data(3, seed=1, dtype=torch.float64)
    fit_weighted_cnn(tmp_path, data)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="retrain: .* rounding")  # float64: rounding decides nothing
        truth = retrain(
            WeightedCNN, tmp_path / "runs", data, queries, leave_one_out_weights(24, [5, 18]), progress=False
        )
    assert truth.rounding.shape == (1, 3, 2) and 0 < truth.rounding.max() < 1e-9 * truth.effects.abs().max()
    assert not truth.decided.any()
    for column, removed in enumerate((5, 18)):
        lightning = fit_weighted_cnn(tmp_path, data, recorder=False, removed=removed, weight=0.0).eval()
        with torch.no_grad():
            expected = F.cross_entropy(lightning(queries.tensors[0]), queries.tensors[1], reduction="none")
        assert (truth.retrained[0, :, column] - expected).abs().max() < 1e-12
        assert (truth.effects[0, :, column]).abs().max() > 1e-3  # removing the example did change the queries


def test_retraining_gives_one_ground_truth_however_the_rows_are_chunked(tmp_path):
    """Every chunk of weightings is replayed beside the recorded run and checked against its snapshots (a batch
    of another size can take other kernels): in float32 the same weightings retrained two and three at a time,
    and one at a time, give the same ground truth up to rounding."""
    data, queries = image_data(24), image_data(3, seed=1)
    fit_weighted_cnn(tmp_path, data, precision="32-true")
    weights = leave_one_out_weights(24, [2, 9, 17])  # with the base row: chunks of 2 + 2 + 2, or 3 + 2
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="retrain: .* replayed together")  # each k as asked, no fallback
        truths = [
            retrain(WeightedCNN, tmp_path / "runs", data, queries, weights, models_per_pass=k, progress=False)
            for k in (1, 2, 3)
        ]
    scale = truths[0].effects.abs().max()
    assert scale > 1e-3
    for truth in truths[1:]:
        assert (truth.base - truths[0].base).abs().max() <= 1e-5 * truths[0].base.abs().max()
        assert (truth.effects - truths[0].effects).abs().max() <= 1e-5 * scale


def test_the_ground_truth_of_the_recipe_users_train_equals_lightning_retraining(tmp_path):
    """AdamW with a per-step warm-up cosine schedule, clipping, accumulation 2 (a ragged last batch),
    BatchNorm, dropout and EarlyStopping, in float32: retrain's base is the run, and its leave-one-out
    effects are Lightning's own retraining with the example's loss weight 0."""
    from lightning.pytorch.callbacks import EarlyStopping

    from lightning_dtda import TrajectoryRecorder

    data, queries = image_data(26), image_data(6, seed=1)

    def fit_recipe(recorder: bool, **hparams):
        pl.seed_everything(0)
        model = RecipeCNN(lr=0.05, dropout=0.2, **hparams)
        callbacks = [EarlyStopping("val_loss", patience=0, min_delta=10.0)]  # stops after the second epoch
        callbacks += [TrajectoryRecorder(tmp_path / "runs", every_n_train_steps=2)] if recorder else []
        trainer(tmp_path, callbacks, max_epochs=5, gradient_clip_val=1.0, accumulate_grad_batches=2).fit(
            model, DataLoader(data, batch_size=4, shuffle=True), DataLoader(queries, batch_size=6)
        )
        return model.eval()

    def losses(model):
        with torch.no_grad():
            return F.cross_entropy(model(queries.tensors[0]), queries.tensors[1], reduction="none")

    recorded = fit_recipe(recorder=True)
    [run] = load_runs(tmp_path / "runs")
    assert run.final_step == 8  # two epochs of 7 batches, accumulated in pairs (the last alone)
    # A removal may move the epoch EarlyStopping stops at, which no replay follows: refused unless asked for.
    assert run.manifest.early_stopping == ("EarlyStopping(monitor='val_loss', patience=0, min_delta=10, mode='min')",)
    with pytest.raises(
        UnsupportedTrainingError, match=r"retrain cannot follow a validation metric: seed_0 \(EarlyStopping"
    ):
        retrain(RecipeCNN, tmp_path / "runs", data, queries, leave_one_out_weights(26, [4, 17]), progress=False)
    # Here it stops after the second epoch whatever the data (min_delta=10), so runs of the recorded length are
    # what Lightning retrains.
    truth = retrain(
        RecipeCNN,
        tmp_path / "runs",
        data,
        queries,
        leave_one_out_weights(26, [4, 17]),
        progress=False,
        as_recorded=True,
    )
    base = losses(recorded)
    assert ((truth.base[0] - base).abs() / base.abs()).max() < 1e-5
    for column, removed in enumerate((4, 17)):
        effect = losses(fit_recipe(recorder=False, removed=removed, weight=0.0)) - base
        assert effect.abs().max() > 1e-3  # removing the example changed the queries
        assert (truth.effects[0, :, column] - effect).abs().max() / effect.abs().max() < 1e-3


def test_unrolled_is_the_derivative_of_the_recipes_ground_truth(tmp_path):
    """On the same recipe (in float64), Unrolled's effects are retrain's at a small reweighting, per unit of
    weight: the estimator and the ground truth differentiate and evaluate one replay."""
    from lightning.pytorch.callbacks import EarlyStopping

    from lightning_dtda import TrajectoryRecorder, Unrolled

    data, queries = image_data(26, dtype=torch.float64), image_data(6, seed=1, dtype=torch.float64)
    pl.seed_everything(0)
    callbacks = [
        EarlyStopping("val_loss", patience=0, min_delta=10.0),
        TrajectoryRecorder(tmp_path / "runs", every_n_train_steps=2),
    ]
    trainer(
        tmp_path, callbacks, max_epochs=5, gradient_clip_val=1.0, accumulate_grad_batches=2, precision="64-true"
    ).fit(
        RecipeCNN(lr=0.05, dropout=0.2), DataLoader(data, batch_size=4, shuffle=True), DataLoader(queries, batch_size=6)
    )
    examples, eps = [4, 17], 1e-6
    with pytest.warns(
        UserWarning,
        match=r"seed_0 \(EarlyStopping\(monitor='val_loss', patience=0, min_delta=10, mode='min'\)\) followed a "
        "validation metric",
    ):
        attributor = Attributor(RecipeCNN, tmp_path / "runs", data, Unrolled(), progress=False)
    unrolled = attributor.attribute(queries)
    weights = torch.ones(2, 26, dtype=torch.float64)
    weights[0, 4] = weights[1, 17] = 1 - eps
    truth = retrain(RecipeCNN, tmp_path / "runs", data, queries, weights, progress=False, as_recorded=True)
    predicted = unrolled.effects[0][:, examples]  # removing: weight 1 -> 0
    finite = truth.effects[0] / eps  # per unit of weight removed
    assert predicted.abs().max() > 1e-3
    assert (predicted - finite).abs().max() / predicted.abs().max() < 1e-3


def test_small_ground_truth_and_its_comparison_with_estimates(tmp_path):
    data = classification_data(n=30, dtype=torch.float64)
    queries = classification_data(n=4, seed=1, dtype=torch.float64)
    for seed in range(3):
        fit(tmp_path, lambda: TinyClassifier(hidden=6, lr=0.3, momentum=0.5), data, seed=seed)
    examples = [0, 3, 5, 8, 13, 21]
    truth = retrain(
        TinyClassifier, tmp_path / "runs", data, queries, leave_one_out_weights(30, examples), progress=False
    )
    assert truth.retrained.shape == (3, 4, 6) and truth.base.shape == (3, 4)
    # the base row is the recorded run: its measurement equals the final snapshot's
    for s, run in enumerate(load_runs(tmp_path / "runs")):
        model = instantiate(TinyClassifier, run)
        x, y = queries.tensors
        assert torch.allclose(truth.base[s], F.cross_entropy(model(x), y, reduction="none").detach(), atol=1e-12)
    result = Attributor(
        TinyClassifier, tmp_path / "runs", data, estimator=Influence(curvature="ggn"), progress=False
    ).attribute(queries)
    predicted, actual = truth.table(result, "mean")
    assert torch.allclose(predicted, result.mean_shift()[:, examples])
    assert torch.allclose(actual, truth.effects.mean(0))
    metric = QuerySpearman()
    metric.update(predicted, actual)
    assert metric.compute() > 0.5

    for bad, why in [(dict(weights=torch.ones(0, 30)), r"M >= 1"), (dict(models_per_pass=0), "positive integer")]:
        with pytest.raises(ValueError, match=why):
            retrain(
                TinyClassifier, tmp_path / "runs", data, queries, **({"weights": truth.weights} | bad), progress=False
            )
    truth.save(tmp_path / "truth.safetensors")
    loaded = Retraining.load(tmp_path / "truth.safetensors")
    assert torch.equal(loaded.retrained, truth.retrained) and loaded.runs == truth.runs
    assert torch.equal(loaded.rounding, truth.rounding)


def test_subset_predictions_sum_the_removed_examples():
    g = torch.Generator().manual_seed(0)
    result = AttributionResult(torch.randn(2, 3, 10, generator=g), torch.randn(2, 3, generator=g), ["a", "b"])
    weights = random_subset_weights(10, num_subsets=4, fraction=0.5, seed=1)
    assert (weights.sum(1) == 5).all()
    truth = Retraining(weights, torch.zeros(2, 3), torch.zeros(2, 3, 4), ["a", "b"])
    predicted = truth.predicted_effects(result)
    removed = (weights[2] == 0).nonzero().flatten()
    assert torch.allclose(predicted[1, 0, 2], result.effects[1, 0, removed].sum())


def test_query_spearman_matches_scipy():
    g = torch.Generator().manual_seed(0)
    preds, target = torch.randn(5, 30, generator=g), torch.randn(5, 30, generator=g)
    target[2] = preds[2] ** 3  # a perfectly monotone row
    metric = QuerySpearman()
    metric.update(preds[:3], target[:3])
    metric.update(preds[3:], target[3:])
    expected = sum(spearmanr(preds[q], target[q]).statistic for q in range(5)) / 5
    # torchmetrics adds 1e-6 to the denominator: a relative bias below 2e-8 with 30 columns
    assert metric.compute().item() == pytest.approx(expected, abs=1e-7)


def test_query_spearman_ranks_ties_like_scipy():
    """Ties get average ranks (a double argsort would rank them arbitrarily), and rows where either
    side is constant are skipped."""
    g = torch.Generator().manual_seed(1)
    preds = torch.randint(0, 4, (6, 12), generator=g).double()  # many ties on both sides
    target = torch.randint(0, 3, (6, 12), generator=g).double()
    target[0] = preds[0].clamp(max=1)  # clipped values: ties only on one side
    preds[4] = 2.0  # constant rows are skipped ...
    target[5] = -1.0
    metric = QuerySpearman()
    metric.update(preds, target)
    expected = sum(spearmanr(preds[q], target[q]).statistic for q in range(4)) / 4
    assert metric.count.item() == 4 and metric.compute().item() == pytest.approx(expected, abs=1e-6)
    # ... and ranking ties by position instead would score row 0 otherwise
    first = preds[0].argsort(stable=True).argsort().double(), target[0].argsort(stable=True).argsort().double()
    assert abs(torch.corrcoef(torch.stack(first))[0, 1].item() - spearmanr(preds[0], target[0]).statistic) > 1e-3


def test_decided_marks_effects_that_move_by_over_a_percent_of_the_querys_largest_and_above_float32_noise():
    base = torch.tensor([[1.0, 1000.0]])  # [S, Q]: query 1's floor is 1e-5 * 1000 = 1e-2
    effects = torch.tensor([[[0.5, -0.1, 0.02], [0.5, 0.2, -0.1]]])  # each query's largest: 0.5, so 1% is 5e-3
    rounding = torch.tensor([[[0.0051, 0.0049, 0.006], [0.02, 0.006, 0.001]]])
    truth = Retraining(torch.ones(3, 4), base, base.unsqueeze(-1) + effects, ["seed_0"], rounding)
    assert truth.decided.tolist() == [[[True, False, True], [True, False, False]]]
    with pytest.raises(ValueError, match="split_half needs at least four seeds \\(two per half\\), got 3"):
        Retraining(
            torch.ones(3, 4), base.expand(3, 2), (base.unsqueeze(-1) + effects).expand(3, 2, 3), list("abc")
        ).split_half("mean")
    with pytest.raises(ValueError, match="no rounding measurement .* Run retrain again"):
        _ = Retraining(torch.ones(3, 4), base, base.unsqueeze(-1) + effects, ["seed_0"]).decided


class SeededHparams(TinyClassifier):
    """Hyperparameters a run's seed and a function (whose repr holds a memory address) go into."""

    def __init__(self, seed: int = 0, activation=F.relu, **hparams):
        super().__init__(**hparams)
        self.save_hyperparameters()


def test_runs_differing_only_by_seed_pool_without_a_word_and_a_differing_setting_is_named(tmp_path):
    import json

    data = classification_data(n=24, dtype=torch.float64)
    for seed in (0, 1):
        fit(tmp_path, lambda seed=seed: SeededHparams(seed=seed, **HPARAMS), data, seed=seed)
    path = tmp_path / "runs" / "seed_1" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.pop("sha256")  # edited by hand: without its checksum, as a manifest before 0.3
    # as another process repr's the same function
    manifest["module"]["hparams"]["activation"] = "<function relu at 0x7f0000000001>"
    # as LightningCLI adds to the hyperparameters of the seed it trained
    manifest["module"]["hparams"]["_instantiator"] = "lightning.pytorch.cli.instantiate_module"
    path.write_text(json.dumps(manifest))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="The runs were trained differently")
        load_runs(tmp_path / "runs")
    manifest["optimizer"]["param_groups"][0]["lr"] = 0.3
    manifest["early_stopping"] = ["EarlyStopping(monitor='val_loss', patience=8, min_delta=0, mode='min')"]
    path.write_text(json.dumps(manifest))
    with pytest.warns(
        UserWarning,
        match=r"trained differently: param_groups\[0\]\.lr: 0\.2 \(seed_0\), 0\.3 \(seed_1\); early_stopping: \[\] "
        r"\(seed_0\), \[\"EarlyStopping\(monitor='val_loss', patience=8.*\(seed_1\)\.",
    ):
        load_runs(tmp_path / "runs")


def test_train_seeds_records_each_seed_once(tmp_path):
    loader = DataLoader(classification_data(n=16), batch_size=8, shuffle=True)
    kwargs = dict(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    fits = []

    class CountsFits(pl.Callback):  # state a fit changes, as EarlyStopping's patience count or ModelCheckpoint's best
        def __init__(self):
            self.fits = 0

        def on_fit_start(self, trainer, pl_module):
            self.fits += 1
            fits.append(self.fits)

    train_seeds(TinyClassifier, loader, tmp_path / "runs", seeds=[0, 1], callbacks=[CountsFits()], **kwargs)
    assert fits == [1, 1]  # every seed starts from the callbacks as given, not from the previous seed's
    runs = load_runs(tmp_path / "runs")
    assert [r.name for r in runs] == ["seed_0", "seed_1"] and [r.seed for r in runs] == [0, 1]
    assert not torch.equal(runs[0].state_dict(0)["net.0.weight"], runs[1].state_dict(0)["net.0.weight"])
    stamp = (tmp_path / "runs" / "seed_0" / "manifest.json").stat().st_mtime_ns
    train_seeds(TinyClassifier, loader, tmp_path / "runs", seeds=[0, 1, 2], **kwargs)  # seed 0 and 1 are skipped
    assert (tmp_path / "runs" / "seed_0" / "manifest.json").stat().st_mtime_ns == stamp
    assert [r.name for r in load_runs(tmp_path / "runs")] == ["seed_0", "seed_1", "seed_2"]
    # the same class moved to another module path is the same setup, as for the Attributor
    moved = type("TinyClassifier", (TinyClassifier,), {"__module__": "package.moved"})
    train_seeds(moved, loader, tmp_path / "runs", seeds=[0], **kwargs)
    assert (tmp_path / "runs" / "seed_0" / "manifest.json").stat().st_mtime_ns == stamp
    # a finished run of another setup is not skipped as if this call had trained it
    for make, other, changed, why in [
        (lambda: TinyClassifier(hidden=7), loader, {}, r"hidden=8, not 7"),
        (TinyClassifier, DataLoader(classification_data(n=16, seed=3), batch_size=8), {}, "another training set"),
        (TinyClassifier, DataLoader(classification_data(n=16), batch_size=4), {}, "batch_size=8, not 4"),
        (TinyClassifier, loader, {"max_epochs": 2}, "max_epochs=1, not 2"),
        (
            TinyClassifier,
            loader,
            {"callbacks": [pl.callbacks.EarlyStopping("train_loss", patience=3)]},
            r"EarlyStopping=\(\), not \(\"EarlyStopping\(monitor='train_loss', patience=3, min_delta=0, mode='min'\)\",\)",
        ),
        (TinyClassifier, loader, {"max_epochs": None, "max_steps": 2}, "max_epochs=1, not -1; max_steps=-1, not 2"),
        (TinyClassifier, loader, {"accumulate_grad_batches": 2}, "accumulate_grad_batches=1, not 2"),
        (TinyClassifier, loader, {"gradient_clip_val": 0.5}, "gradient_clip_val=None, not 0.5"),
        (TinyClassifier, loader, {"precision": 64}, "precision='32-true', not '64-true'"),
    ]:
        with pytest.raises(RuntimeError, match=rf"seed_0 holds a finished run of another setup \({why}\)"):
            train_seeds(make, other, tmp_path / "runs", seeds=[0], **{**kwargs, **changed})
    train_seeds(TinyClassifier, loader, tmp_path / "runs", seeds=[0], **{**kwargs, "precision": "32"})  # the same
    assert (tmp_path / "runs" / "seed_0" / "manifest.json").stat().st_mtime_ns == stamp
    # Lightning's own defaults, resolved as it resolves them: a repeated call skips
    defaults = {k: v for k, v in kwargs.items() if k != "max_epochs"} | {"max_steps": 2, "precision": None}
    train_seeds(TinyClassifier, loader, tmp_path / "defaults", seeds=[0], **defaults)
    stamp_defaults = (tmp_path / "defaults" / "seed_0" / "manifest.json").stat().st_mtime_ns
    train_seeds(TinyClassifier, loader, tmp_path / "defaults", seeds=[0], **defaults)
    assert (tmp_path / "defaults" / "seed_0" / "manifest.json").stat().st_mtime_ns == stamp_defaults
    # runs trained differently are pooled, but not without a word
    train_seeds(TinyClassifier, loader, tmp_path / "runs", seeds=[3], **{**kwargs, "max_epochs": 2})
    with pytest.warns(
        UserWarning, match=r"trained differently: max_epochs: 1 \(seed_0, seed_1, seed_2\), 2 \(seed_3\)\."
    ):
        load_runs(tmp_path / "runs")
    shutil.rmtree(tmp_path / "runs" / "seed_3")
    # a run another host is recording (its process cannot be checked from here) is not deleted
    import json

    path = tmp_path / "runs" / "seed_2" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.pop("sha256")  # edited by hand: without its checksum, as a manifest before 0.3
    path.write_text(json.dumps({**manifest, "complete": False, "writer": {"host": "elsewhere", "pid": 1}}))
    with pytest.raises(RuntimeError, match=r"seed_2: unfinished .* wait for it or stop that process first"):
        train_seeds(TinyClassifier, loader, tmp_path / "runs", seeds=[2], **kwargs)
    assert path.is_file()


@pytest.mark.parametrize(
    "call, why",
    [
        (lambda: leave_one_out_weights(5, [-1]), r"indices in \[0, 5\), got \[-1\]"),
        (lambda: leave_one_out_weights(5, [5]), r"indices in \[0, 5\)"),
        (lambda: leave_one_out_weights(5, []), "non-empty list of training-set indices"),
        (lambda: leave_one_out_weights(5, [1.7]), "non-empty list of training-set indices"),
        (lambda: random_subset_weights(10, 2, fraction=1.5), "0 < fraction < 1"),
        (lambda: random_subset_weights(10, 2, fraction=0.0), "0 < fraction < 1"),
        (lambda: random_subset_weights(10, 0), "num_subsets >= 1"),
    ],
)
def test_weightings_refuse_what_would_silently_remove_other_examples(call, why):
    with pytest.raises(ValueError, match=why):
        call()


def test_a_batched_replay_off_the_run_is_redone_with_trainings_kernels_and_a_chaotic_run_refused(tmp_path):
    """SGD at learning rate 1 with momentum 0.9 amplifies rounding: the float32 replay of several weightings at
    once (vmapped kernels round unlike training's) drifts past the 1e-4 tolerance within 40 steps, as replays
    started one rounding unit apart do. Such a drift is excused for one weighting at a time, but a batched
    ground truth is then another run's (with kinks, as the digits CNN's max-pool ties, it lands 1e-2 away):
    retrain says so and replays the weightings one at a time, which is the run (what models_per_pass=1 gives).
    By 120 steps rounding alone has scrambled the run: a batched replay of it is refused even with the excuse."""
    from lightning_dtda import ReplayMismatchError, TrajectoryRecorder
    from lightning_dtda.replay.check import replay_checked, rounding_drift
    from lightning_dtda.replay.engine import Replay
    from lightning_dtda.runs.fingerprint import SeededDataset

    data, queries = classification_data(n=40), classification_data(n=3, seed=1)
    for steps in (40, 120):
        pl.seed_everything(0)
        trainer(
            tmp_path, [TrajectoryRecorder(tmp_path / f"runs_{steps}", every_n_train_steps=20)], max_steps=steps
        ).fit(TinyClassifier(hidden=16, lr=1.0, momentum=0.9), DataLoader(data, batch_size=4, shuffle=True))
    [run] = load_runs(tmp_path / "runs_40")
    replay_40 = Replay(instantiate(TinyClassifier, run, 0), run, SeededDataset(data))
    drift = max(rounding_drift(replay_40, 40).values())
    assert 1e-5 < drift < 1e-2  # rounding grows by orders of magnitude in 40 steps
    with pytest.raises(ReplayMismatchError) as batched:  # two weightings at once: off the run, beyond rounding
        replay_checked(replay_40, torch.ones(2, 40), strict=True, excuse_rounding=False)
    assert batched.value.gap > 1e-4
    weights = leave_one_out_weights(40, [3, 7])
    with pytest.warns(UserWarning) as caught:
        truth = retrain(TinyClassifier, [run], data, queries, weights, progress=False)
    messages = [str(w.message) for w in caught]
    assert any(
        re.match(r"retrain: seed_0's weightings replayed together \(models_per_pass=128\) land", m) for m in messages
    )
    one_at_a_time = retrain(TinyClassifier, [run], data, queries, weights, models_per_pass=1, progress=False)
    assert torch.equal(truth.effects, one_at_a_time.effects) and truth.effects.abs().max() > 1e-4
    # Even the run's own replay leaves effects that rounding decides: started one rounding unit away, some move
    # by more than a percent of their query's largest effect, and retrain counts them.
    decided = truth.decided.sum()
    moved = truth.rounding > 0.01 * truth.effects.abs().amax(-1, keepdim=True)
    assert torch.equal(truth.decided, moved & (truth.rounding > 1e-5 * truth.base.abs().unsqueeze(-1)))
    assert decided > 0 and any(f"retrain: {int(decided)} of 6 effects (seed_0) move by over 1%" in m for m in messages)
    [chaotic] = load_runs(tmp_path / "runs_120")
    replay_120 = Replay(instantiate(TinyClassifier, chaotic, 0), chaotic, SeededDataset(data))
    # Said to be rounding's doing (measured: one rounding unit apart drifts as far), not blamed on the updates.
    with pytest.raises(
        ReplayMismatchError,
        match=r"lands .* away from its recorded weights \(rounding alone, from weights one rounding unit apart, drifts "
        r".* Rounding alone takes a replay as far .* Record it with precision='64-true'",
    ):
        replay_checked(replay_120, torch.ones(2, 40), strict=True)
