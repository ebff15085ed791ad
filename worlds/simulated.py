"""Writing a simulated world to shards: the train/val layout and seeding shared by the built-in worlds.

`write_world(output, simulate, ...)` calls `simulate(rng=..., **kwargs) -> (frames uint8 [T, H, W, 3], metadata)`
once per video, encodes each video with H.264 (a short GOP for cheap random access, near-lossless) and writes
OUTPUT/train/ and OUTPUT/val/ shards. Train uses the generator seeded [seed, 0], val [seed, 1]: the same seed gives
the same frames and metadata. OUTPUT/world.json names the generator, its VERSION (raised whenever the world's rules
change, so data written by an older one is not mistaken for today's) and the seed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from data_pipeline.writer import Sample, WriteSummary, write_samples
from data_pipeline.writer.encode import encode_h264

FPS = 10.0
GOP, CRF = 8, 10  # short GOP for cheap random access; crf 10 keeps decoded pixels within a few levels


def world_parser(description: str) -> argparse.ArgumentParser:
    """The command line every built-in world shares: --output, --num-videos, --seed, --num-frames, --val-videos,
    --samples-per-shard; the world adds its own options."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--output", required=True)
    parser.add_argument("--num-videos", type=int, required=True, help="training videos")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--num-frames", type=int, default=32)
    parser.add_argument("--val-videos", type=int, help="held-out videos (default num-videos // 10)")
    parser.add_argument("--samples-per-shard", type=int, default=100)
    parser.add_argument(
        "--stable-patch", type=int, default=0, metavar="PX",
        help="paste an episode-constant square of PX px (random colour, a random corner) into every frame of each "
        "video: the stable-token distractor of the recipe's regression check (0 = none)",
    )  # fmt: skip
    return parser


def report(summaries: dict[str, WriteSummary]) -> int:
    """Print each split's write summary; the exit status: 0 when every split wrote samples, else 1."""
    for summary in summaries.values():
        print(summary.report())
    return 0 if all(s.written for s in summaries.values()) else 1


def paste_stable_patch(frames: np.ndarray, size: int, rng: np.random.Generator) -> list[int]:
    """Paste one square of `size` px and a random colour into the same corner (drawn from `rng`) of every frame of
    a video, frames uint8 [T, H, W, 3], in place: an episode-constant distractor (the "stable token" of
    jepa-stable-token-failure, Sobal et al. 2022's fixed dot), which is cheap to encode and predict and says nothing
    about what moves. Returns [x, y, size, r, g, b] (the top-left corner, in px), recorded in the sidecar."""
    height, width = frames.shape[1:3]
    if not 0 < size <= min(height, width):
        raise ValueError(f"--stable-patch must be in (0, {min(height, width)}] px, got {size}")
    x = int(rng.integers(2)) * (width - size)
    y = int(rng.integers(2)) * (height - size)
    colour = rng.integers(0, 256, size=3)
    frames[:, y : y + size, x : x + size] = colour.astype(np.uint8)
    return [x, y, size, *(int(c) for c in colour)]


def _videos(
    split: str,
    count: int,
    rng: np.random.Generator,
    simulate: Callable,
    kwargs: dict,
    stable_patch: int = 0,
    patch_rng: np.random.Generator | None = None,
) -> Iterator[Sample]:
    for i in range(count):
        frames, meta = simulate(rng=rng, **kwargs)
        if stable_patch:  # its own generator: the world itself is drawn exactly as without the patch
            meta["stable_patch"] = paste_stable_patch(frames, stable_patch, patch_rng)
        key = f"{split}_{i:07d}"
        yield Sample(key, encode_h264(frames, FPS, gop=GOP, crf=CRF), "mp4", meta, key)


def write_world(
    output: str | Path,
    simulate: Callable[..., tuple[np.ndarray, dict]],
    num_videos: int,
    seed: int,
    *,
    val_videos: int | None = None,
    samples_per_shard: int = 100,
    progress: bool = True,
    version: int = 1,
    stable_patch: int = 0,
    **simulate_kwargs,
) -> dict[str, WriteSummary]:
    """Generate `num_videos` training and `val_videos` (default num_videos // 10, at least 1) held-out videos with
    `simulate` into OUTPUT/train/ and OUTPUT/val/, and OUTPUT/world.json ({"generator": simulate's module,
    "version": version, "seed": seed, "stable_patch": px}); returns the write summary per split.

    `stable_patch` > 0 pastes an episode-constant square of that many px into a corner of every frame of each video
    (`paste_stable_patch`; the recipe's stable-token regression check); the videos are otherwise the same."""
    counts = {"train": num_videos, "val": max(1, num_videos // 10) if val_videos is None else val_videos}
    summaries = {}
    for split_id, (split, count) in enumerate(counts.items()):
        rng = np.random.default_rng([seed, split_id])
        patch_rng = np.random.default_rng([seed, split_id, 1])
        summaries[split] = write_samples(
            _videos(split, count, rng, simulate, simulate_kwargs, stable_patch, patch_rng),
            Path(output) / split,
            samples_per_shard=samples_per_shard,
            total=count,
            progress=progress,
        )
    module = sys.modules.get(simulate.__module__)  # run as `python -m`, the module is __main__; its spec names it
    generator = getattr(getattr(module, "__spec__", None), "name", None) or simulate.__module__
    stamp = {"generator": generator, "version": version, "seed": seed, "stable_patch": stable_patch}
    (Path(output) / "world.json").write_text(json.dumps(stamp) + "\n")
    return summaries


def world_version(data_dir: str | Path) -> int:
    """The VERSION of the generator that wrote DATA_DIR (its world.json); 1 where there is none (data written before
    worlds were versioned)."""
    stamp = Path(data_dir) / "world.json"
    return int(json.loads(stamp.read_text())["version"]) if stamp.exists() else 1
