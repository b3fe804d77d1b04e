"""Whether a replay reproduces its recorded run: the one check every consumer of a replay runs."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_dtda.errors import ReplayMismatchError
from lightning_dtda.replay.engine import Replay, moved_by_rounding
from lightning_dtda.runs.format import Step
from lightning_dtda.runs.trajectory import Trajectory

# Replay.advance's signature: (params, state, weights [M, N], steps, progress) -> (params, state).
Advance = Callable[[list[Tensor], dict[str, Any], Tensor, Sequence[Step], bool], tuple[list[Tensor], dict[str, Any]]]

# The replay must land on the recorded weights; a larger gap means it is not the same run.
_REPLAY_TOLERANCE = 1e-4


# A replay is not bitwise the run (vmapped kernels round differently), and training can amplify rounding:
# on the digits_dtda.py CNN (SGD, ReLU, max-pool, batch norm, float32) one seed of 32 drifted 1e-4 from its
# recording by step 240 while every loss matched. So a gap beyond the tolerance is measured against the
# replay's own sensitivity: the same replay started from weights one rounding unit away. A gap within
# _AMPLIFIED times that drift is rounding the run amplifies, which no replay can avoid, not another run;
# up to _AMPLIFIED_CAP only: beyond, the run is chaotic (rounding alone scrambles it) and no replay is it.
_AMPLIFIED = 10.0
_AMPLIFIED_CAP = 1e-2


# A mixed-precision run is replayed in full precision: its bfloat16 / float16 rounding cannot be
# reproduced by the vmapped replay (replaying under the same autocast landed further away, 6e-3
# against 4e-3 relative, on a bf16-mixed MLP), so the replay differentiates the run without it.
_MIXED_PRECISION_TOLERANCE = 2e-2


_UPDATES = (
    "an optimizer step changed by a callback or closure, weights changed outside training_step, parameters trained "
    "but not trainable in the module given, or, under Adam, a parameter whose gradient is only rounding noise, which "
    "Adam turns into full steps: a bias just before a batch norm (use bias=False there, or freeze it)"
)


def diagnose(run: Trajectory, replayed: list[float] | None, last: int) -> str:
    """Where a replay leaves its run, from the training loss of every micro-batch (recorded by the
    recorder, and traced by the replay for the recorded weighting) of steps 1 to ``last``: the first
    micro-batch whose losses differ, and what can differ there."""
    steps = run.steps[:last]
    if replayed is None or any(step.losses is None for step in steps):
        return (
            "Where the replay leaves the run is unknown: the run did not record its training losses (recorded before "
            "0.3, under DDP or with manual optimization). Possible causes: training_step's loss is not the "
            "attribution_train_loss hook's (a term added to it), random data augmentation, dropout inside a fused "
            f"kernel (scaled_dot_product_attention with dropout_p > 0), mixed precision (this run: "
            f"{run.manifest.precision}), {_UPDATES}."
        )
    tolerance = _MIXED_PRECISION_TOLERANCE if "mixed" in run.manifest.precision else _REPLAY_TOLERANCE
    position = 0
    for t, step in enumerate(steps, start=1):
        for k, recorded in enumerate(step.losses or ()):
            ours, position = replayed[position], position + 1
            if math.isnan(recorded) or abs(ours - recorded) <= tolerance * max(abs(recorded), 1e-6):
                continue
            evidence = f"(step {t}, micro-batch {k + 1}: the run's loss {recorded:.6g}, the replay's {ours:.6g})"
            if t == 1 and k == 0:
                return (
                    f"Its first training loss already differs {evidence}, before any update: the loss training_step "
                    "returns is not the attribution_train_loss hook's (a term added to it, another reduction), or "
                    "the replay reads other inputs than training did (random data augmentation)."
                )
            if k > 0:
                drew = (
                    "it drew random numbers, which the replay restores" if step.rng and step.rng[k] else "it drew none"
                )
                return (
                    f"The first loss that differs {evidence} follows the step's earlier micro-batches, which match, "
                    f"with no update between: that micro-batch's forward is not the run's ({drew}): other inputs "
                    "(random data augmentation), or a loss that changes from one micro-batch to the next."
                )
            previous = steps[t - 2]
            clipping = run.manifest.gradient_clipping or {}
            features = [f"learning rates {list(previous.lrs)}", f"{len(previous.micro_batches)} micro-batch(es)"]
            if clipping.get("value"):
                features.append(f"gradient clipping at {clipping['value']} ({clipping.get('algorithm')})")
            if previous.skipped:
                features.append("skipped by the gradient scaler")
            return (
                f"Its losses match the run's up to step {t - 1} and the first after that step's update differs "
                f"{evidence}: step {t - 1}'s update is not the run's ({', '.join(features)}; {run.manifest.optimizer_name}), "
                f"or from step {t} on training_step's loss is not the attribution_train_loss hook's. An update differs "
                f"through {_UPDATES}."
            )
    return (
        f"Every training loss up to step {last} equals the run's, so the replay computes the run's losses and its "
        f"updates differ: {_UPDATES}."
    )


def check_replay(
    run: Trajectory,
    replay: Replay,
    params: list[Tensor],
    state: dict[str, Any],
    snapshot: int,
    strict: bool = False,
    excuse_rounding: bool = True,
) -> float:
    """Raise if the replay (row 0 of ``params`` and ``state``) does not reproduce the weights and running
    statistics recorded at ``snapshot``; at the last snapshot of a run with several intervals it only
    warns, unless ``strict`` (a ground truth must be right or absent; unrolled effects describe the replay).
    ``excuse_rounding``: a gap beyond the tolerance passes if it is rounding the run amplifies (below);
    without, it raises (``retrain`` then replays with the run's own kernels, see there)."""
    recorded = run.state_dict(snapshot)
    ignored = functionless_entries(replay.model)
    gaps = {n: _relative_gap(t[0], recorded[n].to(t), ignored.get(n)) for n, t in replay.named(params, state).items()}
    worst = max(gaps, key=gaps.__getitem__)
    gap = gaps[worst]
    mixed = "mixed" in run.manifest.precision
    if gap <= (_MIXED_PRECISION_TOLERANCE if mixed else _REPLAY_TOLERANCE):
        return gap
    last = run.snapshot_steps[snapshot]
    drift = None
    # Half precision ("16-true", "bf16-true"): one rounding unit is already ~1e-3, which would excuse anything.
    full_precision = not mixed and run.manifest.input_dtype not in (torch.float16, torch.bfloat16)
    if excuse_rounding and full_precision:
        # Measured beyond the cap too, where it excuses nothing: it tells a run that rounding scrambled from a replay
        # that computes something else (a new-user trial's refusal blamed augmentation for a chaotic float32 CNN).
        drifts = rounding_drift(replay, last)
        drift = replay.rounding_gap = max(drifts.values())
        # Tensor by tensor: one sensitive tensor's drift must not excuse another tensor's gap.
        if gap <= _AMPLIFIED_CAP and all(g <= max(_REPLAY_TOLERANCE, _AMPLIFIED * drifts[n]) for n, g in gaps.items()):
            return gap
    traced = None if replay.traced_losses is None else [float(loss) for loss in replay.traced_losses]
    amplified = (
        "" if drift is None else f" (rounding alone, from weights one rounding unit apart, drifts {drift:.1e} by then)"
    )
    if mixed:  # what diagnose() would blame (an update, a callback) is the half-precision rounding first
        cause = (
            f"The run trained in {run.manifest.precision}, which the replay computes in full precision and accepts "
            f"within {_MIXED_PRECISION_TOLERANCE:g} only: the run's half-precision rounding has taken it further. "
            "Record it with precision='32-true' to replay it, or use Influence(), which needs no replay."
        )
    elif drift is not None and gap > _AMPLIFIED_CAP and drift * _AMPLIFIED >= gap:
        cause = (
            f"Rounding alone takes a replay as far from its run by then: training amplifies it (large learning rates, "
            f"ReLU and max-pool kinks), and beyond {_AMPLIFIED_CAP:g} it has scrambled the run: Lightning may repeat it "
            f"bit for bit, but no replay whose kernels round otherwise does in {run.manifest.precision}. Record it with precision='64-true' to replay it, or use "
            "Influence(), which needs no replay."
        )
    else:
        cause = diagnose(run, traced, last)
    message = (
        f"Replaying {run.name} to step {last} lands {gap:.1e} (relative) away from its recorded weights{amplified} "
        f"(most in {worst!r}), so the replay is not the run. {cause}"
    )
    if snapshot == len(run.snapshot_steps) - 1 and snapshot > 1 and not strict:
        rank_zero_warn(
            message + " Unrolled effects describe the replay; the run's settings record the gap (replay_gap)."
        )
        return gap
    raise ReplayMismatchError(message, gap, last)


def functionless_entries(model: nn.Module) -> dict[str, slice]:
    """Parameter entries no output depends on, by name: the key bias of each ``nn.MultiheadAttention``
    (``in_proj_bias[E:2E]``: it adds one constant to every logit of a query, which softmax removes). Its
    gradient is rounding noise, which Adam turns into steps no replay reproduces; the replay check leaves
    it out, since whatever it holds, every output and every other parameter's update is the same."""
    return {
        f"{prefix}.in_proj_bias" if prefix else "in_proj_bias": slice(m.embed_dim, 2 * m.embed_dim)
        for prefix, m in model.named_modules()
        # An extra key (bias_k, or add_zero_attn's zeros) has no key bias: the shift is then not common.
        if isinstance(m, nn.MultiheadAttention)
        and m.in_proj_bias is not None
        and m.bias_k is None
        and not m.add_zero_attn
    }


def _relative_gap(replayed: Tensor, recorded: Tensor, ignored: slice | None) -> float:
    if ignored is not None:
        keep = torch.ones(replayed.shape[-1], dtype=torch.bool, device=replayed.device)
        keep[ignored] = False
        replayed, recorded = replayed[..., keep], recorded[..., keep]
    return ((replayed - recorded).abs().max() / recorded.abs().max().clamp(min=1e-12)).item()


def rounding_drift(replay: Replay, step: int) -> dict[str, float]:
    """How far training amplifies rounding by ``step``: the recorded run replayed from its step-0 weights and
    from those weights moved by one rounding unit (relative ``eps`` of their dtype, random signs), as the
    relative distance between the two, per parameter and running statistic."""
    params, state = replay.initial(2)
    params = moved_by_rounding(params, first_row=1)
    ones = torch.ones(2, replay.run.dataset_length, dtype=params[0].dtype, device=params[0].device)
    traced, replay.traced_losses = replay.traced_losses, None
    try:
        with torch.no_grad():
            params, state = replay.advance(params, state, ones, replay.run.steps[:step])
    finally:
        replay.traced_losses = traced
    ignored = functionless_entries(replay.model)
    return {n: _relative_gap(t[0], t[1], ignored.get(n)) for n, t in replay.named(params, state).items()}


def replay_checked(
    replay: Replay,
    weights: Tensor,
    progress: bool = False,
    keep_checkpoints: bool = False,
    strict: bool = False,
    advance: Advance | None = None,
    excuse_rounding: bool = True,
) -> tuple[list[Tensor], dict[str, Any], list[tuple[list[Tensor], dict[str, Any]]]]:
    """The whole run replayed once per row of ``weights [M, N]`` (no gradients), snapshot interval by
    interval, with row 0, which must be the recorded run (all ones), checked against the recorded
    weights by ``check_replay`` at every snapshot: raising before unrolling's long pass, except at the
    last snapshot, where only ``strict`` raises (see ``check_replay``); ``replay.gap`` is then the last gap.

    Args:
        advance: Advances one interval, as ``Replay.advance`` (the default, without gradients) and with its
            arguments; unrolling's keeps the interval's autograd graph for its reverse pass.
        excuse_rounding: As ``check_replay``'s.

    Returns:
        The final parameters and state (as ``Replay.advance``), and with ``keep_checkpoints`` the parameters
        and state at the start of every interval (what unrolling's reverse pass restarts from).
    """
    if not bool((weights[0] == 1).all()):
        raise ValueError("replay_checked needs row 0 of the weights to be the recorded run (all ones).")
    run = replay.run
    params, state = replay.initial(len(weights))
    weights = weights.to(device=params[0].device, dtype=params[0].dtype)
    bounds = run.snapshot_steps
    checkpoints = []
    replay.traced_losses = []  # the recorded weighting's losses, for diagnose()
    try:
        with torch.no_grad():
            for index, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
                if keep_checkpoints:
                    checkpoints.append((params, state))
                params, state = (advance or replay.advance)(params, state, weights, run.steps[a:b], progress)
                # Every snapshot: one that misses raises before unrolling's long reverse pass, and the
                # last one only warns unless strict (see check_replay).
                replay.gap = check_replay(run, replay, params, state, index, strict, excuse_rounding)
    finally:
        replay.traced_losses = None
    return params, state, checkpoints
