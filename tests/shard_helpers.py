"""Helpers the pipeline tests share: shard globs, reading a split's samples back, writing a tar by hand, and the
state of a folder tree (to check that a run changed nothing outside its output)."""

from __future__ import annotations

import hashlib
import io
import os
import stat
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


def tree_state(root: Path, *, exclude: tuple[Path, ...] = ()) -> dict[str, tuple]:
    """What is under `root` (without following links), except the paths in `exclude` and below them: {relative
    path: (kind, size, sha256 of a regular file's bytes, link target)}. Compared before and after a run, it shows
    whether anything outside the run's output changed; devices and FIFOs are recorded, never opened."""
    skip = {Path(p).resolve() for p in exclude}
    out: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        if any(path == s or s in path.parents for s in skip):
            continue
        info = path.lstat()
        if stat.S_ISREG(info.st_mode):
            out[str(path.relative_to(root))] = ("file", info.st_size, hashlib.sha256(path.read_bytes()).hexdigest())
        elif stat.S_ISLNK(info.st_mode):
            out[str(path.relative_to(root))] = ("link", os.readlink(path))
        else:
            out[str(path.relative_to(root))] = (stat.S_IFMT(info.st_mode),)
    return out
