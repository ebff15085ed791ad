"""Throughput of the pipeline against the decoder alone, on the same kind of clips.

    python -m data_pipeline.bench --shards 'data/moving_digits/train/shard-*.tar' [--workers 0 1 2] [--batches N]

Prints one JSON line per worker setting:
    decoder_fps        frames/s of the decoder alone, one process, decoding clips (same length, random starts, same
                       videos) straight from the shard bytes already in memory: the limit for one process
    pipeline_clips_s   clips/s out of make_train_loader (tar reading, shuffle, decode, clip, collate)
    pipeline_fps       frames/s out of make_train_loader
    ratio              pipeline_fps / decoder_fps
    *_per_cpu_s, cpu_ratio   the same per CPU-second (main process + workers): the pipeline's overhead, robust to
                       other load on the machine (wall-clock figures are not)
The first batch of each pipeline run is not timed (worker start-up).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from itertools import islice

import numpy as np
import psutil
import webdataset as wds

from data_pipeline.clips import clip_indices, clip_starts
from data_pipeline.config import DataConfig
from data_pipeline.decoders import get_decoder
from data_pipeline.shardlist import expand_shards
from data_pipeline.stream import make_train_loader
from data_pipeline.write_shards import VIDEO_EXTENSIONS


def _load_videos(urls: list[str], limit: int) -> list[tuple[bytes, int]]:
    """Up to `limit` (video bytes, num_frames) pairs read from the shards into memory."""
    videos = []
    for sample in wds.DataPipeline(lambda: iter([{"url": u} for u in urls]), wds.tarfile_to_samples()):
        ext = next((e for e in VIDEO_EXTENSIONS if e in sample), None)
        if ext is None or "json" not in sample:
            continue
        videos.append((sample[ext], int(json.loads(sample["json"])["num_frames"])))
        if len(videos) >= limit:
            break
    return videos


def _cpu_seconds() -> float:
    """CPU time of this process and its live children (DataLoader workers)."""
    me = psutil.Process()
    times = [me.cpu_times(), *(child.cpu_times() for child in me.children(recursive=True))]
    return sum(t.user + t.system for t in times)


def decoder_rate(cfg: DataConfig, urls: list[str], num_clips: int, seed: int = 0) -> tuple[float, float]:
    """(wall, CPU) frames/s of `cfg.decoder` alone decoding `num_clips` random clips of the shard videos from
    memory."""
    videos = _load_videos(urls, num_clips)
    if not videos:
        raise ValueError(f"no samples with a video and a JSON entry in {urls[:3]}")
    decoder, rng = get_decoder(cfg.decoder), np.random.default_rng(seed)
    jobs = []
    for i in range(num_clips):
        data, num_frames = videos[i % len(videos)]
        starts = clip_starts(num_frames, cfg.clip_length, cfg.frame_step, rng, cfg.clips_per_video)
        if starts is not None:
            needed = np.unique(np.concatenate([clip_indices(s, cfg.clip_length, cfg.frame_step) for s in starts]))
            jobs.append((data, needed.tolist()))
    if not jobs:
        raise ValueError(f"every video in {urls[:3]} is shorter than a clip of {cfg.clip_length} frames")
    decoder.decode(*jobs[0], size=cfg.image_size)  # first-call set-up is not throughput
    begin, begin_cpu = time.perf_counter(), _cpu_seconds()
    for data, indices in jobs:
        decoder.decode(data, indices, size=cfg.image_size)
    frames = len(jobs) * cfg.clips_per_video * cfg.clip_length
    return frames / (time.perf_counter() - begin), frames / (_cpu_seconds() - begin_cpu)


def pipeline_rate(cfg: DataConfig, shards: str, batches: int) -> tuple[float, float]:
    """(wall, CPU) clips/s out of `make_train_loader` over `batches` batches, not counting the first (start-up).
    CPU time counts the main process and its workers."""
    loader = make_train_loader(replace(cfg, epoch_batches=batches + 2), shards, seed=0, epoch=0, rank=0, world_size=1)
    iterator = iter(loader)
    next(iterator)
    begin, begin_cpu = time.perf_counter(), _cpu_seconds()
    clips = sum(len(batch["key"]) for batch in islice(iterator, batches))
    wall, cpu = time.perf_counter() - begin, _cpu_seconds() - begin_cpu  # read while the workers still live
    del iterator
    return clips / wall, clips / cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Pipeline vs decoder-only throughput (one JSON line per setting).")
    parser.add_argument("--shards", required=True, help="shard spec (glob, brace pattern, URL)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=50, help="timed batches per setting")
    parser.add_argument("--batch-size", type=int, default=DataConfig.batch_size)
    parser.add_argument("--decoder", default=DataConfig.decoder)
    parser.add_argument("--clips-per-video", type=int, default=DataConfig.clips_per_video)
    args = parser.parse_args(argv)
    cfg = DataConfig(batch_size=args.batch_size, decoder=args.decoder, clips_per_video=args.clips_per_video)
    urls = expand_shards(args.shards)
    for workers in args.workers:
        # measured next to each pipeline run, so both see the same machine load
        limit, limit_cpu = decoder_rate(cfg, urls, num_clips=args.batches * cfg.batch_size, seed=workers)
        clips_s, clips_cpu_s = pipeline_rate(replace(cfg, num_workers=workers), args.shards, args.batches)
        fps = clips_s * cfg.clip_length
        record = {
            "workers": workers,
            "decoder": cfg.decoder,
            "clip_length": cfg.clip_length,
            "image_size": cfg.image_size,
            "batch_size": cfg.batch_size,
            "clips_per_video": cfg.clips_per_video,
            "decoder_fps": round(limit, 1),
            "pipeline_clips_s": round(clips_s, 1),
            "pipeline_fps": round(fps, 1),
            "ratio": round(fps / limit, 3),
            "decoder_fps_per_cpu_s": round(limit_cpu, 1),
            "pipeline_fps_per_cpu_s": round(clips_cpu_s * cfg.clip_length, 1),
            "cpu_ratio": round(clips_cpu_s * cfg.clip_length / limit_cpu, 3),
        }
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
