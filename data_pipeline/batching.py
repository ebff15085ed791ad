"""Batches of decoded clips and their hand-over from DataLoader workers (used by data_pipeline/stream.py).

- `batches`: clips -> batches; each clip's frames are copied into the batch's frames buffer as it arrives, a
  shared-memory buffer inside a worker, so handing a batch to the training process copies no frames;
- `BatchLoader`: a DataLoader of such batches that turns their small numpy arrays into tensors in the consuming
  process (sent by value, far cheaper than one shared-memory segment per tensor);
- `read_ahead`: an iterator run by a background thread a few items ahead of its consumer.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

_END = object()


def _put(items: queue.Queue, item: object, stop: threading.Event) -> bool:
    """Put `item` once there is room; False if the consumer stopped first."""
    while not stop.is_set():
        try:
            items.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def read_ahead(items: Iterable, depth: int) -> Iterator:
    """`items`, iterated by a background thread up to `depth` items ahead of the consumer.

    The thread holds the GIL only while running Python code, so e.g. reading and planning the next chunk of samples
    (tar, shuffle, JSON, clip starts) overlaps the decoder's C code on the current one. An exception of `items` is
    raised in the consumer at its place in the stream; the thread stops when the consumer is closed or dropped.
    """
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if not _put(buffer, (item, None), stop):
                    return
            _put(buffer, (_END, None), stop)
        except BaseException as exc:  # handed to the consumer, which raises it
            _put(buffer, (_END, exc), stop)

    threading.Thread(target=produce, name="clip-read-ahead", daemon=True).start()
    try:
        while True:
            item, exc = buffer.get()
            if item is _END:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()


def _frames_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised uint8 tensor `shape` = [B, T, H, W, C] to collate a batch's frames into.

    Inside a DataLoader worker it lives in shared memory (as torch's own default_collate does there), so handing the
    batch to the training process copies no frames: only a file descriptor travels.
    """
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


def _stack_if_all(clips: list[dict], name: str, dtype: type) -> np.ndarray | None:
    values = [c.get(name) for c in clips]
    if any(v is None for v in values) or len({v.shape for v in values}) != 1:
        return None
    return np.stack(values).astype(dtype, copy=False)


def _collate_rows(frames: torch.Tensor, clips: list[dict], skipped: dict[str, int]) -> dict:
    """The batch of `clips` whose frames are already in `frames` uint8 [B, T, H, W, C]: the batch dict of
    docs/architecture.md (`state`, `action`, `events`, `labels` only when every clip has it; names from the first
    clip; `key`; `start`; `skipped`, the counts since the previous batch), except that the per-clip arrays stay numpy
    here: `state` float32 [B, T, S], `action` float32 [B, T-1, A], `events` float32 [B, T-1], `labels` int64 [B, L],
    `start` int64 [B]. Small arrays pickle by value, far cheaper than one shared-memory segment per tensor when a
    worker sends the batch; `as_tensors` turns them into tensors in the consuming process.
    """
    batch: dict = {"frames": frames}
    for name in ("state", "action", "events"):
        stacked = _stack_if_all(clips, name, np.float32)
        if stacked is not None:
            batch[name] = stacked
    label_names = list(clips[0]["labels"] or {})
    if label_names and all(c["labels"] and list(c["labels"]) == label_names for c in clips):
        batch["labels"] = np.array([[c["labels"][n] for n in label_names] for c in clips], dtype=np.int64)
    batch["state_names"] = list(clips[0]["state_names"] or [])
    batch["action_names"] = list(clips[0]["action_names"] or [])
    batch["label_names"] = label_names if "labels" in batch else []
    batch["key"] = [c["key"] for c in clips]
    batch["start"] = np.array([c["start"] for c in clips], dtype=np.int64)
    batch["skipped"] = skipped
    return batch


def as_tensors(batch: dict) -> dict:
    """A batch with its numpy arrays turned into tensors (no copy): the form of docs/architecture.md."""
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


def _fresh_buffers(shape: tuple[int, ...]) -> Iterator[torch.Tensor]:
    """Frames buffers `shape` = [B, T, H, W, C], each written once (zeros) so that its shared-memory pages exist: run
    in a read-ahead thread, this takes the page faults (~0.4 ms per 64x64 batch) off the decoding thread."""
    while True:
        yield _frames_buffer(shape).zero_()


def batches(
    clips: Iterable[dict], pop_skipped: Callable[[], dict[str, int]], batch_size: int, partial: bool
) -> Iterator[dict]:
    """Group clips into batches of `batch_size` (a last, smaller one only if `partial`), numpy arrays not yet
    tensors (see `_collate_rows`); `pop_skipped` gives the skip counts since the previous batch. Each clip's frames
    are copied into the batch's frames buffer as soon as the clip is decoded, and dropped from the clip. In a
    DataLoader worker the (shared-memory) buffers are prepared ahead."""
    group: list[dict] = []
    buffers: Iterator[torch.Tensor] | None = None
    for clip in clips:
        if not group:
            shape = (batch_size, *clip["frames"].shape)  # uint8 [B, T, H, W, C]
            if buffers is None and get_worker_info() is not None:
                buffers = read_ahead(_fresh_buffers(shape), depth=1)
            buffer = next(buffers) if buffers is not None else None
            if buffer is None or buffer.shape != shape:  # (frame sizes may differ between batches if image_size=0)
                buffer = _frames_buffer(shape)
            frames = buffer.numpy()
        if clip["frames"].shape != frames.shape[1:]:
            raise ValueError(
                f"clips in a batch have different frame shapes {frames.shape[1:]} and {clip['frames'].shape}; set "
                "data.image_size > 0"
            )
        frames[len(group)] = clip.pop("frames")
        group.append(clip)
        if len(group) == batch_size:
            yield _collate_rows(buffer, group, pop_skipped())
            group = []
    if group and partial:
        yield _collate_rows(buffer[: len(group)], group, pop_skipped())


def _identity(batch: dict) -> dict:
    return batch


class BatchLoader(DataLoader):
    """A DataLoader of whole batches (batch_size=None) that makes their numpy arrays tensors in the consuming
    process, after the transfer from a worker (see `_collate_rows`)."""

    def __init__(self, dataset: IterableDataset, **kwargs) -> None:
        super().__init__(dataset, batch_size=None, collate_fn=_identity, **kwargs)

    def __iter__(self) -> Iterator[dict]:
        return map(as_tensors, super().__iter__())
