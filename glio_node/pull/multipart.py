"""A streaming reader of ``multipart/related`` bodies (RFC 2046 5.1, as WADO-RS sends them).

A whole-slide series is gigabytes; :func:`split_parts` reads the body in 1 MiB chunks and writes
each part's bytes to a file the caller opens, so at most a chunk plus a delimiter is in memory.
The standard library's ``email`` parser would hold the whole body, and the maintained streaming
parsers (``multipart``, ``python-multipart``) are written for ``multipart/form-data`` uploads;
the grammar WADO-RS needs is small enough to parse here, against a real Orthanc in the tests.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from email.message import Message
from typing import BinaryIO, Protocol

from glio_node.errors import GlioError

CHUNK = 1 << 20
MAX_HEADER_BYTES = 16 << 10  # a part's header section; more is not a WADO-RS response


class MultipartError(GlioError):
    """The body is not the ``multipart/related`` the Content-Type announced (or is truncated)."""


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


def boundary_of(content_type: str) -> str:
    """The ``boundary`` parameter of a ``multipart/related`` Content-Type; ``MultipartError``
    if the type is another or has no boundary."""
    message = Message()
    message["Content-Type"] = content_type
    if message.get_content_type() != "multipart/related":
        raise MultipartError(f"Content-Type {content_type[:100]!r} is not multipart/related")
    boundary = message.get_param("boundary")
    if not isinstance(boundary, str) or not 1 <= len(boundary) <= 70:
        raise MultipartError(f"Content-Type {content_type[:100]!r} has no valid boundary")
    return boundary


def split_parts(
    stream: Readable,
    boundary: str,
    open_part: Callable[[dict[str, str]], BinaryIO],
    *,
    chunk_size: int = CHUNK,
) -> int:
    """Write every part of the body read from ``stream`` to a file from ``open_part``.

    ``open_part(headers)`` gets the part's headers (lower-case names) and returns a writable
    binary file; it is closed by the caller's context, not here: the reader only writes.
    ``chunk_size``: bytes per read.  Returns the number of parts.  Raises :class:`MultipartError` when no delimiter is found,
    a header section is malformed, or the body ends before the closing delimiter (truncated);
    the parts written until then are complete up to the last byte received.
    """
    delimiter = b"\r\n--" + boundary.encode("ascii")
    # The first delimiter may start the body (no CRLF before it): pretend there was one.
    buffer = b"\r\n"
    eof = False

    def fill() -> bool:
        nonlocal buffer, eof
        if eof:
            return False
        chunk = stream.read(chunk_size)
        if not chunk:
            eof = True
            return False
        buffer += chunk
        return True

    # Preamble: skip to the first delimiter.
    while (at := buffer.find(delimiter)) < 0:
        if len(buffer) > MAX_HEADER_BYTES:
            raise MultipartError("no multipart delimiter in the first bytes of the body")
        if not fill():
            raise MultipartError("the body holds no multipart delimiter")
    buffer = buffer[at + len(delimiter) :]
    parts = 0
    while True:
        # After a delimiter: "--" closes the body; else optional padding, CRLF, headers.
        while len(buffer) < 2 and fill():
            pass
        if buffer.startswith(b"--"):
            return parts
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            if len(buffer) > MAX_HEADER_BYTES:
                raise MultipartError(f"part {parts + 1}: header section longer than {MAX_HEADER_BYTES} bytes")
            if not fill():
                raise MultipartError(f"part {parts + 1}: the body ends inside its headers (truncated)")
        headers = _parse_headers(buffer[:end], parts + 1)
        buffer = buffer[end + 4 :]
        sink = open_part(headers)
        parts += 1
        keep = len(delimiter) - 1  # bytes that might be the start of a split delimiter
        while (at := buffer.find(delimiter)) < 0:
            if len(buffer) > keep:
                sink.write(buffer[:-keep])
                buffer = buffer[-keep:]
            if not fill():
                raise MultipartError(f"part {parts}: the body ends before its delimiter (truncated)")
        sink.write(buffer[:at])
        buffer = buffer[at + len(delimiter) :]


_HEADER = re.compile(rb"([!-9;-~]+):[ \t]*(.*?)[ \t]*")


def _parse_headers(block: bytes, number: int) -> dict[str, str]:
    lines = block.split(b"\r\n")
    # The delimiter line's rest: transport padding (spaces) before its CRLF.
    if lines[0].strip(b" \t"):
        raise MultipartError(f"part {number}: unexpected bytes after the delimiter")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        match = _HEADER.fullmatch(line)
        if match is None:
            raise MultipartError(f"part {number}: malformed header line")
        headers[match.group(1).decode("ascii").lower()] = match.group(2).decode("latin-1")
    return headers
