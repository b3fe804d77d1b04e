"""What a user gets without arguments: ``Influence()`` (curvature and solver ``"auto"``) against each curvature.

    python benchmarks/default_curvature.py                 # reuses digits_dtda.py's cached ground truths
    python benchmarks/default_curvature.py --write-docs    # into docs/benchmarks/default_curvature.md

Three tables, alone on the machine:

- ``default``: on the public benchmark's four tasks (``digits_dtda.py``'s SGD MLP, Adam MLP, regression and
  BatchNorm/dropout CNN; its ground truths, recorded and cached on the first run), the default's choice,
  its mean-shift Spearman next to the best ``Influence`` curvature's, and its time next to EK-FAC's
  (8 seeds, 50 queries).
- ``solver``: ``Influence("ggn")`` with ``solver="dense"``, ``"krylov"`` and ``"auto"`` on one seed of each
  task's model (50 queries): ``"auto"``'s time as a multiple of the faster solver's.
- ``columns``: the exact GGN by block CG against EK-FAC as the query columns grow (one seed of the SGD MLP
  and of the CNN; the queries are training examples), which sets ``AUTO_MAX_COLUMNS``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from digits_dtda import METHODS, prepare_task, score
from docs_tables import invocation, write_table
from torch.utils.data import Subset

from lightning_dtda import Attributor, Influence

TASKS = {"mlp": "SGD MLP", "adam": "Adam MLP", "regression": "regression", "cnn": "BatchNorm/dropout CNN"}
CURVATURES = ("identity", "kfac", "ekfac", "ggn")
COLUMNS = (50, 100, 200, 400)


def timed(attributor: Attributor, queries, **kwargs):
    start = time.perf_counter()
    result = attributor.attribute(queries, **kwargs)
    return result, time.perf_counter() - start


def out_dir(model: str) -> Path:
    return Path("benchmarks/output/digits_dtda" + ("" if model == "mlp" else f"_{model}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--estimator-seeds", type=int, default=8)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    default_rows = [
        "| task | default's choice | default, Spearman mean shift | best curvature | default's time / EK-FAC's |",
        "|---|---|---|---|---|",
    ]
    solver_rows = [
        '| task (parameters) | dense s | Krylov s | `"auto"` chose | `"auto"` s | `"auto"` / faster |',
        "|---|---|---|---|---|---|",
    ]
    tasks = {}
    for model in args.tasks:
        task = tasks[model] = prepare_task(model, out_dir(model))
        runs = task.runs[: args.estimator_seeds]
        scores, seconds = {}, {}
        for name in ("default", *CURVATURES):
            attributor = Attributor(task.module, runs, task.train, METHODS[name], progress=False)
            result, seconds[name] = timed(attributor, task.queries)
            scores[name] = score(*task.loo.table(result, "mean"))
            if name == "default":
                chose = f"`{result.settings['curvature']}`, solver `{result.settings['per_run'][0].get('solver', '—')}`"
        best = max(CURVATURES, key=scores.get)
        default_rows.append(
            f"| {TASKS[model]} | {chose} | {scores['default']:.3f} | `{best}` {scores[best]:.3f} | "
            f"{seconds['default']:.1f} s / {seconds['ekfac']:.1f} s = {seconds['default'] / seconds['ekfac']:.2f} |"
        )
        print(default_rows[-1], flush=True)

        solver_seconds, auto = {}, ""
        for solver in ("dense", "krylov", "auto"):
            attributor = Attributor(task.module, runs[:1], task.train, Influence("ggn", solver=solver), progress=False)
            result, solver_seconds[solver] = timed(attributor, task.queries)
            if solver == "auto":
                auto = result.settings["per_run"][0]["solver"]
        params = sum(p.numel() for p in attributor.load_model(runs[0]).parameters() if p.requires_grad)
        faster = min(solver_seconds["dense"], solver_seconds["krylov"])
        solver_rows.append(
            f"| {TASKS[model]} ({params:,}) | {solver_seconds['dense']:.2f} | {solver_seconds['krylov']:.2f} | {auto} | "
            f"{solver_seconds['auto']:.2f} | {solver_seconds['auto'] / faster:.2f} |"
        )
        print(solver_rows[-1], flush=True)

    column_rows = [
        "| task | query columns | exact GGN (block CG) s | EK-FAC s | GGN / EK-FAC |",
        "|---|---|---|---|---|",
    ]
    for model in [m for m in ("mlp", "cnn") if m in tasks]:
        task = tasks[model]
        for columns in COLUMNS:
            queries = Subset(task.train, range(columns))
            times = {}
            for name, estimator in (("ggn", Influence("ggn", solver="krylov")), ("ekfac", Influence("ekfac"))):
                attributor = Attributor(task.module, task.runs[:1], task.train, estimator, progress=False)
                times[name] = timed(attributor, queries)[1]
            column_rows.append(
                f"| {TASKS[model]} | {columns} | {times['ggn']:.2f} | {times['ekfac']:.2f} | {times['ggn'] / times['ekfac']:.2f} |"
            )
            print(column_rows[-1], flush=True)

    tables = {"default": default_rows, "solver": solver_rows, "columns": column_rows}
    for name, rows in tables.items():
        print("\n" + "\n".join(rows))
        if args.write_docs:
            write_table("default_curvature", name, "\n".join(rows), command=invocation())


if __name__ == "__main__":
    main()
