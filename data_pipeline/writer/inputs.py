"""What `write_shards` reads: a folder of videos (recursive), or a list of paths or URLs, each with an optional sidecar.

Three kinds of `--input`, all listed in a fixed, sorted order (the order of the shards):

- a **folder**: every file below it (recursively, symbolic links to folders not followed) whose extension is one of
  `VIDEO_EXTENSIONS`, sorted by its path relative to the folder; the sidecar is `NAME.json` next to the video when it
  exists. KEY is that relative path without its extension, with what a tar member name or a shell cannot hold made
  `_` (`walking/clip.v2.mp4` -> `walking_clip_v2`; a file directly in the folder keeps its stem, as before). Letters,
  marks and digits of any script are kept (`café/día 1.mp4` -> `café_día_1`; NFC-normalised, so a name written
  decomposed, as macOS does, gives the same KEY): only `/`, dots (which would split a webdataset key), whitespace,
  control characters and punctuation other than `-` and `_` become `_`.
- a **text list** (any file not ending in `.csv`): one video per line, a path or an `http(s)://` or `file://` URL,
  optionally followed by a TAB and its sidecar (a path or URL); blank lines and lines starting with `#` are ignored.
- a **CSV list** (`.csv`, with a header row): the video in a column named `path`, `url` or `video` (the first of these
  the header has), the sidecar in an optional `sidecar` column, the sample KEY in an optional `key` column.

In a list, relative paths are relative to the list file's folder; entries are sorted by the video as written; KEY is
the `key` column, else the file name (of the path, or of the URL's path) without its extension, sanitised the same
way. A local video in a list without a sidecar column uses `NAME.json` next to it when it exists; a URL has a sidecar
only when one is listed. Other URL schemes (`s3://`, `gs://`) are refused when the list is read: list presigned
`https://` URLs or paths on a mounted filesystem instead.

**Reading an input** (`fetch`) never stops the write: whatever goes wrong is an OSError naming the input, which the
writer reports as that input's skip. Local files (and `file://` URLs) must be regular files, checked with os.stat
before they are opened (a device such as /dev/zero, a FIFO or a socket would be read for ever or hang) and again on
the open file. http(s) downloads are tried `FETCH_ATTEMPTS` times on transient errors (connection errors, timeouts,
HTTP 408/425/429/5xx, a body shorter than its Content-Length), `FETCH_BACKOFF_S` x 1, 2, ... seconds apart, within
one deadline per input (`--fetch-deadline`, default `FETCH_DEADLINE_S`), with a timeout per socket operation; an
input over the size cap (`--max-input-bytes`, default `MAX_INPUT_BYTES`; a sidecar: `MAX_SIDECAR_BYTES`) is refused
from its Content-Length or as soon as more bytes arrive. A redirect is followed only to http(s) (the allow-list is
checked again on every hop: no ftp://, no file://). A URL holding a space or a control character is refused
(percent-encode it).

**The input fingerprint** (`input_digest`, recorded in each job file): the sha256 of the whole sorted list, per
video its source, KEY, location and sidecar, and for local files the size and modification time (ns) of the video
and of its sidecar (the listed one, or NAME.json next to the video: one added later changes the fingerprint). URLs
count as written: a file replaced behind the same URL is not seen.
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import os
import re
import stat
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.clips import MetadataError
from data_pipeline.format import VIDEO_EXTENSIONS
from data_pipeline.sidecar import MAX_SIDECAR_BYTES, load_json

URL_SCHEMES = ("http", "https", "file")
CSV_VIDEO_COLUMNS = ("path", "url", "video")
FETCH_ATTEMPTS = 3  # tries per URL before the input is skipped with the error
FETCH_BACKOFF_S = 1.0  # the wait before try k + 1 is FETCH_BACKOFF_S * 2**(k - 1)
FETCH_TIMEOUT_S = 60.0  # per socket operation (connect, each read)
FETCH_DEADLINE_S = 900.0  # per input, all tries together (--fetch-deadline)
MAX_INPUT_BYTES = 16 * 2**30  # a video is held in memory while it is checked (--max-input-bytes)
REDIRECT_SCHEMES = ("http", "https")


class FetchError(OSError):
    """An input cannot be read; the message says why and names it (the writer skips the input with it)."""


def sanitise_key(name: str) -> str:
    """A webdataset key from a file stem, Unicode kept: NFC-normalised; letters, marks and digits of any script, `-`
    and `_` stay; everything else (dots, which would split the key, `/`, whitespace, control characters, other
    punctuation and symbols, which a shell or a tar member name cannot hold safely) becomes `_`."""
    name = unicodedata.normalize("NFC", name)
    return "".join(c if c in "-_" or unicodedata.category(c)[0] in "LMN" else "_" for c in name)


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


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket")):  # fmt: skip
        if test(mode):
            return name
    return "special file"


def check_regular(path: str, max_bytes: int = MAX_INPUT_BYTES) -> os.stat_result:
    """os.stat of a local input, before anything opens it: FetchError unless it is a regular file (symbolic links
    followed) of at most `max_bytes`."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise FetchError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise FetchError(
            f"{path} is not a regular file (it is a {_kind(info.st_mode)}): list regular files only (a device "
            "would be read for ever, a FIFO would hang)"
        )
    if info.st_size > max_bytes:
        raise FetchError(f"{path} is {info.st_size} bytes, over the input size cap of {max_bytes} (--max-input-bytes)")
    return info


def _local_path(location: str) -> str:
    """The path of a local location: a path as is, a file:// URL decoded."""
    if not is_url(location):
        return location
    parts = urllib.parse.urlsplit(location)
    if parts.netloc not in ("", "localhost"):
        raise FetchError(f"cannot read {location}: a file:// URL names a file on this machine (file:///path)")
    return urllib.request.url2pathname(parts.path)


def _read_local(path: str, max_bytes: int) -> bytes:
    check_regular(path, max_bytes)
    try:
        # O_NONBLOCK: should the path have become a FIFO since the stat, the open does not wait for a writer
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise FetchError(f"{path} is not a regular file any more: list regular files only")
            data = handle.read(max_bytes + 1)
    except FetchError:
        raise
    except OSError as exc:
        raise FetchError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(data) > max_bytes:
        raise FetchError(f"{path} is over the input size cap of {max_bytes} bytes (--max-input-bytes)")
    return data


class _Transient(Exception):
    """A download failure that another try may not have (the message says what happened)."""


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to an http(s) URL: the scheme allow-list is checked on every hop."""

    max_redirections = 5

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102 (urllib's hook)
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in REDIRECT_SCHEMES:
            fp.close()
            raise FetchError(
                f"cannot read {req.full_url}: it redirects (HTTP {code}) to {newurl!r}, and a redirect is followed "
                f"only to {' or '.join(s + '://' for s in REDIRECT_SCHEMES)}"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_CheckedRedirects)


def _download(url: str, max_bytes: int, deadline: float, deadline_s: float) -> bytes:
    """One try at `url`; _Transient for what a retry may fix, FetchError for what it will not."""
    timeout = max(0.01, min(FETCH_TIMEOUT_S, deadline - time.monotonic()))
    try:
        response = _OPENER.open(url, timeout=timeout)  # noqa: S310 (http(s) only: checked by the caller, redirects too)
    except FetchError:
        raise
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code in (408, 425, 429) or exc.code >= 500:
            raise _Transient(f"HTTP {exc.code} {exc.reason}") from exc
        raise FetchError(f"cannot read {url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise _Transient(str(getattr(exc, "reason", None) or exc)) from exc
    except ValueError as exc:  # http.client.InvalidURL and the like: the URL itself is wrong
        raise FetchError(f"cannot read {url}: {exc}") from exc
    with response:
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.strip().isdigit() else None
        if expected is not None and expected > max_bytes:
            raise FetchError(f"{url} is {expected} bytes, over the input size cap of {max_bytes} (--max-input-bytes)")
        chunks, total = [], 0
        while True:
            if time.monotonic() > deadline:
                raise FetchError(
                    f"cannot read {url}: not complete within the deadline of {deadline_s:g} s (--fetch-deadline); "
                    f"{total} bytes arrived"
                )
            try:
                chunk = response.read1(1 << 20)
            except (http.client.HTTPException, OSError) as exc:
                raise _Transient(f"the transfer broke after {total} bytes: {exc!r}") from exc
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:
                raise FetchError(f"{url} sent more than the input size cap of {max_bytes} bytes (--max-input-bytes)")
            chunks.append(chunk)
    if expected is not None and total != expected:
        raise _Transient(f"the server sent {total} of the {expected} bytes it announced")
    return b"".join(chunks)


def fetch(location: str, *, max_bytes: int = MAX_INPUT_BYTES, deadline_s: float = FETCH_DEADLINE_S) -> bytes:
    """The bytes of a local path or an http(s)/file URL, within the size cap and the deadline (see the module
    docstring). Raises FetchError (an OSError) naming the input and the reason."""
    if not is_url(location) or location.lower().startswith("file:"):
        return _read_local(_local_path(location), max_bytes)
    scheme = location.split("://", 1)[0].lower()
    if scheme not in REDIRECT_SCHEMES:
        raise FetchError(f"cannot read {location}: the writer reads http(s):// and file:// URLs, not {scheme}://")
    bad = next((c for c in location if c.isspace() or unicodedata.category(c) == "Cc"), None)
    if bad is not None:
        what = "a space" if bad == " " else f"the character {bad!r}"
        raise FetchError(f"cannot read {location!r}: the URL holds {what}; percent-encode it (a space is %20)")
    deadline = time.monotonic() + deadline_s
    last = "no try"
    for attempt in range(FETCH_ATTEMPTS):
        if attempt:
            time.sleep(max(0.0, min(FETCH_BACKOFF_S * 2 ** (attempt - 1), deadline - time.monotonic())))
        if time.monotonic() >= deadline:
            raise FetchError(
                f"cannot read {location}: not complete within the deadline of {deadline_s:g} s (--fetch-deadline) "
                f"after {attempt} tries (last: {last})"
            )
        try:
            return _download(location, max_bytes, deadline, deadline_s)
        except _Transient as exc:
            last = str(exc)
    raise FetchError(f"cannot read {location} in {FETCH_ATTEMPTS} tries (the last: {last})")


def _stamp(location: str | None) -> str:
    """size:mtime_ns of a local file, '-' when it does not exist, the location itself for an http(s) URL."""
    if location is None:
        return ""
    if is_url(location) and not location.lower().startswith("file:"):
        return "url"
    try:
        info = os.stat(_local_path(location))
    except (OSError, ValueError):
        return "-"
    return f"{info.st_size}:{info.st_mtime_ns}"


def sidecar_location(video: InputVideo) -> str | None:
    """Where a video's sidecar is: the listed one, NAME.json next to a local video when it exists, else None."""
    if video.sidecar is not None:
        return video.sidecar
    if video.is_url:
        return None
    implicit = Path(video.location).with_suffix(".json")
    return str(implicit) if os.path.lexists(implicit) else None


def input_digest(videos: list[InputVideo]) -> str:
    """The input fingerprint (module docstring): sha256 of every listed video's source, KEY, location and sidecar,
    with the size and mtime of the local files."""
    digest = hashlib.sha256()
    for video in videos:
        sidecar = sidecar_location(video)
        row = [video.source, video.key, video.location, sidecar or "", _stamp(video.location), _stamp(sidecar)]
        digest.update(("\t".join(row) + "\n").encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def read_sidecar(video: InputVideo, *, deadline_s: float = FETCH_DEADLINE_S) -> tuple[dict, str | None]:
    """(sidecar dict, None), or ({}, the reason it cannot be used). No sidecar listed and no NAME.json next to a
    local video: ({}, None). The JSON is read under the schema's limits (data_pipeline/sidecar.py: size, depth,
    finite numbers)."""
    location = sidecar_location(video)
    if location is None:
        return {}, None
    name = _name_and_ext(location)[0] + ".json" if video.sidecar is None else location
    try:
        value = load_json(fetch(location, max_bytes=MAX_SIDECAR_BYTES, deadline_s=deadline_s), f"sidecar {name}")
    except OSError as exc:
        return {}, f"sidecar {name} cannot be read: {exc}"
    except MetadataError as exc:
        return {}, str(exc)
    if not isinstance(value, dict):
        return {}, f"sidecar {name} must be a JSON object, got {type(value).__name__}"
    return value, None
