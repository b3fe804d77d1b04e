"""Ground truth by coupled retraining, and the metrics that compare estimates with it.

Retraining replays each recorded Lightning run (same seed: same initialisation, same batch order,
same learning rates) with per-example loss weights, many weightings at once (see ``replay``):

- leave-one-out: example ``k``'s weight set to 0, one weighting per chosen example;
- random subsets (the linear datamodeling score): each weighting keeps a random half of the data.

Every comparison is a table ``(predicted [Q, M], actual [Q, M])`` over ``M`` weightings of a
distributional statistic, scored by ``QuerySpearman``: the Spearman correlation across the
``M`` columns, averaged over queries. For leave-one-out tables that is the Spearman of predicted
versus true shifts; for subset tables it is the LDS (``"mean"``) or a distributional LDS
(``"variance"``, ``"wasserstein"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from lightning_dtda.errors import ReplayMismatchError, UnsupportedTrainingError
from lightning_dtda.hooks import Hooks
from lightning_dtda.model.gradients import quiet_batching_rules
from lightning_dtda.model.instantiate import instantiate
from lightning_dtda.replay.check import replay_checked
from lightning_dtda.replay.engine import Replay, measure
from lightning_dtda.results.retraining import Retraining
from lightning_dtda.runs.fingerprint import SeededDataset
from lightning_dtda.runs.trajectory import Trajectory, metric_driven, runs_to_attribute


def retrain(
    module: type | torch.nn.Module,
    runs: str | Path | Sequence[Trajectory],
    train_data: Dataset,
    query_data: Dataset,
    weights: Tensor,
    models_per_pass: int = 128,
    device: str | torch.device = "cpu",
    progress: bool = True,
    snapshot: Literal["final", "best"] | int = "final",
    as_recorded: bool = False,
) -> Retraining:
    """Replay every run under every weighting and measure the queries.

    Every weighting is replayed twice: as recorded, and from step-0 weights one rounding unit away. How far
    each effect moves between the two is ``Retraining.rounding``; where it moves by over 1% of its query's
    largest effect (and by over 1e-5 of the query's measurement), rounding decides it (the run passes near
    ties, at max-pool or ReLU kinks: no replay can be checked for a removal, which has no recording), and a
    warning counts such effects. This doubles the cost.

    Args:
        module: The LightningModule class or an instance (as for the Attributor).
        runs: A folder of runs or loaded trajectories; each is one seed.
        train_data: The training set in recorded index order.
        query_data: The queries to measure.
        weights: ``[M, N]`` per-example loss weights.
        models_per_pass: How many weightings one vectorised replay trains at once, the recorded run among
            them (each batch is checked by it, and its effects are taken against it): ``models_per_pass - 1``
            of ``weights`` per batch. Where a batched replay of a seed does not land within 1e-4 of the
            run's weights (vectorised kernels round unlike training's, and at kinks, such as max-pool ties,
            that can make another run), that seed's weightings are replayed one at a time with training's
            kernels instead, with a warning.
        device: Where to train.
        progress: Show progress bars.
        snapshot: Where the queries are measured: ``"final"`` (the end of training), ``"best"``
            (``ModelCheckpoint``'s best checkpoint) or a snapshot's step; the ground truth for an ``Attributor``
            given the same ``snapshot`` (each run is replayed up to that step, held fixed for every weighting).
        as_recorded: Accept runs whose course followed a validation metric (``EarlyStopping``'s last epoch,
            ``ReduceLROnPlateau``'s learning rates), which a removal may move and no replay can follow: the
            ground truth is then that of runs of the recorded length and learning rates (what the estimators
            estimate). Refused by default.

    Raises:
        ReplayMismatchError: If a run's replay does not land on its recorded weights (the same check as
            ``Unrolled``'s, after the first snapshot interval, before the long pass, and at the end, where
            ``Unrolled`` only warns: a ground truth must be right or absent).
        UnsupportedTrainingError: For a run the replay cannot reproduce (see ``Unrolled``), for
            mixed-precision runs, runs trained with weight averaging, and runs trained with ``EarlyStopping`` or
            ``ReduceLROnPlateau`` unless ``as_recorded``, before any work.
        DatasetMismatchError: If ``train_data`` is not what the runs were recorded on.
        ValueError: For a ``snapshot`` a run does not have (the message lists its snapshots).
    """
    runs = runs_to_attribute(runs, train_data, snapshot)
    mixed = [f"{run.name} ({run.manifest.precision})" for run in runs if "mixed" in run.manifest.precision]
    if mixed:
        # The replay runs in full precision and lands up to 2e-2 (relative) from a mixed-precision run's
        # weights, growing with the run (2.5e-2 measured on a bf16 BN/dropout CNN in six steps): a ground
        # truth that far from the run would misstate every effect it is compared with.
        raise UnsupportedTrainingError(
            f"retrain cannot reproduce mixed-precision runs: {', '.join(mixed)}. Its replay runs in full precision, "
            "whose rounding differs from the run's; a ground truth must be the run itself. Record the runs with "
            "precision='32-true' (or '64-true') to score estimators against retraining."
        )
    driven = metric_driven(runs)
    if driven is not None and not as_recorded:
        # New-user trials: Lightning's own retraining stopped 2 of 15 removals two epochs later than the recorded
        # run (EarlyStopping, effects moved by up to 44%); ReduceLROnPlateau lowered the rate three epochs earlier
        # for 20 of 40 removals (effects off by more than their size).
        raise UnsupportedTrainingError(
            f"retrain cannot follow a validation metric: {driven}. Without an example a run may stop at another "
            "epoch, or lower its learning rate at another step, but the replay holds each run's recorded steps and "
            "learning rates. Pass as_recorded=True for the ground truth of runs as recorded (what the estimators "
            "estimate), or record runs whose length and schedule do not follow a metric."
        )
    # Read as the Attributor reads them: a fixed view of augmented examples, inputs cast as the run's were.
    train_data = SeededDataset(train_data, runs[0].manifest.input_dtype)
    query_data = SeededDataset(query_data, runs[0].manifest.input_dtype)
    if weights.ndim != 2 or weights.shape[1] != runs[0].dataset_length or len(weights) == 0:
        raise ValueError(f"weights must be [M, {runs[0].dataset_length}] with M >= 1, got {tuple(weights.shape)}.")
    if not isinstance(models_per_pass, int) or models_per_pass < 1:
        raise ValueError(f"models_per_pass must be a positive integer, got {models_per_pass!r}.")
    rows = torch.cat([torch.ones(1, weights.shape[1], dtype=weights.dtype), weights])  # row 0: the base run
    base, retrained, rounding = [], [], []
    with quiet_batching_rules():  # vmap's fallback for attention is exact; torch's request is not the user's
        for run in tqdm(runs, desc="retraining seeds", disable=not progress):
            model = instantiate(module, run, 0, device)
            Hooks(model).check_defaults(train_data, query_data, device)
            replayer = Replay(model, run, train_data)  # one per run: it checks the run and reads snapshot 0
            batched: ReplayMismatchError | None = None
            if models_per_pass > 1:
                try:
                    # At kinks, vectorised kernels' other rounding can make another run, not rounding of this one
                    # (see the distributions guide): no allowance for amplified rounding here.
                    measured = _measured_rows(
                        replayer, model, rows, query_data, models_per_pass, progress, excuse_rounding=False
                    )
                except ReplayMismatchError as err:
                    batched = err
            if models_per_pass == 1 or batched is not None:
                # Raises in turn where the run itself cannot be replayed.
                measured = _measured_rows(replayer, model, rows, query_data, 1, progress)
            if batched is not None:
                rank_zero_warn(
                    f"retrain: {run.name}'s weightings replayed together (models_per_pass={models_per_pass}) land "
                    f"{batched.gap:.1e} (relative) from the run's weights at step {batched.step}, beyond its tolerance; "
                    f"replayed one at a time, with training's kernels, they land within {replayer.gap:.1e}, and the "
                    "ground truth is that replay's (slower; models_per_pass=1 starts there)."
                )
            # No check reaches a removal's replay (only the recorded run has snapshots): its twin one rounding unit
            # away shows where rounding decides it.
            twin = _measured_rows(
                replayer, model, rows, query_data, models_per_pass if batched is None else 1, progress, perturbed=True
            )
            base.append(measured[0])
            retrained.append(measured[1:].T)
            rounding.append(((twin[1:] - twin[:1]) - (measured[1:] - measured[:1])).abs().T)
    truth = Retraining(
        weights.cpu(), torch.stack(base), torch.stack(retrained), [run.name for run in runs], torch.stack(rounding)
    )
    _warn_rounding(truth)
    return truth


def _warn_rounding(truth: Retraining) -> None:
    """Say how many effects rounding decides (``Retraining.decided``)."""
    decided = truth.decided
    if bool(decided.any()):
        runs = [name for name, d in zip(truth.runs, decided) if bool(d.any())]
        rank_zero_warn(
            f"retrain: {int(decided.sum())} of {decided.numel()} effects ({', '.join(runs)}) move by over 1% of their "
            f"query's largest effect when the replays start one rounding unit away (up to "
            f"{truth.rounding[decided].max().item():.1e}): rounding decides them (the run passes near ties, at max-pool "
            "or ReLU kinks), so no value of this precision is their ground truth (and others may go unseen). "
            "Retraining.decided marks them; record the runs with precision='64-true' to resolve them."
        )


def _measured_rows(
    replayer: Replay,
    model: torch.nn.Module,
    rows: Tensor,
    query_data: Dataset,
    models_per_pass: int,
    progress: bool,
    excuse_rounding: bool = True,
    perturbed: bool = False,
) -> Tensor:
    """``[M + 1, Q]`` query measurements of the run replayed under each of ``rows`` (row 0: the recorded run),
    ``models_per_pass`` rows at a time. One at a time, the recorded run is checked against its snapshots, as
    unrolling's replay is, and the other rows go through the same kernels; in batches, every batch holds the
    recorded run too and is checked so, since a batch of another size can take other kernels."""

    def replayed(batch: Tensor) -> Tensor:
        if perturbed:  # the twin replays: nothing to check them against
            return measure(model, replayer.final(batch, progress, perturbed=True), query_data)
        params, state, _ = replay_checked(replayer, batch, progress, strict=True, excuse_rounding=excuse_rounding)
        return measure(model, replayer.named(params, state), query_data)

    if models_per_pass == 1:
        chunks = [replayed(rows[:1])]
        chunks += [
            measure(model, replayer.final(rows[i : i + 1], progress, perturbed), query_data)
            for i in range(1, len(rows))
        ]
        return torch.cat(chunks).cpu()
    chunks: list[Tensor] = []
    for i in range(1, max(len(rows), 2), models_per_pass - 1):
        measured = replayed(torch.cat([rows[:1], rows[i : i + models_per_pass - 1]]))
        # Each batch's rows against its own recorded run (a batch of another size may round otherwise), then
        # put on the first batch's.
        chunks.append(measured if i == 1 else measured[1:] - measured[:1] + chunks[0][:1])
    return torch.cat(chunks).cpu()


def leave_one_out_weights(num_train: int, examples: Sequence[int] | Tensor) -> Tensor:
    """``[K, N]`` weightings that each remove one of ``examples``.

    Raises:
        ValueError: Unless ``examples`` are integers in ``[0, num_train)``, at least one.
    """
    examples = torch.as_tensor(examples)
    if examples.ndim != 1 or not len(examples) or examples.is_floating_point() or examples.dtype == torch.bool:
        raise ValueError(f"examples must be a non-empty list of training-set indices, got {examples.tolist()!r}.")
    if bool((examples < 0).any() or (examples >= num_train).any()):
        raise ValueError(f"examples must be indices in [0, {num_train}), got {examples.tolist()!r}.")
    weights = torch.ones(len(examples), num_train, dtype=torch.float64)
    weights[torch.arange(len(examples)), examples] = 0.0
    return weights


def random_subset_weights(num_train: int, num_subsets: int, fraction: float = 0.5, seed: int = 0) -> Tensor:
    """``[M, N]`` weightings that each keep a random ``fraction`` of the training set (weights 0 or 1).

    Raises:
        ValueError: Unless ``0 < fraction < 1`` and ``num_subsets`` is positive.
    """
    if not 0 < fraction < 1 or num_subsets < 1:
        raise ValueError(
            f"random_subset_weights needs 0 < fraction < 1 and num_subsets >= 1, got fraction={fraction!r}, "
            f"num_subsets={num_subsets!r}."
        )
    generator = torch.Generator().manual_seed(seed)
    keep = round(fraction * num_train)
    weights = torch.zeros(num_subsets, num_train, dtype=torch.float64)
    for m in range(num_subsets):
        weights[m, torch.randperm(num_train, generator=generator)[:keep]] = 1.0
    return weights
