"""Cache files: each artefact is named by a hash of everything it depends on, built here and nowhere else.

Two artefacts are cached: a run's effects (``effects_file``) and a curvature fitted at a run's
final weights (``curvature_file``). A key holds content digests (snapshots, training data,
queries) and the settings that made the artefact, so a changed input or setting is a new file and a
stale file is never read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_dtda.runs.format import SnapshotEntry
from lightning_dtda.runs.trajectory import Trajectory


def _file(cache_dir: Path, run: Trajectory, label: str, key: dict[str, Any]) -> Path:
    """``cache_dir/{run}-{label}-{hash of key}.safetensors``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / f"{run.name}-{label}-{digest}.safetensors"


def effects_file(
    cache_dir: Path,
    run: Trajectory,
    label: str,
    settings: dict[str, Any],
    snapshots: Sequence[SnapshotEntry],
    query_fingerprint: str,
    reduce: str | None,
) -> Path:
    """Where ``run``'s effects under an estimator (its ``label`` and ``settings``, the ``snapshots`` it
    reads) on the queries with ``query_fingerprint`` are cached."""
    key = {
        "module": run.module_class,
        "snapshots": [entry.sha256 for entry in snapshots],
        "train": run.dataset_fingerprint,
        "queries": query_fingerprint,
        "estimator": settings,
    }
    if reduce is not None:
        key["reduce"] = reduce
    return _file(cache_dir, run, label, key)


def curvature_file(
    cache_dir: Path, run: Trajectory, kind: str, solver: str, subset: int | None, parameters: list[str] | None
) -> Path:
    """Where the curvature ``kind`` fitted at ``run``'s final weights is cached (``parameters``: the tracked
    ones when not all trainable parameters are; ``subset``: the curvature's training examples)."""
    key: dict[str, Any] = {"snapshot": run.snapshots[-1].sha256, "train": run.dataset_fingerprint, "curvature": kind}
    if subset is not None:
        key["subset"] = subset
    if kind == "ggn":  # a dense eigendecomposition cached for "dense" must not answer a "krylov" request
        key["solver"] = solver
        key["eigh"] = "float64"  # caches from before the eigendecomposition was float64 are computed again
    if parameters is not None:
        key["parameters"] = parameters
    return _file(cache_dir, run, f"curvature-{kind}", key)
