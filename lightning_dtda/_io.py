"""Atomic, checked files: every artefact is written to a temporary name and renamed.

Artefacts are safetensors files (a JSON header, then raw little-endian tensor bytes): any
safetensors reader opens them, and reading one runs no code. A tree of dicts and lists is stored as
its tensors, each under its dotted path (``state_dict.net.0.weight``), plus the rest of the tree as
JSON in the header's metadata (see ``encode_tree``). Nothing here pickles; the one reader of the
``torch.save`` files that earlier versions wrote is ``lightning_dtda.convert`` (``migrate``), run only when asked.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import TensorSpec, serialize
from torch import Tensor

from lightning_dtda.errors import CorruptFileError

if sys.byteorder != "little":  # tensors are written and read as the machine's raw bytes (see encode_tree)
    raise ImportError(
        "lightning-dtda writes and reads safetensors files as raw little-endian bytes; this machine is big-endian."
    )

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
        raise CorruptFileError(f"{path} is not valid JSON (truncated or corrupt): {err}") from err


# A file that no outside checksum covers (a result, a ground truth, a cache) carries its own: the tree's
# top-level entry "__sha256__" holds the SHA-256 of all the file's bytes with those 64 digits zeroed.
# An entry of the tree rather than a metadata entry of its own: safetensors orders metadata entries at
# random, and the same tree must give the same bytes. Snapshots are covered by the manifest's checksums
# and go without (one hash per write less); files of earlier versions have none and read unchecked.
_CHECKSUM = "__sha256__"
# A second entry says the file has a checksum: a flipped byte can garble one key, not both.
_CHECKED = "__checked__"
_ZEROS = "0" * 64


def _checksum_at(data: bytes | bytearray, digest: str) -> int:
    """Where the 64 digits of the checksum (now ``digest``) start in ``data``, in its header after their key."""
    (length,) = struct.unpack_from("<Q", data)
    header = bytes(data[8 : 8 + length])
    key = header.find(_CHECKSUM.encode())
    where = header.find(digest.encode(), key)
    if key < 0 or where < 0 or where - key > 16:  # the digits follow the key (quotes escaped in the header)
        raise ValueError("its checksum entry is malformed")
    return 8 + where


def _self_digest(data: bytes | bytearray, start: int) -> str:
    """The SHA-256 of ``data`` with the 64 digits at ``start`` zeroed, hashed in place (a dense-GGN cache
    can be gigabytes: no copy of it)."""
    view = memoryview(data)
    digest = hashlib.sha256(view[:start])
    digest.update(_ZEROS.encode())
    digest.update(view[start + 64 :])
    return digest.hexdigest()


def encode_tree(tree: Mapping[str, Any], checksum: bool = True) -> bytes:
    """A safetensors file's bytes holding ``tree``: every tensor under its dotted path, and in the
    metadata entry ``"lightning_dtda"`` the tree as JSON with each tensor replaced by its name.

    ``tree`` may nest dicts (keys other than strings must be JSON values, e.g. an optimizer state's
    parameter numbers), lists and tuples (read back as lists), tensors (stored on the CPU, contiguous)
    and JSON values. Anything else raises ``TypeError``: only pickle could store it. With ``checksum``
    the file carries the SHA-256 of its own bytes (see ``_CHECKSUM``), which ``decode_tree`` checks.
    """
    tensors: dict[str, Tensor] = {}

    def encode(value: Any, path: tuple[str, ...]) -> Any:
        if isinstance(value, Tensor):
            name = ".".join(path)
            if name in tensors:
                raise ValueError(f"two tensors of the tree would both be stored as {name!r}; rename one of their keys.")
            if value.dtype not in _STORABLE:
                raise TypeError(
                    f"{name} is a {value.dtype} tensor, which these files do not hold; convert it (e.g. to float64)."
                )
            # Tensors that share memory (tied weights) are each stored in full: serialize copies bytes
            # from each tensor's own pointer.
            tensors[name] = value.detach().cpu().contiguous()
            return {_TENSOR: name}
        if isinstance(value, Mapping):
            if all(isinstance(k, str) for k in value) and not (len(value) == 1 and {_TENSOR, _ITEMS} & set(value)):
                return {k: encode(v, (*path, k)) for k, v in value.items()}
            for k in value:
                if not isinstance(k, _JSON_LEAVES):
                    raise TypeError(
                        f"{'.'.join(path)} has the key {k!r}, which JSON cannot hold; use strings or numbers."
                    )
            return {_ITEMS: [[k, encode(v, (*path, str(k)))] for k, v in value.items()]}
        if isinstance(value, (list, tuple)):
            return [encode(v, (*path, str(i))) for i, v in enumerate(value)]
        if isinstance(value, _JSON_LEAVES):
            return value
        raise TypeError(
            f"{'.'.join(path) or 'the tree'} is a {type(value).__name__}, which only pickle could store; "
            "give tensors, numbers, strings, lists or dicts."
        )

    encoded = encode(tree, ())
    if checksum:
        encoded = {**encoded, _CHECKED: True, _CHECKSUM: _ZEROS}
    metadata = {TREE_KEY: json.dumps(encoded)}
    # safetensors' own serializer, which both its numpy and torch writers end in, given each tensor's
    # memory directly: the same bytes in 0.025 ms for a digits-MLP snapshot, against 0.08 ms through its
    # numpy writer and 0.2 ms through its torch writer (their per-tensor conversions and shared-memory
    # checks, which a serializer copying from each tensor's own pointer does not need;
    # benchmarks/snapshot_io.py). The tensors stay alive in `tensors` meanwhile.
    specs = {
        name: TensorSpec(
            dtype=str(t.dtype).removeprefix("torch."),
            shape=t.shape,
            data_ptr=t.data_ptr(),
            data_len=t.numel() * t.element_size(),
        )
        for name, t in tensors.items()
    }
    data = serialize(specs, metadata)
    if not checksum:
        return data
    start = _checksum_at(data, _ZEROS)
    return data[:start] + _self_digest(data, start).encode() + data[start + 64 :]


# safetensors' dtype names (its format specification) and the torch dtypes they hold.
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "C64": torch.complex64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_STORABLE = frozenset(_DTYPES.values())


def _tensors_in(data: bytearray) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file's bytes, as views of ``data`` (no copy).

    safetensors' own ``load`` copies every tensor out of the bytes, which cost a snapshot read 17%
    (benchmarks/snapshot_io.py); the bytes here are already read whole and checked against the
    manifest, so the tensors are views of them. The layout is checked as safetensors checks it: a
    JSON header of 8-byte little-endian length, then entries whose byte ranges tile the rest exactly,
    each as long as its dtype and shape say (test: equal to ``safetensors.torch.load`` on every dtype).
    """
    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    (length,) = struct.unpack_from("<Q", data)
    if 8 + length > len(data):
        raise ValueError("incomplete metadata: the header runs past the end of the file")
    header = json.loads(bytes(data[8 : 8 + length]))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise ValueError("the header's __metadata__ is not a map of strings")

    def valid(entry: Any) -> bool:
        offsets, shape = (entry.get("data_offsets"), entry.get("shape")) if isinstance(entry, dict) else (None, None)

        def whole(xs: Any, n: int | None = None) -> bool:
            return isinstance(xs, list) and (n is None or len(xs) == n) and all(type(x) is int and x >= 0 for x in xs)

        return whole(offsets, 2) and whole(shape) and entry.get("dtype") in _DTYPES

    for name, entry in header.items():
        if not valid(entry):
            if isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and entry["dtype"] not in _DTYPES:
                raise ValueError(f"tensor {name!r} has the dtype {entry['dtype']!r}, which this version does not read")
            raise ValueError(f"tensor {name!r} has a malformed entry {entry!r}")
    start, end = 8 + length, 8 + length
    tensors = {}
    for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
        dtype, shape, (first, last) = _DTYPES[entry["dtype"]], entry["shape"], entry["data_offsets"]
        numel = math.prod(shape)
        if (start + first) % dtype.itemsize:  # safetensors' writers align every tensor to its element size
            raise ValueError(
                f"tensor {name!r} starts at byte {first}, not aligned to its {dtype.itemsize}-byte elements"
            )
        if start + first != end or last - first != numel * dtype.itemsize:
            raise ValueError(
                f"tensor {name!r}'s bytes [{first}, {last}) do not follow the previous tensor's or fit its shape"
            )
        end = start + last
        if end > len(data):
            raise ValueError(f"incomplete metadata: tensor {name!r} runs past the end of the file")
        tensors[name] = (
            torch.frombuffer(data, dtype=dtype, count=numel, offset=start + first).view(shape)
            if numel
            else torch.empty(shape, dtype=dtype)
        )
    if end != len(data):
        raise ValueError(f"incomplete metadata: the tensors end at byte {end} of {len(data)}")
    return tensors, metadata


def decode_tree(data: bytes | bytearray) -> dict[str, Any]:
    """Invert ``encode_tree``; raises ``ValueError`` for bytes it did not write. The tensors of a
    ``bytearray`` are views of it; ``bytes`` are copied once."""
    data = data if isinstance(data, bytearray) else bytearray(data)
    tensors, metadata = _tensors_in(data)
    if TREE_KEY not in metadata:
        raise ValueError(f"a safetensors file without lightning-dtda's {TREE_KEY!r} metadata")
    encoded = json.loads(metadata[TREE_KEY])
    if isinstance(encoded, dict) and (_CHECKSUM in encoded or _CHECKED in encoded):
        digest, checked = encoded.pop(_CHECKSUM, None), encoded.pop(_CHECKED, None)
        if (
            checked is not True
            or not isinstance(digest, str)
            or len(digest) != 64
            or _self_digest(data, _checksum_at(data, digest)) != digest
        ):
            raise ValueError("its bytes do not match the checksum it was written with: it was altered or cut short")

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

    return decode(encoded)


def save_tree(tree: Mapping[str, Any], path: str | Path, checksum: bool = True) -> str:
    """Write ``encode_tree``'s bytes to ``path`` atomically and return their SHA-256."""
    data = encode_tree(tree, checksum)
    atomic_write_bytes(Path(path), data)
    return hashlib.sha256(data).hexdigest()


def read_checked(path: str | Path, sha256: str | None = None) -> bytearray:
    """The bytes of ``path``, refused if the file is missing or (given ``sha256``) altered or cut short.
    A ``bytearray``, so that decoded tensors can be writable views of it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    with path.open("rb") as file:
        data = bytearray(os.fstat(file.fileno()).st_size)
        if file.readinto(data) != len(data):
            raise CorruptFileError(f"{path} changed while it was read; read it again.")
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise CorruptFileError(
            f"{path} does not match the checksum recorded for it: the file was truncated or altered "
            "after it was written. Record the run again or restore the file."
        )
    return data


def decode_file(path: str | Path, data: bytes | bytearray) -> dict[str, Any]:
    """``decode_tree`` of the bytes read from ``path``; an earlier version's ``torch.save`` file or
    anything unreadable raises ``ValueError`` naming the file (and how to convert it)."""
    path = Path(path)
    if data.startswith(_ZIP_MAGIC):
        raise ValueError(
            f"{path} was written with torch.save (pickle) by an earlier version of lightning-dtda; this version "
            "reads only safetensors files. Convert it once with "
            f'`python -c "from lightning_dtda import convert; convert({str(path)!r})"`, which writes '
            f"{path.with_suffix('.safetensors').name} beside it."
        )
    try:
        return decode_tree(data)
    except (ValueError, KeyError, TypeError, struct.error) as err:
        raise CorruptFileError(f"{path} is not a readable lightning-dtda file (truncated or corrupt): {err}") from err


def load_tree(path: str | Path, sha256: str | None = None) -> dict[str, Any]:
    """Read a file written by ``save_tree`` (see ``read_checked`` and ``decode_file``).

    It is read whole and decoded from the bytes that were checked, not memory-mapped: the checksum
    reads every byte anyway, and a file replaced after the check cannot slip through.
    """
    return decode_file(path, read_checked(path, sha256))
