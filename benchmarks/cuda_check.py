"""CUDA and mixed-precision check of recording and attribution (needs a GPU; not part of the suite).

    python benchmarks/cuda_check.py

Records the digits MLP on the GPU in fp32 and in bf16-mixed precision, then attributes 5 queries on
the CPU and on the GPU with every curvature. Prints the relative difference of GPU and CPU effects
and exits non-zero if any exceeds 1e-3 or any effect is not finite.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from docs_tables import scientific, write_table
from models import DigitsMLP, digits
from torch.utils.data import DataLoader, TensorDataset

from lightning_dtda import Attributor, Influence, TrajectoryRecorder


def record(root: Path, precision: str, train: TensorDataset) -> Path:
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_epochs=5,
        accelerator="gpu",
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[TrajectoryRecorder(root / precision)],
    )
    trainer.fit(DigitsMLP(), DataLoader(train, batch_size=32, shuffle=True))
    return root / precision


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-docs", action="store_true", help="rewrite the table in docs/benchmarks/cuda_check.md")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this check needs a GPU"
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "lightning", pl.__version__)
    train, test = digits()
    queries = TensorDataset(*test[:5])
    failures = []
    lines = ["| curvature | relative difference, GPU against CPU |", "| --- | --- |"]
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = record(Path(tmp), "32-true", train)
        bf16 = record(Path(tmp), "bf16-mixed", train)
        for kind in ("identity", "ggn", "kfac", "ekfac"):
            effects = {}
            for device in ("cpu", "cuda"):
                start = time.perf_counter()
                effects[device] = (
                    Attributor(
                        DigitsMLP, fp32, train, estimator=Influence(curvature=kind), device=device, progress=False
                    )
                    .attribute(queries)
                    .effects
                )
                seconds = time.perf_counter() - start
                print(f"{kind:8s} {device:4s} {seconds:6.2f} s")
            rel = ((effects["cuda"] - effects["cpu"]).norm() / effects["cpu"].norm()).item()
            print(f"{kind:8s} relative difference cuda vs cpu: {rel:.2e}")
            lines.append(f"| {kind} | {scientific(rel)} |")
            if not rel < 1e-3:
                failures.append(f"{kind}: cuda differs from cpu by {rel:.2e}")
        result = Attributor(
            DigitsMLP, bf16, train, estimator=Influence(curvature="ekfac"), device="cuda", progress=False
        ).attribute(queries)
        finite = bool(torch.isfinite(result.effects).all())
        print(
            f"bf16-mixed run, ekfac on cuda: finite={finite}, effects dtype {result.effects.dtype}, "
            f"max |effect| {result.effects.abs().max():.3g}"
        )
        if not finite:
            failures.append("bf16-mixed: non-finite effects")
    print("FAILED: " + "; ".join(failures) if failures else "all CUDA checks passed")
    if args.write_docs and not failures:
        machine = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, lightning {pl.__version__}"
        write_table("cuda_check", "main", "\n".join(lines) + f"\n\nMeasured on {machine}.")
    elif args.write_docs:
        print("the check failed: docs/benchmarks/cuda_check.md is left as it was")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
