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

import contextlib
from collections.abc import Sequence
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
from lightning_dtda.relu import ReLUSmoothing
from lightning_dtda.run_format import Step
from lightning_dtda.trajectory import Trajectory


def _refuse_train_mode_layers(model: nn.Module, run: Trajectory) -> None:
    # The replay evaluates the forward in eval mode; these layers computed something else in training.
    layers = [
        f"{name!r} ({type(m).__name__})"
        for name, m in model.named_modules()
        if (isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0)
        # instance norm without running statistics normalises the same way in both modes
        or (isinstance(m, nn.modules.batchnorm._NormBase) and (isinstance(m, nn.modules.batchnorm._BatchNorm) or m.track_running_stats))
    ]
    if layers:
        raise ValueError(
            f"Run {run.name}'s module has layers that compute differently in training: {', '.join(layers[:5])}. Dropout "
            "draws random masks and batch norm (or instance norm with running statistics) uses batch statistics, which the replay does not reproduce "
            "yet, so it would describe another run. Use Influence() or Segmented() for this model."
        )


def initial_parameters(model: nn.Module, run: Trajectory) -> tuple[list[str], list[Tensor]]:
    """Names and step-0 values of the trainable parameters, on the model's device and dtype."""
    names = list(trainable_parameters(model))
    state = run.state_dict(0)
    reference = dict(model.named_parameters())
    return names, [state[n].to(device=reference[n].device, dtype=reference[n].dtype) for n in names]


class Replay:
    """Replays the optimizer steps of ``run`` for ``M`` weightings at once.

    Parameters and optimizer state carry a leading dimension ``M``. The steps are differentiable:
    when the given parameters, state or weights require grad, autograd can run back through them.

    Args:
        model: The run's module (any snapshot: its buffers are kept, its parameters replaced).
        run: A recorded run.
        train_data: The training set in recorded index order.
        relu_smoothing: If given, ReLUs in the training loss get this kink width in their second
            derivatives (see ``relu``); values and gradients are unchanged.
    """

    def __init__(self, model: nn.Module, run: Trajectory, train_data: Dataset, relu_smoothing: float | None = None) -> None:
        self.run = run
        self.train_data = train_data
        _refuse_train_mode_layers(model, run)
        self.names, self.start = initial_parameters(model, run)
        for scheduler in run.manifest.schedulers:
            if scheduler.get("cycle_momentum") and not run.steps[0].scheduled:
                name = scheduler["class"].rpartition(".")[2]
                raise ValueError(
                    f"Run {run.name}'s scheduler {name} changes the momentum during training, and the run was recorded "
                    "by a version that did not record momentum per step. Record it again with this version."
                )
        self.clipping = run.manifest.gradient_clipping or {}
        if self.clipping.get("custom"):
            raise ValueError(
                f"Run {run.name}'s module overrides configure_gradient_clipping; the replay applies only Lightning's "
                "own clipping (gradient_clip_val with the 'norm' or 'value' algorithm)."
            )
        self.optimizer = FunctionalOptimizer.from_manifest(run.manifest.optimizer_class, run.manifest.param_groups, self.names)
        # Lightning divides each micro-batch's loss by the accumulation count and DDP averages over ranks.
        normaliser = run.manifest.accumulate_grad_batches * run.manifest.world_size
        call = HookCall(model, Hooks(model).train_loss)
        keys = [f"module.{n}" for n in self.names]
        # Only the loss is evaluated under the smoothing mode: it runs every op through Python.
        self.smoothing = ReLUSmoothing(relu_smoothing) if relu_smoothing is not None else None
        loss_context = self.smoothing or contextlib.nullcontext()

        def weighted_loss(params: list[Tensor], w: Tensor, batch: Any) -> Tensor:
            with loss_context:
                losses = functional_call(call, dict(zip(keys, params)), (batch,))
            return (losses * w).mean() / normaliser

        self._batched_grad = vmap(grad(weighted_loss), in_dims=(0, 0, None))

    def initial(self, num_models: int) -> tuple[list[Tensor], dict[str, Any]]:
        """The step-0 parameters ``[M, *shape]`` and the optimizer's initial state."""
        params = [p.unsqueeze(0).expand(num_models, *p.shape).clone() for p in self.start]
        return params, self.optimizer.init(params)

    def steps(
        self,
        params: list[Tensor],
        state: dict[str, Any],
        weights: Tensor,
        steps: Sequence[Step],
        progress: bool = False,
    ) -> tuple[list[Tensor], dict[str, Any]]:
        """Apply ``steps`` with per-example loss weights ``weights [M, N]``."""
        device = params[0].device
        for step in tqdm(steps, desc=f"replaying {self.run.name}", disable=not progress, leave=False):
            grads: list[Tensor] | None = None
            for indices in step.micro_batches:
                batch = move_data_to_device(default_collate([self.train_data[i] for i in indices.tolist()]), device)
                g = self._batched_grad(params, weights[:, indices], batch)
                grads = list(g) if grads is None else [a + b for a, b in zip(grads, g)]
            assert grads is not None
            grads = self._clip(grads)
            params, state = self.optimizer.step(params, grads, state, step.lrs, step.scheduled)
        return params, state


    def _clip(self, grads: list[Tensor]) -> list[Tensor]:
        """Lightning's clipping of the accumulated gradient, per weighting (``torch.nn.utils``' formulas)."""
        value = self.clipping.get("value")
        if not value:
            return grads
        if self.clipping["algorithm"] == "value":
            return [g.clamp(-value, value) for g in grads]
        norm = torch.stack([g.flatten(1).norm(dim=1) for g in grads]).norm(dim=0)  # [M]
        scale = (value / (norm + 1e-6)).clamp(max=1.0)
        return [g * scale.view(-1, *[1] * (g.ndim - 1)) for g in grads]


def replay(
    model: nn.Module,
    run: Trajectory,
    train_data: Dataset,
    weights: Tensor,
    progress: bool = False,
) -> list[Tensor]:
    """Replay ``run`` once per row of ``weights [M, N]``; returns the final trainable parameters, ``[M, *shape]`` each."""
    replayer = Replay(model, run, train_data)
    params, state = replayer.initial(len(weights))
    weights = weights.to(device=params[0].device, dtype=params[0].dtype)
    with torch.no_grad():
        params, _ = replayer.steps(params, state, weights, run.steps, progress)
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
