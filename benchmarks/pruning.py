"""Pruning for reliability: does removing the examples predicted to shrink the seed-to-seed spread of
the validation loss shrink it on seeds the prediction never saw?

    python benchmarks/pruning.py      # a few minutes on 2 CPU cores; cached reruns are faster

Setting: scikit-learn digits, N = 500 training examples and 300 validation examples (a fixed
permutation, as in digits_dtda.py), MLP 64-64-10, SGD (momentum 0.9, lr 0.03, batch 32, 20 epochs,
weight decay 1e-4). The measurement is the mean validation loss, attributed as one query
(``attribute(val, reduce="mean")``) on 8 *estimation* seeds with ``Unrolled(relu_smoothing=0.1)``
(the most faithful estimator on the digits benchmark, variance shift included). For each ``k``, three
choices of ``k`` examples to remove (``--estimation-seeds n`` estimates on n seeds instead of 8):

- (a) mean: the ``k`` most harmful by mean shift (removal lowers the mean validation loss most);
- (b) variance: the ``k`` with the most negative variance shift (removal shrinks the spread of the
  validation loss across seeds most);
- (c) random: three draws of ``k`` examples (their statistics averaged).

Each choice is retrained with ``retrain`` (coupled replay: same initialisation and batch
order, the chosen examples' loss weight 0) on 24 *held-out* seeds, never used to choose, and on the
8 estimation seeds (to tell an estimator's error from a choice that does not carry to new seeds).
Reported: the mean and standard deviation over seeds of the validation loss, the standard deviation
relative to keeping every example with a 90% bootstrap interval over the held-out seeds (paired), and
the first-order prediction on the estimation seeds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from docs_tables import invocation, write_table
from models import QUIET, DigitsMLP
from torch.utils.data import DataLoader, TensorDataset

from lightning_dtda import AttributionResult, Attributor, Retraining, Unrolled, load_runs, retrain, train_seeds

HELD_OUT_SEEDS = range(100, 124)
KS = (10, 25, 50, 100)
RANDOM_DRAWS = 3


def pruning_data() -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x = torch.tensor(x, dtype=torch.float32)[order] / 16.0
    y = torch.tensor(y)[order]
    return TensorDataset(x[:500], y[:500]), TensorDataset(x[500:800], y[500:800])


def choices(result: AttributionResult, num_train: int) -> dict[str, list[torch.Tensor]]:
    """Per choice, its removal sets (one per k; random: RANDOM_DRAWS per k, in k order)."""
    generator = torch.Generator().manual_seed(3)
    mean, variance = result.mean_shift()[0], result.variance_shift()[0]
    return {
        "(a) mean shift": [mean.argsort()[:k] for k in KS],
        "(b) variance shift": [variance.argsort()[:k] for k in KS],
        "(c) random": [torch.randperm(num_train, generator=generator)[:k] for k in KS for _ in range(RANDOM_DRAWS)],
    }


def removal_weights(sets: list[torch.Tensor], num_train: int) -> torch.Tensor:
    weights = torch.ones(len(sets), num_train, dtype=torch.float64)
    for row, removed in enumerate(sets):
        weights[row, removed] = 0.0
    return weights


def cached(path: Path, weights: torch.Tensor, compute) -> Retraining:
    """The retraining saved at ``path`` if it was of these ``weights`` (other estimation seeds choose other
    sets), else ``compute()``, saved there."""
    if path.is_file() and torch.equal((saved := Retraining.load(path)).weights, weights):
        return saved
    value = compute()
    value.save(path)
    return value


def std_ratio_interval(
    base: torch.Tensor, retrained: torch.Tensor, level: float = 0.9, resamples: int = 2000
) -> tuple[float, float]:
    """Bootstrap interval over seeds (paired) of ``std(retrained) / std(base)``; ``base`` and ``retrained`` are ``[S]``."""
    draws = torch.randint(len(base), (resamples, len(base)), generator=torch.Generator().manual_seed(0))
    ratios = (retrained[draws].std(1) / base[draws].std(1)).sort().values
    alpha = (1 - level) / 2
    return ratios[int(alpha * (resamples - 1))].item(), ratios[int((1 - alpha) * (resamples - 1))].item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/output/pruning"))
    parser.add_argument("--estimation-seeds", type=int, default=8, help="seeds 0..n-1 choose what to remove")
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help="rewrite the tables in docs/benchmarks/pruning.md (8 estimation seeds: both; 16: the claim's)",
    )
    args = parser.parse_args()
    if args.write_docs and args.estimation_seeds not in (8, 16):
        parser.error("--write-docs: the docs have tables for 8 and for 16 estimation seeds only")
    estimation_seeds = range(args.estimation_seeds)
    args.out.mkdir(parents=True, exist_ok=True)

    train, val = pruning_data()
    runs_dir = args.out / "runs"
    train_seeds(
        DigitsMLP,
        DataLoader(train, batch_size=32, shuffle=True),
        runs_dir,
        [*estimation_seeds, *HELD_OUT_SEEDS],
        max_epochs=20,
        **QUIET,
    )
    by_seed = {run.seed: run for run in load_runs(runs_dir)}
    estimation = [by_seed[s] for s in estimation_seeds]
    held_out = [by_seed[s] for s in HELD_OUT_SEEDS]

    result_path = args.out / f"validation_loss_effects_{len(estimation)}_seeds.safetensors"
    if result_path.is_file():
        result = AttributionResult.load(result_path)
    else:
        result = Attributor(DigitsMLP, estimation, train, Unrolled(relu_smoothing=0.1), progress=False).attribute(
            val, reduce="mean"
        )
        result.save(result_path)

    chosen = choices(result, len(train))
    names = list(chosen)
    sets = [s for name in names for s in chosen[name]]
    weights = removal_weights(sets, len(train))
    truth = {
        "held-out": cached(
            args.out / f"held_out_{len(held_out)}x{len(sets)}.safetensors",
            weights,
            lambda: retrain(DigitsMLP, held_out, train, val, weights, progress=False),
        ),
        "estimation": cached(
            args.out / f"estimation_{len(estimation)}x{len(sets)}.safetensors",
            weights,
            lambda: retrain(DigitsMLP, estimation, train, val, weights, progress=False),
        ),
    }
    # Mean validation loss per seed: [S] kept everything, [S, M] under each removal set.
    base = {k: t.base.mean(1) for k, t in truth.items()}
    after = {k: t.retrained.mean(1) for k, t in truth.items()}
    predicted = result.measurements[:, 0:1] + result.effects[:, 0] @ (
        1 - weights.T.to(result.effects.dtype)
    )  # first order, [8, M]

    lines = [
        f"validation loss (mean over 300 examples) across {len(held_out)} held-out seeds, keeping everything: "
        f"mean {base['held-out'].mean():.4f}, std {base['held-out'].std():.4f}; across the {len(estimation)} estimation seeds: "
        f"mean {base['estimation'].mean():.4f}, std {base['estimation'].std():.4f}",
        "",
        "| k removed | choice | held-out seeds: mean | std | std / std kept (90% interval) | estimation seeds: std retrained | std predicted |",
        "|---|---|---|---|---|---|---|",
    ]
    record = {}
    column = 0
    for name in names:
        per_k = RANDOM_DRAWS if name == "(c) random" else 1
        for i, k in enumerate(KS):
            columns = list(range(column + i * per_k, column + (i + 1) * per_k))
            held = after["held-out"][:, columns]
            intervals = [std_ratio_interval(base["held-out"], held[:, j]) for j in range(per_k)]
            cells = {
                "mean": held.mean(0).mean().item(),
                "std": held.std(0).mean().item(),
                "ratio": (held.std(0) / base["held-out"].std()).mean().item(),
                "ratio_low": sum(lo for lo, _ in intervals) / per_k,
                "ratio_high": sum(hi for _, hi in intervals) / per_k,
                "estimation_std": after["estimation"][:, columns].std(0).mean().item(),
                "predicted_std": predicted[:, columns].std(0).mean().item(),
            }
            record[f"{name}, k={k}"] = cells
        column += len(KS) * per_k
    for k in KS:
        for name in names:
            c = record[f"{name}, k={k}"]
            lines.append(
                f"| {k} | {name} | {c['mean']:.4f} | {c['std']:.4f} | {c['ratio']:.2f} ({c['ratio_low']:.2f}-{c['ratio_high']:.2f}) | "
                f"{c['estimation_std']:.4f} | {c['predicted_std']:.4f} |"
            )
    # The claim, paired on the held-out seeds: (b)'s spread against (a)'s and against each random draw's.
    main_table = lines[2:]
    claim_start = len(lines) + 1
    lines += [
        "",
        "| k removed | std (b) / std (a), held-out seeds (90% interval) | std (b) / std (c), mean over draws |",
        "|---|---|---|",
    ]
    starts = {
        name: sum(len(KS) * (RANDOM_DRAWS if n == "(c) random" else 1) for n in names[: names.index(name)])
        for name in names
    }
    for i, k in enumerate(KS):
        b = after["held-out"][:, starts["(b) variance shift"] + i]
        a = after["held-out"][:, starts["(a) mean shift"] + i]
        draws = [after["held-out"][:, starts["(c) random"] + i * RANDOM_DRAWS + j] for j in range(RANDOM_DRAWS)]
        vs_a = std_ratio_interval(a, b)
        vs_c = [std_ratio_interval(c, b) for c in draws]
        ratio_c = sum(b.std() / c.std() for c in draws).item() / RANDOM_DRAWS
        lines.append(
            f"| {k} | {b.std() / a.std():.2f} ({vs_a[0]:.2f}-{vs_a[1]:.2f}) | {ratio_c:.2f} "
            f"({sum(lo for lo, _ in vs_c) / RANDOM_DRAWS:.2f}-{sum(hi for _, hi in vs_c) / RANDOM_DRAWS:.2f}) |"
        )
    table = "\n".join(lines)
    print(table)
    (args.out / "table.md").write_text(table + "\n")
    if args.write_docs and args.estimation_seeds == 8:
        write_table("pruning", "main", "\n".join(main_table), command=invocation())
        write_table("pruning", "claim", "\n".join(lines[claim_start:]), command=invocation())
    elif args.write_docs:
        write_table("pruning", "claim16", "\n".join(lines[claim_start:]), command=invocation())


if __name__ == "__main__":
    main()
