"""The reader of run format 2's snapshot files, so runs recorded before safetensors load unchanged.

Format 2 keeps snapshots as flat archives (a magic line, a JSON header and raw tensor bytes). The one
thing in them ``decode_archive`` does not read by default is an entry written with ``torch.save``
(a snapshot's optimizer state, kept only with ``save_optimizer_state=True``): unpickling is done by
``lightning_dtda.convert`` (``migrate``) alone, when asked.
"""

from __future__ import annotations

import io
import json
import struct
from typing import Any

import torch

ARCHIVE_MAGIC = b"lightning-dtda archive 1\n"


class PickledEntryError(ValueError):
    """A format 2 snapshot holds an entry written with ``torch.save``, which only ``lightning_dtda.convert`` reads."""


def decode_archive(data: bytes, allow_pickle: bool = False) -> dict[str, Any]:
    """A run format 2 snapshot's tree; raises ``ValueError`` for anything else, and for an entry written
    with ``torch.save`` unless ``allow_pickle`` (then read with ``torch.load(weights_only=True)``)."""
    if not data.startswith(ARCHIVE_MAGIC):
        raise ValueError("not a lightning-dtda archive")
    start = len(ARCHIVE_MAGIC) + 8
    (length,) = struct.unpack_from("<Q", data, len(ARCHIVE_MAGIC))
    tree = json.loads(data[start : start + length])
    body = bytearray(memoryview(data)[start + length :])  # one copy, writable: torch.frombuffer shares it quietly

    def region(offset: int, size: int) -> None:
        if offset < 0 or offset + size > len(body):
            raise ValueError("archive cut short")

    def decode(value: Any, key: str) -> Any:
        if not isinstance(value, dict):
            return value
        if "__tensor__" in value:
            dtype_name, shape, offset, size = value["__tensor__"]
            region(offset, size)
            dtype = getattr(torch, dtype_name)
            if size == 0:
                return torch.empty(shape, dtype=dtype)
            return torch.frombuffer(body, dtype=dtype, count=size // dtype.itemsize, offset=offset).reshape(shape)
        if "__saved__" in value:
            if not allow_pickle:
                raise PickledEntryError(
                    f"its entry {key!r} was written with torch.save (pickle), which is read only when converting"
                )
            offset, size = value["__saved__"]
            region(offset, size)
            return torch.load(io.BytesIO(bytes(body[offset : offset + size])), map_location="cpu", weights_only=True)
        return {k: decode(v, k) for k, v in value.items()}

    return decode(tree, "")
