"""What `write_shards` reads: a folder of videos (recursive), or a list of paths or URLs, each with an optional sidecar.

Three kinds of `--input`, all listed in a fixed, sorted order (the order of the shards):

- a **folder**: every file below it (recursively, symbolic links to folders not followed) whose extension is one of
  `VIDEO_EXTENSIONS`, sorted by its path relative to the folder; the sidecar is `NAME.json` next to the video when it
  exists. KEY is that relative path without its extension, with anything but `[A-Za-z0-9_-]` made `_`
  (`walking/clip.v2.mp4` -> `walking_clip_v2`; a file directly in the folder keeps its stem, as before).
- a **text list** (any file not ending in `.csv`): one video per line, a path or an `http(s)://` or `file://` URL,
  optionally followed by a TAB and its sidecar (a path or URL); blank lines and lines starting with `#` are ignored.
- a **CSV list** (`.csv`, with a header row): the video in a column named `path`, `url` or `video` (the first of these
  the header has), the sidecar in an optional `sidecar` column, the sample KEY in an optional `key` column.

In a list, relative paths are relative to the list file's folder; entries are sorted by the video as written; KEY is
the `key` column, else the file name (of the path, or of the URL's path) without its extension, sanitised the same
way. A local video in a list without a sidecar column uses `NAME.json` next to it when it exists; a URL has a sidecar
only when one is listed. Other URL schemes (`s3://`, `gs://`) are refused when the list is read: list presigned
`https://` URLs or paths on a mounted filesystem instead.
"""

from __future__ import annotations

import csv
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

VIDEO_EXTENSIONS = ("mp4", "webm", "avi", "mkv", "mov", "m4v", "mpg", "mpeg", "ogv")
URL_SCHEMES = ("http", "https", "file")
CSV_VIDEO_COLUMNS = ("path", "url", "video")
FETCH_ATTEMPTS = 3  # tries per URL (1 s, then 2 s apart) before the input is skipped with the error
FETCH_TIMEOUT_S = 60.0


def sanitise_key(name: str) -> str:
    """A webdataset key from a file stem: dots would split the key, so anything but [A-Za-z0-9_-] becomes '_'."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


@dataclass(frozen=True)
class InputVideo:
    """One listed video: `source` as listed (for messages and the input fingerprint), `location` (an absolute path or
    a URL), its sample `key`, its container extension `ext` (lower case, no dot), and `sidecar` (a path or URL given
    explicitly, or None: NAME.json next to a local video, if it exists)."""

    source: str
    location: str
    key: str
    ext: str
    sidecar: str | None = None

    @property
    def is_url(self) -> bool:
        return is_url(self.location)


def is_url(text: str) -> bool:
    """True for `scheme://...` (any scheme: unsupported ones are refused by `check_location`)."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text) is not None


def check_location(text: str, where: str) -> None:
    """Refuse a URL whose scheme the writer cannot read, saying what to list instead."""
    if is_url(text):
        scheme = text.split("://", 1)[0].lower()
        if scheme not in URL_SCHEMES:
            raise ValueError(
                f"{where}: {text!r} uses the scheme {scheme}://, which the writer does not read (it reads "
                f"{', '.join(s + '://' for s in URL_SCHEMES)} and paths); list presigned https:// URLs, or paths on "
                "a mounted filesystem (s3fs, gcsfuse, ...)"
            )


def _name_and_ext(location: str) -> tuple[str, str]:
    """(file name without its extension, extension lower case without the dot) of a path or URL."""
    path = urllib.parse.urlparse(location).path if is_url(location) else location
    name = urllib.parse.unquote(path.rstrip("/").rsplit("/", 1)[-1])
    stem, dot, ext = name.rpartition(".")
    return (stem, ext.lower()) if dot and stem else (name, "")


def list_folder(root: str | Path) -> list[InputVideo]:
    """The videos below folder `root` (recursively), sorted by relative path; see the module docstring."""
    root = Path(root)
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in files:
            ext = name.rpartition(".")[2].lower() if "." in name else ""
            if ext in VIDEO_EXTENSIONS:
                path = Path(folder) / name
                relative = path.relative_to(root).as_posix()
                found.append(InputVideo(relative, os.path.abspath(path), sanitise_key(relative[: -len(ext) - 1]), ext))
    return sorted(found, key=lambda v: v.source)


def _list_entry(video: str, sidecar: str | None, key: str | None, base: Path, where: str) -> InputVideo:
    check_location(video, where)
    if sidecar:
        check_location(sidecar, where)
    stem, ext = _name_and_ext(video)
    location = video if is_url(video) else os.path.abspath(base / video)
    if sidecar and not is_url(sidecar):
        sidecar = os.path.abspath(base / sidecar)
    return InputVideo(video, location, sanitise_key(key or stem), ext, sidecar or None)


def list_file(path: str | Path) -> list[InputVideo]:
    """The videos of a text or CSV list (see the module docstring), sorted by the video as written."""
    path = Path(path)
    base = Path(os.path.abspath(path)).parent
    entries = []
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            header = [h.strip() for h in (reader.fieldnames or [])]
            column = next((c for c in CSV_VIDEO_COLUMNS if c in header), None)
            if column is None:
                raise ValueError(
                    f"--input {path}: the CSV needs a header row with a column named {' or '.join(CSV_VIDEO_COLUMNS)} "
                    f"for the videos (found columns: {header or 'none'})"
                )
            for line, row in enumerate(reader, start=2):
                row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
                if not row.get(column):
                    raise ValueError(f"--input {path}, line {line}: the {column!r} column is empty")
                where = f"--input {path}, line {line}"
                entries.append(_list_entry(row[column], row.get("sidecar"), row.get("key"), base, where))
    else:
        for line, text in enumerate(path.read_text().splitlines(), start=1):
            text = text.strip()
            if not text or text.startswith("#"):
                continue
            video, _, sidecar = (part.strip() for part in text.partition("\t"))
            entries.append(_list_entry(video, sidecar, None, base, f"--input {path}, line {line}"))
    return sorted(entries, key=lambda v: v.source)


def list_inputs(source: str | Path) -> list[InputVideo]:
    """The videos of `--input`: a folder (recursive) or a text/CSV list, sorted (see the module docstring)."""
    path = Path(source)
    if path.is_dir():
        videos = list_folder(path)
        if not videos:
            raise FileNotFoundError(f"--input {path} holds no videos (looked for extensions {VIDEO_EXTENSIONS})")
        return videos
    if path.is_file():
        videos = list_file(path)
        if not videos:
            raise FileNotFoundError(f"--input {path} lists no videos (one path or URL per line, or a CSV)")
        return videos
    raise FileNotFoundError(
        f"--input {path} is not a directory or a list file: give a folder of videos, a text file with one path or "
        "URL per line, or a CSV with a path/url column"
    )


def fetch(location: str) -> bytes:
    """The bytes of a local path or an http(s)/file URL (a URL is tried `FETCH_ATTEMPTS` times). Raises OSError."""
    if not is_url(location):
        return Path(location).read_bytes()
    for attempt in range(FETCH_ATTEMPTS):
        try:
            with urllib.request.urlopen(location, timeout=FETCH_TIMEOUT_S) as response:  # noqa: S310 (schemes checked)
                return response.read()
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or attempt == FETCH_ATTEMPTS - 1:  # a 4xx will not change: give up at once
                raise OSError(f"cannot read {location}: HTTP {exc.code} {exc.reason}") from exc
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            if attempt == FETCH_ATTEMPTS - 1:
                raise OSError(f"cannot read {location}: {exc}") from exc
        time.sleep(2**attempt)
    raise AssertionError("unreachable")


def read_sidecar(video: InputVideo) -> tuple[dict, str | None]:
    """(sidecar dict, None), or ({}, the reason it cannot be used). No sidecar listed and no NAME.json next to a
    local video: ({}, None)."""
    location = video.sidecar
    if location is None:
        if video.is_url:
            return {}, None
        implicit = Path(video.location).with_suffix(".json")
        if not implicit.exists():
            return {}, None
        location = str(implicit)
    name = _name_and_ext(location)[0] + ".json" if video.sidecar is None else location
    try:
        text = fetch(location).decode()
    except (OSError, UnicodeDecodeError) as exc:
        return {}, f"sidecar {name} cannot be read: {exc}"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return {}, f"sidecar {name} is not valid JSON: {exc}"
