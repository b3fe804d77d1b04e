"""Peak memory of EK-FAC attribution for N = 2,000 versus N = 20,000 training examples, same model.

    python benchmarks/memory.py

Each size runs in its own process (peak RSS only grows): it records one epoch of the digits MLP on
N upsampled digits (originals plus small noise), then attributes 50 queries. The number reported
is how far attribution raised the process's peak resident memory above its peak before attribution;
per-example gradients are streamed in chunks, so it should not grow with N.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile

import torch
from docs_tables import write_table


def digits_upsampled(n: int) -> tuple[torch.utils.data.TensorDataset, torch.utils.data.TensorDataset]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    index = torch.randint(len(x), (n,), generator=g)
    train = torch.utils.data.TensorDataset(x[index] + 0.05 * torch.randn(n, 64, generator=g), y[index])
    return train, torch.utils.data.TensorDataset(x[:50], y[:50])


def measure(n: int) -> dict[str, float]:
    import lightning.pytorch as pl
    from models import QUIET, DigitsMLP

    from lightning_dtda import Attributor, Influence, TrajectoryRecorder

    train, queries = digits_upsampled(n)
    with tempfile.TemporaryDirectory() as tmp:
        pl.seed_everything(0)
        pl.Trainer(
            max_epochs=1,
            **QUIET,
            callbacks=[TrajectoryRecorder(tmp)],
        ).fit(DigitsMLP(), torch.utils.data.DataLoader(train, batch_size=32, shuffle=True))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        Attributor(
            DigitsMLP, tmp, train, estimator=Influence(curvature="ekfac"), batch_size=128, progress=False
        ).attribute(queries)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"n": n, "peak_before_mib": before, "peak_after_mib": after, "attribution_mib": after - before}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(measure(int(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-docs", action="store_true", help="rewrite the table in docs/benchmarks/memory.md")
    args = parser.parse_args()
    rows = []
    for n in (2_000, 20_000):
        out = subprocess.run([sys.executable, __file__, "--child", str(n)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    lines = [
        "| N | peak RSS before attribution (MiB) | peak RSS after (MiB) | raised by attribution (MiB) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | {r['peak_before_mib']:.0f} | {r['peak_after_mib']:.0f} | {r['attribution_mib']:.1f} |"
        )
    print("\n".join(lines))
    whole = rows[1]["peak_after_mib"] / rows[0]["peak_after_mib"]
    own = rows[1]["attribution_mib"] / rows[0]["attribution_mib"]
    print(
        f"\npeak memory ratio N=20,000 / N=2,000: {whole:.3f} for the whole process, {own:.2f} for what "
        "attribution added (the [queries, N] effects matrix is the part that grows with N)"
    )
    if args.write_docs:
        write_table("memory", "main", "\n".join(lines))


if __name__ == "__main__":
    main()
