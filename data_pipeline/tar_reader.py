"""A streaming reader of the shards' tar format: samples (consecutive members sharing a key) from a byte stream.

The shards are plain tar files (POSIX ustar members, pax extended headers where a name or a size needs them, as
Python's tarfile writes them; GNU long names read too). Python's `tarfile` in stream mode builds a TarInfo object per
member, parses every header field, and reads in 10 KiB blocks, which costs per sample on shards of small videos.
This reader parses only what a sample needs (name, size, type) from headers read with the data in large blocks,
skips what the filter rejects without copying it, and groups members into samples as webdataset's `group_by_keys`
does (key = the name up to the first dot of its last path component).

Errors: a truncated stream, a bad header checksum or size, or a key that repeats a field raise `TarFormatError`
(a ValueError) naming the shard and member; the caller decides whether to count and go on (the pipeline's shard
handler).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import BinaryIO

BLOCK = 512
READ_SIZE = 1 << 20  # bytes per read from the stream (a shard is read in about as many reads as it has MiB)
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext: key, then the field after the dot
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: __*__ entries
_REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file


class TarFormatError(ValueError):
    """The stream is not a readable tar archive (truncated, a bad header) or a sample repeats a field."""


class _Blocks:
    """Reads a binary stream in large chunks and hands out exact byte counts."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.buffer = b""
        self.pos = 0

    def take(self, n: int) -> bytes:
        """Exactly n bytes, or fewer at the end of the stream."""
        end = self.pos + n
        if end <= len(self.buffer):
            out = self.buffer[self.pos : end]
            self.pos = end
            return out
        parts = [self.buffer[self.pos :]]
        have = len(parts[0])
        while have < n:
            chunk = self.stream.read(max(READ_SIZE, n - have))
            if not chunk:
                break
            parts.append(chunk)
            have += len(chunk)
        joined = b"".join(parts)
        self.buffer, self.pos = joined, min(n, len(joined))
        return joined[:n]

    def skip(self, n: int) -> int:
        """Skip n bytes; returns how many were there."""
        left = len(self.buffer) - self.pos
        if n <= left:
            self.pos += n
            return n
        skipped = left
        self.buffer, self.pos = b"", 0
        while skipped < n:
            chunk = self.stream.read(max(READ_SIZE, n - skipped))
            if not chunk:
                return skipped
            if skipped + len(chunk) > n:
                self.buffer, self.pos = chunk, n - skipped
                return n
            skipped += len(chunk)
        return skipped


def _number(field: bytes, what: str) -> int:
    """A header's numeric field: octal digits (NUL/space terminated), or base-256 when the first byte's high bit is
    set (GNU, for sizes of 8 GiB and more)."""
    if field and field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        return -value if field[0] & 0x40 else value
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError(f"bad {what} field {field!r} in a tar header") from None


def _signed_sum(header: bytes) -> int:
    """The header checksum as some old tar writers computed it, over signed bytes (tarfile accepts it too)."""
    signed = [b - 256 if b > 127 else b for b in header]
    return sum(signed[:148]) + 256 + sum(signed[156:])


def _pax(data: bytes) -> dict[str, str]:
    """The records of a pax extended header: 'LENGTH KEY=VALUE\\n' each."""
    out, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarFormatError("bad pax record length in a tar header") from None
        if length <= 0:
            raise TarFormatError("bad pax record length in a tar header")
        record = data[space + 1 : pos + length - 1]
        key, _, value = record.partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def tar_members(stream: BinaryIO, select: Callable[[str], bool] | None = None) -> Iterator[tuple[str, bytes]]:
    """(name, content) of the regular files of the tar archive `stream`, in order, skipping webdataset's __*__
    entries and the names `select` rejects (their content is skipped, not copied). Raises TarFormatError on a
    truncated archive or a corrupt header."""
    blocks = _Blocks(stream)
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = blocks.take(BLOCK)
        if len(header) < BLOCK:
            if not header:
                return  # an archive without its end-of-archive blocks: tarfile reads it too
            raise TarFormatError("the tar archive ends inside a member header (truncated)")
        if header.count(0) == BLOCK:
            return  # end-of-archive marker
        checksum = _number(header[148:156], "checksum")
        if checksum != sum(header[:148]) + 256 + sum(header[156:]) and checksum != _signed_sum(header):
            raise TarFormatError("a tar header's checksum does not match (corrupt or not a tar archive)")
        size = _number(header[124:136], "size")
        kind = header[156:157]
        if "size" in pax:
            try:
                size = int(pax["size"])
            except ValueError:
                raise TarFormatError(f"bad pax size {pax['size']!r}") from None
        if size < 0:
            raise TarFormatError(f"negative member size {size} in a tar header")
        padded = size + (-size) % BLOCK
        if kind in (b"x", b"L"):  # extended header / GNU long name for the next member
            data = blocks.take(padded)
            if len(data) < padded:
                raise TarFormatError("the tar archive ends inside an extended header (truncated)")
            if kind == b"x":
                pax = _pax(data[:size])
            else:
                long_name = data[:size].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        if long_name is not None:
            name = long_name
        elif "path" in pax:
            name = pax["path"]
        else:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if header[257:262] == b"ustar" and header[345] != 0:
                prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                name = f"{prefix}/{name}"
        long_name, pax = None, {}
        wanted = kind in _REGULAR and not _META.match(name) and (select is None or select(name))
        if not wanted:
            if blocks.skip(padded) < padded:
                raise TarFormatError(f"the tar archive ends inside member {name!r} (truncated)")
            continue
        data = blocks.take(padded)
        if len(data) < padded:
            raise TarFormatError(f"the tar archive ends inside member {name!r} (truncated)")
        yield name, data[:size] if padded != size else data


def tar_samples(
    stream: BinaryIO, url: str, select: Callable[[str], bool] | None = None
) -> Iterator[dict[str, str | bytes]]:
    """Samples of the tar archive `stream` (shard `url`): {"__key__": KEY, "__url__": url, FIELD: bytes, ...} for
    each run of consecutive members named KEY.FIELD, as webdataset's tarfile_to_samples gives them (field names
    lower-cased). A name without a dot is skipped. Raises TarFormatError (see `tar_members`, and on a field repeated
    within one sample)."""
    current: dict[str, str | bytes] | None = None
    for name, data in tar_members(stream, select):
        match = _KEY.match(name)
        if match is None:
            continue
        key, field = match.group(1), match.group(2).lower()
        if current is None or current["__key__"] != key:
            if current is not None:
                yield current
            current = {"__key__": key, "__url__": url}
        if field in current:
            raise TarFormatError(f"{url}: member {name!r} repeats field {field!r} of sample {key!r}")
        current[field] = data
    if current is not None:
        yield current
