"""What unrolled differentiation costs, as a ratio to training the same seed, with its breakdown.

    python benchmarks/unrolled_speed.py     # ~2 min on 2 CPU cores; run it alone on the machine

For the public benchmark's MLP and CNN (``digits_dtda.py``: 500 digits, batch 32, 20 epochs = 320
steps, snapshots every epoch), one seed is trained with Lightning and the recorder, then unrolled
for 1 and for Q queries. Printed per model: training seconds; unrolled seconds and their ratio to
training; and the breakdown: collating the recorded batches (data and Python work per step), the
forward replay that keeps the snapshot-interval checkpoints, the backward pass for one query
(recomputing each interval with autograd and carrying the adjoint), and each further query's share.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset, default_collate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from digits import DigitsMLP  # noqa: E402
from digits_cnn import DigitsCNN  # noqa: E402
from digits_dtda import benchmark_data  # noqa: E402

from lightning_dtda import Attributor, Unrolled, load_runs, train_seeds  # noqa: E402
from lightning_dtda.replay.engine import replay  # noqa: E402
from lightning_dtda.model.instantiate import instantiate  # noqa: E402

QUERIES = 50


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    train, queries = benchmark_data()
    print(f"| model | training s | unrolled s, 1 query | unrolled s, {QUERIES} queries | x training ({QUERIES} queries) | "
          "collating batches s | forward replay s | backward, 1st query s | each further query s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, cls, make, trainer_kwargs in (
        ("MLP 64-64-10", DigitsMLP, DigitsMLP, {}),
        ("CNN (BatchNorm, dropout)", DigitsCNN, lambda: DigitsCNN(total_steps=320), {"gradient_clip_val": 1.0}),
    ):
        with tempfile.TemporaryDirectory() as folder:
            train_seeds(make, DataLoader(train, batch_size=32, shuffle=True), folder, [0], max_epochs=1, accelerator="cpu",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        **trainer_kwargs)  # warm-up, not timed
            runs = Path(folder) / "runs"
            training = seconds(lambda: train_seeds(
                make, DataLoader(train, batch_size=32, shuffle=True), runs, [0], max_epochs=20, accelerator="cpu",
                logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **trainer_kwargs))
            [run] = load_runs(runs)
            collate = seconds(lambda: [default_collate([train[i] for i in m.tolist()]) for s in run.steps for m in s.micro_batches])
            forward = seconds(lambda: replay(instantiate(cls, run, 0), run, train, torch.ones(1, len(train))))
            one = seconds(lambda: Attributor(cls, runs, train, Unrolled(), progress=False).attribute(Subset(queries, [0])))
            many = seconds(lambda: Attributor(cls, runs, train, Unrolled(), progress=False).attribute(Subset(queries, range(QUERIES))))
            print(f"| {name} | {training:.2f} | {one:.2f} | {many:.2f} | {many / training:.1f} | {collate:.2f} | {forward:.2f} | "
                  f"{one - forward:.2f} | {(many - one) / (QUERIES - 1):.3f} |", flush=True)


if __name__ == "__main__":
    main()
