"""What the recorder costs training: paired ratios of training time with and without it, and where it goes.

    python benchmarks/recorder_overhead.py    # ~5 min on 2 CPU cores; run it alone on the machine

The digits example (1,000 examples, batch 32, 20 epochs = 640 steps, a snapshot every epoch, membership
on) is trained ``PAIRS`` times with the recorder, ``PAIRS`` times without and ``PAIRS`` times with a callback
that overrides nothing (the floor any callback pays Lightning's dispatch), the same seed back to back in
alternating order after one unmeasured warm-up round. Each pair's ratio cancels the slow drifts of a shared
machine that make single timings vary by 20%; the median of the ratios and its quartiles are printed, and
the ratio of the fastest run with the recorder to the fastest without (interference only ever slows a run
down). Then one more recorded run with every hook the recorder overrides timed: milliseconds per step (the
batch and optimizer-step hooks), per snapshot (the epoch-end hook), at the start (setup and train-start) and
at the end, and all hooks' share of that run. Lightning's dispatch to one more callback and the sampler
wrapper are not in the hooks and not counted there.
"""

from __future__ import annotations

import argparse
import collections
import functools
import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from docs_tables import write_table
from models import QUIET, DigitsMLP, speed_data
from torch.utils.data import DataLoader

from lightning_dtda import TrajectoryRecorder

PAIRS = 41
EPOCHS = 20


class EmptyCallback(pl.Callback):
    """A callback that overrides nothing: what Lightning's dispatch to one more callback costs, which no
    callback can avoid."""


def fit(train_set, callback: pl.Callback | None, seed: int, **settings) -> float:
    """Seconds of one ``Trainer.fit`` of the digits MLP (seed ``seed``), with ``callback`` (the recorder) if
    given; ``settings`` replace the quiet CPU Trainer's (``gpu_ratios.py``: accelerator and precision)."""
    pl.seed_everything(seed, verbose=False)
    trainer = pl.Trainer(callbacks=[callback] if callback else [], **(QUIET | {"max_epochs": EPOCHS} | settings))
    model, loader = DigitsMLP(), DataLoader(train_set, batch_size=32, shuffle=True)
    start = time.perf_counter()
    trainer.fit(model, loader)
    return time.perf_counter() - start


def paired_ratios(
    train_set, folder: Path, pairs: int = PAIRS, control: bool = False, **settings
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """``pairs`` ratios to the run without a callback, of the run with the recorder (``"recorder"``) and, with
    ``control``, of the run with ``EmptyCallback`` (``"empty callback"``), each round in alternating order; and
    the fastest run of each kind (``"without"`` too). ``settings``: see ``fit``."""
    kinds = ["without", "recorder", *(["empty callback"] if control else [])]
    ratios: dict[str, list[float]] = {k: [] for k in kinds[1:]}
    fastest = dict.fromkeys(kinds, float("inf"))
    for pair in range(pairs + 1):
        seconds = {}
        for kind in kinds if pair % 2 else kinds[::-1]:
            if kind == "recorder":
                callback: pl.Callback | None = TrajectoryRecorder(folder / f"p{pair}")
            else:
                callback = EmptyCallback() if kind == "empty callback" else None
            seconds[kind] = fit(train_set, callback, pair, **settings)
        if pair > 0:  # the first round warms up
            for kind in ratios:
                ratios[kind].append(seconds[kind] / seconds["without"])
            fastest = {k: min(fastest[k], seconds[k]) for k in fastest}
    return ratios, fastest


def quartiles(ratios: list[float]) -> list[float]:
    """The first quartile, median and third quartile of ``ratios``."""
    return (
        torch.tensor(ratios, dtype=torch.float64)
        .quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
        .tolist()
    )


class TimedRecorder(TrajectoryRecorder):
    """The recorder with the seconds spent in each of its hooks added up in ``spent``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.spent: collections.Counter[str] = collections.Counter()
        for name in vars(TrajectoryRecorder):  # every hook the recorder overrides
            if name.startswith("on_") or name in ("setup", "teardown"):
                setattr(self, name, self._timed(name, getattr(self, name)))

    def _timed(self, name, hook):
        @functools.wraps(hook)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return hook(*args, **kwargs)
            finally:
                self.spent[name] += time.perf_counter() - start

        return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--write-docs", action="store_true", help="rewrite the table in docs/benchmarks/recorder_overhead.md"
    )
    args = parser.parse_args()
    train_set, _ = speed_data("mlp")
    with tempfile.TemporaryDirectory() as tmp:
        ratios, fastest = paired_ratios(train_set, Path(tmp), control=True)
        timed = TimedRecorder(Path(tmp) / "timed")
        total = fit(train_set, timed, 0)
    q1, median, q3 = quartiles(ratios["recorder"])
    e1, empty, e3 = quartiles(ratios["empty callback"])
    steps, snapshots = EPOCHS * 32, EPOCHS
    spent = timed.spent
    per_step = sum(spent[k] for k in ("on_train_batch_start", "on_train_batch_end", "on_before_optimizer_step"))
    start = spent["setup"] + spent["on_train_start"]
    in_hooks = sum(spent.values())
    lines = [
        "| pairs | median ratio | quartiles | fastest with / fastest without | an empty callback: median ratio "
        "(quartiles) | recorder hooks, ms a step | ms a snapshot | ms at start | ms at the end | hooks' share of a "
        "recorded run |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {PAIRS} | {median:.3f} | {q1:.3f}-{q3:.3f} | {fastest['recorder'] / fastest['without']:.3f} | "
        f"{empty:.3f} ({e1:.3f}-{e3:.3f}) | "
        f"{per_step / steps * 1e3:.3f} | {spent['on_train_epoch_end'] / snapshots * 1e3:.2f} | "
        f"{start * 1e3:.1f} | {(spent['on_train_end'] + spent['teardown']) * 1e3:.1f} | {in_hooks / total:.1%} |",
    ]
    print("\n".join(lines))
    for kind, values in ratios.items():
        print(f"({kind}: min {min(values):.3f}, max {max(values):.3f}, stdev {statistics.stdev(values):.3f})")
    if args.write_docs:
        write_table("recorder_overhead", "main", "\n".join(lines))


if __name__ == "__main__":
    main()
