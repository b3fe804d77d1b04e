"""What unrolled differentiation costs, as a ratio to training the same seed, with its breakdown.

    python benchmarks/unrolled_speed.py     # ~2 min on 2 CPU cores; run it alone on the machine

For the public benchmark's MLP and CNN (``digits_dtda.py``: 500 digits, batch 32, 20 epochs = 320
steps, snapshots every epoch), one seed is trained with Lightning and the recorder, then unrolled
for 1 and for Q queries; training, the forward replay and unrolling are each timed three times,
interleaved, and the medians printed (collating once). Printed per
model: training seconds; unrolled seconds and their ratio to training; and the breakdown: collating the
recorded batches (data and Python work per step), the checked forward replay that keeps each snapshot
interval's autograd graph (within Unrolled's memory budget), the reverse pass for one query (carrying
the adjoint back through the kept graphs, with the query gradients), and each further query's share.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from docs_tables import write_table
from models import QUIET, DigitsCNN, DigitsMLP, benchmark_data, final_model
from torch.utils.data import DataLoader, Subset, default_collate

from lightning_dtda import Attributor, Unrolled, load_runs, train_seeds

# Internal on purpose: the breakdown times the forward replay alone, a stage inside Unrolled.
from lightning_dtda.estimators.unrolled import _GRAPH_BUDGET, _IntervalGraphs
from lightning_dtda.replay.check import replay_checked
from lightning_dtda.replay.engine import Replay

QUERIES = 50
REPEATS = 3


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(name: str, cls, make, trainer_kwargs: dict, train, queries) -> str:
    """One seed of ``make()`` trained (after an untimed warm-up), then unrolled: its row of the table."""
    loader = DataLoader(train, batch_size=32, shuffle=True)
    quiet = QUIET | trainer_kwargs
    with tempfile.TemporaryDirectory() as folder:
        train_seeds(make, loader, folder, [0], max_epochs=1, **quiet)  # warm-up, not timed
        runs = Path(folder) / "runs"
        train_seeds(make, DataLoader(train, batch_size=32, shuffle=True), runs, [0], max_epochs=20, **quiet)
        [run] = load_runs(runs)
        collate = seconds(
            lambda: [default_collate([train[i] for i in m.tolist()]) for s in run.steps for m in s.micro_batches]
        )

        def forward() -> None:
            replay = Replay(final_model(cls, run, 0), run, train)
            graphs = _IntervalGraphs(replay, _GRAPH_BUDGET)
            replay_checked(replay, torch.ones(1, len(train)), keep_checkpoints=True, advance=graphs.advance)

        def attribute(count: int) -> None:
            Attributor(cls, runs, train, Unrolled(), progress=False).attribute(Subset(queries, range(count)))

        times: dict[str, list[float]] = {}
        for repeat in range(REPEATS):  # interleaved, so a slow spell of the machine touches every column alike
            loader, again = DataLoader(train, batch_size=32, shuffle=True), Path(folder) / f"again{repeat}"
            times.setdefault("training", []).append(
                seconds(lambda: train_seeds(make, loader, again, [0], max_epochs=20, **quiet))  # noqa: B023
            )
            times.setdefault("forward", []).append(seconds(forward))
            times.setdefault("one", []).append(seconds(lambda: attribute(1)))
            times.setdefault("many", []).append(seconds(lambda: attribute(QUERIES)))
        training, forward, one, many = (statistics.median(times[k]) for k in ("training", "forward", "one", "many"))
    return (
        f"| {name} | {training:.2f} | {one:.2f} | {many:.2f} | {many / training:.1f} | {collate:.2f} | "
        f"{forward:.2f} | {one - forward:.2f} | {(many - one) / (QUERIES - 1):.3f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--write-docs", action="store_true", help="rewrite the table in docs/benchmarks/unrolled_speed.md"
    )
    args = parser.parse_args()
    train, queries = benchmark_data()
    lines = [
        f"| model | training s | unrolled s, 1 query | unrolled s, {QUERIES} queries | x training ({QUERIES} queries) | "
        "collating batches s | forward replay, keeping graphs s | reverse pass, 1st query s | each further query s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines))
    for name, cls, make, trainer_kwargs in (
        ("MLP 64-64-10", DigitsMLP, DigitsMLP, {}),
        ("CNN (BatchNorm, dropout)", DigitsCNN, lambda: DigitsCNN(total_steps=320), {"gradient_clip_val": 1.0}),
    ):
        lines.append(measure(name, cls, make, trainer_kwargs, train, queries))
        print(lines[-1], flush=True)
    if args.write_docs:
        write_table("unrolled_speed", "main", "\n".join(lines))


if __name__ == "__main__":
    main()
