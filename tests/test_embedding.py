"""K-FAC/EK-FAC blocks for nn.Embedding weights (lightning_dtda.embedding): exactly curvlinops' blocks of the
equivalent linear layer on one-hot inputs, exact where K-FAC is, and usable by everything K-FAC serves."""

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from models import LoneEmbedding, TokenBag, token_regression_data, trainer
from oracles import dense_ggn_effects, relative_error
from torch import nn
from torch.utils.data import DataLoader

from lightning_dtda import Attributor, Influence, Segmented, TrajectoryRecorder
from lightning_dtda.curvature.fit import fit_curvature
from lightning_dtda.curvature.tracked import describe_tracked, tracked_parameters
from lightning_dtda.errors import UnsupportedLayerError

V, D, T, C, N = 7, 3, 4, 3, 13


class Tokens(nn.Module):
    """Token and position tables (the latter looked up with arange and broadcast over the batch), tanh,
    mean over positions, a linear head. ``one_hot``: the same function with both tables as bias-free
    nn.Linear layers on one-hot inputs (padding tokens' inputs zeroed, as torch gives that row no gradient)."""

    def __init__(self, one_hot=False, padding_idx=None):
        super().__init__()
        self.one_hot, self.padding_idx = one_hot, padding_idx
        if one_hot:
            self.tokens, self.positions = nn.Linear(V, D, bias=False), nn.Linear(T, D, bias=False)
        else:
            self.tokens, self.positions = nn.Embedding(V, D, padding_idx=padding_idx), nn.Embedding(T, D)
        self.head = nn.Linear(D, C)

    def forward(self, x):
        where = torch.arange(x.shape[1])
        if not self.one_hot:
            return self.head(torch.tanh(self.tokens(x) + self.positions(where)).mean(1))
        inputs = F.one_hot(x, V).double()
        if self.padding_idx is not None:
            inputs = inputs * (x != self.padding_idx)[..., None]
        # The position inputs repeated for every example: a linear layer sees a batch dimension.
        positions = F.one_hot(where, T).double().expand(len(x), x.shape[1], T)
        return self.head(torch.tanh(self.tokens(inputs) + self.positions(positions)).mean(1))


def to_one_hot_layout(v, back=False):
    """Flattened vectors of Tokens' parameters in the one-hot twin's layout (the tables are transposed)."""
    pieces, out = v.split([V * D, T * D, D * C + C], dim=1), []
    for piece, rows in zip(pieces[:2], (V, T)):
        shape = (len(v), D, rows) if back else (len(v), rows, D)
        out.append(piece.reshape(shape).transpose(1, 2).reshape(len(v), -1))
    return torch.cat([*out, pieces[2]], dim=1)


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_embedding_blocks_equal_curvlinops_blocks_of_the_one_hot_linear_layers(kind, loss, padding_idx, ragged):
    torch.manual_seed(0)
    ours, twin = Tokens(padding_idx=padding_idx).double().eval(), Tokens(True, padding_idx).double().eval()
    with torch.no_grad():
        twin.tokens.weight.copy_(ours.tokens.weight.T), twin.positions.weight.copy_(ours.positions.weight.T)
        twin.head.load_state_dict(ours.head.state_dict())
    x = torch.randint(0, V, (N, T))
    assert torch.equal(ours(x), twin(x))
    y = torch.randint(0, C, (N,)) if loss == "ce" else torch.randn(N, C, dtype=torch.float64)
    loss_function = nn.CrossEntropyLoss() if loss == "ce" else nn.MSELoss()
    # ragged: the second batch's sequences are shorter, as padded text batches are (normalised per batch)
    batches = [(x[:6], y[:6]), (x[6:, : T // 2] if ragged else x[6:], y[6:])]
    vectors = torch.randn(3, V * D + T * D + D * C + C, dtype=torch.float64)
    curvatures = [
        fit_curvature(kind, model, loss_function, list(model.parameters()), batches, N) for model in (ours, twin)
    ]
    solves = [curvatures[0].solve(vectors, 0.1), curvatures[1].solve(to_one_hot_layout(vectors), 0.1)]
    assert relative_error(solves[0], to_one_hot_layout(solves[1], back=True)) < 1e-10
    blocks = curvatures[0].state()["embedding_blocks"]
    assert blocks["tokens"]["counts"].shape == (V,) and blocks["positions"]["gradient_covariance"].shape == (
        D,
        D,
    )  # never V x V
    assert relative_error(solves[0], vectors / 0.1) > 1e-2  # the blocks are not zero


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_kfac_of_a_lone_embedding_under_a_linear_map_is_its_exact_ggn(tmp_path, curvature):
    """One lookup per example and outputs linear in the table: its GGN is diag(counts / N) ⊗ W^T H W, K-FAC's form."""
    data, queries = (
        token_regression_data(n=24, length=1, dtype=torch.float64),
        token_regression_data(n=3, length=1, seed=1, dtype=torch.float64),
    )
    pl.seed_everything(0)
    trainer(tmp_path, [TrajectoryRecorder(tmp_path / "runs")], max_epochs=2, precision="64-true").fit(
        LoneEmbedding(), DataLoader(data, batch_size=8, shuffle=True)
    )
    attributor = Attributor(
        LoneEmbedding, tmp_path / "runs", data, estimator=Influence(curvature=curvature, damping=0.05), progress=False
    )
    result = attributor.attribute(queries)
    expected = dense_ggn_effects(
        attributor.load_model(attributor.runs[0]), *data.tensors, *queries.tensors, 0.05, loss="mse"
    )[0]
    assert relative_error(result.effects[0], expected) < 1e-10


@pytest.fixture(scope="module")
def token_bag(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("bag")
    data = token_regression_data(n=24, dtype=torch.float64)
    pl.seed_everything(0)
    trainer(tmp_path, [TrajectoryRecorder(tmp_path / "runs", every_n_epochs=1)], max_epochs=3, precision="64-true").fit(
        TokenBag(), DataLoader(data, batch_size=8, shuffle=True)
    )
    return tmp_path / "runs", data, token_regression_data(n=3, seed=1, dtype=torch.float64)


def test_a_cached_embedding_block_gives_the_same_effects_without_a_data_pass(token_bag, tmp_path, monkeypatch):
    import lightning_dtda.curvature.kfac as curvature

    runs, data, queries = token_bag

    def attribute(cache_dir):
        return Attributor(
            TokenBag, runs, data, estimator=Influence(curvature="ekfac"), progress=False, cache_dir=cache_dir
        ).attribute(queries)

    fitted = attribute(tmp_path)
    assert fitted.settings["per_run"][0]["parameters"] == ["embed.weight", "head.weight", "head.bias"]

    def no_fitting(*args, **kwargs):
        raise AssertionError("the embedding block was fitted again")

    with monkeypatch.context() as patch:
        patch.setattr(curvature, "fit_blocks", no_fitting)
        patch.setattr(curvature, "correct_eigenvalues", no_fitting)
        cached = attribute(tmp_path)
    assert torch.equal(cached.effects, fitted.effects)
    assert (
        cached.settings["per_run"][0]["damping"] == fitted.settings["per_run"][0]["damping"]
    )  # fit_damping, through solve


def test_ekfac_functions_agree_with_its_solve_and_segmented_runs_with_an_embedding(token_bag):
    runs, data, queries = token_bag
    attributor = Attributor(TokenBag, runs, data, estimator=Segmented(segments=2, curvature="ekfac"), progress=False)
    model = attributor.load_model(attributor.runs[0])
    model.norm.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = [(data.tensors[0][:10], data.tensors[1][:10]), (data.tensors[0][10:], data.tensors[1][10:])]
    ekfac = fit_curvature("ekfac", model, nn.MSELoss(), params, batches, len(data))
    vectors = torch.randn(2, sum(p.numel() for p in params), dtype=torch.float64)
    product = ekfac.apply(lambda e: e, vectors)
    assert relative_error(ekfac.solve(product + 0.3 * vectors, 0.3), vectors) < 1e-10
    assert relative_error(ekfac.apply(lambda e: torch.ones_like(e), vectors), vectors) < 1e-12  # an orthogonal basis
    result = attributor.attribute(queries)
    assert result.settings["per_run"][0]["parameters"] == ["embed.weight", "head.weight", "head.bias"]
    assert torch.isfinite(result.effects).all() and result.effects.abs().max() > 0


class Tied(nn.Module):
    """A language-model head tied to the token table, and a position table added with a leading axis that
    does not broadcast once expanded over the batch."""

    def __init__(self, tie=True):
        super().__init__()
        self.tokens, self.positions, self.mix = nn.Embedding(V, D), nn.Embedding(T, D), nn.Linear(D, D)
        self.head = nn.Linear(D, V, bias=False)
        if tie:
            self.head.weight = self.tokens.weight

    def forward(self, x):
        return self.head(self.mix(self.tokens(x) + self.positions(torch.arange(x.shape[1]))[None]).mean(-2))


def test_tied_tables_and_lookups_that_change_under_expansion_are_left_out():
    batch = (torch.randint(0, V, (5, T)), torch.randint(0, V, (5,)))
    assert tracked_parameters(Tied(), "ekfac", None, batch) == ["mix.weight", "mix.bias"]
    assert "left out: tokens (Embedding, its weight shared with head), positions (Embedding)" in describe_tracked(
        Tied(), ["mix.weight", "mix.bias"]
    )
    assert tracked_parameters(Tied(tie=False), "ekfac", None, batch) == [
        "tokens.weight",
        "mix.weight",
        "mix.bias",
        "head.weight",
    ]
    model = Tied()
    with pytest.raises(
        UnsupportedLayerError, match=r"curvature='kfac' has no block for the weight of \[Embedding\(7, 3\), Linear"
    ):
        fit_curvature("kfac", model, nn.CrossEntropyLoss(), [model.tokens.weight], [batch], 5)


class KeywordTokens(Tokens):
    def forward(self, *, tokens):
        return super().forward(tokens)


def test_embedding_blocks_of_a_keyword_only_forward_equal_the_positional_ones():
    torch.manual_seed(0)
    model, keywords = Tokens().double().eval(), KeywordTokens().double().eval()
    keywords.load_state_dict(model.state_dict())
    x, y = torch.randint(0, V, (N, T)), torch.randint(0, C, (N,))
    vectors = torch.randn(2, V * D + T * D + D * C + C, dtype=torch.float64)
    solves = [
        fit_curvature("ekfac", m, nn.CrossEntropyLoss(), list(m.parameters()), [(inputs, y)], N).solve(vectors, 0.1)
        for m, inputs in ((model, x), (keywords, {"tokens": x}))
    ]
    assert relative_error(solves[1], solves[0]) < 1e-12


class TokenBagVariant(TokenBag):
    """TokenBag with an embedding option attribution cannot go through, or an nn.EmbeddingBag."""

    def __init__(self, variant: str = "plain", **hparams) -> None:
        super().__init__(**hparams)
        vocab, d = self.hparams.vocab, self.hparams.d
        self.embed = {
            "max_norm": lambda: nn.Embedding(vocab, d, max_norm=1.0),
            "scale_grad_by_freq": lambda: nn.Embedding(vocab, d, scale_grad_by_freq=True),
            "sparse": lambda: nn.Embedding(vocab, d, sparse=True),
            "bag": lambda: nn.EmbeddingBag(vocab, d),
        }[variant]()

    def forward(self, tokens):
        pooled = self.embed(tokens) if isinstance(self.embed, nn.EmbeddingBag) else self.embed(tokens).mean(1)
        return self.head(self.norm(pooled))


@pytest.mark.parametrize("variant", ["max_norm", "scale_grad_by_freq", "sparse", "bag"])
def test_embedding_options_attribution_cannot_go_through_are_refused_before_any_work(tmp_path, variant):
    data = token_regression_data()
    pl.seed_everything(0)
    trainer(tmp_path, [TrajectoryRecorder(tmp_path / "runs")], max_epochs=1).fit(
        TokenBagVariant(variant), DataLoader(data, batch_size=8, shuffle=True)
    )
    refused = {
        "max_norm": "max_norm=1.0: its forward renormalises the weight in place",
        "scale_grad_by_freq": "scale_grad_by_freq=True: its backward rescales the gradient",
        "sparse": "sparse=True: its gradient is a sparse tensor",
        "bag": "torch has no forward-mode or double-backward derivative",
    }[variant]
    with pytest.raises(
        UnsupportedLayerError,
        match=rf"embed \((Embedding|EmbeddingBag)\) (has |cannot be attributed through: ){refused}",
    ):
        Attributor(
            TokenBagVariant, tmp_path / "runs", data, estimator=Influence(curvature="ggn"), progress=False
        ).attribute(data)
    if (
        variant != "max_norm"
    ):  # left out, the rest attributes; identity needs first derivatives only, which EmbeddingBag has
        left_out = Influence(curvature="ggn", modules=["norm", "head"])
        for estimator in (left_out, Influence(curvature="ekfac")) + (
            (Influence(curvature="identity"),) if variant == "bag" else ()
        ):
            result = Attributor(
                TokenBagVariant, tmp_path / "runs", data, estimator=estimator, progress=False
            ).attribute(data)
            assert result.effects.isfinite().all()


class FunctionallyTied(nn.Module):
    """A head written as a product with the token table: a tie no module structure shows."""

    def __init__(self):
        super().__init__()
        self.tokens, self.mix = nn.Embedding(V, D), nn.Linear(D, D)

    def forward(self, x):
        return self.mix(self.tokens(x).mean(1)) @ self.tokens.weight.T


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_an_embedding_weight_used_outside_its_lookups_is_refused(kind):
    torch.manual_seed(0)
    model = FunctionallyTied().double().eval()
    batch = (torch.randint(0, V, (N, T)), torch.randint(0, V, (N,)))
    with pytest.raises(UnsupportedLayerError, match="is used by the forward outside its lookups"):
        fit_curvature(kind, model, nn.CrossEntropyLoss(), list(model.parameters()), [batch], N)
