"""Replaying a recorded run, for many per-example loss weightings at once.

A replay starts from the run's step-0 snapshot and repeats every recorded optimizer step with the
recorded micro-batches and learning rates, through a functional twin of the optimizer. Giving
example ``n`` the weight ``w_n`` in every step that contains it (loss ``mean_b(w_b l_b)``, so the
batch's normaliser is unchanged) is the coupled counterfactual of DESIGN section 1: same seed, same
initialisation, same batch order. ``w = 1`` everywhere is the recorded run itself.

The model's forward must be deterministic and not depend on train mode (no dropout, no batch
statistics): the replay evaluates it in eval mode.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from lightning_dtda.gradients import HookCall, trainable_parameters
from lightning_dtda.hooks import Hooks
from lightning_dtda.optim import FunctionalOptimizer
from lightning_dtda.trajectory import Trajectory


def initial_parameters(model: nn.Module, run: Trajectory) -> tuple[list[str], list[Tensor]]:
    """Names and step-0 values of the trainable parameters, on the model's device and dtype."""
    names = list(trainable_parameters(model))
    state = run.state_dict(0)
    reference = dict(model.named_parameters())
    return names, [state[n].to(device=reference[n].device, dtype=reference[n].dtype) for n in names]


def replay(
    model: nn.Module,
    run: Trajectory,
    train_data: Dataset,
    weights: Tensor,
    progress: bool = False,
) -> list[Tensor]:
    """Replay ``run`` once per row of ``weights`` and return the final trainable parameters.

    Args:
        model: The run's module (any snapshot: its buffers are kept, its parameters replaced).
        run: A recorded run with batch membership.
        train_data: The training set in recorded index order.
        weights: Per-example loss weights, ``[M, N]``.

    Returns:
        One tensor per trainable parameter, ``[M, *shape]``.
    """
    names, start = initial_parameters(model, run)
    weights = weights.to(device=start[0].device, dtype=start[0].dtype)
    optimizer = FunctionalOptimizer.from_manifest(run.manifest["optimizer"], names)
    accumulate = run.manifest["accumulate_grad_batches"]
    call = HookCall(model, Hooks(model).train_loss)
    keys = [f"module.{n}" for n in names]

    def weighted_loss(params: list[Tensor], w: Tensor, batch: Any) -> Tensor:
        losses = functional_call(call, dict(zip(keys, params)), (batch,))
        # Lightning divides each micro-batch's loss by the number of accumulated micro-batches.
        return (losses * w).mean() / accumulate

    batched_grad = vmap(grad(weighted_loss), in_dims=(0, 0, None))
    params = [p.unsqueeze(0).expand(len(weights), *p.shape).clone() for p in start]
    state = optimizer.init(params)
    device = start[0].device
    for step in tqdm(run.steps, desc=f"replaying {run.name}", disable=not progress, leave=False):
        grads: list[Tensor] | None = None
        for indices in step.micro_batches:
            batch = move_data_to_device(default_collate([train_data[i] for i in indices.tolist()]), device)
            g = batched_grad(params, weights[:, indices], batch)
            grads = g if grads is None else [a + b for a, b in zip(grads, g)]
        assert grads is not None
        params, state = optimizer.step(params, grads, state, step.lrs)
    return params


def measure(model: nn.Module, params: list[Tensor], query_data: Dataset, batch_size: int = 256) -> Tensor:
    """The measurement hook on ``query_data`` for each of ``M`` parameter sets, ``[M, queries]``."""
    call = HookCall(model, Hooks(model).measurement)
    keys = [f"module.{n}" for n in trainable_parameters(model)]
    device = params[0].device

    def one(p: list[Tensor], batch: Any) -> Tensor:
        return functional_call(call, dict(zip(keys, p)), (batch,))

    with torch.no_grad():
        return torch.cat(
            [vmap(one, in_dims=(0, None))(params, move_data_to_device(b, device)) for b in DataLoader(query_data, batch_size=batch_size)],
            dim=1,
        )
