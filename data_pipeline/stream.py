"""The streaming pipeline: tar shards -> batches of clips, read top to bottom in `TrainClips.__iter__`.

    shard list -> per-epoch seeded shard shuffle -> split by node and worker (shardlist.slot_passes)
      -> tar samples (only KEY.<video> and KEY.json are read) -> sample shuffle buffer
      -> decode + clip -> batch + collate

Training (`make_train_loader`) gives every rank exactly `cfg.epoch_batches` batches per epoch, each tagged with its
epoch; each worker cycles over its share of the shards (reshuffled per pass), so no rank waits on another. The
trainer makes one loader per run: its workers, their open shards and their shuffle buffers last across epochs.
Evaluation (`make_eval_loader`) is one finite, deterministic pass over the shards in order.

Frames are resized to `cfg.image_size` on decode and made square by `cfg.aspect` (crop, the default: short side to
image_size, centre crop; pad; squash). With `cfg.random_crop`, training takes the crop at a random position along the
long side instead, drawn per clip from the clip generator (the same window for all frames of the clip); evaluation
always takes the centre.

Bad samples never stop the stream: they are skipped and counted by reason ("decode_error", "too_short",
"bad_metadata": KEY.json unreadable or breaking the sidecar schema of data_pipeline/sidecar.py, e.g. NaN rows or a
string label; "schema_mismatch": a clip whose widths, column names or label names differ from the dataset's, so
that a batch never drops a field because one clip differs; "shard_error"), and each batch carries
`batch["skipped"]`, the counts of its worker since that worker's previous batch, with `fallback/pyav`: videos
decord could not read that PyAV decoded (not a skip). The decoders' native libraries are quiet, so the counts are
all a log shows of bad data; with `WORLDMODEL_DECODE_DEBUG=1` in the environment (the DataLoader workers inherit it)
each skipped sample is also logged (logger `data_pipeline.stream`, level WARNING) with its key, reason and error
text, and FFmpeg and decord print their own detail (see data_pipeline/decoders.py). Nothing in a shard is unpickled
or executed: only video bytes and JSON are read.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from itertools import count, islice

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.batching import RING_SLOTS, BatchLoader, batches, read_ahead
from data_pipeline.clips import MetadataError, clip_indices, clip_span, clip_starts, cut_metadata
from data_pipeline.config import DataConfig
from data_pipeline.decoders import DecodeError, decode_debug, fit_to_square, get_decoder, stderr_not_held
from data_pipeline.format import INDEX_NAME, VIDEO_EXTENSIONS
from data_pipeline.shardlist import Slot, expand_shards, slot_passes, uses_modulo
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
from data_pipeline.tar_reader import tar_samples

READ_EXTENSIONS = frozenset((*VIDEO_EXTENSIONS, "json"))

log = logging.getLogger(__name__)

FALLBACK_PYAV = "fallback/pyav"  # the key of `batch["skipped"]` that counts PyAV fallbacks, not skips


class NoDecodableDataError(RuntimeError):
    """A reader went through all of its shards without finding one usable clip."""


def _format_entries_only(name: str) -> bool:
    """Tar member filter: read only the entries the shard format defines (KEY.<video ext>, KEY.json)."""
    return name.rsplit(".", 1)[-1].lower() in READ_EXTENSIONS


class _Reader:
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

    def schema_problem(self, plan: _Plan) -> str | None:
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

    def learn(self, plan: _Plan) -> None:
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


def _open_shards(sources: Iterable[dict], handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """webdataset's url_opener, one shard at a time while no decoder holds stderr back (see
    `decoders.stderr_not_held`): the read-ahead thread opens shards while the decode thread decodes, and a `pipe:`
    command started in the wrong moment would send its error messages into the decoder's capture file."""
    for source in sources:
        with stderr_not_held():
            opened = list(wds.tariterators.url_opener([source], handler=handler))
        yield from opened


def _tar_samples(sources: Iterable[dict], handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """The samples of the shards `sources` ({"url": ...}), opened by `_open_shards` and read by
    `data_pipeline.tar_reader` (only the entries of the shard format: KEY.<video>, KEY.json). A shard that cannot be
    read to its end goes to `handler` (counted by the pipeline's): its samples before the damage are kept."""
    for source in _open_shards(sources, handler):
        stream = source["stream"]
        try:
            yield from tar_samples(stream, source["url"], _format_entries_only)
        except Exception as exn:  # noqa: BLE001 - any read error of one shard is the handler's to count
            exn.args = (f"{exn.args[0] if exn.args else exn} @ {source['url']}", *exn.args[1:])
            if not handler(exn):
                raise
        finally:
            stream.close()


def _urls(passes: Iterable[list[str]], reader: _Reader, empty_passes_allowed: int) -> Iterator[dict]:
    """{"url": ...} for pass after pass. Stops with an error when `empty_passes_allowed` passes in a row delivered no
    samples (checked when a pass ends: the tar stage asks for the next URL only after its last sample was taken)."""
    empty = 0
    for shards in passes:
        reader.pass_samples = 0
        yield from ({"url": url} for url in shards)
        reader.max_pass_samples = max(reader.max_pass_samples, reader.pass_samples)
        empty = empty + 1 if reader.pass_samples == 0 else 0
        if empty >= empty_passes_allowed:
            raise NoDecodableDataError(
                f"{empty} full pass(es) over the shards {shards[:3]}{'...' if len(shards) > 3 else ''} delivered no "
                f"samples to this reader (skipped: {dict(reader.skipped)}); are the shards empty or unreadable, or "
                "are there fewer samples than ranks x workers?"
            )


def _keep_slot(samples: Iterable[dict], reader: _Reader, modulo: Slot | None) -> Iterator[dict]:
    """Count delivered samples; in modulo mode keep only sample i with i % slots == slot."""
    for i, sample in enumerate(samples):
        if modulo is None or i % modulo.count == modulo.index:
            reader.pass_samples += 1
            yield sample


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


def _clip_signatures(plan: _Plan) -> Iterator[dict]:
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


@dataclass
class _Plan:
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


def _plan(sample: dict, cfg: DataConfig, rng: np.random.Generator, clips_per_video: int) -> _Plan:
    """Parse a sample's JSON and pick its clips (this draws the clip starts from `rng`); nothing is decoded."""
    plan = _Plan(sample.get("__key__", "?"), url=sample.get("__url__") or "")
    video = _video_entry(sample)
    try:
        plan.meta = _parse_meta(sample)
        plan.labels = _labels(plan.meta)
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


def _plan_chunks(
    samples: Iterable[dict],
    cfg: DataConfig,
    start_rng: Callable[[str], np.random.Generator],
    clips_per_video: int,
    chunk: int,
) -> Iterator[list[_Plan]]:
    """The plans of the samples, `chunk` samples at a time (each chunk is read, then planned, as one step)."""
    for group in iter(lambda: list(islice(samples, chunk)), []):
        yield [_plan(sample, cfg, start_rng(sample.get("__key__", "?")), clips_per_video) for sample in group]


def _random_crop(frames: np.ndarray, size: int, where: float) -> np.ndarray:
    """The `size x size` window of `frames` (uint8 [T, H, W, C], one side `size`) at fraction `where` in [0, 1) of the
    free range along the long side: the same window for every frame."""
    long_side = max(frames.shape[1:3])
    return fit_to_square(frames, size, "crop", offset=int(where * (long_side - size + 1)))


def _decode_clips(plan_chunks: Iterable[list[_Plan]], reader: _Reader) -> Iterator[dict]:
    """Decode + clip: for each planned sample, its clips from one decode of the union of their frames.

    Yields dicts with `frames` uint8 [T, H, W, C], optional `state` [T, S], `action` [T-1, A], `events` [T-1],
    `labels` {name: int}, names, `key` and `start`. Unusable samples are skipped and counted.

    A chunk of samples is decoded one after another, then its clips are yielded: running each step over a whole chunk
    keeps its code and data in the CPU caches, as in the decoder-only benchmark (interleaving read, plan and decode
    sample by sample cost ~150 us more per 64x64 clip of 8 frames). Skips are counted, and clips yielded, in the order
    of the samples.
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
                }


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class TrainClips(IterableDataset):
    """One rank's training stream from epoch `epoch` on: exactly `cfg.epoch_batches` batches per epoch over all its
    workers, for `epochs` epochs (None: for ever). Each batch carries its `epoch`.

    One pipeline per worker for the whole stream: the shuffle buffer is filled once and the shard passes continue
    across epoch boundaries, which are bookkeeping only. DataLoader (in order, the default) takes batch i of the
    stream from worker i % num_workers, so worker w's k-th batch is batch w + k * num_workers of the stream and
    belongs to epoch `epoch + (w + k * num_workers) // epoch_batches`: every epoch has exactly epoch_batches batches.

    `ring_slots`: frames buffers per DataLoader worker (see data_pipeline/batching.py); it does not change the stream.
    """

    def __init__(
        self,
        cfg: DataConfig,
        urls: list[str],
        *,
        seed: int,
        epoch: int,
        rank: int,
        world_size: int,
        epochs: int | None = 1,
        ring_slots: int = RING_SLOTS,
    ):
        super().__init__()
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be >= 1 or None (for ever), got {epochs}")
        self.cfg, self.urls = cfg, urls
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.epochs, self.ring_slots = epochs, ring_slots

    def __len__(self) -> int:
        if self.epochs is None:
            raise TypeError("an endless training stream (epochs=None) has no length")
        return self.cfg.epoch_batches * self.epochs

    def __iter__(self) -> Iterator[dict]:
        cfg = self.cfg
        worker, num_workers = _worker()
        slot = Slot(self.rank * num_workers + worker, self.world_size * num_workers)
        modulo = slot if uses_modulo(len(self.urls), slot) else None
        reader = _Reader(cfg)
        seeds = [self.seed, self.epoch, slot.index]
        clip_rng = np.random.default_rng(seeds)
        chunk_samples = max(1, cfg.batch_size // cfg.clips_per_video)
        pipeline = wds.DataPipeline(
            lambda: _urls(slot_passes(self.urls, self.seed, self.epoch, slot), reader, modulo.count if modulo else 1),
            lambda sources: _tar_samples(sources, reader.shard_error),
            lambda samples: _keep_slot(samples, reader, modulo),
            wds.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_buffer, rng=random.Random(str(seeds))),
            lambda samples: read_ahead(
                _plan_chunks(samples, cfg, lambda key: clip_rng, cfg.clips_per_video, chunk_samples), depth=2
            ),
            lambda plan_chunks: _decode_clips(plan_chunks, reader),
            lambda clips: batches(clips, reader.pop_skipped, cfg.batch_size, partial=False, ring_slots=self.ring_slots),
        )
        # this worker's batches' indices in the rank's stream (zip stops at the range's end before decoding more)
        ends = self.epochs is not None
        indices = range(worker, self.epochs * cfg.epoch_batches, num_workers) if ends else count(worker, num_workers)
        for index, batch in zip(indices, pipeline, strict=False):
            batch["epoch"] = self.epoch + index // cfg.epoch_batches
            yield batch


def make_train_loader(
    cfg: DataConfig, shards: str, *, seed: int, epoch: int, rank: int, world_size: int, epochs: int | None = 1
) -> DataLoader:
    """The training DataLoader of one rank from epoch `epoch` on, for `epochs` epochs (None: for ever, the trainer's
    one loader per run): `cfg.epoch_batches` batches of `cfg.batch_size` clips per epoch, each tagged with its
    `epoch`. The workers and their shuffle buffers live as long as the loader's iterator.

    Every rank gets the same number of batches per epoch. Shards are shuffled with (seed, epoch) identically on all
    ranks and dealt round-robin to the world_size * num_workers reader slots (disjoint samples); with fewer shards
    than slots every slot reads all shards and keeps every slots-th sample. The same (seed, epoch, rank) gives the
    same stream.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    urls = expand_shards(shards)
    slots = world_size * max(1, cfg.num_workers)
    if uses_modulo(len(urls), Slot(0, slots)):
        warnings.warn(
            f"{len(urls)} shard(s) for {slots} reader slots (world_size {world_size} x num_workers "
            f"{cfg.num_workers}): every slot reads every shard and keeps 1 sample in {slots}. Write more shards "
            "(python -m data_pipeline.writer --samples-per-shard) to read each shard once.",
            stacklevel=2,
        )
    dataset = TrainClips(cfg, urls, seed=seed, epoch=epoch, rank=rank, world_size=world_size, epochs=epochs)
    return BatchLoader(dataset, num_workers=cfg.num_workers, worker_init_fn=_workers_leave_stopping_to_the_trainer)


def _workers_leave_stopping_to_the_trainer(worker_id: int) -> None:
    """DataLoader workers run torch on one thread (they decode on one core each: the trainer's thread budget counts
    them so) and ignore SIGTERM/SIGINT/SIGUSR2 (the trainer's stop signals).

    Launchers (torch elastic, SLURM, Ctrl-C in a terminal) signal a trainer's whole process group; a worker killed
    that way makes the DataLoader raise in the trainer before it can checkpoint. The trainer shuts its workers down
    itself when it stops.
    """
    torch.set_num_threads(1)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class EvalClips(IterableDataset):
    """One pass over the shards in order: one clip per video from a start seeded by (seed, key), `num_clips` max."""

    def __init__(self, cfg: DataConfig, urls: list[str], *, num_clips: int, seed: int, batch_size: int):
        super().__init__()
        cfg = replace(cfg, random_crop=False)  # evaluation takes the centre crop
        self.cfg, self.urls, self.num_clips, self.seed, self.batch_size = cfg, urls, num_clips, seed, batch_size

    def __iter__(self) -> Iterator[dict]:
        reader = _Reader(self.cfg)

        def start_rng(key: str) -> np.random.Generator:
            return np.random.default_rng([self.seed, zlib.crc32(key.encode())])

        pipeline = wds.DataPipeline(
            lambda: iter([{"url": url} for url in self.urls]),
            lambda sources: _tar_samples(sources, reader.shard_error),
            lambda samples: read_ahead(
                _plan_chunks(samples, self.cfg, start_rng, 1, chunk=min(self.batch_size, self.num_clips)), depth=2
            ),
            lambda plan_chunks: _decode_clips(plan_chunks, reader),
            lambda clips: islice(clips, self.num_clips),
            lambda clips: batches(clips, reader.pop_skipped, self.batch_size, partial=True),
        )
        produced = 0
        for batch in pipeline:
            produced += len(batch["key"])
            yield batch
        if produced == 0:
            raise NoDecodableDataError(
                f"no usable clip in the eval shards {self.urls[:3]} (skipped: {dict(reader.skipped)})"
            )


def make_eval_loader(
    cfg: DataConfig, shards: str, *, num_clips: int, seed: int = 0, batch_size: int | None = None
) -> DataLoader:
    """A finite, deterministic evaluation stream: a single pass over the shards in order (no shuffle, no
    resampling), one clip per video, stopping after `num_clips` clips (fewer if the shards run out). Batches have
    `batch_size` (default cfg.batch_size) clips; the last one may be smaller."""
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    urls = expand_shards(shards)
    dataset = EvalClips(cfg, urls, num_clips=num_clips, seed=seed, batch_size=batch_size or cfg.batch_size)
    return BatchLoader(dataset, num_workers=0)
