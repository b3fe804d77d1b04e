"""Unrolled differentiation: exact per-seed removal effects by differentiating through the replayed run.

Give example ``n`` the loss weight ``w_n`` in every step that contains it. The final measurement
``m(theta_T(w))`` is a differentiable function of ``w``; removing example ``n`` (``w_n: 1 -> 0``)
changes it, to first order, by ``-dm/dw_n``. One reverse-mode pass (an adjoint carried from
``dm/dtheta_T`` back through every replayed optimizer step) gives ``dm/dw`` for *all* examples at
once; the ``Q`` queries' adjoints travel together as a batch.

Memory: the forward replay keeps the parameters and optimizer state at the recorded snapshots and the
autograd graphs of the last snapshot intervals that fit in ``_GRAPH_BUDGET`` bytes of saved tensors
(each measured); the reverse pass recomputes the other intervals one at a time with autograd, so memory
is bounded by the budget and one interval, not the run's length (gradient checkpointing).

``relu_smoothing`` blurs ReLU's kink in the replay's second derivatives; see ``relu``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.func import vmap
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from lightning_dtda.errors import UnsupportedTrainingError
from lightning_dtda.estimators.base import Estimator, RunContext, measurement_gradients
from lightning_dtda.replay.check import replay_checked
from lightning_dtda.replay.engine import Replay, state_tensors, with_state_tensors
from lightning_dtda.replay.layers import differentiable_running_statistics, running_statistics
from lightning_dtda.runs.format import Step
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


# Bytes of autograd graphs the forward replay keeps for the reverse pass, which would otherwise compute each
# snapshot interval again (about one more replay: on the digits_dtda.py models a whole run's graphs take
# 8 MB for the MLP, 190 MB for the CNN). Building a graph costs no more than a replay without one.
_GRAPH_BUDGET = 2 * 2**30


def _graph(
    replay: Replay, params: list[Tensor], state: dict[str, Any], weights: Tensor, steps: Sequence[Step]
) -> tuple[list[Tensor], dict[str, Any], list[Tensor], list[Tensor]]:
    """The interval ``steps`` replayed from ``params`` and ``state`` with its autograd graph: the final parameters
    and state (detached), and the graph's outputs and inputs (parameters, state tensors, then the weights)."""
    p_in = [p.detach().requires_grad_() for p in params]
    s_in = [t.detach().requires_grad_() for t in state_tensors(state)]
    w = weights.detach().clone().requires_grad_()
    with torch.enable_grad():
        p_out, s_out = replay.advance(p_in, with_state_tensors(state, s_in), w, steps)
    outputs = p_out + state_tensors(s_out)
    detached = with_state_tensors(s_out, [t.detach() for t in state_tensors(s_out)])
    return [p.detach() for p in p_out], detached, outputs, p_in + s_in + [w]


def _saved_bytes(outputs: list[Tensor]) -> int:
    """Bytes of the tensors the autograd graph behind ``outputs`` saves for its backward (each storage once):
    built-in nodes' ``_saved_*`` attributes and custom ``autograd.Function`` nodes' ``saved_tensors``."""
    storages: set[int] = set()
    total, seen = 0, set()
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        names = _SAVED_NAMES.get(type(node))
        if names is None:  # dir() is most of a walk's cost: once per node type
            names = _SAVED_NAMES[type(node)] = [n for n in dir(node) if n.startswith("_saved_")]
            if isinstance(node, torch.autograd.function.BackwardCFunction):
                names.append("saved_tensors")
        for name in names:
            saved = getattr(node, name)
            for t in saved if isinstance(saved, (tuple, list)) else (saved,):
                if isinstance(t, Tensor) and t.untyped_storage().data_ptr() not in storages:
                    storages.add(t.untyped_storage().data_ptr())
                    total += t.untyped_storage().nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions if next_node is not None)
    return total


_SAVED_NAMES: dict[type, list[str]] = {}


class _IntervalGraphs:
    """The checked forward replay's ``advance`` (see ``replay_checked``) that keeps the autograd graphs of the
    run's last snapshot intervals, so the reverse pass need not replay them again: every interval's graph is
    built and sized, and the oldest kept ones are dropped while the kept graphs pass ``budget`` bytes.
    ``kept`` holds them by interval (outputs, inputs)."""

    def __init__(self, replay: Replay, budget: int) -> None:
        self.replay = replay
        self.budget = budget
        self.kept: dict[int, tuple[list[Tensor], list[Tensor]]] = {}
        self.sizes: dict[int, int] = {}  # bytes of each kept graph
        self.step_bytes: float | None = None  # a step's graph, measured on the first interval with no skipped step
        self.index = 0

    def advance(
        self, params: list[Tensor], state: dict[str, Any], weights: Tensor, steps: Sequence[Step], progress: bool
    ) -> tuple[list[Tensor], dict[str, Any]]:
        index, self.index = self.index, self.index + 1
        p_out, s_out, outputs, inputs = _graph(self.replay, params, state, weights, steps)
        # Walking a graph costs up to a fifth of building it: measured once per step on an interval that no
        # gradient scaler skipped (a skipped step saves less), the others are estimated from that.
        full = not any(step.skipped for step in steps)
        if self.step_bytes is None or not full:
            size = _saved_bytes(outputs)
            if full:
                self.step_bytes = size / len(steps)
        else:
            size = math.ceil(self.step_bytes * len(steps))
        self.kept[index], self.sizes[index] = (outputs, inputs), size
        while sum(self.sizes.values()) > self.budget:
            oldest = min(self.sizes)
            del self.kept[oldest], self.sizes[oldest]
        return p_out, s_out


def _vjp(outputs: list[Tensor], inputs: list[Tensor]) -> Callable[[list[Tensor]], tuple[Tensor, ...]]:
    """The vector-Jacobian product of a built graph, for ``torch.func.vmap`` over the cotangents: 1.6x
    faster through convolutions and batch norms than ``autograd.grad(is_grads_batched=True)`` (measured on
    the digits CNN, 50 queries)."""

    def product(cotangents: list[Tensor]) -> tuple[Tensor, ...]:
        # vmap runs this once for all cotangents: the graph need not outlive it.
        return torch.autograd.grad(outputs, inputs, cotangents, materialize_grads=True)

    return product


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
    num_train = run.dataset_length
    dtype = replay.start[0].dtype
    ones = torch.ones(1, num_train, dtype=dtype, device=replay.device)
    graphs = _IntervalGraphs(replay, _GRAPH_BUDGET)
    try:
        params, state, checkpoints = replay_checked(replay, ones, keep_checkpoints=True, advance=graphs.advance)
    except BaseException:
        graphs.kept.clear()  # a traceback kept alive (a notebook's) must not hold the graphs
        raise
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
    bounds = run.snapshot_steps
    intervals = list(enumerate(zip(bounds[:-1], bounds[1:], checkpoints)))
    for index, (a, b, (p_start, s_start)) in tqdm(
        intervals[::-1], desc=f"unrolling {run.name}", disable=not progress, leave=False
    ):
        graph = graphs.kept.pop(index, None)
        outputs, inputs = graph if graph is not None else _graph(replay, p_start, s_start, ones, run.steps[a:b])[2:]
        # Parameters carry a model dimension of 1; each query's adjoint fills it.
        grad_outputs = [g.unsqueeze(1) for g in adjoint]
        grad_outputs += [g.unsqueeze(1) for g in state_adjoint]
        grads = vmap(_vjp(outputs, inputs))(grad_outputs)
        del outputs, inputs, graph  # the interval's graph: memory is bounded by what is kept
        adjoint = [g.squeeze(1) for g in grads[: len(params)]]
        state_adjoint = [g.squeeze(1) for g in grads[len(params) : -1]]
        dm_dw += grads[-1].squeeze(1)
    if replay.smoothing is not None and not replay.smoothing.used:
        rank_zero_warn(f"relu_smoothing had no effect on {run.name}: its training loss calls no ReLU.")
    return -dm_dw, replay.gap
