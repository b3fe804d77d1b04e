"""Atomic, checked files: every artefact is written to a temporary name and renamed.

Artefacts are safetensors files (a JSON header, then raw little-endian tensor bytes): any
safetensors reader opens them, and reading one runs no code. A tree of dicts and lists is stored as
its tensors, each under its dotted path (``state_dict.net.0.weight``), plus the rest of the tree as
JSON in the header's metadata (see :func:`encode_tree`). Nothing here pickles; the one reader of the
``torch.save`` files that earlier versions wrote is ``legacy.convert``, run only when asked.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.numpy import save as safetensors_save_numpy
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import Tensor

# The metadata entry that holds the tree's JSON; its tensors appear there as {"__tensor__": name}, and
# a dict whose keys are not all strings (an optimizer state's parameter numbers) as {"__items__": pairs}.
TREE_KEY = "lightning_dtda"
_TENSOR = "__tensor__"
_ITEMS = "__items__"
_JSON_LEAVES = (type(None), bool, int, float, str)
# torch.save's zip container: what results, ground truths and caches were before safetensors.
_ZIP_MAGIC = b"PK\x03\x04"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    # A temporary file in the same folder, so os.replace is a rename on one file system: a reader
    # sees the old file or the new one, never half of either, even if this process is killed. No
    # fsync: it guards against power loss, not a killed job, and cost the recorder 5% of training time.
    # Each artefact has a single writer (rank zero of one run), so a fixed temporary name is safe and
    # cheaper than mkstemp's.
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        try:
            tmp.write_bytes(data)
        except FileNotFoundError:  # the first file in its folder; checking every time costs a syscall
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_json(obj: Any, path: str | Path) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=1) + "\n").encode())


def load_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON (truncated or corrupt): {err}") from err


def encode_tree(tree: Mapping[str, Any]) -> bytes:
    """A safetensors file's bytes holding ``tree``: every tensor under its dotted path, and in the
    metadata entry ``"lightning_dtda"`` the tree as JSON with each tensor replaced by its name.

    ``tree`` may nest dicts (keys other than strings must be JSON values, e.g. an optimizer state's
    parameter numbers), lists and tuples (read back as lists), tensors (stored on the CPU, contiguous)
    and JSON values. Anything else raises ``TypeError``: only pickle could store it.
    """
    tensors: dict[str, Tensor] = {}
    storages: set[int] = set()

    def encode(value: Any, path: tuple[str, ...]) -> Any:
        if isinstance(value, Tensor):
            name = ".".join(path)
            if name in tensors:
                raise ValueError(f"two tensors of the tree would both be stored as {name!r}; rename one of their keys.")
            t = value.detach().cpu().contiguous()
            # safetensors refuses tensors that share memory (tied weights): the second is stored in full.
            storage = t.untyped_storage().data_ptr()
            if storage in storages and t.numel():
                t = t.clone()
            storages.add(storage)
            tensors[name] = t
            return {_TENSOR: name}
        if isinstance(value, Mapping):
            if all(isinstance(k, str) for k in value) and not (len(value) == 1 and {_TENSOR, _ITEMS} & set(value)):
                return {k: encode(v, (*path, k)) for k, v in value.items()}
            for k in value:
                if not isinstance(k, _JSON_LEAVES):
                    raise TypeError(f"{'.'.join(path)} has the key {k!r}, which JSON cannot hold; use strings or numbers.")
            return {_ITEMS: [[k, encode(v, (*path, str(k)))] for k, v in value.items()]}
        if isinstance(value, (list, tuple)):
            return [encode(v, (*path, str(i))) for i, v in enumerate(value)]
        if isinstance(value, _JSON_LEAVES):
            return value
        raise TypeError(
            f"{'.'.join(path) or 'the tree'} is a {type(value).__name__}, which only pickle could store; "
            "give tensors, numbers, strings, lists or dicts."
        )

    metadata = {TREE_KEY: json.dumps(encode(tree, ()))}
    # The same bytes either way; safetensors' numpy writer takes 0.14 ms for a digits-MLP snapshot
    # against 0.33 ms for its torch writer (per-tensor ctypes and sharing checks; benchmarks/snapshot_io.py).
    try:
        return safetensors_save_numpy({name: t.numpy() for name, t in tensors.items()}, metadata=metadata)
    except TypeError:  # bfloat16 and the float8 types have no numpy dtype
        return safetensors_save(tensors, metadata=metadata)


def decode_tree(data: bytes) -> dict[str, Any]:
    """Invert :func:`encode_tree`; raises ``ValueError`` for bytes it did not write."""
    try:
        tensors = safetensors_load(data)
    except SafetensorError as err:
        raise ValueError(str(err)) from None
    # safetensors has just validated the header: 8 bytes of little-endian length, then JSON. Its
    # loaders return the metadata only for a file on disk; this reads it from the bytes that were checked.
    (length,) = struct.unpack_from("<Q", data)
    metadata = json.loads(data[8 : 8 + length]).get("__metadata__") or {}
    if TREE_KEY not in metadata:
        raise ValueError(f"a safetensors file without lightning-dtda's {TREE_KEY!r} metadata")

    def decode(value: Any) -> Any:
        if isinstance(value, list):
            return [decode(v) for v in value]
        if isinstance(value, dict):
            if len(value) == 1 and _TENSOR in value:
                if value[_TENSOR] not in tensors:
                    raise ValueError(f"the metadata names a tensor {value[_TENSOR]!r} the file lacks")
                return tensors[value[_TENSOR]]
            if len(value) == 1 and _ITEMS in value:
                return {k: decode(v) for k, v in value[_ITEMS]}
            return {k: decode(v) for k, v in value.items()}
        return value

    return decode(json.loads(metadata[TREE_KEY]))


def save_tree(tree: Mapping[str, Any], path: str | Path) -> str:
    """Write :func:`encode_tree`'s bytes to ``path`` atomically and return their SHA-256."""
    data = encode_tree(tree)
    atomic_write_bytes(Path(path), data)
    return hashlib.sha256(data).hexdigest()


def read_checked(path: str | Path, sha256: str | None = None) -> bytes:
    """The bytes of ``path``, refused if the file is missing or (given ``sha256``) altered or cut short."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(
            f"{path} does not match the checksum recorded for it: the file was truncated or altered "
            "after it was written. Record the run again or restore the file."
        )
    return data


def decode_file(path: str | Path, data: bytes) -> dict[str, Any]:
    """:func:`decode_tree` of the bytes read from ``path``; an earlier version's ``torch.save`` file or
    anything unreadable raises ``ValueError`` naming the file (and how to convert it)."""
    path = Path(path)
    if data.startswith(_ZIP_MAGIC):
        raise ValueError(
            f"{path} was written with torch.save (pickle) by an earlier version of lightning-dtda; this version "
            "reads only safetensors files. Convert it once with "
            f"`python -c \"from lightning_dtda.legacy import convert; convert({str(path)!r})\"`, which writes "
            f"{path.with_suffix('.safetensors').name} beside it."
        )
    try:
        return decode_tree(data)
    except (ValueError, KeyError, TypeError, struct.error) as err:
        raise ValueError(f"{path} is not a readable lightning-dtda file (truncated or corrupt): {err}") from err


def load_tree(path: str | Path, sha256: str | None = None) -> dict[str, Any]:
    """Read a file written by :func:`save_tree` (see :func:`read_checked` and :func:`decode_file`).

    It is read whole and decoded from the bytes that were checked, not memory-mapped: the checksum
    reads every byte anyway, and a file replaced after the check cannot slip through.
    """
    return decode_file(path, read_checked(path, sha256))
