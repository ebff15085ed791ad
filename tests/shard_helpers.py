"""Helpers the pipeline tests share: shard globs, reading a split's samples back, writing a tar by hand."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path


def train_glob(digits_shards: Path) -> str:
    """The training shards of the session's moving-digits fixture, as a glob."""
    return str(digits_shards / "train" / "shard-*.tar")


def read_samples(digits_shards: Path, split: str = "train") -> dict[str, dict[str, bytes]]:
    """{key: {"mp4": bytes, "json": bytes}} of every sample of a split."""
    out: dict[str, dict[str, bytes]] = {}
    for shard in sorted((digits_shards / split).glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return out


def write_tar(path: Path, entries: list[tuple[str, bytes]]) -> Path:
    """A tar at `path` holding `entries` ((member name, bytes)) in that order."""
    with tarfile.open(path, "w") as tar:
        for name, payload in entries:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path
