"""The public d-TDA benchmark: how well each estimator predicts distributional removal effects.

    python benchmarks/digits_dtda.py              # first run ~15 min on 2 CPU cores; cached reruns ~5 min
    python benchmarks/digits_dtda.py --model cnn  # the BatchNorm/dropout CNN row

Setting: scikit-learn digits, N = 500 training examples (the first 500 of a fixed permutation),
50 queries from the rest; MLP 64-64-10 (ReLU), SGD with momentum 0.9, lr 0.03, batch 32,
20 epochs, weight decay 1e-4; measurement = query cross-entropy.

Ground truth: 32 seeds recorded with Lightning; for 100 removed examples each seed is retrained
*coupled* (same initialisation and batch order, the example's loss weight 0) by vectorised replay,
giving true mean, variance and W2 shifts; 100 random half-subsets x 4 seeds give the LDS.
Estimators use the first 8 seeds. The ceiling row is the ground truth's split-half reliability
(16 seeds against the other 16). Everything expensive is cached under --out.

``--model cnn``: the same data and protocol with ``models.DigitsCNN`` (Conv-BatchNorm-ReLU-max-pool,
Dropout 0.2, Linear; SGD with momentum, a cosine schedule, ``gradient_clip_val=1``), the layers
that compute differently in training; ground truth by the same coupled replay (same dropout masks).

``--model adam``: the MLP trained with Adam (lr 1e-3, weight decay 1e-4) instead of SGD.
``--model regression``: scikit-learn's diabetes progression (standardised; 392 training examples, 50
queries), a 10-32-1 tanh MLP with a ``[B]`` output, mean squared error, SGD with momentum 0.9, lr 0.01,
40 epochs; measurement = query squared error.

``--damping-grid``: also scores ggn, kfac and ekfac at fixed dampings ``rule * 10^(k/2)``, k = -4 ... 4,
where ``rule`` is the exact GGN's "auto" damping of the first seed, next to "auto".
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from docs_tables import invocation, scientific, write_table
from models import QUIET, AdamMLP, DigitsCNN, DigitsMLP, benchmark_data
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dtda import (
    AttributionResult,
    Attributor,
    Influence,
    QuerySpearman,
    Retraining,
    Segmented,
    Trajectory,
    Unrolled,
    figures,
    leave_one_out_weights,
    load_runs,
    random_subset_weights,
    retrain,
    train_seeds,
)

STATISTICS = ("mean", "variance", "wasserstein")
METHODS = {
    "identity": Influence(curvature="identity"),  # first: the cheapest pays the process's warm-up
    "kfac": Influence(curvature="kfac"),
    "ekfac": Influence(curvature="ekfac"),
    "ggn": Influence(curvature="ggn"),
    "default": Influence(),
    "ggn (dense)": Influence(curvature="ggn", solver="dense"),
    "segmented (ggn, 4 segments)": Segmented(segments=4, curvature="ggn"),
    "segmented (ekfac, 4 segments)": Segmented(segments=4, curvature="ekfac"),
    "unrolled": Unrolled(),
    "unrolled (ReLU smoothing 0.1)": Unrolled(relu_smoothing=0.1),
}


class DiabetesMLP(pl.LightningModule):
    """A 10-32-1 tanh MLP regressing diabetes progression; ``[B]`` outputs, mean squared error, SGD with momentum."""

    def __init__(self, hidden: int = 32, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 1e-4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(10, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        h = self.hparams
        return torch.optim.SGD(self.parameters(), lr=h.lr, momentum=h.momentum, weight_decay=h.weight_decay)


def diabetes_data() -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = torch.tensor(x, dtype=torch.float32)[order], torch.tensor(y, dtype=torch.float32)[order]
    x, y = (x - x.mean(0)) / x.std(0), (y - y.mean()) / y.std()
    return TensorDataset(x[:392], y[:392]), TensorDataset(x[392:], y[392:])


def cached(path: Path, compute):
    if path.is_file():
        return Retraining.load(path)
    value = compute()
    value.save(path)
    return value


@dataclass
class Task:
    """One benchmark task with its ground truth (see ``prepare_task``)."""

    module: type[pl.LightningModule]
    runs: list[Trajectory]
    train: TensorDataset
    queries: TensorDataset
    loo: Retraining
    lds: Retraining
    seconds_per_seed: float


def prepare_task(
    model: str,
    out: Path,
    truth_seeds: int = 32,
    epochs: int | None = None,
    examples: int = 100,
    subsets: int = 100,
    subset_seeds: int = 4,
) -> Task:
    """Record ``truth_seeds`` runs of task ``model`` ("mlp", "cnn", "adam", "regression") under ``out`` and
    compute the leave-one-out and subset ground truths, each cached there (a rerun reads them)."""
    epochs = epochs or (40 if model == "regression" else 20)
    out.mkdir(parents=True, exist_ok=True)
    train, queries = diabetes_data() if model == "regression" else benchmark_data()
    runs_dir = out / "runs"
    start = time.perf_counter()
    already = len(list(runs_dir.glob("seed_*"))) if runs_dir.exists() else 0
    steps = epochs * -(-len(train) // 32)
    Module, make_module, trainer_kwargs = {
        "mlp": (DigitsMLP, DigitsMLP, {}),
        "cnn": (DigitsCNN, lambda: DigitsCNN(total_steps=steps), {"gradient_clip_val": 1.0}),
        "adam": (AdamMLP, AdamMLP, {}),
        "regression": (DiabetesMLP, DiabetesMLP, {}),
    }[model]
    settings = dict(max_epochs=epochs, **QUIET, **trainer_kwargs)
    loader = DataLoader(train, batch_size=32, shuffle=True)
    train_seeds(make_module, loader, runs_dir, range(truth_seeds), **settings)
    if truth_seeds > already:
        seconds_per_seed = (time.perf_counter() - start) / (truth_seeds - already)
    else:  # all cached: time seeds now, so the cost column divides by a training timed in this process
        times = []
        with tempfile.TemporaryDirectory() as folder:
            for seed in range(3):  # the median of three: one timing moved the column by 50% between reruns
                start = time.perf_counter()
                train_seeds(make_module, loader, folder, [seed], **settings)
                times.append(time.perf_counter() - start)
        seconds_per_seed = sorted(times)[1]
    runs = load_runs(runs_dir)[:truth_seeds]

    removed = torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[:examples]
    loo = cached(
        out / f"loo_{truth_seeds}x{examples}.safetensors",
        lambda: retrain(Module, runs, train, queries, leave_one_out_weights(len(train), removed)),
    )
    lds = cached(
        out / f"lds_{subset_seeds}x{subsets}.safetensors",
        lambda: retrain(
            Module, runs[:subset_seeds], train, queries, random_subset_weights(len(train), subsets, 0.5, seed=2)
        ),
    )
    return Task(Module, runs, train, queries, loo, lds, seconds_per_seed)


def score(predicted: torch.Tensor, actual: torch.Tensor) -> float:
    metric = QuerySpearman()
    metric.update(predicted, actual)
    return metric.compute().item()


def damping_grid(module, runs, train, queries, loo: Retraining) -> dict[str, dict[str, float]]:
    """Mean- and variance-shift Spearman of ggn, kfac and ekfac at fixed dampings around the GGN's rule, and at "auto",
    by ``"{curvature} auto"`` and ``"{curvature} {damping:.2e}"`` (the dampings in increasing order, the rule fifth)."""
    rule = Influence(curvature="ggn").damping_for(runs[0])
    grid = [rule * 10 ** (k / 2) for k in range(-4, 5)]
    lines = [
        f"\nFixed dampings around the exact GGN's rule ({rule:.2e}, first seed):",
        "",
        "| curvature | damping | Spearman mean shift | Spearman variance shift | |",
        "|---|---|---|---|---|",
    ]
    scores = {}
    for curvature in ("ggn", "kfac", "ekfac"):
        for damping in ["auto", *grid]:
            result = Attributor(
                module, runs, train, Influence(curvature=curvature, damping=damping), progress=False
            ).attribute(queries)
            mean, variance = (score(*loo.table(result, statistic)) for statistic in ("mean", "variance"))
            label = damping if damping == "auto" else f"{damping:.2e}"
            scores[f"{curvature} {label}"] = {"mean": mean, "variance": variance}
            fitted = (
                [run["damping"] for run in result.settings["per_run"]]
                if damping == "auto" and curvature != "ggn"
                else []
            )
            tag = (
                "the GGN's rule"
                if damping == rule
                else ("fitted: " + ", ".join(f"{d:.1e}" for d in sorted(set(fitted))))
                if fitted
                else ""
            )
            lines.append(f"| {curvature} | {label} | {mean:.3f} | {variance:.3f} | {tag} |")
    print("\n".join(lines))
    return scores


# The tables of docs/benchmarks/digits_dtda.md, by --model, and their first column's header.
DOCS_TABLES = {"mlp": "main", "cnn": "cnn", "adam": "adam", "regression": "regression"}
FIRST_COLUMN = {"mlp": "method", "cnn": "method", "adam": "Adam", "regression": "regression"}
# The README's headline table: its rows, by this script's method names, as the README writes the estimators.
HEADLINE = {
    "identity": '`Influence("identity")`',
    "kfac": '`Influence("kfac")`',
    "ekfac": '`Influence("ekfac")`',
    "ggn": '`Influence()` (default), `Influence("ggn")`',
    "segmented (ekfac, 4 segments)": '`Segmented(curvature="ekfac")`',
    "segmented (ggn, 4 segments)": '`Segmented(curvature="ggn")`',
    "unrolled": "`Unrolled()`",
    "unrolled (ReLU smoothing 0.1)": "`Unrolled(relu_smoothing=0.1)`",
}
# The damping table's rows: --model and its label (the CNN has no row).
DAMPING_TASKS = {"mlp": "SGD MLP", "adam": "Adam MLP", "regression": "regression"}


def write_headline(record: dict[str, dict], seeds: int) -> None:
    """The README's "which estimator" table, from the SGD MLP's scores (skipped unless every row was measured)."""
    missing = [name for name in HEADLINE if name not in record]
    if missing:
        print(f"README.md's headline table not written: {', '.join(missing)} not measured")
        return
    lines = [
        "| estimator | Spearman mean shift | Spearman variance shift | LDS | cost per seed, x training one seed |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, label in HEADLINE.items():
        c = record[name]
        lines.append(f"| {label} | {c['mean']:.3f} | {c['variance']:.3f} | {c['lds']:.3f} | {c['cost']:.2f} |")
    exact = record[f"exact retraining, first {seeds} seeds"]
    lines.append(
        f"| exact retraining on the same {seeds} seeds | {exact['mean']:.3f} | {exact['variance']:.3f} | — | — |"
    )
    write_table("digits_dtda", "headline", "\n".join(lines), command=invocation())


def write_damping_grid(out: Path, model: str, grid: dict[str, dict[str, float]]) -> None:
    """The damping table, one row per task of ``DAMPING_TASKS``: this run's grid for ``model``, the others' from
    the ``table.json`` of their runs next to ``out`` (skipped, saying which, until all three have a grid)."""
    grids = {}
    for task in DAMPING_TASKS:
        if task == model:
            grids[task] = grid
            continue
        path = out.parent / ("digits_dtda" + ("" if task == "mlp" else f"_{task}")) / "table.json"
        if path.is_file() and "damping grid" in (saved := json.loads(path.read_text())):
            grids[task] = saved["damping grid"]
    missing = [task for task in DAMPING_TASKS if task not in grids]
    if missing:
        print(f"the damping table not written: no --damping-grid run of --model {', '.join(missing)} next to {out}")
        return

    def pair(scores: dict[str, float]) -> str:
        return f"{scores['mean']:.3f} / {scores['variance']:.3f}"

    lines = [
        '| task | ggn `"auto"` | ggn, best fixed | kfac `"auto"` (fitted) | kfac at `λ_G` | kfac, best fixed | ekfac `"auto"` | '
        "ekfac at `λ_G` | ekfac, best fixed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for task, label in DAMPING_TASKS.items():
        scores = grids[task]
        fixed = [key.split(" ", 1)[1] for key in scores if key.startswith("ggn ") and key != "ggn auto"]
        rule = fixed[len(fixed) // 2]  # the grid is rule * 10^(k/2), k = -4 ... 4
        cells = []
        for curvature in ("ggn", "kfac", "ekfac"):
            grid_scores = [scores[f"{curvature} {d}"] for d in fixed]
            best = {s: max(g[s] for g in grid_scores) for s in ("mean", "variance")}
            cells += [pair(scores[f"{curvature} auto"])] + (
                [] if curvature == "ggn" else [pair(scores[f"{curvature} {rule}"])]
            )
            cells.append(pair(best))
        lines.append(f"| {label} (`λ_G` {scientific(float(rule), 2)}) | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Rows from the `--damping-grid` runs of `--model mlp`, `--model adam` and `--model regression` (each one's `table.json`).",
    ]
    write_table("digits_dtda", "damping_grid", "\n".join(lines), command=invocation())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("mlp", "cnn", "adam", "regression"), default="mlp")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/output/digits_dtda[_MODEL]")
    parser.add_argument("--truth-seeds", type=int, default=32)
    parser.add_argument("--estimator-seeds", type=int, default=8)
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--subset-seeds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=None, help="default: 40 for regression, else 20")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--damping-grid", action="store_true")
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help=(
            "rewrite this model's table in docs/benchmarks/digits_dtda.md (--model mlp: also the headline table in README.md; "
            "--damping-grid: also the damping table, once the mlp, adam and regression runs all have their grid)"
        ),
    )
    args = parser.parse_args()
    args.out = args.out or Path("benchmarks/output/digits_dtda" + ("" if args.model == "mlp" else f"_{args.model}"))
    torch.set_num_threads(max(1, torch.get_num_threads()))

    task = prepare_task(
        args.model, args.out, args.truth_seeds, args.epochs, args.examples, args.subsets, args.subset_seeds
    )
    Module, runs, train, queries, loo, lds = task.module, task.runs, task.train, task.queries, task.loo, task.lds
    seconds_per_seed = task.seconds_per_seed

    rows, refused = [], []
    for method in args.methods:
        start = time.perf_counter()
        attributor = Attributor(Module, runs[: args.estimator_seeds], train, METHODS[method], progress=False)
        try:
            result = attributor.attribute(queries)
        except ValueError as err:  # e.g. Segmented on an Adam run
            print(f"{method}: refused: {err}".splitlines()[0])
            refused.append(method)
            continue
        seconds = time.perf_counter() - start
        rows.append((method, result, seconds))
        if method == "ekfac":
            single = AttributionResult(result.effects[:1], result.measurements[:1], result.runs[:1], result.settings)
            rows.append(("ekfac (1 seed)", single, seconds / args.estimator_seeds))

    lines = [
        f"| {FIRST_COLUMN[args.model]} | Spearman mean shift | Spearman variance shift | Spearman W2 | LDS | seconds (all seeds) | "
        "per seed, x training one seed |",
        "|---|---|---|---|---|---|---|",
    ]
    record = {}
    for name, result, seconds in rows:
        cells = {}
        for statistic in STATISTICS:
            if result.num_seeds < 2 and statistic != "mean":
                cells[statistic] = None
                continue
            cells[statistic] = score(*loo.table(result, statistic))
        cells["lds"] = score(*lds.table(result, "mean"))
        cells["seconds"] = seconds
        cells["cost"] = seconds / result.num_seeds / seconds_per_seed
        record[name] = cells
        fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(
            f"| {name} | {fmt(cells['mean'])} | {fmt(cells['variance'])} | {fmt(cells['wasserstein'])} | "
            f"{fmt(cells['lds'])} | {seconds:.1f} | {cells['cost']:.2f} |"
        )
    lines += [f"| {method} | refused | — | — | — | — | — |" for method in refused]
    # What an estimator that got every one of its 8 seeds exactly right would score.
    k = args.estimator_seeds
    retrained = AttributionResult(loo.effects[:k], loo.base[:k], loo.runs[:k])  # exact effects, as a result
    exact = {stat: score(retrained.statistic(stat), loo.statistic(stat)) for stat in STATISTICS}
    record[f"exact retraining, first {k} seeds"] = exact
    lines.append(
        f"| exact retraining on the estimators' {k} seeds | {exact['mean']:.3f} | {exact['variance']:.3f} | "
        f"{exact['wasserstein']:.3f} | — | — | — |"
    )
    ceiling = {s: loo.split_half(s) for s in STATISTICS}
    record["ground truth split-half"] = ceiling
    lines.append(
        f"| ground truth, split-half ({args.truth_seeds // 2} vs {args.truth_seeds // 2} seeds) | "
        f"{ceiling['mean']:.3f} | {ceiling['variance']:.3f} | {ceiling['wasserstein']:.3f} | — | — | — |"
    )
    table = "\n".join(lines)
    print(table)
    found = {name: result for name, result, _ in rows}
    if "ggn" in found and "ggn (dense)" in found:
        print(
            f"\nggn by block CG against the dense solve: Spearman of the mean shifts {score(found['ggn'].mean_shift(), found['ggn (dense)'].mean_shift()):.4f}, "
            f"of the per-seed effects {score(found['ggn'].effects.flatten(0, 1), found['ggn (dense)'].effects.flatten(0, 1)):.4f}"
        )
    print(
        f"\ntraining one seed with Lightning + recorder: {seconds_per_seed:.2f} s; "
        f"estimators pooled over {args.estimator_seeds} seeds; ground truth {args.truth_seeds} seeds x "
        f"{args.examples} removed examples, LDS {args.subsets} subsets x {args.subset_seeds} seeds"
    )
    (args.out / "table.md").write_text(table + "\n")
    if args.damping_grid:
        record["damping grid"] = damping_grid(Module, runs[: args.estimator_seeds], train, queries, loo)
    if args.write_docs:
        write_table("digits_dtda", DOCS_TABLES[args.model], table, command=invocation())
        if args.model == "mlp":
            write_headline(record, k)
        if args.damping_grid and args.model in DAMPING_TASKS:
            write_damping_grid(args.out, args.model, record["damping grid"])

    # The headline case: the example whose removal moves the spread most relative to the mean.
    name, result, _ = next(r for r in rows if r[0] == "ggn") if "ggn" in args.methods else rows[0]
    spread, shift = result.std_shift().abs(), result.mean_shift().abs()
    scores = torch.where(shift < 0.25 * spread, spread, torch.zeros_like(spread))  # spread moves 4x the mean
    query = int(scores.max(1).values.argmax())
    widener = int(scores[query].argmax())
    mover = int(result.mean_shift()[query].abs().argmax())
    figure = figures.plot_distributions(result, query, [widener, mover])
    figure.savefig(args.out / "spread_widener.png", dpi=120)
    print(f"spread_widener.png ({name}): query {query}, widener #{widener}, largest mean shift #{mover}")
    (args.out / "table.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
