"""Clips: which frames of a video form a training clip, and the metadata rows that travel with them.

A clip is `clip_length` frames taken every `frame_step` frames from a start frame:
`indices = start + frame_step * arange(clip_length)`. Per-frame `state` rows are taken at those frames. Per-
transition rows (`action`, `events`; row t belongs to transition t -> t+1 of the video) are merged over the video
transitions between consecutive clip frames: actions are summed (the total control applied between the two frames),
events are max-ed (an event anywhere in between counts).
"""

from __future__ import annotations

import numpy as np


class MetadataError(ValueError):
    """A sample's JSON does not match the shard format (see docs/architecture.md)."""


def clip_span(clip_length: int, frame_step: int) -> int:
    """Number of video frames a clip covers, from its first to its last frame inclusive."""
    return (clip_length - 1) * frame_step + 1


def clip_starts(
    num_frames: int, clip_length: int, frame_step: int, rng: np.random.Generator, count: int = 1
) -> np.ndarray | None:
    """`count` random start frames (int64 [count]) for clips in a video of `num_frames`, or None if it is too short."""
    last_start = num_frames - clip_span(clip_length, frame_step)
    if last_start < 0:
        return None
    return rng.integers(0, last_start + 1, size=count)


def clip_indices(start: int, clip_length: int, frame_step: int) -> np.ndarray:
    """Video frame indices of a clip: int64 [clip_length]."""
    return start + frame_step * np.arange(clip_length, dtype=np.int64)


def _rows(meta: dict, key: str, expected: int, num_frames: int, lo: int, hi: int) -> np.ndarray | None:
    """Rows lo..hi-1 of `meta[key]` as float32, after checking that it has `expected` rows (only the rows a clip
    needs are converted: cheaper per clip than the whole video's) and that they are finite: MetadataError if not."""
    if key not in meta:
        return None
    rows = meta[key]
    if not isinstance(rows, list) or len(rows) != expected:
        per = "frame" if key == "state" else "transition t -> t+1"
        found = f"{len(rows)} rows" if isinstance(rows, list) else f"a {type(rows).__name__}"
        raise MetadataError(
            f"{key!r} has {found} for a video of {num_frames} frames; expected {expected} rows (one per {per})"
        )
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # 1e308 -> inf, refused below with the reason
            out = np.asarray(rows[lo:hi], dtype=np.float32)
    except (TypeError, ValueError, OverflowError) as exc:
        raise MetadataError(f"{key!r} is not a rectangular array of numbers: {exc}") from exc
    if len(out) and key != "events" and out.ndim != 2:
        raise MetadataError(
            f"{key!r} must be a list of rows of numbers ([rows][columns]); its rows have {out.ndim - 1} dims"
        )
    if not np.isfinite(out).all():
        raise MetadataError(
            f"{key!r} holds a number that is not finite as float32 (NaN, null, Infinity, or beyond 3.4e38)"
        )
    return out


def cut_metadata(meta: dict, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Cut a video's per-frame / per-transition arrays to the clip frames `indices` [T] (non-decreasing).

    Returns whichever of these the video has: `state` float32 [T, S], `action` float32 [T-1, A] (summed over the
    video transitions between consecutive clip frames), `events` float32 [T-1] (max over them).
    """
    num_frames = int(meta["num_frames"])
    lo, hi = int(indices[0]), int(indices[-1])
    out: dict[str, np.ndarray] = {}
    if len(indices) > 1 and hi - lo == len(indices) - 1:  # consecutive frames: each row is the clip's own, as is
        for key, expected, stop in (("state", num_frames, hi + 1), ("action", num_frames - 1, hi)):
            rows = _rows(meta, key, expected, num_frames, lo, stop)
            if rows is not None:
                out[key] = rows
        events = _rows(meta, "events", num_frames - 1, num_frames, lo, hi)
        if events is not None:
            out["events"] = events if events.ndim == 1 else events.reshape(len(events), -1).max(axis=1)
        return out
    local = indices - lo
    state = _rows(meta, "state", num_frames, num_frames, lo, hi + 1)
    if state is not None:
        out["state"] = state[local]
    # segment k of the clip spans video transitions indices[k] .. indices[k+1]-1
    action = _rows(meta, "action", num_frames - 1, num_frames, lo, hi)
    if action is not None:
        sums = np.concatenate([np.zeros((1, *action.shape[1:])), np.cumsum(action, axis=0, dtype=np.float64)])
        out["action"] = (sums[local[1:]] - sums[local[:-1]]).astype(np.float32)
    events = _rows(meta, "events", num_frames - 1, num_frames, lo, hi)
    if events is not None:
        out["events"] = np.array(
            [events[a:b].max() if b > a else 0.0 for a, b in zip(local[:-1], local[1:], strict=True)],
            dtype=np.float32,
        )
    return out
