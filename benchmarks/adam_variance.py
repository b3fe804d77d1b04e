"""Why every estimator's variance shift sits far below what its seeds allow under Adam: first order or estimator?

    python benchmarks/adam_variance.py                # reuses digits_dtda.py's cached runs and ground truths
    python benchmarks/adam_variance.py --write-docs   # into docs/benchmarks/adam_variance.md

On the SGD and the Adam MLP of ``digits_dtda.py`` (8 seeds, 50 queries, 100 removed examples), per-seed
effects of removing each example: ``Unrolled`` (the exact derivative), the effect of lowering the example's
weight to ``1 - eps`` by the coupled replay (``retrain``) scaled by ``1 / eps``, for growing ``eps``, and
the leave-one-out effect itself (weight 0). The table scores each against the leave-one-out effects, per
seed (Spearman over the removed examples, averaged over queries and seeds) and pooled (the mean and
variance shifts over the 8 seeds against the 32-seed ground truth). How fast the scaled effects approach
the leave-one-out ones as ``eps`` grows says how far the first-order picture carries a whole removal.
"""

from __future__ import annotations

import argparse

import torch
from default_curvature import out_dir
from digits_dtda import prepare_task, score
from docs_tables import invocation, write_table

from lightning_dtda import AttributionResult, Attributor, Unrolled, leave_one_out_weights, retrain

TASKS = {"mlp": "SGD MLP", "adam": "Adam MLP"}
# The runs are float32: a weight change much below 1e-2 moves the query losses by little more than rounding.
EPSILONS = (0.01, 0.1, 0.5)


def per_seed(predicted: torch.Tensor, actual: torch.Tensor) -> float:
    """Spearman over examples of ``[S, Q, N]`` effects, averaged over seeds and queries."""
    return sum(score(predicted[s], actual[s]) for s in range(len(predicted))) / len(predicted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    rows = [
        "| task | effects | per seed vs leave-one-out | pooled mean shift | pooled variance shift |",
        "|---|---|---|---|---|",
    ]
    for model, label in TASKS.items():
        task = prepare_task(model, out_dir(model))
        runs, k = task.runs[: args.seeds], args.seeds
        removed = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(1))[:100]  # as digits_dtda
        loo = task.loo.effects[:k]  # [S, Q, 100], the first k seeds
        unrolled = Attributor(task.module, runs, task.train, Unrolled(), progress=False).attribute(task.queries)
        estimates = {"`Unrolled()` (derivative)": unrolled.effects[:, :, removed]}
        for eps in EPSILONS:  # the example's weight 1 - eps, its effect scaled by 1 / eps
            weights = 1 - eps * leave_one_out_weights(len(task.train), removed).neg().add(1)
            partial = retrain(task.module, runs, task.train, task.queries, weights, progress=False)
            estimates[f"weight 1 - {eps:g} by the coupled replay, / {eps:g}"] = partial.effects / eps
        estimates["leave-one-out on the same seeds (weight 0)"] = loo
        for name, effects in estimates.items():
            full = torch.zeros(k, effects.shape[1], len(task.train), dtype=effects.dtype)
            full[:, :, removed] = effects  # a result over the whole training set, as the ground truth reads it
            result = AttributionResult(full, task.loo.base[:k], task.loo.runs[:k])
            rows.append(
                f"| {label} | {name} | {per_seed(effects, loo):.3f} | "
                f"{score(*task.loo.table(result, 'mean')):.3f} | {score(*task.loo.table(result, 'variance')):.3f} |"
            )
            print(rows[-1], flush=True)
    table = "\n".join(rows)
    print("\n" + table)
    if args.write_docs:
        write_table("adam_variance", "main", table, command=invocation())


if __name__ == "__main__":
    main()
