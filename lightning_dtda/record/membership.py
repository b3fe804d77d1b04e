"""Batch membership: which dataset indices each micro-batch of a Lightning run trained on.

Lightning does not expose it, so it is read from the train DataLoader's sampler: a pass-through
sampler remembers the indices it handed out in the current pass, and the k-th batch of a pass holds
the k-th chunk of ``batch_size`` of them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.data import extract_batch_size
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, IterableDataset, Sampler, SequentialSampler

from lightning_dtda.runs.augmentation import KeyedIndex, ReplayableAugmentation, find_augmentation, pass_key


class PassCount:
    """The passes over the data a run's samplers have begun, over every loader (Lightning makes a new one
    with ``reload_dataloaders_every_n_epochs``) and across a resume: each pass's augmentation key is a
    function of it, so no two passes of a run draw the same views."""

    def __init__(self) -> None:
        self.value = 0


class RecordingSampler(Sampler[int]):
    """Passes a sampler's indices through unchanged and remembers those of the current pass.

    The sampler runs in the main process even when the DataLoader has workers, and batches reach
    ``training_step`` in sampler order, so the k-th batch of a pass holds the k-th chunk of
    ``batch_size`` indices drawn in that pass, however far the loader has prefetched. Several
    recorders of one Trainer share one instance. ``keyed``: the dataset is a ``ReplayableAugmentation``,
    and each index goes out as a ``KeyedIndex`` with the pass's augmentation ``key``.
    """

    def __init__(self, sampler: Sampler[int], keyed: bool = False, run_passes: PassCount | None = None) -> None:
        self.sampler = sampler
        self.keyed = keyed
        self.run_passes = run_passes or PassCount()
        self.drawn: list[int] = []
        self.passes = 0
        self.key: int | None = None

    def __iter__(self) -> Iterator[int]:
        self.drawn = []
        self.passes += 1
        self.run_passes.value += 1
        self.key = key = pass_key(self.run_passes.value) if self.keyed else None
        # Chunks, not one index at a time: a Python step per index cost the recorder 2% of training.
        indices = iter(self.sampler)
        while chunk := list(itertools.islice(indices, 256)):
            self.drawn.extend(chunk)
            if key is None:
                yield from chunk
            else:
                yield from (KeyedIndex(i, key) for i in chunk)

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]

    def recover_first_pass(self) -> None:
        """Recover the indices of a pass that began before this wrapper was installed.

        Under multi-process training the loader is wrapped only at ``on_train_start``, after
        Lightning created its first iterator (which, with workers, already drew indices). A
        ``DistributedSampler`` yields the same indices whenever it is iterated within an epoch, so they
        can be drawn again here; any other sampler cannot be replayed.
        """
        if not isinstance(self.sampler, (DistributedSampler, SequentialSampler)):
            raise RuntimeError(
                f"The first epoch's indices were drawn from a {type(self.sampler).__name__} before "
                "TrajectoryRecorder could attach; use num_workers=0 or a DistributedSampler."
            )
        self.drawn = list(self.sampler)
        self.passes = 1
        self.key = None  # drawn without keys: a ReplayableAugmentation gave its fixed views

    def __getattr__(self, name: str) -> Any:
        # ``set_epoch`` and friends of the wrapped sampler stay reachable.
        if name == "sampler":
            raise AttributeError(name)
        return getattr(self.sampler, name)


def wrap_loader(loader: Any, run_passes: PassCount | None = None) -> DataLoader:
    """Put a ``RecordingSampler`` into ``loader``'s batch sampler (once: a wrapped loader is kept)."""
    if not isinstance(loader, DataLoader):
        raise RuntimeError(
            "TrajectoryRecorder needs a single torch DataLoader for training, got "
            f"{type(loader).__name__}. Pass one DataLoader (not a list or dict of them)."
        )
    if isinstance(loader.dataset, IterableDataset):
        raise RuntimeError(
            f"TrajectoryRecorder records which examples each batch trained on by their index, but the train DataLoader's "
            f"dataset is an IterableDataset ({type(loader.dataset).__name__}), whose examples have none. Train on a "
            "map-style Dataset (with __len__ and __getitem__, e.g. a TensorDataset of the examples) to attribute."
        )
    batch_sampler = loader.batch_sampler
    if not isinstance(batch_sampler, BatchSampler) or type(batch_sampler).__iter__ is not BatchSampler.__iter__:
        raise RuntimeError(
            "TrajectoryRecorder reads batch membership from the train DataLoader's BatchSampler, but "
            f"this loader uses batch_sampler={type(batch_sampler).__name__}. Build the loader with "
            "`DataLoader(dataset, batch_size=..., shuffle=...)` or `sampler=...` (any sampler of "
            "dataset indices) instead of a custom batch_sampler."
        )
    keyed = isinstance(loader.dataset, ReplayableAugmentation)
    if not keyed and find_augmentation(loader.dataset) is not None:
        raise RuntimeError(
            f"The train DataLoader's dataset ({type(loader.dataset).__name__}) holds a ReplayableAugmentation inside, "
            "which then receives that dataset's indices without their augmentation keys. Make the "
            "ReplayableAugmentation the DataLoader's dataset itself: wrap the outermost dataset."
        )
    if not isinstance(batch_sampler.sampler, RecordingSampler):
        batch_sampler.sampler = RecordingSampler(batch_sampler.sampler, run_passes=run_passes)
    elif run_passes is not None:  # a loader reused from an earlier fit: count this run's passes
        batch_sampler.sampler.run_passes = run_passes
    batch_sampler.sampler.keyed = keyed
    return loader


def _recorded(make_loader: Any, run_passes: PassCount) -> Any:
    def recorded_loader() -> Any:
        return wrap_loader(make_loader(), run_passes)

    recorded_loader.__dtda_recording__ = True  # type: ignore[attr-defined]
    return recorded_loader


class BatchMembership:
    """Collects, step by step, the dataset indices of each micro-batch of a Lightning run.

    Call ``install`` at ``setup`` (before Lightning first iterates the loader), ``attach`` at
    ``on_train_start``, ``on_batch_start`` before every micro-batch and ``take_step`` when an
    optimizer step is done; ``uninstall`` at ``teardown`` puts back what ``install`` changed.
    """

    def __init__(self) -> None:
        self.sampler: RecordingSampler | None = None
        self.batch_size = 0
        self._patched: tuple[Any, str, bool, Any] | None = None
        self._pass = 0
        self._position = 0
        self._micro_batches: list[list[int]] = []
        self._keys: list[int | None] = []
        self.passes = PassCount()

    def install(self, trainer: pl.Trainer) -> None:
        """Make the train loader record from its first iteration on (single process)."""
        # The sampler must be wrapped before Lightning first iterates the loader, which happens before
        # ``on_train_start`` (and, with workers, draws indices at once). The only hook that early is
        # ``setup``, when the loader may not exist yet; so wrap the source that makes it. Lightning
        # keeps that source on the fit loop (an internal attribute, stable across 2.x).
        source = trainer.fit_loop._data_source
        instance = source.instance
        if not isinstance(instance, (pl.LightningModule, pl.LightningDataModule)):
            wrap_loader(instance, self.passes)
            return
        make_loader = getattr(instance, source.name)
        if getattr(make_loader, "__dtda_recording__", False):  # another recorder of this Trainer did it
            return
        # ``LightningDataModule.from_datasets`` sets the method as an instance attribute: put back exactly that.
        own = source.name in vars(instance)
        self._patched = (instance, source.name, own, vars(instance).get(source.name))
        setattr(instance, source.name, _recorded(make_loader, self.passes))

    def uninstall(self) -> None:
        if self._patched is not None:
            instance, name, own, previous = self._patched
            if own:
                setattr(instance, name, previous)
            else:
                delattr(instance, name)
            self._patched = None

    def attach(self, trainer: pl.Trainer) -> None:
        """Find the recording sampler of the loader training is about to use."""
        loader = trainer.train_dataloader
        if trainer.world_size > 1:
            # Lightning replaced the loader by one with a DistributedSampler after the source made it.
            wrap_loader(loader, self.passes)
        sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
        if not isinstance(sampler, RecordingSampler):
            raise RuntimeError(
                "TrajectoryRecorder could not attach to the train DataLoader before training began; "
                "return a torch DataLoader from `train_dataloader()` or pass one to `trainer.fit`."
            )
        self.sampler = sampler
        self.batch_size = loader.batch_sampler.batch_size
        self._pass = sampler.passes
        self._position = 0
        self._micro_batches, self._keys = [], []

    def follow(self, trainer: pl.Trainer) -> None:
        """At an epoch's start: attach to the train loader again if Lightning made a new one
        (``reload_dataloaders_every_n_epochs``), whose sampler hands out the indices from now on."""
        loader = trainer.train_dataloader
        if getattr(getattr(loader, "batch_sampler", None), "sampler", None) is not self.sampler:
            if self._micro_batches:
                raise RuntimeError("the train DataLoader was replaced inside an optimizer step")
            self.attach(trainer)

    def on_batch_start(self, trainer: pl.Trainer, batch: Any, batch_idx: int, device: torch.device) -> None:
        """Note the indices of the micro-batch about to be trained on (every rank's, in rank order)."""
        sampler = self.sampler
        assert sampler is not None
        if sampler.passes == 0:
            sampler.recover_first_pass()
        if sampler.passes != self._pass:  # the loader began a new pass (a new epoch)
            self._pass = sampler.passes
            self._position = 0
        start = self._position * self.batch_size
        indices = sampler.drawn[start : start + self.batch_size]
        if not indices:  # never record a batch without its examples: the run would not be the one trained
            raise RuntimeError(
                f"it found no sampled indices for batch {batch_idx}: the train DataLoader's sampler handed out fewer "
                "than the batches trained on (was the loader or its sampler replaced during training?)"
            )
        if self._position == 0:  # once per pass: the batches hold what the sampler drew
            _check_batch_size(batch, batch_idx, len(indices))
        self._position += 1
        if trainer.world_size > 1:
            # Ranks draw equal-sized batches; all_gather is a collective, so every rank calls it.
            gathered = trainer.strategy.all_gather(torch.tensor([int(i) for i in indices], device=device))
            self._micro_batches.extend(gathered.reshape(trainer.world_size, -1).tolist())
            # Each rank's own key (ranks may be seeded differently); -1: none.
            key = torch.tensor(-1 if sampler.key is None else sampler.key, device=device)
            self._keys.extend(k if k >= 0 else None for k in trainer.strategy.all_gather(key).reshape(-1).tolist())
        else:
            self._micro_batches.append(indices)
            self._keys.append(sampler.key)

    def take_step(self) -> tuple[list[list[int]], list[int | None]]:
        """The micro-batches since the last call (those of the optimizer step that just ended) and each
        one's augmentation key (``None``: read without one)."""
        taken = self._micro_batches, self._keys
        self._micro_batches, self._keys = [], []
        return taken


def _check_batch_size(batch: Any, batch_idx: int, drawn: int) -> None:
    try:
        size = extract_batch_size(batch)
    except Exception:  # a batch Lightning cannot size: trust the sampler
        return
    if size != drawn:
        raise RuntimeError(
            f"Batch {batch_idx} has {size} examples but its sampler drew {drawn} indices; a "
            "collate_fn that adds or drops examples breaks batch membership."
        )
