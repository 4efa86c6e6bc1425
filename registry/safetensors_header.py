"""Read a safetensors file's header (tensor names, dtypes, shapes) without torch.

The format is: 8 bytes little-endian header length N, then N bytes of JSON
mapping tensor name -> {dtype, shape, data_offsets}, then the raw data.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsFormatError(ValueError):
    """The file is not a well-formed safetensors file."""


def read_header(path: Path) -> dict[str, dict]:
    """Return {tensor name: {"dtype", "shape", "data_offsets"}} (no `__metadata__`).

    Checks that the header parses and that every tensor's bytes lie inside the file.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        n = header_length(f.read(8), size, path.name)
        return parse_header(f.read(n), size - 8 - n, path.name)


def header_length(first8: bytes, size: int, name: str) -> int:
    """N, from the first 8 bytes of a file of `size` bytes, checked to fit the file."""
    if len(first8) != 8:
        raise SafetensorsFormatError(f"{name}: file too short to be safetensors")
    (n,) = struct.unpack("<Q", first8)
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise SafetensorsFormatError(f"{name}: header length {n} does not fit the file")
    return n


def parse_header(raw: bytes, data_len: int, name: str) -> dict[str, dict]:
    """The header's N bytes -> {tensor name: entry}, every tensor inside the `data_len` bytes
    that follow the header."""
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsFormatError(f"{name}: header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise SafetensorsFormatError(f"{name}: header is not a JSON object")
    header.pop("__metadata__", None)
    for tensor, info in header.items():
        try:
            start, end = info["data_offsets"]
            shape = [int(d) for d in info["shape"]]
            str(info["dtype"])
        except (KeyError, TypeError, ValueError) as e:
            raise SafetensorsFormatError(f"{name}: tensor {tensor!r} has a bad entry") from e
        if not 0 <= start <= end <= data_len:
            raise SafetensorsFormatError(
                f"{name}: tensor {tensor!r} lies outside the file (truncated?)"
            )
        info["shape"] = shape
    return header
