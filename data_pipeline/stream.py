"""The streaming pipeline: tar shards -> batches of clips, read top to bottom in `TrainClips.__iter__`.

    shard list -> per-epoch seeded shard shuffle -> split by node and worker (shardlist.slot_passes)
      -> tar samples (only KEY.<video> and KEY.json are read) -> sample shuffle buffer
      -> decode + clip -> batch + collate

This module reads the shards and assembles the stages; a sample's own stages (plan its clips, decode + clip) and each
worker's read state (skip counts, schema) are in data_pipeline/samples.py.

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
each skipped sample is also logged (logger `data_pipeline.samples`, level WARNING) with its key, reason and error
text, and FFmpeg and decord print their own detail (see data_pipeline/decoders.py). Nothing in a shard is unpickled
or executed: only video bytes and JSON are read.
"""

from __future__ import annotations

import random
import signal
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from itertools import count, islice

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.batching import RING_SLOTS, BatchLoader, batches, read_ahead
from data_pipeline.config import DataConfig
from data_pipeline.decoders import stderr_not_held
from data_pipeline.format import VIDEO_EXTENSIONS
from data_pipeline.samples import NoDecodableDataError, Reader, decode_clips, plan_in_chunks
from data_pipeline.shardlist import Slot, expand_shards, slot_passes, uses_modulo
from data_pipeline.tar_reader import tar_samples

READ_EXTENSIONS = frozenset((*VIDEO_EXTENSIONS, "json"))


def _format_entries_only(name: str) -> bool:
    """Tar member filter: read only the entries the shard format defines (KEY.<video ext>, KEY.json)."""
    return name.rsplit(".", 1)[-1].lower() in READ_EXTENSIONS


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


def _urls(passes: Iterable[list[str]], reader: Reader, empty_passes_allowed: int) -> Iterator[dict]:
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


def _keep_slot(samples: Iterable[dict], reader: Reader, modulo: Slot | None) -> Iterator[dict]:
    """Count delivered samples; in modulo mode keep only sample i with i % slots == slot."""
    for i, sample in enumerate(samples):
        if modulo is None or i % modulo.count == modulo.index:
            reader.pass_samples += 1
            yield sample


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
        reader = Reader(cfg)
        seeds = [self.seed, self.epoch, slot.index]
        clip_rng = np.random.default_rng(seeds)
        chunk_samples = max(1, cfg.batch_size // cfg.clips_per_video)
        pipeline = wds.DataPipeline(
            lambda: _urls(slot_passes(self.urls, self.seed, self.epoch, slot), reader, modulo.count if modulo else 1),
            lambda sources: _tar_samples(sources, reader.shard_error),
            lambda samples: _keep_slot(samples, reader, modulo),
            wds.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_buffer, rng=random.Random(str(seeds))),
            lambda samples: read_ahead(
                plan_in_chunks(samples, cfg, lambda key: clip_rng, cfg.clips_per_video, chunk_samples), depth=2
            ),
            lambda plan_chunks: decode_clips(plan_chunks, reader),
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
        reader = Reader(self.cfg)

        def start_rng(key: str) -> np.random.Generator:
            return np.random.default_rng([self.seed, zlib.crc32(key.encode())])

        pipeline = wds.DataPipeline(
            lambda: iter([{"url": url} for url in self.urls]),
            lambda sources: _tar_samples(sources, reader.shard_error),
            lambda samples: read_ahead(
                plan_in_chunks(samples, self.cfg, start_rng, 1, chunk=min(self.batch_size, self.num_clips)), depth=2
            ),
            lambda plan_chunks: decode_clips(plan_chunks, reader),
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
