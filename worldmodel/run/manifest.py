"""Whether a checkpoint directory is complete and intact: its manifest.json and `verify_checkpoint`.

The manifest (`write_manifest`, written last and atomically by checkpoint.save_checkpoint) records the size and
sha256 of every other file of the directory. `verify_checkpoint` checks every file against it (size, then sha256),
so a checkpoint truncated or changed behind our back (a full disk, a lost page cache, a flipped bit) is never loaded.
A checkpoint written before manifests existed (state.json without a "manifest" entry) is accepted with a warning,
verified by the sizes state.json records, as it always was; one whose state.json says it has a manifest but has none
fails verification. `write_synced` and `fsync_dir` are the durable writes both modules of a checkpoint use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")  # what a manifest may name: a file of the directory
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_warned_legacy: set[Path] = set()


class CheckpointError(ValueError):
    """A checkpoint directory fails verification: a file missing, truncated or changed since it was written."""


def write_synced(path: Path, write_fn) -> None:
    """`write_fn(path)`, then fsync the file: on disk before anything that renames it or records its digest."""
    write_fn(path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """fsync a directory, so that the renames and new entries in it are on disk."""
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's content, hex."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(folder: Path) -> None:
    """manifest.json of every other file of `folder`, written last and atomically (a temporary file renamed)."""
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"format": MANIFEST_FORMAT, "algorithm": "sha256", "files": files}
    tmp = folder / f".{MANIFEST}.tmp"
    write_synced(tmp, lambda p: p.write_text(json.dumps(manifest, indent=2)))
    os.replace(tmp, folder / MANIFEST)
    fsync_dir(folder)


def read_manifest(ckpt_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The checkpoint's manifest as {file name: {"bytes": int, "sha256": hex}}; raises CheckpointError when
    manifest.json is unreadable, truncated or malformed (a name that is not a plain file name, a bad digest, ...)."""
    path = Path(ckpt_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{MANIFEST} is unreadable ({err})") from err
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("algorithm") != "sha256":
        raise CheckpointError(f"{MANIFEST} is malformed (no sha256 'files' table)")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(
            f"{MANIFEST} has format {manifest.get('format')!r:.40}; this version reads {MANIFEST_FORMAT}"
        )
    for name, entry in files.items():
        if (
            not _FILE_NAME.match(name)
            or name == MANIFEST
            or not isinstance(entry, dict)
            or type(entry.get("bytes")) is not int
            or not isinstance(entry.get("sha256"), str)
            or not _SHA256.match(entry["sha256"])
        ):
            raise CheckpointError(f"{MANIFEST} is malformed (entry {name!r}: {entry!r:.120})")
    return files


def _read_state(ckpt_dir: Path) -> Any:
    """The checkpoint's state.json as the verifier reads it (checkpoint.read_state is the same read)."""
    return json.loads((ckpt_dir / "state.json").read_text())


def _verify_against_manifest(ckpt_dir: Path) -> str | None:
    try:
        entries = read_manifest(ckpt_dir)
    except CheckpointError as err:
        return str(err)
    for required in ("state.json", "model.safetensors"):
        if required not in entries:
            return f"{MANIFEST} lists no {required}"
    for name, entry in entries.items():  # sizes first: cheap, and they name a truncation as such
        path = ckpt_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, {MANIFEST} records {entry['bytes']}"
    for name, entry in entries.items():
        try:
            digest = file_sha256(ckpt_dir / name)
        except OSError as err:
            return f"{name} is unreadable ({err})"
        if digest != entry["sha256"]:
            return f"{name} does not match its sha256 in {MANIFEST} (its content changed after it was written)"
    try:
        state = _read_state(ckpt_dir)
    except (OSError, ValueError) as err:
        return f"state.json is unreadable ({err})"
    listed = state.get("files", {}) if isinstance(state, dict) else None
    if not isinstance(listed, dict):
        return "state.json is malformed (no 'files' table)"
    missing = sorted(set(listed) - set(entries))
    if missing:
        return f"state.json lists {', '.join(missing)}, which {MANIFEST} does not"
    return None


def _verify_by_sizes(ckpt_dir: Path) -> str | None:
    try:
        state = _read_state(ckpt_dir)
    except (OSError, ValueError) as err:
        return f"state.json is missing or unreadable ({err})"
    if not isinstance(state, dict) or not isinstance(state.get("files", {}), dict):
        return "state.json is malformed (not an object with a 'files' table)"
    if state.get("manifest"):
        return f"{MANIFEST} is missing (state.json says one was written)"
    for name, size in state.get("files", {}).items():
        path = ckpt_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, state.json recorded {size}"
    if "model.safetensors" not in state.get("files", {}):
        return "state.json lists no model.safetensors"
    if ckpt_dir not in _warned_legacy:
        _warned_legacy.add(ckpt_dir)
        log.warning(
            "checkpoint %s has no %s (written before checkpoints had one): verified by file sizes only, not by content",
            ckpt_dir,
            MANIFEST,
        )
    return None


def verify_checkpoint(ckpt_dir: str | Path) -> str | None:
    """None if the checkpoint is complete and intact, else a sentence saying what is wrong with it.

    With a manifest.json: every file it lists exists with its size and sha256, and it lists state.json,
    model.safetensors and every file state.json lists. Without one (a checkpoint older than manifests): the sizes
    state.json records, with a warning; but a state.json that says a manifest was written fails without it.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return f"{ckpt_dir} is not a directory"
    if (ckpt_dir / MANIFEST).exists():
        return _verify_against_manifest(ckpt_dir)
    return _verify_by_sizes(ckpt_dir)
