"""Replaying a recorded run, for many per-example loss weightings at once.

A replay starts from the run's step-0 snapshot and repeats every recorded optimizer step with the
recorded micro-batches and learning rates, through a functional twin of the optimizer. Giving
example ``n`` the weight ``w_n`` in every step that contains it (loss ``mean_b(w_b l_b)``, so the
batch's normaliser is unchanged) is the coupled counterfactual (docs, design): same seed, same
initialisation, same batch order, same dropout masks. ``w = 1`` everywhere is the recorded run itself.

The training loss is evaluated as Lightning trained: in train mode. Random ops in the forward
(dropout) draw the numbers they drew in the run: the replay restores the generator states the
recorder kept for each micro-batch, and every weighting shares them (``vmap``'s ``randomness="same"``).
Batch norm normalises with the batch's statistics and its running statistics are replayed state
(``[M, *shape]``, like the parameters), updated as ``torch.nn.BatchNorm`` updates them. A weighted-down
example still counts in its batch's statistics, as it did in the run: the counterfactual reweights
its loss, nothing else.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from lightning_dtda.errors import UnsupportedTrainingError
from lightning_dtda.hooks import Hooks
from lightning_dtda.model.gradients import HookCall, trainable_parameters
from lightning_dtda.replay.layers import _BATCH_NORMS, _train_mode, running_statistics
from lightning_dtda.replay.optim import FunctionalOptimizer
from lightning_dtda.replay.relu import ReLUSmoothing
from lightning_dtda.runs.augmentation import KeyedIndex, ReplayableAugmentation, find_augmentation
from lightning_dtda.runs.fingerprint import SeededDataset, draws_random_numbers
from lightning_dtda.runs.format import Step, dropout_rates
from lightning_dtda.runs.replayable import replay_advice, unreplayable_layers
from lightning_dtda.runs.trajectory import Trajectory


def check_replayable(model: nn.Module, run: Trajectory, device: torch.device) -> None:
    """Refuse, before any work, a run whose training the replay cannot reproduce, naming the cause."""
    recorded = (run.manifest.module_fingerprint or {}).get("dropout")
    then, now = ({} if recorded is None else json.loads(recorded)), dropout_rates(model)
    if recorded is not None and then != now:
        differences = [
            f"{name}: {then.get(name)} in training, {now.get(name)} here"
            for name in sorted({*then, *now})
            if then.get(name) != now.get(name)
        ]
        raise UnsupportedTrainingError(
            f"The module given drops out at other rates than run {run.name}'s model did ({'; '.join(differences)}), so "
            "no replay of it is the run. A class is rebuilt from the run's recorded hyperparameters: a change made to "
            "the model after it was built (such as `layer.self_attn.dropout = 0.0`) is not in them. Pass an instance "
            "built and changed as the trained one was, or make the change a constructor argument."
        )
    problems = unreplayable_layers(model)
    problems += [
        f"{name} changed its training (see the recording guide)" for name in run.manifest.unreplayable_callbacks
    ]
    if run.manifest.world_size > 1:
        problems += [
            f"batch norm {name!r} normalised each process's batch separately (multi-process training)"
            for name, m in model.named_modules()
            if isinstance(m, _BATCH_NORMS)
        ]
    has_dropout = any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())
    steps = run.steps
    if has_dropout and steps and steps[0].rng is None:
        problems.append(
            "it has dropout, and the run was recorded by a version that did not record random states (record it again)"
        )
    drew = {generator for step in steps for states in (step.rng or ()) for generator in states}
    if drew and run.manifest.world_size > 1:
        problems.append("its training step drew random numbers on several processes, whose states are not recorded")
    if "cuda" in drew and device.type != "cuda":
        problems.append(
            "its training step drew random numbers on CUDA, which only a CUDA replay reproduces (use device='cuda')"
        )
    if problems:
        raise UnsupportedTrainingError(
            f"Run {run.name} cannot be replayed: " + "; ".join(problems) + ". " + replay_advice(run.manifest.optimizer)
        )


def check_augmentation(run: Trajectory, train_data: Dataset) -> None:
    """Refuse a replay that cannot read the views of randomly augmented examples that training read."""
    raw = train_data.dataset if isinstance(train_data, SeededDataset) else train_data
    random = train_data.random if isinstance(train_data, SeededDataset) else draws_random_numbers(train_data)
    wrap = "wrap the training set in lightning_dtda.ReplayableAugmentation and record the run again"
    if run.manifest.augmentation == "replayable" and not isinstance(raw, ReplayableAugmentation):
        found = "holds one inside" if find_augmentation(raw) is not None else "is not one"
        raise UnsupportedTrainingError(
            f"Run {run.name} was trained on a ReplayableAugmentation, and train_data ({type(raw).__name__}) {found}; "
            "pass the training set wrapped as the training DataLoader had it, so the replay reads the views training "
            "read."
        )
    if run.manifest.augmentation == "replayable" and any(
        key is None for step in run.steps for key in (step.augmentation or (None,))
    ):
        raise UnsupportedTrainingError(
            f"Run {run.name} read some batches of its ReplayableAugmentation without augmentation keys (the first epoch "
            "of multi-process training with DataLoader workers is drawn before the recorder attaches), so their views "
            "are lost. Under multi-process training with ReplayableAugmentation use num_workers=0, or attribute with "
            "Influence, which needs no replay."
        )
    if (random and not isinstance(raw, ReplayableAugmentation)) or run.manifest.augmentation == "random":
        raise UnsupportedTrainingError(
            f"Run {run.name}'s training set drew random numbers when its items were read (random data augmentation), "
            f"so a replay cannot see the views training drew. Influence attributes such runs; to replay, {wrap}."
        )


def _restore_random_states(step: Step, micro_batch: int, device: torch.device) -> None:
    """Put the generators a micro-batch drew from back in the states its training step found them in."""
    states = step.rng[micro_batch] if step.rng is not None else {}
    if "cpu" in states:
        torch.set_rng_state(states["cpu"])
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def initial_state(model: nn.Module, run: Trajectory, *names: list[str]) -> list[list[Tensor]]:
    """Step-0 values of each list of parameter or buffer ``names``, on the model's device and dtype
    (the snapshot is read once)."""
    state = run.state_dict(0)
    reference = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return [[state[n].to(device=reference[n].device, dtype=reference[n].dtype) for n in group] for group in names]


class Replay:
    """Replays the optimizer steps of ``run`` for ``M`` weightings at once.

    Parameters, optimizer state and running statistics carry a leading dimension ``M``. The steps are
    differentiable: when the given parameters, state or weights require grad, autograd can run back
    through them.

    Args:
        model: The run's module (any snapshot: its parameters and running statistics are replaced).
        run: A recorded run.
        train_data: The training set in recorded index order.
        relu_smoothing: If given, ReLUs in the training loss get this kink width in their second
            derivatives (see ``relu``); values and gradients are unchanged.

    Raises:
        ValueError: For a run it cannot reproduce (see ``check_replayable``), a scheduler that changed
            the momentum of a run recorded before 0.2, or custom gradient clipping.
    """

    def __init__(
        self, model: nn.Module, run: Trajectory, train_data: Dataset, relu_smoothing: float | None = None
    ) -> None:
        self.run = run
        self.train_data = train_data
        self.model = model
        self.device = next(model.parameters()).device
        check_replayable(model, run, self.device)
        check_augmentation(run, train_data)
        self.names = list(trainable_parameters(model))
        self.buffer_names = running_statistics(model)
        self.start, self.start_buffers = initial_state(model, run, self.names, self.buffer_names)
        for scheduler in run.manifest.schedulers:
            if scheduler.get("cycle_momentum") and not run.steps[0].scheduled:
                name = scheduler["class"].rpartition(".")[2]
                raise UnsupportedTrainingError(
                    f"Run {run.name}'s scheduler {name} changes the momentum during training, and the run was recorded "
                    "by a version that did not record momentum per step. Record it again with this version."
                )
        # Only CPU dropout needs its masks drawn as outside vmap and grad (see _EagerDropoutMasks).
        self.eager_masks = self.device.type == "cpu" and any(
            states for step in run.steps for states in (step.rng or ())
        )
        self.clipping = run.manifest.gradient_clipping or {}
        if self.clipping.get("custom"):
            raise UnsupportedTrainingError(
                f"Run {run.name}'s module overrides configure_gradient_clipping; the replay applies only Lightning's "
                "own clipping (gradient_clip_val with the 'norm' or 'value' algorithm)."
            )
        self.optimizer = FunctionalOptimizer.from_manifest(
            run.manifest.optimizer_class, run.manifest.param_groups, self.names
        )
        # Lightning divides each micro-batch's loss by the accumulation count and DDP averages over ranks.
        normaliser = run.manifest.accumulate_grad_batches * run.manifest.world_size
        call = HookCall(model, Hooks(model).train_loss)
        keys = [f"module.{n}" for n in self.names]
        buffer_keys = [f"module.{n}" for n in self.buffer_names]
        momenta = [model.get_submodule(n.rpartition(".")[0]).momentum for n in self.buffer_names]
        # Only the loss is evaluated under the smoothing mode: it runs every op through Python.
        self.smoothing = ReLUSmoothing(relu_smoothing) if relu_smoothing is not None else None
        loss_context = self.smoothing or contextlib.nullcontext()
        self._collected: dict[str, tuple[Tensor, Tensor]] = {}
        # When a list, advance() appends each micro-batch's loss of the first weighting (see replay_checked).
        self.traced_losses: list[Tensor] | None = None
        # The relative distance from the recorded weights at the last snapshot checked (see replay_checked).
        self.gap: float | None = None
        # How far rounding alone drifts by then, where the gap passed the tolerance (see check.rounding_drift).
        self.rounding_gap: float | None = None

        def weighted_loss(
            params: list[Tensor], buffers: list[Tensor], w: Tensor, batch: Any
        ) -> tuple[Tensor, tuple[list[Tensor], Tensor]]:
            self._collected.clear()
            with loss_context:
                losses = functional_call(call, {**dict(zip(keys, params)), **dict(zip(buffer_keys, buffers))}, (batch,))
            loss = (losses * w).mean()
            # Besides the running statistics, the micro-batch's loss as training_step returned it (compared
            # with the recorded one by the replay check).
            return loss / normaliser, (
                [self._updated(n, b, m) for n, b, m in zip(self.buffer_names, buffers, momenta)],
                loss.detach(),
            )

        # Every weighting draws the same random numbers (dropout masks): those of the recorded run.
        self._grad = grad(weighted_loss, has_aux=True)
        self._batched_grad = vmap(self._grad, in_dims=(0, 0, 0, None), randomness="same")

    def initial(self, num_models: int) -> tuple[list[Tensor], dict[str, Any]]:
        """The step-0 parameters ``[M, *shape]`` and the initial state: the optimizer's, and the
        running statistics under ``"running_stats"`` (``[M, *shape]`` each, in ``buffer_names`` order)."""
        params = [p.unsqueeze(0).expand(num_models, *p.shape).clone() for p in self.start]
        buffers = [b.unsqueeze(0).expand(num_models, *b.shape).clone() for b in self.start_buffers]
        return params, {**self.optimizer.init(params), "running_stats": buffers}

    def advance(
        self,
        params: list[Tensor],
        state: dict[str, Any],
        weights: Tensor,
        steps: Sequence[Step],
        progress: bool = False,
    ) -> tuple[list[Tensor], dict[str, Any]]:
        """Apply ``steps`` with per-example loss weights ``weights [M, N]``."""
        device = params[0].device
        state = dict(state)
        buffers = state.pop("running_stats")
        devices = [device] if device.type == "cuda" else []
        # The replay sets the generators to the run's states; the caller's sequence resumes afterwards.
        # One weighting (unrolling, segments, the replay check) is not vmapped: its forward and graph cost half as
        # much. (Its random ops still need eager masks: under grad's wrappers empty_like is contiguous too.)
        single = len(weights) == 1
        with torch.random.fork_rng(devices=devices), _train_mode(self.model, self._collected, self.eager_masks):
            for step in tqdm(steps, desc=f"replaying {self.run.name}", disable=not progress, leave=False):
                grads: list[Tensor] | None = None
                for k, indices in enumerate(step.micro_batches):
                    key = step.augmentation[k] if step.augmentation else None
                    items = [self.train_data[i if key is None else KeyedIndex(i, key)] for i in indices.tolist()]
                    batch = move_data_to_device(default_collate(items), device)
                    _restore_random_states(step, k, device)
                    w = weights[:, indices]
                    if single:
                        g, (buffers, loss) = self._grad([p[0] for p in params], [b[0] for b in buffers], w[0], batch)
                        g, buffers, loss = [t[None] for t in g], [b[None] for b in buffers], loss[None]
                    else:
                        g, (buffers, loss) = self._batched_grad(params, buffers, w, batch)
                    if self.traced_losses is not None:
                        self.traced_losses.append(loss[0].detach())
                    grads = list(g) if grads is None else [a + b for a, b in zip(grads, g)]
                assert grads is not None
                if step.skipped:  # the gradient scaler skipped it; the forwards above still updated batch norms
                    continue
                grads = self._clip(grads)
                params, state = self.optimizer.step(params, grads, state, step.lrs, step.scheduled)
        return params, {**state, "running_stats": buffers}

    def _updated(self, name: str, running: Tensor, momentum: float) -> Tensor:
        """torch.nn.BatchNorm's update of a running statistic by the batch's: ``(1 - momentum) running + momentum batch``."""
        module, _, buffer = name.rpartition(".")
        if module not in self._collected:  # the layer took no part in the training loss
            return running
        mean, var = self._collected[module]
        return torch.lerp(running, var if buffer == "running_var" else mean, momentum)

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

    def final(self, weights: Tensor, progress: bool = False, perturbed: bool = False) -> dict[str, Tensor]:
        """The whole run replayed once per row of ``weights [M, N]``, without gradients: the final
        parameters and running statistics by name, ``[M, *shape]`` each. ``perturbed``: from step-0
        parameters moved by one rounding unit (relative ``eps`` of their dtype, the same random signs for
        every row), to see how far rounding alone moves each replay."""
        params, state = self.initial(len(weights))
        if perturbed:
            params = moved_by_rounding(params)
        weights = weights.to(device=params[0].device, dtype=params[0].dtype)
        with torch.no_grad():
            params, state = self.advance(params, state, weights, self.run.steps, progress)
        return self.named(params, state)

    def named(self, params: list[Tensor], state: dict[str, Any]) -> dict[str, Tensor]:
        """The replayed parameters and running statistics by name, ``[M, *shape]`` each."""
        return {**dict(zip(self.names, params)), **dict(zip(self.buffer_names, state["running_stats"]))}


def moved_by_rounding(params: list[Tensor], first_row: int = 0) -> list[Tensor]:
    """``params [M, *shape]`` with rows ``first_row`` on moved by one rounding unit (relative ``eps`` of their
    dtype), with random signs drawn from a fixed seed: the same for every row and every call."""
    generator = torch.Generator().manual_seed(0)
    eps = torch.finfo(params[0].dtype).eps
    signs = [torch.randint(0, 2, p.shape[1:], generator=generator).to(p) * 2 - 1 for p in params]
    return [torch.cat([p[:first_row], p[first_row:] * (1 + eps * sign)]) for p, sign in zip(params, signs)]


def state_tensors(state: dict[str, Any]) -> list[Tensor]:
    """The tensors of a replay state (optimizer state and running statistics), flattened in a fixed order."""
    return [t for key in sorted(state) if isinstance(state[key], list) for t in state[key] if t is not None]


def with_state_tensors(state: dict[str, Any], tensors: list[Tensor]) -> dict[str, Any]:
    """Invert ``state_tensors``: ``state`` with its tensors replaced by ``tensors``."""
    rebuilt, it = dict(state), iter(tensors)
    for key in sorted(state):
        if isinstance(state[key], list):
            rebuilt[key] = [None if t is None else next(it) for t in state[key]]
    return rebuilt


def replay(
    model: nn.Module,
    run: Trajectory,
    train_data: Dataset,
    weights: Tensor,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Replay ``run`` once per row of ``weights [M, N]``; returns the final trainable parameters and
    running statistics by name, ``[M, *shape]`` each."""
    return Replay(model, run, train_data).final(weights, progress)


def measure(model: nn.Module, replayed: dict[str, Tensor], query_data: Dataset, batch_size: int = 256) -> Tensor:
    """The measurement hook on ``query_data`` (``model`` in eval mode) for each of ``M`` replayed
    models (``replay``'s output), ``[M, queries]``."""
    call = HookCall(model, Hooks(model).measurement)
    params = {f"module.{n}": t for n, t in replayed.items()}
    device = next(iter(replayed.values())).device

    def one(p: dict[str, Tensor], batch: Any) -> Tensor:
        return functional_call(call, p, (batch,))

    with torch.no_grad():
        return torch.cat(
            [
                vmap(one, in_dims=(0, None))(params, move_data_to_device(b, device))
                for b in DataLoader(query_data, batch_size=batch_size)
            ],
            dim=1,
        )
