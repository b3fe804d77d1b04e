import dataclasses

import lightning.pytorch as pl
import pytest
import torch
from models import (
    TinyClassifier,
    TinyTransformer,
    WeightedCNN,
    classification_data,
    fit_weighted_cnn,
    image_data,
    token_data,
    trainer,
)
from oracles import relative_error
from torch.utils.data import DataLoader

from lightning_dtda import (
    Attributor,
    Segmented,
    TrajectoryRecorder,
    Unrolled,
    leave_one_out_weights,
    load_runs,
    retrain,
)
from lightning_dtda.damping import learning_rate_time
from lightning_dtda.errors import ReplayMismatchError, UnsupportedTrainingError
from lightning_dtda.estimators import unrolled
from lightning_dtda.hooks import Hooks
from lightning_dtda.replay.check import replay_checked
from lightning_dtda.replay.engine import Replay, replay
from lightning_dtda.runs.trajectory import Trajectory


class AdamClassifier(TinyClassifier):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


class TwoGroupAdam(TinyClassifier):
    """AdamW with weight decay on the first layer only, as recipes leave biases and norms undecayed."""

    def configure_optimizers(self):
        first, rest = list(self.net[0].parameters()), list(self.net[2].parameters())
        return torch.optim.AdamW(
            [{"params": first, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}], lr=0.05
        )


def record(tmp_path, cls, data, seeds=(0,), **hparams):
    for seed in seeds:
        pl.seed_everything(seed)
        trainer(
            tmp_path, [TrajectoryRecorder(tmp_path / "runs", every_n_train_steps=5)], max_epochs=3, precision="64-true"
        ).fit(cls(**hparams), DataLoader(data, batch_size=6, shuffle=True))
    return tmp_path / "runs"


@pytest.mark.parametrize(
    "cls,hparams",
    [
        (TinyClassifier, dict(hidden=5, lr=0.2, momentum=0.9, weight_decay=1e-2)),
        (AdamClassifier, dict(hidden=5, lr=0.02, weight_decay=1e-2)),
    ],
)
def test_unrolled_equals_finite_difference_retraining(tmp_path, cls, hparams):
    data = classification_data(n=20, dtype=torch.float64)
    queries = classification_data(n=3, seed=1, dtype=torch.float64)
    runs = record(tmp_path, cls, data, **hparams)
    result = Attributor(cls, runs, data, estimator=Unrolled(), progress=False).attribute(queries)

    # Same seed, every example's weight lowered to 1 - eps in turn: d(measurement)/d(eps).
    eps = 1e-4
    truth = retrain(cls, runs, data, queries, 1 - eps * (1 - leave_one_out_weights(20, range(20))), progress=False)
    finite_difference = truth.effects[0] / eps  # [Q, N]
    assert relative_error(result.effects[0], finite_difference) < 1e-3
    # the base measurement is the recorded run's
    assert torch.allclose(result.measurements[0], truth.base[0], atol=1e-10)


@pytest.mark.parametrize("solver", ["dense", "krylov"])
def test_segmented_with_one_segment_equals_the_closed_form(tmp_path, solver):
    """Dense: the eigendecomposition; krylov: Lanczos on GGN products for exp(-T G) and (1 - exp(-T G)) / G."""
    from oracles import dense_ggn_effects

    data = classification_data(n=20, dtype=torch.float64)
    queries = classification_data(n=3, seed=1, dtype=torch.float64)
    pl.seed_everything(0)
    # snapshots at step 0 and at the end only: one segment whose curvature and gradients are the final ones
    trainer(tmp_path, [TrajectoryRecorder(tmp_path / "runs", every_n_epochs=4)], max_epochs=4, precision="64-true").fit(
        TinyClassifier(hidden=5, lr=0.2, momentum=0.5), DataLoader(data, batch_size=6, shuffle=True)
    )
    attributor = Attributor(
        TinyClassifier,
        tmp_path / "runs",
        data,
        estimator=Segmented(segments=1, curvature="ggn", solver=solver),
        progress=False,
    )
    [run] = attributor.runs
    assert run.snapshot_steps == [0, 16]
    result = attributor.attribute(queries)
    assert ("lanczos_products" in result.settings["per_run"][0]) == (solver == "krylov")

    _, G, g_train, g_query = dense_ggn_effects(attributor.load_model(run), *data.tensors, *queries.tensors, 1.0)
    time = 0.2 / (1 - 0.5) * 16  # eta / (1 - momentum) * K
    eigenvalues, V = torch.linalg.eigh(G)
    eigenvalues = eigenvalues.clamp(min=0)
    f = torch.where(eigenvalues * time > 1e-8, (1 - torch.exp(-time * eigenvalues)) / eigenvalues, time)
    expected = g_query @ V @ torch.diag(f) @ V.T @ g_train.T / 20  # (I - exp(-eta K G)) G^-1 g / N
    assert relative_error(result.effects[0], expected) < 1e-6


class AdamWClassifier(TinyClassifier):
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


@pytest.mark.parametrize("cls, solver", [(AdamWClassifier, "dense"), (AdamClassifier, "krylov")])
def test_segmented_under_adam_with_one_segment_equals_the_preconditioned_closed_form(tmp_path, cls, solver):
    """Adam's step lr * D g (D = 1 / (sqrt(v_hat) + eps), held fixed): the response of one segment is
    S f(A) S g / N with S = D^(1/2), A = S (G + l2) S + decoupled and f(c) = (1 - exp(-T c)) / c, T the summed
    learning rates. D here is read from the optimizer state the recorder saved, the estimator's from its replay."""
    from oracles import dense_ggn_effects

    data = classification_data(n=20, dtype=torch.float64)
    queries = classification_data(n=3, seed=1, dtype=torch.float64)
    pl.seed_everything(0)
    recorder = TrajectoryRecorder(tmp_path / "runs", every_n_epochs=4, save_optimizer_state=True)
    trainer(tmp_path, [recorder], max_epochs=4, precision="64-true").fit(
        cls(hidden=5, lr=0.05, weight_decay=0.05), DataLoader(data, batch_size=6, shuffle=True)
    )
    estimator = Segmented(segments=1, curvature="ggn", solver=solver)
    attributor = Attributor(cls, tmp_path / "runs", data, estimator=estimator, progress=False)
    [run] = attributor.runs
    assert run.snapshot_steps == [0, 16]
    result = attributor.attribute(queries)

    model = attributor.load_model(run)
    _, G, g_train, g_query = dense_ggn_effects(model, *data.tensors, *queries.tensors, 1.0)
    state = run.snapshot(1).optimizer_state["state"]
    v_hat = torch.cat(
        [state[i]["exp_avg_sq"].flatten() / (1 - 0.999 ** float(state[i]["step"])) for i in range(len(state))]
    )
    S = torch.diag((1 / (v_hat.sqrt() + 1e-8)).sqrt())
    l2, decoupled = (0.0, 0.05) if cls is AdamWClassifier else (0.05, 0.0)
    A = S @ (G + l2 * torch.eye(len(G), dtype=G.dtype)) @ S + decoupled * torch.eye(len(G), dtype=G.dtype)
    eigenvalues, V = torch.linalg.eigh(A)
    time = 0.05 * 16
    f = (1 - torch.exp(-time * eigenvalues.clamp(min=0))) / eigenvalues.clamp(min=1e-30)
    expected = g_query @ S @ V @ torch.diag(f) @ V.T @ S @ g_train.T / 20
    assert relative_error(result.effects[0], expected) < 1e-6


def segment_errors(cls, runs, data, queries):
    """Unrolled effects, and the relative errors of exact-GGN Segmented with 1 and 2 segments against them."""
    exact = Attributor(cls, runs, data, estimator=Unrolled(), progress=False).attribute(queries).effects
    errors = [
        relative_error(
            Attributor(cls, runs, data, estimator=Segmented(segments=k, curvature="ggn"), progress=False)
            .attribute(queries)
            .effects,
            exact,
        )
        for k in (1, 2)
    ]
    return exact, errors


def test_more_segments_approach_unrolling_under_adam(tmp_path):
    data = classification_data(n=20, dtype=torch.float64)
    queries = classification_data(n=3, seed=1, dtype=torch.float64)
    runs = record(tmp_path, AdamWClassifier, data, hidden=5, lr=0.05, weight_decay=1e-2)
    exact, errors = segment_errors(AdamWClassifier, runs, data, queries)
    assert errors[1] < errors[0] < 1.0, errors
    # Without a curvature, Segmented takes the exact GGN on an Adam run (EK-FAC would be refused), and says so.
    default = Attributor(AdamWClassifier, runs, data, estimator=Segmented(segments=2), progress=False).attribute(
        queries
    )
    assert default.settings["curvature"] == "ggn" and "AdamW" in default.settings["curvature_reason"]
    assert relative_error(default.effects, exact) == pytest.approx(errors[1], rel=1e-6)


def test_more_segments_approach_unrolling(tmp_path):
    data = classification_data(n=20, dtype=torch.float64)
    queries = classification_data(n=3, seed=1, dtype=torch.float64)
    runs = record(tmp_path, TinyClassifier, data, hidden=5, lr=0.2, momentum=0.5)
    exact, errors = segment_errors(TinyClassifier, runs, data, queries)
    assert errors[1] < errors[0] < 1.0
    default = Attributor(TinyClassifier, runs, data, estimator=Segmented(segments=2), progress=False).attribute(queries)
    assert default.settings["curvature"] == "ekfac" and "SGD" in default.settings["curvature_reason"]
    lanczos = (
        Attributor(
            TinyClassifier,
            runs,
            data,
            estimator=Segmented(segments=2, curvature="ggn", solver="krylov"),
            progress=False,
        )
        .attribute(queries)
        .effects
    )
    dense = (
        Attributor(
            TinyClassifier, runs, data, estimator=Segmented(segments=2, curvature="ggn", solver="dense"), progress=False
        )
        .attribute(queries)
        .effects
    )
    assert relative_error(lanczos, dense) < 1e-6


def test_replay_refuses_what_it_cannot_replay(tmp_path):
    data = classification_data(n=12, dtype=torch.float64)
    queries = classification_data(n=2, seed=1, dtype=torch.float64)

    class RMSpropClassifier(TinyClassifier):
        def configure_optimizers(self):
            return torch.optim.RMSprop(self.parameters(), lr=0.01)

    runs = record(tmp_path, RMSpropClassifier, data)
    with pytest.raises(ValueError, match="RMSprop has none. Supported: torch.optim.sgd.SGD"):
        Attributor(RMSpropClassifier, runs, data, estimator=Unrolled(), progress=False).attribute(queries)
    # The optimizer is refused before the snapshots are counted: more snapshots would not help.
    with pytest.raises(
        UnsupportedTrainingError, match="Segmented models SGD, .* run seed_0 used torch.optim.rmsprop.RMSprop"
    ):
        Attributor(
            RMSpropClassifier, runs, data, estimator=Segmented(segments=9, curvature="ggn"), progress=False
        ).attribute(queries)
    (tmp_path / "sgd").mkdir()
    sgd_runs = record(tmp_path / "sgd", TinyClassifier, data)
    with pytest.raises(ValueError, match="segments=9, but run seed_0 has 2 snapshots after step 0"):
        Attributor(
            TinyClassifier, sgd_runs, data, estimator=Segmented(segments=9, curvature="ggn"), progress=False
        ).attribute(queries)


def test_replay_refuses_adam_for_segments_and_missing_membership(tmp_path):
    data = classification_data(n=12, dtype=torch.float64)
    queries = classification_data(n=2, seed=1, dtype=torch.float64)
    runs = record(tmp_path / "adam", AdamClassifier, data)
    with pytest.raises(UnsupportedTrainingError, match="parameter groups differ in learning rate"):
        runs_groups = record(tmp_path / "groups", TwoGroupAdam, data)
        Attributor(
            TwoGroupAdam, runs_groups, data, estimator=Segmented(segments=1, curvature="ggn"), progress=False
        ).attribute(queries)
    with pytest.raises(UnsupportedTrainingError, match=r"preconditions the curvature.*Segmented\(curvature='ggn'\)"):
        Attributor(
            AdamClassifier, runs, data, estimator=Segmented(segments=1, curvature="ekfac"), progress=False
        ).attribute(queries)

    runs = record(tmp_path / "gap", TinyClassifier, data)
    manifest = runs / "seed_0" / "manifest.json"
    import json

    content = json.loads(manifest.read_text())
    del content["snapshots"][1]  # the snapshot holding steps 1-5 and their batch membership
    content.pop("sha256")  # edited by hand: without its checksum, as a manifest before 0.3
    manifest.write_text(json.dumps(content))
    with pytest.raises(ValueError, match="no batch membership for steps 1 to 5"):
        Attributor(TinyClassifier, runs, data, estimator=Unrolled(), progress=False).attribute(queries)


def test_adam_on_always_zero_features_gives_finite_effects_equal_to_finite_differences(tmp_path):
    """Raw digits have pixels that are 0 in every image: Adam's exp_avg_sq stays exactly 0 for their
    weights, where sqrt's derivative is infinite; the unrolled effects must stay finite and exact."""
    data = classification_data(n=20, dtype=torch.float64)
    data.tensors[0][:, :2] = 0.0  # two features that are always 0
    queries = classification_data(n=3, seed=1, dtype=torch.float64)
    queries.tensors[0][:, :2] = 0.0
    runs = record(tmp_path, AdamClassifier, data, hidden=5, lr=0.02)
    result = Attributor(AdamClassifier, runs, data, estimator=Unrolled(), progress=False).attribute(queries)
    assert torch.isfinite(result.effects).all()
    eps = 1e-4
    truth = retrain(
        AdamClassifier, runs, data, queries, 1 - eps * (1 - leave_one_out_weights(20, range(20))), progress=False
    )
    assert relative_error(result.effects[0], truth.effects[0] / eps) < 1e-3


def test_non_finite_effects_name_the_run_and_examples(tmp_path):
    data = classification_data(n=12, dtype=torch.float64)
    runs = record(tmp_path, TinyClassifier, data)

    class Overflows(Unrolled):
        def estimate(self, context):
            effects, info = super().estimate(context)
            effects[:, 3] = float("nan")
            return effects, info

    with pytest.raises(
        FloatingPointError, match=r"overflows gave non-finite effects on run seed_0 for training examples \[3\]"
    ):
        Attributor(TinyClassifier, runs, data, estimator=Overflows(), progress=False).attribute(
            classification_data(n=2, seed=1, dtype=torch.float64)
        )


def fit_recorded(tmp_path, make_model, data, **trainer_kwargs):
    """Train ``make_model()`` (built after seeding 0, float64) with a recorder snapshotting every 5 steps; returns it and its run."""
    pl.seed_everything(0)
    model = make_model()
    trainer(
        tmp_path,
        [TrajectoryRecorder(tmp_path / "runs", every_n_train_steps=5)],
        max_epochs=3,
        precision="64-true",
        **trainer_kwargs,
    ).fit(model, DataLoader(data, batch_size=6, shuffle=True))
    [run] = load_runs(tmp_path / "runs")
    return model, run


def replay_gap(model, run, data):
    """Largest absolute difference between the replayed and the recorded final parameters."""
    replayed = replay(model, run, data, torch.ones(1, len(data), dtype=torch.float64))
    return max((t[0] - run.state_dict()[n]).abs().max().item() for n, t in replayed.items())


def assert_unrolled_equals_finite_differences(cls, runs, data, eps, queries=None):
    queries = classification_data(n=3, seed=1, dtype=torch.float64) if queries is None else queries
    result = Attributor(cls, runs, data, estimator=Unrolled(), progress=False).attribute(queries)
    n = len(data)
    truth = retrain(cls, runs, data, queries, 1 - eps * (1 - leave_one_out_weights(n, range(n))), progress=False)
    assert relative_error(result.effects[0], truth.effects[0] / eps) < 1e-3


class OneCycleSGD(TinyClassifier):
    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
        return [optimizer], [
            {
                "scheduler": torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.3, total_steps=12),
                "interval": "step",
            }
        ]


class OneCycleAdam(TinyClassifier):
    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=0.02)
        return [optimizer], [
            {
                "scheduler": torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=12),
                "interval": "step",
            }
        ]


@pytest.mark.parametrize("cls", [OneCycleSGD, OneCycleAdam])
def test_momentum_and_beta_schedules_replay_exactly(tmp_path, cls):
    """OneCycleLR with cycle_momentum moves SGD's momentum and Adam's beta1 every step: the recorder keeps
    them per step and the replay lands on the recorded weights and equals finite differences."""
    data = classification_data(n=24, dtype=torch.float64)
    model, run = fit_recorded(tmp_path, lambda: cls(hidden=5), data)
    name = "momentum" if cls is OneCycleSGD else "beta1"
    assert len({step.scheduled[name] for step in run.steps}) > 5
    assert replay_gap(model, run, data) < 1e-12
    assert_unrolled_equals_finite_differences(cls, tmp_path / "runs", data, 1e-4)


@pytest.mark.parametrize("algorithm,value", [("norm", 0.3), ("value", 0.05)])
def test_gradient_clipping_replays_exactly(tmp_path, algorithm, value):
    data = classification_data(n=24, dtype=torch.float64)
    model, run = fit_recorded(
        tmp_path,
        lambda: TinyClassifier(hidden=5, lr=0.3, momentum=0.5),
        data,
        gradient_clip_val=value,
        gradient_clip_algorithm=algorithm,
    )
    assert run.manifest.gradient_clipping == {"value": value, "algorithm": algorithm, "custom": False}
    assert replay_gap(model, run, data) < 1e-12
    assert_unrolled_equals_finite_differences(TinyClassifier, tmp_path / "runs", data, 1e-5)
    # the run was clipped: a replay without clipping would land elsewhere
    object.__setattr__(run.manifest, "gradient_clipping", None)
    assert replay_gap(model, run, data) > 1e-3


def test_unrolled_is_the_same_whichever_interval_graphs_the_memory_budget_keeps(tmp_path, monkeypatch):
    """The forward replay keeps the autograd graphs of the last intervals that fit in the budget and the reverse
    pass computes the others again: on the BatchNorm/dropout CNN (intervals of 3, 3 and 2 steps) keeping all,
    the last two or none gives the same effects, and the kept graphs never pass the budget."""
    data = image_data(24, dtype=torch.float64)
    queries = image_data(3, seed=1, dtype=torch.float64)
    fit_weighted_cnn(tmp_path, data, optimizer="sgd", lr=0.1)
    made = []

    class Spy(unrolled._IntervalGraphs):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(unrolled, "_IntervalGraphs", Spy)
    effects, kept = [], []
    for budget in (2**40, None, 0):
        # None: room for the graphs of the last two intervals, as the first attribution measured them
        last_two = made[0].sizes[1] + made[0].sizes[2] if made else 0
        monkeypatch.setattr(unrolled, "_GRAPH_BUDGET", last_two if budget is None else budget)
        attributor = Attributor(WeightedCNN, tmp_path / "runs", data, estimator=Unrolled(), progress=False)
        effects.append(attributor.attribute(queries).effects[0])
        kept.append(sorted(made[-1].sizes))
    assert kept == [[0, 1, 2], [1, 2], []]
    assert min(made[0].sizes.values()) > 0
    assert relative_error(effects[1], effects[0]) < 1e-12
    assert relative_error(effects[2], effects[0]) < 1e-12


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.1), ("adam", 0.02)])
def test_dropout_and_batch_norm_replay_exactly_and_unrolled_equals_lightning_finite_differences(
    tmp_path, optimizer, lr
):
    """A CNN with BatchNorm, Dropout, ReLU and max-pooling, SGD momentum or Adam, weight decay, a cosine
    schedule and gradient clipping: the replay reproduces the run (dropout masks, batch statistics,
    running statistics) and unrolled equals Lightning retraining with one example's loss weight 1 - eps."""
    data = image_data(24, dtype=torch.float64)
    queries = image_data(3, seed=1, dtype=torch.float64)
    model = fit_weighted_cnn(tmp_path, data, optimizer=optimizer, lr=lr)
    [run] = load_runs(tmp_path / "runs")
    assert all(set(states) == {"cpu"} for step in run.steps for states in step.rng)  # dropout drew every step
    assert replay_gap(model, run, data) < 1e-12  # parameters and running statistics
    result = Attributor(WeightedCNN, tmp_path / "runs", data, estimator=Unrolled(), progress=False).attribute(queries)

    # Tighter than the kinks of ReLU and max-pooling would allow at larger eps; torch's fused batch norm,
    # differentiated twice under vmap, missed by 1e-4 here (see replay._DECOMPOSED).
    eps = 1e-7
    truth = retrain(
        WeightedCNN,
        tmp_path / "runs",
        data,
        queries,
        1 - eps * (1 - leave_one_out_weights(24, range(24))),
        progress=False,
    )
    assert relative_error(result.effects[0], truth.effects[0] / eps) < 1e-5
    hooks = Hooks(model.eval())
    for removed in (4, 17):
        lightning = fit_weighted_cnn(
            tmp_path, data, recorder=False, optimizer=optimizer, lr=lr, removed=removed, weight=1 - eps
        ).eval()
        with torch.no_grad():
            changed = Hooks(lightning).measurement(queries.tensors) - hooks.measurement(queries.tensors)
        assert relative_error(result.effects[0, :, removed], changed / eps) < 1e-5


def test_layer_and_group_norm_need_nothing_special(tmp_path):
    from torch import nn

    class Norms(TinyClassifier):
        def __init__(self, **hparams):
            super().__init__(**hparams)
            self.net = nn.Sequential(
                nn.Linear(6, 8),
                nn.LayerNorm(8),
                nn.Tanh(),
                nn.Linear(8, 8),
                nn.GroupNorm(2, 8),
                nn.Tanh(),
                nn.Linear(8, 3),
            )

    data = classification_data(n=24, dtype=torch.float64)
    model, run = fit_recorded(tmp_path, lambda: Norms(lr=0.2, momentum=0.9), data)
    assert replay_gap(model, run, data) < 1e-12
    assert_unrolled_equals_finite_differences(Norms, tmp_path / "runs", data, 1e-6)


def test_a_transformer_with_attention_dropout_and_layer_norm_replays_exactly(tmp_path):
    """nn.TransformerEncoderLayer: embeddings, attention (the replay needs the math kernel: the fused
    ones have no second derivatives), LayerNorm, dropout on attention's non-contiguous output (whose
    mask torch draws in memory order outside vmap and in logical order inside); AdamW and clipping."""
    data = token_data(24)
    model, run = fit_recorded(tmp_path, lambda: TinyTransformer(dropout=0.2), data, gradient_clip_val=1.0)
    assert (
        replay_gap(model, run, data) < 1e-10
    )  # the run's fused attention and the replay's math kernel round differently
    assert_unrolled_equals_finite_differences(TinyTransformer, tmp_path / "runs", data, 1e-7, token_data(3, seed=1))
    # Dropout inside the fused attention kernel: recorded with a warning, refused by the replay.
    with pytest.warns(UserWarning, match="no replay can reproduce it: attention 'layer.self_attn' has dropout=0.1"):
        fit_recorded(tmp_path / "attention", lambda: TinyTransformer(dropout=0.1, attention_dropout=True), data)
    with pytest.raises(
        ValueError,
        match=r"attention 'layer.self_attn' has dropout=0.1 inside torch's fused attention.*Use Influence\(\) for it"
        r"; Segmented\(\) refuses it too, since it replays AdamW runs",  # not "or Segmented()": it replays too
    ):
        Attributor(
            TinyTransformer, tmp_path / "attention" / "runs", data, estimator=Unrolled(), progress=False
        ).attribute(token_data(3, seed=1))


def test_a_replay_leaves_the_callers_random_sequence_alone(tmp_path):
    data = image_data(24, dtype=torch.float64)
    model = fit_weighted_cnn(tmp_path, data)
    [run] = load_runs(tmp_path / "runs")
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    replay(model, run, data, torch.ones(2, 24))
    assert torch.equal(torch.rand(3), expected)


def test_a_bf16_mixed_cnn_replays_within_the_documented_bound(tmp_path):
    data = image_data(24)
    model = fit_weighted_cnn(tmp_path, data, precision="bf16-mixed")
    [run] = load_runs(tmp_path / "runs")
    replayed = replay(model, run, data, torch.ones(1, 24))
    gap = max(
        ((t[0] - run.state_dict()[n]).abs().max() / run.state_dict()[n].abs().max()).item() for n, t in replayed.items()
    )
    assert 1e-5 < gap < 2e-2  # bf16 rounding, not reproduced; within the tolerance the estimator accepts
    result = Attributor(WeightedCNN, tmp_path / "runs", data, estimator=Unrolled(), progress=False).attribute(
        image_data(3, seed=1)
    )
    assert torch.isfinite(result.effects).all()


def test_steps_a_16_mixed_gradient_scaler_skipped_are_skipped_in_the_replay(tmp_path):
    """A scale of 2^24 overflows float16 gradients: the scaler skips steps (and halves its scale)
    until it fits, while Lightning counts them. (16-mixed runs on the CPU with a CPU GradScaler.)"""
    from lightning.pytorch.plugins import MixedPrecision

    data = classification_data(n=24)
    pl.seed_everything(0)
    model = TinyClassifier(hidden=8, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    trainer(
        tmp_path,
        [TrajectoryRecorder(tmp_path / "runs", every_n_train_steps=4)],
        max_epochs=3,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler)],
    ).fit(model, DataLoader(data, batch_size=6, shuffle=True))
    [run] = load_runs(tmp_path / "runs")
    skipped = [step.skipped for step in run.steps]
    assert run.manifest.precision == "16-mixed" and skipped[:2] == [True, True] and not all(skipped)
    assert torch.equal(run.state_dict(1)["net.0.weight"], run.state_dict(0)["net.0.weight"])  # steps 1-4: all skipped
    assert learning_rate_time(run) == pytest.approx(
        skipped.count(False) * 0.1 / (1 - 0.9)
    )  # skipped steps moved nothing
    replayed = replay(model, run, data, torch.ones(1, 24))
    gap = max(
        ((t[0] - run.state_dict()[n]).abs().max() / run.state_dict()[n].abs().max()).item() for n, t in replayed.items()
    )
    assert gap < 2e-2  # float16 rounding, not reproduced; within the tolerance the estimator accepts
    # Unrolling's graphs are sized on an interval with no skipped step (the first one's graph is nearly
    # empty), so a budget smaller than any graph keeps none.
    graphs = unrolled._IntervalGraphs(Replay(model, run, data), 1)
    replay_checked(graphs.replay, torch.ones(1, 24), keep_checkpoints=True, advance=graphs.advance)
    assert graphs.step_bytes > 0 and graphs.kept == {}
    object.__setattr__(run, "steps", [dataclasses.replace(step, skipped=False) for step in run.steps])
    replayed = replay(model, run, data, torch.ones(1, 24))
    assert (
        max(
            ((t[0] - run.state_dict()[n]).abs().max() / run.state_dict()[n].abs().max()).item()
            for n, t in replayed.items()
        )
        > 0.1
    )


def test_what_the_replay_cannot_reproduce_is_refused_before_any_work(tmp_path):
    from pathlib import Path

    from torch import nn

    from lightning_dtda.replay.engine import check_replayable

    [old] = load_runs(Path(__file__).parent / "data" / "runs_0_1")  # recorded before random states were
    cpu = torch.device("cpu")
    check_replayable(
        nn.Sequential(nn.InstanceNorm1d(4), nn.Dropout(0.0), nn.LayerNorm(4)), old, cpu
    )  # nothing to refuse
    for layer, message in [
        (nn.Dropout(0.1), "it has dropout, and the run was recorded by a version that did not record random states"),
        (nn.BatchNorm1d(4, momentum=None), r"batch norm '0' averages its statistics cumulatively \(momentum=None\)"),
        (nn.InstanceNorm1d(4, track_running_stats=True), "instance norm '0' tracks running statistics"),
    ]:
        with pytest.raises(UnsupportedTrainingError, match=f"Run seed_0 cannot be replayed: {message}.*Use Influence"):
            check_replayable(nn.Sequential(layer), old, cpu)

    data = image_data(24, dtype=torch.float64)
    model = fit_weighted_cnn(tmp_path, data)
    [run] = load_runs(tmp_path / "runs")
    check_replayable(model, run, cpu)
    run.steps[0].rng[0]["cuda"] = torch.zeros(16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="drew random numbers on CUDA, which only a CUDA replay reproduces"):
        check_replayable(model, run, cpu)
    object.__setattr__(run.manifest, "world_size", 2)
    with pytest.raises(
        ValueError,
        match=r"batch norm 'net.1' normalised each process's batch separately.*drew random numbers on several",
    ):
        check_replayable(model, run, cpu)


def test_a_replay_that_misses_is_refused_after_the_first_interval_naming_the_causes(tmp_path):
    class ExtraLoss(TinyClassifier):
        def training_step(self, batch, batch_idx):  # a term the attribution_train_loss hook does not know
            return super().training_step(batch, batch_idx) + 0.1 * sum(p.square().sum() for p in self.parameters())

    data = classification_data(n=12, dtype=torch.float64)
    runs = record(tmp_path, ExtraLoss, data, lr=0.2)
    with pytest.raises(
        ReplayMismatchError,
        match=r"Replaying seed_0 to step 5 lands .* away from its recorded weights.*"
        r"Its first training loss already differs \(step 1, micro-batch 1: the run's loss [\d.]+, the replay's [\d.]+\), "
        r"before any update: the loss training_step returns is not the attribution_train_loss hook's",
    ):
        Attributor(ExtraLoss, runs, data, estimator=Unrolled(), progress=False).attribute(data)
    # The ground truth replays through the same check: it refuses rather than retrain another run.
    with pytest.raises(
        ReplayMismatchError, match=r"Replaying seed_0 to step 5 lands .* away from its recorded weights"
    ):
        retrain(ExtraLoss, runs, data, data, leave_one_out_weights(len(data), [0, 1]), progress=False)


def test_a_replay_that_misses_only_at_the_end_is_refused_by_retrain_and_warned_by_unrolled(tmp_path):
    class LateExtraLoss(TinyClassifier):
        def training_step(self, batch, batch_idx):  # after the first snapshot interval (steps 1-5) only
            loss = super().training_step(batch, batch_idx)
            return loss + (0.1 * sum(p.square().sum() for p in self.parameters()) if self.global_step >= 5 else 0.0)

    data = classification_data(n=12, dtype=torch.float64)
    runs = record(tmp_path, LateExtraLoss, data, lr=0.2)
    assert load_runs(runs)[0].snapshot_steps == [0, 5, 6]
    # The losses show where: the run's loss at step 6 has the extra term, the replay's has not.
    late = r"losses match the run's up to step 5 and the first after that step's update differs \(step 6, micro-batch 1"
    with pytest.warns(
        UserWarning, match=rf"Replaying seed_0 to step 6 lands .*{late}.* Unrolled effects describe the replay"
    ):
        Attributor(LateExtraLoss, runs, data, estimator=Unrolled(), progress=False).attribute(data)
    with pytest.raises(
        ReplayMismatchError, match=r"Replaying seed_0 to step 6 lands .* away from its recorded weights"
    ):
        retrain(LateExtraLoss, runs, data, data, leave_one_out_weights(len(data), [0]), progress=False)


def test_a_replay_that_leaves_the_run_inside_an_accumulated_step_is_diagnosed_there(tmp_path):
    class OddBatchesExtraLoss(TinyClassifier):
        def training_step(self, batch, batch_idx):  # the second micro-batch of every step adds a term
            loss = super().training_step(batch, batch_idx)
            return loss + (0.1 * sum(p.square().sum() for p in self.parameters()) if batch_idx % 2 else 0.0)

    data = classification_data(n=12, dtype=torch.float64)
    pl.seed_everything(0)
    trainer(
        tmp_path,
        [TrajectoryRecorder(tmp_path / "runs", every_n_train_steps=2)],
        max_epochs=2,
        precision="64-true",
        accumulate_grad_batches=2,
    ).fit(OddBatchesExtraLoss(lr=0.2), DataLoader(data, batch_size=3, shuffle=True))
    with pytest.raises(
        ReplayMismatchError,
        match=r"The first loss that differs \(step 1, micro-batch 2: .*\) follows the step's earlier micro-batches, "
        r"which match, with no update between",
    ):
        Attributor(OddBatchesExtraLoss, tmp_path / "runs", data, estimator=Unrolled(), progress=False).attribute(data)


def test_a_replay_that_leaves_the_run_between_snapshots_is_refused_at_the_next_one(tmp_path):
    """Every snapshot is checked, not only the first and the last: weights changed by a callback at step 3
    (of 12, snapshots every 2 steps) are refused at step 4, before unrolling's reverse pass."""

    class ShrinkOnce(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3 and batch_idx == 2:
                with torch.no_grad():
                    for p in pl_module.parameters():
                        p.mul_(0.9)

    data = classification_data(n=12, dtype=torch.float64)
    pl.seed_everything(0)
    trainer(
        tmp_path,
        [TrajectoryRecorder(tmp_path / "runs", every_n_train_steps=2), ShrinkOnce()],
        max_epochs=4,
        precision="64-true",
    ).fit(TinyClassifier(lr=0.2), DataLoader(data, batch_size=4))
    with pytest.raises(
        ReplayMismatchError, match=r"Replaying seed_0 to step 4 lands .* step 3's update is not the run's"
    ):
        Attributor(TinyClassifier, tmp_path / "runs", data, Unrolled(), progress=False).attribute(data)
    # A run that replays exactly records how close it landed.
    clean = record(tmp_path / "clean", TinyClassifier, data, lr=0.2)
    result = Attributor(TinyClassifier, clean, data, Unrolled(), progress=False).attribute(data)
    assert result.settings["per_run"][0]["replay_gap"] < 1e-10


def test_a_bf16_mixed_run_replays_within_the_documented_bound(tmp_path):
    data = classification_data(n=24)
    pl.seed_everything(0)
    model = TinyClassifier(hidden=8, lr=0.1, momentum=0.9)
    trainer(
        tmp_path, [TrajectoryRecorder(tmp_path / "runs", every_n_train_steps=4)], max_epochs=3, precision="bf16-mixed"
    ).fit(model, DataLoader(data, batch_size=6, shuffle=True))
    [run] = load_runs(tmp_path / "runs")
    replayed = replay(model, run, data, torch.ones(1, 24))
    gap = max(
        ((t[0] - run.state_dict()[n]).abs().max() / run.state_dict()[n].abs().max()).item() for n, t in replayed.items()
    )
    assert 1e-5 < gap < 2e-2  # bf16 rounding, not reproduced; within the tolerance the estimator accepts
    result = Attributor(TinyClassifier, tmp_path / "runs", data, estimator=Unrolled(), progress=False).attribute(data)
    assert torch.isfinite(result.effects).all()


def test_segmented_takes_sgd_exactly_not_asgd():
    from dataclasses import replace
    from pathlib import Path
    from types import SimpleNamespace

    from lightning_dtda.estimators.segmented import _check_optimizer

    manifest = Trajectory(Path(__file__).parent / "data" / "runs_0_1" / "seed_0").manifest
    run = SimpleNamespace(name="seed_0", manifest=replace(manifest, optimizer_class="torch.optim.asgd.ASGD"))
    with pytest.raises(
        UnsupportedTrainingError, match="Segmented models SGD, Adam and AdamW.* used torch.optim.asgd.ASGD"
    ):
        _check_optimizer(run, "ggn")
    _check_optimizer(
        SimpleNamespace(name="seed_0", manifest=replace(manifest, optimizer_class="torch.optim.sgd.SGD")), "ekfac"
    )


def test_attentions_key_bias_moved_by_adam_on_rounding_noise_does_not_fail_the_replay(tmp_path):
    """Softmax ignores the key bias, so its float32 gradient is rounding noise, which AdamW turns into steps
    the replay cannot reproduce; no output depends on it, so the replay check leaves it out and unrolls."""
    from lightning_dtda.replay.check import functionless_entries

    data = token_data(24)
    pl.seed_everything(0)
    trainer(tmp_path, [TrajectoryRecorder(tmp_path / "runs", every_n_train_steps=4)], max_epochs=3).fit(
        TinyTransformer(dropout=0.1), DataLoader(data, batch_size=6, shuffle=True)
    )
    [run] = load_runs(tmp_path / "runs")
    model = TinyTransformer(dropout=0.1)
    assert functionless_entries(model) == {"layer.self_attn.in_proj_bias": slice(8, 16)}
    # An extra key without the key bias (add_zero_attn, bias_k) makes the shift uneven: then it counts.
    assert functionless_entries(torch.nn.MultiheadAttention(8, 2, add_zero_attn=True)) == {}
    assert functionless_entries(torch.nn.MultiheadAttention(8, 2, add_bias_kv=True)) == {}
    replayed = replay(model, run, data, torch.ones(1, 24))["layer.self_attn.in_proj_bias"][0]
    recorded = run.state_dict()["layer.self_attn.in_proj_bias"]
    key = slice(8, 16)
    assert (replayed[key] - recorded[key]).abs().max() > 1e-3 * recorded.abs().max()  # the noise steps differ
    others = torch.cat([recorded[:8], recorded[16:]])
    assert (torch.cat([replayed[:8], replayed[16:]]) - others).abs().max() < 1e-4 * others.abs().max()
    result = Attributor(TinyTransformer, [run], data, estimator=Unrolled(), progress=False).attribute(
        token_data(3, seed=1)
    )
    assert result.settings["per_run"][0]["replay_gap"] < 1e-4
