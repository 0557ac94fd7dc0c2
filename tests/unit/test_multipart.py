"""The WADO-RS multipart reader streams: a series far larger than memory allows passes through
it with a bounded footprint, and parts come out exact whatever the read sizes."""

from __future__ import annotations

import hashlib
import io
import tracemalloc

import pytest

from glio_node.pull.multipart import MultipartError, split_parts

BOUNDARY = "b0undary-XyZ"


class GeneratedBody:
    """A multipart body of ``parts`` parts of ``part_size`` pseudo-random bytes, produced as it
    is read (never held whole), like a socket."""

    def __init__(self, parts: int, part_size: int):
        self.digests: list[str] = []
        self._chunks = self._generate(parts, part_size)
        self._pending = b""

    def _generate(self, parts: int, part_size: int):
        for n in range(parts):
            yield f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            h = hashlib.sha256()
            block = hashlib.sha256(str(n).encode()).digest() * 2048  # 64 KiB
            left = part_size
            while left:
                piece = block[: min(left, len(block))]
                h.update(piece)
                left -= len(piece)
                yield piece
            self.digests.append(h.hexdigest())
            yield b"\r\n"
        yield f"--{BOUNDARY}--\r\n".encode()

    def read(self, size: int = -1) -> bytes:
        while len(self._pending) < size:
            try:
                self._pending += next(self._chunks)
            except StopIteration:
                break
        out, self._pending = self._pending[:size], self._pending[size:]
        return out


class HashingSink(io.RawIOBase):
    def __init__(self) -> None:
        self.h = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.h.update(data)
        return len(data)


def test_a_series_of_64_mib_passes_with_a_few_mib_of_memory():
    body = GeneratedBody(parts=4, part_size=16 << 20)
    sinks: list[HashingSink] = []

    def open_part(headers):
        sinks.append(HashingSink())
        return sinks[-1]

    tracemalloc.start()
    try:
        assert split_parts(body, BOUNDARY, open_part) == 4
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [s.h.hexdigest() for s in sinks] == body.digests
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("chunk_size", [1, 2, 13, 1 << 10])
def test_parts_come_out_exact_at_any_read_size(chunk_size):
    # An empty part, one holding the start of the delimiter, one ending in CR, a larger one;
    # transport padding after a delimiter, a preamble and an epilogue.
    payloads = [b"", b"--b0undary-Xy", b"ends in CR\r", b"x" * 3000]
    body = b"preamble\r\n" + b"".join(
        f"--{BOUNDARY}  \r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n" for p in payloads
    ) + f"--{BOUNDARY}--\r\nepilogue".encode()
    out: list[io.BytesIO] = []

    def open_part(headers):
        assert headers == {"content-type": "application/dicom"}
        out.append(io.BytesIO())
        return out[-1]

    assert split_parts(io.BytesIO(body), BOUNDARY, open_part, chunk_size=chunk_size) == 4
    assert [o.getvalue() for o in out] == payloads


def test_a_body_without_its_closing_delimiter_is_truncated():
    body = f"--{BOUNDARY}\r\n\r\npart".encode()
    with pytest.raises(MultipartError, match="truncated"):
        split_parts(io.BytesIO(body), BOUNDARY, lambda h: io.BytesIO())
