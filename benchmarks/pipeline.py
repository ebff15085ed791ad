"""Throughput of the pipeline against the decoder alone, on the same kind of clips.

    python -m benchmarks.pipeline --shards 'data/moving_digits/train/shard-*.tar' [--workers 0 1 2] [--batches N]
        [--image-size 64] [--num-context 4] [--num-target 4] [--frame-step 1] [--batch-size 16] [--clips-per-video 1]
        [--ring-slots 4 0]

Frames are decoded at --image-size (0: as stored) into clips of --num-context + --num-target frames. Prints one JSON
line per (worker, ring) setting (ring_slots 0: each batch in a fresh shared-memory tensor, torch's default collate
path, instead of the worker's frames ring):
    decoder_fps        frames/s of the decoder alone, one process, making the same decoder calls as the pipeline did
                       for the timed clips (same videos, same frames), from video bytes already in memory: the limit
                       for one process
    pipeline_clips_s   clips/s out of make_train_loader (tar reading, shuffle, decode, clip, collate)
    pipeline_fps       frames/s out of make_train_loader
    ratio              pipeline_fps / decoder_fps
    *_per_cpu_s, cpu_ratio   the same per CPU-second (main process + workers): the pipeline's overhead, robust to
                       other load on the machine (wall-clock figures are not)
    fps_per_core       pipeline_fps_per_cpu_s: the frames/s one CPU core delivers through the pipeline, what sizes
                       the decode workers a GPU needs (benchmarks/step_speed.py, decode_workers_needed)
The first batch of each pipeline run is not timed (worker start-up).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import replace

import numpy as np
import psutil
import webdataset as wds

from data_pipeline.batching import RING_SLOTS, BatchLoader
from data_pipeline.clips import clip_indices
from data_pipeline.config import DataConfig
from data_pipeline.decoders import get_decoder
from data_pipeline.format import VIDEO_EXTENSIONS
from data_pipeline.shardlist import expand_shards
from data_pipeline.stream import TrainClips, make_train_loader


def _load_videos(urls: list[str], keys: set[str]) -> dict[str, bytes]:
    """The video bytes of the samples `keys`, read from the shards into memory."""
    videos: dict[str, bytes] = {}
    for sample in wds.DataPipeline(lambda: iter([{"url": u} for u in urls]), wds.tarfile_to_samples()):
        ext = next((e for e in VIDEO_EXTENSIONS if e in sample), None)
        if ext is not None and sample["__key__"] in keys:
            videos[sample["__key__"]] = sample[ext]
            if len(videos) == len(keys):
                break
    return videos


CPU_TICK = 0.01  # s: the resolution of the kernel's CPU-time counters (psutil reads them in clock ticks)


def _cpu_seconds() -> float:
    """CPU time of this process and its live children (DataLoader workers)."""
    me = psutil.Process()
    times = [me.cpu_times(), *(child.cpu_times() for child in me.children(recursive=True))]
    return sum(t.user + t.system for t in times)


def cpu_interval(begin: float) -> float:
    """CPU seconds since `begin` (a `_cpu_seconds()` reading), at least one clock tick: a short run whose batches the
    workers had ready can read 0, and a rate over it is then a lower bound rather than a division by zero."""
    return max(_cpu_seconds() - begin, CPU_TICK)


def decode_jobs(cfg: DataConfig, clips: list[tuple[str, int]]) -> list[tuple[str, list[int]]]:
    """The decoder calls the pipeline made for `clips` ((key, start) in the order the batches gave them): one call
    per sample, for the union of the frames of its `cfg.clips_per_video` clips (a sample's clips come out one after
    another; a sample cut by the ends of the timed batches gets a call for the clips inside them)."""
    starts: dict[str, list[int]] = {}
    for key, start in clips:
        starts.setdefault(key, []).append(start)
    jobs = []
    for key, key_starts in starts.items():
        for i in range(0, len(key_starts), cfg.clips_per_video):
            group = key_starts[i : i + cfg.clips_per_video]
            frames = np.concatenate([clip_indices(s, cfg.clip_length, cfg.frame_step) for s in group])
            jobs.append((key, (frames if len(group) == 1 else np.unique(frames)).tolist()))
    return jobs


def decoder_rate(cfg: DataConfig, urls: list[str], clips: list[tuple[str, int]]) -> tuple[float, float]:
    """(wall, CPU) frames/s of `cfg.decoder` alone, in one process, making the decoder calls the pipeline made for
    `clips` ((key, start) pairs) on the same video bytes, read into memory beforehand."""
    jobs = decode_jobs(cfg, clips)
    videos = _load_videos(urls, {key for key, _ in jobs})
    if not jobs or len(videos) < len({key for key, _ in jobs}):
        raise ValueError(f"the clips' videos are not all in {urls[:3]}")
    decoder = get_decoder(cfg.decoder)
    decoder.decode(videos[jobs[0][0]], jobs[0][1], size=cfg.image_size)  # first-call set-up is not throughput
    begin, begin_cpu = time.perf_counter(), _cpu_seconds()
    for key, indices in jobs:
        decoder.decode(videos[key], indices, size=cfg.image_size)
    frames = len(clips) * cfg.clip_length
    return frames / (time.perf_counter() - begin), frames / cpu_interval(begin_cpu)


def pipeline_rate(
    cfg: DataConfig, shards: str, batches: int, ring_slots: int = RING_SLOTS
) -> tuple[float, float, list[tuple[str, int]]]:
    """(wall, CPU) clips/s out of `make_train_loader` over `batches` batches, not counting the first (start-up), and
    the (key, start) of the timed clips. CPU time counts the main process and its workers. `ring_slots=0`: the
    workers send each batch in a fresh shared-memory tensor (torch's default collate path) instead of their ring."""
    cfg = replace(cfg, epoch_batches=batches + 2)
    if ring_slots == RING_SLOTS:
        loader = make_train_loader(cfg, shards, seed=0, epoch=0, rank=0, world_size=1)
    else:
        dataset = TrainClips(cfg, expand_shards(shards), seed=0, epoch=0, rank=0, world_size=1, ring_slots=ring_slots)
        loader = BatchLoader(dataset, num_workers=cfg.num_workers)
    iterator = iter(loader)
    next(iterator)
    clips: list[tuple[str, int]] = []
    begin, begin_cpu = time.perf_counter(), _cpu_seconds()
    for batch in itertools.islice(iterator, batches):
        clips.extend(zip(batch["key"], batch["start"].tolist(), strict=True))
    wall, cpu = time.perf_counter() - begin, cpu_interval(begin_cpu)  # read while the workers still live
    del iterator
    return len(clips) / wall, len(clips) / cpu, clips


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Pipeline vs decoder-only throughput (one JSON line per setting).")
    parser.add_argument("--shards", required=True, help="shard spec (glob, brace pattern, URL)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=50, help="timed batches per setting")
    parser.add_argument("--batch-size", type=int, default=DataConfig.batch_size)
    parser.add_argument("--decoder", default=DataConfig.decoder)
    parser.add_argument("--clips-per-video", type=int, default=DataConfig.clips_per_video)
    parser.add_argument("--image-size", type=int, default=DataConfig.image_size, help="decoded frame size (0: stored)")
    parser.add_argument("--num-context", type=int, default=DataConfig.num_context)
    parser.add_argument("--num-target", type=int, default=DataConfig.num_target)
    parser.add_argument("--frame-step", type=int, default=DataConfig.frame_step)
    parser.add_argument(
        "--ring-slots",
        type=int,
        nargs="+",
        default=[RING_SLOTS],
        help=f"frames-ring slots per worker (default {RING_SLOTS}); 0: a fresh shared-memory tensor per batch, as "
        "torch's default collate (list both, e.g. 4 0 4 0, to compare them back to back)",
    )
    args = parser.parse_args(argv)
    cfg = DataConfig(
        batch_size=args.batch_size,
        decoder=args.decoder,
        clips_per_video=args.clips_per_video,
        image_size=args.image_size,
        num_context=args.num_context,
        num_target=args.num_target,
        frame_step=args.frame_step,
    )
    urls = expand_shards(args.shards)
    for workers, ring_slots in itertools.product(args.workers, args.ring_slots):
        clips_s, clips_cpu_s, clips = pipeline_rate(
            replace(cfg, num_workers=workers), args.shards, args.batches, ring_slots=ring_slots
        )
        # right after the pipeline run (same machine load), the same decoder calls on the same clips
        limit, limit_cpu = decoder_rate(cfg, urls, clips)
        fps = clips_s * cfg.clip_length
        record = {
            "workers": workers,
            "ring_slots": ring_slots,
            "decoder": cfg.decoder,
            "clip_length": cfg.clip_length,
            "image_size": cfg.image_size,
            "frame_step": cfg.frame_step,
            "batch_size": cfg.batch_size,
            "clips_per_video": cfg.clips_per_video,
            "decoder_fps": round(limit, 1),
            "pipeline_clips_s": round(clips_s, 1),
            "pipeline_fps": round(fps, 1),
            "ratio": round(fps / limit, 3),
            "decoder_fps_per_cpu_s": round(limit_cpu, 1),
            "pipeline_fps_per_cpu_s": round(clips_cpu_s * cfg.clip_length, 1),
            "cpu_ratio": round(clips_cpu_s * cfg.clip_length / limit_cpu, 3),
            "fps_per_core": round(clips_cpu_s * cfg.clip_length, 1),
        }
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
