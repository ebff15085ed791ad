"""From one tar sample to its clips, the per-sample stages of a reader worker (data_pipeline/stream.py assembles
them into the stream): plan a sample (`plan_sample`: read KEY.json under the sidecar schema, draw the clip starts, cut
the metadata rows), then decode the union of its clips' frames once and cut the clips (`decode_clips`).

`Reader` is one worker's read state, shared by its stages: the decoder, the skip counts by reason, the dataset schema
the clips keep to, and the guards against endless passes that find no usable sample (`NoDecodableDataError`). With
`WORLDMODEL_DECODE_DEBUG=1` each skipped sample is logged here (logger `data_pipeline.samples`, level WARNING).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import numpy as np

from data_pipeline.clips import MetadataError, clip_indices, clip_span, clip_starts, cut_metadata
from data_pipeline.config import DataConfig
from data_pipeline.decoders import DecodeError, decode_debug, fit_to_square, get_decoder
from data_pipeline.format import INDEX_NAME, VIDEO_EXTENSIONS
from data_pipeline.sidecar import (
    INDEX_MAX_BYTES,
    MATRIX_FIELDS,
    MAX_FRAMES,
    NAME_FIELDS,
    DatasetSchema,
    check_labels,
    check_names,
    load_json,
)

log = logging.getLogger(__name__)

FALLBACK_PYAV = "fallback/pyav"  # the key of `batch["skipped"]` that counts PyAV fallbacks, not skips


class NoDecodableDataError(RuntimeError):
    """A reader went through all of its shards without finding one usable clip."""


class Reader:
    """One worker's read state, shared by its stages: skip counts and the guards against endless useless passes."""

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        self.decoder = get_decoder(cfg.decoder)
        self.debug = decode_debug()  # log every skip with its reason and error text
        self.skipped: Counter[str] = Counter()
        self._skipped_lock = threading.Lock()  # shard errors are counted by the read-ahead thread
        self._fallbacks_seen = 0  # the decoder's fallback count at the previous pop_skipped
        self.pass_samples = 0  # samples delivered in the current pass over the shards
        self.max_pass_samples = 0
        self.failure_streak = 0
        # the sidecar schema (data_pipeline/sidecar.py) the clips of this reader's batches keep to: widths, column
        # names and label names, from the index.json of local shard folders, else fixed by the first usable sample
        self.schema = DatasetSchema()
        self._required: dict[str, frozenset[str]] = {}  # folder -> the fields its index.json says every sample has

    def _folder_fields(self, url: str) -> frozenset[str]:
        """The fields every sample of local shard `url`'s folder has, by its index.json (read once per folder; its
        widths and names join `schema`). Remote shards and folders without a usable index.json: none."""
        if not url or url.startswith(("pipe:", "http://", "https://")):
            return frozenset()
        folder = os.path.dirname(url.removeprefix("file:")) or "."
        if folder not in self._required:
            self._required[folder] = frozenset()
            path = os.path.join(folder, INDEX_NAME)
            try:
                with open(path, "rb") as handle:
                    index = load_json(handle.read(INDEX_MAX_BYTES + 1), path, max_bytes=INDEX_MAX_BYTES)
                declared = DatasetSchema.from_json(index.get("schema", {}) if isinstance(index, dict) else None)
                total = index.get("total_samples")
            except (OSError, MetadataError):
                return frozenset()
            try:
                self.schema = self.schema.merged(declared)
            except MetadataError as exc:
                warnings.warn(
                    f"{path}: its sidecar schema disagrees with that of the shards read before it ({exc}); its "
                    "samples that disagree are skipped as schema_mismatch",
                    stacklevel=2,
                )
            required = {f for f, entry in declared.fields.items() if entry.get("samples") == total and total}
            self._required[folder] = frozenset(required)
        return self._required[folder]

    def schema_problem(self, plan: Plan) -> str | None:
        """Why planned sample `plan` breaks this reader's schema (a width, column names or label names other than
        the dataset's, or a field its index.json says every sample has missing), or None."""
        required = self._folder_fields(plan.url)
        for sig in _clip_signatures(plan):
            missing = sorted(required - set(sig))
            if missing:
                return f"its folder's index.json says every sample has {missing}; this one has not"
            problem = self.schema.problem(sig)
            if problem is not None:
                return problem
        return None

    def learn(self, plan: Plan) -> None:
        """Fix in the schema what usable sample `plan` is the first to have."""
        for sig in _clip_signatures(plan):
            self.schema.add(sig, plan.key)

    def shard_error(self, exn: Exception) -> bool:
        """webdataset exception handler: a shard that cannot be opened or read is counted, and the stream goes on."""
        with self._skipped_lock:
            self.skipped["shard_error"] += 1
        warnings.warn(f"skipping unreadable shard data: {exn}", stacklevel=2)
        return True

    def skip(self, reason: str, key: str, detail: str = "") -> None:
        """Count a skipped sample under `reason` (logged with `detail` in decode-debug mode); fails when samples
        have been unusable for so long that no usable one exists."""
        with self._skipped_lock:
            self.skipped[reason] += 1
        if self.debug:
            log.warning("skipped sample %r (%s): %s", key, reason, detail or "no detail")
        self.failure_streak += 1
        # A usable sample recurs every pass, so a streak this long means there is none (the margin covers samples
        # waiting in the shuffle buffer).
        limit = 10 * (self.max_pass_samples + self.cfg.shuffle_buffer)
        if self.max_pass_samples and self.failure_streak > limit:
            raise NoDecodableDataError(
                f"{self.failure_streak} samples in a row were unusable (skipped so far: {dict(self.skipped)}; last "
                f"{key!r}) over full passes of this reader's shards: no usable clip of {self.cfg.clip_length} frames "
                f"with frame_step {self.cfg.frame_step}. Check the shards (python -m benchmarks.pipeline) and "
                "data.num_context / data.num_target / data.frame_step."
            )

    def pop_skipped(self) -> dict[str, int]:
        """The skip counts by reason since the previous call, and `fallback/pyav`: the videos decord could not read
        that PyAV decoded instead (not skips; counted so that a slow fallback path never goes unnoticed)."""
        with self._skipped_lock:
            counts, self.skipped = dict(self.skipped), Counter()
        fallbacks = getattr(self.decoder, "fallbacks", 0)
        if fallbacks > self._fallbacks_seen:
            counts[FALLBACK_PYAV] = fallbacks - self._fallbacks_seen
            self._fallbacks_seen = fallbacks
        return counts


@dataclass
class Plan:
    """What one sample becomes: the frames to decode and the clips to cut from them, or why it is skipped."""

    key: str
    skip: str | None = None  # the skip reason, or None for a usable sample
    detail: str = ""  # why it is skipped: the error text
    url: str = ""  # the shard it came from
    meta: dict | None = None
    labels: dict[str, int] | None = None  # checked, in name order
    video: bytes = b""
    starts: np.ndarray | None = None  # int64 [clips]
    needed: list[int] | None = None  # the frames to decode: the sorted union of the clips' frames
    positions: np.ndarray | None = None  # int64 [clips, T]: where each clip's frames are in the decoded ones
    rows: list[dict] | None = None  # per clip: the metadata arrays of clips.cut_metadata
    crops: np.ndarray | None = None  # float64 [clips] in [0, 1): where each clip's random crop lies (random_crop)
    frames: np.ndarray | None = None  # uint8 [len(needed), H, W, C] once decoded
    fps: float | None = None  # KEY.json's frame rate when usable (`_fps`)


def plan_sample(sample: dict, cfg: DataConfig, rng: np.random.Generator, clips_per_video: int) -> Plan:
    """Parse a sample's JSON and pick its clips (this draws the clip starts from `rng`); nothing is decoded."""
    plan = Plan(sample.get("__key__", "?"), url=sample.get("__url__") or "")
    video = _video_entry(sample)
    try:
        plan.meta = _parse_meta(sample)
        plan.labels = _labels(plan.meta)
        plan.fps = _fps(plan.meta)
        if video is None:
            raise MetadataError(f"the sample has no video entry (one of {VIDEO_EXTENSIONS})")
        plan.video = video[1]
        plan.starts = clip_starts(int(plan.meta["num_frames"]), cfg.clip_length, cfg.frame_step, rng, clips_per_video)
        if plan.starts is None:
            plan.skip = "too_short"
            plan.detail = (
                f"the video has {plan.meta['num_frames']} frames; a clip of {cfg.clip_length} frames with "
                f"frame_step {cfg.frame_step} spans {clip_span(cfg.clip_length, cfg.frame_step)}"
            )
            return plan
        clips = [clip_indices(int(s), cfg.clip_length, cfg.frame_step) for s in plan.starts]
        if cfg.random_crop:  # drawn only then, so the clip starts of other runs stay as they were
            plan.crops = rng.random(len(clips))
        plan.rows = [cut_metadata(plan.meta, idx) for idx in clips]
        for field in MATRIX_FIELDS:
            names = plan.meta.get(NAME_FIELDS[field])
            if names is not None:
                width = plan.rows[0][field].shape[-1] if field in plan.rows[0] else None
                check_names(names, NAME_FIELDS[field], width)
    except MetadataError as exc:
        plan.skip, plan.detail = "bad_metadata", str(exc)
        return plan
    if len(clips) == 1 and cfg.frame_step > 0:  # one clip: its frames are distinct and increasing already
        plan.needed, plan.positions = clips[0].tolist(), None
    else:
        needed, positions = np.unique(np.concatenate(clips), return_inverse=True)
        plan.needed, plan.positions = needed.tolist(), positions.reshape(len(clips), cfg.clip_length)
    return plan


def plan_in_chunks(
    samples: Iterable[dict],
    cfg: DataConfig,
    start_rng: Callable[[str], np.random.Generator],
    clips_per_video: int,
    chunk: int,
) -> Iterator[list[Plan]]:
    """The plans of the samples, `chunk` samples at a time (each chunk is read, then planned, as one step)."""
    for group in iter(lambda: list(islice(samples, chunk)), []):
        yield [plan_sample(sample, cfg, start_rng(sample.get("__key__", "?")), clips_per_video) for sample in group]


def _video_entry(sample: dict) -> tuple[str, bytes] | None:
    for ext in VIDEO_EXTENSIONS:
        if ext in sample:
            return ext, sample[ext]
    return None


def _parse_meta(sample: dict) -> dict:
    """KEY.json read under the sidecar schema's limits (data_pipeline/sidecar.py: its size; standard JSON, no NaN or
    Infinity token; too deep to parse is an error, not a RecursionError), an object with an integral `num_frames` in
    [1, MAX_FRAMES]; MetadataError saying what is wrong. The rows are checked where a clip cuts them."""
    if "json" not in sample:
        raise MetadataError("the sample has no KEY.json")
    meta = load_json(sample["json"], "KEY.json", walk=False)
    if not isinstance(meta, dict):
        raise MetadataError(f"KEY.json must be a JSON object, got {type(meta).__name__}")
    num_frames = meta.get("num_frames")
    if isinstance(num_frames, float) and num_frames.is_integer():
        num_frames = meta["num_frames"] = int(num_frames)
    if not isinstance(num_frames, int) or isinstance(num_frames, bool) or not 1 <= num_frames <= MAX_FRAMES:
        raise MetadataError(f"KEY.json's num_frames is {num_frames!r}; it must be an integer in [1, {MAX_FRAMES}]")
    return meta


def _labels(meta: dict) -> dict[str, int] | None:
    """The sample's labels, checked (integers in int64's range: data_pipeline/sidecar.py) and in name order; None
    when it has none."""
    labels = meta.get("labels")
    return None if labels is None else dict(sorted(check_labels(labels).items())) or None


def _fps(meta: dict) -> float | None:
    """KEY.json's `fps` when it is a finite positive number, else None: an unusable frame rate never skips a sample;
    its batch just carries no `fps` (and the evaluation reports no seconds)."""
    value = meta.get("fps")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:  # an integer beyond float64
        return None
    return value if math.isfinite(value) and value > 0 else None


def _clip_signatures(plan: Plan) -> Iterator[dict]:
    """What each clip of `plan` holds, as data_pipeline/sidecar.py's `signature`: the widths of its rows, the
    column names, `events`, the label names."""
    for row in plan.rows or []:
        sig: dict = {}
        for field in MATRIX_FIELDS:
            if field in row and row[field].ndim == 2 and len(row[field]):
                sig[field] = int(row[field].shape[1])
                if plan.meta.get(NAME_FIELDS[field]) is not None:
                    sig[NAME_FIELDS[field]] = plan.meta[NAME_FIELDS[field]]
        if "events" in row:
            sig["events"] = True
        if plan.labels is not None:
            sig["labels"] = list(plan.labels)
        yield sig


def _random_crop(frames: np.ndarray, size: int, where: float) -> np.ndarray:
    """The `size x size` window of `frames` (uint8 [T, H, W, C], one side `size`) at fraction `where` in [0, 1) of the
    free range along the long side: the same window for every frame."""
    long_side = max(frames.shape[1:3])
    return fit_to_square(frames, size, "crop", offset=int(where * (long_side - size + 1)))


def decode_clips(plan_chunks: Iterable[list[Plan]], reader: Reader) -> Iterator[dict]:
    """Decode + clip: for each planned sample, its clips from one decode of the union of their frames.

    Yields dicts with `frames` uint8 [T, H, W, C], optional `state` [T, S], `action` [T-1, A], `events` [T-1],
    `labels` {name: int}, names, `key`, `start` and `fps` (float, or None: see `_fps`). Unusable samples are skipped
    and counted.

    A chunk of samples is decoded one after another, then its clips are yielded: running each step over a whole chunk
    keeps its code and data in the CPU caches, as in the decoder-only benchmark (interleaving read, plan and decode
    sample by sample measured slower per clip). Skips are counted, and clips yielded, in the order of the samples.
    """
    cfg = reader.cfg
    aspect = "short" if cfg.random_crop else cfg.aspect  # random_crop: short side to image_size, cropped per clip
    for plans in plan_chunks:
        for plan in plans:
            if plan.skip is None and (problem := reader.schema_problem(plan)) is not None:
                plan.skip, plan.detail = "schema_mismatch", problem  # a batch never loses a field for one clip
            if plan.skip is None:
                try:
                    plan.frames = reader.decoder.decode(plan.video, plan.needed, size=cfg.image_size, aspect=aspect)
                except DecodeError as exc:
                    plan.skip, plan.detail = "decode_error", str(exc)
                else:
                    reader.learn(plan)
        for plan in plans:
            if plan.skip is not None:
                reader.skip(plan.skip, plan.key, plan.detail)
                continue
            reader.failure_streak = 0
            meta = plan.meta
            for i, (start, row) in enumerate(zip(plan.starts, plan.rows, strict=True)):
                frames = plan.frames if plan.positions is None else plan.frames[plan.positions[i]]
                if plan.crops is not None:
                    frames = _random_crop(frames, cfg.image_size, float(plan.crops[i]))
                yield {
                    "frames": frames,
                    **row,
                    "labels": plan.labels,
                    "state_names": meta.get("state_names"),
                    "action_names": meta.get("action_names"),
                    "key": plan.key,
                    "start": int(start),
                    "fps": plan.fps,
                }
