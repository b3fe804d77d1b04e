import pytest
import torch

from lightning_dtda.replay.optim import FunctionalOptimizer


def group_settings(optimizer, names):
    return (
        f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
        [
            {**{k: v for k, v in g.items() if k != "params"}, "param_names": n}
            for g, n in zip(optimizer.param_groups, names)
        ],
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.SGD(p, lr=0.1),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5, dampening=0.3),
        lambda p: torch.optim.Adam(p, lr=0.01),
        lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.99), weight_decay=1e-2),
        lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    ],
)
def test_functional_step_matches_torch_optim(make):
    g = torch.Generator().manual_seed(0)
    params = [
        torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True),
        torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True),
    ]
    # two groups with different rates, and a rate that changes between steps (a scheduler)
    optimizer = make([{"params": [params[0]]}, {"params": [params[1]], "lr": 0.05}])
    functional = FunctionalOptimizer.from_manifest(*group_settings(optimizer, [["w"], ["b"]]), ["w", "b"])
    mine = [p.detach().clone() for p in params]
    state = functional.init(mine)
    for _ in range(6):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
        for group in optimizer.param_groups:
            group["lr"] *= 0.9
        lrs = tuple(group["lr"] for group in optimizer.param_groups)
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        optimizer.step()
        mine, state = functional.step(mine, grads, state, lrs)
        for p, m in zip(params, mine):
            assert (p.detach() - m).abs().max() < 1e-14


def test_unsupported_optimizer_names_the_supported_ones():
    settings = ("torch.optim.rmsprop.RMSprop", [{"lr": 0.1}])
    with pytest.raises(ValueError, match="RMSprop has none. Supported: torch.optim.sgd.SGD, torch.optim.adam.Adam"):
        FunctionalOptimizer.from_manifest(*settings, ["w"])
    settings = ("torch.optim.adam.Adam", [{"lr": 0.1, "amsgrad": True}])
    with pytest.raises(ValueError, match="amsgrad=True"):
        FunctionalOptimizer.from_manifest(*settings, ["w"])
