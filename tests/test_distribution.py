import math
import warnings

import pytest
import torch

from lightning_dtda import AttributionResult
from lightning_dtda.results import distribution as D


def gaussian_pair(a, b, seeds=200_000):
    """x ~ N(0, 1) and the pushed y = a + b x, so y ~ N(a, b^2), as base [S, 1] and effects [S, 1, 1]."""
    x = torch.randn(seeds, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return x, (a + (b - 1) * x).unsqueeze(-1)


@pytest.mark.parametrize("a,b", [(0.0, 2.0), (1.5, 1.0), (-0.5, 0.3)])
def test_shifts_agree_with_gaussian_closed_forms(a, b):
    base, effects = gaussian_pair(a, b)
    assert D.mean_shift(base, effects).item() == pytest.approx(a, abs=0.01 * (1 + abs(b - 1)))
    assert D.variance_shift(base, effects).item() == pytest.approx(b**2 - 1, abs=0.02 * (1 + b**2))
    # W2 between N(0, 1) and N(a, b^2) is sqrt(a^2 + (b - 1)^2)
    assert D.wasserstein(base, effects).item() == pytest.approx(math.sqrt(a**2 + (b - 1) ** 2), rel=0.01, abs=1e-3)
    # quantiles of N(a, b^2): a + b z_q
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.9)).item()
    assert D.quantile_shift(base, effects, 0.9).item() == pytest.approx(a + (b - 1) * z, abs=0.02)


def test_sample_variance_shift_is_exact():
    base, effects = gaussian_pair(0.7, 1.6, seeds=50)
    assert D.variance_shift(base, effects).item() == pytest.approx((1.6**2 - 1) * base.var().item(), rel=1e-12)


def test_wasserstein_uses_the_sorted_coupling():
    # The pushed sample is a permutation of the base sample: same distribution, distance zero,
    # although every seed's own measurement moved.
    base = torch.tensor([[0.0], [1.0], [2.0]])
    effects = torch.tensor([[2.0], [0.0], [-2.0]]).unsqueeze(-1)
    assert D.wasserstein(base, effects).item() == 0.0
    assert D.mean_shift(base, effects).item() == 0.0


def test_bootstrap_interval_covers_the_true_shift_at_its_nominal_rate():
    # 400 independent replicates (queries), 40 seeds each; the population mean shift is 0.3.
    g = torch.Generator().manual_seed(1)
    base = torch.randn(40, 400, generator=g, dtype=torch.float64)
    effects = (0.3 + 0.5 * base + 0.2 * torch.randn(40, 400, generator=g, dtype=torch.float64)).unsqueeze(-1)
    low, high = D.bootstrap_interval(D.mean_shift, base, effects, level=0.9, num_resamples=1000)
    coverage = ((low <= 0.3) & (0.3 <= high)).double().mean().item()
    assert 0.85 <= coverage <= 0.95
    assert (low <= D.mean_shift(base, effects)).all() and (D.mean_shift(base, effects) <= high).all()


def result_with(effects, base):
    return AttributionResult(effects, base, [f"seed_{s}" for s in range(len(base))])


def test_spread_wideners_are_found():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(16, 1, generator=g)
    centred = base - base.mean()
    effects = torch.stack(
        [
            0.8 * centred[:, 0],  # widens the spread, mean unchanged
            torch.full((16,), 0.8),  # moves the mean, spread unchanged
            0.01 * torch.randn(16, generator=g),  # does little
        ],
        dim=-1,
    ).unsqueeze(1)
    result = result_with(effects, base)
    assert result.mean_shift()[0, 0].abs() < 1e-6 and result.variance_shift()[0, 0] > 0
    _, indices = result.spread_wideners(query=0, k=1)
    assert indices.tolist() == [0]
    _, indices = result.top_k(query=0, k=1)
    assert indices.tolist() == [1]
    _, indices = result.top_k(query=0, k=1, statistic="variance")
    assert indices.tolist() == [0]


def test_interval_needs_three_seeds_warns_below_eight_and_needs_a_valid_level():
    result = result_with(torch.zeros(2, 1, 3), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="at least three seeds, got 2: with two, any interval is just the two"):
        result.interval("mean")
    with pytest.warns(UserWarning, match="bootstrap over 4 seeds covers less than its nominal 90%"):
        result_with(torch.randn(4, 1, 3), torch.randn(4, 1)).interval("mean")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="A percentile bootstrap")
        result_with(torch.randn(8, 1, 3), torch.randn(8, 1)).interval("mean")
    with pytest.raises(ValueError, match="level must be in"):
        result_with(torch.zeros(3, 1, 3), torch.zeros(3, 1)).interval("mean", level=1.5)
    with pytest.raises(ValueError, match="statistic must be one of"):
        result.statistic("median")


def test_distribution_figure_has_a_panel_per_example(tmp_path):
    from lightning_dtda.reporting.figures import plot_distributions

    g = torch.Generator().manual_seed(0)
    result = result_with(torch.randn(8, 2, 5, generator=g), torch.randn(8, 2, generator=g))
    fig = plot_distributions(result, query=1, examples=[0, 3, 4])
    assert len(fig.axes) == 3
    assert "example 3" in fig.axes[1].get_title()
    assert f"{result.mean_shift()[1, 3]:+.2g}" in fig.axes[1].get_title()
    fig.savefig(tmp_path / "d.png")
    assert (tmp_path / "d.png").read_bytes().startswith(b"\x89PNG")


def test_scatter_and_image_grid_figures(tmp_path):
    from lightning_dtda.reporting.figures import plot_image_grid, plot_shift_scatter

    g = torch.Generator().manual_seed(0)
    result = result_with(torch.randn(4, 2, 6, generator=g), torch.randn(4, 2, generator=g))
    scatter = plot_shift_scatter(result)
    [points] = scatter.axes[0].collections
    assert len(points.get_offsets()) == 2 * 6
    grid = plot_image_grid(result, torch.rand(6, 8, 8), torch.rand(2, 1, 8, 8), k=2, labels=torch.arange(6))
    assert len(grid.axes) == 2 * (1 + 2 * 2)
    _, helpful = result.top_k(1, 2)
    assert grid.axes[5 + 1].get_title().startswith(f"#{helpful[0].item()} ({helpful[0].item()})")
