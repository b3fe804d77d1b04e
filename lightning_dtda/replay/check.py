"""Whether a replay reproduces its recorded run: the one check every consumer of a replay runs."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_dtda.errors import ReplayMismatchError
from lightning_dtda.replay.engine import Replay
from lightning_dtda.runs.trajectory import Trajectory

# The replay must land on the recorded weights; a larger gap means it is not the same run.
_REPLAY_TOLERANCE = 1e-4


# A mixed-precision run is replayed in full precision: its bfloat16 / float16 rounding cannot be
# reproduced by the vmapped replay (replaying under the same autocast landed further away, 6e-3
# against 4e-3 relative, on a bf16-mixed MLP), so the replay differentiates the run without it.
_MIXED_PRECISION_TOLERANCE = 2e-2


def check_replay(
    run: Trajectory, replay: Replay, params: list[Tensor], state: dict[str, Any], snapshot: int, strict: bool = False
) -> None:
    """Raise if the replay (row 0 of ``params`` and ``state``) does not reproduce the weights and running
    statistics recorded at ``snapshot``; at the last snapshot of a run with several intervals it only
    warns, unless ``strict`` (a ground truth must be right or absent; unrolled effects describe the replay)."""
    recorded = run.state_dict(snapshot)
    gaps = {
        n: ((t[0] - recorded[n].to(t)).abs().max() / recorded[n].abs().max().clamp(min=1e-12)).item()
        for n, t in replay.named(params, state).items()
    }
    worst = max(gaps, key=gaps.__getitem__)
    gap = gaps[worst]
    mixed = "mixed" in run.manifest.precision
    if gap <= (_MIXED_PRECISION_TOLERANCE if mixed else _REPLAY_TOLERANCE):
        return
    message = (
        f"Replaying {run.name} to step {run.snapshot_steps[snapshot]} lands {gap:.1e} (relative) away from its recorded "
        f"weights (most in {worst!r}), so the replay is not the run. Possible causes: a training loss other than the attribution_train_loss "
        "hook's (or a training_step that adds terms to it); random data augmentation (the replay reads train_data as it is); "
        "dropout inside a fused kernel (scaled_dot_product_attention with dropout_p > 0); "
        "manual optimization or an optimizer step changed by a callback or closure; parameters trained but not "
        f"trainable in the module given to the Attributor; mixed precision (this run: {run.manifest.precision}); "
        "under Adam, a parameter whose gradient is only rounding noise, which Adam turns into full steps: a bias just "
        "before a batch norm, or attention's key bias (in_proj_bias; softmax ignores it) in nn.MultiheadAttention and "
        "nn.TransformerEncoderLayer (use bias=False there, or freeze it)."
    )
    if snapshot == len(run.snapshot_steps) - 1 and snapshot > 1 and not strict:
        rank_zero_warn(message + " Unrolled effects describe the replay.")
    else:
        raise ReplayMismatchError(message)


def replay_checked(
    replay: Replay, weights: Tensor, progress: bool = False, keep_checkpoints: bool = False, strict: bool = False
) -> tuple[list[Tensor], dict[str, Any], list[tuple[list[Tensor], dict[str, Any]]]]:
    """The whole run replayed once per row of ``weights [M, N]`` (no gradients), snapshot interval by
    interval, with row 0, which must be the recorded run (all ones), checked against the recorded
    weights by :func:`check_replay`: after the first interval (raising before the long pass) and at
    the end (where only ``strict`` raises; see :func:`check_replay`).

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
    with torch.no_grad():
        for index, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
            if keep_checkpoints:
                checkpoints.append((params, state))
            params, state = replay.advance(params, state, weights, run.steps[a:b], progress)
            if index == 1:  # refuse before the long pass, not after it
                check_replay(run, replay, params, state, index)
    if len(bounds) > 2:
        check_replay(run, replay, params, state, len(bounds) - 1, strict)
    return params, state, checkpoints
