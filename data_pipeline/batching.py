"""Batches of decoded clips and their hand-over from DataLoader workers (used by data_pipeline/stream.py).

- `batches`: clips -> batches; each clip's frames are copied into the batch's frames buffer as it arrives. Inside a
  DataLoader worker the buffer is a slot of the worker's `_FramesRing`, shared memory allocated once per worker, so
  a batch travels to the training process as a small `_SlotRef` (where its frames are), not as frames, and not as a
  fresh shared-memory segment per batch (creating, mapping, faulting in and passing the file descriptor of a new
  segment cost more CPU per batch than the ring's one copy out of the slot);
- `BatchLoader`: a DataLoader of such batches that, in the consuming process, copies each batch's frames out of
  their slot (freeing it for the worker) and turns the small numpy arrays into tensors (sent by value, far cheaper
  than one shared-memory segment per tensor);
- `read_ahead`: an iterator run by a background thread a few items ahead of its consumer.

Why the ring stays: measured back to back on the default data with one worker, it gives the pipeline more
throughput than a fresh shared-memory tensor per batch, the memory path of torch's default collate (which also
stacks: one more copy). Measure again before changing it: `python -m benchmarks.pipeline --shards
'data/moving_digits/train/shard-*.tar' --workers 1 --batches 100 --ring-slots 4 0 4 0` (pipeline over decoder,
with the ring and without, twice).

Private torch API, and why it stays: `UntypedStorage._new_shared` allocates the workers' shared memory directly
(the public `torch.empty(n).share_memory_()` allocates and then moves the storage, which measured slower back to
back with one worker, `python -m benchmarks.pipeline --workers 1 --batches 60`); `_shutdown_workers` of a
multi-process DataLoader iterator, called at interpreter exit for iterators still alive (`_stop_at_exit`), because
DataLoader has no public way to stop its workers, and without it a script that ended with a live iterator of
workers that ignore SIGTERM hung for ever. Whether DataLoader pins is read from its public `pin_memory` flag.
"""

from __future__ import annotations

import atexit
import itertools
import math
import queue
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace

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
    batch to the training process copies no frames: only a file descriptor travels. Workers use it only when their
    `_FramesRing` has no free slot.
    """
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


# Slots per worker ring. DataLoader (in order, the default) sends a worker's next index before its current batch is
# handed to BatchLoader.__iter__, and holds at most prefetch_factor * num_workers indices sent but not yet handed on;
# it deals them round-robin, so at most prefetch_factor + 1 of one worker's batches are sent but not yet copied out
# of their slots (the one it is writing included): 3 at the default prefetch_factor 2, plus one spare. Correctness
# does not rest on this: a worker writes only slots whose busy flag the consumer has cleared, and a batch that finds
# no free slot (a larger prefetch_factor, or one worker left running at the end of an epoch) gets its own shared
# buffer (`_frames_buffer`) instead.
RING_SLOTS = 4
_PAGE = 4096  # slots start on page boundaries
_ring_ids = itertools.count()  # per process: tells a worker's successive rings apart


@dataclass
class _SlotRef:
    """What a worker sends instead of a batch's frames when they are in a slot of its ring: where they are.

    `ring` is the ring itself (uint8 [bytes], shared memory: its file descriptor travels once), attached to the first
    batch that uses the ring; the consumer keeps it for the worker's later batches (see `_copy_out`)."""

    worker: int  # DataLoader worker id
    ring_id: int  # which ring of that worker (a new one is made when a batch outgrows the slots)
    offset: int  # bytes: where the frames start in the ring
    flag: int  # bytes: where the slot's busy flag is in the ring (1 from the worker's write to the consumer's copy)
    shape: tuple[int, ...]  # the frames' shape [B, T, H, W, C]
    ring: torch.Tensor | None = None


class _FramesRing:
    """A worker's frames buffers: `slots` slots of `slot_bytes` in one shared-memory storage, allocated (and its pages
    faulted in) once, followed by one busy flag (uint8) per slot.

    The worker takes a free slot for each batch and marks it busy; the consumer clears the flag once it has copied
    the frames out (`_copy_out`), and only then can the slot be taken again.
    """

    def __init__(self, worker: int, slots: int, slot_bytes: int) -> None:
        if slots < 1 or slot_bytes < 1:
            raise ValueError(f"a frames ring needs slots >= 1 and slot_bytes >= 1, got {slots} and {slot_bytes}")
        self.worker, self.ring_id, self.slots, self.slot_bytes = worker, next(_ring_ids), slots, slot_bytes
        self.stride = -(-slot_bytes // _PAGE) * _PAGE
        storage = torch.UntypedStorage._new_shared(slots * self.stride + slots)
        self.memory = torch.empty(0, dtype=torch.uint8).set_(storage).zero_()  # uint8 [bytes]
        self.array = self.memory.numpy()
        self.busy = self.array[slots * self.stride :]  # uint8 [slots], a view
        self.sent = False  # whether a _SlotRef carrying the ring itself has been made
        self.next = 0

    def take(self, shape: tuple[int, ...]) -> tuple[np.ndarray, _SlotRef] | None:
        """A free slot for frames `shape` = [B, T, H, W, C], marked busy: (a uint8 array `shape` in the slot to write
        the frames into, the reference to send for them), or None if the frames do not fit or no slot is free."""
        size = math.prod(shape)
        if size > self.slot_bytes:
            return None
        for i in range(self.slots):
            slot = (self.next + i) % self.slots
            if not self.busy[slot]:
                break
        else:
            return None
        self.next = (slot + 1) % self.slots
        self.busy[slot] = 1
        offset = slot * self.stride
        ref = _SlotRef(self.worker, self.ring_id, offset, self.slots * self.stride + slot, tuple(shape))
        if not self.sent:
            ref.ring, self.sent = self.memory, True
        return self.array[offset : offset + size].reshape(shape), ref


def _copy_out(ref: _SlotRef, rings: dict[int, tuple[int, np.ndarray]], pin: bool = False) -> torch.Tensor:
    """In the consuming process: the frames uint8 `ref.shape` = [B, T, H, W, C] copied out of their slot into a
    tensor of their own (in pinned memory if `pin`), and the slot freed for its worker. `rings` holds each worker's
    current ring (worker id -> (ring_id, uint8 [bytes])); a reference that carries its ring updates it."""
    if ref.ring is not None:
        rings[ref.worker] = (ref.ring_id, ref.ring.numpy())
    ring_id, memory = rings.get(ref.worker, (None, None))
    if memory is None or ring_id != ref.ring_id:
        raise RuntimeError(
            f"a batch from DataLoader worker {ref.worker} is in its frames ring {ref.ring_id}, which this iterator "
            f"never received (it has {ring_id}): batches of a worker must arrive in the order it made them"
        )
    frames = torch.empty(ref.shape, dtype=torch.uint8, pin_memory=pin)
    # numpy copies with one thread (torch's copy_ would wake its thread pool for ~1.5 MB, which costs more here)
    np.copyto(frames.numpy(), memory[ref.offset : ref.offset + math.prod(ref.shape)].reshape(ref.shape))
    # The copy has read the whole slot before the worker can see this store (x86 never makes a store visible before
    # earlier loads; Arm allows it in principle, but cores commit a store only once the loads before it have their
    # values): from here on the worker may write the slot again.
    memory[ref.flag] = 0
    return frames


def _stack_if_all(clips: list[dict], name: str, dtype: type) -> np.ndarray | None:
    values = [c.get(name) for c in clips]
    if any(v is None for v in values) or len({v.shape for v in values}) != 1:
        return None
    return np.stack(values).astype(dtype, copy=False)


def _collate_rows(frames: torch.Tensor | _SlotRef, clips: list[dict], skipped: dict[str, int]) -> dict:
    """The batch of `clips` whose frames are already in `frames` uint8 [B, T, H, W, C] (or in the ring slot it
    refers to, which BatchLoader copies out in the consuming process): the batch dict of
    docs/architecture.md (`state`, `action`, `events`, `labels` only when every clip has it; names from the first
    clip; `key`; `start`; `fps` only when every clip has a valid one; `skipped`, the counts since the previous batch),
    except that the per-clip arrays stay numpy here: `state` float32 [B, T, S], `action` float32 [B, T-1, A], `events`
    float32 [B, T-1], `labels` int64 [B, L], `start` int64 [B], `fps` float64 [B]. Small arrays pickle by value, far
    cheaper than one shared-memory segment per tensor when a worker sends the batch; `as_tensors` turns them into
    tensors in the consuming process.
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
    fps = [c.get("fps") for c in clips]  # checked when the sample was planned (samples.plan_sample): float or None
    if all(f is not None for f in fps):
        batch["fps"] = np.array(fps, dtype=np.float64)
    batch["skipped"] = skipped
    return batch


def as_tensors(batch: dict) -> dict:
    """A batch with its numpy arrays turned into tensors (no copy): the form of docs/architecture.md."""
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


def batches(
    clips: Iterable[dict],
    pop_skipped: Callable[[], dict[str, int]],
    batch_size: int,
    partial: bool,
    ring_slots: int = RING_SLOTS,
) -> Iterator[dict]:
    """Group clips into batches of `batch_size` (a last, smaller one only if `partial`), numpy arrays not yet
    tensors (see `_collate_rows`); `pop_skipped` gives the skip counts since the previous batch. Each clip's frames
    are copied into the batch's frames buffer as soon as the clip is decoded, and dropped from the clip.

    In a DataLoader worker the buffer is a slot of the worker's `_FramesRing` of `ring_slots` slots and the batch's
    `frames` is a `_SlotRef` to it (BatchLoader copies the frames out); a batch that finds no free slot, or every
    batch with `ring_slots=0`, gets a fresh shared-memory tensor (the memory path of torch's default collate, less
    its stack copy). In-process, `frames` is an ordinary tensor.
    """
    info = get_worker_info()
    ring: _FramesRing | None = None
    group: list[dict] = []
    for clip in clips:
        if not group:
            shape = (batch_size, *clip["frames"].shape)  # uint8 [B, T, H, W, C]
            taken = None
            if info is not None and ring_slots > 0:
                if ring is None or math.prod(shape) > ring.slot_bytes:  # (frame sizes may differ if image_size=0)
                    ring = _FramesRing(info.id, ring_slots, math.prod(shape))
                taken = ring.take(shape)
            if taken is None:
                sent: torch.Tensor | _SlotRef = _frames_buffer(shape)
                frames = sent.numpy()
            else:
                frames, sent = taken
        if clip["frames"].shape != frames.shape[1:]:
            raise ValueError(
                f"clips in a batch have different frame shapes {frames.shape[1:]} and {clip['frames'].shape}; set "
                "data.image_size > 0"
            )
        frames[len(group)] = clip.pop("frames")
        group.append(clip)
        if len(group) == batch_size:
            yield _collate_rows(sent, group, pop_skipped())
            group = []
    if group and partial:
        rows = (len(group), *shape[1:])
        yield _collate_rows(
            replace(sent, shape=rows) if isinstance(sent, _SlotRef) else sent[: len(group)], group, pop_skipped()
        )


def _identity(batch: dict) -> dict:
    return batch


class BatchLoader(DataLoader):
    """A DataLoader of whole batches (batch_size=None, from `batches`) that, in the consuming process, copies each
    batch's frames out of their slot in the worker's ring as soon as the batch arrives (see `_copy_out`) and makes
    its numpy arrays tensors (see `_collate_rows`)."""

    def __init__(self, dataset: IterableDataset, **kwargs) -> None:
        super().__init__(dataset, batch_size=None, collate_fn=_identity, **kwargs)

    def __iter__(self) -> Iterator[dict]:
        loaded = super().__iter__()  # (the workers start here, not at the first batch)
        if hasattr(loaded, "_shutdown_workers"):
            _stop_at_exit(loaded)
        # frames from a ring are copied after DataLoader's pin-memory thread: pinned then, when DataLoader pins
        return _received(loaded, pin=self.pin_memory and torch.cuda.is_available())


_live_iterators: weakref.WeakSet = weakref.WeakSet()  # multi-process DataLoader iterators not yet collected


@atexit.register
def _shut_down_live_iterators() -> None:
    """At interpreter exit, shut down the workers of every DataLoader iterator still alive (see `_stop_at_exit`)."""
    for loaded in list(_live_iterators):
        loaded._shutdown_workers()


def _stop_at_exit(loaded: Iterator) -> None:
    """Shut the workers of multi-process DataLoader iterator `loaded` down at interpreter exit if it is still alive.

    The train loader's workers ignore SIGTERM (stream.py, `_workers_leave_stopping_to_the_trainer`), and at exit
    Python's multiprocessing terminates daemon workers with SIGTERM and then joins them, while torch skips its own
    shutdown once Python is exiting: a script that ended with an iterator still alive hung for ever. The atexit hook
    above is registered after those of multiprocessing and torch (both imported before it), so it runs before them
    and stops the workers the normal way (a sentinel through their index queues).
    """
    _live_iterators.add(loaded)


def _received(loaded: Iterator[dict], pin: bool) -> Iterator[dict]:
    """The batches of a DataLoader iterator over `batches` in their final form: frames copied out of their workers'
    rings as each batch arrives (`_copy_out`; into pinned memory if `pin`), numpy arrays made tensors
    (`as_tensors`)."""
    rings: dict[int, tuple[int, np.ndarray]] = {}  # this iteration's workers' rings: worker id -> (ring id, bytes)
    for batch in loaded:
        if isinstance(batch["frames"], _SlotRef):
            batch["frames"] = _copy_out(batch["frames"], rings, pin)
        yield as_tensors(batch)
