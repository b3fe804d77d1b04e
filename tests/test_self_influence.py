"""Self-influence (each example's removal effect on its own loss) and whole-set influence (on the mean measurement)."""

import pytest
import torch
from models import LinearRegression, TinyClassifier, classification_data, regression_data
from oracles import dense_ggn_effects, pearson, relative_error, spearman
from test_influence import record

from lightning_dtda import Attributor, Influence, Segmented, SelfInfluence, Unrolled
from lightning_dtda.damping import DAMPING_GRID
from lightning_dtda.estimators.base import curvature_examples
from lightning_dtda.estimators.influence import DAMPING_PROBES


@pytest.fixture(scope="module")
def classifier_runs(tmp_path_factory):
    """Two seeds of a float64 MLP (6-8-3, 83 parameters) on 40 examples, and 5 queries (as in test_influence)."""
    tmp_path = tmp_path_factory.mktemp("classifier")
    data = classification_data(n=40, dtype=torch.float64)
    queries = classification_data(n=5, seed=1, dtype=torch.float64)
    return (
        record(tmp_path, lambda: TinyClassifier(hidden=8), data, seeds=(0, 1), epochs=20, precision="64-true"),
        data,
        queries,
    )


def diagonal_of_attribute(runs, data, estimator):
    """effects[s, n, n] of attributing the training set to itself: the [N, N] way."""
    effects = Attributor(TinyClassifier, runs, data, estimator=estimator, progress=False).attribute(data).effects
    return torch.diagonal(effects, dim1=1, dim2=2)


@pytest.mark.parametrize(
    "estimator",
    [
        Influence(curvature="ggn", solver="dense"),
        Influence(curvature="ekfac", damping=3e-3),
        Influence(curvature="kfac", damping=3e-3),
        Influence(curvature="identity", damping=0.5),
    ],
)
def test_self_influence_is_the_diagonal_of_the_training_sets_effects_on_itself(classifier_runs, estimator):
    runs, data, _ = classifier_runs
    result = Attributor(TinyClassifier, runs, data, estimator=estimator, batch_size=16, progress=False).self_influence()
    assert isinstance(result, SelfInfluence) and result.effects.shape == (2, 40) and result.losses.shape == (2, 40)
    assert relative_error(result.effects, diagonal_of_attribute(runs, data, estimator)) < 1e-10
    assert (result.effects > 0).all()  # a PSD curvature: removing an example raises its own loss


def test_self_influence_equals_the_dense_ggn_oracle_and_its_losses_are_the_training_losses(classifier_runs):
    runs, data, _ = classifier_runs
    attributor = Attributor(
        TinyClassifier, runs, data, estimator=Influence(curvature="ggn"), batch_size=16, progress=False
    )
    result = attributor.self_influence()
    for s, run in enumerate(attributor.runs):
        model = attributor.load_model(run)
        damping = attributor.estimator.damping_for(run)
        assert result.settings["per_run"][s]["damping"] == pytest.approx(damping)
        _, G, g_train, _ = dense_ggn_effects(model, *data.tensors, *data.tensors[:1], data.tensors[1][:1], damping)
        solved = torch.linalg.solve(G + damping * torch.eye(len(G), dtype=G.dtype), g_train.T).T
        assert relative_error(result.effects[s], (g_train * solved).sum(1) / 40) < 1e-8
        x, y = data.tensors
        assert torch.allclose(
            result.losses[s], torch.nn.functional.cross_entropy(model(x), y, reduction="none").detach()
        )


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_kronecker_auto_damping_of_self_influence_is_fitted_on_a_random_draw_of_training_gradients(
    classifier_runs, curvature
):
    """No queries: the damping is the grid's best for the training gradients of DAMPING_PROBES examples drawn
    at random (checked with exact solves on the dense GGN), and the effects are those at that damping."""
    from lightning_dtda.curvature.fit import fit_curvature

    runs, data, _ = classifier_runs
    attributor = Attributor(TinyClassifier, runs, data, estimator=Influence(curvature=curvature), progress=False)
    result = attributor.self_influence()
    run = attributor.runs[0]
    model = attributor.load_model(run)
    lam_g = attributor.estimator.damping_for(run)
    x, y = data.tensors
    approximate = fit_curvature(
        curvature,
        model,
        torch.nn.CrossEntropyLoss(),
        list(model.parameters()),
        [(x[:25], y[:25]), (x[25:], y[25:])],
        40,
    )
    _, G, g_train, _ = dense_ggn_effects(model, x, y, x[:1], y[:1], 1.0)
    probes = g_train[curvature_examples(40, DAMPING_PROBES)]
    A = G + lam_g * torch.eye(len(G), dtype=G.dtype)
    exact = torch.linalg.solve(A, probes.T).T

    def weighted_cosine(lam):
        solved = approximate.solve(probes, lam)
        return (((solved @ A * exact).sum(1)) ** 2 / (solved @ A * solved).sum(1)).sum().item()

    best = max((lam_g * f for f in DAMPING_GRID), key=weighted_cosine)
    assert result.settings["per_run"][0]["damping"] == pytest.approx(best)
    assert result.settings["per_run"][0]["ggn_damping"] == pytest.approx(lam_g)
    fixed = Attributor(
        TinyClassifier, runs, data, estimator=Influence(curvature=curvature, damping=best), progress=False
    ).self_influence()
    assert torch.allclose(result.effects[0], fixed.effects[0])


def test_self_influence_predicts_the_leave_one_out_change_of_the_examples_own_loss(tmp_path):
    """Converged least squares: removing example k raises its own squared error; the closed form is the truth."""
    n = 40
    data = regression_data(n=n, d_in=4, dtype=torch.float64)
    runs = record(
        tmp_path, lambda: LinearRegression(d_in=4, lr=0.1), data, epochs=150, batch_size=10, precision="64-true"
    )
    result = Attributor(
        LinearRegression, runs, data, estimator=Influence(curvature="ggn"), progress=False
    ).self_influence()
    x, y = data.tensors
    X = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
    fitted = torch.linalg.lstsq(X, y).solution
    truth = []
    for k in range(n):
        keep = torch.arange(n) != k
        w = torch.linalg.lstsq(X[keep], y[keep]).solution
        truth.append(((X[k] @ w - y[k]) ** 2 - (X[k] @ fitted - y[k]) ** 2).sum())
    truth = torch.stack(truth)
    assert (truth > 0).all() and (result.effects[0] > 0).all()
    # first order: 2 h r^2 (leverage h, residual r); exact: r^2 ((1 - h)^-2 - 1), larger where h is large
    assert pearson(result.effects[0], truth) > 0.98 and spearman(result.effects[0], truth) > 0.98


@pytest.mark.parametrize(
    "estimator, message",
    [
        (Unrolled(), "Unrolled gives effects one measurement at a time .* Use Influence"),
        (Segmented(segments=2), "Segmented gives effects one measurement at a time"),
        (
            Influence(curvature="ggn", solver="krylov"),
            "block conjugate gradients would solve all N=40 training gradients.* solver='dense'",
        ),
    ],
)
def test_self_influence_refuses_estimators_that_would_need_one_solve_per_example(classifier_runs, estimator, message):
    runs, data, _ = classifier_runs
    with pytest.raises(ValueError, match=message):
        Attributor(TinyClassifier, runs, data, estimator=estimator, progress=False).self_influence()


def test_self_influence_statistics_treat_each_examples_own_loss_as_its_measurement():
    effects = torch.tensor([[1.0, -2.0], [3.0, 0.5], [0.0, 1.0]])
    losses = torch.tensor([[0.5, 1.0], [0.1, 2.0], [0.3, 0.2]])
    result = SelfInfluence(effects, losses, ["a", "b", "c"])
    assert torch.allclose(result.mean_shift(), torch.tensor([4 / 3, -0.5 / 3]))
    assert torch.allclose(result.statistic("variance"), (losses + effects).var(0) - losses.var(0))
    low, high = result.interval("mean", level=0.8)
    assert (
        low.shape == high.shape == (2,) and (low <= result.mean_shift()).all() and (result.mean_shift() <= high).all()
    )
    values, indices = result.top_k(1)
    assert indices.tolist() == [0] and values.tolist() == pytest.approx([4 / 3])
    with pytest.raises(ValueError, match="do not agree on \\[seeds, train\\]"):
        SelfInfluence(effects, losses[:, :1], ["a", "b", "c"])


@pytest.mark.parametrize(
    "estimator",
    # One solver for both: "auto" may solve one column by CG and five densely (each exact to its tolerance).
    [
        Influence(curvature="ggn", solver="dense"),
        Influence(curvature="ekfac", damping=3e-3),
        Segmented(segments=2, curvature="ggn", solver="dense"),
    ],
)
def test_whole_set_influence_is_the_mean_of_the_per_query_effects(classifier_runs, estimator):
    runs, data, queries = classifier_runs
    attributor = Attributor(TinyClassifier, runs, data, estimator=estimator, batch_size=2, progress=False)
    per_query = attributor.attribute(queries)
    whole = attributor.attribute(queries, reduce="mean")
    assert whole.effects.shape == (2, 1, 40) and whole.measurements.shape == (2, 1)
    assert relative_error(whole.effects[:, 0], per_query.effects.mean(1)) < 1e-10
    assert torch.allclose(whole.measurements[:, 0], per_query.measurements.mean(1))
    assert whole.settings["reduce"] == "mean"
    with pytest.raises(ValueError, match="reduce must be None .* or 'mean'"):
        attributor.attribute(queries, reduce="sum")


def test_whole_set_influence_has_its_own_cache_entry(classifier_runs, tmp_path):
    runs, data, queries = classifier_runs
    attributor = Attributor(
        TinyClassifier, runs, data, estimator=Influence(curvature="ggn"), progress=False, cache_dir=tmp_path
    )
    per_query = attributor.attribute(queries)
    whole = attributor.attribute(queries, reduce="mean")
    assert whole.effects.shape == (2, 1, 40) and per_query.effects.shape == (2, 5, 40)
    assert relative_error(attributor.attribute(queries, reduce="mean").effects, whole.effects) == 0


def test_whole_set_influence_through_running_statistics_is_the_mean_of_the_per_query_effects(tmp_path):
    """Unrolled on a BatchNorm CNN also differentiates the measurement through the running statistics;
    those gradients are averaged over the queries too."""
    from models import WeightedCNN, fit_weighted_cnn, image_data

    data, queries = image_data(24, dtype=torch.float64), image_data(3, seed=1, dtype=torch.float64)
    fit_weighted_cnn(tmp_path, data)
    attributor = Attributor(WeightedCNN, tmp_path / "runs", data, estimator=Unrolled(), progress=False)
    per_query, whole = attributor.attribute(queries), attributor.attribute(queries, reduce="mean")
    assert relative_error(whole.effects[:, 0], per_query.effects.mean(1)) < 1e-10


def test_self_influence_through_the_tracked_parameters_only(tmp_path):
    """EK-FAC tracks the embedding, attention and linear layers, not the LayerNorms: self-influence is the
    diagonal of the effects through those parameters, and its settings name them."""
    from models import TinyTransformer, token_data

    data = token_data(24)
    runs = record(tmp_path, lambda: TinyTransformer(dropout=0.0), data, epochs=3, precision="64-true")
    estimator = Influence(curvature="ekfac", damping=0.1)
    attributor = Attributor(TinyTransformer, runs, data, estimator=estimator, progress=False)
    result = attributor.self_influence()
    diagonal = torch.diagonal(attributor.attribute(data).effects, dim1=1, dim2=2)
    assert relative_error(result.effects, diagonal) < 1e-10
    tracked = result.settings["per_run"][0]["parameters"]
    assert "layer.norm1.weight" not in tracked and "embed.weight" in tracked and "head.weight" in tracked
