"""Identifying a training set, so that attribution refuses data other than what was trained on."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

# Hashing every example would read a large dataset once more; evenly spaced examples catch a
# different dataset, a different order or different preprocessing, which are the mistakes that
# matter here, at a cost independent of the dataset's size.
_FINGERPRINT_EXAMPLES = 64


def _update(h: "hashlib._Hash", item: Any) -> None:
    if isinstance(item, torch.Tensor):
        t = item.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(item, np.ndarray):
        h.update(f"A{item.dtype}{item.shape}".encode())
        h.update(np.ascontiguousarray(item).tobytes())
    elif isinstance(item, Mapping):
        for key in sorted(item, key=str):
            h.update(f"K{key}".encode())
            _update(h, item[key])
    elif isinstance(item, Sequence) and not isinstance(item, (str, bytes)):
        h.update(f"S{len(item)}".encode())
        for part in item:
            _update(h, part)
    else:
        h.update(f"V{item!r}".encode())


def fingerprint_dataset(dataset: Dataset) -> str:
    """SHA-256 over the length and up to 64 evenly spaced examples of a map-style dataset."""
    n = len(dataset)  # type: ignore[arg-type]
    h = hashlib.sha256(f"N{n}".encode())
    for i in np.unique(np.linspace(0, n - 1, num=min(n, _FINGERPRINT_EXAMPLES)).round().astype(int)):
        h.update(f"I{i}".encode())
        _update(h, dataset[int(i)])
    return h.hexdigest()
