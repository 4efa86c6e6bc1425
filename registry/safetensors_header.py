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
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise SafetensorsFormatError(f"{path.name}: file too short to be safetensors")
        (n,) = struct.unpack("<Q", raw_len)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise SafetensorsFormatError(f"{path.name}: header length {n} does not fit the file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsFormatError(f"{path.name}: header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise SafetensorsFormatError(f"{path.name}: header is not a JSON object")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    for name, info in header.items():
        try:
            start, end = info["data_offsets"]
            shape = [int(d) for d in info["shape"]]
            str(info["dtype"])
        except (KeyError, TypeError, ValueError) as e:
            raise SafetensorsFormatError(f"{path.name}: tensor {name!r} has a bad entry") from e
        if not 0 <= start <= end <= data_len:
            raise SafetensorsFormatError(
                f"{path.name}: tensor {name!r} lies outside the file (truncated?)"
            )
        info["shape"] = shape
    return header
