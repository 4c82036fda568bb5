"""The b0 v2 message envelope: one ZMQ frame, HTTP-like headers, then parts.

`encode` writes byte for byte what the C++ serializer writes (spec 2.1);
`decode` is more tolerant than C++ where that is safe and raises a typed
MessageError for everything it cannot accept (spec 2.2, 2.4).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field

from b0_pm.b0.errors import (
    CompressionError,
    EnvelopeDecodeError,
    MessageTooLargeError,
)

DEFAULT_MAX_SIZE = 1024 * 1024

ALGORITHMS = ("zlib", "lz4")

_LEVEL = re.compile(r"-?[0-9]{1,9}")


@dataclass(frozen=True)
class Part:
    """One part: its payload as the application sees it (decompressed)."""

    payload: bytes
    content_type: str = ""
    compression: str = ""
    level: int = -1


@dataclass
class Envelope:
    header0: str
    parts: list[Part]
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def payload(self) -> bytes:
        return self.parts[0].payload

    @property
    def content_type(self) -> str:
        return self.parts[0].content_type


def encode(header0: str, payload: bytes, content_type: str = "",
           *, compression: str = "", level: int = -1) -> bytes:
    """One-part envelope, as every standard b0 socket sends it."""
    return encode_parts(header0, [Part(payload, content_type, compression, level)])


def encode_parts(header0: str, parts: list[Part], headers: dict[str, str] | None = None) -> bytes:
    """Any envelope, extra headers included (written sorted, like a std::map)."""
    if not parts:
        raise ValueError("an envelope needs at least one part")
    _check_header_text("header0", header0)
    lines = [header0, f"Part-count: {len(parts)}"]
    wire_payloads = []
    for i, part in enumerate(parts):
        data = _compress(part.compression, part.payload, part.level) if part.compression else part.payload
        wire_payloads.append(data)
        lines.append(f"Content-length-{i}: {len(data)}")
        if part.content_type:
            _check_header_text("content type", part.content_type)
            lines.append(f"Content-type-{i}: {part.content_type}")
        if part.compression:
            lines.append(f"Compression-algorithm-{i}: {part.compression}")
            lines.append(f"Uncompressed-content-length-{i}: {len(part.payload)}")
            if part.level > 0:
                lines.append(f"Compression-level-{i}: {part.level}")
    lines.append(f"Content-length: {sum(len(d) for d in wire_payloads)}")
    for key in sorted(headers or {}):
        _check_header_text("header key", key)
        _check_header_text("header value", headers[key])
        lines.append(f"{key}: {headers[key]}")
    head = ("\n".join(lines) + "\n\n").encode("utf-8")
    return head + b"".join(wire_payloads)


def decode(frame: bytes, *, max_size: int | None = None) -> Envelope:
    """Parse one frame. max_size bounds the frame and every decompressed part."""
    limit = DEFAULT_MAX_SIZE if max_size is None else max_size
    if len(frame) > limit:
        raise MessageTooLargeError(f"message of {len(frame)} bytes exceeds the limit of {limit} bytes")
    end = frame.find(b"\n\n")
    if end < 0:
        raise EnvelopeDecodeError("no blank line ends the header block")
    try:
        lines = frame[:end].decode("utf-8").split("\n")
    except UnicodeDecodeError as exc:
        raise EnvelopeDecodeError(f"header block is not valid UTF-8 (byte offset {exc.start})") from exc
    body = memoryview(frame)[end + 2:]
    header0 = lines[0]
    headers: dict[str, str] = {}
    for number, line in enumerate(lines[1:], start=2):
        key, sep, value = line.partition(": ")
        if not sep:
            raise EnvelopeDecodeError(f"header line {number} has no ': ' separator: {line[:60]!r}")
        headers[key] = value
    count = _number(headers, "Part-count")
    if count == 0:
        raise EnvelopeDecodeError("Part-count is 0: an envelope holds at least one part")
    if count > len(lines):
        raise EnvelopeDecodeError(f"Part-count {count} exceeds the number of header lines")
    parts = []
    offset = 0
    for i in range(count):
        length = _number(headers, f"Content-length-{i}")
        if offset + length > len(body):
            raise EnvelopeDecodeError(
                f"part {i} declares {length} bytes but only {len(body) - offset} remain")
        data = bytes(body[offset:offset + length])
        offset += length
        content_type = headers.pop(f"Content-type-{i}", "")
        algorithm = headers.pop(f"Compression-algorithm-{i}", "")
        level_text = headers.pop(f"Compression-level-{i}", "")
        level = int(level_text) if _LEVEL.fullmatch(level_text) else -1
        if algorithm:
            size = _number(headers, f"Uncompressed-content-length-{i}")
            if size > limit:
                raise MessageTooLargeError(
                    f"part {i} would decompress to {size} bytes, over the limit of {limit} bytes")
            data = _decompress(algorithm, data, size, i)
        else:
            headers.pop(f"Uncompressed-content-length-{i}", None)
        parts.append(Part(data, content_type, algorithm, level))
    headers.pop("Content-length", None)  # never checked, as in C++; encode writes it anew
    return Envelope(header0, parts, headers)


def _check_header_text(what: str, text: str) -> None:
    # A newline would end the header line early and corrupt the envelope.
    if "\n" in text:
        raise ValueError(f"{what} must not contain a newline: {text!r}")


def _number(headers: dict[str, str], key: str) -> int:
    text = headers.pop(key, None)
    if text is None:
        raise EnvelopeDecodeError(f"required header {key} is missing")
    if not (text.isascii() and text.isdigit()):
        raise EnvelopeDecodeError(f"header {key} is not a decimal number: {text[:40]!r}")
    if len(text) > 18:
        raise EnvelopeDecodeError(f"header {key} is absurdly large: {text[:40]!r}")
    return int(text)


def _compress(algorithm: str, data: bytes, level: int) -> bytes:
    if algorithm == "zlib":
        # C++ maps the default level -1 to 9 (best compression).
        return zlib.compress(data, 9 if level < 0 else level)
    if algorithm == "lz4":
        return _lz4_block().compress(data, store_size=False)
    raise ValueError(f"unsupported compression algorithm: {algorithm!r} (use zlib or lz4)")


def _decompress(algorithm: str, data: bytes, size: int, index: int) -> bytes:
    if algorithm == "zlib":
        inflater = zlib.decompressobj()
        try:
            # max_length caps the output, so a zip bomb stops at the declared size + 1.
            out = inflater.decompress(data, size + 1)
        except zlib.error as exc:
            raise CompressionError(f"part {index}: zlib data is corrupt: {exc}") from exc
    elif algorithm == "lz4":
        block = _lz4_block()
        try:
            out = block.decompress(data, uncompressed_size=size)
        except block.LZ4BlockError as exc:
            raise CompressionError(f"part {index}: lz4 data is corrupt: {exc}") from exc
    else:
        raise CompressionError(f"Unsupported compression algorithm: {algorithm[:40]}")
    if len(out) != size:
        raise CompressionError(
            f"part {index} decompressed to {len(out)} bytes, not the declared {size}")
    return out


def _lz4_block():
    try:
        import lz4.block
    except ImportError as exc:
        raise CompressionError(
            "lz4 compression needs the Python package 'lz4' (pip install lz4 / apt install python3-lz4)"
        ) from exc
    return lz4.block
