import warnings

import lightning.pytorch as pl
import pytest
import torch
from models import LinearRegression, TinyClassifier, classification_data, regression_data, trainer
from oracles import dense_ggn_effects, pearson, relative_error, spearman
from torch.utils.data import DataLoader, TensorDataset

from lightning_dtda import Attributor, Influence, TrajectoryRecorder, load_runs
from lightning_dtda.curvature.fit import fit_curvature
from lightning_dtda.curvature.ggn import NYSTROM_MAX_COLUMNS, NYSTROM_RANKS
from lightning_dtda.damping import DAMPING_GRID
from lightning_dtda.estimators.base import curvature_examples


def record(tmp_path, model, data, seeds=(0,), epochs=5, batch_size=8, **trainer_kwargs):
    for seed in seeds:
        pl.seed_everything(seed)
        trainer(tmp_path, [TrajectoryRecorder(tmp_path / "runs")], max_epochs=epochs, **trainer_kwargs).fit(
            model() if callable(model) and not isinstance(model, pl.LightningModule) else model,
            DataLoader(data, batch_size=batch_size, shuffle=True),
        )
    return tmp_path / "runs"


@pytest.fixture(scope="module")
def classifier_runs(tmp_path_factory):
    """Two seeds of a float64 MLP (6-8-3, 83 parameters) on 40 examples, and 5 queries."""
    tmp_path = tmp_path_factory.mktemp("classifier")
    data = classification_data(n=40, dtype=torch.float64)
    queries = classification_data(n=5, seed=1, dtype=torch.float64)
    runs = record(tmp_path, lambda: TinyClassifier(hidden=8), data, seeds=(0, 1), epochs=20, precision="64-true")
    return runs, data, queries


def oracle_for(attributor, run, data, queries, loss="ce"):
    model = attributor.load_model(run)
    return dense_ggn_effects(model, *data.tensors, *queries.tensors, attributor.estimator.damping_for(run), loss)[0]


def test_ggn_equals_dense_damped_ggn_solve(classifier_runs):
    runs, data, queries = classifier_runs
    attributor = Attributor(TinyClassifier, runs, data, estimator=Influence(curvature="ggn"), progress=False)
    result = attributor.attribute(queries)
    assert result.effects.shape == (2, 5, 40) and result.measurements.shape == (2, 5)
    for s, run in enumerate(attributor.runs):
        assert relative_error(result.effects[s], oracle_for(attributor, run, data, queries)) < 1e-6


def test_ggn_by_conjugate_gradients_equals_dense_solve(classifier_runs):
    runs, data, queries = classifier_runs
    attributor = Attributor(
        TinyClassifier, runs, data, estimator=Influence(curvature="ggn", damping=1e-2, solver="krylov"), progress=False
    )
    run = attributor.runs[0]
    effects, _, info = attributor.attribute_run(run, queries)
    assert relative_error(effects, oracle_for(attributor, run, data, queries)) < 1e-5
    assert info["cg_residual"] < 1e-5 and 0 < info["cg_products"] < 83 and info["cg_seconds"] > 0


def test_ggn_products_cut_batches_to_bound_their_tangents_and_solve_the_same(classifier_runs, monkeypatch):
    import lightning_dtda.curvature.ggn as ggn

    layer = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())  # 2 outputs of 3 floats: 24 bytes an example
    x = torch.randn(7, 4)
    monkeypatch.setattr(ggn, "GGN_TANGENT_BYTES", 480)
    assert ggn.ggn_batch_size(layer, x, 7, 2, 128) == 10  # 2 columns x 24 bytes
    assert ggn.ggn_batch_size(layer, x, 7, 2, 4) == 4
    assert ggn.ggn_batch_size(layer, x, 7, 100, 128) == 1
    runs, data, queries = classifier_runs
    monkeypatch.setattr(ggn, "GGN_TANGENT_BYTES", 2000)  # a few examples a batch
    attributor = Attributor(
        TinyClassifier, runs, data, estimator=Influence(curvature="ggn", damping=1e-2, solver="krylov"), progress=False
    )
    run = attributor.runs[0]
    inputs, targets = data.tensors
    assert ggn.ggn_batch_size(attributor.load_model(run), inputs, len(targets), len(queries), 128) < 10
    effects, _, _ = attributor.attribute_run(run, queries)
    assert relative_error(effects, oracle_for(attributor, run, data, queries)) < 1e-5


def test_one_query_is_solved_with_a_nystrom_preconditioner_in_fewer_products(classifier_runs):
    runs, data, queries = classifier_runs
    one = TensorDataset(*(t[:1] for t in queries.tensors))
    attributor = Attributor(
        TinyClassifier, runs, data, estimator=Influence(curvature="ggn", damping=1e-3, solver="krylov"), progress=False
    )
    run = attributor.runs[0]
    effects, _, info = attributor.attribute_run(run, one)
    assert relative_error(effects, oracle_for(attributor, run, data, one)) < 1e-5
    assert info["nystrom_rank"] == NYSTROM_RANKS[0] and info["nystrom_seconds"] > 0 and info["cg_residual"] < 1e-5
    model = attributor.load_model(run)
    curvatures = [
        fit_curvature(
            "ggn", model, torch.nn.CrossEntropyLoss(), list(model.parameters()), [data.tensors], 40, solver="krylov"
        )
        for _ in range(2)
    ]
    curvatures[1].preconditioned = False
    vector = torch.randn(1, 83, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    preconditioned, plain = (c.solve(vector, 1e-3) for c in curvatures)
    assert relative_error(preconditioned, plain) < 1e-5
    counts = [c.reports[-1]["cg_products"] for c in curvatures]
    assert "nystrom_rank" not in curvatures[1].reports[-1] and counts[0] < 0.7 * counts[1], counts
    wide = fit_curvature(
        "ggn", model, torch.nn.CrossEntropyLoss(), list(model.parameters()), [data.tensors], 40, solver="krylov"
    )
    wide.solve(
        torch.randn(NYSTROM_MAX_COLUMNS + 1, 83, dtype=torch.float64), 1e-3
    )  # wide blocks find the top of the spectrum themselves
    assert "nystrom_rank" not in wide.reports[-1]


def test_dense_ggn_of_a_float32_model_is_eigendecomposed_in_float64(tmp_path):
    """A float32 eigenbasis is orthogonal to ~1e-7, which at a small damping leaks the largest curvatures
    into the solve of the smallest (a user trial: 1e-2 relative error at damping 1e-5)."""
    data, queries = classification_data(n=60), classification_data(n=4, seed=1)
    runs = record(tmp_path, lambda: TinyClassifier(hidden=16), data, epochs=30)
    attributor = Attributor(
        TinyClassifier, runs, data, estimator=Influence(curvature="ggn", solver="dense", damping=1e-6), progress=False
    )
    run = attributor.runs[0]
    effects, _, _ = attributor.attribute_run(run, queries)
    model = attributor.load_model(run).double()
    exact = dense_ggn_effects(
        model, *(t.double() if t.is_floating_point() else t for t in (*data.tensors, *queries.tensors)), 1e-6
    )[0]
    assert (
        relative_error(effects.double(), exact) < 1e-2
    )  # the float32 GGN entries remain: 3e-3 here; a float32 eigh: 6e-2


def test_ggn_on_a_subset_of_the_training_set_uses_that_subsets_curvature(classifier_runs):
    """curvature_subset=k: the GGN of k randomly drawn examples; every example's gradient still contracted."""
    runs, data, queries = classifier_runs
    estimator = Influence(curvature="ggn", damping=1e-2, solver="krylov", curvature_subset=15)
    attributor = Attributor(TinyClassifier, runs, data, estimator=estimator, progress=False)
    run = attributor.runs[0]
    effects, _, _ = attributor.attribute_run(run, queries)
    model = attributor.load_model(run)
    chosen = curvature_examples(40, 15)
    assert len(set(chosen)) == 15
    x, y = data.tensors
    _, G_subset, _, _ = dense_ggn_effects(model, x[chosen], y[chosen], *queries.tensors, 1.0)
    _, _, g_train, g_query = dense_ggn_effects(model, x, y, *queries.tensors, 1.0)
    expected = (
        torch.linalg.solve(G_subset + 1e-2 * torch.eye(len(G_subset), dtype=G_subset.dtype), g_query.T).T
        @ g_train.T
        / 40
    )
    assert relative_error(effects, expected) < 1e-5
    assert relative_error(effects, oracle_for(attributor, run, data, queries)) > 1e-2  # the subset's curvature differs


def test_identity_is_a_scaled_gradient_dot_product(classifier_runs):
    runs, data, queries = classifier_runs
    attributor = Attributor(
        TinyClassifier, runs, data, estimator=Influence(curvature="identity", damping=0.5), progress=False
    )
    run = attributor.runs[0]
    effects, _, _ = attributor.attribute_run(run, queries)
    _, _, g_train, g_query = dense_ggn_effects(attributor.load_model(run), *data.tensors, *queries.tensors, 1.0)
    assert relative_error(effects, g_query @ g_train.T / (0.5 * 40)) < 1e-10


def test_measurements_are_the_query_losses(classifier_runs):
    runs, data, queries = classifier_runs
    attributor = Attributor(TinyClassifier, runs, data, estimator=Influence(curvature="identity"), progress=False)
    _, measurements, _ = attributor.attribute_run(attributor.runs[1], queries)
    model = attributor.load_model(attributor.runs[1])
    x, y = queries.tensors
    expected = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
    assert torch.allclose(measurements, expected.detach())


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_kfac_is_exact_for_one_linear_layer_with_mse(tmp_path, curvature):
    data = regression_data(n=30, d_in=4, d_out=3, dtype=torch.float64)
    queries = regression_data(n=4, d_in=4, d_out=3, seed=1, dtype=torch.float64)
    runs = record(tmp_path, lambda: LinearRegression(d_in=4, d_out=3), data, epochs=3, precision="64-true")
    attributor = Attributor(LinearRegression, runs, data, estimator=Influence(curvature=curvature), progress=False)
    [run] = attributor.runs
    effects, _, _ = attributor.attribute_run(run, queries)
    assert relative_error(effects, oracle_for(attributor, run, data, queries, loss="mse")) < 1e-4


def test_ekfac_is_at_least_as_close_to_the_ggn_as_kfac(classifier_runs):
    runs, data, queries = classifier_runs
    exact = (
        Attributor(TinyClassifier, runs, data, estimator=Influence(curvature="ggn"), progress=False)
        .attribute(queries)
        .effects
    )
    closeness = {
        kind: spearman(
            Attributor(TinyClassifier, runs, data, estimator=Influence(curvature=kind), progress=False)
            .attribute(queries)
            .effects,
            exact,
        )
        for kind in ("kfac", "ekfac")
    }
    assert closeness["ekfac"] >= closeness["kfac"]
    assert closeness["kfac"] > 0.5  # both approximations carry the exact answer's ranking


def test_ggn_predicts_leave_one_out_for_converged_linear_regression(tmp_path):
    """Least squares has a closed-form optimum with and without each example: the exact oracle."""
    n = 40
    data = regression_data(n=n, d_in=4, dtype=torch.float64)
    query = regression_data(n=1, d_in=4, seed=3, dtype=torch.float64)
    runs = record(
        tmp_path, lambda: LinearRegression(d_in=4, lr=0.1), data, epochs=150, batch_size=10, precision="64-true"
    )
    result = Attributor(LinearRegression, runs, data, estimator=Influence(curvature="ggn"), progress=False).attribute(
        query
    )

    x, y = data.tensors
    X = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
    xq = torch.cat([query.tensors[0], torch.ones(1, 1, dtype=x.dtype)], 1)
    yq = query.tensors[1]

    def query_loss(keep):
        w = torch.linalg.lstsq(X[keep], y[keep]).solution
        return ((xq @ w - yq) ** 2).mean()

    base = query_loss(torch.ones(n, dtype=torch.bool))
    truth = torch.stack([query_loss(torch.arange(n) != k) - base for k in range(n)])
    assert pearson(result.effects[0, 0], truth) > 0.99


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_kronecker_factored_auto_damping_maximises_the_energy_cosine_to_the_exact_solve(classifier_runs, curvature):
    """K-FAC/EK-FAC's "auto" damping: among lam_G * 10^(k/2), the one whose solves (K + lam)^-1 g_q are
    closest in direction to the exact (G + lam_G)^-1 g_q in the (G + lam_G) norm, checked against exact
    solves on the dense GGN; the effects are K-FAC's at that damping."""
    runs, data, queries = classifier_runs
    attributor = Attributor(TinyClassifier, runs, data, estimator=Influence(curvature=curvature), progress=False)
    run = attributor.runs[0]
    effects, _, info = attributor.attribute_run(run, queries)
    lam_g = 1 / sum(step.lrs[0] for step in run.steps)  # the GGN rule: plain SGD, no weight decay here
    assert info["ggn_damping"] == pytest.approx(lam_g)

    model = attributor.load_model(run)
    x, y = data.tensors
    batches, loss = [(x[:25], y[:25]), (x[25:], y[25:])], torch.nn.CrossEntropyLoss()
    approximate = fit_curvature(curvature, model, loss, list(model.parameters()), batches, 40)
    _, G, _, g_query = dense_ggn_effects(model, x, y, *queries.tensors, 1.0)
    A = G + lam_g * torch.eye(len(G), dtype=G.dtype)
    exact = torch.linalg.solve(A, g_query.T).T

    def weighted_cosine(lam):
        solved = approximate.solve(g_query, lam)
        inner = (solved @ A * exact).sum(1)
        return (inner**2 / (solved @ A * solved).sum(1)).sum().item()  # = sum |x*|_A^2 cos_A^2

    candidates = [lam_g * f for f in DAMPING_GRID]
    best = max(candidates, key=weighted_cosine)
    assert info["damping"] == pytest.approx(best)
    fixed, _, _ = Attributor(
        TinyClassifier, runs, data, estimator=Influence(curvature=curvature, damping=best), progress=False
    ).attribute_run(run, queries)
    assert torch.allclose(effects, fixed)
    assert len({round(weighted_cosine(lam), 9) for lam in candidates}) > 5  # the criterion does discriminate


def test_adam_auto_damping_counts_adams_step_per_unit_of_gradient(tmp_path):
    """Under Adam an entry moves lr / (sqrt(v_hat) + eps) per unit of gradient: the recorder notes the
    median multiplier at each snapshot (checked against the saved optimizer state), the learning-rate
    time uses it, and AdamW's decoupled decay enters divided by it. A run without it is refused."""
    import json

    from lightning_dtda import load_runs

    class AdamWClassifier(TinyClassifier):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.05)

    data = classification_data(n=24)
    pl.seed_everything(0)
    trainer(tmp_path, [TrajectoryRecorder(tmp_path / "runs", save_optimizer_state=True)], max_epochs=3).fit(
        AdamWClassifier(hidden=5), DataLoader(data, batch_size=8, shuffle=True)
    )
    [run] = load_runs(tmp_path / "runs")
    assert run.snapshots[0].step_scale is None
    for i, entry in enumerate(run.snapshots[1:], start=1):
        state = run.snapshot(i).optimizer_state
        beta2, eps = state["param_groups"][0]["betas"][1], state["param_groups"][0]["eps"]
        multipliers = torch.cat(
            [
                1 / ((s["exp_avg_sq"] / (1 - beta2 ** float(s["step"]))).sqrt() + eps).flatten()
                for s in state["state"].values()
            ]
        )
        assert entry.step_scale == pytest.approx(multipliers.median().item(), rel=1e-6)
        assert entry.step_scale > 10  # far from SGD's 1: the reason for the rule
    time = sum(
        step.lrs[0] * run.snapshots[1 + k // 3].step_scale for k, step in enumerate(run.steps)
    )  # 3 steps an epoch
    assert Influence(curvature="ggn").damping_for(run) == pytest.approx(1 / time + 0.05 / run.snapshots[-1].step_scale)

    manifest = tmp_path / "runs" / "seed_0" / "manifest.json"
    recorded = json.loads(manifest.read_text())
    for entry in recorded["snapshots"]:
        entry.pop("step_scale", None)
    recorded.pop("sha256")  # as a run recorded before 0.3: without step scales or a checksum
    manifest.write_text(json.dumps(recorded))
    [old] = load_runs(tmp_path / "runs")
    with pytest.raises(
        ValueError, match="trained with AdamW, whose step per unit of gradient .* record it again, or give a damping"
    ):
        Influence(curvature="ggn").damping_for(old)


def test_exact_ggn_on_a_transformer_layer(tmp_path):
    """Eval mode sends nn.TransformerEncoderLayer down torch's fused fast path, which has no forward-mode
    derivative: GGN products (jvp) switch it off, dense and Krylov alike."""
    from models import TinyTransformer, token_data

    data, queries = token_data(24), token_data(3, seed=1)
    runs = record(tmp_path, lambda: TinyTransformer(dropout=0.1), data, epochs=3, precision="64-true")
    for solver in ("dense", "krylov"):
        attributor = Attributor(
            TinyTransformer,
            runs,
            data,
            estimator=Influence(curvature="ggn", damping=0.1, solver=solver),
            progress=False,
        )
        run = attributor.runs[0]
        with warnings.catch_warnings():
            # vmap's fallback for attention is exact; torch's request to file an issue is not the user's business
            warnings.filterwarnings("error", message="There is a performance drop")
            effects, _, _ = attributor.attribute_run(run, queries)
        assert (
            relative_error(
                effects, dense_ggn_effects(attributor.load_model(run), *data.tensors, *queries.tensors, 0.1)[0]
            )
            < 1e-5
        )


def test_auto_damping_reads_amsgrads_maximum_and_refuses_optimizers_it_does_not_model(tmp_path):
    """With amsgrad Adam divides by the running maximum of the second moment; RMSprop's step per unit of
    gradient is not modelled, so "auto" refuses it rather than treat it as SGD."""
    from lightning_dtda import load_runs

    class AmsgradClassifier(TinyClassifier):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.05, betas=(0.9, 0.9), amsgrad=True)

    class RMSpropClassifier(TinyClassifier):
        def configure_optimizers(self):
            return torch.optim.RMSprop(self.parameters(), lr=0.01)

    data = classification_data(n=24)
    for cls in (AmsgradClassifier, RMSpropClassifier):
        pl.seed_everything(0)
        trainer(tmp_path, [TrajectoryRecorder(tmp_path / cls.__name__, save_optimizer_state=True)], max_epochs=8).fit(
            cls(hidden=5), DataLoader(data, batch_size=8, shuffle=True)
        )
    [run] = load_runs(tmp_path / "AmsgradClassifier")
    state = run.snapshot(-1).optimizer_state
    beta2, eps = state["param_groups"][0]["betas"][1], state["param_groups"][0]["eps"]
    multipliers = torch.cat(
        [
            1 / ((s["max_exp_avg_sq"] / (1 - beta2 ** float(s["step"]))).sqrt() + eps).flatten()
            for s in state["state"].values()
        ]
    )
    assert run.snapshots[-1].step_scale == pytest.approx(multipliers.median().item(), rel=1e-6)
    plain = torch.cat(
        [
            1 / ((s["exp_avg_sq"] / (1 - beta2 ** float(s["step"]))).sqrt() + eps).flatten()
            for s in state["state"].values()
        ]
    )
    assert run.snapshots[-1].step_scale != pytest.approx(plain.median().item(), rel=1e-3)  # the maximum does differ
    [rmsprop] = load_runs(tmp_path / "RMSpropClassifier")
    with pytest.raises(ValueError, match="models SGD, Adam and AdamW.* trained with RMSprop: give a damping"):
        Influence(curvature="ggn").damping_for(rmsprop)


def test_adams_step_scale_leaves_out_entries_that_never_had_a_gradient(tmp_path):
    """Unused embedding rows keep v = 0, and 1 / (sqrt(0) + eps) = 1e8; when they are most of the model
    the median would be theirs and the auto damping ~1e-8. Only entries with a gradient count."""
    from torch import nn

    from lightning_dtda import load_runs

    class Bag(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(300, 4), nn.Linear(4, 2)

        def forward(self, tokens):
            return self.head(torch.tanh(self.embed(tokens).mean(1)))

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    tokens = torch.randint(0, 6, (24, 5), generator=torch.Generator().manual_seed(0))  # rows 6..299 never used
    data = torch.utils.data.TensorDataset(tokens, (tokens == 3).any(1).long())
    pl.seed_everything(0)
    trainer(tmp_path, [TrajectoryRecorder(tmp_path / "runs", save_optimizer_state=True)], max_epochs=2).fit(
        Bag(), DataLoader(data, batch_size=8, shuffle=True)
    )
    [run] = load_runs(tmp_path / "runs")
    state = run.snapshot(-1).optimizer_state
    beta2, eps = state["param_groups"][0]["betas"][1], state["param_groups"][0]["eps"]
    v = torch.cat([(s["exp_avg_sq"] / (1 - beta2 ** float(s["step"]))).flatten() for s in state["state"].values()])
    assert (v == 0).float().mean() > 0.5
    assert run.snapshots[-1].step_scale == pytest.approx((1 / (v[v > 0].sqrt() + eps)).median().item(), rel=1e-6)
    assert run.snapshots[-1].step_scale < 1e4


def test_a_factor_eigh_lapack_cannot_converge_on_is_decomposed_after_a_jitter(monkeypatch):
    """LAPACK's eigh failed on the 1M-parameter CNN's 4,097-square input factor (a matrix too large to keep
    here); the failure is raised once, as LAPACK raised it, and the fallback's decomposition must hold
    for the factor itself."""
    from lightning_dtda.curvature.base import factor_eigh

    x = torch.randn(50, 8, dtype=torch.float64)
    factor = (x.T @ x / 50).repeat_interleave(3, 0).repeat_interleave(3, 1)  # rank 8 of 24: repeated zero eigenvalues
    original = torch.linalg.eigh
    calls = []

    def fails_once(matrix):
        calls.append(matrix)
        if len(calls) == 1:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return original(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", fails_once)
    values, vectors = factor_eigh(factor)
    assert len(calls) == 2 and not torch.equal(calls[1], calls[0])  # retried on a jittered matrix
    assert torch.allclose(vectors @ torch.diag(values) @ vectors.T, factor, rtol=0, atol=1e-12)
    assert torch.allclose(vectors.T @ vectors, torch.eye(24, dtype=torch.float64), rtol=0, atol=1e-12)


def test_solver_auto_chooses_by_predicted_time_and_says_why():
    """A tiny model with a few queries: building the GGN (P = 83 columns) beats ~60 products of each query
    column; a 2,000-parameter model with one query: the other way round (tens of times apart, either way)."""
    data = classification_data(n=40, dtype=torch.float64)
    for hidden, columns, expected in ((5, 4, "dense"), (200, 1, "krylov")):
        model = TinyClassifier(hidden=hidden).double().eval()
        params = list(model.parameters())
        curvature = fit_curvature(
            "ggn", model, torch.nn.CrossEntropyLoss(), params, [data.tensors], 40, solver="auto", num_columns=columns
        )
        assert curvature.solver_report["solver"] == expected, curvature.solver_report
        assert type(curvature).__name__ == {"dense": "DenseGGN", "krylov": "KrylovGGN"}[expected]
        assert "predicted" in curvature.solver_report["solver_reason"]
    # Without query columns (self-influence solves every training gradient): dense up to 4,096 parameters.
    model = TinyClassifier(hidden=5).double().eval()
    curvature = fit_curvature("ggn", model, torch.nn.CrossEntropyLoss(), list(model.parameters()), [data.tensors], 40)
    assert type(curvature).__name__ == "DenseGGN" and curvature.solver_report is None


def test_the_default_curvature_is_the_exact_ggn_until_the_queries_or_its_memory_make_ekfac_the_choice(
    classifier_runs, monkeypatch
):
    from lightning_dtda.estimators import influence

    folder, data, queries = classifier_runs
    runs = load_runs(folder)
    default = Attributor(TinyClassifier, runs, data, progress=False)
    result = default.attribute(queries)
    assert result.settings["curvature"] == "ggn" and "exact GGN" in result.settings["curvature_reason"]
    assert default.estimator.curvature == "auto"  # the Attributor's estimator is unchanged by the call
    for s, run in enumerate(default.runs):  # the exact damped GGN solve, as Influence("ggn") gives it
        assert relative_error(result.effects[s], oracle_for(default, run, data, queries)) < 1e-5
    # More query columns than AUTO_MAX_COLUMNS: EK-FAC, with the reason.
    many = classification_data(n=influence.AUTO_MAX_COLUMNS + 1, seed=2, dtype=torch.float64)
    result = Attributor(TinyClassifier, runs[:1], data, progress=False).attribute(many)
    assert result.settings["curvature"] == "ekfac" and "query columns" in result.settings["curvature_reason"]
    expected = Attributor(TinyClassifier, runs[:1], data, Influence("ekfac"), progress=False).attribute(many)
    assert torch.equal(result.effects, expected.effects)
    # ... unless they are reduced to one: the exact GGN again.
    assert (
        Attributor(TinyClassifier, runs[:1], data, progress=False).attribute(many, reduce="mean").settings["curvature"]
        == "ggn"
    )
    # CG blocks beyond the memory budget: EK-FAC.
    monkeypatch.setattr(influence, "AUTO_BLOCK_BYTES", 48 * 83 * 5 - 1)
    result = Attributor(TinyClassifier, runs[:1], data, progress=False).attribute(queries)
    assert result.settings["curvature"] == "ekfac" and "GiB of blocks" in result.settings["curvature_reason"]
    # Self-influence: every training gradient solved, the dense GGN of 83 parameters.
    values = Attributor(TinyClassifier, runs[:1], data, progress=False).self_influence()
    assert values.settings["curvature"] == "ggn" and values.settings["solver"] == "dense"
    monkeypatch.setattr(influence, "AUTO_SELF_INFLUENCE_DENSE", 82)
    assert Attributor(TinyClassifier, runs[:1], data, progress=False).self_influence().settings["curvature"] == "ekfac"


@pytest.mark.parametrize("scale, edge", [(1.0, None), (1e6, "largest"), (1e-6, "smallest")])
def test_a_damping_fit_at_the_edge_of_its_grid_is_named(scale, edge):
    """Solves by ``scale * G`` point as the exact ``(G + d)^-1 g`` do at a damping of ``scale * d``: inside the
    grid (scale 1) the fit finds it; far beyond it, it stops at the grid's edge, which ``grid_edge`` names
    (Influence then warns and reports it)."""
    from lightning_dtda.damping import fit_damping, grid_edge

    generator = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(12, 12, generator=generator, dtype=torch.float64))[0]
    G = basis @ torch.diag(torch.logspace(-4, 2, 12, dtype=torch.float64)) @ basis.T
    d = 1e-2

    class Dense:
        def __init__(self, matrix):
            self.matrix = matrix

        def solve(self, vectors, lam):
            return torch.linalg.solve(self.matrix + lam * torch.eye(12, dtype=torch.float64), vectors.T).T

        def matmat(self, columns):
            return self.matrix @ columns

    chosen, totals = fit_damping(
        Dense(scale * G), Dense(G), torch.randn(4, 12, generator=generator, dtype=torch.float64), d
    )
    assert grid_edge(totals) == edge
    if edge is None:
        assert chosen == pytest.approx(d)  # the exact GGN's own damping: its solves are the exact ones


def test_removals_predicted_to_take_a_loss_below_zero_are_warned_about(classifier_runs):
    """A damping a million times too small blows the identity's effects up past the query losses themselves:
    the warning counts the predicted losses below zero exactly; a sane damping gives none and no warning."""
    import warnings

    runs, data, queries = classifier_runs
    with pytest.warns(UserWarning, match=r"predicted query losses after a removal are below zero by more") as caught:
        wild = Attributor(TinyClassifier, runs, data, Influence("identity", damping=1e-6), progress=False).attribute(
            queries
        )
    negative = int((wild.measurements[:, :, None] + wild.effects < -0.1 * wild.measurements.mean()).sum())
    assert negative > 0 and f": {negative} of {2 * 5 * 40} predicted" in str(caught[-1].message)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*predicted query losses.*")
        sane = Attributor(TinyClassifier, runs, data, Influence("identity", damping=10.0), progress=False).attribute(
            queries
        )
    assert bool((sane.measurements[:, :, None] + sane.effects >= 0).all())
    # A loss function of the user's may be negative (a Gaussian NLL): no warning on its numbers
    own_loss = type(
        "TinyClassifier",
        (TinyClassifier,),
        {"__module__": "moved", "attribution_loss_function": lambda self: torch.nn.CrossEntropyLoss()},
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*predicted query losses.*")
        same = Attributor(own_loss, runs, data, Influence("identity", damping=1e-6), progress=False).attribute(queries)
    assert torch.allclose(same.effects, wild.effects)
