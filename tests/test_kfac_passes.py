"""Our per-batch K-FAC/EK-FAC data passes against curvlinops' own, which they replace for speed: the same
Kronecker factors and corrected eigenvalues for every layer kind, loss, reduction and tracked subset."""

from __future__ import annotations

import pytest
import torch
from curvlinops import EKFACLinearOperator
from torch import nn

from lightning_dtda.curvature._curvlinops import (
    collect_corrected_eigenvalues,
    collect_factors,
    eigendecompose_factors,
)
from lightning_dtda.curvature.base import factor_eigh


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
        self.plain = nn.Conv2d(3, 4, 2, bias=False)
        self.head = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # an in-place activation after a layer: the output's gradient must be taken before it
        return self.head(self.plain(self.conv(x).relu_()).tanh().flatten(1))


class SequenceNet(nn.Module):
    """A Linear over a sequence (weight sharing over positions), then a mean-pooled head."""

    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Linear(3, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.sigmoid(self.token(x)).mean(1))


def _data(model: nn.Module, loss: nn.Module, generator: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (2, 7, 7) if isinstance(model, ConvNet) else (5, 3)
    batches = []
    for size in (6, 4):  # unequal batches: the mean reduction's scale is per batch
        x = torch.randn(size, *shape, generator=generator, dtype=torch.float64)
        classes = model(x).shape[1]
        if isinstance(loss, nn.CrossEntropyLoss):
            y = torch.randint(classes, (size,), generator=generator)
        elif isinstance(loss, nn.BCEWithLogitsLoss):
            y = torch.randint(2, (size, classes), generator=generator).double()
        else:
            y = torch.randn(size, classes, generator=generator, dtype=torch.float64)
        batches.append((x, y))
    return batches


def _operator(model: nn.Module, loss_function: nn.Module, params: list, data: list) -> EKFACLinearOperator:
    """curvlinops' EK-FAC as ours builds it: the type-2 Fisher, weight and bias sharing their factors."""
    return EKFACLinearOperator(
        model,
        loss_function,
        params,
        data,
        fisher_type="type-2",
        separate_weight_and_bias=False,
        check_deterministic=False,
        num_data=sum(len(y) for _, y in data),
    )


@pytest.mark.parametrize("net", [ConvNet, SequenceNet])
@pytest.mark.parametrize("loss", [nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("tracked", ["all", "no head bias", "weights or biases alone"])
def test_per_batch_passes_give_curvlinops_factors_and_corrected_eigenvalues(net, loss, reduction, tracked):
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = net().double()
    loss_function = loss(reduction=reduction)
    data = _data(model, loss_function, generator)
    params = [
        p
        for name, p in model.named_parameters()
        if tracked == "all"
        or (tracked == "no head bias" and name != "head.bias")
        # a shared bias without its weight, weights without their biases
        or (tracked == "weights or biases alone" and name in ("conv.bias", "token.bias", "plain.weight", "head.weight"))
    ]
    theirs, ours = _operator(model, loss_function, params, data), _operator(model, loss_function, params, data)
    theirs.compute_kronecker_factors()
    collect_factors(ours)
    for name in ("_input_covariances", "_gradient_covariances"):
        expected, got = getattr(theirs, name), getattr(ours, name)
        assert expected.keys() == got.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-10, atol=1e-12)
    for op in (theirs, ours):  # the same eigenvectors for both: the correction is then compared alone
        eigendecompose_factors(op, factor_eigh)
    ours._input_covariances_eigenvectors = theirs._input_covariances_eigenvectors
    ours._gradient_covariances_eigenvectors = theirs._gradient_covariances_eigenvectors
    theirs.compute_eigenvalue_correction()
    collect_corrected_eigenvalues(ours)
    expected, got = theirs._corrected_eigenvalues, ours._corrected_eigenvalues
    assert expected.keys() == got.keys()
    for key in expected:
        if isinstance(expected[key], dict):
            assert expected[key].keys() == got[key].keys()
            for position in expected[key]:
                torch.testing.assert_close(got[key][position], expected[key][position], rtol=1e-10, atol=1e-12)
        else:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-10, atol=1e-12)
    vector = torch.randn(sum(p.numel() for p in params), 2, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(ours @ vector, theirs @ vector, rtol=1e-10, atol=1e-12)


def test_weight_sharing_is_chunked_without_changing_the_correction(monkeypatch):
    import lightning_dtda.curvature._curvlinops as module

    torch.manual_seed(0)
    model = ConvNet().double()
    data = _data(model, nn.CrossEntropyLoss(), torch.Generator().manual_seed(1))
    values = []
    for entries in (2**26, 20):  # one chunk; a chunk per example
        monkeypatch.setattr(module, "_CHUNK_ENTRIES", entries)
        op = _operator(model, nn.CrossEntropyLoss(), list(model.parameters()), data)
        collect_factors(op)
        eigendecompose_factors(op, factor_eigh)
        collect_corrected_eigenvalues(op)
        values.append(op._corrected_eigenvalues)
    for key in values[0]:
        torch.testing.assert_close(values[1][key], values[0][key], rtol=1e-12, atol=1e-14)


def test_a_layer_called_twice_per_forward_pass_is_refused_by_name():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.shared(self.shared(x).tanh())

    from lightning_dtda.errors import UnsupportedLayerError

    model = Twice()
    data = [(torch.randn(3, 4), torch.randint(4, (3,)))]
    op = _operator(model, nn.CrossEntropyLoss(), list(model.parameters()), data)
    with pytest.raises(UnsupportedLayerError, match=r"'shared' was called 2 times.*curvature='ggn'.*modules="):
        collect_factors(op)


def test_a_layer_given_sequence_first_inputs_is_refused_by_name():
    class SequenceFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.token = nn.Linear(3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, T, 3]
            return self.token(x.transpose(0, 1)).mean(0)  # the layer sees [T, B, 3]

    from lightning_dtda.errors import UnsupportedLayerError

    model = SequenceFirst()
    data = [(torch.randn(2, 5, 3), torch.randint(4, (2,)))]
    op = _operator(model, nn.CrossEntropyLoss(), list(model.parameters()), data)
    with pytest.raises(UnsupportedLayerError, match=r"'token' received \(5, 2, 3\) in a batch of 2.*batch_first=True"):
        collect_factors(op)
