"""K-FAC/EK-FAC on models as users write them: the layers they have factors for are tracked, the others
left out, and query gradients, training gradients and curvature all use the tracked parameters."""

import logging

import lightning.pytorch as pl
import pytest
import torch
from models import SmallCNN, TinyTransformer, TokenBag, image_data, token_data, token_regression_data, trainer
from oracles import dense_ggn_effects, relative_error
from torch import nn
from torch.utils.data import DataLoader

from lightning_dtda import Attributor, Influence, Segmented, TrajectoryRecorder
from lightning_dtda.curvature.attention import factorable_attention
from lightning_dtda.curvature.fit import fit_curvature


def record(tmp_path, model, data, epochs=3, batch_size=8, **kwargs):
    pl.seed_everything(0)
    trainer(tmp_path, [TrajectoryRecorder(tmp_path / "runs", every_n_epochs=1)], max_epochs=epochs, **kwargs).fit(
        model, DataLoader(data, batch_size=batch_size, shuffle=True)
    )
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
def test_kfac_on_embedding_and_layer_norm_tracks_embedding_and_head_and_the_head_alone_equals_its_exact_solve(
    token_bag, curvature, caplog
):
    """By default the embedding and the head are tracked and the LayerNorm left out. Named alone, the head is
    the only factored layer: (E)K-FAC of one linear layer under MSE is its exact GGN, so the effects equal a
    dense solve on the head's parameters (embedding and LayerNorm frozen)."""
    runs, data, queries = token_bag
    attributor = Attributor(
        TokenBag, runs, data, estimator=Influence(curvature=curvature, damping=0.05), progress=False
    )
    with caplog.at_level(logging.INFO):
        result = attributor.attribute(queries)
    assert result.settings["per_run"][0]["parameters"] == ["embed.weight", "head.weight", "head.bias"]
    [line] = [r.getMessage() for r in caplog.records if "tracks" in r.getMessage()]
    assert line.startswith(
        f"influence-{curvature} tracks 50 of 58 trainable weights (3 of 5 tensors), in embed (Embedding), head (Linear); "
        "left out: norm (LayerNorm)."
    )
    assert torch.isfinite(result.effects).all()
    head = Attributor(
        TokenBag, runs, data, estimator=Influence(curvature=curvature, damping=0.05, modules=["head"]), progress=False
    )
    alone = head.attribute(queries)
    assert alone.settings["per_run"][0]["parameters"] == ["head.weight", "head.bias"]
    expected = restricted_oracle(attributor.load_model(attributor.runs[0]), data, queries, 0.05, ["embed", "norm"])
    assert relative_error(alone.effects[0], expected) < 1e-6
    everything = restricted_oracle(attributor.load_model(attributor.runs[0]), data, queries, 0.05, [])
    assert relative_error(alone.effects[0], everything) > 1e-2  # leaving layers out does change the effects


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
    full = Attributor(
        TokenBag, runs, data, estimator=Influence(curvature="ggn", damping=0.05), progress=False
    ).attribute(queries)
    assert "parameters" not in full.settings["per_run"][0]
    assert (
        relative_error(
            full.effects[0], restricted_oracle(attributor.load_model(attributor.runs[0]), data, queries, 0.05, [])
        )
        < 1e-6
    )


def test_modules_that_name_nothing_trackable_are_refused(token_bag):
    runs, data, queries = token_bag
    for estimator, match in [
        (
            Influence(curvature="ekfac", modules=["norm"]),
            r"curvature='ekfac': modules \['norm'\] hold no nn.Linear, nn.Conv2d, nn.Embedding or self-attention layers",
        ),
        (
            Influence(curvature="ggn", modules=["decoder"]),
            r"modules names \['decoder'\], which TokenBag does not have; .* \['embed', 'norm', 'head'\]",
        ),
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
        assert result.settings["per_run"][0]["parameters"] == [
            "net.0.weight",
            "net.0.bias",
            "net.6.weight",
            "net.6.bias",
        ]
        assert (
            result.effects.shape == (1, 3, 18)
            and torch.isfinite(result.effects).all()
            and result.effects.abs().max() > 0
        )


def test_ekfac_on_a_transformer_layer_tracks_embedding_attention_and_feed_forward_but_not_layer_norms(tmp_path, caplog):
    data, queries = token_data(16), token_data(3, seed=1)
    runs = record(tmp_path, TinyTransformer(dropout=0.0), data, epochs=2)
    with caplog.at_level(logging.INFO):
        result = Attributor(
            TinyTransformer, runs, data, estimator=Influence(curvature="ekfac"), progress=False
        ).attribute(queries)
    # EK-FAC on attention ranks well below the exact GGN (benchmarks/attention_ekfac.py): the log says so.
    [line] = [r.getMessage() for r in caplog.records if "on a model with attention" in r.getMessage()]
    assert "EKFAC" in line and "Influence('ggn')" in line
    assert result.settings["per_run"][0]["parameters"] == [
        "embed.weight",
        "layer.self_attn.in_proj_weight",
        "layer.self_attn.in_proj_bias",
        "layer.self_attn.out_proj.weight",
        "layer.self_attn.out_proj.bias",
        "layer.linear1.weight",
        "layer.linear1.bias",
        "layer.linear2.weight",
        "layer.linear2.bias",
        "head.weight",
        "head.bias",
    ]
    assert torch.isfinite(result.effects).all() and result.effects.abs().max() > 0


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize(
    "call", ["weights", "no weights", "float mask", "bool masks", "causal", "per-head weights", "3-d mask"]
)
def test_factorable_attention_computes_what_multihead_attention_does(batch_first, call):
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, 2, batch_first=batch_first).double().eval()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    x = x if batch_first else x.transpose(0, 1).contiguous()
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[0, 4] = True
    blocked = torch.rand(5, 5, generator=torch.Generator().manual_seed(1)) < 0.3
    blocked.fill_diagonal_(False)
    kwargs = {
        "weights": {},
        "no weights": {"need_weights": False},
        "float mask": {"attn_mask": torch.randn(5, 5, dtype=torch.float64)},
        "bool masks": {"attn_mask": blocked, "key_padding_mask": padding},
        "causal": {
            "attn_mask": nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64),
            "is_causal": True,
        },
        "per-head weights": {"average_attn_weights": False},
        "3-d mask": {"attn_mask": torch.randn(6, 5, 5, dtype=torch.float64)},
    }[call]
    expected = attention(x, x, x, **kwargs)
    with factorable_attention(attention):
        names = [name for name, _ in attention.named_parameters()]
        got = attention(x, x, x, **kwargs)
        other = attention(x, x.clone(), x.clone())  # cross-attention: torch's own forward
    assert torch.allclose(got[0], expected[0], atol=1e-13, rtol=0)
    assert (got[1] is None) == (expected[1] is None) and (
        got[1] is None or torch.allclose(got[1], expected[1], atol=1e-13, rtol=0)
    )
    assert torch.allclose(other[0], attention(x, x, x)[0], atol=1e-13, rtol=0)
    assert names == ["in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]
    assert "forward" not in vars(attention) and not hasattr(attention, "_dtda_in_proj")  # put back as it was


class LinearAttention(nn.Module):
    """Self-attention written with nn.Linear projections, called: the K-FAC reference for factorable_attention."""

    def __init__(self, attention: nn.MultiheadAttention):
        super().__init__()
        d, self.heads = attention.embed_dim, attention.num_heads
        self.qkv, self.out = nn.Linear(d, 3 * d).double(), nn.Linear(d, d).double()
        with torch.no_grad():
            self.qkv.weight.copy_(attention.in_proj_weight), self.qkv.bias.copy_(attention.in_proj_bias)
            self.out.weight.copy_(attention.out_proj.weight), self.out.bias.copy_(attention.out_proj.bias)

    def forward(self, x):
        n, length, d = x.shape
        q, k, v = (t.reshape(n, length, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        weights = (q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5).softmax(-1)
        return self.out((weights @ v).transpose(1, 2).reshape(n, length, d))


def test_kfac_of_multihead_attention_equals_kfac_of_the_same_attention_written_with_linear_layers():
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(4, 2, batch_first=True).double()

    class Classifier(nn.Module):
        def __init__(self, block):
            super().__init__()
            self.block, self.head = block, nn.Linear(4, 3).double()

        def forward(self, x):
            out = (
                self.block(x, x, x, need_weights=False)[0]
                if isinstance(self.block, nn.MultiheadAttention)
                else self.block(x)
            )
            return self.head(out.mean(1))

    ours, reference = Classifier(attention).eval(), Classifier(LinearAttention(attention)).eval()
    reference.head.load_state_dict(ours.head.state_dict())
    x, y = torch.randn(12, 5, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    batches = [(x[:7], y[:7]), (x[7:], y[7:])]
    vectors = torch.randn(3, 4 * 12 + 12 + 4 * 4 + 4 + 3 * 4 + 3, dtype=torch.float64)
    for kind in ("kfac", "ekfac"):
        solved = [
            fit_curvature(kind, model, nn.CrossEntropyLoss(), list(model.parameters()), batches, 12).solve(vectors, 0.1)
            for model in (ours, reference)
        ]
        assert relative_error(solved[0], solved[1]) < 1e-10


def test_the_tracked_line_names_parameters_held_by_the_model_itself():
    """A user trial read "left out: (top) (Model)" for a learned positional table held by the model."""
    from lightning_dtda.curvature.tracked import describe_tracked

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.zeros(4, 3))
            self.head = nn.Linear(3, 2)

    line = describe_tracked(Model(), ["head.weight", "head.bias"])
    assert "in head (Linear); left out: pos (a parameter of Model)." in line
