"""The shard tars: a sink that appends samples to them in order and starts a new one at the sample or byte limit
(`ShardSink`), the loop that feeds it prepared inputs (`write_prepared`: a duplicate KEY or a sidecar that disagrees
with the dataset schema is that input's skip), and the scan that reads a written shard back to verify it
(`scan_shard`: its sha256, its keys and its samples' schema signatures, in one read).

The tars are deterministic: members in sample order, mtime 0, owner 0, mode 0644, GNU format, and KEY.json in one
JSON layout (data_pipeline/writer/prepare.py), so the same samples give the same bytes. A shard is written to
NAME.tar.tmp and renamed when complete, so a partial tar is never visible.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from data_pipeline.clips import MetadataError
from data_pipeline.format import shard_name
from data_pipeline.sidecar import DatasetSchema, load_json, signature
from data_pipeline.writer.sample import Prepared

DEFAULT_SAMPLES_PER_SHARD = 1000


def _tar_add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class _Hashing(io.RawIOBase):
    """A binary file read through, hashing what passes (sha256)."""

    def __init__(self, raw) -> None:
        self.raw, self.hash = raw, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.raw.readinto(buffer)
        if n:
            self.hash.update(memoryview(buffer)[:n])
        return n


def scan_shard(path: Path) -> tuple[str, list[str], list[tuple[dict, str]]] | None:
    """In one read of a shard: (its sha256, its sample keys in member order, (schema signature, key) of each
    KEY.json), or None when it cannot be read to its end."""
    keys: list[str] = []
    signatures = []
    try:
        with path.open("rb", buffering=0) as raw:
            hashing = _Hashing(raw)
            stream = io.BufferedReader(hashing, 1 << 20)
            with tarfile.open(fileobj=stream, mode="r|", encoding="utf-8") as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    if not keys or keys[-1] != key:
                        keys.append(key)
                    if ext == "json" and member.isfile():
                        meta = load_json(tar.extractfile(member).read(), member.name)
                        if not isinstance(meta, dict):
                            return None
                        signatures.append((signature(meta), key))
            while stream.read(1 << 20):  # the end-of-archive padding tarfile leaves unread
                pass
    except (OSError, tarfile.TarError, EOFError, MetadataError):
        return None
    return hashing.hash.hexdigest(), keys, signatures


class ShardSink:
    """Appends samples to shard tars, starting a new one at the sample or byte limit. A shard is written to
    NAME.tar.tmp and renamed when complete; `on_close(shard)` is called after each rename. Each shard dict holds
    name, samples, bytes (the file size once closed), sha256 (of the file), first_key, last_key, and `next`: the
    input position (input index, sample index within that input) of the first sample after the shard. `keys`: the
    sample keys in the shards, in order."""

    def __init__(
        self,
        output: Path,
        samples_per_shard: int | None,
        bytes_per_shard: int | None,
        *,
        job: tuple[int, int] = (0, 1),
        shards: list[dict] | None = None,
        keys: list[str] | None = None,
        on_close: Callable[[dict], None] | None = None,
    ) -> None:
        self.output, self.samples_limit, self.bytes_limit = output, samples_per_shard, bytes_per_shard
        self.job, self.on_close = job, on_close
        self.shards: list[dict] = list(shards or [])  # complete shards kept from an earlier run come first
        self.keys: list[str] = list(keys or [])
        self._tar: tarfile.TarFile | None = None

    def _full(self, incoming: int) -> bool:
        current = self.shards[-1]
        if self.samples_limit is not None and current["samples"] >= self.samples_limit:
            return True
        over_bytes = self.bytes_limit is not None and current["bytes"] + incoming > self.bytes_limit
        return over_bytes and current["samples"] > 0

    def add(self, key: str, entries: list[tuple[str, bytes]], position: tuple[int, int] = (0, 0)) -> None:
        incoming = sum(len(payload) + 1024 for _, payload in entries)  # + tar header and padding, roughly
        if self._tar is None or self._full(incoming):
            self.close(position)
            name = shard_name(len(self.shards), self.job)
            self.shards.append({"name": name, "samples": 0, "bytes": 0, "first_key": key})
            path = self.output / (name + ".tmp")
            self._tar = tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8")  # noqa: SIM115
        for ext, payload in entries:
            _tar_add(self._tar, f"{key}.{ext}", payload)
        self.shards[-1]["samples"] += 1
        self.shards[-1]["bytes"] += incoming
        self.shards[-1]["last_key"] = key
        self.keys.append(key)

    def close(self, position: tuple[int, int] = (0, 0)) -> None:
        """Finish the open shard, if any; `position`: where the input continues after it."""
        if self._tar is None:
            return
        self._tar.close()
        self._tar = None
        shard = self.shards[-1]
        final = self.output / shard["name"]
        Path(str(final) + ".tmp").replace(final)
        shard["bytes"] = final.stat().st_size
        shard["sha256"] = _file_sha256(final)
        shard["next"] = list(position)
        if self.on_close is not None:
            self.on_close(shard)


def index_entry(shard: dict) -> dict:
    """A complete shard's entry in index.json (and in a summary): name, samples, bytes, sha256."""
    return {"name": shard["name"], "samples": shard["samples"], "bytes": shard["bytes"], "sha256": shard["sha256"]}


@dataclass
class WriteSummary:
    """What a write produced: samples written, shard files, and the skipped inputs with the reason for each.
    `kept`: shards kept from an interrupted earlier run; `job`: (index, count) for a job of a --num-jobs run."""

    output: Path
    written: int = 0
    shards: list[dict] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    kept: int = 0
    job: tuple[int, int] | None = None

    def report(self) -> str:
        where = f"{self.output} (job {self.job[0]} of {self.job[1]})" if self.job else str(self.output)
        head = f"{where}: wrote {self.written} samples in {len(self.shards)} shards, skipped {len(self.skipped)}"
        if self.kept:
            head += f" (kept {self.kept} complete shards from an earlier run)"
        lines = [head]
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped]
        # a file name that is not valid UTF-8 (kept by Python as lone surrogates) is printed escaped, not raised on
        return "\n".join(lines).encode("utf-8", "backslashreplace").decode("utf-8")


def check_limits(samples_per_shard: int | None, bytes_per_shard: int | None) -> int | None:
    """The samples-per-shard limit to write with (DEFAULT_SAMPLES_PER_SHARD when neither limit is given); ValueError
    for a limit below 1."""
    if samples_per_shard is None and bytes_per_shard is None:
        samples_per_shard = DEFAULT_SAMPLES_PER_SHARD
    for name, limit in (("samples_per_shard", samples_per_shard), ("bytes_per_shard", bytes_per_shard)):
        if limit is not None and limit < 1:
            raise ValueError(f"{name} must be >= 1, got {limit}")
    return samples_per_shard


def write_prepared(
    items: Iterable[Prepared],
    sink: ShardSink,
    summary: WriteSummary,
    seen: set[str],
    schema: DatasetSchema,
    *,
    start: tuple[int, int] = (0, 0),
    skipped_at: list | None = None,
    bar: tqdm | None = None,
) -> None:
    """Feed prepared inputs (input index from start[0] on) to the sink in order; the first start[1] samples of
    input start[0] are in the shards already. An input whose sidecar disagrees with the dataset `schema` (widths,
    label names) is skipped; the others' samples are added to it. Skips are added to the summary (and to
    `skipped_at` as [input index, source, reason, KEY]); `seen` holds the keys written so far."""
    for position, item in enumerate(items, start=start[0]):
        if bar is not None:
            bar.update(1)
        todo = item.samples[start[1] :] if position == start[0] else item.samples
        duplicate = next((key for key, _ in todo if key in seen), None)
        problem = item.problem
        if duplicate is not None:
            problem = f"duplicate key {duplicate!r} (another input has the same stem)"
        elif problem is None and (mismatch := schema.problem(item.signature)) is not None:
            problem = f"MetadataError: {mismatch}"
        if problem is not None:
            summary.skipped.append((item.source, problem))
            if skipped_at is not None:
                skipped_at.append([position, item.source, problem, item.key])
            continue
        first = start[1] if position == start[0] else 0
        for number, (key, entries) in enumerate(todo, start=first):
            sink.add(key, entries, (position, number))
            schema.add(item.signature, key)
            seen.add(key)
            summary.written += 1
