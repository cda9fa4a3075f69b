"""A checkpoint on disk: its safetensors files, their size, their headers, their page cache.

Shared by the serving process (architecture signatures, slot planning) and the slot worker
(reading tensors into the host tier, `checkpoint_read`). Nothing here imports torch: the
serving process plans the cache without it.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

# The safetensors format's own limit on the JSON header.
MAX_HEADER_BYTES = 100_000_000


class CheckpointFormatError(ValueError):
    """A file that should be a safetensors file is not one."""


def checkpoint_files(path: str) -> list[Path]:
    """The safetensors files of a checkpoint folder (or the one file `path` names)."""
    folder = Path(path)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else [folder]
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {folder}")
    return files


def checkpoint_bytes(folder: Path | str) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def read_header(handle: BinaryIO, file: Path) -> dict[str, Any]:
    """The tensor table of a safetensors file open at its start (metadata left out). Leaves
    `handle` at the first byte of tensor data, where the offsets in the table count from."""
    raw = handle.read(8)
    if len(raw) != 8:
        raise CheckpointFormatError(f"{file}: too short to be a safetensors file")
    (length,) = struct.unpack("<Q", raw)
    if length > MAX_HEADER_BYTES:
        raise CheckpointFormatError(f"{file}: not a safetensors file (header of {length} bytes)")
    try:
        header = json.loads(handle.read(length))
    except ValueError as exc:
        raise CheckpointFormatError(f"{file}: unreadable safetensors header ({exc})") from None
    header.pop("__metadata__", None)
    return header


def safetensors_header(file: Path) -> dict[str, Any]:
    with file.open("rb") as handle:
        return read_header(handle, file)


def drop_page_cache(path: str) -> bool:
    """Ask the kernel to drop a file's clean pages (no root needed). False where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except (AttributeError, OSError):
        return False
    finally:
        os.close(fd)
