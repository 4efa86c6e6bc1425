"""Reused host memory for cold loads: the staging read equals safetensors' own, refuses
malformed files by name and gives its buffer back either way, and the block pool never lends
one buffer twice, keeps what it may and lends primed buffers first."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from loradock.registry.safetensors_header import SafetensorsFormatError
from loradock.runtime.host_memory import HostBlocks, read_tensors
from safetensors.torch import load_file, save_file


def test_read_tensors_equals_safetensors_and_reuses_its_staging(tmp_path):
    g = torch.Generator().manual_seed(0)
    big = {"a.lora_A.weight": torch.randn(4, 6, generator=g), "a.lora_B.weight": torch.randn(5, 4, generator=g),
           "half": torch.randn(3, generator=g).to(torch.float16), "brain": torch.randn(2, 3, generator=g).to(torch.bfloat16)}
    save_file(big, tmp_path / "big.safetensors")
    save_file({"x": torch.ones(64)}, tmp_path / "small.safetensors")  # over half the big one: lent its buffer
    pool = HostBlocks()
    want = load_file(tmp_path / "big.safetensors")
    with read_tensors(tmp_path / "big.safetensors", pool) as got:
        assert got.keys() == want.keys()
        for name in want:
            assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
        first = got["a.lora_A.weight"].untyped_storage().data_ptr()
        assert pool.free_bytes == 0, "the staging buffer is lent for the with block"
    size = (tmp_path / "big.safetensors").stat().st_size
    assert pool.free_bytes == size, "and given back after it"
    with read_tensors(tmp_path / "small.safetensors", pool) as again:
        assert again["x"].untyped_storage().data_ptr() == first, "the next read reuses the same staging buffer"
        assert torch.equal(again["x"], torch.ones(64))


def write_raw(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize(("header", "data", "message"), [
    ({"t": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, bytes(8), "dtype I64"),
    ({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), r"8 bytes for shape \[3\]"),
    ({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8), "outside the file"),
    ({"t": {"dtype": "F32", "shape": [2]}}, bytes(8), "bad entry"),
], ids=["dtype", "size-mismatch", "outside-the-file", "no-offsets"])
def test_read_tensors_refuses_malformed_files_by_name(tmp_path, header, data, message):
    path = tmp_path / "bad.safetensors"
    write_raw(path, header, data)
    pool = HostBlocks()
    with pytest.raises(SafetensorsFormatError, match=message), read_tensors(path, pool):
        pass
    assert pool.free_bytes == path.stat().st_size, "a refused file gives its staging buffer back"
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(SafetensorsFormatError, match="too short"), read_tensors(tmp_path / "short.safetensors", pool):
        pass


def test_unaligned_tensors_are_copied_not_misread(tmp_path):
    """A header whose length leaves the data unaligned for float32 (writers pad it; not all do)."""
    path = tmp_path / "odd.safetensors"
    values = torch.tensor([1.5, -2.0])
    header = json.dumps({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    header += b" " * ((8 - len(header) % 8) % 8 + 1)  # one byte past alignment
    path.write_bytes(struct.pack("<Q", len(header)) + header + values.numpy().tobytes())
    with read_tensors(path, HostBlocks()) as tensors:
        assert torch.equal(tensors["t"], values)


def test_blocks_are_lent_once_and_reused_after_release():
    pool = HostBlocks(keep_bytes=1000)
    a, b = pool.take(100), pool.take(100)
    assert a.tensor.data_ptr() != b.tensor.data_ptr(), "two leases never share a buffer"
    ptr = a.tensor.data_ptr()
    a.release()
    a.release()  # idempotent: the buffer is in the pool once
    assert pool.free_bytes == 100
    c = pool.take(80)
    assert c.tensor.data_ptr() == ptr and not c.released, "a returned buffer is lent again"
    d = pool.take(80)
    assert d.tensor.data_ptr() not in (ptr, b.tensor.data_ptr())
    assert pool.take(10).tensor.numel() == 10, "a 100-byte buffer is not lent for 10 bytes"


def test_pool_keeps_at_most_keep_bytes_of_returned_buffers():
    pool = HostBlocks(keep_bytes=250)
    blocks = [pool.take(100) for _ in range(3)]
    for block in blocks:
        block.release()
    assert pool.free_bytes == 200


def test_primed_buffers_are_lent_first_and_bounded_by_keep_bytes():
    pool = HostBlocks(keep_bytes=1000)
    assert pool.prime(300, 5) == 3, "no more than keep_bytes of primed buffers"
    assert pool.free_bytes == 900
    assert pool.prime(300, 1) == 0
    lent = [pool.take(250) for _ in range(3)]
    assert pool.free_bytes == 0, "takes that fit are served from the primed buffers"
    assert all(block.tensor.numel() == 300 for block in lent)
    assert pool.take(100).tensor.numel() == 100, "an empty pool allocates"
