import math

import pytest
import torch
import torch.nn.functional as F
from models import ReLUClassifier, TinyClassifier, classification_data
from test_unrolled import record
from torch import nn
from torch.func import grad, vmap

from lightning_dtda import Attributor, Unrolled
from lightning_dtda.replay.relu import ReLUSmoothing

RELU_CALLS = {
    "module": lambda z: nn.ReLU()(z),
    "module in place": lambda z: nn.ReLU(inplace=True)(z.clone()),
    "functional": F.relu,
    "tensor method": lambda z: z.relu(),
}


@pytest.mark.parametrize("relu", RELU_CALLS.values(), ids=RELU_CALLS.keys())
def test_relu_smoothing_adds_the_blurred_kink_to_second_derivatives(relu):
    """Hessian-vector products of a ReLU network's loss, by torch.func (vmapped over directions), against
    the exact ones plus the kink term written out: the weight gradient (V^T(p - y) * 1[z > 0]) x^T picks
    up (V^T(p - y) * phi_sigma(z) * (D x)) x^T along a direction D of the first layer's weight."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 4, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    W, V = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    directions = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    sigma = 0.7

    def loss(w: torch.Tensor, smoothing: ReLUSmoothing | None) -> torch.Tensor:
        if smoothing is None:
            return F.cross_entropy(relu(x @ w.T) @ V.T, y, reduction="sum")
        with smoothing:
            return F.cross_entropy(relu(x @ w.T) @ V.T, y, reduction="sum")

    def hvp(smoothing: ReLUSmoothing | None) -> torch.Tensor:
        # reverse over reverse, as the unrolled adjoint runs; the kink term is symmetric in D and E
        return vmap(grad(lambda w, d: (grad(lambda v: loss(v, smoothing))(w) * d).sum()), in_dims=(None, 0))(
            W, directions
        )

    smoothing = ReLUSmoothing(sigma)
    smoothed = hvp(smoothing)
    assert smoothing.used
    z = x @ W.T  # [7, 5]
    upstream = (torch.softmax(torch.relu(z) @ V.T, 1) - F.one_hot(y, 3)) @ V  # dloss/dh, [7, 5]
    density = torch.exp(-0.5 * (z / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    kink = torch.einsum("nh,nh,dnh,ni->dhi", upstream, density, torch.einsum("dhi,ni->dnh", directions, x), x)
    exact = hvp(None)
    assert (kink.norm() / exact.norm()) > 0.1  # the term is not negligible here
    torch.testing.assert_close(smoothed, exact + kink, rtol=1e-10, atol=1e-10)
    # values and gradients are ReLU's own
    torch.testing.assert_close(grad(lambda w: loss(w, ReLUSmoothing(sigma)))(W), grad(lambda w: loss(w, None))(W))


def test_unrolled_relu_smoothing_keeps_the_replay_and_changes_only_second_order(tmp_path):
    data = classification_data(n=20, dtype=torch.float64)
    queries = classification_data(n=3, seed=1, dtype=torch.float64)
    runs = record(tmp_path, ReLUClassifier, data, hidden=5, lr=0.2, momentum=0.9)
    exact = Attributor(ReLUClassifier, runs, data, estimator=Unrolled(), progress=False).attribute(queries)
    smoothed = Attributor(ReLUClassifier, runs, data, estimator=Unrolled(relu_smoothing=0.5), progress=False).attribute(
        queries
    )
    torch.testing.assert_close(smoothed.measurements, exact.measurements)
    assert smoothed.settings["relu_smoothing"] == 0.5
    assert (Unrolled().label, Unrolled(relu_smoothing=0.5).label) == (
        "unrolled",
        "unrolled-relu0.5",
    )  # told apart in messages and files
    # An example's last step enters its effect through its gradient alone; the kinks act on later steps.
    assert 0.01 < (smoothed.effects - exact.effects).norm() / exact.effects.norm() < 1.0


def test_relu_smoothing_warns_without_relu_and_refuses_a_bad_width(tmp_path):
    data = classification_data(n=20, dtype=torch.float64)
    runs = record(tmp_path, TinyClassifier, data, hidden=5)  # tanh
    with pytest.warns(UserWarning, match="relu_smoothing had no effect on .*calls no ReLU"):
        Attributor(TinyClassifier, runs, data, estimator=Unrolled(relu_smoothing=0.5), progress=False).attribute(data)
    with pytest.raises(ValueError, match="relu_smoothing must be None or a positive width, got 0.0"):
        Unrolled(relu_smoothing=0.0)


class AdamReLUClassifier(ReLUClassifier):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


def test_relu_smoothing_is_refused_for_adam_runs_where_it_diverges(tmp_path):
    data = classification_data(n=20, dtype=torch.float64)
    runs = record(tmp_path, AdamReLUClassifier, data, hidden=5)
    with pytest.raises(
        ValueError, match=r"relu_smoothing=...\) is for SGD runs; seed_0 used torch.optim.adam.Adam.*Use Unrolled\(\)"
    ):
        Attributor(AdamReLUClassifier, runs, data, estimator=Unrolled(relu_smoothing=0.1), progress=False).attribute(
            data
        )
    assert (
        Attributor(AdamReLUClassifier, runs, data, estimator=Unrolled(), progress=False)
        .attribute(data)
        .effects.isfinite()
        .all()
    )
