"""Identifying a training set, so that attribution refuses data other than what was trained on.

A dataset may draw random numbers in ``__getitem__`` (data augmentation, as torchvision's transforms
do with torch's generator). Its items are then read with every global generator (torch's, NumPy's,
Python's) seeded by the item's index and restored afterwards (``seeded_item``): the fingerprint is
the dataset's, not one random draw of it, and attribution sees one fixed augmented view per example.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torch.utils.data import Dataset

# Hashing every example would read a large dataset once more; evenly spaced examples catch a
# different dataset, a different order or different preprocessing, which are the mistakes that
# matter here, at a cost independent of the dataset's size.
_FINGERPRINT_EXAMPLES = 64


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


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
    elif hasattr(item, "__array_interface__"):  # a PIL image: its pixels, not its repr
        _update(h, np.asarray(item))
    else:
        # Without memory addresses (a PIL image's repr has one): the same item read twice is the same item.
        h.update(f"V{_ADDRESS.sub('', repr(item))}".encode())


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    python, numpy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        # The CPU generator only: torch.manual_seed would reseed CUDA's too, which fork_rng(devices=[])
        # does not put back (a keyed read on a GPU run would reset its dropout stream).
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


def draws_random_numbers(dataset: Dataset) -> bool:
    """Whether reading a few of ``dataset``'s items moves a global generator (torch's, NumPy's or
    Python's): only such a dataset is read seeded, which costs ~0.5 ms an item against ~4 us."""
    n = len(dataset)  # type: ignore[arg-type]
    python, numpy = random.getstate(), np.random.get_state()
    # The generators are put back: probing must not shift the caller's random numbers (the recorder
    # probes at the start of training, whose draws would otherwise differ from a run without it).
    with torch.random.fork_rng(devices=[]):
        before = torch.get_rng_state()
        try:
            for i in sorted({0, n // 2, n - 1}) if n else ():
                dataset[i]
            moved = not (
                torch.equal(before, torch.get_rng_state())
                and np.array_equal(numpy[1], np.random.get_state()[1])
                and python == random.getstate()
            )
        finally:
            random.setstate(python)
            np.random.set_state(numpy)
    return moved


def seeded_item(dataset: Dataset, index: int, seed: int | None = None) -> Any:
    """``dataset[index]`` read with the global generators seeded by ``seed`` (default: ``index``; the
    caller's draws resume afterwards): the same item every time, also from a dataset that augments at random."""
    with _seeded(index if seed is None else seed):
        return dataset[index]


def changes_between_reads(dataset: Dataset) -> bool:
    """Whether ``dataset``'s first item differs between two seeded reads: it draws from a generator of its own
    (a ``numpy.random.default_rng`` it holds), which nothing can seed or replay."""
    if len(dataset) == 0:  # type: ignore[arg-type]
        return False
    first, second = hashlib.sha256(), hashlib.sha256()
    _update(first, seeded_item(dataset, 0))
    _update(second, seeded_item(dataset, 0))
    return first.digest() != second.digest()


class SeededDataset(Dataset):
    """``dataset`` read as training read it, the same at every read: its items read by ``seeded_item`` if it
    draws random numbers, as they are if not, and their floating-point tensors cast to ``input_dtype``
    (as Lightning's ``"64-true"``, ``"16-true"`` and ``"bf16-true"`` precision plugins cast inputs)."""

    def __init__(self, dataset: Dataset, input_dtype: torch.dtype | None = None) -> None:
        self.dataset = dataset
        self.random = draws_random_numbers(dataset)
        self.input_dtype = input_dtype

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        # An index with an augmentation key (the replay's) goes through as it is: the key fixes the draw.
        if self.random and getattr(index, "key", None) is None:
            item = seeded_item(self.dataset, int(index))
        else:
            item = self.dataset[index]
        if self.input_dtype is None:
            return item
        return apply_to_collection(item, Tensor, lambda t: t.to(self.input_dtype) if t.is_floating_point() else t)


def fingerprint_dataset(dataset: Dataset) -> str:
    """SHA-256 over the length and up to 64 evenly spaced examples of a map-style dataset, each read by
    ``seeded_item`` if the dataset draws random numbers."""
    n = len(dataset)  # type: ignore[arg-type]
    h = hashlib.sha256(f"N{n}".encode())
    read = SeededDataset(dataset)
    for i in np.unique(np.linspace(0, n - 1, num=min(n, _FINGERPRINT_EXAMPLES)).round().astype(int)):
        h.update(f"I{i}".encode())
        _update(h, read[int(i)])
    return h.hexdigest()
