"""Random data augmentation that a replay can reproduce.

A dataset that augments at random draws from the global generators in ``__getitem__``, so which view
of an example training saw is lost. ``ReplayableAugmentation`` makes the draw a function of a key the
recording sampler sends with each index (the run's seed and the sampler's pass) and of the index, with
the generators restored afterwards. The recorder stores each micro-batch's key, and the replay sends
the same keys, so it reads the very views training read, in DataLoader workers as well (the key travels
with the index, not in the dataset's state). Read without a key (training without a recorder, the
user's own code), an item augments as the dataset does, at random; the package's own reads without a
key (the fingerprint, ``Influence``) seed each example by its index (``fingerprint.SeededDataset``).
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import torch
from torch.utils.data import Dataset

from lightning_dtda.runs.fingerprint import seeded_item


def mix(*numbers: int) -> int:
    """A 63-bit seed from integers (blake2b: seeds for neighbouring passes or indices are unrelated)."""
    data = struct.pack(f"<{len(numbers)}Q", *(n % 2**64 for n in numbers))
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


class KeyedIndex(int):
    """A dataset index carrying the augmentation key of the sampler pass that drew it (an ``int`` to every
    other dataset)."""

    key: int

    def __new__(cls, index: int, key: int) -> "KeyedIndex":
        obj = super().__new__(cls, index)
        obj.key = key
        return obj

    def __reduce__(self) -> tuple[Any, ...]:  # DataLoader workers receive indices pickled
        return (KeyedIndex, (int(self), self.key))


def pass_key(pass_number: int) -> int:
    """The augmentation key of a sampler's ``pass_number``-th pass (from 1) in this process: a function of
    torch's initial seed (``seed_everything``'s seed), so training again with the same seed draws the
    same views."""
    return mix(torch.initial_seed(), pass_number)


class ReplayableAugmentation(Dataset):
    """Wraps a dataset that augments at random so that a recorded run's augmentation can be replayed.

    ``dataset[index]`` is read with torch's, NumPy's and Python's global generators seeded by
    ``(key, index)``, where ``TrajectoryRecorder`` sends each index with a key that changes with every
    pass over the data (epoch) and with the seed; the generators continue afterwards as if nothing had
    been drawn. ``Unrolled`` and ``evaluation.retrain`` then read each micro-batch exactly as training
    did, also when the DataLoader has workers. Read without a key (training without a recorder, your own
    code), an item augments at random as the dataset does; ``Influence`` and the fingerprint read one fixed
    view per example (seeded by its index). To retrain a run by hand with the same views, keep a
    ``TrajectoryRecorder`` in that Trainer too: it is what sends the keys.

    It must be the DataLoader's dataset itself (a ``Subset`` or ``ConcatDataset`` around it would pass
    its own indices on without the key); wrap the outermost dataset. Pass the same wrapped dataset to
    the ``Attributor`` and to ``retrain``. Each item costs about half a millisecond more to read (the
    generators' states are saved and restored).

    Args:
        dataset: A map-style dataset whose ``__getitem__`` draws from the global generators (e.g.
            torchvision transforms).

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> from lightning_dtda import ReplayableAugmentation
        >>> class Jitter(TensorDataset):
        ...     def __getitem__(self, i):
        ...         x, y = super().__getitem__(i)
        ...         return x + 0.1 * torch.randn_like(x), y
        >>> data = ReplayableAugmentation(Jitter(torch.zeros(4, 2), torch.zeros(4)))
        >>> from lightning_dtda.runs.augmentation import KeyedIndex
        >>> view, again = data[KeyedIndex(1, key=7)], data[KeyedIndex(1, key=7)]  # as the recorder reads it
        >>> torch.equal(view[0], again[0])
        True
    """

    def __init__(self, dataset: Dataset) -> None:
        if isinstance(dataset, ReplayableAugmentation):
            raise ValueError("dataset is already a ReplayableAugmentation; wrap it once.")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        key = getattr(index, "key", None)
        if key is None:
            return self.dataset[int(index)]
        return seeded_item(self.dataset, int(index), seed=mix(key, int(index)))


def find_augmentation(dataset: Any) -> ReplayableAugmentation | None:
    """The ``ReplayableAugmentation`` inside ``dataset`` (itself, or one reached through ``.dataset``
    attributes as ``Subset`` and the Attributor's own wrappers hold them), or ``None``."""
    seen = 0
    while dataset is not None and seen < 16:
        if isinstance(dataset, ReplayableAugmentation):
            return dataset
        dataset, seen = getattr(dataset, "dataset", None), seen + 1
    return None
