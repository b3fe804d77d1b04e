"""Data cleaning: how many mislabelled training digits each ranking puts first.

    pip install -e ".[bench]"          # kronfluence, for its row (the others run without it)
    python benchmarks/mislabel.py      # about 2 min on 2 CPU cores; cached reruns are faster
    python benchmarks/mislabel.py --epochs 100 --hidden 64 --weight-decay 0 --lr 0.1   # flips memorised, ~3 min

Setting: scikit-learn digits, N = 1,000 training examples (the first 1,000 of a fixed permutation),
10% of their labels flipped to another class drawn at random (flip seed 0, the same for every run);
the MLP of examples/digits.py, 64-32-10 (SGD, momentum 0.9, lr 0.03, batch 32, weight decay 1e-4,
20 epochs) unless the options say otherwise, 8 seeds recorded with Lightning. Each ranking orders the
training set, most suspicious first:

- training loss at the final weights (the usual baseline), of one seed, averaged over the 8, or the
  lower end of its 90% bootstrap interval over the 8;
- self-influence (``Attributor.self_influence``: each example's removal effect on its own loss), of
  one seed or pooled over the 8 (the mean, or the lower end of its 90% bootstrap interval);
- kronfluence's EK-FAC self-influence scores (its default damping heuristic, 0.1 x the mean
  eigenvalue), of one seed or averaged over the 8 seeds' scores.

Columns: the fraction of the 100 flipped examples found when inspecting the top 5%, 10% and 20% of the
ranking, and the area under that curve over all inspection budgets (1 = every flipped example first,
random order ~0.5).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from docs_tables import invocation, write_table
from models import QUIET, DigitsMLP, final_model
from torch.utils.data import DataLoader, TensorDataset

from lightning_dtda import AttributionResult, Attributor, Influence, load_runs, train_seeds

FLIP_FRACTION = 0.1
BUDGETS = (0.05, 0.10, 0.20)
# (seeds, epochs, hidden, weight decay, lr) -> the table of docs/benchmarks/mislabel.md that shows it
DOCS_TABLES = {(8, 20, 32, 1e-4, 0.03): "main", (8, 100, 64, 0.0, 0.1): "memorised"}


def mislabelled_digits(n_train: int = 1000, seed: int = 0) -> tuple[TensorDataset, torch.Tensor]:
    """The training set with ``FLIP_FRACTION`` of its labels replaced by another class, and the flipped indices."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x = torch.tensor(x, dtype=torch.float32)[order][:n_train] / 16.0
    y = torch.tensor(y)[order][:n_train]
    generator = torch.Generator().manual_seed(seed)
    flipped = torch.randperm(n_train, generator=generator)[: round(FLIP_FRACTION * n_train)].sort().values
    noisy = y.clone()
    noisy[flipped] = (
        y[flipped] + torch.randint(1, 10, (len(flipped),), generator=generator)
    ) % 10  # never the true class
    return TensorDataset(x, noisy), flipped


def found(scores: torch.Tensor, flipped: torch.Tensor) -> tuple[list[float], float]:
    """Fraction of ``flipped`` among the top of ``scores`` (largest first) at each of ``BUDGETS``, and the
    area under that curve over every budget k/N, k = 1..N."""
    n = len(scores)
    is_flipped = torch.zeros(n, dtype=torch.bool)
    is_flipped[flipped] = True
    curve = is_flipped[scores.argsort(descending=True)].double().cumsum(0) / len(flipped)
    return [curve[round(b * n) - 1].item() for b in BUDGETS], curve.mean().item()


def training_losses(runs, train: TensorDataset) -> torch.Tensor:
    """``[seeds, N]`` each example's training loss at each run's final weights."""
    x, y = train.tensors
    with torch.no_grad():
        return torch.stack([F.cross_entropy(final_model(DigitsMLP, run)(x), y, reduction="none") for run in runs])


def kronfluence_self_scores(runs, train: TensorDataset, out: Path) -> torch.Tensor:
    """``[seeds, N]`` kronfluence's EK-FAC self-influence scores, one run at a time."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(logits.softmax(-1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    torch.manual_seed(0)  # kronfluence's factors draw labels from the model (the true Fisher): make its rows repeatable
    scores = []
    for run in runs:
        model = prepare_model(final_model(DigitsMLP, run), Classification())
        analyzer = Analyzer(
            f"mislabel_{run.name}", model, Classification(), cpu=True, disable_tqdm=True, output_dir=str(out)
        )
        analyzer.fit_all_factors(
            "ekfac",
            train,
            per_device_batch_size=128,
            factor_args=FactorArguments(strategy="ekfac"),
            overwrite_output_dir=True,
        )
        analyzer.compute_self_scores(
            "self",
            "ekfac",
            train,
            per_device_train_batch_size=128,
            score_args=ScoreArguments(damping_factor=None),
            overwrite_output_dir=True,
        )
        scores.append(analyzer.load_self_scores("self")["all_modules"].flatten())
    return torch.stack(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/output/mislabel"))
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=32, help="hidden units (32: 2,410 parameters)")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument(
        "--curvatures", nargs="+", default=["ekfac", "ggn"], choices=["ekfac", "kfac", "ggn", "identity"]
    )
    parser.add_argument(
        "--write-docs", action="store_true", help="rewrite the table of this setting in docs/benchmarks/mislabel.md"
    )
    args = parser.parse_args()
    docs_table = DOCS_TABLES.get((args.seeds, args.epochs, args.hidden, args.weight_decay, args.lr))
    if args.write_docs and (docs_table is None or args.curvatures != ["ekfac", "ggn"]):
        parser.error(
            "--write-docs: the docs have tables for the default setting and for "
            "--epochs 100 --hidden 64 --weight-decay 0 --lr 0.1 only (8 seeds, curvatures ekfac and ggn)"
        )
    args.out.mkdir(parents=True, exist_ok=True)

    train, flipped = mislabelled_digits()
    setting = f"{args.epochs}_epochs_{args.hidden}_hidden_wd_{args.weight_decay:g}_lr_{args.lr:g}"
    runs_dir = args.out / f"runs_{setting}"
    train_seeds(
        lambda: DigitsMLP(hidden=args.hidden, weight_decay=args.weight_decay, lr=args.lr),
        DataLoader(train, batch_size=32, shuffle=True),
        runs_dir,
        range(args.seeds),
        max_epochs=args.epochs,
        **QUIET,
    )
    runs = load_runs(runs_dir)[: args.seeds]
    cache = args.out / "cache"

    rankings: dict[str, torch.Tensor] = {}
    losses = training_losses(runs, train)
    rankings["training loss, 1 seed"] = losses[0]
    rankings[f"training loss, mean of {args.seeds} seeds"] = losses.mean(0)
    # The same pooling as self-influence's interval row, for a fair baseline: the losses as one query's "effects".
    pooled = AttributionResult(losses.unsqueeze(1), torch.zeros(len(losses), 1), [run.name for run in runs])
    low, _ = pooled.interval("mean")
    rankings[f"training loss, {args.seeds} seeds (90% interval, low end)"] = low[0]
    for curvature in args.curvatures:
        # The exact GGN built densely (the Krylov solver would run CG per chunk: refused for self-influence).
        estimator = Influence(curvature=curvature, solver="dense" if curvature == "ggn" else "auto")
        result = Attributor(DigitsMLP, runs, train, estimator, progress=False, cache_dir=cache).self_influence()
        rankings[f"self-influence ({curvature}), 1 seed"] = result.effects[0]
        rankings[f"self-influence ({curvature}), {args.seeds} seeds pooled (mean)"] = result.mean_shift()
        rankings[f"self-influence ({curvature}), {args.seeds} seeds pooled (90% interval, low end)"] = result.interval(
            "mean"
        )[0]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            kron = kronfluence_self_scores(runs, train, Path(tmp))
        rankings["kronfluence self-influence (ekfac), 1 seed"] = kron[0]
        rankings[f"kronfluence self-influence (ekfac), mean of {args.seeds} seeds"] = kron.mean(0)
    except ImportError:
        print('kronfluence is not installed (pip install -e ".[bench]"): its rows are left out.')

    accuracy = (
        torch.stack([final_model(DigitsMLP, run)(train.tensors[0]).argmax(1) for run in runs]) == train.tensors[1]
    ).float()
    clean = torch.ones(len(train), dtype=torch.bool)
    clean[flipped] = False
    lines = [
        f"{len(flipped)} of {len(train)} labels flipped; MLP 64-{args.hidden}-10, lr {args.lr:g}, weight decay {args.weight_decay:g}, {args.epochs} epochs; the models fit {accuracy[:, flipped].mean():.0%} of the "
        f"flipped labels and {accuracy[:, clean].mean():.0%} of the clean ones (mean over seeds)",
        "",
        "| ranking | found in top 5% (at most 0.50) | top 10% | top 20% | area under the curve |",
        "|---|---|---|---|---|",
    ]
    for name, scores in rankings.items():
        at, area = found(scores, flipped)
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in at) + f" | {area:.3f} |")
    lines.append("| random order (expected) | " + " | ".join(f"{b:.2f}" for b in BUDGETS) + " | 0.500 |")
    table = "\n".join(lines)
    print(table)
    (args.out / f"table_{setting}.md").write_text(table + "\n")
    if args.write_docs and not any(name.startswith("kronfluence") for name in rankings):
        print(
            "--write-docs: the docs' table has kronfluence's rows; install it (pip install -e \".[bench]\") and rerun"
        )
    elif args.write_docs:
        write_table("mislabel", docs_table, "\n".join(lines[2:]), command=invocation())


if __name__ == "__main__":
    main()
