"""Write videos (with optional sidecar JSON) into webdataset tar shards: in parallel, in jobs, resumably.

    python -m data_pipeline.write_shards --input videos/|list.txt|list.csv --output shards/
        [--samples-per-shard N | --bytes-per-shard B] [--workers N] [--num-jobs J --job-index I]
        [--size S --aspect crop|pad|squash|short --fps F --gop G] [--max-frames F | --max-seconds S]
        [--val-fraction f --seed s] [--action-rows transition|frame] [--label-map FILE]
        [--max-input-bytes B] [--fetch-deadline S]
    python -m data_pipeline.write_shards --merge shards/          # after the J jobs of a --num-jobs J run

**Input** (data_pipeline/writer_inputs.py): a folder of videos, searched recursively (`NAME.mp4`, .webm, .avi, .mkv,
.mov, ... with an optional sidecar `NAME.json` next to it), or a text or CSV list of paths and http(s) URLs, each
with an optional sidecar. The sidecar holds `state`, `state_names`, `action`, `action_names`, `events`, `labels`
(docs/architecture.md). The shards store one `action` row per transition t -> t+1 (N-1 rows for N frames), and so
must the sidecars by default; sidecars that store one action per frame (N rows, the action taken at frame t, the last
one unused) need `--action-rows frame`, which drops the last row. A sidecar whose row count fits neither is skipped
with the reason (the check is strict: an off-by-one would otherwise shift every action by a frame without a word).
Every sidecar is checked against the sidecar schema (data_pipeline/sidecar.py: types, finite numbers, a size and a
depth limit, one width per field across the dataset, integer labels, or strings of a categorical label declared
with `--label-map FILE` ({"activity": ["walking", "running"]}: stored as 0, 1)); one that breaks it is skipped
with the reason. Whatever goes wrong with one input (unreadable, not a regular file, too big, a download that fails
past its retries or its deadline: data_pipeline/writer_inputs.py) is that input's skip, named; the write goes on.

**Output**:

    OUTPUT/shard-000000.tar      KEY.mp4 (or the source extension) + KEY.json per sample, in the sorted input order
    OUTPUT/index.json            {"shards": [{"name", "samples", "bytes", "sha256"}], "total_samples",
                                  "schema": {field: {"width", "names", "samples", ...}}, "num_jobs"}
    (with --val-fraction: the same under OUTPUT/train/ and OUTPUT/val/)

KEY.json is the sidecar with `fps`, `num_frames`, `height`, `width` filled in from the decoded video (standard
JSON: no NaN or Infinity). Every video is decoded once to check it; one that cannot be read or decoded is reported
by name and skipped, and so is a second input with the KEY of an earlier one (KEYs keep Unicode:
writer_inputs.sanitise_key). With --size/--fps/--gop (or --max-frames/--max-seconds) the video is re-encoded to
H.264 (short GOP, no B-frames) and the sidecar rows follow the kept frames; `--size S` makes frames S x S by
`--aspect`: `crop` (default: short side to S, centre crop), `pad` (long side to S, black bars), `squash` (both
sides to S, the aspect lost), or `short` (short side to S, the aspect kept, the long side rounded to even: the
loader crops, e.g. a random crop per clip with data.random_crop).

**Deterministic and parallel**: `--workers N` prepares (reads, decodes, checks, re-encodes) videos in N processes;
the parent takes the results in input order and writes the tars, so the order and the shard boundaries come from
the sorted input and the samples' bytes alone, never from N or timing. Without re-encoding the shards are
byte-identical whatever N (fixed order, tar mtimes, owners and JSON layout). libx264 is not bit-exact from call to
call here (data_pipeline/encode.py), so re-encoded samples have the same keys, order and metadata and frames equal
within codec noise; with `--samples-per-shard` their shard boundaries are fixed too, with `--bytes-per-shard` a
boundary may move by a sample between runs (the sizes vary by a few bytes).

**Jobs** (a SLURM job array, several machines: docker/write_shards_array.sbatch): `--num-jobs J --job-index I`
writes job I's share: the train/val split is drawn on the whole sorted list first, then job I takes the I-th of J
contiguous slices of each split. Job I names its shards `shard-jIIIII-KKKKKK.tar` (no two jobs collide) and
records them in `OUTPUT/job-IIIII-of-JJJJJ.json`; once all J jobs are done, `--merge OUTPUT` checks that every job
finished, renames the shards in job order to `shard-000000.tar, shard-000001.tar, ...` and writes index.json. The
result holds the same samples in the same order with the same bytes as one run over the whole input; only the shard
boundaries differ (each job starts a new shard, so a job's last shard may be short), hence the numbering. The merge
verifies before it moves anything, and refuses naming the job to rerun: each job file's own digest (an edited or
damaged one), the same input fingerprint, --seed, --val-fraction and options in every job (jobs of different runs
would drop or duplicate samples), each shard's sha256, each job's samples plus its skipped inputs being exactly its
share of the input list in order, and no key in two jobs.

**Another run's output is never deleted**: a write refuses (OutputInUse) an output folder holding the job files of
an unmerged run with another --num-jobs, and a finished folder (index.json) unless both it and the write are single
runs (a single run replaces its own earlier output); so a rerun after a merge never deletes index.json. A single
run removes only shard-NNNNNN.tar names and its own job file.

**Resumable**: a shard is written to `NAME.tar.tmp` and renamed when complete, so a partial tar is never visible.
The job file records the settings (the input fingerprint: writer_inputs.input_digest, the sha256 of the whole
input list with the size and mtime of every local video and sidecar; --seed, --val-fraction, the job's share of its
split, the options), each complete shard (size, sha256, sample count, first and last key, where in the input it
ends), every skipped input (position, name, reason, KEY), and its own digest. A rerun with the same input and
options (any --workers) verifies the recorded shards (size, sha256, tar member list), keeps the leading ones that
verify, and writes from there on; the result is the same as that of an uninterrupted run (byte-identical without
re-encoding). Other options, another input list (a video or sidecar added, removed, replaced or touched), or a job
file that was edited, start over (saying which). At its end a job checks that its samples and skips are exactly its
inputs. A single run (J = 1) writes index.json at the end and removes its job file and any shard-NNNNNN.tar not in
the index.

**Long videos**: `--max-frames F` / `--max-seconds S` cut every video into consecutive segments of F frames (S
seconds at the output frame rate), each its own sample `KEY-segNNNNN` (a last segment of fewer than 2 frames is
dropped), re-encoded (at the source size and frame rate unless --size/--fps say otherwise). A segment of F frames
has its F `state` rows and the F-1 `action`/`events` rows of its own transitions: the transition from one segment's
last frame to the next one's first belongs to neither and is dropped. KEY.json has `"segment": {"of": KEY,
"index", "count", "frame_offset" (its first frame in the re-encoded video's frames), "source_frame" (in the input's
frames), "time_offset" (seconds)}`. Videos are decoded and encoded segment by segment, so memory stays bounded.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import sys
import tarfile
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_pipeline.clips import MetadataError, cut_metadata
from data_pipeline.decoders import DecodeError, PyAVDecoder, frame_to_rgb
from data_pipeline.encode import encode_h264
from data_pipeline.sidecar import DatasetSchema, check_sidecar, load_json, signature
from data_pipeline.writer_inputs import (
    FETCH_DEADLINE_S,
    MAX_INPUT_BYTES,
    VIDEO_EXTENSIONS,
    InputVideo,
    check_regular,
    fetch,
    input_digest,
    list_inputs,
    read_sidecar,
    sanitise_key,
)

__all__ = [
    "VIDEO_EXTENSIONS",
    "OutputInUse",
    "Reencode",
    "Sample",
    "WriteSummary",
    "merge_jobs",
    "prepare_sample",
    "sanitise_key",
    "write_samples",
    "write_shards",
]

STORED_FIELDS = ("fps", "num_frames", "height", "width")
ACTION_ROWS = ("transition", "frame")  # what a sidecar's `action` rows are: one per transition, or one per frame
WRITER_ASPECTS = ("crop", "pad", "squash", "short")  # --aspect
DEFAULT_SAMPLES_PER_SHARD = 1000
JOB_FILE = re.compile(r"^job-(\d{5,})-of-(\d{5,})\.json$")
JOB_FORMAT = 2  # 2: seed, val fraction, input fingerprint, sha256 per shard, skipped keys, the record's own digest
SINGLE_SHARD = re.compile(r"^shard-\d{6}\.tar(\.tmp)?$")  # a single run's (and a merge's) shard names


class OutputInUse(ValueError):
    """The output folder holds another run's output, which this write would delete; the message says what to do."""


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


@dataclass(frozen=True)
class _Options:
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


def _sidecar_problem(sample: Sample, label_map: Mapping[str, list[str]] | None = None) -> dict:
    """The sample's sidecar checked against the schema (data_pipeline/sidecar.py: types, finite numbers, widths of
    its rows, labels: integers or declared categories, mapped to their index): the checks that need no video.
    Raises MetadataError if it could not be read or breaks a rule."""
    if sample.problem:
        raise MetadataError(sample.problem)
    return check_sidecar(sample.sidecar, label_map)


def _checked_sidecar(
    sample: Sample, num_frames: int, action_rows: str = "transition", label_map: Mapping | None = None
) -> dict:
    """The sample's sidecar in the shard format (one `action` row per transition, labels as integers) after
    checking it against the schema and a video of `num_frames` frames; with `action_rows="frame"` the sidecar has one
    action per frame and the last is dropped.

    Raises MetadataError with the reason, naming --action-rows when the `action` row count fits the other option.
    """
    sidecar = _sidecar_problem(sample, label_map)
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


def _resampled_indices(num_frames: int, src_fps: float, fps: float | None) -> np.ndarray:
    """Source frame for each output frame when changing the frame rate (nearest frame in time): int64 [T_out]."""
    if fps is None or fps == src_fps:
        return np.arange(num_frames)
    if src_fps <= 0:
        raise DecodeError("the video reports no frame rate, so it cannot be resampled to --fps")
    duration = (num_frames - 1) / src_fps
    out = np.arange(int(np.floor(duration * fps + 1e-9)) + 1)
    return np.minimum(np.round(out * src_fps / fps).astype(np.int64), num_frames - 1)


def _open_video(video: bytes | str):
    """A PyAV container of in-memory `video` bytes or of a local file path; DecodeError if it has no video stream."""
    import av  # noqa: PLC0415 (PyAV is imported by the decoders already; kept local like theirs)

    what = f"{len(video)} bytes" if isinstance(video, bytes) else video
    try:
        container = av.open(io.BytesIO(video) if isinstance(video, bytes) else video, mode="r")
    except (av.FFmpegError, ValueError, EOFError, OSError) as exc:
        raise DecodeError(f"pyav cannot open the video ({what}): {exc}") from exc
    if not container.streams.video:
        container.close()
        raise DecodeError(f"pyav: no video stream in the data ({what})")
    container.streams.video[0].codec_context.thread_count = 1  # the workers are the parallelism (see _decoder)
    return container


def _decoded(container) -> Iterator:
    """The container's decoded video frames in order, FFmpeg errors as DecodeError."""
    import av  # noqa: PLC0415

    try:
        yield from container.decode(video=0)
    except (av.FFmpegError, ValueError, EOFError) as exc:
        raise DecodeError(f"pyav: decoding failed: {exc}") from exc


def _segment_length(options: _Options, fps: float) -> int | None:
    """Output frames per segment (None: the video is one sample)."""
    if not options.segmented:
        return None
    lengths = [options.max_frames] if options.max_frames is not None else []
    if options.max_seconds is not None:
        lengths.append(math.floor(options.max_seconds * fps + 1e-9))
    length = min(lengths)
    if length < 2:
        raise DecodeError(f"--max-seconds {options.max_seconds} at {fps:g} fps is {length} frame(s); a segment needs 2")
    return length


def _reencoded(sample: Sample, video: bytes | str, options: _Options) -> list[tuple[str, bytes, dict]]:
    """Decode `video` (bytes, or a local path read as a stream) once, frame by frame, resize (and resample to
    `reencode.fps`), and re-encode it to H.264: [(key, mp4 bytes, KEY.json dict)], one entry, or one per segment
    with --max-frames/--max-seconds (only one segment's frames, uint8 [F, S, S, 3], are held at a time).

    The output frames are those of `_resampled_indices` (nearest source frame in time). The sidecar is checked once
    the frame count is known; raises DecodeError or MetadataError with the reason.
    """
    reencode = options.reencode
    assert reencode is not None
    _sidecar_problem(sample, options.labels)  # a bad sidecar is skipped before the video is decoded
    size = reencode.size or 0
    with _open_video(video) as container:
        stream = container.streams.video[0]
        src_fps = float(stream.average_rate or stream.guessed_rate or 0)
        resample = reencode.fps is not None and reencode.fps != src_fps
        if resample and src_fps <= 0:
            raise DecodeError("the video reports no frame rate, so it cannot be resampled to --fps")
        fps = float(reencode.fps or src_fps)
        if fps <= 0:
            raise DecodeError("the video reports no frame rate; pass --fps")
        seg = _segment_length(options, fps)
        # frames held back before a full segment is encoded: the last output frames of a resampled video may be
        # dropped once the frame count is known (see below), so a segment is encoded only when frames follow it
        reserve = 1 + (math.ceil(0.5 * fps / src_fps) + 1 if resample else 0)
        pending: list[np.ndarray] = []
        pending_src: list[int] = []
        encoded: list[tuple[bytes, list[int], tuple[int, int]]] = []
        num_frames, out = 0, 0

        def encode(count: int) -> None:
            frames = np.stack(pending[:count])
            try:
                data = encode_h264(frames, fps, gop=reencode.gop, crf=reencode.crf)
            except ValueError as exc:
                raise DecodeError(f"re-encoding failed: {exc}") from exc
            encoded.append((data, pending_src[:count], frames.shape[1:3]))
            del pending[:count], pending_src[:count]

        for i, frame in enumerate(_decoded(container)):
            num_frames = i + 1
            copies = 1
            if resample:  # output frames whose nearest source frame is i (as _resampled_indices computes it)
                copies = 0
                while int(np.round(out * src_fps / fps)) == i:
                    copies, out = copies + 1, out + 1
            if copies:
                rgb = frame_to_rgb(frame, size, reencode.aspect, even=True)
                pending += [rgb] * copies
                pending_src += [i] * copies
            if seg is not None and len(pending) >= seg + reserve:
                encode(seg)
    if num_frames == 0:
        raise DecodeError("pyav: the video has no decodable frames")
    if resample:  # _resampled_indices' count: frames past the last source frame's time are dropped
        total = int(np.floor((num_frames - 1) / src_fps * fps + 1e-9)) + 1
        excess = sum(len(src) for _, src, _ in encoded) + len(pending) - total
        del pending[len(pending) - excess :], pending_src[len(pending_src) - excess :]
    meta = dict(_checked_sidecar(sample, num_frames, options.action_rows, options.labels))
    while pending:
        count = len(pending) if seg is None else min(seg, len(pending))
        if seg is not None and count < 2:  # a 1-frame tail has no transition: dropped
            break
        encode(count)
    if not encoded:
        raise DecodeError(f"the video has {num_frames} frame(s): too short for a segment of at least 2 frames")
    full = {**meta, "num_frames": num_frames}
    results, offset = [], 0
    for index, (data, src, (height, width)) in enumerate(encoded):
        sample_meta = dict(meta)
        sample_meta.update({k: v.tolist() for k, v in cut_metadata(full, np.asarray(src, dtype=np.int64)).items()})
        sample_meta.update(fps=fps, num_frames=len(src), height=int(height), width=int(width))
        key = sample.key
        if seg is not None:
            key = f"{sample.key}-seg{index:05d}"
            sample_meta["segment"] = {
                "of": sample.key,
                "index": index,
                "count": len(encoded),
                "frame_offset": offset,
                "source_frame": int(src[0]),
                "time_offset": offset / fps,
            }
        results.append((key, data, sample_meta))
        offset += len(src)
    return results


def prepare_sample(
    sample: Sample,
    reencode: Reencode | None,
    decoder: PyAVDecoder,
    *,
    action_rows: str = "transition",
    label_map: Mapping[str, list[str]] | None = None,
) -> tuple[bytes, str, dict]:
    """Check (and optionally re-encode) one video -> (video bytes, extension, KEY.json dict).

    `action_rows`: "transition" (the sidecar's `action` has one row per transition, as stored) or "frame" (one row
    per frame; the last is dropped). `label_map`: declared categorical labels ({name: [category, ...]}). Raises
    DecodeError or MetadataError with the reason when the sample must be skipped.
    """
    if reencode is None:
        _sidecar_problem(sample, label_map)  # a bad sidecar is skipped before the video is decoded
        info = decoder.info(sample.video)
        if not (math.isfinite(info.fps) and info.fps >= 0):
            raise DecodeError(f"the video reports a frame rate of {info.fps}")
        meta = dict(_checked_sidecar(sample, info.num_frames, action_rows, label_map))
        meta.update(fps=info.fps, num_frames=info.num_frames, height=info.height, width=info.width)
        return sample.video, sample.ext, meta
    labels = read_label_map(label_map)
    ((_, video, meta),) = _reencoded(sample, sample.video, _Options(reencode, action_rows, label_map=labels))
    return video, "mp4", meta


@dataclass
class _Prepared:
    """One input, ready for the tars: its samples (one, or one per segment) as (key, tar entries), or the reason it
    is skipped."""

    source: str
    samples: list[tuple[str, list[tuple[str, bytes]]]] = field(default_factory=list)
    problem: str | None = None
    key: str = ""  # the input's KEY (its samples' keys start with it)
    signature: dict = field(default_factory=dict)  # what its samples add to the dataset schema (sidecar.signature)


def _meta_bytes(meta: dict) -> bytes:
    """KEY.json as stored: standard JSON (allow_nan=False: a NaN that got this far is a ValueError, not a token other
    readers refuse)."""
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _prepare(sample: Sample, options: _Options, decoder: PyAVDecoder, video: bytes | str | None = None) -> _Prepared:
    """Prepare `sample` (its bytes, or `video`: a local path to stream from when re-encoding)."""
    try:
        if options.reencode is None:
            data, ext, meta = prepare_sample(
                sample, None, decoder, action_rows=options.action_rows, label_map=options.labels
            )
            outputs = [(sample.key, data, meta)]
        else:
            ext = "mp4"
            outputs = _reencoded(sample, sample.video if video is None else video, options)
        samples = [(key, [(ext, data), ("json", _meta_bytes(meta))]) for key, data, meta in outputs]
    except (DecodeError, ValueError) as exc:  # MetadataError is a ValueError
        return _Prepared(sample.source, problem=f"{type(exc).__name__}: {exc}", key=sample.key)
    return _Prepared(sample.source, samples, key=sample.key, signature=signature(outputs[0][2]))


class _OneThreadDecoder(PyAVDecoder):
    """PyAV decoding in one thread: FFmpeg's default (thread_count 0: as many as there are cores, where the codec
    can, e.g. VP9's tiles) would make --workers N use more than N cores, and 1 worker more than 1."""

    def _open(self, data: bytes):
        container = super()._open(data)
        container.streams.video[0].codec_context.thread_count = 1
        return container


_process_decoder: PyAVDecoder | None = None


def _decoder() -> PyAVDecoder:
    """This process's decoder (one per worker process)."""
    global _process_decoder
    if _process_decoder is None:
        _process_decoder = _OneThreadDecoder()
    return _process_decoder


def _prepare_input(task: tuple[InputVideo, str | None], options: _Options) -> _Prepared:
    """Read and prepare one listed video (runs in a worker process); `task` = (video, why it is skipped already).
    Whatever goes wrong is this input's skip, with the reason: one input never ends the write."""
    video, problem = task
    try:
        return _prepare_listed(video, problem, options)
    except Exception as exc:  # noqa: BLE001 (an input nothing else caught: its skip, named, not the write's end)
        return _Prepared(video.source, problem=f"unexpected {type(exc).__name__}: {exc}", key=video.key)


def _prepare_listed(video: InputVideo, problem: str | None, options: _Options) -> _Prepared:
    if problem:
        return _Prepared(video.source, problem=problem, key=video.key)
    if options.reencode is None and video.ext not in VIDEO_EXTENSIONS:
        known = ", ".join(VIDEO_EXTENSIONS)
        return _Prepared(
            video.source,
            problem=f"the extension {video.ext or '(none)'!r} is not one the loader reads ({known}); re-encode it "
            "(--size, --fps or --gop) to store it as mp4",
            key=video.key,
        )
    stream_from_path = options.reencode is not None and not video.is_url  # decoded straight from the file
    try:
        if stream_from_path:
            check_regular(video.location, options.max_input_bytes)  # before FFmpeg opens it (a FIFO would hang)
            data = b""
        else:
            data = fetch(video.location, max_bytes=options.max_input_bytes, deadline_s=options.fetch_deadline_s)
    except OSError as exc:
        return _Prepared(video.source, problem=f"OSError: {exc}", key=video.key)
    sidecar, problem = read_sidecar(video, deadline_s=options.fetch_deadline_s)
    sample = Sample(video.key, data, video.ext, sidecar, video.source, problem)
    return _prepare(sample, options, _decoder(), video.location if stream_from_path else None)


def _ordered_map(fn: Callable, tasks: Iterable, workers: int, ahead: int = 8) -> Iterator:
    """`fn(task)` for every task, results in task order: in this process (workers <= 1) or in `workers` processes.

    A worker that finishes takes the next task even while an earlier, longer one is still running (one task waits in
    the pool's queue at all times), up to `ahead * workers` tasks started or finished but not yet taken by the caller:
    the bound on the results held in memory while a long video holds the head of the line.
    """
    if workers <= 1:
        yield from map(fn, tasks)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context)
    tasks = iter(tasks)
    pending: deque = deque()  # futures in task order, the caller's next result first
    exhausted = False

    def top_up() -> None:
        nonlocal exhausted
        while not exhausted and len(pending) < ahead * workers:
            if sum(not f.done() for f in pending) > workers:  # every worker busy and one task queued
                return
            try:
                task = next(tasks)
            except StopIteration:
                exhausted = True
                return
            pending.append(pool.submit(fn, task))

    try:
        top_up()
        while pending:
            while not pending[0].done():
                wait([f for f in pending if not f.done()], return_when=FIRST_COMPLETED)
                top_up()
            result = pending.popleft().result()
            top_up()
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _tar_add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


def _shard_name(number: int, job: tuple[int, int] = (0, 1)) -> str:
    """Shard `number` of job (index, count): shard-NNNNNN.tar in a single run, shard-jIIIII-NNNNNN.tar in a job."""
    index, count = job
    return f"shard-{number:06d}.tar" if count == 1 else f"shard-j{index:05d}-{number:06d}.tar"


def _job_file(output: Path, job: tuple[int, int]) -> Path:
    return output / f"job-{job[0]:05d}-of-{job[1]:05d}.json"


def _write_json(path: Path, data: dict, **dump) -> None:
    """Write `data` to `path` atomically (a temporary file renamed over it)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, **dump) + "\n")
    tmp.replace(path)


def _record_digest(record: dict) -> str:
    """sha256 of a job record's canonical JSON, without its own `digest` field."""
    body = {k: v for k, v in record.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _save_record(path: Path, record: dict) -> None:
    """Write a job file atomically, with the digest of its content (so an edited or damaged one is seen as such)."""
    record["digest"] = _record_digest(record)
    _write_json(path, record, indent=1)


def _load_record(path: Path) -> tuple[dict | None, str]:
    """(the job record, ""), or (None, why it cannot be trusted)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        return None, f"cannot be read ({exc})"
    if not isinstance(record, dict) or record.get("format") != JOB_FORMAT:
        return None, f"is not a job file of this writer's format ({JOB_FORMAT})"
    if record.get("digest") != _record_digest(record):
        return None, "was edited or damaged after the writer wrote it (its digest does not match its content)"
    return record, ""


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


def _scan_shard(path: Path) -> tuple[str, list[str], list[tuple[dict, str]]] | None:
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


class _ShardSink:
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
            name = _shard_name(len(self.shards), self.job)
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


def _index_entry(shard: dict) -> dict:
    return {"name": shard["name"], "samples": shard["samples"], "bytes": shard["bytes"], "sha256": shard["sha256"]}


def _finish_folder(output: Path, shards: list[dict], schema: DatasetSchema, num_jobs: int = 1) -> None:
    """Write OUTPUT/index.json for `shards` (renamed already), with the dataset's sidecar schema and the --num-jobs
    of the run that made it, then remove what is not part of it: this run's other shard tars, its temporary files
    and its job files. A single run (num_jobs 1) removes only shard-NNNNNN.tar names and its own job file."""
    names = {s["name"] for s in shards}
    index = {
        "shards": [_index_entry(s) for s in shards],
        "total_samples": sum(s["samples"] for s in shards),
        "schema": schema.to_json(),
        "num_jobs": num_jobs,
    }
    _write_json(output / "index.json", index, indent=1)
    for stale in [*output.glob("shard-*.tar"), *output.glob("shard-*.tar.tmp")]:
        if stale.name not in names and (num_jobs > 1 or SINGLE_SHARD.match(stale.name)):
            stale.unlink(missing_ok=True)
    jobs = "job-*-of-*.json" if num_jobs > 1 else _job_file(output, (0, 1)).name
    for pattern in (jobs, jobs + ".tmp"):
        for stale in output.glob(pattern):
            stale.unlink(missing_ok=True)


def _index_num_jobs(index: Path) -> int:
    """The --num-jobs of the run that wrote `index` (1 when it does not say or cannot be read)."""
    try:
        made = json.loads(index.read_text()).get("num_jobs", 1)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, AttributeError):
        return 1
    return made if isinstance(made, int) and not isinstance(made, bool) else 1


def _claim_folder(output: Path, num_jobs: int) -> None:
    """Refuse (OutputInUse) to write into a folder holding another run's output, which the write would delete or
    mix with its own: job files of an unmerged run with another --num-jobs; a finished dataset (index.json) where a
    job of a --num-jobs run would write (its samples would be there twice); the merged output of a --num-jobs run
    where a single run would write. A single run may replace a single run's output (the same folder, written again).
    """
    if not output.is_dir():
        return
    counts = sorted({int(m.group(2)) for p in output.iterdir() if (m := JOB_FILE.match(p.name))} - {num_jobs})
    if counts:
        merge = output.parent if output.name in ("train", "val") else output
        raise OutputInUse(
            f"{output} holds the job files of an unmerged {counts[0]}-job run (job-*-of-{counts[0]:05d}.json), and "
            f"this write (--num-jobs {num_jobs}) would delete them with their shards: merge that run first "
            f"(python -m data_pipeline.write_shards --merge {merge}), write to another --output, or delete its "
            "job-*.json and shard-j*.tar files yourself"
        )
    index = output / "index.json"
    if not os.path.lexists(index):
        return
    made = _index_num_jobs(index)
    if num_jobs > 1:
        raise OutputInUse(
            f"{output} holds a finished dataset (index.json, written by a {made}-job run); a job of a --num-jobs "
            "run writes into a new folder, or one holding only its own run's job files (rerunning a job after the "
            f"merge would leave its samples there twice): write to another --output, or delete {output}'s "
            "index.json and shards first"
        )
    if made > 1:
        raise OutputInUse(
            f"{output} holds the merged output of a {made}-job run (index.json), which a single run would delete: "
            f"write to another --output, or delete {output}'s index.json and shards first"
        )


def _check_limits(samples_per_shard: int | None, bytes_per_shard: int | None) -> int | None:
    if samples_per_shard is None and bytes_per_shard is None:
        samples_per_shard = DEFAULT_SAMPLES_PER_SHARD
    for name, limit in (("samples_per_shard", samples_per_shard), ("bytes_per_shard", bytes_per_shard)):
        if limit is not None and limit < 1:
            raise ValueError(f"{name} must be >= 1, got {limit}")
    return samples_per_shard


def _write_prepared(
    items: Iterable[_Prepared],
    sink: _ShardSink,
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


def write_samples(
    samples: Iterable[Sample],
    output: str | Path,
    *,
    samples_per_shard: int | None = None,
    bytes_per_shard: int | None = None,
    reencode: Reencode | None = None,
    total: int | None = None,
    progress: bool = True,
    action_rows: str = "transition",
) -> WriteSummary:
    """Write `samples` in order into OUTPUT/shard-*.tar + OUTPUT/index.json, in this process (for samples made in
    memory, e.g. by a simulator; `write_shards` reads inputs in parallel and resumes). Shards left from an earlier,
    larger run in OUTPUT are removed; a folder holding another kind of run's output is refused (OutputInUse).
    Undecodable samples, and sidecars that break the schema (data_pipeline/sidecar.py), are skipped and listed in
    the returned summary. `action_rows` says what the sidecars' `action` rows are: "transition" (one per transition
    t -> t+1, N-1 rows for N frames, as stored) or "frame" (N rows, one per frame; the last row is dropped)."""
    if action_rows not in ACTION_ROWS:
        raise ValueError(f"action_rows must be one of {ACTION_ROWS}, got {action_rows!r}")
    samples_per_shard = _check_limits(samples_per_shard, bytes_per_shard)
    output = Path(output)
    _claim_folder(output, 1)
    output.mkdir(parents=True, exist_ok=True)
    (output / "index.json").unlink(missing_ok=True)  # the folder is complete again when a new one is written
    summary, seen, options = WriteSummary(output), set(), _Options(reencode, action_rows)
    schema = DatasetSchema()
    sink = _ShardSink(output, samples_per_shard, bytes_per_shard)

    def prepared() -> Iterator[_Prepared]:
        for sample in samples:
            if sample.key in seen:  # found before the work (the writer checks again, for the message)
                yield _Prepared(sample.source, [(sample.key, [])], key=sample.key)
            else:
                yield _prepare(sample, options, _decoder())

    with tqdm(total=total, desc=f"writing {output}", unit=" videos", disable=not progress) as bar:
        _write_prepared(prepared(), sink, summary, seen, schema, bar=bar)
    sink.close()
    summary.shards = [_index_entry(s) for s in sink.shards]
    _finish_folder(output, sink.shards, schema)
    return summary


def _keys_digest(keys: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode("utf-8", "surrogateescape")).hexdigest()


def _settings(
    split: str,
    digest: str,
    videos: list[InputVideo],
    job: tuple[int, int],
    options: _Options,
    limits: tuple,
    seed: int,
    val_fraction: float,
) -> dict:
    """What a job's output depends on (any --workers gives the same): the whole input list (`digest`, see
    writer_inputs.input_digest), the options that decide the split (seed, fraction), this job's share of its split
    (its inputs' keys), and the options."""
    return {
        "inputs": digest,
        "split": split,
        "seed": seed,
        "val_fraction": val_fraction,
        "job": list(job),
        "count": len(videos),
        "slice": _keys_digest(v.key for v in videos),
        "options": _options_record(options, limits),
    }


def _options_record(options: _Options, limits: tuple) -> dict:
    return {
        "samples_per_shard": limits[0],
        "bytes_per_shard": limits[1],
        "reencode": asdict(options.reencode) if options.reencode else None,
        "action_rows": options.action_rows,
        "max_frames": options.max_frames,
        "max_seconds": options.max_seconds,
        "label_map": options.labels,
        "max_input_bytes": options.max_input_bytes,
        "fetch_deadline_s": options.fetch_deadline_s,
    }


_SETTING_NAMES = {
    "inputs": "input list (a video or sidecar added, removed, replaced or touched since)",
    "seed": "--seed",
    "val_fraction": "--val-fraction",
    "options": "options (shard size, re-encoding, --action-rows, --label-map, input limits)",
    "job": "--num-jobs / --job-index",
    "split": "split",
    "count": "share of the inputs",
    "slice": "share of the inputs",
}


def _differences(
    old: object, new: dict, names: Iterable[str] = _SETTING_NAMES, values: str = "{old} (now {new})"
) -> list[str]:
    """The settings (of `_settings`) in which `old` differs from `new`, described, with the values of small ones
    (formatted by `values`)."""
    if not isinstance(old, dict):
        return ["settings (it records none)"]
    out = []
    for name in names:
        if old.get(name) != new.get(name):
            text = _SETTING_NAMES[name]
            if name in ("seed", "val_fraction", "job"):
                text += " " + values.format(old=old.get(name), new=new.get(name))
            if text not in out:
                out.append(text)
    return out


def _verified(output: Path, shards: list[dict], schema: DatasetSchema) -> tuple[list[dict], list[str]]:
    """The leading shards of `shards` whose content is as recorded (size, sha256, sample count, first and last
    key), and their sample keys in order; their samples are added to `schema`."""
    kept: list[dict] = []
    keys: list[str] = []
    for shard in shards:
        path = output / shard["name"]
        if not path.is_file() or path.stat().st_size != shard.get("bytes"):
            break
        scanned = _scan_shard(path)
        if scanned is None:
            break
        sha, found, signatures = scanned
        ends = (shard.get("first_key"), shard.get("last_key"))
        if sha != shard.get("sha256") or not found or len(found) != shard["samples"] or (found[0], found[-1]) != ends:
            break
        kept.append(shard)
        keys += found
        for sig, key in signatures:
            schema.add(sig, key)
    return kept, keys


_SEGMENT_KEY = re.compile(r"^(.*)-seg(\d{5,})$")


def _input_keys(keys: list[str], segmented: bool) -> list[str]:
    """The KEY of each input whose samples `keys` are, in order (with segments: a run of KEY-segNNNNN is one input)."""
    if not segmented:
        return list(keys)
    out: list[str] = []
    previous = None
    for key in keys:
        match = _SEGMENT_KEY.match(key)
        base, index = (match.group(1), int(match.group(2))) if match else (key, 0)
        if index == 0 or base != previous:
            out.append(base)
        previous = base
    return out


def _union_problem(settings: dict, skipped: list, keys: list[str], segmented: bool) -> str | None:
    """Why a job's samples (`keys`, in shard order) and its skipped inputs are not exactly its share of the inputs
    (in order, no key twice), or None."""
    repeated = next((k for k, n in Counter(keys).items() if n > 1), None)
    if repeated is not None:
        return f"its shards hold the sample {repeated!r} twice"
    written = _input_keys(keys, segmented)
    skips = {s[0]: s[3] for s in skipped if isinstance(s, list) and len(s) == 4}
    count = settings["count"]
    if len(skips) != len(skipped) or len(written) + len(skips) != count or any(not 0 <= p < count for p in skips):
        return (
            f"its shards hold {len(written)} inputs and it skipped {len(skipped)}, but its share of the input list "
            f"has {count}: samples are missing or extra"
        )
    rest = iter(written)
    ordered = [skips[p] if p in skips else next(rest) for p in range(count)]
    if _keys_digest(ordered) != settings["slice"]:
        return "its shards and skipped inputs are not its share of the input list (other inputs, or out of order)"
    return None


def _write_job(
    videos: list[InputVideo],
    problems: dict[int, str],
    output: Path,
    *,
    split: str,
    digest: str,
    seed: int,
    val_fraction: float,
    options: _Options,
    limits: tuple[int | None, int | None],
    job: tuple[int, int],
    workers: int,
    progress: bool,
) -> WriteSummary:
    """Write one job's share `videos` (positions in `problems` are skipped with that reason) into `output`,
    resuming from its job file when it verifies (its digest) and its settings match."""
    output.mkdir(parents=True, exist_ok=True)
    if job[1] == 1:
        (output / "index.json").unlink(missing_ok=True)  # a single run replaces its folder: rewritten when complete
    job_file = _job_file(output, job)
    settings = _settings(split, digest, videos, job, options, limits, seed, val_fraction)
    state = None
    if job_file.exists():
        state, why = _load_record(job_file)
        if state is not None and state.get("settings") != settings:
            why = f"is from another run: other {', '.join(_differences(state.get('settings'), settings))}"
            state = None
        if state is None:
            print(f"{output}: {job_file.name} {why}; starting over", file=sys.stderr)
    schema = DatasetSchema(categories=options.labels)
    kept, written = _verified(output, state["shards"], schema) if state else ([], [])
    start = tuple(kept[-1]["next"]) if kept else (0, 0)
    skipped_at = [s for s in state["skipped"] if s[0] < start[0]] if state else []
    keep = {s["name"] for s in kept}
    prefix = _shard_name(0, job).rsplit("-", 1)[0] + "-"  # this job's shard names: shard- or shard-jIIIII-
    for stale in [*output.glob(f"{prefix}*.tar"), *output.glob(f"{prefix}*.tar.tmp")]:
        own = job[1] > 1 or SINGLE_SHARD.match(stale.name)
        if own and stale.name not in keep:
            stale.unlink(missing_ok=True)
    record = {
        "format": JOB_FORMAT,
        "settings": settings,
        "job_index": job[0],
        "num_jobs": job[1],
        "inputs": len(videos),
        "complete": False,
        "shards": kept,
        "skipped": skipped_at,
    }
    _save_record(job_file, record)
    summary = WriteSummary(output, skipped=[(s[1], s[2]) for s in skipped_at], kept=len(kept))
    summary.written = len(written)
    summary.job = job if job[1] > 1 else None

    def save(_shard: dict | None = None) -> None:
        record["shards"] = sink.shards
        _save_record(job_file, record)

    sink = _ShardSink(output, *limits, job=job, shards=kept, keys=written, on_close=save)
    tasks = ((videos[i], problems.get(i)) for i in range(start[0], len(videos)))
    desc = f"writing {output}" + (f" (job {job[0]} of {job[1]})" if job[1] > 1 else "")
    with tqdm(total=len(videos), initial=start[0], desc=desc, unit=" videos", disable=not progress) as bar:
        items = _ordered_map(partial(_prepare_input, options=options), tasks, workers)
        _write_prepared(items, sink, summary, set(written), schema, start=start, skipped_at=skipped_at, bar=bar)
    sink.close((len(videos), 0))
    problem = _union_problem(settings, skipped_at, sink.keys, options.segmented)
    if problem is not None:
        raise RuntimeError(
            f"{output} (job {job[0]} of {job[1]}): {problem}. Did its shards or {job_file.name} change while it ran? "
            "Run it again"
        )
    record["complete"] = True
    save()
    summary.shards = [_index_entry(s) for s in sink.shards]
    if job[1] == 1:
        _finish_folder(output, sink.shards, schema)
    return summary


def _duplicates(videos: list[InputVideo]) -> dict[int, str]:
    """{position: reason} for every video whose key an earlier video of the list has."""
    first: dict[str, int] = {}
    out = {}
    for i, video in enumerate(videos):
        if video.key in first:
            out[i] = f"duplicate key {video.key!r} (as {videos[first[video.key]].source}; rename one, or set the key)"
        else:
            first[video.key] = i
    return out


def write_shards(
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    samples_per_shard: int | None = None,
    bytes_per_shard: int | None = None,
    size: int | None = None,
    fps: float | None = None,
    gop: int | None = None,
    aspect: str = "crop",
    max_frames: int | None = None,
    max_seconds: float | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
    progress: bool = True,
    action_rows: str = "transition",
    workers: int = 1,
    num_jobs: int = 1,
    job_index: int = 0,
    label_map: str | Path | Mapping | None = None,
    max_input_bytes: int = MAX_INPUT_BYTES,
    fetch_deadline_s: float = FETCH_DEADLINE_S,
) -> dict[str, WriteSummary]:
    """Shard the videos of `input_dir` (a folder, searched recursively, or a text/CSV list of paths and URLs) into
    `output_dir` (or its train/ and val/ when `val_fraction` > 0); see the module docstring for every option.

    Returns the summary per split ("all", or "train" and "val"). The val split is a seeded random
    `round(val_fraction * N)` of the N listed videos; shards keep the videos in sorted order. With `num_jobs` > 1
    this writes job `job_index`'s share of each split; `merge_jobs` finishes the folder once every job is done.
    `action_rows`: see `write_samples`. `label_map`: declared categorical labels, a JSON file (or a mapping)
    {label: [category, ...]} (data_pipeline/sidecar.py). `max_input_bytes`, `fetch_deadline_s`: the size cap and the
    download deadline per input (data_pipeline/writer_inputs.py). Raises OutputInUse when `output_dir` holds another
    run's output (see `_claim_folder`), ValueError for a bad option, FileNotFoundError for a missing input.
    """
    if action_rows not in ACTION_ROWS:
        raise ValueError(f"action_rows must be one of {ACTION_ROWS}, got {action_rows!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if aspect not in WRITER_ASPECTS:
        raise ValueError(f"aspect must be one of {', '.join(WRITER_ASPECTS)}, got {aspect!r}")
    if size is not None and (size < 2 or size % 2):
        raise ValueError(f"size must be an even number >= 2 (H.264 stores even frame sizes), got {size}")
    if max_frames is not None and max_frames < 2:
        raise ValueError(f"max_frames must be >= 2 (a segment needs a transition), got {max_frames}")
    if max_seconds is not None and max_seconds <= 0:
        raise ValueError(f"max_seconds must be > 0, got {max_seconds}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if num_jobs < 1 or not 0 <= job_index < num_jobs:
        raise ValueError(f"job_index must be in [0, num_jobs) and num_jobs >= 1, got {job_index} and {num_jobs}")
    if max_input_bytes < 1 or not fetch_deadline_s > 0:
        raise ValueError(f"max_input_bytes and fetch_deadline_s must be > 0, got {max_input_bytes}, {fetch_deadline_s}")
    limits = (_check_limits(samples_per_shard, bytes_per_shard), bytes_per_shard)
    labels = read_label_map(label_map)
    videos = list_inputs(input_dir)
    segmented = max_frames is not None or max_seconds is not None
    reencode = Reencode(size, fps, gop or 8, aspect=aspect) if (size or fps or gop or segmented) else None
    options = _Options(reencode, action_rows, max_frames, max_seconds, labels, max_input_bytes, fetch_deadline_s)
    output = Path(output_dir)
    if val_fraction > 0:
        val_ids = set(np.random.default_rng(seed).permutation(len(videos))[: round(val_fraction * len(videos))])
        splits = {
            "train": [v for i, v in enumerate(videos) if i not in val_ids],
            "val": [v for i, v in enumerate(videos) if i in val_ids],
        }
        targets = {"train": output / "train", "val": output / "val"}
    else:
        splits, targets = {"all": videos}, {"all": output}
    for target in targets.values():  # every folder before any is written
        _claim_folder(target, num_jobs)
    digest = input_digest(videos)
    summaries = {}
    for split, listed in splits.items():
        problems = _duplicates(listed)
        lo, hi = len(listed) * job_index // num_jobs, len(listed) * (job_index + 1) // num_jobs
        summaries[split] = _write_job(
            listed[lo:hi],
            {i - lo: reason for i, reason in problems.items() if lo <= i < hi},
            targets[split],
            split=split,
            digest=digest,
            seed=seed,
            val_fraction=val_fraction,
            options=options,
            limits=limits,
            job=(job_index, num_jobs),
            workers=workers,
            progress=progress,
        )
    return summaries


def _rerun(index: int, num_jobs: int) -> str:
    return f"rerun job {index} (--num-jobs {num_jobs} --job-index {index}), then merge"


def _merge_folder(folder: Path) -> WriteSummary:
    """Merge the job files of one folder (see `merge_jobs`)."""
    found: dict[int, dict] = {}
    counts = set()
    for path in sorted(folder.glob("job-*-of-*.json")):
        match = JOB_FILE.match(path.name)
        if match is None:
            continue
        index, count = int(match.group(1)), int(match.group(2))
        record, why = _load_record(path)
        if record is None:
            raise RuntimeError(f"cannot merge {folder}: {path.name} (job {index}) {why}: {_rerun(index, count)}")
        found[index] = record
        counts.add(count)
    if len(counts) > 1:
        raise RuntimeError(
            f"{folder} holds job files of runs with different --num-jobs ({sorted(counts)}): delete the job files "
            "(job-*-of-*.json) of the run you do not want, then merge"
        )
    (num_jobs,) = counts
    missing = [i for i in range(num_jobs) if i not in found]
    unfinished = [i for i, record in sorted(found.items()) if not record.get("complete")]
    if missing or unfinished:
        raise RuntimeError(
            f"cannot merge {folder}: of {num_jobs} jobs, "
            + "; ".join(
                part
                for part in (
                    f"job(s) {missing} have not started" if missing else "",
                    f"job(s) {unfinished} have not finished" if unfinished else "",
                )
                if part
            )
            + f". Run them (again: a job resumes where it stopped) with --num-jobs {num_jobs} --job-index I, then merge"
        )
    first = found[0]["settings"]
    for index, record in sorted(found.items()):
        settings = record["settings"]
        if settings.get("job") != [index, num_jobs]:
            raise RuntimeError(
                f"cannot merge {folder}: job {index}'s file records job {settings.get('job')}: "
                + _rerun(index, num_jobs)
            )
        names = ("inputs", "seed", "val_fraction", "options", "split")
        differ = _differences(first, settings, names, values="{new} (job 0: {old})")
        if differ:
            raise RuntimeError(
                f"cannot merge {folder}: job {index} was written with another {' and another '.join(differ)} than "
                f"job 0, so their shares of the input list do not add up (samples would be missing or there twice): "
                f"rerun job {index} (or every job) with the same --input and options as the others, then merge"
            )
    options = first["options"]
    segmented = options.get("max_frames") is not None or options.get("max_seconds") is not None
    schema = DatasetSchema(categories=options.get("label_map"))
    moves, number, owner = [], 0, {}
    for index in range(num_jobs):
        record = found[index]
        job_schema, job_keys = DatasetSchema(categories=options.get("label_map")), []
        for shard in record["shards"]:
            source, target = folder / shard["name"], folder / _shard_name(number)
            number += 1
            picked = None
            for candidate in (source, target):  # the target: moved by an interrupted merge
                if candidate.is_file() and candidate.stat().st_size == shard["bytes"]:
                    scanned = _scan_shard(candidate)
                    if scanned is not None and scanned[0] == shard["sha256"]:
                        picked = candidate, scanned
                        break
            if picked is None:
                raise RuntimeError(
                    f"cannot merge {folder}: {shard['name']} of job {index} is missing, or its content is not what "
                    f"job {index} recorded (size, sha256): {_rerun(index, num_jobs)} (it rewrites what does not "
                    "verify)"
                )
            path, (_, keys, signatures) = picked
            moves.append((path, target, shard))
            job_keys += keys
            for sig, key in signatures:
                job_schema.add(sig, key)
        problem = _union_problem(record["settings"], record["skipped"], job_keys, segmented)
        if problem is not None:
            raise RuntimeError(f"cannot merge {folder}: job {index}: {problem}: {_rerun(index, num_jobs)}")
        for key in job_keys:
            if key in owner:
                raise RuntimeError(
                    f"cannot merge {folder}: the sample {key!r} is in job {owner[key]} and in job {index}: "
                    f"{_rerun(index, num_jobs)}"
                )
            owner[key] = index
        try:
            schema = schema.merged(job_schema)
        except MetadataError as exc:
            raise RuntimeError(
                f"cannot merge {folder}: the sidecars of job {index} disagree with those of the jobs before it: {exc}. "
                "Every sample of a dataset needs the same widths and label names: fix or remove the odd sidecars, "
                "then rerun the jobs and merge"
            ) from exc
    shards = []
    for source, target, shard in moves:
        if source != target:
            source.replace(target)
        shards.append({**shard, "name": target.name})
    _finish_folder(folder, shards, schema, num_jobs)
    summary = WriteSummary(folder, written=sum(s["samples"] for s in shards))
    summary.shards = [_index_entry(s) for s in shards]
    summary.skipped = [(s[1], s[2]) for index in range(num_jobs) for s in found[index]["skipped"]]
    return summary


def merge_jobs(output: str | Path) -> dict[str, WriteSummary]:
    """Finish a --num-jobs run in `output` (and its train/ and val/, where they hold job files) once every job is
    done: verify the jobs (each job file's digest; the same input list, --seed, --val-fraction and options; each
    shard's sha256; each job's samples and skips exactly its share of the input list; no key twice), rename the
    shards in job order to shard-000000.tar, ... and write index.json. Returns the summary per split ("all", or
    "train" and "val"). Raises RuntimeError naming the job to (re)run when one has not finished or does not verify,
    and FileNotFoundError when there is nothing to merge."""
    output = Path(output)
    folders = {"all": output, "train": output / "train", "val": output / "val"}
    with_jobs = {split: f for split, f in folders.items() if f.is_dir() and any(f.glob("job-*-of-*.json"))}
    if not with_jobs:
        raise FileNotFoundError(
            f"{output} holds no job files (job-IIIII-of-JJJJJ.json) to merge: run the jobs first (--num-jobs J "
            f"--job-index I); a folder with index.json and no job files is merged already"
        )
    return {split: _merge_folder(folder) for split, folder in with_jobs.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", help="folder of videos (recursive; NAME.json sidecars), or a text/CSV list")
    parser.add_argument("--output", help="folder for shard-*.tar and index.json")
    parser.add_argument("--merge", metavar="OUTPUT", help="merge the job files of a --num-jobs run in OUTPUT")
    limit = parser.add_mutually_exclusive_group()
    limit.add_argument("--samples-per-shard", type=int, help=f"default {DEFAULT_SAMPLES_PER_SHARD}")
    limit.add_argument("--bytes-per-shard", type=int)
    parser.add_argument("--workers", type=int, default=1, help="processes preparing videos (default 1)")
    parser.add_argument("--num-jobs", type=int, default=1, help="split the input into this many jobs")
    parser.add_argument("--job-index", type=int, default=0, help="the job to write, 0..NUM_JOBS-1")
    parser.add_argument("--size", type=int, help="re-encode to SIZE x SIZE pixels (see --aspect)")
    parser.add_argument(
        "--aspect",
        choices=WRITER_ASPECTS,
        default="crop",
        help="with --size: crop (short side to SIZE, centre crop; default), pad (long side to SIZE, black bars), "
        "squash (both sides to SIZE), short (short side to SIZE, the aspect kept)",
    )
    parser.add_argument("--fps", type=float, help="re-encode at this frame rate (nearest frames kept)")
    parser.add_argument("--gop", type=int, help="re-encode with a keyframe every GOP frames (default 8)")
    parser.add_argument("--max-frames", type=int, help="cut videos into segments of at most this many frames")
    parser.add_argument("--max-seconds", type=float, help="cut videos into segments of at most this many seconds")
    parser.add_argument("--val-fraction", type=float, default=0.0, help="write OUTPUT/train and OUTPUT/val")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    parser.add_argument(
        "--action-rows",
        choices=ACTION_ROWS,
        default="transition",
        help="what the sidecars' 'action' rows are: one per transition t -> t+1, N-1 rows for N frames (default), "
        "or one per frame, N rows (the last row, taken at the last frame, is dropped)",
    )
    parser.add_argument(
        "--label-map",
        metavar="FILE",
        help='declared categorical labels: a JSON file {"label": ["category", ...]}; a category is stored as its '
        "index (a string label without one is skipped with the reason)",
    )
    parser.add_argument(
        "--max-input-bytes",
        type=int,
        default=MAX_INPUT_BYTES,
        help=f"skip an input (video) larger than this (default {MAX_INPUT_BYTES})",
    )
    parser.add_argument(
        "--fetch-deadline",
        type=float,
        default=FETCH_DEADLINE_S,
        help=f"seconds for downloading one input, all tries together (default {FETCH_DEADLINE_S:g})",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in batch job logs)")
    args = parser.parse_args(argv)
    if args.merge:
        try:
            summaries = merge_jobs(args.merge)
        except (FileNotFoundError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        for summary in summaries.values():
            print(summary.report())
        return 0 if any(s.written for s in summaries.values()) else 1
    if not args.input or not args.output:
        parser.error("--input and --output are required (or --merge OUTPUT)")
    try:
        summaries = write_shards(
            args.input,
            args.output,
            samples_per_shard=args.samples_per_shard,
            bytes_per_shard=args.bytes_per_shard,
            size=args.size,
            fps=args.fps,
            gop=args.gop,
            aspect=args.aspect,
            max_frames=args.max_frames,
            max_seconds=args.max_seconds,
            val_fraction=args.val_fraction,
            seed=args.seed,
            action_rows=args.action_rows,
            workers=args.workers,
            num_jobs=args.num_jobs,
            job_index=args.job_index,
            label_map=args.label_map,
            max_input_bytes=args.max_input_bytes,
            fetch_deadline_s=args.fetch_deadline,
            progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError, RuntimeError) as exc:  # OutputInUse is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for summary in summaries.values():
        print(summary.report())
    if args.num_jobs > 1:
        print(
            f"job {args.job_index} of {args.num_jobs} done; once all are: python -m data_pipeline.write_shards "
            f"--merge {args.output}"
        )
        return 0
    return 0 if any(s.written for s in summaries.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
