"""Preparing inputs: each one read (a local file, or a download), decoded once to check it, its sidecar checked, and
either stored as it is or re-encoded (data_pipeline/writer/encode.py): in this process, or in `--workers N`
processes whose results are taken in input order (`ordered_map`), so that nothing downstream depends on N or timing.

Whatever goes wrong with one input is that input's skip (`Prepared.problem`, naming the reason), never the end of
the write.
"""

from __future__ import annotations

import json
import math
import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

from data_pipeline.decoders import DecodeError, PyAVDecoder
from data_pipeline.format import VIDEO_EXTENSIONS
from data_pipeline.sidecar import signature
from data_pipeline.writer.encode import reencoded
from data_pipeline.writer.inputs import InputVideo, check_regular, fetch, read_sidecar
from data_pipeline.writer.sample import (
    Options,
    Prepared,
    Reencode,
    Sample,
    checked_sidecar,
    read_label_map,
    sidecar_problem,
)


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
        sidecar_problem(sample, label_map)  # a bad sidecar is skipped before the video is decoded
        info = decoder.info(sample.video)
        if not (math.isfinite(info.fps) and info.fps >= 0):
            raise DecodeError(f"the video reports a frame rate of {info.fps}")
        meta = dict(checked_sidecar(sample, info.num_frames, action_rows, label_map))
        meta.update(fps=info.fps, num_frames=info.num_frames, height=info.height, width=info.width)
        return sample.video, sample.ext, meta
    labels = read_label_map(label_map)
    ((_, video, meta),) = reencoded(sample, sample.video, Options(reencode, action_rows, label_map=labels))
    return video, "mp4", meta


def _meta_bytes(meta: dict) -> bytes:
    """KEY.json as stored: standard JSON (allow_nan=False: a NaN that got this far is a ValueError, not a token other
    readers refuse)."""
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def prepare(sample: Sample, options: Options, decoder: PyAVDecoder, video: bytes | str | None = None) -> Prepared:
    """Prepare `sample` (its bytes, or `video`: a local path to stream from when re-encoding)."""
    try:
        if options.reencode is None:
            data, ext, meta = prepare_sample(
                sample, None, decoder, action_rows=options.action_rows, label_map=options.labels
            )
            outputs = [(sample.key, data, meta)]
        else:
            ext = "mp4"
            outputs = reencoded(sample, sample.video if video is None else video, options)
        samples = [(key, [(ext, data), ("json", _meta_bytes(meta))]) for key, data, meta in outputs]
    except (DecodeError, ValueError) as exc:  # MetadataError is a ValueError
        return Prepared(sample.source, problem=f"{type(exc).__name__}: {exc}", key=sample.key)
    return Prepared(sample.source, samples, key=sample.key, signature=signature(outputs[0][2]))


class _OneThreadDecoder(PyAVDecoder):
    """PyAV decoding in one thread: FFmpeg's default (thread_count 0: as many as there are cores, where the codec
    can, e.g. VP9's tiles) would make --workers N use more than N cores, and 1 worker more than 1."""

    def _open(self, data: bytes):
        container = super()._open(data)
        container.streams.video[0].codec_context.thread_count = 1
        return container


_process_decoder: PyAVDecoder | None = None


def process_decoder() -> PyAVDecoder:
    """This process's decoder (one per worker process)."""
    global _process_decoder
    if _process_decoder is None:
        _process_decoder = _OneThreadDecoder()
    return _process_decoder


def prepare_input(task: tuple[InputVideo, str | None], options: Options) -> Prepared:
    """Read and prepare one listed video (runs in a worker process); `task` = (video, why it is skipped already).
    Whatever goes wrong is this input's skip, with the reason: one input never ends the write."""
    video, problem = task
    try:
        return _prepare_listed(video, problem, options)
    except Exception as exc:  # noqa: BLE001 (an input nothing else caught: its skip, named, not the write's end)
        return Prepared(video.source, problem=f"unexpected {type(exc).__name__}: {exc}", key=video.key)


def _prepare_listed(video: InputVideo, problem: str | None, options: Options) -> Prepared:
    if problem:
        return Prepared(video.source, problem=problem, key=video.key)
    if options.reencode is None and video.ext not in VIDEO_EXTENSIONS:
        known = ", ".join(VIDEO_EXTENSIONS)
        return Prepared(
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
        return Prepared(video.source, problem=f"OSError: {exc}", key=video.key)
    sidecar, problem = read_sidecar(video, deadline_s=options.fetch_deadline_s)
    sample = Sample(video.key, data, video.ext, sidecar, video.source, problem)
    return prepare(sample, options, process_decoder(), video.location if stream_from_path else None)


def ordered_map(fn: Callable, tasks: Iterable, workers: int, ahead: int = 8) -> Iterator:
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
