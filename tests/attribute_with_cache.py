"""Attributes recorded runs with a cache folder, slowly enough to be killed between runs; see test_cache.py."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from models import TinyClassifier, classification_data  # noqa: E402

from lightning_dtda import Attributor, Unrolled  # noqa: E402


def attribute(runs, cache_dir):
    return Attributor(
        TinyClassifier,
        runs,
        classification_data(n=48, dtype=torch.float64),
        estimator=Unrolled(),
        progress=False,
        cache_dir=cache_dir,
    ).attribute(classification_data(n=4, seed=1, dtype=torch.float64))


if __name__ == "__main__":
    attribute(Path(sys.argv[1]), Path(sys.argv[2]))
