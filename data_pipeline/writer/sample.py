"""One input on its way into a shard: what it is (`Sample`), how it is to be prepared (`Reencode`, `Options`, the
declared categorical labels of --label-map), its sidecar checked for the shard format, and what preparing it gives
(`Prepared`: its samples' tar entries, or the reason it is skipped).

The sidecar checks are those that need no decoding (data_pipeline/sidecar.py's schema) and, once the video's frame
count is known, the row counts: the shards store one `action` row per transition t -> t+1 (N-1 rows for N frames);
`action_rows="frame"` (--action-rows frame) reads sidecars that store one per frame and drops the last.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_pipeline.clips import MetadataError, cut_metadata
from data_pipeline.sidecar import check_sidecar, load_json
from data_pipeline.writer.inputs import FETCH_DEADLINE_S, MAX_INPUT_BYTES

ACTION_ROWS = ("transition", "frame")  # what a sidecar's `action` rows are: one per transition, or one per frame
WRITER_ASPECTS = ("crop", "pad", "squash", "short")  # --aspect


@dataclass
class Sample:
    """One video to write: `video` bytes in container `ext`, its sidecar metadata, and a name for messages."""

    key: str
    video: bytes
    ext: str
    sidecar: dict
    source: str
    problem: str | None = None  # why the sidecar could not be read, if it could not


@dataclass(frozen=True)
class Reencode:
    """Re-encode to H.264: `size` x `size` pixels made square by `aspect` (None keeps the size), `fps` (None keeps
    it), GOP `gop`, libx264's `crf`."""

    size: int | None = None
    fps: float | None = None
    gop: int = 8
    crf: int = 10
    aspect: str = "crop"


@dataclass(frozen=True)
class Options:
    """What preparing one input needs (sent to the worker processes)."""

    reencode: Reencode | None = None
    action_rows: str = "transition"
    max_frames: int | None = None
    max_seconds: float | None = None
    label_map: tuple[tuple[str, tuple[str, ...]], ...] = ()  # declared categorical labels (--label-map)
    max_input_bytes: int = MAX_INPUT_BYTES
    fetch_deadline_s: float = FETCH_DEADLINE_S

    @property
    def segmented(self) -> bool:
        return self.max_frames is not None or self.max_seconds is not None

    @property
    def labels(self) -> dict[str, list[str]]:
        """The declared categorical labels: {name: [category, ...]} (a category is stored as its index)."""
        return {name: list(categories) for name, categories in self.label_map}


def read_label_map(source: str | Path | Mapping | None) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """A --label-map: a JSON file (or a mapping) {label name: [category, ...]}, the categories distinct strings;
    ValueError saying what is wrong otherwise."""
    if source is None:
        return ()
    if isinstance(source, Mapping):
        data, where = source, "the label map"
    else:
        where = f"--label-map {source}"
        try:
            data = load_json(Path(source).read_bytes(), where)
        except OSError as exc:
            raise ValueError(f"{where} cannot be read: {exc}") from exc
        except MetadataError as exc:
            raise ValueError(str(exc)) from exc
    if not isinstance(data, Mapping):
        raise ValueError(f'{where} must be a JSON object {{"label": ["category", ...]}}')
    out = []
    for name, categories in sorted(data.items()):
        if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories) or not categories:
            raise ValueError(f"{where}: label {name!r} needs a non-empty list of category strings")
        if len(set(categories)) != len(categories):
            raise ValueError(f"{where}: label {name!r} lists a category twice")
        out.append((str(name), tuple(categories)))
    return tuple(out)


def sidecar_problem(sample: Sample, label_map: Mapping[str, list[str]] | None = None) -> dict:
    """The sample's sidecar checked against the schema (data_pipeline/sidecar.py: types, finite numbers, widths of
    its rows, labels: integers or declared categories, mapped to their index): the checks that need no video.
    Raises MetadataError if it could not be read or breaks a rule."""
    if sample.problem:
        raise MetadataError(sample.problem)
    return check_sidecar(sample.sidecar, label_map)


def checked_sidecar(
    sample: Sample, num_frames: int, action_rows: str = "transition", label_map: Mapping | None = None
) -> dict:
    """The sample's sidecar in the shard format (one `action` row per transition, labels as integers) after
    checking it against the schema and a video of `num_frames` frames; with `action_rows="frame"` the sidecar has one
    action per frame and the last is dropped.

    Raises MetadataError with the reason, naming --action-rows when the `action` row count fits the other option.
    """
    sidecar = sidecar_problem(sample, label_map)
    action = sidecar.get("action")
    if isinstance(action, list):
        per_frame = action_rows == "frame"
        expected = num_frames if per_frame else num_frames - 1
        if len(action) != expected:
            if per_frame:
                per = "one per frame, as --action-rows frame says; the last one is dropped"
                other = "if your sidecars store one action per transition t -> t+1, leave out --action-rows frame"
            else:
                per = "one per transition t -> t+1"
                other = "if your sidecars store one action per frame (the last one unused), pass --action-rows frame"
            hint = f"; {other}" if len(action) == (num_frames - 1 if per_frame else num_frames) else ""
            raise MetadataError(
                f"'action' has {len(action)} rows for a video of {num_frames} frames; expected {expected} rows ({per})"
                f"{hint}"
            )
        if per_frame:
            sidecar = {**sidecar, "action": action[:-1]}
    cut_metadata({**sidecar, "num_frames": num_frames}, np.arange(num_frames))
    return sidecar


@dataclass
class Prepared:
    """One input, ready for the tars: its samples (one, or one per segment) as (key, tar entries), or the reason it
    is skipped."""

    source: str
    samples: list[tuple[str, list[tuple[str, bytes]]]] = field(default_factory=list)
    problem: str | None = None
    key: str = ""  # the input's KEY (its samples' keys start with it)
    signature: dict = field(default_factory=dict)  # what its samples add to the dataset schema (sidecar.signature)
