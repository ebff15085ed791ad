"""The sidecar schema: one set of rules for what a sample's JSON may hold, enforced where data enters (the writer)
and checked again where it is used (the reader).

Per sample (`check_sidecar` at write time, the same rules on the rows a clip uses at read time):

- the JSON is at most `MAX_SIDECAR_BYTES` long and nested at most `MAX_DEPTH` deep; it is an object;
- numbers are finite: `NaN`, `Infinity` and numbers beyond float64 (`1e400`) are refused anywhere in it, and the
  numbers of `state`, `action` and `events` must also fit float32 (what they become: `1e308` would be `inf`);
- `state` and `action` are lists of rows, each a list of the same number (>= 1) of numbers: the field's width;
  `events` is a list of numbers; `state_names` / `action_names` are lists of strings, as many as the width;
- `labels` is an object {name: integer} (int64 range). A label whose values are strings (`{"activity":
  "walking"}`) needs a declared categorical mapping, `--label-map FILE` with {"activity": ["walking", "running"]}:
  the writer stores the category's index (walking -> 0) and index.json keeps the mapping. A string label without
  one, or a string that is not among its categories, is skipped with the reason (never guessed).

Per dataset (`DatasetSchema`): the first sample with a field fixes its width (and its column names, and the set of
label names); a later sample that disagrees is skipped with the reason, naming the sample that fixed it. The writer
stores the schema in index.json as `"schema": {"state": {"width", "names", "samples"}, "action": {...},
"events": {"samples"}, "labels": {"names", "samples", "categories"}}` (`samples`: how many samples have the
field). The reader skips (counts, reason `schema_mismatch`) a clip whose widths or label names disagree with the
dataset's, so a batch never loses a field because one clip differs: it reads the schema from index.json next to
local shards, and otherwise the first usable sample each reader sees fixes it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import numpy as np

from data_pipeline.clips import MetadataError

MAX_SIDECAR_BYTES = 64 * 2**20  # a 100 000-frame video with 20 state columns is ~40 MB of JSON
MAX_DEPTH = 32  # the format itself nests 3 deep (state rows); leave room for the user's own fields
INDEX_MAX_BYTES = 256 * 2**20  # index.json (a line per shard)
MAX_FRAMES = 10**8  # num_frames beyond this is not a video (and would overflow the clip arithmetic)
FLOAT32_MAX = float(np.finfo(np.float32).max)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MATRIX_FIELDS = ("state", "action")  # [rows][width]: one width per dataset
NAME_FIELDS = {"state": "state_names", "action": "action_names"}
SCHEMA_FIELDS = ("state", "action", "events", "labels")


def _refuse_constant(name: str) -> float:
    raise MetadataError(f"holds {name}, which is not a number JSON allows (write finite numbers, or null)")


def load_json(
    data: bytes | str, what: str = "the sidecar", *, max_bytes: int = MAX_SIDECAR_BYTES, walk: bool = True
) -> object:
    """Parse sidecar JSON strictly: at most `max_bytes`, no NaN/Infinity literals, and with `walk` (`check_tree`) no
    number beyond float64 and at most `MAX_DEPTH` deep. Raises MetadataError naming `what` and the rule it breaks
    (never RecursionError or OverflowError). The reader passes walk=False: walking every number of a long video's
    rows costs per sample, and it checks the rows a clip uses instead (clips.cut_metadata)."""
    if len(data) > max_bytes:
        raise MetadataError(f"{what} is {len(data)} bytes, over the limit of {max_bytes}")
    try:
        text = data.decode() if isinstance(data, bytes) else data
        value = json.loads(text, parse_constant=_refuse_constant)
    except UnicodeDecodeError as exc:
        raise MetadataError(f"{what} is not UTF-8 text: {exc}") from exc
    except RecursionError as exc:
        raise MetadataError(f"{what} is nested too deeply to read (limit {MAX_DEPTH} levels)") from exc
    except MetadataError as exc:
        raise MetadataError(f"{what} {exc}") from exc
    except ValueError as exc:  # JSONDecodeError, and integers of more than 4300 digits
        raise MetadataError(f"{what} is not valid JSON: {exc}") from exc
    if walk:
        check_tree(value, what)
    return value


def check_tree(value: object, what: str = "the sidecar") -> None:
    """Walk a parsed JSON value without recursion: MetadataError if it is nested more than `MAX_DEPTH` deep or holds
    a float that is not finite (`1e400` parses as inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise MetadataError(f"{what} is a number beyond float64 or not finite")
    stack = [(value, 1, "")] if isinstance(value, (list, dict)) else []
    while stack:
        item, depth, path = stack.pop()
        if depth > MAX_DEPTH:
            raise MetadataError(f"{what} is nested more than {MAX_DEPTH} levels deep (at {path})")
        for key, child in item.items() if isinstance(item, dict) else enumerate(item):
            if isinstance(child, float):
                if not math.isfinite(child):
                    raise MetadataError(f"{what} holds a number beyond float64 or not finite at {path}[{key!r}]")
            elif isinstance(child, (list, dict)):
                stack.append((child, depth + 1, f"{path}[{key!r}]"))


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def matrix_width(rows: object, field: str) -> int:
    """The width of a [rows][width] field (`state`, `action`): MetadataError unless it is a list of equally long
    non-empty lists of finite numbers within float32's range."""
    if not isinstance(rows, list):
        raise MetadataError(f"{field!r} must be a list of rows, got a {type(rows).__name__}")
    width = None
    for t, row in enumerate(rows):
        if not isinstance(row, list) or not row:
            got = "an empty list" if row == [] else f"a {type(row).__name__}"
            raise MetadataError(f"{field!r} row {t} must be a non-empty list of numbers, got {got}")
        if width is None:
            width = len(row)
        elif len(row) != width:
            raise MetadataError(
                f"{field!r} row {t} has {len(row)} columns, row 0 has {width}: rows must be equally long"
            )
        for x in row:
            if not _number(x):
                raise MetadataError(f"{field!r} row {t} holds {x!r}, not a number")
            if not abs(x) <= FLOAT32_MAX:
                raise MetadataError(f"{field!r} row {t} holds {x!r}, beyond float32's range (what it is stored as)")
    return width or 0


def check_events(events: object) -> None:
    """MetadataError unless `events` is a list of finite numbers within float32's range."""
    if not isinstance(events, list):
        raise MetadataError(f"'events' must be a list of numbers (one per transition), got a {type(events).__name__}")
    for t, x in enumerate(events):
        if not _number(x) or not abs(x) <= FLOAT32_MAX:
            raise MetadataError(f"'events' entry {t} is {x!r}, not a finite number")


def check_names(names: object, field: str, width: int | None) -> list[str]:
    """`state_names` / `action_names`: a list of strings, `width` of them when the field is present."""
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise MetadataError(f"{field!r} must be a list of strings")
    if width is not None and len(names) != width:
        raise MetadataError(f"{field!r} has {len(names)} names for {width} columns")
    return names


def check_labels(labels: object, label_map: Mapping[str, list[str]] | None = None) -> dict[str, int]:
    """`labels` as {name: int}: integers in int64's range; a string value is mapped to its index in
    `label_map[name]` (a declared categorical label). MetadataError with the fix otherwise."""
    if not isinstance(labels, dict):
        raise MetadataError(f"'labels' must be an object {{name: integer}}, got a {type(labels).__name__}")
    out = {}
    for name, value in labels.items():
        categories = (label_map or {}).get(name)
        if isinstance(value, str):
            if categories is None:
                raise MetadataError(
                    f"label {name!r} is the string {value!r}; labels are integers. Declare its categories with "
                    f'--label-map FILE ({{"{name}": ["{value}", ...]}}) to store each as its index'
                )
            if value not in categories:
                raise MetadataError(f"label {name!r} is {value!r}, not one of its declared categories {categories}")
            value = categories.index(value)
        elif not isinstance(value, int) or isinstance(value, bool):
            raise MetadataError(f"label {name!r} is {value!r}; labels are integers (or declared categorical strings)")
        elif not INT64_MIN <= value <= INT64_MAX:
            raise MetadataError(f"label {name!r} is {value}, beyond int64's range")
        elif categories is not None and not 0 <= value < len(categories):
            raise MetadataError(f"label {name!r} is {value}, not an index of its {len(categories)} declared categories")
        out[name] = value
    return out


def check_sidecar(sidecar: object, label_map: Mapping[str, list[str]] | None = None) -> dict:
    """Check a sidecar's fields against the schema (the module docstring); returns it with categorical labels
    mapped to their indices. Row counts against the video are checked by `clips.cut_metadata`. Raises
    MetadataError with the reason."""
    if not isinstance(sidecar, dict):
        raise MetadataError(f"the sidecar must be a JSON object, got {type(sidecar).__name__}")
    check_tree(sidecar)
    out = dict(sidecar)
    for field in MATRIX_FIELDS:
        width = matrix_width(sidecar[field], field) if field in sidecar else None
        names = NAME_FIELDS[field]
        if names in sidecar:
            check_names(sidecar[names], names, width)
    if "events" in sidecar:
        check_events(sidecar["events"])
    if "labels" in sidecar:
        out["labels"] = check_labels(sidecar["labels"], label_map)
    return out


def signature(meta: Mapping) -> dict:
    """What a (checked) sample contributes to its dataset's schema: {"state": width, "state_names": [...],
    "action": ..., "events": True, "labels": sorted label names}, only the fields it has."""
    sig: dict = {}
    for field in MATRIX_FIELDS:
        rows = meta.get(field)
        if isinstance(rows, list) and rows and isinstance(rows[0], list):
            sig[field] = len(rows[0])
            if isinstance(meta.get(NAME_FIELDS[field]), list):
                sig[NAME_FIELDS[field]] = list(meta[NAME_FIELDS[field]])
    if "events" in meta:
        sig["events"] = True
    if isinstance(meta.get("labels"), dict) and meta["labels"]:  # {}: no labels
        sig["labels"] = sorted(meta["labels"])
    return sig


class DatasetSchema:
    """The schema of a dataset, fixed field by field by the first sample that has the field (or declared: read from
    index.json). `fields`: {"state": {"width", "names", "samples", "first"}, "action": ..., "events": {"samples"},
    "labels": {"names", "samples", "categories"}}."""

    def __init__(self, fields: dict | None = None, categories: Mapping[str, list[str]] | None = None) -> None:
        self.fields: dict[str, dict] = {k: dict(v) for k, v in (fields or {}).items()}
        if categories:
            self.fields.setdefault("labels", {"samples": 0})["categories"] = {k: list(v) for k, v in categories.items()}

    def problem(self, sig: Mapping) -> str | None:
        """Why a sample with signature `sig` does not fit the dataset, or None."""
        for field in MATRIX_FIELDS:
            known = self.fields.get(field)
            if field not in sig or not known or "width" not in known:
                continue
            if sig[field] != known["width"]:
                return (
                    f"{field!r} has {sig[field]} columns; the dataset's have {known['width']} (fixed by "
                    f"{known.get('first', 'its index.json')}): every sample of a dataset needs the same width"
                )
            names = sig.get(NAME_FIELDS[field])
            if names is not None and known.get("names") is not None and names != known["names"]:
                return f"{NAME_FIELDS[field]!r} is {names}; the dataset's is {known['names']}"
        known = self.fields.get("labels")
        if "labels" in sig and known and known.get("names") is not None and sig["labels"] != known["names"]:
            return (
                f"the labels are {sig['labels']}; the dataset's are {known['names']} (fixed by "
                f"{known.get('first', 'its index.json')}): every labelled sample needs the same label names"
            )
        return None

    def add(self, sig: Mapping, key: str) -> None:
        """Count a sample (checked with `problem` first) and fix what it is the first to have."""
        for field in SCHEMA_FIELDS:
            if field not in sig:
                continue
            entry = self.fields.setdefault(field, {"samples": 0})
            entry["samples"] = entry.get("samples", 0) + 1
            if field in MATRIX_FIELDS:
                if "width" not in entry:
                    entry.update(width=sig[field], first=key)
                if entry.get("names") is None and NAME_FIELDS[field] in sig:
                    entry["names"] = sig[NAME_FIELDS[field]]
            elif field == "labels" and entry.get("names") is None:
                entry.update(names=list(sig["labels"]), first=key)

    def merged(self, other: DatasetSchema) -> DatasetSchema:
        """The schema of two parts of a dataset (e.g. two jobs) together; MetadataError when they disagree."""
        out = DatasetSchema(self.fields)
        for field, entry in other.fields.items():
            mine = out.fields.get(field)
            if mine is None:
                out.fields[field] = dict(entry)
                continue
            for name in ("width", "names", "categories"):
                if entry.get(name) is not None and mine.get(name) is not None and entry[name] != mine[name]:
                    raise MetadataError(
                        f"{field!r} {name} {entry[name]} (from {entry.get('first')}) differs from {mine[name]} (from "
                        f"{mine.get('first')})"
                    )
                if mine.get(name) is None and entry.get(name) is not None:
                    mine[name] = entry[name]
                    if "first" in entry:
                        mine["first"] = entry["first"]
            mine["samples"] = mine.get("samples", 0) + entry.get("samples", 0)
        return out

    def to_json(self) -> dict:
        """The schema as index.json and the job files store it."""
        return {k: dict(v) for k, v in sorted(self.fields.items())}

    @classmethod
    def from_json(cls, data: object) -> DatasetSchema:
        """A schema from `to_json`'s form; MetadataError when it is not one."""
        if not isinstance(data, dict) or not all(k in SCHEMA_FIELDS and isinstance(v, dict) for k, v in data.items()):
            raise MetadataError(f"not a sidecar schema (an object with some of {SCHEMA_FIELDS}): {str(data)[:200]}")
        for field in MATRIX_FIELDS:
            width = data.get(field, {}).get("width")
            if width is not None and (not isinstance(width, int) or isinstance(width, bool) or width < 0):
                raise MetadataError(f"the schema's {field!r} width is {width!r}, not a count")
        return cls(data)
