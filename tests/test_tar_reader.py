"""data_pipeline.tar_reader: the same samples as webdataset's tarfile_to_samples on every tar flavour Python writes,
and a clear TarFormatError on damage."""

from __future__ import annotations

import io
import tarfile

import pytest
import webdataset as wds

from data_pipeline.tar_reader import READ_SIZE, TarFormatError, _number, tar_members, tar_samples


def _archive(members: list[tuple[str, bytes]], fmt: int = tarfile.PAX_FORMAT, directory: str | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        if directory is not None:
            info = tarfile.TarInfo(directory)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _webdataset(raw: bytes, url: str = "mem") -> list[dict]:
    files = wds.tariterators.tar_file_expander([{"url": url, "stream": io.BytesIO(raw)}])
    return list(wds.tariterators.group_by_keys(files))


MEMBERS = [
    ("a.mp4", b"\x00" * 700),
    ("a.json", b'{"num_frames": 3}'),
    ("b.MP4", b"v" * 512),  # a block-sized member, an upper-case field
    ("b.json", b"{}"),
    ("d" * 150 + ".json", b"long"),  # a name over ustar's 100 bytes: pax path or GNU long name
    ("dir/" + "é" * 60 + "/x.webm", b"x" * 5),  # a prefix, non-ASCII
    ("__meta__", b"skipped"),
    ("noext", b"skipped"),
    ("c.json", b""),  # empty member
]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_same_samples_as_webdataset(fmt: int) -> None:
    members = [(n, d) for n, d in MEMBERS if fmt != tarfile.USTAR_FORMAT or len(n.encode()) <= 100]
    raw = _archive(members, fmt, directory="dir/")
    ours = list(tar_samples(io.BytesIO(raw), "mem"))
    assert ours == _webdataset(raw)
    assert [s["__key__"] for s in ours][:2] == ["a", "b"] and ours[1]["mp4"] == b"v" * 512


def test_samples_larger_than_a_read_and_a_filter() -> None:
    big = bytes(range(256)) * (READ_SIZE // 256 + 3)  # spans reads
    raw = _archive([("k.mp4", big), ("k.json", b"{}"), ("k.npy", big), ("m.json", b"[]")])
    ours = list(tar_samples(io.BytesIO(raw), "u", select=lambda name: not name.endswith(".npy")))
    assert ours == [
        {"__key__": "k", "__url__": "u", "mp4": big, "json": b"{}"},
        {"__key__": "m", "__url__": "u", "json": b"[]"},
    ]


def test_truncated_archive_raises_after_the_whole_samples() -> None:
    raw = _archive(MEMBERS[:4])
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        second, last = tar.getmembers()[1::2]
    # inside the first data, the second member's header, the last member's data
    for cut in (600, second.offset + 100, last.offset_data + 10):
        got, error = [], None
        try:
            for sample in tar_samples(io.BytesIO(raw[:cut]), "u"):
                got.append(sample)
        except TarFormatError as exc:
            error = str(exc)
        assert error is not None and "truncated" in error, cut
        assert all(s["__key__"] == "a" for s in got)


def test_corrupt_header_and_repeated_field_raise() -> None:
    raw = bytearray(_archive(MEMBERS[:2]))
    raw[10] ^= 0xFF  # inside the first header's name: the checksum no longer matches
    with pytest.raises(TarFormatError, match="checksum"):
        list(tar_members(io.BytesIO(bytes(raw))))
    with pytest.raises(TarFormatError, match="repeats field"):
        list(tar_samples(io.BytesIO(_archive([("a.json", b"1"), ("a.json", b"2")])), "u"))
    with pytest.raises(TarFormatError, match="checksum"):
        list(tar_members(io.BytesIO(b"not a tar archive at all" * 40)))


def test_numbers_octal_and_base256() -> None:
    assert _number(b"00000001750\0", "size") == 1000
    assert _number(b"\x80" + (9 * 2**30).to_bytes(11, "big"), "size") == 9 * 2**30
    with pytest.raises(TarFormatError, match="size"):
        _number(b"12x4\0", "size")


def test_a_checksum_over_signed_bytes_is_accepted() -> None:
    """Some old writers summed the header as signed bytes; tarfile accepts that, so does the reader."""
    raw = bytearray(_archive([("é" * 20 + ".json", b"{}")], tarfile.USTAR_FORMAT))
    header = bytes(raw[:148]) + b" " * 8 + bytes(raw[156:512])
    signed = sum(b - 256 if b > 127 else b for b in header)
    raw[148:156] = f"{signed:06o}\0 ".encode()
    assert [name for name, _ in tar_members(io.BytesIO(bytes(raw)))] == ["é" * 20 + ".json"]
