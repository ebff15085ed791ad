"""The hand-over of batches from DataLoader workers (data_pipeline/batching.py) on real shards: frames travel through
each worker's ring of shared-memory slots, and a slot is never written again before its batch has been copied out."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from shard_helpers import read_samples, train_glob, write_tar

from data_pipeline.batching import BatchLoader, _copy_out, _FramesRing
from data_pipeline.clips import clip_indices
from data_pipeline.config import DataConfig
from data_pipeline.decoders import get_decoder
from data_pipeline.shardlist import expand_shards
from data_pipeline.stream import EvalClips, TrainClips, make_eval_loader, make_train_loader

CFG = DataConfig(num_context=3, num_target=3, batch_size=2, num_workers=0, shuffle_buffer=4, epoch_batches=4)
ARRAYS = ("frames", "state", "action", "events", "labels", "start", "fps")


def _assert_same_batches(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            if name in ARRAYS:
                assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
                assert torch.equal(a[name], b[name]), name
            else:
                assert a[name] == b[name], name


def _assert_frames_are_the_clips(batches: list[dict], digits_shards: Path, cfg: DataConfig) -> None:
    """Every clip's frames are its video's frames at its start (decoded here, one video at a time)."""
    samples, decoder, decoded = read_samples(digits_shards), get_decoder(cfg.decoder), {}
    for batch in batches:
        for row, (key, start) in enumerate(zip(batch["key"], batch["start"].tolist(), strict=True)):
            if key not in decoded:
                num_frames = json.loads(samples[key]["json"])["num_frames"]
                decoded[key] = decoder.decode(samples[key]["mp4"], list(range(num_frames)), size=cfg.image_size)
            expected = decoded[key][clip_indices(start, cfg.clip_length, cfg.frame_step)]
            np.testing.assert_array_equal(batch["frames"][row].numpy(), expected, err_msg=f"{key} at {start}")


def test_ring_slots_are_taken_copied_out_and_freed():
    shape = (2, 3, 4, 4, 3)  # [B, T, H, W, C]
    ring = _FramesRing(worker=0, slots=2, slot_bytes=int(np.prod(shape)))
    first, first_ref = ring.take(shape)
    second, second_ref = ring.take(shape)
    first[:], second[:] = 1, 2
    assert ring.take(shape) is None  # both slots wait for the consumer
    assert first_ref.ring is not None and second_ref.ring is None  # the ring travels once, with its first batch
    rings: dict = {}
    copied = _copy_out(first_ref, rings)
    assert copied.shape == shape and copied.dtype == torch.uint8 and not copied.is_shared() and (copied == 1).all()
    again, again_ref = ring.take(shape)  # the copied-out slot is free again, the other one is not
    assert again_ref.offset == first_ref.offset
    again[:] = 3
    assert (copied == 1).all()  # the consumer's frames are its own
    assert (_copy_out(second_ref, rings) == 2).all()
    assert ring.take((3, 3, 4, 4, 3)) is None  # does not fit a slot
    other = _FramesRing(worker=0, slots=2, slot_bytes=8)  # a second ring of worker 0, whose first batch was lost
    other.take((8,))
    with pytest.raises(RuntimeError, match="never received"):
        _copy_out(other.take((8,))[1], rings)
    with pytest.raises(ValueError, match="slots >= 1"):
        _FramesRing(worker=0, slots=0, slot_bytes=8)


def test_one_worker_gives_the_in_process_stream_through_its_ring(digits_shards):
    """Many more batches than ring slots: each batch's frames, and everything else, as the in-process run."""
    cfg = replace(CFG, epoch_batches=40)
    runs = {
        workers: list(
            make_train_loader(
                replace(cfg, num_workers=workers), train_glob(digits_shards), seed=2, epoch=0, rank=0, world_size=1
            )
        )
        for workers in (0, 1)
    }
    _assert_same_batches(runs[1], runs[0])
    # one worker never has more batches in flight than its ring has slots: no batch needed a shared buffer of its own
    assert not any(batch["frames"].is_shared() for batch in runs[1])


def test_a_consumer_far_behind_its_workers_never_sees_a_slot_overwritten(digits_shards):
    """One slot per worker, deep prefetch and a slow consumer: the workers run ahead of the copies out of their slots
    (the batches that found their slot busy came in shared buffers of their own), and every clip has its frames."""
    cfg = replace(CFG, epoch_batches=16)
    dataset = TrainClips(
        cfg, expand_shards(train_glob(digits_shards)), seed=1, epoch=0, rank=0, world_size=1, ring_slots=1
    )
    batches = []
    for batch in BatchLoader(dataset, num_workers=2, prefetch_factor=4):
        batches.append(batch)
        time.sleep(0.05)
    assert len(batches) == 16
    shared = [batch["frames"].is_shared() for batch in batches]
    assert any(shared) and not all(shared)
    _assert_frames_are_the_clips(batches, digits_shards, cfg)


def test_a_worker_gives_partial_batches_and_frames_larger_than_its_ring(digits_shards, carphone_path, tmp_path):
    """A last, smaller batch from a worker; with image_size=0 a larger video (176x144 after 64x64 ones) makes the worker
    allocate a larger ring, which the smaller frames after it then use."""
    val = str(digits_shards / "val" / "shard-*.tar")
    in_process = list(make_eval_loader(CFG, val, num_clips=5, seed=1, batch_size=2))
    dataset = EvalClips(CFG, expand_shards(val), num_clips=5, seed=1, batch_size=2)
    from_worker = list(BatchLoader(dataset, num_workers=1))
    assert [len(b["key"]) for b in from_worker] == [2, 2, 1]
    _assert_same_batches(from_worker, in_process)

    samples = read_samples(digits_shards, "val")
    digits = [(f"{k}.{ext}", samples[k][ext]) for k in sorted(samples)[:3] for ext in ("mp4", "json")]
    carphone = [("carphone.mp4", carphone_path.read_bytes()), ("carphone.json", b'{"num_frames": 120}')]
    shard = str(write_tar(tmp_path / "shard-000000.tar", [*digits[:4], *carphone, *digits[4:]]))
    native = replace(CFG, image_size=0)
    in_process = list(make_eval_loader(native, shard, num_clips=4, batch_size=1))
    from_worker = list(BatchLoader(EvalClips(native, [shard], num_clips=4, seed=0, batch_size=1), num_workers=1))
    assert [tuple(b["frames"].shape[2:4]) for b in from_worker] == [(64, 64), (64, 64), (144, 176), (64, 64)]
    _assert_same_batches(from_worker, in_process)
    assert not any(batch["frames"].is_shared() for batch in from_worker)


def test_spawned_workers_give_the_same_stream(digits_shards):
    cfg = replace(CFG, num_workers=2, epoch_batches=6)
    forked = list(make_train_loader(cfg, train_glob(digits_shards), seed=4, epoch=1, rank=0, world_size=1))
    dataset = TrainClips(cfg, expand_shards(train_glob(digits_shards)), seed=4, epoch=1, rank=0, world_size=1)
    spawned = list(BatchLoader(dataset, num_workers=2, multiprocessing_context="spawn"))
    _assert_same_batches(spawned, forked)


def test_a_script_that_exits_with_a_live_iterator_does_not_hang(digits_shards):
    """The train loader's workers ignore SIGTERM; exiting with its iterator alive used to hang in Python's exit."""
    script = (
        "import sys\n"
        "from dataclasses import replace\n"
        "from data_pipeline.config import DataConfig\n"
        "from data_pipeline.stream import make_train_loader\n"
        "cfg = replace(DataConfig(), num_context=3, num_target=3, batch_size=2, num_workers=2, epoch_batches=50)\n"
        "it = iter(make_train_loader(cfg, sys.argv[1], seed=0, epoch=0, rank=0, world_size=1))\n"
        "next(it)\n"
        "print('exiting', flush=True)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, train_glob(digits_shards)],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "exiting" in result.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_frames_from_a_ring_are_pinned_when_the_loader_pins(digits_shards):
    cfg = replace(CFG, epoch_batches=3)
    dataset = TrainClips(cfg, expand_shards(train_glob(digits_shards)), seed=0, epoch=0, rank=0, world_size=1)
    batches = list(BatchLoader(dataset, num_workers=1, pin_memory=True))
    assert all(batch["frames"].is_pinned() for batch in batches)
    _assert_frames_are_the_clips(batches, digits_shards, cfg)
