"""K-FAC/EK-FAC on models as users write them: the layers they have factors for are tracked, the others
left out, and query gradients, training gradients and curvature all use the tracked parameters."""

import logging

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_dtda import Attributor, Influence, Segmented, TrajectoryRecorder
from models import SmallCNN, TinyTransformer, TokenBag, image_data, token_data, token_regression_data, trainer
from oracles import dense_ggn_effects, relative_error


def record(tmp_path, model, data, epochs=3, batch_size=8, **kwargs):
    pl.seed_everything(0)
    trainer(tmp_path, [TrajectoryRecorder(tmp_path / "runs", every_n_epochs=1)], max_epochs=epochs, **kwargs).fit(
        model, DataLoader(data, batch_size=batch_size, shuffle=True))
    return tmp_path / "runs"


@pytest.fixture(scope="module")
def token_bag(tmp_path_factory):
    """Embedding + LayerNorm + one Linear head with mean squared error, float64 (58 parameters)."""
    tmp_path = tmp_path_factory.mktemp("bag")
    data = token_regression_data(n=24, dtype=torch.float64)
    queries = token_regression_data(n=3, seed=1, dtype=torch.float64)
    return record(tmp_path, TokenBag(), data, epochs=4, precision="64-true"), data, queries


def restricted_oracle(model, data, queries, damping, frozen):
    """The dense damped-GGN effects of the parameters left trainable once the modules ``frozen`` are frozen."""
    for name in frozen:
        model.get_submodule(name).requires_grad_(False)
    return dense_ggn_effects(model, *data.tensors, *queries.tensors, damping, loss="mse")[0]


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_kfac_on_embedding_and_layer_norm_tracks_the_head_and_equals_its_exact_solve(token_bag, curvature, caplog):
    """The head is the only nn.Linear: (E)K-FAC of one linear layer under MSE is its exact GGN, so the effects
    equal a dense solve on the head's parameters alone (embedding and LayerNorm frozen)."""
    runs, data, queries = token_bag
    attributor = Attributor(TokenBag, runs, data, estimator=Influence(curvature=curvature, damping=0.05), progress=False)
    with caplog.at_level(logging.INFO):
        result = attributor.attribute(queries)
    assert result.settings["per_run"][0]["parameters"] == ["head.weight", "head.bias"]
    [line] = [r.getMessage() for r in caplog.records if "tracks" in r.getMessage()]
    assert line.startswith(f"influence-{curvature} tracks 10 of 58 trainable weights (2 of 5 tensors), in head (Linear); "
                           "left out: embed (Embedding), norm (LayerNorm).")
    expected = restricted_oracle(attributor.load_model(attributor.runs[0]), data, queries, 0.05, ["embed", "norm"])
    assert relative_error(result.effects[0], expected) < 1e-6
    everything = restricted_oracle(attributor.load_model(attributor.runs[0]), data, queries, 0.05, [])
    assert relative_error(result.effects[0], everything) > 1e-2  # leaving layers out does change the effects


def test_ggn_restricted_to_named_modules_equals_the_dense_solve_on_their_parameters(token_bag):
    runs, data, queries = token_bag
    estimator = Influence(curvature="ggn", damping=0.05, modules=["norm", "head"])
    attributor = Attributor(TokenBag, runs, data, estimator=estimator, progress=False)
    result = attributor.attribute(queries)
    assert result.settings["modules"] == ("norm", "head")
    assert result.settings["per_run"][0]["parameters"] == ["norm.weight", "norm.bias", "head.weight", "head.bias"]
    expected = restricted_oracle(attributor.load_model(attributor.runs[0]), data, queries, 0.05, ["embed"])
    assert relative_error(result.effects[0], expected) < 1e-6
    # without modules, ggn tracks everything and records nothing
    full = Attributor(TokenBag, runs, data, estimator=Influence(curvature="ggn", damping=0.05), progress=False).attribute(queries)
    assert "parameters" not in full.settings["per_run"][0]
    assert relative_error(full.effects[0], restricted_oracle(attributor.load_model(attributor.runs[0]), data, queries, 0.05, [])) < 1e-6


def test_modules_that_name_nothing_trackable_are_refused(token_bag):
    runs, data, queries = token_bag
    for estimator, match in [
        (Influence(curvature="ekfac", modules=["norm"]), r"curvature='ekfac': modules \['norm'\] hold no nn.Linear or nn.Conv2d layers"),
        (Influence(curvature="ggn", modules=["decoder"]), r"modules names \['decoder'\], which TokenBag does not have; .* \['embed', 'norm', 'head'\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            Attributor(TokenBag, runs, data, estimator=estimator, progress=False).attribute(queries)
    with pytest.raises(ValueError, match="modules must be None or a non-empty list of submodule names"):
        Influence(modules="head")


def test_ekfac_on_a_batch_norm_cnn_tracks_its_convolution_and_head(tmp_path):
    data, queries = image_data(n=18), image_data(n=3, seed=1)
    runs = record(tmp_path, SmallCNN(), data, epochs=2, batch_size=6)
    for estimator in (Influence(curvature="ekfac"), Segmented(segments=2, curvature="ekfac")):
        result = Attributor(SmallCNN, runs, data, estimator=estimator, progress=False).attribute(queries)
        assert result.settings["per_run"][0]["parameters"] == ["net.0.weight", "net.0.bias", "net.6.weight", "net.6.bias"]
        assert result.effects.shape == (1, 3, 18) and torch.isfinite(result.effects).all() and result.effects.abs().max() > 0


def test_ekfac_on_a_transformer_layer_leaves_out_attention_it_cannot_factor(tmp_path):
    """nn.MultiheadAttention multiplies by its output projection's weight without calling that nn.Linear, so
    K-FAC gets no factors for it (curvlinops fails with a KeyError when asked): it is left out with the
    embedding, the attention's input projection and the LayerNorms."""
    data, queries = token_data(16), token_data(3, seed=1)
    runs = record(tmp_path, TinyTransformer(dropout=0.0), data, epochs=2)
    result = Attributor(TinyTransformer, runs, data, estimator=Influence(curvature="ekfac"), progress=False).attribute(queries)
    assert result.settings["per_run"][0]["parameters"] == [
        "layer.linear1.weight", "layer.linear1.bias", "layer.linear2.weight", "layer.linear2.bias", "head.weight", "head.bias"]
    assert torch.isfinite(result.effects).all() and result.effects.abs().max() > 0
