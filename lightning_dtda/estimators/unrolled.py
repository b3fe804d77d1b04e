"""Unrolled differentiation: exact per-seed removal effects by differentiating through the replayed run.

Give example ``n`` the loss weight ``w_n`` in every step that contains it. The final measurement
``m(theta_T(w))`` is a differentiable function of ``w``; removing example ``n`` (``w_n: 1 -> 0``)
changes it, to first order, by ``-dm/dw_n``. One reverse-mode pass (an adjoint carried from
``dm/dtheta_T`` back through every replayed optimizer step) gives ``dm/dw`` for *all* examples at
once; the ``Q`` queries' adjoints travel together as a batch.

Memory: the forward replay keeps the parameters and optimizer state only at the recorded
snapshots; the backward pass recomputes one snapshot interval at a time with autograd, so memory
is bounded by the interval, not the run's length (gradient checkpointing).

``relu_smoothing`` blurs ReLU's kink in the replay's second derivatives; see ``relu``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from lightning_dtda.errors import UnsupportedTrainingError
from lightning_dtda.estimators.base import Estimator, RunContext, measurement_gradients
from lightning_dtda.replay.check import replay_checked
from lightning_dtda.replay.engine import Replay, state_tensors, with_state_tensors
from lightning_dtda.replay.layers import differentiable_running_statistics, running_statistics
from lightning_dtda.runs.trajectory import Trajectory


@dataclass(frozen=True)
class Unrolled(Estimator):
    """Exact first-order removal effects, by differentiating through each replayed run (see the
    module docstring). Needs every optimizer step's batch membership, which the recorder keeps, and a
    replayable optimizer (SGD, Adam, AdamW).

    Args:
        relu_smoothing: ``None`` (default) differentiates the run exactly; a width ``sigma > 0`` (in
            pre-activation units) stands a Gaussian of that width in for ReLU's kink in the replay's
            second derivatives, which predicts whole-example removals better on ReLU networks (see
            ``relu`` and the README's benchmark). Values and gradients of the replay are unchanged. SGD
            runs only: under Adam the smoothed derivative diverges (refused).

    Raises:
        ValueError: For a ``relu_smoothing`` that is not ``None`` or positive; at attribution, for
            ``relu_smoothing`` on a run not trained with SGD.

    Example:

        ```python
        Attributor(MyModule, "runs/", train_set, estimator=Unrolled(relu_smoothing=0.1))
        ```
    """

    relu_smoothing: float | None = None

    def __post_init__(self) -> None:
        if self.relu_smoothing is not None and (isinstance(self.relu_smoothing, bool) or not self.relu_smoothing > 0):
            raise ValueError(f"relu_smoothing must be None or a positive width, got {self.relu_smoothing!r}.")

    @property
    def label(self) -> str:
        """``unrolled``, or ``unrolled-relu<width>`` with ``relu_smoothing``: messages and files tell the two apart."""
        return super().label + ("" if self.relu_smoothing is None else f"-relu{self.relu_smoothing:g}")

    def estimate(self, context: RunContext) -> tuple[Tensor, dict[str, Any]]:
        optimizer = context.run.manifest.optimizer_class
        if self.relu_smoothing is not None and context.run.manifest.optimizer != "SGD":
            # Adam divides each entry's step by sqrt(v_hat) + eps, enormous where gradients were near 0
            # (dead units, weights on always-zero inputs); the blurred kinks feed those entries, and the
            # linearised run diverges: on the digits MLP under Adam, NaN for widths 0.1 and 1, and effects
            # 6x the exact ones at 1e-3.
            raise UnsupportedTrainingError(
                f"Unrolled(relu_smoothing=...) is for SGD runs; {context.run.name} used {optimizer}, under which the "
                "smoothed derivative diverges. Use Unrolled() (exact) for Adam runs."
            )
        names = running_statistics(context.model)
        buffer_grads = None
        if names:  # the final measurement (eval mode) also depends on the running statistics the replay carries
            with differentiable_running_statistics(context.model):
                buffer_grads = measurement_gradients(
                    context.model,
                    context.query_data,
                    context.batch_size,
                    context.device,
                    context.progress,
                    context.reduce,
                    names,
                    "query gradients (running statistics)",
                )
        effects, gap = unrolled_effects(
            context.model,
            context.run,
            context.train_data,
            context.query_grads,
            buffer_grads,
            context.progress,
            self.relu_smoothing,
        )
        # The replay's distance from the recorded final weights: effects describe the replay (a warning said so
        # if it is beyond the check's tolerance), and a saved result keeps how far that was.
        return effects, {"replay_gap": gap}


def unrolled_effects(
    model: nn.Module,
    run: Trajectory,
    train_data: Dataset,
    query_grads: Tensor,
    query_buffer_grads: Tensor | None = None,
    progress: bool = False,
    relu_smoothing: float | None = None,
) -> tuple[Tensor, float]:
    """Removal effects ``[Q, N]`` of every training example on each query, by reverse-mode unrolling, and
    the replay's relative distance from the recorded final weights.

    Args:
        model: The run's module.
        run: A recorded run with batch membership.
        train_data: The training set in recorded index order.
        query_grads: ``[Q, P]`` gradients of the measurements at the run's final weights.
        query_buffer_grads: ``[Q, B]`` their gradients with respect to the running statistics
            (``replay.running_statistics``' order), for a module with batch norms.
        relu_smoothing: ``None`` for the exact derivative, or the width ``sigma`` (in
            pre-activation units) of the Gaussian that stands in for ReLU's kink (see ``relu``).
    """
    replay = Replay(model, run, train_data, relu_smoothing)
    steps = run.steps
    bounds = run.snapshot_steps
    num_train = run.dataset_length
    dtype = replay.start[0].dtype
    ones = torch.ones(1, num_train, dtype=dtype, device=replay.device)
    params, state, checkpoints = replay_checked(replay, ones, keep_checkpoints=True)
    device = params[0].device

    # Adjoints: one row per query for each parameter and each state tensor. The optimizer's final
    # state does not enter the measurement; the running statistics do.
    sizes = [p[0].numel() for p in params]
    adjoint = [
        g.reshape(len(query_grads), *p.shape[1:]) for g, p in zip(query_grads.to(dtype).split(sizes, dim=1), params)
    ]
    final_state_adjoint = {
        k: [None if t is None else torch.zeros(len(query_grads), *t.shape[1:], dtype=dtype, device=device) for t in v]
        for k, v in state.items()
        if isinstance(v, list)
    }
    if query_buffer_grads is not None:
        buffer_sizes = [b[0].numel() for b in state["running_stats"]]
        final_state_adjoint["running_stats"] = [
            g.reshape(len(query_grads), *b.shape[1:])
            for g, b in zip(query_buffer_grads.to(dtype).split(buffer_sizes, dim=1), state["running_stats"])
        ]
    state_adjoint = state_tensors(final_state_adjoint)
    dm_dw = torch.zeros(len(query_grads), num_train, dtype=dtype, device=device)
    segments = list(zip(bounds[:-1], bounds[1:], checkpoints))
    for a, b, (p_start, s_start) in tqdm(
        segments[::-1], desc=f"unrolling {run.name}", disable=not progress, leave=False
    ):
        p_in = [p.detach().requires_grad_() for p in p_start]
        s_in = [t.detach().requires_grad_() for t in state_tensors(s_start)]
        w = ones.clone().requires_grad_()
        with torch.enable_grad():
            p_out, s_out = replay.advance(p_in, with_state_tensors(s_start, s_in), w, steps[a:b])
        outputs = p_out + state_tensors(s_out)
        # Parameters carry a model dimension of 1; each query's adjoint fills it.
        grad_outputs = [g.unsqueeze(1) for g in adjoint]
        grad_outputs += [g.unsqueeze(1) for g in state_adjoint]
        inputs = p_in + s_in + [w]
        grads = torch.autograd.grad(outputs, inputs, grad_outputs, is_grads_batched=True, allow_unused=True)
        grads = [
            torch.zeros(len(query_grads), *x.shape, dtype=dtype, device=device) if g is None else g
            for g, x in zip(grads, inputs)
        ]
        adjoint = [g.squeeze(1) for g in grads[: len(p_in)]]
        state_adjoint = [g.squeeze(1) for g in grads[len(p_in) : -1]]
        dm_dw += grads[-1].squeeze(1)
    if replay.smoothing is not None and not replay.smoothing.used:
        rank_zero_warn(f"relu_smoothing had no effect on {run.name}: its training loss calls no ReLU.")
    return -dm_dw, replay.gap
