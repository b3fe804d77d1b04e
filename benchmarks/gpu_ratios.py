"""Every speed ratio of the CPU benchmarks, measured on a GPU, in one table (needs CUDA; exits cleanly without).

    pip install -e ".[bench]"          # kronfluence, for its rows
    python benchmarks/gpu_ratios.py    # a few minutes on one GPU

For training in fp32 (``32-true``) and in ``bf16-mixed`` precision (attribution itself runs in fp32):

* ``Unrolled`` with 50 queries as a multiple of training the same seed (``unrolled_speed.py``'s public-benchmark
  MLP and BatchNorm/dropout CNN, 320 steps; each timed after a warm-up);
* the recorder's overhead: the median of paired ratios of training time with and without it, with quartiles
  (``recorder_overhead.py``'s digits MLP);

and once, on the 1M-parameter CNN of ``speed.py`` (recorded in fp32 on the GPU): our EK-FAC's time and peak
GPU memory as ratios to kronfluence's EK-FAC, and the exact GGN's by block CG with every training image in its
products (``curvature_subset=None``). A row that cannot run says why (a refused replay, kronfluence missing). Peak memory is CUDA's
allocator's (``nan`` with ``--device cpu``).
``--device cpu`` runs the same script on the CPU (to try it; slow on the CNN rows).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from models import QUIET, DigitsCNN, DigitsMLP, benchmark_data, speed_data
from recorder_overhead import paired_ratios, quartiles
from speed import run_kronfluence, run_ours
from torch.utils.data import DataLoader, Subset

from lightning_dtda import Attributor, TrajectoryRecorder, Unrolled
from lightning_dtda.errors import ReplayMismatchError, UnsupportedTrainingError

QUERIES = 50
PAIRS = 11


def trainer(device: str, precision: str, callbacks: list, **kwargs) -> pl.Trainer:
    """The benchmarks' quiet Trainer (``models.QUIET``) on ``device``, 20 epochs."""
    accelerator = "gpu" if device == "cuda" else "cpu"
    settings = QUIET | {"accelerator": accelerator, "devices": 1, "precision": precision, "max_epochs": 20}
    return pl.Trainer(callbacks=callbacks, **settings, **kwargs)


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def unrolled_ratio(name: str, cls, make, clip: float | None, device: str, precision: str, root: Path) -> str:
    """``Unrolled`` with ``QUERIES`` queries over training time, for one seed of ``make()``."""
    train, queries = benchmark_data()

    def fit(folder: Path) -> None:
        pl.seed_everything(0, verbose=False)
        fit_trainer = trainer(device, precision, [TrajectoryRecorder(folder)], gradient_clip_val=clip)
        fit_trainer.fit(make(), DataLoader(train, batch_size=32, shuffle=True))

    def attribute(folder: Path) -> None:
        Attributor(cls, folder, train, estimator=Unrolled(), device=device, progress=False).attribute(
            Subset(queries, range(QUERIES))
        )

    fit(root / "warm-up")
    training = timed(lambda: fit(root / "runs"))
    try:
        attribute(root / "runs")  # warm-up
        unrolled = timed(lambda: attribute(root / "runs"))
    except (UnsupportedTrainingError, ReplayMismatchError) as err:  # a refusal is a result to print, not a crash
        return f"| Unrolled, {QUERIES} queries, {name} | {precision} | refused: {type(err).__name__}: {str(err)[:120]} | | |"
    return f"| Unrolled, {QUERIES} queries, {name} | {precision} | {unrolled:.2f} s | training {training:.2f} s | {unrolled / training:.2f}x |"


def recorder_ratio(device: str, precision: str, root: Path) -> str:
    """Median (quartiles) of ``PAIRS`` paired ratios of training time with and without the recorder."""
    accelerator = "gpu" if device == "cuda" else "cpu"
    ratios, _ = paired_ratios(speed_data("mlp")[0], root, PAIRS, accelerator=accelerator, precision=precision)
    q1, median, q3 = quartiles(ratios["recorder"])
    return f"| recorder overhead, digits MLP ({PAIRS} pairs) | {precision} | | | {median:.3f}x ({q1:.3f}-{q3:.3f}) |"


def curvature_rows(device: str, root: Path) -> list[str]:
    """Our EK-FAC and full-training-set exact GGN against kronfluence's EK-FAC on the 1M CNN (fp32)."""
    from models import UpsampledDigitsCNN

    runs = root / "cnn"
    pl.seed_everything(0, verbose=False)
    trainer(device, "32-true", [TrajectoryRecorder(runs)]).fit(
        UpsampledDigitsCNN(), DataLoader(speed_data("cnn")[0], batch_size=32, shuffle=True)
    )

    def measured(fn) -> tuple[float, float]:
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        seconds = timed(fn)
        peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
        return seconds, peak

    damping = 1e-3
    run_ours("cnn", runs, damping, "ekfac", device)  # warm-up: kernels, caches and the allocator, not timed
    ours = measured(lambda: run_ours("cnn", runs, damping, "ekfac", device))
    ggn = measured(lambda: run_ours("cnn", runs, damping, "ggn", device, subset=None))
    rows = [f"| EK-FAC, 1M CNN, {QUERIES} queries | 32-true | {ours[0]:.1f} s, {ours[1]:.0f} MiB | | |"]
    rows.append(f"| exact GGN (block CG, all 3,000 images), 1M CNN | 32-true | {ggn[0]:.1f} s, {ggn[1]:.0f} MiB | | |")
    try:
        import kronfluence  # noqa: F401
    except ImportError:
        return [*rows, "| kronfluence EK-FAC | 32-true | not installed (pip install -e '.[bench]') | | |"]
    theirs = measured(lambda: run_kronfluence("cnn", runs, damping, root / "kronfluence", device))
    return [
        f"| EK-FAC, 1M CNN, {QUERIES} queries | 32-true | {ours[0]:.1f} s, {ours[1]:.0f} MiB | kronfluence "
        f"{theirs[0]:.1f} s, {theirs[1]:.0f} MiB | time {ours[0] / theirs[0]:.2f}x, memory {ours[1] / theirs[1]:.2f}x |",
        f"| exact GGN (block CG, all 3,000 images), 1M CNN | 32-true | {ggn[0]:.1f} s, {ggn[1]:.0f} MiB | kronfluence "
        f"{theirs[0]:.1f} s | time {ggn[0] / theirs[0]:.2f}x |",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--skip-cnn", action="store_true", help="leave out the 1M-parameter CNN's rows")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_ratios.py: no CUDA device here, nothing measured (run it on a machine with a GPU).")
        return 0
    if args.device == "cuda":
        print(torch.cuda.get_device_name(), "torch", torch.__version__, "lightning", pl.__version__)
    lines = ["| measurement | training precision | ours | baseline | ratio |", "|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        precisions = ("32-true", "bf16-mixed") if args.device == "cuda" else ("32-true",)
        for precision in precisions:
            for name, cls, make, clip in (
                ("MLP", DigitsMLP, DigitsMLP, None),
                ("BN/dropout CNN", DigitsCNN, lambda: DigitsCNN(total_steps=320), 1.0),
            ):
                lines.append(unrolled_ratio(name, cls, make, clip, args.device, precision, root / precision / name))
                print(lines[-1], flush=True)
            lines.append(recorder_ratio(args.device, precision, root / precision / "recorder"))
            print(lines[-1], flush=True)
        if not args.skip_cnn:
            for row in curvature_rows(args.device, root):
                lines.append(row)
                print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
